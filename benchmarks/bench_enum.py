"""Benchmark: enumeration mixed with score-function sites, against Pyro's ``TraceEnum_ELBO``.

Two models whose local discrete latents are enumerated in the model
(``infer={"enumerate": "parallel"}``) and whose global discrete structure is sampled by the
guide (a score-function site):

* *mixture*: N = 200 points from a two-component Gaussian mixture (assignments
  enumerated) whose location shift is one of 4 values chosen by a sampled global
  Categorical;
* *hmm*: an HMM of length T = 100 with 2 hidden states (enumerated along
  :func:`pyro.markov`) whose transition matrix is one of 3 chosen by a sampled global
  Categorical.

At fixed parameters, each objective with K particles gives ``--draws`` gradient draws of
the guide's parameters (the sampled site's logits); the table reports the total variance
(sum over coordinates) and its ratio to ``TraceEnum_ELBO``'s at the same K, and the median
step time (``loss_and_grads``, timed interleaved) with its ratio. Every contender computes
the same estimand (the ELBO gradient with the enumerated sites summed out exactly), so
the variance ratio is the control variate's gain.

Run: ``python benchmarks/bench_enum.py`` (about two minutes on one CPU core).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from common import machine, repo_path, versions, write_table
from pyro.infer import TraceEnum_ELBO
from pyro.ops.indexing import Vindex

from pyro_wakesleep import LeaveOneOutBaseline, MovingAverageBaseline, ScoreFunctionELBO


def mixture(seed: int) -> tuple[Callable, Callable, torch.Tensor, int]:
    generator = torch.Generator().manual_seed(seed)
    z = torch.rand(200, generator=generator) < 0.4
    x = torch.where(z, 3.0, -1.0) + 1.5 + torch.randn(200, generator=generator)
    shifts = torch.tensor([0.0, 0.5, 1.5, 3.0])

    def model(x: torch.Tensor) -> None:
        k = pyro.sample("k", dist.Categorical(logits=torch.zeros(4)))
        weights = pyro.param("weights", torch.tensor([0.5, 0.5]),
                             constraint=dist.constraints.simplex)
        locs = pyro.param("locs", torch.tensor([-1.0, 2.0]))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[z] + shifts[k], 1.0), obs=x)

    def guide(x: torch.Tensor) -> None:
        pyro.sample("k", dist.Categorical(logits=pyro.param("k_logits", torch.zeros(4))))

    return model, guide, x, 1


def hmm(seed: int) -> tuple[Callable, Callable, torch.Tensor, int]:
    generator = torch.Generator().manual_seed(seed)
    states, s = [], 0
    for _ in range(100):
        s = s if torch.rand((), generator=generator) < 0.9 else 1 - s
        states.append(s)
    x = torch.tensor(states, dtype=torch.float) * 2.0 + torch.randn(100, generator=generator)
    stay = torch.tensor([0.95, 0.7, 0.5])
    table = torch.stack([torch.stack([stay, 1 - stay], -1),
                         torch.stack([1 - stay, stay], -1)], 1)

    def model(x: torch.Tensor) -> None:
        k = pyro.sample("k", dist.Categorical(logits=torch.zeros(3)))
        locs = pyro.param("locs", torch.tensor([0.0, 2.0]))
        state: Any = torch.tensor(0)
        for t in pyro.markov(range(len(x))):
            state = pyro.sample(f"z_{t}", dist.Categorical(Vindex(table)[k, state]),
                                infer={"enumerate": "parallel"})
            pyro.sample(f"x_{t}", dist.Normal(locs[state], 1.0), obs=x[t])

    def guide(x: torch.Tensor) -> None:
        pyro.sample("k", dist.Categorical(logits=pyro.param("k_logits", torch.zeros(3))))

    return model, guide, x, 0


MODELS = {"mixture": mixture, "hmm": hmm}


def contenders(k: int, nesting: int) -> dict[str, Any]:
    return {
        "TraceEnum_ELBO": TraceEnum_ELBO(num_particles=k, vectorize_particles=True,
                                         max_plate_nesting=nesting),
        "ScoreFunctionELBO (no baseline)": ScoreFunctionELBO(k, max_plate_nesting=nesting),
        "ScoreFunctionELBO + MovingAverageBaseline": ScoreFunctionELBO(
            k, MovingAverageBaseline(), max_plate_nesting=nesting),
        "ScoreFunctionELBO + LeaveOneOutBaseline": ScoreFunctionELBO(
            k, LeaveOneOutBaseline(), max_plate_nesting=nesting),
    }


def grad_draw(objective: Any, model: Callable, guide: Callable, x: torch.Tensor) -> torch.Tensor:
    store = pyro.get_param_store()
    for name in store:
        store[name].unconstrained().grad = None
    objective.loss_and_grads(model, guide, x)
    return store["k_logits"].unconstrained().grad.clone()  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--particles", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/benchmarks/enumeration.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    start = time.perf_counter()
    rows = []
    for name, build in MODELS.items():
        model, guide, x, nesting = build(args.seed)
        for k in args.particles:
            runners = contenders(k, nesting)
            variances, times = {}, {}
            for label, objective in runners.items():
                pyro.clear_param_store()
                pyro.set_rng_seed(args.seed)
                for _ in range(5):  # warm-up: running baselines settle, params created
                    grad_draw(objective, model, guide, x)
                draws = torch.stack([grad_draw(objective, model, guide, x)
                                     for _ in range(args.draws)])
                variances[label] = draws.var(0).sum().item()
                times[label] = []
            labels = list(runners)
            for r in range(args.rounds):
                for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                    pyro.clear_param_store()
                    pyro.set_rng_seed(args.seed + r)
                    grad_draw(runners[label], model, guide, x)
                    begin = time.perf_counter()
                    for _ in range(args.steps):
                        grad_draw(runners[label], model, guide, x)
                    times[label].append((time.perf_counter() - begin) / args.steps)
            base_var = variances["TraceEnum_ELBO"]
            base_time = statistics.median(times["TraceEnum_ELBO"])
            for label in labels:
                step = statistics.median(times[label])
                rows.append(f"| {name} | {k} | {label} | {variances[label]:.4g} | "
                            f"{variances[label] / base_var:.3g} | {1000 * step:.1f} | "
                            f"{step / base_time:.2f} |")
    seconds = time.perf_counter() - start
    text = "\n".join([
        "# Enumeration with baselines against TraceEnum_ELBO",
        "",
        "Models whose local discrete latents are enumerated in the model and whose global "
        "discrete structure is sampled (see `benchmarks/bench_enum.py`): *mixture*, 200 "
        "points, two components enumerated, a sampled global Categorical over 4 shifts; "
        "*hmm*, T = 100, two states enumerated along `pyro.markov`, a sampled global "
        "Categorical over 3 transition matrices. Variance: the total variance (sum over "
        f"coordinates) of the sampled site's guide-parameter gradient over {args.draws} "
        "draws at fixed parameters, and its ratio to `TraceEnum_ELBO`'s at the same K "
        "(every row estimates the same gradient). Step: median ms per `loss_and_grads` over "
        f"{args.rounds} interleaved rounds of {args.steps} steps, and its ratio. "
        f"{versions()}, {args.threads} thread(s), {machine()}; {seconds:.0f} s in all.",
        "Command: `python benchmarks/bench_enum.py`.",
        "",
        "| model | K | objective | variance | × TraceEnum | ms/step | × TraceEnum |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    write_table(text, repo_path(args.out))


if __name__ == "__main__":
    main()

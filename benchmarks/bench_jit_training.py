"""Benchmark: the compiled training step (``jit=True``: loss, gradients and the optimizer
update replayed as one recorded step) against the same estimator hand-written in eager
PyTorch, the compiled loss step with an eager optimizer, Pyro, and NumPyro's SVI step
under ``jax.jit`` (an optional contender: ``pip install -e .[bench]``).

Models: the linear sigmoid belief net 784-200 on binarized MNIST (batch 24, one particle,
no baseline, Adam 1e-3), and a ``pyro.markov`` chain of T Bernoulli latents (batch 16,
Normal emissions, amortized guide; ours with a moving-average baseline, Adam 1e-2), each
written equivalently in NumPyro. Torch on one thread; jax on one thread
(``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"``, set
before jax is imported). Rounds of every contender are interleaved in one run, so the
machine's load hits them alike; the first steps (recording, compilation) are timed apart.

Run: ``python benchmarks/bench_jit_training.py --data ../shared/data/binarized_mnist.npz``
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS",
                      "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import copy
import time
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as pdist
import torch
from common import (
    HandREINFORCE,
    interleaved_times,
    machine,
    medians,
    repo_path,
    timing_parser,
    timing_setup,
    versions,
    write_table,
)
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor

from pyro_wakesleep import MovingAverageBaseline, ScoreFunctionELBO
from pyro_wakesleep.examples.models import SigmoidBeliefNet

BATCH = 16
TITLE = "## Compiled training step: step time against NumPyro"


class Runner:
    """One contender: ``step(x)`` is one training step; ``first`` the seconds of its
    first steps (recording and compilation included)."""

    def __init__(self, label: str, step: Callable[[Any], Any]) -> None:
        self.label, self._step = label, step
        self.first = 0.0

    def step(self, x: Any) -> None:
        self._step(x)


# -- ours and Pyro's ------------------------------------------------------------------------
def sbn_runners(net: SigmoidBeliefNet, x0: Tensor, inductor: bool) -> list[Runner]:
    runners = []
    hand = HandREINFORCE(copy.deepcopy(net), 1, "none")
    hand_opt = torch.optim.Adam(hand.parameters(), 1e-3)

    def hand_step(x: Tensor) -> None:
        hand_opt.zero_grad()
        hand.loss(x).backward()
        hand_opt.step()

    runners.append(Runner("hand-written eager PyTorch + torch Adam", hand_step))
    variants = [("", False)] + ([(" + inductor", True)] if inductor else [])
    for suffix, compile in variants:
        for route in ("loss", "module", "svi"):
            copy_ = copy.deepcopy(net)  # a fresh default name: param-store names of its own
            objective = ScoreFunctionELBO(1, max_plate_nesting=1, jit=True,
                                          jit_options={"compile": compile})
            if route == "svi":
                svi = SVI(copy_.model, copy_.guide, pyro.optim.Adam({"lr": 1e-3}), objective)
                label, step = f"ours jit{suffix}, pyro.infer.SVI + pyro.optim.Adam", svi.step
            else:
                module = objective(copy_.model, copy_.guide)
                module.initialize(x0)
                opt = torch.optim.Adam(module.parameters(), 1e-3)
                if route == "module":
                    label = f"ours jit{suffix}, training step (module.step / fit) + torch Adam"
                    step = (lambda m, o: lambda x: m.step(o, x))(module, opt)
                else:
                    if compile:
                        continue
                    label = "ours jit, loss step only (loop: backward, torch Adam)"

                    def step(x: Tensor, m: Any = module, o: Any = opt) -> None:
                        o.zero_grad()
                        m(x).backward()
                        o.step()
            runners.append(Runner(label, step))
    eager = copy.deepcopy(net)
    svi = SVI(eager.model, eager.guide, pyro.optim.Adam({"lr": 1e-3}),
              ScoreFunctionELBO(1, max_plate_nesting=1))
    runners.append(Runner("ours eager, pyro.infer.SVI", svi.step))
    return runners


def chain(prefix: str) -> tuple[Callable[[Tensor], None], Callable[[Tensor], None]]:
    """The chain's model and guide, with param-store names of their own."""
    def model(x: Tensor) -> None:
        trans = pyro.param(f"{prefix}.trans", torch.tensor([0.1, 2.0]))
        with pyro.plate("batch", x.shape[0]):
            z = torch.zeros(x.shape[0])
            for t in pyro.markov(range(x.shape[1])):
                z = pyro.sample(f"z{t}", pdist.Bernoulli(logits=trans[0] + trans[1] * z - 1.0))
                pyro.sample(f"x{t}", pdist.Normal(z, 1.0), obs=x[:, t])

    def guide(x: Tensor) -> None:
        w = pyro.param(f"{prefix}.w", torch.tensor([0.1, 0.2, 0.3]))
        with pyro.plate("batch", x.shape[0]):
            z = torch.zeros(x.shape[0])
            for t in pyro.markov(range(x.shape[1])):
                z = pyro.sample(f"z{t}", pdist.Bernoulli(
                    logits=w[0] + w[1] * x[:, t] + w[2] * z))
    return model, guide


def chain_runners(inductor: bool) -> list[Runner]:
    runners = []
    contenders: list[tuple[str, Any]] = [
        ("ours jit + moving average, SVI + pyro.optim.Adam",
         lambda: ScoreFunctionELBO(1, MovingAverageBaseline(), max_plate_nesting=1, jit=True)),
        ("ours eager + moving average, SVI", lambda: ScoreFunctionELBO(
            1, MovingAverageBaseline(), max_plate_nesting=1)),
        ("Pyro Trace_ELBO, SVI", lambda: Trace_ELBO(max_plate_nesting=1)),
    ]
    if inductor:
        contenders.insert(1, ("ours jit + inductor + moving average, SVI",
                              lambda: ScoreFunctionELBO(1, MovingAverageBaseline(),
                                                        max_plate_nesting=1, jit=True,
                                                        jit_options={"compile": True})))
    for i, (label, make) in enumerate(contenders):
        model, guide = chain(f"chain{i}")
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), make())
        runners.append(Runner(label, svi.step))
    return runners


# -- NumPyro ---------------------------------------------------------------------------------
def numpyro_runners(kind: str, size: int, x0: Any, trace_graph: bool) -> list[Runner]:
    """NumPyro's SVI ``update`` under ``jax.jit`` (``Trace_ELBO`` and, if asked,
    ``TraceGraph_ELBO``); empty if NumPyro is not installed."""
    try:
        import jax
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as nd
        from numpyro.infer import SVI as NSVI
        from numpyro.infer import Trace_ELBO as NTrace
        from numpyro.infer import TraceGraph_ELBO as NTraceGraph
    except ImportError:
        return []

    if kind == "sbn":
        key = jax.random.PRNGKey(0)
        k1, k2 = jax.random.split(key)

        def model(x: Any) -> None:
            prior = numpyro.param("prior", jnp.zeros(size))
            w = numpyro.param("w", 0.01 * jax.random.normal(k1, (784, size)))
            b = numpyro.param("b", jnp.zeros(784))
            with numpyro.plate("batch", x.shape[0]):
                h = numpyro.sample("h", nd.Bernoulli(logits=prior).to_event(1))
                numpyro.sample("x", nd.Bernoulli(logits=h @ w.T + b).to_event(1), obs=x)

        def guide(x: Any) -> None:
            r = numpyro.param("r", 0.01 * jax.random.normal(k2, (size, 784)))
            c = numpyro.param("c", jnp.zeros(size))
            with numpyro.plate("batch", x.shape[0]):
                numpyro.sample("h", nd.Bernoulli(logits=x @ r.T + c).to_event(1))
        lr = 1e-3
    else:
        def model(x: Any) -> None:
            trans = numpyro.param("trans", jnp.array([0.1, 2.0]))
            with numpyro.plate("batch", x.shape[0]):
                z = jnp.zeros(x.shape[0])
                for t in range(x.shape[1]):
                    z = numpyro.sample(f"z{t}", nd.Bernoulli(
                        logits=trans[0] + trans[1] * z - 1.0))
                    numpyro.sample(f"x{t}", nd.Normal(z, 1.0), obs=x[:, t])

        def guide(x: Any) -> None:
            w = numpyro.param("w", jnp.array([0.1, 0.2, 0.3]))
            with numpyro.plate("batch", x.shape[0]):
                z = jnp.zeros(x.shape[0])
                for t in range(x.shape[1]):
                    z = numpyro.sample(f"z{t}", nd.Bernoulli(
                        logits=w[0] + w[1] * x[:, t] + w[2] * z))
        lr = 1e-2

    runners = []
    losses = [("NumPyro Trace_ELBO, jit(svi.update)", NTrace())]
    if trace_graph:
        losses.append(("NumPyro TraceGraph_ELBO, jit(svi.update)", NTraceGraph()))
    for label, loss in losses:
        svi = NSVI(model, guide, numpyro.optim.Adam(lr), loss)
        x_init = jnp.asarray(x0.numpy())
        holder = {"state": svi.init(jax.random.PRNGKey(1), x_init)}
        update = jax.jit(svi.update)

        def step(x: Any, update: Any = update, holder: Any = holder) -> None:
            state, value = update(holder["state"], jnp.asarray(x.numpy()))
            value.block_until_ready()
            holder["state"] = state

        runner = Runner(label, step)
        start = time.perf_counter()
        step(x0)  # compiles
        runner.first = time.perf_counter() - start
        runners.append(runner)
    return runners


def measure(name: str, runners: list[Runner], batches: list[Any], args: Any,
            lines: list[str], reference: str) -> None:
    for runner in runners:  # the first steps: recording / compilation
        if runner.first:
            continue
        start = time.perf_counter()
        for s in range(4):
            runner.step(batches[s])
        runner.first = time.perf_counter() - start
    for runner in runners:  # past the verified replays 1, 2, 4, ..., 32
        for s in range(36):
            runner.step(batches[s])
    times = medians(interleaved_times(runners, Runner.step, batches.__getitem__,
                                      args.rounds, args.steps, shuffle_seed=args.seed))
    ref = next(t for r, t in zip(runners, times, strict=True) if r.label == reference)
    for r, t in sorted(zip(runners, times, strict=True), key=lambda rt: rt[1]):
        lines.append(f"| {name} | {r.label} | {1e3 * t:.2f} | {t / ref:.2f}× | "
                     f"{r.first:.1f} |")


def main() -> None:
    parser = timing_parser(__doc__, "docs/benchmarks/jit.md", rounds=7, steps=20)
    parser.add_argument("--no-inductor", action="store_true")
    parser.add_argument("--chain", type=int, nargs="*", default=[10, 100])
    args = parser.parse_args()
    mnist = timing_setup(args)
    n = args.rounds * args.steps + 8
    lines = [
        TITLE,
        "",
        f"Median milliseconds per training step over {args.rounds} interleaved rounds of "
        f"{args.steps} steps, after the first steps (\"first s\": the seconds of the first "
        f"4 steps, recording and compilation included; NumPyro's: its first jitted "
        f"update); {versions()}, torch on {args.threads} thread(s), jax on one, "
        f"{machine()}, a machine shared with other jobs (loaded): ratios are side by side "
        "in one run; absolute times drift between runs. \"×\": ratio to the reference "
        "row of the model (the hand-written step for the SBN, Pyro's Trace_ELBO for the "
        "chain).",
        "",
        "| model | contender | ms / step | × | first s |",
        "|---|---|---:|---:|---:|",
    ]
    sbn = SigmoidBeliefNet((784, 200))
    batches = [mnist[i] for i in torch.randint(len(mnist), (n, 24))]
    runners = sbn_runners(sbn, batches[0], not args.no_inductor)
    runners += numpyro_runners("sbn", 200, batches[0], True)
    measure("SBN 784-200, batch 24", runners, batches, args, lines,
            "hand-written eager PyTorch + torch Adam")
    for t in args.chain:
        chain_batches = [torch.randn(BATCH, t) for _ in range(n)]
        runners = chain_runners(not args.no_inductor and t <= 100)
        runners += numpyro_runners("chain", 0, chain_batches[0], t <= 10)
        measure(f"markov chain T={t}, batch {BATCH}", runners, chain_batches, args, lines,
                "Pyro Trace_ELBO, SVI")
    # a section of its own at the end of the page bench_jit.py writes (which rewrites the
    # whole page: run this script after it)
    out = repo_path(args.out)
    before = out.read_text() if out.exists() else ""
    before = before.split(TITLE)[0].rstrip("\n")
    write_table((before + "\n\n" if before else "") + "\n".join(lines), out)


if __name__ == "__main__":
    main()

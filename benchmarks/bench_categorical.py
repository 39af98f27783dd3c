"""Categorical estimators that evaluate several values of a variable: the unordered-set
estimator (``UnorderedSetELBO``) and IndeCateR (``IndecaterELBO``) against RLOO
(``ScoreFunctionELBO`` with ``LeaveOneOutBaseline``) at equal evaluations.

1. The unordered-set paper's toy (Kool, van Hoof & Welling, 2020, Fig. 2, the Bernoulli
   experiment of Liu et al., 2019): three Bernoulli(sigmoid(phi)) bits treated as one
   categorical over 8 values, f(x) = sum_i (x_i - p0_i)^2 with p0 = (0.6, 0.51, 0.48), the
   variance of d/dphi E[f] at phi = 0 (high entropy) and phi = -4 (low entropy) for
   k = 1..8 evaluations: exact by enumerating every sample, plus 300 draws through the
   objectives on the same model written in Pyro (and storchastic's
   ``UnorderedSetEstimator`` where a Python with storchastic is given).
2. Many independent categoricals at equal evaluations: D variables of C categories in one
   ``Independent`` site per datapoint, with an additive learning signal (IndeCateR's
   synthetic setting) and with one coupling observation of their sum.

Run: ``python benchmarks/bench_categorical.py [--storchastic PYTHON]``; writes
``docs/benchmarks/categorical.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import time

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from common import machine, repo_path, versions, write_table

from pyro_wakesleep import IndecaterELBO, LeaveOneOutBaseline, ScoreFunctionELBO, UnorderedSetELBO
from pyro_wakesleep.categorical import (
    plackett_luce_log_prob,
    set_log_probs,
    unordered_set_coefficients,
)

P0 = torch.tensor([0.6, 0.51, 0.48], dtype=torch.float64)
BITS = torch.tensor(list(itertools.product([0, 1], repeat=3)), dtype=torch.float64)
F_ALL = ((BITS - P0) ** 2).sum(-1)


def toy_log_p(phi: torch.Tensor) -> torch.Tensor:
    return (F.logsigmoid(phi) * BITS + F.logsigmoid(-phi) * (1 - BITS)).sum(-1)


def exact_toy(phi0: float, k: int) -> dict[str, float]:
    """Exact mean and variance of the estimators of d/dphi E[f] by enumeration."""
    phi = torch.tensor(phi0, dtype=torch.float64)
    score = BITS.sum(-1) - 3 * torch.sigmoid(phi)  # d log p(x) / d phi
    log_p = toy_log_p(phi)
    out = {}
    index = torch.tensor(list(itertools.permutations(range(8), k)))  # every ordered sample
    lp, rest = set_log_probs(log_p.expand(len(index), 8), index)
    w = plackett_luce_log_prob(lp).exp()
    for name, baseline in (("unordered", True), ("unordered_nobl", False)):
        g = torch.cat([  # in chunks: the quadrature holds k^2 grids per sample
            (unordered_set_coefficients(lp[i:i + 2048], rest[i:i + 2048],
                                        F_ALL[index[i:i + 2048]], baseline)
             * score[index[i:i + 2048]]).sum(-1)
            for i in range(0, len(index), 2048)])
        m1 = (w * g).sum()
        out[name] = float((w * g * g).sum() - m1 * m1)
    log_p.exp()
    m1 = m2 = 0.0  # RLOO with replacement: enumerate the counts of each value
    for cut in itertools.combinations(range(k + 7), 7):
        counts = torch.tensor([b - a - 1 for a, b in zip((-1, *cut), (*cut, k + 7), strict=True)],
                              dtype=torch.float64)
        log_w = (math.lgamma(k + 1) - torch.lgamma(counts + 1).sum()
                 + (counts * log_p).sum())
        total = (counts * F_ALL).sum()
        if k == 1:
            g = (counts * F_ALL * score).sum()
        else:
            g = (counts * (F_ALL - total / k) * score).sum() / (k - 1)
        w = log_w.exp()
        m1, m2 = m1 + w * g, m2 + w * g * g
    out["rloo"] = float(m2 - m1 * m1)
    return out


def toy_program(phi0: float):
    """The toy in Pyro: z ~ q = Cat(toy_log_p(phi)); the model's prior is q itself
    (detached), so the learning signal is -f(z) and the ELBO's gradient is -d E[f]."""
    phi = torch.tensor(phi0, requires_grad=True)

    def model():
        z = pyro.sample("z", dist.Categorical(logits=toy_log_p(phi.detach().double()).float()))
        pyro.factor("f", -F_ALL.float()[z])

    def guide():
        pyro.sample("z", dist.Categorical(logits=toy_log_p(phi.double()).float()))

    return model, guide, phi


def sampled_toy(phi0: float, objective, draws: int) -> tuple[float, float]:
    model, guide, phi = toy_program(phi0)
    grads = []
    for i in range(draws):
        pyro.set_rng_seed(i)
        (g,) = torch.autograd.grad(objective.differentiable_loss(model, guide), [phi])
        grads.append(g.item())
    t = torch.tensor(grads, dtype=torch.float64)
    return t.mean().item(), t.var().item()


STORCH = r"""
import json, sys, itertools, torch, storch
phi0, k, n = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
p0 = torch.tensor([0.6, 0.51, 0.48])
bits = torch.tensor(list(itertools.product([0, 1], repeat=3)), dtype=torch.float)
f_all = ((bits - p0) ** 2).sum(-1)
torch.manual_seed(0)
grads = []
for _ in range(n):
    phi = torch.tensor(phi0, requires_grad=True)
    lp = torch.nn.functional.logsigmoid
    logp = (lp(phi) * bits + lp(-phi) * (1 - bits)).sum(-1)
    z = storch.method.UnorderedSetEstimator("z", k=k)(
        torch.distributions.OneHotCategorical(logits=logp))
    storch.add_cost((z * f_all).sum(-1), "f")
    storch.backward()
    grads.append(phi.grad.item())
    storch.reset()
g = torch.tensor(grads, dtype=torch.float64)
print(json.dumps({"mean": g.mean().item(), "var": g.var().item()}))
"""


def storchastic(python: str | None, phi0: float, k: int, draws: int) -> str:
    if not python:
        return "not run"
    try:
        out = subprocess.run([python, "-c", STORCH, str(phi0), str(k), str(draws)],
                             capture_output=True, text=True, timeout=600, check=True)
        return f"{json.loads(out.stdout.strip().splitlines()[-1])['var']:.3g}"
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as error:
        return f"failed ({type(error).__name__})"


def independent(dims: int, classes: int, additive: bool):
    """D categoricals per datapoint in one ``Independent`` site; observations per
    variable (additive signal) or one of their sum (coupled)."""
    torch.manual_seed(0)
    phi = (0.5 * torch.randn(dims, classes)).requires_grad_()
    levels = torch.linspace(-1.0, 2.0, classes)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(logits=torch.zeros(dims, classes)).to_event(1))
            if additive:
                pyro.sample("x", dist.Normal(levels[z], 1.0).to_event(1), obs=x)
            else:
                pyro.sample("x", dist.Normal(levels[z].sum(-1), 1.0), obs=x[..., 0])

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Categorical(logits=phi).to_event(1))

    return model, guide, phi


def independent_variance(objective, dims, classes, additive, draws, copies=20):
    model, guide, phi = independent(dims, classes, additive)
    x = torch.randn(copies, dims)
    grads = []
    start = time.perf_counter()
    for i in range(draws):
        pyro.set_rng_seed(i)
        (g,) = torch.autograd.grad(objective.differentiable_loss(model, guide, x), [phi])
        grads.append(g.flatten())
    seconds = (time.perf_counter() - start) / draws
    return torch.stack(grads).var(0).sum().item(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/benchmarks/categorical.md")
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--storchastic", default=os.environ.get("STORCHASTIC_PYTHON"),
                        help="a Python with storchastic installed (never our venv)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    lines = [
        "## Categorical estimators: unordered set and IndeCateR",
        "",
        f"`python benchmarks/bench_categorical.py` ({versions()}, {machine()}, one thread).",
        "",
        "### The unordered-set paper's toy (Kool et al., 2020, Fig. 2)",
        "",
        "Variance of the estimate of d/dphi E[f], f(x) = sum_i (x_i - p0_i)^2, "
        "p0 = (0.6, 0.51, 0.48), x three Bernoulli(sigmoid(phi)) bits as one categorical "
        "over 8 values; k evaluations of f. *Exact* columns enumerate every sample; "
        f"*ours* and *storchastic* are {args.draws} draws through `UnorderedSetELBO(k)` / "
        "`ScoreFunctionELBO(k, LeaveOneOutBaseline())` on the model written in Pyro, and "
        "through storchastic's `UnorderedSetEstimator`.",
        "",
    ]
    for phi0 in (0.0, -4.0):
        lines += [
            f"**phi = {phi0:g}** ({'high' if phi0 == 0 else 'low'} entropy)",
            "",
            "| k | RLOO exact | unordered, no baseline, exact | unordered + built-in "
            "baseline, exact | RLOO ours | unordered ours | unordered storchastic |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k in range(1, 9):
            exact = exact_toy(phi0, k)
            sampled = ["", "", ""]
            if k in (2, 4, 8):
                rloo = ScoreFunctionELBO(k, LeaveOneOutBaseline()) if k > 1 \
                    else ScoreFunctionELBO(1)
                sampled = [f"{sampled_toy(phi0, rloo, args.draws)[1]:.3g}",
                           f"{sampled_toy(phi0, UnorderedSetELBO(k), args.draws)[1]:.3g}",
                           storchastic(args.storchastic, phi0, k, args.draws)]
            lines.append(f"| {k} | {exact['rloo']:.3g} | {exact['unordered_nobl']:.3g} | "
                         f"{exact['unordered']:.3g} | " + " | ".join(sampled) + " |")
        lines.append("")
    lines += [
        "### Many independent categoricals at equal evaluations",
        "",
        "D variables of C categories in one `Independent` site per datapoint, 20 datapoints; "
        "summed variance of the guide-logit gradient over 100 draws, runs of model and "
        "guide per step, and seconds per step. IndeCateR costs 1 + D C runs, "
        "the unordered set with k = C costs 1 + D (C - 1), RLOO gets 1 + D C particles.",
        "",
        "| signal | D | C | estimator | runs | variance | s / step |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for additive in (True, False):
        for dims, classes in ((4, 3), (10, 5)):
            budget = 1 + dims * classes
            for name, objective, runs in (
                ("IndeCateR", IndecaterELBO(1), budget),
                (f"unordered set (k = {classes})", UnorderedSetELBO(classes),
                 1 + dims * (classes - 1)),
                (f"RLOO (K = {budget})", ScoreFunctionELBO(budget, LeaveOneOutBaseline()),
                 budget),
            ):
                var, sec = independent_variance(objective, dims, classes, additive, 100)
                lines.append(f"| {'additive' if additive else 'coupled'} | {dims} | "
                             f"{classes} | {name} | {runs} | {var:.4g} | {sec:.3f} |")
    write_table("\n".join(lines), repo_path(args.out))


if __name__ == "__main__":
    main()

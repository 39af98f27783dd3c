"""Benchmark: guide-gradient variance of the Bernoulli estimators at equal numbers of model
evaluations, with standard errors.

``bench_discrete.py`` measures the variance along its training runs over 20-30 draws (an
uncertainty of 10-25 %). Here, on the same models, estimators (its ``ESTIMATORS``),
mini-batches and variance batch, every estimator is measured at the same parameter points
with many draws:

* **Points.** The initialization (``bench_discrete``'s weights for the seed) and the
  weights that ``bench_discrete``'s RLOO contender reaches after ``--ref-steps`` steps.
* **Learned state.** At each point every estimator starts afresh and takes
  ``--adapt-steps`` SVI steps on the same mini-batches, with the model and the guide put
  back to the point after every step: only its own control-variate state learns (RODEO's
  network and coefficients, the double control variate's coefficient), for the same
  number of steps for everyone, by Adam at ``--adapt-lr`` (1e-2: with the model held
  still the rate moves the control variates only, and at the training rate, 1e-3, a few
  hundred steps leave them far from converged). DisARM, ARMS and RLOO have no learned
  state.
* **Variance.** ``--draws`` draws of the recognition-network gradient on one fixed batch
  (the first 24 training images), control variates frozen, in ``--groups`` groups of
  equal size: per group, the mean over recognition-network elements of the (unbiased)
  variance over the group's draws; reported, the mean over groups ± its standard error
  (standard deviation over groups / sqrt(groups)). Groups are interleaved across the
  estimators, so time per draw is comparable.
* **Equal evaluations.** With L stochastic layers: 1 + L evaluations per step (DisARM, RLOO
  with K = 1 + L, double CV and RODEO with K = 1 + L) and 1 + 3L (ARMS n=4, RLOO, double CV
  and RODEO with K = 1 + 3L; DisARM with two independent pairs costs 2(1 + L), which is
  1 + 3L for one layer only).

Run: ``python benchmarks/bench_discrete_variance.py`` (``--layers 1,2,nonlinear``).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass, field

import pyro
import torch
from bench_discrete import (
    BATCH,
    REFERENCE,
    Contender,
    grouped_moments,
    make_sbn,
    model_title,
    train_elbo,
)
from common import machine, repo_path, versions, write_table
from torch import Tensor

from pyro_wakesleep.examples.datasets import load_binarized_mnist
from pyro_wakesleep.examples.models import SigmoidBeliefNet

#: the estimators at 1 + L evaluations per step, then at 1 + 3L (ARMS n=4's)
GROUPS: list[list[str]] = [
    ["DisARM", "RLOO", "Double CV", "RODEO"],
    ["ARMS n=4", "DisARM x2 groups", "RLOO @ ARMS n=4 evals", "Double CV @ ARMS n=4 evals",
     "RODEO @ ARMS n=4 evals"],
]
#: the estimator each group's ratios are taken to
BASELINES = ["RLOO", "RLOO @ ARMS n=4 evals"]


@dataclass
class Cell:
    """One estimator at one point: the per-group variances and the time per draw."""

    name: str
    evaluations: int
    groups: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean(self) -> float:
        return sum(self.groups) / len(self.groups)

    @property
    def se(self) -> float:
        n = len(self.groups)
        return math.sqrt(sum((g - self.mean) ** 2 for g in self.groups) / (n - 1) / n)

    def ms_per_draw(self, draws: int) -> float:
        return 1e3 * self.seconds / draws


def ratio(a: Cell, b: Cell) -> tuple[float, float]:
    """``a``'s variance over ``b``'s and its standard error (independent draws, delta
    method)."""
    r = a.mean / b.mean
    return r, r * math.hypot(a.se / a.mean, b.se / b.mean)


def compare(a: Cell, b: Cell) -> str:
    """Whether ``a``'s variance is below ``b``'s: the difference in standard errors."""
    z = (a.mean - b.mean) / math.hypot(a.se, b.se)
    verdict = "lower" if z < -2 else "higher" if z > 2 else "level (|z| < 2)"
    r, se = ratio(a, b)
    return f"{verdict}: {r:.2f} ± {se:.2f} x {b.name} (z = {z:+.1f})"


def learns(contender: Contender) -> bool:
    """Whether the contender's objective holds any learned or running state."""
    cvs = getattr(contender.objective, "control_variates", None)
    return cvs is not None and len(cvs.state_dict()) > 0


def contender_args(args: argparse.Namespace, steps: int, lr: float) -> argparse.Namespace:
    """``args`` as ``Contender`` reads them: no time budget, ``steps`` steps, rate ``lr``."""
    return argparse.Namespace(**{**vars(args), "steps": steps, "seconds": math.inf, "lr": lr})


def measure_point(names: list[str], initial: SigmoidBeliefNet, weights: dict[str, Tensor],
                  data: Tensor, args: argparse.Namespace) -> dict[str, Cell]:
    """Every estimator at ``weights``: its learned state adapted there, then the draws."""
    x = data[:BATCH]
    contenders = []
    for name in names:
        pyro.set_rng_seed(args.seed)
        c = Contender(name, initial, contender_args(args, args.adapt_steps, args.adapt_lr))
        c.net.load_state_dict(weights)
        with c.slot.active():
            for step in range(args.adapt_steps):
                c.svi.step(c.batch(data, step))
                c.net.load_state_dict(weights)  # only the control variates move
                if not learns(c):
                    break
        contenders.append(c)
    cells = {c.name: Cell(c.name, c.evaluations) for c in contenders}
    size = args.draws // args.groups
    for _ in range(args.groups):
        for c in contenders:
            with c.slot.active():
                tic = time.perf_counter()
                _, var = grouped_moments(c.objective, c.net, c.guide, x, 1, size)
                cells[c.name].seconds += time.perf_counter() - tic
                cells[c.name].groups.append(var.mean().item())
    return cells


def section(model: str, data: Tensor, subset: Tensor, args: argparse.Namespace) -> str:
    """One model's table and comparisons."""
    torch.manual_seed(args.seed)
    initial = make_sbn(model)
    start_elbo = train_elbo(initial, subset)
    pyro.set_rng_seed(args.seed)
    reference = Contender(REFERENCE, initial,
                          contender_args(args, args.ref_steps, args.lr))
    reference.advance(data, subset, math.inf)
    trained = f"RLOO, {args.ref_steps} steps"
    points = {"initialization": copy.deepcopy(initial.state_dict()),
              trained: copy.deepcopy(reference.net.state_dict())}
    names = [n for group in GROUPS for n in group]
    results = {}
    for point, weights in points.items():
        results[point] = measure_point(names, initial, weights, data, args)
        for cell in results[point].values():
            print(f"{model} @ {point}: {cell.name}: {cell.mean:.4g} ± {cell.se:.2g}", flush=True)
    draws = args.draws // args.groups * args.groups
    lines = [
        f"### {model_title(model)}",
        "",
        f"ELBO (training subset): {start_elbo:.2f} at initialization, "
        f"{reference.elbos[-1]:.2f} after {args.ref_steps} RLOO steps.",
        "",
        "| evals | estimator | variance @ initialization | / RLOO | "
        f"variance @ {trained} | / RLOO | ms per draw |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for group, baseline in zip(GROUPS, BASELINES, strict=True):
        for name in group:
            row = [f"{results['initialization'][name].evaluations}", name]
            for point in points:
                cell, base = results[point][name], results[point][baseline]
                r, se = ratio(cell, base)
                row += [f"{cell.mean:.4g} ± {cell.se:.2g}",
                        "1" if name == baseline else f"{r:.3g} ± {se:.2g}"]
            row.append(f"{results[trained][name].ms_per_draw(draws):.1f}")
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Comparisons (z: the difference in standard errors; *lower* or *higher* "
              "when |z| > 2):", ""]
    for point in points:
        cells = results[point]
        arms = cells["ARMS n=4"]
        lines.append(f"* {point}, ARMS n=4 ({arms.evaluations} evals): "
                     + "; ".join(compare(arms, cells[other]) for other in
                                 ("DisARM x2 groups", "RLOO @ ARMS n=4 evals")))
        for group in GROUPS:
            rodeo = next(cells[n] for n in group if n.startswith("RODEO"))
            best = min((cells[n] for n in group if n != rodeo.name), key=lambda c: c.mean)
            lines.append(f"* {point}, RODEO ({rodeo.evaluations} evals) against the "
                         f"lowest other, {best.name}: {compare(rodeo, best)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/binarized_mnist.npz")
    parser.add_argument("--layers", default="1,2,nonlinear",
                        help="comma-separated models: 1, 2 (linear SBNs), nonlinear")
    parser.add_argument("--ref-steps", type=int, default=500,
                        help="steps of the RLOO run that gives the trained point")
    parser.add_argument("--adapt-steps", type=int, default=500,
                        help="steps of control-variate learning at each point")
    parser.add_argument("--adapt-lr", type=float, default=1e-2,
                        help="Adam's rate in those steps (only the control variates move)")
    parser.add_argument("--draws", type=int, default=400, help="gradient draws per cell")
    parser.add_argument("--groups", type=int, default=20,
                        help="groups of draws, for the standard errors")
    parser.add_argument("--lr", type=float, default=1e-3, help="the RLOO run's rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/benchmarks/discrete_variance.md")
    args = parser.parse_args()
    if args.groups < 2 or args.draws < 2 * args.groups:
        parser.error("need --groups >= 2 and at least two draws per group")
    torch.set_num_threads(args.threads)
    data = load_binarized_mnist(repo_path(args.data), "train")
    subset = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[:1000]]
    sections = [section(m.strip(), data, subset, args) for m in args.layers.split(",")]
    command = "python benchmarks/bench_discrete_variance.py"
    for option in ("layers", "ref_steps", "adapt_steps", "adapt_lr", "draws", "groups", "lr",
                   "seed", "out"):
        if getattr(args, option) != parser.get_default(option):
            command += f" --{option.replace('_', '-')} {getattr(args, option)}"
    header = (
        "## Guide-gradient variance at equal evaluations, with standard errors\n\n"
        f"`{command}` ({args.threads} thread(s); "
        f"{machine()}, {versions()}).\n\n"
        "Mean elementwise variance of the recognition-network gradient over "
        f"{args.draws // args.groups * args.groups} draws on one fixed batch of {BATCH} "
        f"images, ± one standard error (from {args.groups} groups of draws), at two "
        "points common to every estimator: the initialization, and the weights the RLOO "
        f"run of `bench_discrete.py` reaches after {args.ref_steps} steps (Adam, rate "
        f"{args.lr:g}, seed {args.seed}). At each point "
        "every estimator starts afresh and its learned state (RODEO's network and "
        "coefficients, the double control variate's coefficient) trains for "
        f"{args.adapt_steps} steps (Adam, rate {args.adapt_lr:g}) on the same "
        "mini-batches, the model and the guide put back to the point after every step, so "
        "that only the control variates move; DisARM, ARMS and RLOO learn nothing. Then "
        "the draws, control variates frozen. Rows at equal model evaluations per step: "
        "1 + L (DisARM; RLOO, double CV, RODEO with K = 1 + L draws) and 1 + 3L (ARMS n=4; "
        "RLOO, double CV, RODEO with K = 1 + 3L; DisARM with two independent pairs costs "
        "2(1 + L), equal for one stochastic layer only). / RLOO: the ratio to RLOO at the "
        "same evaluations (± standard error). ms per draw: one gradient draw (forward and "
        "backward, no optimizer step) at the trained point, draws interleaved.\n"
    )
    write_table(header + "\n" + "\n\n".join(sections), repo_path(args.out))


if __name__ == "__main__":
    main()

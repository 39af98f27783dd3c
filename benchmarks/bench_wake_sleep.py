"""Benchmark: WakeSleepELBO and ReweightedWakeSleepELBO vs Pyro's ReweightedWakeSleep at the
same K and vs the same estimators hand-written in plain PyTorch.

Two models: the linear sigmoid belief net 784-200 on binarized MNIST (batch 24) and the
Gaussian mixture of Le et al. (2019) (batch 100 from the true model). Every contender
takes the same optimizer step (``torch.optim.Adam`` over the model's parameters) on the
same batches, with ``pyro.enable_validation(False)``; rounds are interleaved in a shuffled
order so that drift in the machine's load hits every contender alike, and the table
reports the median step time over rounds and its ratios, all from one run.

Run: ``python benchmarks/bench_wake_sleep.py --data ../shared/data/binarized_mnist.npz``
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pyro
import torch
from common import (
    hand_wake_sleep_gmm,
    hand_wake_sleep_sbn,
    interleaved_times,
    machine,
    medians,
    repo_path,
    timing_parser,
    timing_setup,
    versions,
    write_table,
)
from pyro.infer import ReweightedWakeSleep
from torch import Tensor, nn

from pyro_wakesleep.examples.mixture import GaussianMixture
from pyro_wakesleep.examples.models import SigmoidBeliefNet
from pyro_wakesleep.objectives.wake_sleep import ReweightedWakeSleepELBO, WakeSleepELBO

HandFactory = Callable[[Any, int, bool], Callable[[Tensor], Tensor]]


# -- contenders ---------------------------------------------------------------------------------
class Contender:
    """One (model, objective, implementation): ``step(x)`` is one optimizer step."""

    def __init__(self, net: nn.Module, implementation: str, objective: str, k: int,
                 hand: HandFactory) -> None:
        self.net = copy.deepcopy(net)
        self.implementation, self.objective = implementation, objective
        self.optim = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        reweighted = objective == "RWS"
        self.elbo: Any = None
        if implementation == "hand":
            self.hand = hand(self.net, k, reweighted)
        elif implementation == "pyro":
            self.elbo = ReweightedWakeSleep(k, insomnia=1.0, max_plate_nesting=1)
        elif reweighted:
            self.elbo = ReweightedWakeSleepELBO(k, insomnia=1.0, max_plate_nesting=1)
        else:
            self.elbo = WakeSleepELBO(1, 1, max_plate_nesting=1)

    def step(self, x: Tensor) -> None:
        self.optim.zero_grad()
        if self.implementation == "hand":
            self.hand(x).backward()
        else:
            self.elbo.loss_and_grads(self.net.model, self.net.guide, x)
        self.optim.step()


def contenders(net: nn.Module, k: int, hand: HandFactory) -> list[Contender]:
    return [Contender(net, impl, obj, k, hand) for obj, impl in [
        ("WS", "ours"), ("WS", "hand"), ("RWS", "ours"), ("RWS", "pyro"), ("RWS", "hand")]]


def time_all(runners: list[Contender], batches: Callable[[int], Tensor], rounds: int,
             steps: int, seed: int) -> list[float]:
    """Median seconds per step of each runner (3 warm-up steps each, shuffled rounds)."""
    return medians(interleaved_times(runners, Contender.step, batches, rounds, steps,
                                     shuffle_seed=seed, warmup=3))


def table(name: str, runners: list[Contender], median: list[float]) -> list[str]:
    by = {(c.objective, c.implementation): i for i, c in enumerate(runners)}
    rows = []
    for i, c in enumerate(runners):
        hand = median[by[(c.objective, "hand")]]
        pyro_rws = by.get((c.objective, "pyro"))
        vs_pyro = f"{median[i] / median[pyro_rws]:.2f}×" if pyro_rws is not None else "–"
        rows.append(f"| {name} | {c.objective} | {c.implementation} | {1e3 * median[i]:.2f} | "
                    f"{median[i] / hand:.2f}× | {vs_pyro} |")
    return rows


def main() -> None:
    parser = timing_parser(__doc__, "docs/benchmarks/wake_sleep.md", rounds=7, steps=20)
    parser.add_argument("--particles", type=int, default=5, help="K of the RWS contenders")
    args = parser.parse_args()
    mnist = timing_setup(args)
    n_batches = args.rounds * args.steps + 3
    sbn_idx = torch.randint(len(mnist), (n_batches, 24))
    sbn_batches = [mnist[i] for i in sbn_idx]
    gmm = GaussianMixture()
    gmm_batches = [gmm.sample(100) for _ in range(n_batches)]

    lines = [
        "# Wake-sleep step time",
        "",
        f"Median seconds per optimizer step over {args.rounds} interleaved rounds of "
        f"{args.steps} steps; K = {args.particles} for RWS (wake-φ only, Pyro's default), "
        "K = S = 1 for WS; `torch.optim.Adam` for every contender; validation off; "
        f"{versions()}, {args.threads} thread(s), "
        f"{machine()}. Hand-written: the same estimator "
        "in plain PyTorch.",
        "",
        "| model | objective | implementation | ms / step | × hand-written | × Pyro RWS |",
        "|---|---|---|---|---|---|",
    ]
    models: list[tuple[str, nn.Module, HandFactory, list[Tensor]]] = [
        ("SBN 784-200, batch 24", SigmoidBeliefNet((784, 200)), hand_wake_sleep_sbn,
         sbn_batches),
        ("GMM (Le et al.), batch 100", gmm, hand_wake_sleep_gmm, gmm_batches),
    ]
    for name, net, hand, batches in models:
        pyro.clear_param_store()
        runners = contenders(net, args.particles, hand)
        times = time_all(runners, batches.__getitem__, args.rounds, args.steps, args.seed)
        lines += table(name, runners, times)
    write_table("\n".join(lines), repo_path(args.out))


if __name__ == "__main__":
    main()

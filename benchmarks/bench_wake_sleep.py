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

import argparse
import copy
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import ReweightedWakeSleep
from torch import Tensor, nn

from pyro_wakesleep.datasets import load_binarized_mnist
from pyro_wakesleep.mixture import GaussianMixture
from pyro_wakesleep.models import SigmoidBeliefNet
from pyro_wakesleep.objectives.wake_sleep import ReweightedWakeSleepELBO, WakeSleepELBO

ROOT = Path(__file__).resolve().parents[1]
Step = Callable[[Tensor], Tensor]
HandFactory = Callable[[Any, int, bool], Step]


def _bern(logits: Tensor, value: Tensor) -> Tensor:
    """Bernoulli log-density summed over the last dim, as a hand-written step would."""
    logits, value = torch.broadcast_tensors(logits, value)
    return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


# -- the estimators by hand -------------------------------------------------------------------
def hand_sbn(net: Any, k: int, reweighted: bool) -> Step:
    gen, rec = net.generative, net.recognition[0]

    def loss(x: Tensor) -> Tensor:
        q_logits = rec(x)
        h = torch.bernoulli(torch.sigmoid(q_logits).detach().expand(k, *q_logits.shape))
        log_q = _bern(q_logits, h)
        log_p = _bern(gen.prior_logits, h) + _bern(gen.layers[0](h), x)
        if reweighted:
            log_w = log_p - log_q.detach()
            w = torch.softmax(log_w.detach(), 0)
            iwae = torch.logsumexp(log_w, 0) - math.log(k)
            return -iwae.sum() - (w * log_q).sum()
        with torch.no_grad():  # sleep: one dream per datapoint
            h_dream = torch.bernoulli(torch.sigmoid(gen.prior_logits).expand(x.shape[0], -1))
            x_dream = torch.bernoulli(torch.sigmoid(gen.layers[0](h_dream)))
        return -log_p.sum() / k - _bern(rec(x_dream), h_dream).sum()

    return loss


def hand_gmm(gmm: Any, k: int, reweighted: bool) -> Step:
    def log_lik(c: Tensor, x: Tensor) -> Tensor:
        return (-0.5 * ((x - gmm.means[c]) / gmm.scale) ** 2 - math.log(gmm.scale)
                - 0.5 * math.log(2 * math.pi))

    def loss(x: Tensor) -> Tensor:
        q_log = torch.log_softmax(gmm.recognition(x.unsqueeze(-1)), -1)
        c = torch.multinomial(q_log.detach().exp(), k, replacement=True).T
        log_q = q_log.gather(-1, c.T).T
        log_p = torch.log_softmax(gmm.prior_logits(), -1)[c] + log_lik(c, x)
        if reweighted:
            log_w = log_p - log_q.detach()
            w = torch.softmax(log_w.detach(), 0)
            return -(torch.logsumexp(log_w, 0) - math.log(k)).sum() - (w * log_q).sum()
        with torch.no_grad():
            c_dream = torch.multinomial(gmm.mixture_weights(), x.shape[0], replacement=True)
            x_dream = gmm.means[c_dream] + gmm.scale * torch.randn_like(x)
        q_dream = torch.log_softmax(gmm.recognition(x_dream.unsqueeze(-1)), -1)
        return -log_p.sum() / k - q_dream.gather(-1, c_dream.unsqueeze(-1)).sum()

    return loss


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
             steps: int, seed: int) -> dict[int, list[float]]:
    order = list(range(len(runners)))
    rng = random.Random(seed)
    times: dict[int, list[float]] = {i: [] for i in order}
    for i in order:  # warm-up
        for s in range(3):
            runners[i].step(batches(s))
    for r in range(rounds):
        rng.shuffle(order)
        for i in order:
            start = time.perf_counter()
            for s in range(steps):
                runners[i].step(batches(r * steps + s))
            times[i].append((time.perf_counter() - start) / steps)
    return times


def table(name: str, runners: list[Contender], times: dict[int, list[float]]) -> list[str]:
    median = {i: statistics.median(t) for i, t in times.items()}
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/binarized_mnist.npz",
                        help="binarized MNIST .npz (relative paths: from the repository root)")
    parser.add_argument("--particles", type=int, default=5, help="K of the RWS contenders")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/benchmarks/wake_sleep.md",
                        help="Markdown file for the table (relative: from the repository root)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    pyro.set_rng_seed(args.seed)
    data_path = Path(args.data) if os.path.isabs(args.data) else ROOT / args.data
    mnist = load_binarized_mnist(data_path, "train")
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
        f"torch {torch.__version__}, pyro {pyro.__version__}, {args.threads} thread(s), "
        f"{platform.processor() or platform.machine()}. Hand-written: the same estimator "
        "in plain PyTorch.",
        "",
        "| model | objective | implementation | ms / step | × hand-written | × Pyro RWS |",
        "|---|---|---|---|---|---|",
    ]
    models: list[tuple[str, nn.Module, HandFactory, list[Tensor]]] = [
        ("SBN 784-200, batch 24", SigmoidBeliefNet((784, 200)), hand_sbn, sbn_batches),
        ("GMM (Le et al.), batch 100", gmm, hand_gmm, gmm_batches),
    ]
    for name, net, hand, batches in models:
        pyro.clear_param_store()
        runners = contenders(net, args.particles, hand)
        times = time_all(runners, batches.__getitem__, args.rounds, args.steps, args.seed)
        lines += table(name, runners, times)
    text = "\n".join(lines) + "\n"
    out = Path(args.out) if os.path.isabs(args.out) else ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

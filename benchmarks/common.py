"""What the benchmark scripts share: the registries of control variates and Pyro baselines,
the interleaved timing harness, the hand-written PyTorch reference estimators, and the
writing of the tables into ``docs/benchmarks/``.

The scripts import it as ``common`` (``python benchmarks/bench_*.py`` puts this folder
first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import pyro
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_wakesleep import (
    ControlVariate,
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    NeuralBaseline,
)
from pyro_wakesleep.examples.models import SigmoidBeliefNet

ROOT = Path(__file__).resolve().parents[1]
R = TypeVar("R")
Step = Callable[[Tensor], Tensor]


# -- registries ---------------------------------------------------------------------------
def baseline_net() -> nn.Module:
    """NVIL's input-dependent baseline for 784-pixel images: a 784-100-1 tanh MLP."""
    return nn.Sequential(nn.Linear(784, 100), nn.Tanh(), nn.Linear(100, 1))


def nvil() -> NeuralBaseline:
    return NeuralBaseline(baseline_net())


#: name -> a fresh control variate for ``ScoreFunctionELBO`` (``None``: no baseline)
CONTROL_VARIATES: dict[str, Callable[[], ControlVariate | None]] = {
    "none": lambda: None,
    "average": MovingAverageBaseline,
    "loo": LeaveOneOutBaseline,
    "nvil": nvil,
}


def decaying_average(guide: Callable) -> Callable:
    """``guide`` with every site declaring ``TraceGraph_ELBO``'s decaying-average baseline
    (β = 0.9, Pyro's default): Pyro's own best option for these models."""
    options: Any = {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}}
    return poutine.infer_config(guide, config_fn=lambda msg: options)


# -- the run: Pyro's global param store, gradients, timing ---------------------------------
class ParamStoreSlot:
    """Pyro's param store is global: a contender keeps its own state and swaps it in."""

    def __init__(self) -> None:
        self.save()

    def save(self) -> None:
        self.state = pyro.get_param_store().get_state()

    def restore(self) -> None:
        pyro.clear_param_store()
        pyro.get_param_store().set_state(self.state)

    @contextmanager
    def active(self) -> Iterator[None]:
        self.restore()
        try:
            yield
        finally:
            self.save()


@contextmanager
def frozen_control_variates(objective: Any) -> Iterator[None]:
    """The objective's control variates (if any) in ``eval`` mode: running state frozen."""
    cvs = getattr(objective, "control_variates", None)
    if cvs is not None:
        cvs.eval()
    try:
        yield
    finally:
        if cvs is not None:
            cvs.train()


def gradient(params: Sequence[Tensor], backward: Callable[[], object]) -> Tensor:
    """One draw of the gradient of ``params`` (flattened) that ``backward()`` accumulates."""
    for p in params:
        p.grad = None
    backward()
    return torch.cat([p.grad.flatten() for p in params])  # type: ignore[union-attr]


def interleaved_times(
    runners: Sequence[R], step: Callable[[R, Tensor], None], batch: Callable[[int], Tensor],
    rounds: int, steps: int, *, shuffle_seed: int | None = None, warmup: int = 0,
    per_step: bool = False, slot: Callable[[R], AbstractContextManager] | None = None,
) -> list[list[float]]:
    """Seconds per step of each runner, timed side by side: every round runs ``steps``
    steps of each runner in turn (order rotated each round, or shuffled with
    ``shuffle_seed``), so drift in the machine's load hits every runner alike.

    :param step: ``step(runner, x)``, one optimizer step.
    :param batch: the batch of global step ``i`` (``warmup`` untimed steps use 0, 1, ...).
    :param per_step: one time per step; otherwise one mean per round.
    :param slot: a context entered around each runner's turn (untimed).
    :return: per runner, the list of times.
    """
    enter = slot or (lambda runner: nullcontext())
    n = len(runners)
    order = list(range(n))
    rng = random.Random(shuffle_seed)
    times: list[list[float]] = [[] for _ in range(n)]
    for i in order:
        with enter(runners[i]):
            for s in range(warmup):
                step(runners[i], batch(s))
    for r in range(rounds):
        if shuffle_seed is None:
            order = [*range(r % n, n), *range(r % n)]
        else:
            rng.shuffle(order)
        for i in order:
            with enter(runners[i]):
                round_start = time.perf_counter()
                for s in range(steps):
                    start = time.perf_counter()
                    step(runners[i], batch(r * steps + s))
                    if per_step:
                        times[i].append(time.perf_counter() - start)
                if not per_step:
                    times[i].append((time.perf_counter() - round_start) / steps)
    return times


def medians(times: Sequence[Sequence[float]]) -> list[float]:
    return [statistics.median(t) for t in times]


# -- command line ---------------------------------------------------------------------------
def timing_parser(doc: str, out: str, rounds: int, steps: int) -> argparse.ArgumentParser:
    """The options every step-time benchmark takes (``--data``, ``--rounds``, ``--steps``,
    ``--threads``, ``--seed``, ``--out``); a script adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/binarized_mnist.npz",
                        help="binarized MNIST .npz (relative paths: from the repository root)")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=out,
                        help="Markdown file for the table (relative: from the repository root)")
    return parser


def timing_setup(args: argparse.Namespace) -> Tensor:
    """Threads, Pyro's validation off, the seed; returns the MNIST training images."""
    from pyro_wakesleep.examples.datasets import load_binarized_mnist

    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    pyro.set_rng_seed(args.seed)
    return load_binarized_mnist(repo_path(args.data), "train")


# -- tables -------------------------------------------------------------------------------
def versions() -> str:
    return f"torch {torch.__version__}, pyro {pyro.__version__}"


def machine() -> str:
    return platform.processor() or platform.machine()


def repo_path(path: str | os.PathLike) -> Path:
    """``path``, a relative one taken from the repository root."""
    return Path(path) if os.path.isabs(path) else ROOT / path


def write_table(text: str, out: str | os.PathLike) -> None:
    """Prints the Markdown ``text`` and writes it to ``out`` (one trailing newline)."""
    text = text.rstrip("\n") + "\n"
    print(text)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write(text)


# -- the estimators by hand, in plain PyTorch ---------------------------------------------
def bernoulli_log_prob(logits: Tensor, value: Tensor) -> Tensor:
    """Bernoulli log-density summed over the last dim."""
    logits, value = torch.broadcast_tensors(logits, value)
    return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


def sbn_particles(net: SigmoidBeliefNet, x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``k`` draws ``h ~ q(h | x)`` of a one-layer SBN and their ``log p(x, h)``,
    ``log q(h | x)`` (shape ``(k, batch)``); only ``log q`` depends on the guide."""
    gen, rec = net.generative, net.recognition[0]
    q_logits = rec(x)
    h = torch.bernoulli(torch.sigmoid(q_logits).detach().expand(k, *q_logits.shape))
    log_q = bernoulli_log_prob(q_logits, h)
    log_p = bernoulli_log_prob(gen.prior_logits, h) + bernoulli_log_prob(gen.layers[0](h), x)
    return h, log_p, log_q


class HandREINFORCE:
    """REINFORCE for the one-layer SBN with the control variates of
    :data:`CONTROL_VARIATES` (``cv``: their name)."""

    def __init__(self, net: SigmoidBeliefNet, k: int, cv: str) -> None:
        self.net, self.k, self.cv = net, k, cv
        self.avg = torch.zeros(())
        self.weight = torch.zeros(())
        self.stats = torch.zeros(3)  # mean, variance, weight (NVIL)
        self.baseline = baseline_net() if cv == "nvil" else None

    def parameters(self) -> list[Tensor]:
        params = list(self.net.parameters())
        return params + (list(self.baseline.parameters()) if self.baseline else [])

    def state(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.avg, self.weight, self.stats

    def set_state(self, state: tuple[Tensor, Tensor, Tensor]) -> None:
        self.avg, self.weight, self.stats = state

    def loss(self, x: Tensor) -> Tensor:
        _, log_p, log_q = sbn_particles(self.net, x, self.k)
        f = (log_p - log_q).detach()
        extra: Tensor | float = 0.0
        if self.cv == "average":
            w = self.weight
            b = self.avg / w if w > 0 else torch.zeros(())
            self.avg, self.weight = 0.9 * self.avg + 0.1 * f.mean(), 0.9 * w + 0.1
            adv = f - b
        elif self.cv == "loo":
            adv = f - (f.sum(0, keepdim=True) - f) / (self.k - 1)
        elif self.cv == "nvil":
            b = self.baseline(x).squeeze(-1)
            m, v, w = self.stats
            c = m / w if w > 0 else torch.zeros(())
            var = v / w if w > 0 else torch.ones(())
            r = f - b.detach()
            adv = (r - c) / var.sqrt().clamp(min=1.0)
            extra = (f - c - b).pow(2).sum() / self.k
            self.stats = torch.stack([0.8 * m + 0.2 * r.mean(), 0.8 * v + 0.2 * r.var(correction=0),
                                      0.8 * w + 0.2])
        else:
            adv = f
        return -(log_p.sum() + (adv * log_q).sum()) / self.k + extra


def rws_wake_loss(log_p: Tensor, log_q: Tensor) -> Tensor:
    """RWS with wake-φ over ``K`` particles (dim 0): the IWAE bound for θ and the
    self-normalized ``-Σ w log q`` for φ."""
    log_w = log_p - log_q.detach()
    w = torch.softmax(log_w.detach(), 0)
    return -(torch.logsumexp(log_w, 0) - math.log(log_p.shape[0])).sum() - (w * log_q).sum()


def hand_wake_sleep_sbn(net: SigmoidBeliefNet, k: int, reweighted: bool) -> Step:
    """Wake-sleep (``K`` wake particles, one dream per datapoint) or RWS, one-layer SBN."""
    gen, rec = net.generative, net.recognition[0]

    def loss(x: Tensor) -> Tensor:
        _, log_p, log_q = sbn_particles(net, x, k)
        if reweighted:
            return rws_wake_loss(log_p, log_q)
        with torch.no_grad():  # sleep: one dream per datapoint
            h_dream = torch.bernoulli(torch.sigmoid(gen.prior_logits).expand(x.shape[0], -1))
            x_dream = torch.bernoulli(torch.sigmoid(gen.layers[0](h_dream)))
        return -log_p.sum() / k - bernoulli_log_prob(rec(x_dream), h_dream).sum()

    return loss


def hand_wake_sleep_gmm(gmm: Any, k: int, reweighted: bool) -> Step:
    """The same for the Gaussian mixture of Le et al. (2019)."""
    def log_lik(c: Tensor, x: Tensor) -> Tensor:
        return (-0.5 * ((x - gmm.means[c]) / gmm.scale) ** 2 - math.log(gmm.scale)
                - 0.5 * math.log(2 * math.pi))

    def loss(x: Tensor) -> Tensor:
        q_log = torch.log_softmax(gmm.recognition(x.unsqueeze(-1)), -1)
        c = torch.multinomial(q_log.detach().exp(), k, replacement=True).T
        log_q = q_log.gather(-1, c.T).T
        log_p = torch.log_softmax(gmm.prior_logits(), -1)[c] + log_lik(c, x)
        if reweighted:
            return rws_wake_loss(log_p, log_q)
        with torch.no_grad():
            c_dream = torch.multinomial(gmm.mixture_weights(), x.shape[0], replacement=True)
            x_dream = gmm.means[c_dream] + gmm.scale * torch.randn_like(x)
        q_dream = torch.log_softmax(gmm.recognition(x_dream.unsqueeze(-1)), -1)
        return -log_p.sum() / k - q_dream.gather(-1, c_dream.unsqueeze(-1)).sum()

    return loss

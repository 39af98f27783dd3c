"""Side-by-side comparison of objectives on a sigmoid belief net (the main job).

:func:`compare` trains one :class:`~pyro_wakesleep.models.SigmoidBeliefNet` per
objective, from the same initial weights and on the same mini-batches, and measures each
by the held-out ELBO, the variance of its guide gradient at the trained parameters, and
its time per step. ``pyro-wakesleep compare`` is its command line.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, SVI, TraceGraph_ELBO
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyro_wakesleep.control_variates import (
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    NeuralBaseline,
)
from pyro_wakesleep.models import SigmoidBeliefNet
from pyro_wakesleep.objectives import ReweightedWakeSleepELBO, ScoreFunctionELBO, WakeSleepELBO

__all__ = ["OBJECTIVES", "Result", "compare", "format_table"]

Factory = Callable[[int, SigmoidBeliefNet], tuple[ELBO, Callable]]


def _decaying_average(guide: Callable) -> Callable:
    """The guide with every latent site declaring TraceGraph_ELBO's decaying-average
    baseline (Pyro's own best option for these models)."""
    options: Any = {"baseline": {"use_decaying_avg_baseline": True}}
    return poutine.infer_config(guide, config_fn=lambda msg: options)


def _nvil(width: int) -> NeuralBaseline:
    return NeuralBaseline(nn.Sequential(nn.Linear(width, 100), nn.Tanh(), nn.Linear(100, 1)))


#: Named objectives for :func:`compare`: ``factory(num_particles, net) -> (loss, guide)``.
OBJECTIVES: dict[str, Factory] = {
    "pyro-tracegraph": lambda k, net: (
        TraceGraph_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1),
        _decaying_average(net.guide),
    ),
    "sf": lambda k, net: (ScoreFunctionELBO(k, max_plate_nesting=1), net.guide),
    "sf-average": lambda k, net: (
        ScoreFunctionELBO(k, MovingAverageBaseline(), max_plate_nesting=1), net.guide
    ),
    "sf-nvil": lambda k, net: (
        ScoreFunctionELBO(k, _nvil(net.sizes[0]), max_plate_nesting=1), net.guide
    ),
    "sf-loo": lambda k, net: (
        ScoreFunctionELBO(k, LeaveOneOutBaseline(), max_plate_nesting=1), net.guide
    ),
    "ws": lambda k, net: (WakeSleepELBO(k, max_plate_nesting=1), net.guide),
    "rws": lambda k, net: (ReweightedWakeSleepELBO(max(k, 2), max_plate_nesting=1), net.guide),
}


@dataclass
class Result:
    """One objective's row of the comparison.

    :param str objective: its name in :data:`OBJECTIVES`.
    :param float test_elbo: held-out ELBO per image (nats), estimated with the
        score-function ELBO's many-particle average at the trained parameters.
    :param float grad_variance: mean over guide-parameter elements of the variance of the
        objective's guide gradient at the trained parameters.
    :param float ms_per_step: median wall-clock time of one training step.
    :param list train_elbo: training objective per image at each step (the objective's
        own ``loss``, negated and divided by the batch size: the ELBO, or for ``rws`` the
        tighter importance-weighted bound).
    """

    objective: str
    test_elbo: float
    grad_variance: float
    ms_per_step: float
    train_elbo: list[float] = field(repr=False)


def _batches(data: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    while True:
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield data[order[start:start + batch_size]]


def heldout_elbo(net: SigmoidBeliefNet, data: Tensor, num_particles: int = 20) -> float:
    """Held-out ELBO per image (nats), averaged over ``num_particles`` draws each."""
    elbo = ScoreFunctionELBO(num_particles, max_plate_nesting=1)
    return -elbo.loss(net.model, net.guide, data) / len(data)


def guide_gradient_variance(
    loss: ELBO, net: SigmoidBeliefNet, guide: Callable, x: Tensor, num_draws: int
) -> float:
    """Mean elementwise variance of the guide gradient over ``num_draws`` draws, with
    control variates frozen (eval mode) and all gradients cleared afterwards."""
    params = list(net.recognition.parameters())
    cvs = getattr(loss, "control_variates", None)
    modes = [m.training for m in cvs.modules()] if cvs is not None else []
    if cvs is not None:
        cvs.eval()
    draws = []
    for _ in range(num_draws):
        for p in params:
            p.grad = None
        loss.loss_and_grads(net.model, guide, x)  # type: ignore[attr-defined]
        draws.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
    for value in pyro.get_param_store().values():
        value.unconstrained().grad = None  # type: ignore[attr-defined]
    if cvs is not None:
        for module, mode in zip(cvs.modules(), modes, strict=True):
            module.training = mode
    return torch.stack(draws).var(0).mean().item()


def compare(
    train: Tensor,
    test: Tensor,
    objectives: Sequence[str] = tuple(OBJECTIVES),
    *,
    steps: int = 1000,
    num_particles: int = 4,
    batch_size: int = 24,
    latent: Sequence[int] = (200,),
    learning_rate: float = 1e-3,
    seed: int = 0,
    grad_draws: int = 50,
    progress: bool = True,
) -> list[Result]:
    """Trains a sigmoid belief net with each objective and measures it.

    :param torch.Tensor train: training images, ``(n, D)`` of 0/1.
    :param torch.Tensor test: held-out images for the ELBO estimate.
    :param objectives: names from :data:`OBJECTIVES` (and any added to it).
    :param int steps: optimizer steps per objective.
    :param int num_particles: particles per step.
    :param int batch_size: images per mini-batch.
    :param latent: widths of the latent layers, bottom to top.
    :param float learning_rate: Adam's step size.
    :param int seed: seed of the initial weights, the batches and the draws.
    :param int grad_draws: gradient draws for the variance estimate.
    :param bool progress: show a tqdm progress bar.
    :rtype: list[Result]
    """
    unknown = [name for name in objectives if name not in OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown objective(s) {unknown}; choose from {sorted(OBJECTIVES)}")
    if steps < 1 or num_particles < 1 or batch_size < 1 or grad_draws < 2:
        raise ValueError(
            f"need steps >= 1, num_particles >= 1, batch_size >= 1 and grad_draws >= 2; got "
            f"{steps}, {num_particles}, {batch_size}, {grad_draws}"
        )
    if train.dim() != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"train and test must be (n, D) images, got {tuple(train.shape)} "
                         f"and {tuple(test.shape)}")
    torch.manual_seed(seed)
    initial = SigmoidBeliefNet((train.shape[1], *latent))
    results = []
    bar = tqdm(total=steps * len(objectives), disable=not progress, unit="step", mininterval=1.0)
    for name in objectives:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        net = copy.deepcopy(initial)
        loss, guide = OBJECTIVES[name](num_particles, net)
        optim = pyro.optim.Adam({"lr": learning_rate})  # type: ignore[attr-defined]
        svi = SVI(net.model, guide, optim, loss)
        batches = _batches(train, batch_size, torch.Generator().manual_seed(seed))
        curve, times = [], []
        bar.set_description(name)
        for _ in range(steps):
            x = next(batches)
            start = time.perf_counter()
            value = svi.step(x)
            times.append(time.perf_counter() - start)
            curve.append(-value / batch_size)
            bar.set_postfix(elbo=f"{statistics.fmean(curve[-50:]):.2f}", refresh=False)
            bar.update()
        results.append(Result(
            objective=name,
            test_elbo=heldout_elbo(net, test),
            grad_variance=guide_gradient_variance(
                loss, net, guide, train[:batch_size], grad_draws
            ),
            ms_per_step=1e3 * statistics.median(times),
            train_elbo=curve,
        ))
    bar.close()
    return results


def format_table(results: Sequence[Result]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| objective | held-out ELBO (nats/image) | guide-gradient variance | ms/step |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.objective} | {r.test_elbo:.2f} | {r.grad_variance:.3g} | "
            f"{r.ms_per_step:.2f} |"
        )
    return "\n".join(lines)


def save(results: Sequence[Result], out: str | os.PathLike) -> dict[str, str]:
    """Writes ``compare.md`` (table), ``compare.json`` (everything) and ``compare.png``
    (training curves) into the folder ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f"compare.{k}") for k in ("md", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write(format_table(results) + "\n")
    with open(paths["json"], "w") as f:
        json.dump([asdict(r) for r in results], f)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        window = max(1, len(r.train_elbo) // 50)
        smooth = [statistics.fmean(r.train_elbo[max(0, i - window + 1):i + 1])
                  for i in range(len(r.train_elbo))]
        ax.plot(smooth, label=r.objective)
    finite = [v for r in results for v in r.train_elbo[len(r.train_elbo) // 10:]
              if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite), max(finite) + 0.05 * (max(finite) - min(finite) + 1))
    ax.set_xlabel("step")
    ax.set_ylabel("training ELBO per image (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths

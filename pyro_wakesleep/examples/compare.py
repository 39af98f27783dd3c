"""Side-by-side comparison of objectives on a sigmoid belief net (the main job).

:func:`compare` trains one :class:`~pyro_wakesleep.examples.models.SigmoidBeliefNet` per
objective, from the same initial weights and on the same mini-batches, and measures each
by the held-out ELBO, the variance of its guide gradient at the trained parameters, and
its time per step. ``pyro-wakesleep compare`` is its command line.

Data-parallel: called on every rank of an initialized ``torch.distributed`` process group
(``torchrun``), :func:`compare` trains each objective with
:class:`~torch.nn.parallel.DistributedDataParallel`, every rank on its shard of the same
global batch (a :class:`~torch.utils.data.DistributedSampler`) and with its own draws;
:func:`~pyro_wakesleep.examples.parallel.compare_data_parallel`
(``pyro-wakesleep compare --devices N``) starts the processes itself.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
import torch.distributed as dist
from pyro.infer import ELBO, SVI, TraceGraph_ELBO
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pyro_wakesleep.control_variates import (
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    NeuralBaseline,
)
from pyro_wakesleep.diagnostics import gradient_stats
from pyro_wakesleep.distributed import _rank_and_world
from pyro_wakesleep.examples._optional import require
from pyro_wakesleep.examples.models import SigmoidBeliefNet
from pyro_wakesleep.objectives import (
    DisarmELBO,
    RebarELBO,
    RelaxELBO,
    ReweightedWakeSleepELBO,
    ScoreFunctionELBO,
    VimcoELBO,
    WakeSleepELBO,
)
from pyro_wakesleep.training import StepInfo, fit

__all__ = ["OBJECTIVES", "Result", "compare", "format_table"]

#: ``factory(num_particles, net, jit=False) -> (loss, guide)``
Factory = Callable[..., tuple[ELBO, Callable]]


def _decaying_average(guide: Callable) -> Callable:
    """The guide with every latent site declaring TraceGraph_ELBO's decaying-average
    baseline (Pyro's own best option for these models)."""
    options: Any = {"baseline": {"use_decaying_avg_baseline": True}}
    return poutine.infer_config(guide, config_fn=lambda msg: options)


def _nvil(width: int) -> NeuralBaseline:
    return NeuralBaseline(nn.Sequential(nn.Linear(width, 100), nn.Tanh(), nn.Linear(100, 1)))


#: Named objectives for :func:`compare`: ``factory(num_particles, net, jit=False) ->
#: (loss, guide)`` (``jit``: the objective's ``jit`` option, where it has one).
#: An entry whose loss has a ``differentiable_loss`` also runs data-parallel
#: (:func:`~pyro_wakesleep.examples.parallel.data_parallel_objectives`).
OBJECTIVES: dict[str, Factory] = {
    # Pyro's JitTraceGraph_ELBO raises with its decaying-average baseline (Pyro 1.9.2), so
    # this row stays eager under jit=True
    "pyro-tracegraph": lambda k, net, jit=False: (
        TraceGraph_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1),
        _decaying_average(net.guide),
    ),
    "sf": lambda k, net, jit=False: (
        ScoreFunctionELBO(k, max_plate_nesting=1, jit=jit), net.guide),
    "sf-average": lambda k, net, jit=False: (
        ScoreFunctionELBO(k, MovingAverageBaseline(), max_plate_nesting=1, jit=jit), net.guide
    ),
    "sf-nvil": lambda k, net, jit=False: (
        ScoreFunctionELBO(k, _nvil(net.sizes[0]), max_plate_nesting=1, jit=jit), net.guide
    ),
    "sf-loo": lambda k, net, jit=False: (
        ScoreFunctionELBO(k, LeaveOneOutBaseline(), max_plate_nesting=1, jit=jit), net.guide
    ),
    "ws": lambda k, net, jit=False: (WakeSleepELBO(k, max_plate_nesting=1, jit=jit), net.guide),
    "rws": lambda k, net, jit=False: (
        ReweightedWakeSleepELBO(max(k, 2), max_plate_nesting=1, jit=jit), net.guide),
    "vimco": lambda k, net, jit=False: (
        VimcoELBO(max(k, 2), max_plate_nesting=1, jit=jit), net.guide),
    # as many model evaluations per step as k particles: a DisARM draw costs 1 + L runs,
    # a REBAR/RELAX draw 1 + 2L (they refuse jit=True's recording and run eagerly)
    "disarm": lambda k, net, jit=False: (
        DisarmELBO(max(1, k // (1 + net.num_layers)), max_plate_nesting=1, jit=jit), net.guide
    ),
    "rebar": lambda k, net, jit=False: (
        RebarELBO(max(1, k // (1 + 2 * net.num_layers)), max_plate_nesting=1), net.guide
    ),
    "relax": lambda k, net, jit=False: (
        RelaxELBO(max(1, k // (1 + 2 * net.num_layers)), max_plate_nesting=1), net.guide
    ),
}


@dataclass
class Result:
    """One objective's row of the comparison.

    :param str objective: its name in :data:`OBJECTIVES`.
    :param float test_elbo: held-out ELBO per image (nats), estimated with the
        score-function ELBO's many-particle average at the trained parameters.
    :param float grad_variance: mean over guide-parameter elements of the variance of the
        objective's guide gradient at the trained parameters
        (:func:`~pyro_wakesleep.diagnostics.gradient_stats`, running baselines frozen).
    :param float grad_snr: signal-to-noise ratio of the guide gradient,
        :math:`\\|\\bar g\\| / \\sqrt{\\sum \\mathrm{Var}(g)}`.
    :param float ms_per_step: median wall-clock time of one training step.
    :param list train_elbo: training objective per image at each step (the objective's
        own ``loss``, negated and divided by the batch size: the ELBO, or for ``rws`` and
        ``vimco`` the tighter importance-weighted bound).
    """

    objective: str
    test_elbo: float
    grad_variance: float
    grad_snr: float
    ms_per_step: float
    train_elbo: list[float] = field(repr=False)


class _StepTimer:
    """A :func:`~pyro_wakesleep.training.fit` callback recording the time per step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last = time.perf_counter()

    def __call__(self, info: StepInfo) -> None:
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


def heldout_elbo(net: SigmoidBeliefNet, data: Tensor, num_particles: int = 20) -> float:
    """Held-out ELBO per image (nats), averaged over ``num_particles`` draws each."""
    elbo = ScoreFunctionELBO(num_particles, max_plate_nesting=1)
    return -elbo.loss(net.model, net.guide, data) / len(data)


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
    jit: bool = False,
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
    :param bool jit: train with compiled steps (the objectives' ``jit=True``; see the docs
        page "Compiled objectives"); Pyro's row stays eager.
    :rtype: list[Result]

    On every rank of an initialized ``torch.distributed`` process group, each objective
    is trained data-parallel (``batch_size`` is then the global batch, split evenly over
    the ranks; only objectives with a ``differentiable_loss``), rank 0 measures it (the
    gradient variance at the global batch, as on one process), and the results are
    returned on rank 0 (an empty list on the others).
    """
    _check(objectives, steps, num_particles, batch_size, grad_draws, train, test)
    rank, world = _rank_and_world()
    train_one = _train
    if world > 1:  # imported here: parallel imports this module
        from pyro_wakesleep.examples.parallel import _check_data_parallel, _train_shard

        _check_data_parallel(objectives, world, batch_size)
        train_one = _train_shard
    device = _device()
    train, test = train.to(device), test.to(device)
    torch.manual_seed(seed)
    initial = SigmoidBeliefNet((train.shape[1], *latent)).to(device)
    results = []
    for name in objectives:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed + rank)  # each rank its own draws
        net = copy.deepcopy(initial)
        loss, guide = OBJECTIVES[name](num_particles, net, jit=jit)
        timer = _StepTimer()
        history = train_one(net, loss, guide, train, steps, batch_size, learning_rate, seed,
                            callbacks=[timer], progress=progress and rank == 0,
                            description=name)
        if rank != 0:
            continue
        # at the global batch, in rank 0 alone: the estimator DDP averages is this one
        # (each datapoint with its own particles) divided by the number of ranks
        stats = gradient_stats(net.model, guide, loss, train[:batch_size],
                               num_draws=grad_draws, only=["guide"], seed=seed)
        (summary,) = stats.rows(by="group")
        results.append(Result(
            objective=name,
            test_elbo=heldout_elbo(net, test),
            grad_variance=summary["variance"] / summary["numel"],
            grad_snr=summary["snr"],
            ms_per_step=1e3 * statistics.median(timer.times),
            train_elbo=[-v / (batch_size // world) for v in history.losses],
        ))
    return results


def _check(objectives: Sequence[str], steps: int, num_particles: int, batch_size: int,
           grad_draws: int, train: Tensor, test: Tensor) -> None:
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


def _device() -> torch.device:
    """This rank's GPU under ``nccl``, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _train(net: SigmoidBeliefNet, loss: ELBO, guide: Callable, train: Tensor, steps: int,
           batch_size: int, learning_rate: float, seed: int, **options: Any) -> Any:
    """fit() with SVI on one process (on a process group: ``parallel._train_shard``)."""
    optim = pyro.optim.Adam({"lr": learning_rate})  # type: ignore[attr-defined]
    svi = SVI(net.model, guide, optim, loss)
    batches: DataLoader[Tensor] = DataLoader(
        train, batch_size, shuffle=True, drop_last=True,  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(seed),
    )
    return fit(svi, batches, steps, **options)


def format_table(results: Sequence[Result]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| objective | held-out ELBO (nats/image) | guide-gradient variance | guide SNR | "
        "ms/step |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.objective} | {r.test_elbo:.2f} | {r.grad_variance:.3g} | "
            f"{r.grad_snr:.3g} | {r.ms_per_step:.2f} |"
        )
    return "\n".join(lines)


def save(results: Sequence[Result], out: str | os.PathLike) -> dict[str, str]:
    """Writes ``compare.md`` (table), ``compare.json`` (everything) and ``compare.png``
    (training curves) into the folder ``out``; returns their paths."""
    require("matplotlib", "the plot of save()").use("Agg")
    plt = require("matplotlib.pyplot", "the plot of save()")

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
    ax.set_ylabel("training objective per image (nats)")
    ax.set_title("ELBO; importance-weighted bound for rws and vimco", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths

"""Side-by-side comparison of objectives on a sigmoid belief net (the main job).

:func:`compare` trains one :class:`~pyro_wakesleep.examples.models.SigmoidBeliefNet` per
objective, from the same initial weights and on the same mini-batches, for the same budget
of training seconds (or steps). The objectives train interleaved: in every round each one
trains for its next slice of the budget, in an order rotated from round to round, so a
change in the machine's load hits every objective alike instead of reading as a speed
difference. At a few checkpoints (time spent there is not counted) each is measured by the
importance-weighted bound on held-out images and by the variance and signal-to-noise ratio
of its guide gradient. ``pyro-wakesleep compare`` is its command line; :func:`save` writes
the table, the figure and ``compare.json`` (results and the settings that made them).

Data-parallel: called on every rank of an initialized ``torch.distributed`` process group
(``torchrun``), :func:`compare` trains each objective with
:class:`~torch.nn.parallel.DistributedDataParallel`, every rank on its shard of the same
global batch and with its own draws;
:func:`~pyro_wakesleep.examples.parallel.compare_data_parallel`
(``pyro-wakesleep compare --devices N``) starts the processes itself.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyro
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from pyro_wakesleep.control_variates import NeuralBaseline
from pyro_wakesleep.diagnostics import gradient_stats
from pyro_wakesleep.distributed import _rank_and_world
from pyro_wakesleep.examples._optional import require
from pyro_wakesleep.examples.contenders import (
    DEFAULT_OBJECTIVES,
    OBJECTIVES,
    Contender,
    check_data_parallel,
)
from pyro_wakesleep.examples.models import SigmoidBeliefNet
from pyro_wakesleep.objectives import Objective, VimcoELBO
from pyro_wakesleep.signals import debiased_average

__all__ = ["Result", "compare", "format_table", "heldout_bound", "save", "settings"]


@dataclass
class Result:
    """One objective's row of the comparison. Bounds are in nats per image.

    :param str objective: its name in
        :data:`~pyro_wakesleep.examples.contenders.OBJECTIVES`.
    :param float train_bound: the objective's own training objective per image (the ELBO;
        for ``vimco``, ``rws`` and ``ws`` their importance-weighted bound), averaged over
        the last tenth of its steps.
    :param float test_bound: importance-weighted bound on the held-out images at the end
        (:func:`heldout_bound`): the same yardstick for every objective.
    :param float grad_variance: mean over guide-parameter elements of the variance of the
        objective's guide gradient at the end
        (:func:`~pyro_wakesleep.diagnostics.gradient_stats`, running baselines frozen);
        for ``sf-nvil`` times :math:`\\max(1, v)`, which undoes NVIL's division of the
        learning signal by its running standard deviation :math:`\\sqrt v`.
    :param float grad_snr: signal-to-noise ratio of that gradient,
        :math:`\\|\\bar g\\| / \\sqrt{\\sum \\mathrm{Var}(g)}` (scale-free; with
        few draws its estimate has a floor near :math:`1/\\sqrt{D}`).
    :param float ms_per_step: median wall-clock time of its training steps.
    :param int steps: training steps taken.
    :param float seconds: training time (the sum of its step times).
    :param list train_curve: training objective per image at each step.
    :param list train_seconds: training time when each step ended.
    :param list checkpoints: ``{"seconds", "step", "test_bound", "grad_variance",
        "grad_snr"}`` at each measurement, the first at initialization.
    """

    objective: str
    train_bound: float
    test_bound: float
    grad_variance: float
    grad_snr: float
    ms_per_step: float
    steps: int
    seconds: float
    train_curve: list[float] = field(repr=False)
    train_seconds: list[float] = field(repr=False)
    checkpoints: list[dict[str, float]] = field(repr=False)


def heldout_bound(net: SigmoidBeliefNet, data: Tensor, num_particles: int = 50,
                  seed: int = 0) -> float:
    """The importance-weighted bound :math:`\\log \\frac1K \\sum_k p(x, h_k)/q(h_k|x)`
    per image (nats), ``K = num_particles`` draws from the guide for each, averaged over
    ``data``; seeded, and the global random streams are left as they were."""
    with torch.random.fork_rng(devices=[data.device] if data.is_cuda else []):
        torch.manual_seed(seed)
        loss = VimcoELBO(num_particles, max_plate_nesting=1).loss(net.model, net.guide, data)
    return -loss / len(data)


def _agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (as is, outside a process group)."""
    if _rank_and_world()[1] == 1:
        return flag
    value = torch.tensor([float(flag)], device=_device())
    dist.broadcast(value, 0)
    return bool(value.item())


def compare(
    train: Tensor,
    test: Tensor,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    *,
    seconds: float = 20.0,
    steps: int = 0,
    rounds: int = 20,
    evaluations: int = 5,
    num_particles: int = 4,
    batch_size: int = 24,
    latent: Sequence[int] = (200,),
    learning_rate: float = 1e-3,
    seed: int = 0,
    grad_draws: int = 20,
    eval_particles: int = 50,
    progress: bool = True,
    jit: bool = False,
) -> list[Result]:
    """Trains a sigmoid belief net with each objective, interleaved, and measures it.

    :param torch.Tensor train: training images, ``(n, D)`` of 0/1.
    :param torch.Tensor test: held-out images for the importance-weighted bound.
    :param objectives: names from
        :data:`~pyro_wakesleep.examples.contenders.OBJECTIVES`.
    :param float seconds: training seconds per objective (its own step time; 0: no limit).
    :param int steps: most steps per objective (0: no limit). Training stops at whichever
        of ``seconds`` and ``steps`` comes first; at least one must be set.
    :param int rounds: the budget is trained in this many interleaved slices.
    :param int evaluations: measurements after initialization, evenly spread.
    :param int num_particles: particles per step.
    :param int batch_size: images per mini-batch.
    :param latent: widths of the latent layers, bottom to top.
    :param float learning_rate: Adam's step size.
    :param int seed: seed of the initial weights, the batches and the draws.
    :param int grad_draws: gradient draws for the variance and SNR.
    :param int eval_particles: importance samples per held-out image.
    :param bool progress: show a tqdm progress bar (training bound in nats per image).
    :param bool jit: compiled steps (the objectives' ``jit=True``; see the docs page
        "Compiled objectives"); Pyro's row, ``rebar`` and ``relax`` stay eager.
    :rtype: list[Result]

    On every rank of an initialized ``torch.distributed`` process group, each objective
    is trained data-parallel (``batch_size`` is then the global batch, split evenly over
    the ranks; only objectives with a ``differentiable_loss``; rank 0 decides when a slice
    ends), rank 0 measures it, and the results are returned on rank 0 (an empty list on
    the others).

    Pyro's param store is cleared first; afterwards it holds the trained parameters of
    every objective (each network under its own name).
    """
    if len(set(objectives)) != len(objectives):
        raise ValueError(f"objectives must be distinct, got {list(objectives)}")
    _check(objectives, seconds, steps, rounds, evaluations, num_particles, batch_size,
           grad_draws, eval_particles, train, test)
    rank, world = _rank_and_world()
    if world > 1:
        check_data_parallel(objectives, world, batch_size)
    device = _device()
    train, test = train.to(device), test.to(device)
    # the contenders share Pyro's global param store (each net under its own name, as
    # are learned control variates of different objectives): nothing of an earlier run
    # may be picked up by a name that is used again
    pyro.clear_param_store()
    torch.manual_seed(seed)
    initial = SigmoidBeliefNet((train.shape[1], *latent)).to(device)
    contenders = [
        Contender(name, copy.deepcopy(initial), train, num_particles=num_particles,
                  batch_size=batch_size, learning_rate=learning_rate, seed=seed, jit=jit)
        for name in objectives
    ]
    measure = rank == 0
    start_bound = heldout_bound(initial, test, eval_particles, seed) if measure else 0.0
    checkpoints: list[list[dict[str, float]]] = [[] for _ in contenders]
    if measure:
        for c, marks in zip(contenders, checkpoints, strict=True):
            marks.append(_measure(c, train[:batch_size], start_bound, grad_draws, seed))
    at = {round(rounds * i / evaluations) for i in range(1, evaluations + 1)}
    with tqdm(total=rounds * len(contenders), disable=not (progress and measure),
              desc="compare", unit="slice") as bar:
        for r in range(1, rounds + 1):
            shift = (r - 1) % len(contenders)
            for c in contenders[shift:] + contenders[:shift]:
                _train_slice(c, seconds * r / rounds, math.ceil(steps * r / rounds))
                bar.update()
                if c.losses:
                    bar.set_postfix_str(f"{c.name}: train bound "
                                        f"{-statistics.fmean(c.losses[-20:]):.1f} nats/image")
            if measure and r in at:
                for c, marks in zip(contenders, checkpoints, strict=True):
                    bound = heldout_bound(c.net, test, eval_particles, seed)
                    marks.append(_measure(c, train[:batch_size], bound, grad_draws, seed))
    if not measure:
        return []
    return [_result(c, marks) for c, marks in zip(contenders, checkpoints, strict=True)]


def _train_slice(c: Contender, until_seconds: float, until_steps: int) -> None:
    """Trains ``c`` until its training time reaches ``until_seconds`` or its steps
    ``until_steps`` (a zero: no such limit)."""
    with c:
        while _agree((not until_seconds or c.elapsed < until_seconds)
                     and (not until_steps or len(c.times) < until_steps)):
            x = c.batch()
            start = time.perf_counter()
            loss = c.step(x)
            c.times.append(time.perf_counter() - start)
            c.elapsed += c.times[-1]
            c.losses.append(loss)


def _measure(c: Contender, batch: Tensor, bound: float, draws: int, seed: int
             ) -> dict[str, float]:
    # at the global batch, in rank 0 alone: the estimator DDP averages is this one
    # (each datapoint with its own particles) divided by the number of ranks
    # Pyro's own objectives one draw after another: batching the draws of TraceGraph_ELBO
    # with its decaying-average baseline at one particle fails (the baseline's running
    # average takes the batched shape)
    method = "auto" if isinstance(c.loss, Objective) else "sequential"
    stats = gradient_stats(c.net.model, c.guide, c.loss, batch, num_draws=draws,
                           only=["guide"], seed=seed, method=method)
    (summary,) = stats.rows(by="group")
    return {"seconds": c.elapsed, "step": len(c.times), "test_bound": bound,
            "grad_variance": summary["variance"] / summary["numel"] * _nvil_scale(c.loss),
            "grad_snr": summary["snr"]}


def _nvil_scale(loss: object) -> float:
    """:math:`\\max(1, v)` for an objective with one variance-normalizing
    :class:`~pyro_wakesleep.control_variates.NeuralBaseline` (running signal variance
    :math:`v`), whose guide gradient is the ELBO's divided by :math:`\\max(1, \\sqrt v)`:
    its variance times this factor is in the units of the other objectives'. Else 1."""
    modules = getattr(loss, "control_variates", None)
    found = [m for m in modules.modules() if isinstance(m, NeuralBaseline)
             and m.normalize_variance] if isinstance(modules, torch.nn.Module) else []
    if len(found) != 1:
        return 1.0
    (nvil,) = found
    variance = debiased_average(nvil.variance, nvil.weight, default=1.0)
    return float(variance.clamp(min=1.0))


def _result(c: Contender, marks: list[dict[str, float]]) -> Result:
    curve = [-v for v in c.losses]
    elapsed, seconds = 0.0, []
    for t in c.times:
        elapsed += t
        seconds.append(elapsed)
    tail = curve[-max(1, len(curve) // 10):] or [math.nan]
    return Result(
        objective=c.name, train_bound=statistics.fmean(tail),
        test_bound=marks[-1]["test_bound"], grad_variance=marks[-1]["grad_variance"],
        grad_snr=marks[-1]["grad_snr"],
        ms_per_step=1e3 * statistics.median(c.times) if c.times else math.nan,
        steps=len(c.times), seconds=elapsed, train_curve=curve, train_seconds=seconds,
        checkpoints=marks,
    )


def _check(objectives: Sequence[str], seconds: float, steps: int, rounds: int,
           evaluations: int, num_particles: int, batch_size: int, grad_draws: int,
           eval_particles: int, train: Tensor, test: Tensor) -> None:
    unknown = [name for name in objectives if name not in OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown objective(s) {unknown}; choose from {sorted(OBJECTIVES)}")
    if not objectives:
        raise ValueError("objectives is empty")
    if not (seconds >= 0 and steps >= 0 and (seconds > 0 or steps > 0)):
        raise ValueError(f"need seconds >= 0 and steps >= 0, not both 0; got seconds="
                         f"{seconds}, steps={steps}")
    if (rounds < 1 or not 1 <= evaluations <= rounds or num_particles < 1 or batch_size < 1
            or grad_draws < 2 or eval_particles < 1):
        raise ValueError(
            f"need rounds >= 1, 1 <= evaluations <= rounds, num_particles >= 1, "
            f"batch_size >= 1, grad_draws >= 2 and eval_particles >= 1; got {rounds}, "
            f"{evaluations}, {num_particles}, {batch_size}, {grad_draws}, {eval_particles}"
        )
    if train.dim() != 2 or test.dim() != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"train and test must be (n, D) images, got {tuple(train.shape)} "
                         f"and {tuple(test.shape)}")
    if len(train) < batch_size:
        raise ValueError(f"batch_size={batch_size} exceeds the {len(train)} training images")


def _device() -> torch.device:
    """This rank's GPU under ``nccl``, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def settings(**options: Any) -> dict[str, Any]:
    """``options`` (data, budget, learning rate, seeds, ...) with what else made the
    results: torch's thread counts, the versions of Python, torch, Pyro and this package,
    and the machine (processor, cores, load average when called)."""
    from pyro_wakesleep import __version__

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        **options,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "pyro": pyro.__version__, "pyro_wakesleep": __version__},
        "machine": {"platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(),
                    "load_average": [round(v, 2) for v in load] if load else None,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available()
                    else None},
        "command": " ".join(sys.argv),
    }


def format_table(results: Sequence[Result]) -> str:
    """The results as a Markdown table (bounds in nats per image). The guide gradient's
    SNR is left out (it is in ``compare.json``): with the few draws of a short run it
    mostly reads its noise floor."""
    lines = [
        "| objective | train bound | held-out IW bound | guide-grad variance | steps | "
        "ms/step (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.objective} | {r.train_bound:.2f} | {r.test_bound:.2f} | "
            f"{r.grad_variance:.3g} | {r.steps} | {r.ms_per_step:.2f} |"
        )
    return "\n".join(lines)


def save(results: Sequence[Result], out: str | os.PathLike,
         settings: dict[str, Any] | None = None) -> dict[str, str]:
    """Writes ``compare.md`` (the table), ``compare.json`` (``{"settings": ...,
    "results": [...]}``: everything) and ``compare.png`` (the figure of
    :func:`~pyro_wakesleep.examples.figure.plot`) into the folder ``out``; returns their
    paths.

    :param results: from :func:`compare`.
    :param out: the folder (created if missing).
    :param dict settings: what made the results (see :func:`settings`).
    """
    from pyro_wakesleep.examples.figure import plot

    require("matplotlib", "the plot of save()")
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f"compare.{k}") for k in ("md", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write(format_table(results) + "\n")
    with open(paths["json"], "w") as f:
        json.dump({"settings": settings or {}, "results": [asdict(r) for r in results]}, f)
    plot(results, paths["png"], settings)
    return paths

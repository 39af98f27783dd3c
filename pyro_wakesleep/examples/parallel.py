"""The comparison of objectives, data-parallel on processes started here.

:func:`compare_data_parallel` (``pyro-wakesleep compare --devices N``) starts the
processes and runs :func:`~pyro_wakesleep.examples.compare.compare` on every rank of the
process group they form; :func:`data_parallel_objectives` names the objectives that can
run so. The in-process-group helpers used by
:func:`~pyro_wakesleep.examples.compare.compare` itself (when called on every rank of an
initialized ``torch.distributed`` process group, e.g. under ``torchrun``) live here too:
each objective is trained with :class:`~torch.nn.parallel.DistributedDataParallel`, every
rank on its shard of the same global batch (a :class:`~torch.utils.data.DistributedSampler`)
and with its own draws.
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pyro.infer import ELBO
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from pyro_wakesleep.distributed import _rank_and_world
from pyro_wakesleep.examples.compare import OBJECTIVES, Result, _check, compare
from pyro_wakesleep.examples.models import SigmoidBeliefNet
from pyro_wakesleep.training import fit

__all__ = ["compare_data_parallel", "data_parallel_objectives"]


def data_parallel_objectives(objectives: Sequence[str] = tuple(OBJECTIVES)) -> list[str]:
    """The names among ``objectives`` that can be trained data-parallel: those whose loss
    has a ``differentiable_loss`` (every objective of this package; not Pyro's
    ``TraceGraph_ELBO``), so that ``loss(model, guide)`` is a module that
    :class:`~torch.nn.parallel.DistributedDataParallel` can wrap.

    :param objectives: names from :data:`~pyro_wakesleep.examples.compare.OBJECTIVES`.
    :rtype: list[str]
    """
    net = SigmoidBeliefNet((2, 1))
    return [name for name in objectives if name in OBJECTIVES and callable(
        getattr(OBJECTIVES[name](2, net)[0], "differentiable_loss", None))]


def _check_data_parallel(objectives: Sequence[str], devices: int, batch_size: int) -> None:
    ok = data_parallel_objectives(objectives)
    refused = [name for name in objectives if name not in ok]
    if refused:
        raise ValueError(f"objective(s) {refused} have no differentiable_loss and cannot be "
                         f"trained data-parallel; choose from {ok or data_parallel_objectives()}")
    if batch_size % devices:
        raise ValueError(f"batch_size={batch_size} must be a multiple of devices={devices} "
                         "(the global batch is split evenly over the ranks)")


def _train_shard(net: SigmoidBeliefNet, loss: ELBO, guide: Callable, train: Tensor,
                 steps: int, batch_size: int, learning_rate: float, seed: int,
                 **options: Any) -> Any:
    """fit() with DDP around ``loss(model, guide)`` on this rank's shard of every global
    batch of ``batch_size``."""
    rank, world = _rank_and_world()
    per_rank = batch_size // world
    sampler: DistributedSampler[int] = DistributedSampler(
        train, world, rank, shuffle=True, seed=seed, drop_last=True)  # type: ignore[arg-type]
    shard: DataLoader[Tensor] = DataLoader(
        train, per_rank, sampler=sampler, drop_last=True)  # type: ignore[arg-type]
    module: Any = loss(net.model, guide)  # type: ignore[arg-type]  # an ObjectiveModule
    module.initialize(train[:per_rank])  # lazily built control variates exist before DDP
    ddp = DistributedDataParallel(module)
    optimizer = torch.optim.Adam(module.parameters(), lr=learning_rate)
    return fit(ddp, shard, steps, optimizer=optimizer, **options)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, devices: int, port: int, backend: str, train: Tensor, test: Tensor,
               objectives: list[str], options: dict[str, Any], out: str) -> None:
    """One rank of :func:`compare_data_parallel` (module level: spawn pickles it)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=devices, timeout=datetime.timedelta(minutes=10))
    except Exception as error:  # reported by the parent as "could not start"
        with open(f"{out}.init{rank}", "w") as f:
            f.write(repr(error))
        return
    try:
        results = compare(train, test, objectives, **options)
        if rank == 0:
            with open(out, "w") as f:
                json.dump([asdict(r) for r in results], f)
    finally:
        dist.destroy_process_group()


def compare_data_parallel(
    train: Tensor, test: Tensor, objectives: Sequence[str] | None = None, *, devices: int = 2,
    backend: str | None = None, **options: Any,
) -> list[Result]:
    """:func:`~pyro_wakesleep.examples.compare.compare` data-parallel on ``devices``
    processes started here (:func:`torch.multiprocessing.spawn`, rendezvous on
    127.0.0.1): on as many GPUs with ``nccl`` when CUDA has that many, else on CPU
    processes with ``gloo``. Every global
    batch of ``batch_size`` images is split evenly over the ranks, each drawing its own
    particles (seed ``seed + rank``); rank 0 measures the trained models and its results
    are returned.

    :param torch.Tensor train: training images, ``(n, D)`` of 0/1.
    :param torch.Tensor test: held-out images.
    :param objectives: names from :data:`~pyro_wakesleep.examples.compare.OBJECTIVES` that
        :func:`data_parallel_objectives` accepts (default: all of them).
    :param int devices: the number of processes, at least 2.
    :param str backend: ``"gloo"`` or ``"nccl"``; by default as above.
    :param options: the keyword arguments of
        :func:`~pyro_wakesleep.examples.compare.compare`.
    :rtype: list[~pyro_wakesleep.examples.compare.Result]
    :raises ValueError: for bad input (before any process starts).
    :raises RuntimeError: if the processes cannot start or one fails.
    """
    import torch.multiprocessing as mp

    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 2:
        raise ValueError(f"devices must be an int >= 2, got {devices!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= devices \
            else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < devices:
        raise ValueError(f"backend='nccl' needs {devices} GPUs, found "
                         f"{torch.cuda.device_count()}")
    if not (dist.is_available() and (backend == "nccl" or dist.is_gloo_available())):
        raise RuntimeError(f"torch.distributed with {backend} is not available here")
    names = list(data_parallel_objectives() if objectives is None else objectives)
    bound = inspect.signature(compare).bind(train, test, names, **options)  # TypeError
    bound.apply_defaults()
    a = bound.arguments
    _check(names, a["steps"], a["num_particles"], a["batch_size"], a["grad_draws"], train,
           test)
    _check_data_parallel(names, devices, a["batch_size"])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        try:
            mp.spawn(_rank_main, nprocs=devices, join=True, args=(
                devices, _free_port(), backend, train, test, names, options, out))
        except Exception as error:  # a rank failed: its traceback is in the message
            raise RuntimeError(f"compare on {devices} {backend} processes failed: "
                               f"{error}") from error
        failed = [f"{out}.init{r}" for r in range(devices) if os.path.exists(f"{out}.init{r}")]
        if failed or not os.path.exists(out):
            reason = Path(failed[0]).read_text() if failed else "no results"
            raise RuntimeError(f"could not start {devices} {backend} processes: {reason}")
        with open(out) as f:
            return [Result(**row) for row in json.load(f)]

"""The comparison of objectives, data-parallel on processes started here.

:func:`compare_data_parallel` (``pyro-wakesleep compare --devices N``) starts the
processes and runs :func:`~pyro_wakesleep.examples.compare.compare` on every rank of the
process group they form;
:func:`~pyro_wakesleep.examples.contenders.data_parallel_objectives` names the objectives
that can run so, and :class:`~pyro_wakesleep.examples.contenders.Contender` takes their
data-parallel steps (this module imports :mod:`~pyro_wakesleep.examples.compare`, never
the other way round).
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pyro_wakesleep.examples.compare import Result, _check, compare
from pyro_wakesleep.examples.contenders import (
    DEFAULT_OBJECTIVES,
    check_data_parallel,
    data_parallel_objectives,
)

__all__ = ["compare_data_parallel"]


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
    :param objectives: names from
        :data:`~pyro_wakesleep.examples.contenders.OBJECTIVES` that
        :func:`~pyro_wakesleep.examples.contenders.data_parallel_objectives` accepts
        (default: those of
        :data:`~pyro_wakesleep.examples.contenders.DEFAULT_OBJECTIVES`).
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
    names = list(data_parallel_objectives(DEFAULT_OBJECTIVES) if objectives is None
                 else objectives)
    bound = inspect.signature(compare).bind(train, test, names, **options)  # TypeError
    bound.apply_defaults()
    a = bound.arguments
    _check(names, a["seconds"], a["steps"], a["rounds"], a["evaluations"], a["num_particles"],
           a["batch_size"], a["grad_draws"], a["eval_particles"], train, test)
    check_data_parallel(names, devices, a["batch_size"])
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

"""Statistics reduced across the ranks of a ``torch.distributed`` process group.

Under data-parallel training (:class:`torch.nn.parallel.DistributedDataParallel`, or
Lightning's ``strategy="ddp"`` on top of it) each rank sees its own shard of the batch.
Gradients are averaged by DDP; the running statistics of the control variates
(:class:`~pyro_wakesleep.control_variates.MovingAverageBaseline`'s signal mean,
:class:`~pyro_wakesleep.control_variates.NeuralBaseline`'s residual mean and variance)
are buffers, not gradients, so the control variates reduce them with the functions
below before they update. The result equals the statistic one process would compute over
the whole global batch (counts and sums are reduced, so unequal shards are weighted
correctly), and every rank holds identical state after every step.

Cost: one ``all_reduce`` of 2 (mean) or 3 (mean and variance) scalars per control
variate per step, against DDP's all-reduce of every parameter's gradient; it is a
latency (not a bandwidth) cost, one round trip of the backend.

Every function is a no-op (the plain single-process statistic, computed exactly as
before) unless ``torch.distributed`` is initialized with a world size above 1. Every
rank must call them the same number of times in the same order (as for any collective):
a site that some ranks draw and others do not (stochastic control flow) would make them
wait for each other forever.

:func:`~pyro_wakesleep.training.fit` coordinates the ranks with the private helpers at
the end of this module (rank 0 decides and writes, every rank reads, a stop on one rank
stops all), and starts the ranks that a checkpoint has no random stream for with
:func:`derived_rng_state`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pyro
import torch
import torch.distributed as dist
from pyro.util import get_rng_state, set_rng_state
from torch import Tensor

from pyro_wakesleep._validation import check_int

__all__ = ["all_reduce_mean", "all_reduce_moments", "all_reduce_sum", "derived_rng_state",
           "is_distributed"]


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is available and initialized with more than one rank.

    :rtype: bool
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(value: Tensor) -> Tensor:
    """The elementwise sum of ``value`` over all ranks, as a new detached tensor (the
    input is not changed); ``value`` itself (detached) when not distributed.

    :param torch.Tensor value: a tensor of the same shape on every rank.
    :rtype: torch.Tensor
    """
    total = value.detach().clone()
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_reduce_mean(value: Tensor) -> Tensor:
    """The mean of all entries of ``value`` over all ranks: one all-reduce of the pair
    (count, sum), so ranks holding different numbers of entries are weighted by them.

    .. math:: \\bar v = \\frac{\\sum_r \\sum_i v_{r,i}}{\\sum_r n_r}

    :param torch.Tensor value: this rank's entries (any shape; may differ by rank).
    :return: a detached scalar, ``value.mean()`` when not distributed.
    :rtype: torch.Tensor
    """
    value = value.detach()
    if not is_distributed():
        return value.mean()
    wide = torch.float64 if value.device.type != "mps" else value.dtype
    count, total = all_reduce_sum(
        torch.stack([value.new_tensor(value.numel(), dtype=wide), value.to(wide).sum()]))
    return (total / count).to(value.dtype)


def all_reduce_moments(value: Tensor, shift: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """The mean and the (population, ``correction=0``) variance of all entries of
    ``value`` over all ranks, from one all-reduce of the triple
    :math:`(n_r, \\sum_i (v_{r,i} - c), \\sum_i (v_{r,i} - c)^2)`:

    .. math::

        \\bar v = c + \\frac{S_1}{n}, \\qquad
        \\sigma^2 = \\frac{S_2}{n} - \\Big(\\frac{S_1}{n}\\Big)^2 .

    The shift :math:`c` must be the same on every rank; a value near the mean (e.g. the
    running mean of the previous steps, identical on every rank) keeps the difference
    of sums well conditioned. It does not change the result in exact arithmetic. The
    sums are accumulated and reduced in float64 (one all-reduce of 3 float64 numbers)
    and the results cast back to ``value``'s dtype.

    :param torch.Tensor value: this rank's entries (any shape; may differ by rank).
    :param shift: the shift :math:`c`, a scalar identical on every rank.
    :type shift: torch.Tensor or float
    :return: detached scalars ``(mean, variance)``; ``(value.mean(),
        value.var(correction=0))`` when not distributed.
    :rtype: tuple
    """
    value = value.detach()
    if not is_distributed():
        return value.mean(), value.var(correction=0)
    # float64 sums: the one-pass variance S2/n - (S1/n)^2 cancels catastrophically in
    # float32 when the shift is far from the mean (early in training, a baseline ~0
    # against signals of tens of nats: relative errors ~1e-3 were measured)
    wide = torch.float64 if value.device.type != "mps" else value.dtype
    c = torch.as_tensor(shift, device=value.device).detach().to(wide)
    centered = value.to(wide) - c
    count, s1, s2 = all_reduce_sum(
        torch.stack([centered.new_tensor(value.numel()), centered.sum(), centered.pow(2).sum()])
    )
    mean_offset = s1 / count
    variance = (s2 / count - mean_offset.pow(2)).clamp(min=0.0)
    return (c + mean_offset).to(value.dtype), variance.to(value.dtype)


# Coordination of the ranks of fit() (private): every rank calls these at the same points.


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size; ``(0, 1)`` when not distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _device() -> torch.device:
    """Where the backend's collectives want small tensors (the current CUDA device for
    ``nccl``, the CPU otherwise)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` when not
    distributed."""
    if not is_distributed():
        return [obj]
    objects: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank; ``obj`` itself when not distributed."""
    if not is_distributed():
        return obj
    objects = [obj]
    dist.broadcast_object_list(objects, src=0)
    return objects[0]


def _any(*flags: bool) -> tuple[bool, ...]:
    """For each flag, whether it is set on any rank: one all-reduce of ``len(flags)``
    numbers; the flags themselves when not distributed."""
    if not is_distributed():
        return flags
    total = all_reduce_sum(torch.tensor([float(f) for f in flags], device=_device()))
    return tuple(bool(v > 0) for v in total.tolist())


def _mean(value: float) -> float:
    """The mean of the ranks' ``value`` (one all-reduce); ``value`` when not distributed."""
    if not is_distributed():
        return value
    return float(all_reduce_mean(torch.tensor([value], dtype=torch.float64, device=_device())))


def _agree(compute: Callable[[], Any], everywhere: bool = False) -> Any:
    """Rank 0's ``compute()`` on every rank (``everywhere``: each rank's own), or the
    ValueError that it raised on a rank, raised on every rank, so that no rank is left
    waiting for the others in a collective."""
    try:
        result, error = compute(), None
    except ValueError as caught:
        result, error = None, caught
    if everywhere:
        errors = [(r, e) for r, e in enumerate(_gather(None if error is None else str(error)))
                  if e is not None]
        if error is not None:
            raise error
        if errors:
            rank, message = errors[0]
            raise ValueError(f"fit: on rank {rank}: {message}")
        return result
    result, message = _broadcast((result, None if error is None else str(error)))
    if error is not None:
        raise error
    if message is not None:
        raise ValueError(f"fit: on rank 0: {message}")
    return result


def _own_streams(saved: Mapping[str, Any], rank: int, world: int) -> dict[str, Any]:
    """This rank's random-number states from a checkpoint: its own if the checkpoint was
    written by as many ranks; else rank ``rank``'s if the checkpoint has one, and for the
    others (more ranks than wrote it) a stream seeded from rank 0's and ``rank``."""
    ranks = saved.get("ranks") or [{"rng": saved["rng"],
                                    "epoch_rng": saved["data"]["epoch_rng"]}]
    if len(ranks) != world and rank == 0:
        def which(lo: int, hi: int) -> str:
            return f"rank {lo}" if lo == hi else f"ranks {lo} to {hi}"

        streams = (f"{which(len(ranks), world - 1)} start new random streams"
                   if world > len(ranks) else
                   f"the random streams of the checkpoint's {which(world, len(ranks) - 1)} "
                   "end here")
        warnings.warn(
            f"fit: the checkpoint was written by {len(ranks)} rank(s) and resumes on "
            f"{world}: parameters, optimizer, control-variate state, history and position "
            f"in the data are restored on every rank, but {streams}, so the draws differ "
            f"from those of a run on {len(ranks)} rank(s)", RuntimeWarning, stacklevel=3)
    if rank < len(ranks):
        return dict(ranks[rank])
    return {"rng": derived_rng_state(ranks[0]["rng"], rank), "epoch_rng": ranks[0]["epoch_rng"]}


def derived_rng_state(state: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """The random-number state with which :func:`~pyro_wakesleep.training.fit` starts
    rank ``rank`` when it resumes
    from a checkpoint written by fewer ranks: Pyro's generators (torch, Python, NumPy)
    seeded with ``seed + rank``, where ``seed`` is drawn from the torch generator state
    of the checkpoint's rank 0 (which is not changed). Deterministic, so a resumed run is
    reproducible.

    :param dict state: rank 0's state, as :func:`pyro.util.get_rng_state` returns it.
    :param int rank: the rank, at least 1.
    :rtype: dict
    """
    check_int(rank, "rank", 1)
    generator = torch.Generator()
    generator.set_state(state["torch"])
    seed = int(torch.randint(0, 2**31, (), generator=generator))
    current = get_rng_state()
    try:
        pyro.set_rng_seed(seed + rank)
        return get_rng_state()
    finally:
        set_rng_state(current)

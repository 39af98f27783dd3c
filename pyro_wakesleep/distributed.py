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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_mean", "all_reduce_moments", "all_reduce_sum", "is_distributed"]


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
    count, total = all_reduce_sum(torch.stack([value.new_tensor(value.numel()), value.sum()]))
    return total / count


def all_reduce_moments(value: Tensor, shift: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """The mean and the (population, ``correction=0``) variance of all entries of
    ``value`` over all ranks, from one all-reduce of the triple
    :math:`(n_r, \\sum_i (v_{r,i} - c), \\sum_i (v_{r,i} - c)^2)`:

    .. math::

        \\bar v = c + \\frac{S_1}{n}, \\qquad
        \\sigma^2 = \\frac{S_2}{n} - \\Big(\\frac{S_1}{n}\\Big)^2 .

    The shift :math:`c` must be the same on every rank; a value near the mean (e.g. the
    running mean of the previous steps, identical on every rank) keeps the difference
    of sums well conditioned. It does not change the result in exact arithmetic.

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
    c = torch.as_tensor(shift, dtype=value.dtype, device=value.device).detach()
    centered = value - c
    count, s1, s2 = all_reduce_sum(
        torch.stack([value.new_tensor(value.numel()), centered.sum(), centered.pow(2).sum()])
    )
    mean_offset = s1 / count
    variance = (s2 / count - mean_offset.pow(2)).clamp(min=0.0)
    return c + mean_offset, variance

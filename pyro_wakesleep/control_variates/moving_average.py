"""A running average of the learning signal as baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from pyro_wakesleep._validation import check_real
from pyro_wakesleep.control_variates.base import Advantage, ControlVariate, SiteContext, zero_loss
from pyro_wakesleep.distributed import all_reduce_mean
from pyro_wakesleep.signals import debiased_average, ema_update

__all__ = ["MovingAverageBaseline"]


class MovingAverageBaseline(ControlVariate):
    """An exponential moving average of the learning signal as baseline.

    .. math::

        \\hat f = f - b_{t-1}, \\qquad
        b_t = \\frac{a_t}{1-\\beta^t}, \\quad a_t = \\beta a_{t-1} + (1-\\beta)\\,\\bar f_t,

    where :math:`\\bar f_t` is the mean of the step's signal over particles and
    plate elements. The baseline used at step :math:`t` is the one from before the
    step's update, so it is independent of the step's draws and the estimator stays
    unbiased; the division by :math:`1-\\beta^t` removes the start-up bias towards zero.
    Pyro's ``TraceGraph_ELBO`` keeps the same kind of average (``baseline_beta=0.9``)
    without the bias correction.

    Under ``torch.distributed`` (world size > 1) :math:`\\bar f_t` is the mean over
    the whole global batch (one all-reduce of 2 scalars per step,
    :func:`~pyro_wakesleep.distributed.all_reduce_mean`), so every rank holds the same
    state.

    Buffers: ``average`` (:math:`a_t`) and ``weight`` (:math:`1-\\beta^t`).

    :param float beta: decay rate in :math:`[0, 1)`.
    """

    average: Tensor
    weight: Tensor

    def __init__(self, beta: float = 0.9) -> None:
        super().__init__()
        beta = check_real(beta, "MovingAverageBaseline: beta")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"MovingAverageBaseline: beta must lie in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.register_buffer("average", torch.zeros(()))
        self.register_buffer("weight", torch.zeros(()))

    def forward(self, signal: Tensor, context: SiteContext) -> Advantage:
        average, weight = self.average.to(signal), self.weight.to(signal)
        baseline = debiased_average(average, weight)
        if context.update and self.training:
            self.average, self.weight = ema_update(
                average, weight, all_reduce_mean(signal), self.beta
            )
        return Advantage(signal - baseline, zero_loss(signal))

    def extra_repr(self) -> str:
        return f"beta={self.beta}"

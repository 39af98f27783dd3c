"""The leave-one-out (RLOO) baseline over the particles."""

from __future__ import annotations

from torch import Tensor

from pyro_wakesleep.control_variates.base import Advantage, ControlVariate, SiteContext, zero_loss
from pyro_wakesleep.signals import leave_one_out_mean

__all__ = ["LeaveOneOutBaseline"]


class LeaveOneOutBaseline(ControlVariate):
    """Leave-one-out (RLOO) baseline over the particles of each datapoint.

    .. math:: \\hat f_k = f_k - \\frac{1}{K-1}\\sum_{j\\ne k} f_j

    (Kool, van Hoof & Welling, 2019, "Buy 4 REINFORCE samples, get a baseline for
    free!"). Unbiased, stateless, and needs ``num_particles >= 2``.
    """

    min_particles = 2

    def forward(self, signal: Tensor, context: SiteContext) -> Advantage:
        if signal.shape[context.particle_dim] < 2:
            raise ValueError(
                f"LeaveOneOutBaseline at site '{context.site}' needs at least 2 particles, got "
                f"{signal.shape[context.particle_dim]}"
            )
        baseline = leave_one_out_mean(signal, context.particle_dim)
        return Advantage(signal - baseline, zero_loss(signal))

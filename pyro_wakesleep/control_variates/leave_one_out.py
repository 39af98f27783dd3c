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

    Under stochastic control flow a site may appear in only some of the :math:`K`
    particles; the objective then passes the signals of those particles only, and the
    mean is over the others among them. That stays unbiased (the other particles are
    independent of particle :math:`k`'s draws); a site present in a single particle
    gets no baseline.
    """

    min_particles = 2

    def forward(self, signal: Tensor, context: SiteContext) -> Advantage:
        if signal.shape[context.particle_dim] < 2:  # the site is in one particle only
            return Advantage(signal, zero_loss(signal))
        baseline = leave_one_out_mean(signal, context.particle_dim)
        return Advantage(signal - baseline, zero_loss(signal))

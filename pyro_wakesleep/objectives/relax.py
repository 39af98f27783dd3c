"""RELAX: REBAR's structure with a learned surrogate network as the control variate."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

from pyro_wakesleep._validation import check_bool, check_int, check_site_modules
from pyro_wakesleep.objectives.rebar import RebarELBO

__all__ = ["RelaxELBO"]

SurrogateSpec = nn.Module | Mapping[str, nn.Module] | None


def default_surrogate(width: int, hidden: int) -> nn.Module:
    """A one-hidden-layer tanh MLP from a relaxed sample (event flattened to ``width``) to
    one value, its output layer zero so that it starts as no correction."""
    out = nn.Linear(hidden, 1)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), out)


class RelaxELBO(RebarELBO):
    """The ELBO with RELAX gradients for Bernoulli and categorical guide sites
    (Grathwohl, Choi, Wu, Roeder & Duvenaud, 2018, "Backpropagation through the Void:
    Optimizing control variates for black-box gradient estimation").

    The estimator of :class:`~pyro_wakesleep.objectives.RebarELBO` with the control
    variate a learned surrogate of the relaxed sample,

    .. math::

        c(z) = \\eta\\, f(\\sigma_\\lambda(z)) + r_\\psi(\\sigma_\\lambda(z)),

    (``relaxed_signal=True``, the paper's "RELAX + REBAR" default), or
    :math:`c(z) = r_\\psi(\\sigma_\\lambda(z))` alone (``relaxed_signal=False``: no extra
    runs of model and guide, and any model, ``Categorical`` index sites included):

    .. math::

        \\hat g_\\alpha = \\sum_i \\big(f_i(b) - c_i(\\hat z)\\big)
            \\frac{\\partial \\log q(b_i)}{\\partial \\alpha}
            + \\frac{\\partial C(\\tilde z)}{\\partial \\alpha}
            - \\frac{\\partial C(\\hat z)}{\\partial \\alpha},

    with :math:`c_i` the surrogate's value for element :math:`i` of the site's plates
    and :math:`C = \\sum_i r_\\psi + \\eta f_{\\rm total}`. Unbiased for every
    :math:`\\psi, \\lambda, \\eta`, which are trained online by descending the variance
    proxy :math:`\\sum \\|\\hat g_\\alpha\\|^2 / K` (double backward), exactly as
    :class:`~pyro_wakesleep.objectives.RebarELBO` trains :math:`\\lambda, \\eta`.
    The surrogate's parameters are in Pyro's param store as
    ``"<name>.<site>$$$surrogate.<parameter>"`` and in :attr:`control_variates`.

    :param int num_particles: particles :math:`K` per step.
    :param surrogate: :math:`r_\\psi`: a :class:`torch.nn.Module` (each site gets its
        own copy), a mapping from site name to module, or ``None`` for the default, a
        ``hidden``-unit tanh MLP whose output layer starts at zero (its first layer's
        initial weights are drawn from a seed made of the site's name, not from the
        step's random stream, so they are the same in every route). A module is called
        with the relaxed sample, its event flattened into one last dimension (size 1
        for a Bernoulli site without event dims; :math:`C` classes for a categorical
        one), and returns one value per element of the site's batch shape (or that
        shape with a trailing 1).
    :param bool relaxed_signal: include :math:`\\eta f(\\sigma_\\lambda(z))` in :math:`c`.
    :param int hidden: width of the default surrogate's hidden layer.
    :param options: the keywords of :class:`~pyro_wakesleep.objectives.RebarELBO`
        (``temperature``, ``scale``, ``learn``) and of :class:`pyro.infer.ELBO`.
    :raises TypeError: for a surrogate that is not a module (naming the site).
    """

    def __init__(self, num_particles: int = 1, surrogate: SurrogateSpec = None,
                 relaxed_signal: bool = True, hidden: int = 32, **options: Any) -> None:
        super().__init__(num_particles, **options)
        check_site_modules(surrogate, "RelaxELBO", "surrogate")
        self.surrogate = surrogate
        self.relaxed_signal = check_bool(relaxed_signal, "relaxed_signal")
        self.hidden = check_int(hidden, "hidden")

    def _surrogate_net(self, site: str, width: int) -> nn.Module | None:
        if isinstance(self.surrogate, Mapping):
            given = self.surrogate.get(site)
            return copy.deepcopy(given) if given is not None else default_surrogate(
                width, self.hidden)
        if self.surrogate is not None:
            return copy.deepcopy(self.surrogate)
        return default_surrogate(width, self.hidden)

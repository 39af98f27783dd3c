"""VIMCO: the importance-weighted bound with per-sample leave-one-out baselines."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from pyro_wakesleep.objectives._base import Objective
from pyro_wakesleep.objectives._traces import (
    Particles,
    latent_sites,
    log_weights,
)
from pyro_wakesleep.signals import reduce_to_dims, vimco_surrogate

__all__ = ["VimcoELBO"]


class VimcoELBO(Objective):
    """Variational inference for Monte Carlo objectives (Mnih & Rezende, 2016).

    Maximizes the importance-weighted (IWAE) bound of Burda et al. (2016) per element
    :math:`i` of the plates that all sites share (e.g. per datapoint),

    .. math::

        \\hat L_i = \\log \\frac1K \\sum_{k=1}^K w_{k,i}, \\qquad
        w_{k,i} = \\frac{p_\\theta(x_i, z_{k,i})}{q_\\phi(z_{k,i} \\mid x_i)},

    with the gradient (VIMCO's geometric-mean leave-one-out control variate)

    .. math::

        \\nabla_{\\theta,\\phi} \\sum_i \\hat L_i \\approx \\sum_i \\Big[\\sum_{k=1}^K
            \\big(\\hat L_i - \\hat L_{-k,i}\\big)\\, \\nabla_\\phi \\log q_\\phi(z^{\\rm sf}_{k,i})
            + \\sum_{k=1}^K \\tilde w_{k,i}\\, \\nabla_{\\theta,\\phi} \\log w_{k,i}\\Big],

    .. math::

        \\hat L_{-k,i} = \\log \\frac1K \\Big(\\sum_{j\\ne k} w_{j,i}
            + \\exp\\Big(\\frac{1}{K-1}\\sum_{j\\ne k} \\log w_{j,i}\\Big)\\Big), \\qquad
        \\tilde w_{k,i} = \\frac{w_{k,i}}{\\sum_j w_{j,i}},

    where the learning signal and :math:`\\tilde w` are held constant, :math:`\\log
    q_\\phi(z^{\\rm sf}_{k,i})` is the sum of particle :math:`k`'s guide log-densities at
    the sites that are not reparameterizable (the score-function sites) for element
    :math:`i`, and :math:`\\nabla \\log w` is pathwise through the reparameterizable
    sites. With no score-function site this is the IWAE gradient (as
    ``pyro.infer.RenyiELBO(alpha=0)``); unlike that class, discrete guide sites get an
    unbiased gradient.

    ``loss`` is :math:`-s \\sum_i \\hat L_i`, the negative importance-weighted bound
    estimated with :math:`K` particles, where :math:`s` is the plates' subsampling scale.
    In expectation it lies below the negative ELBO and decreases with :math:`K`, so it is
    comparable with the other objectives' losses only as a bound on :math:`-\\log p(x)`.

    Weights are formed per element of the plates that all sample sites are in (see
    :func:`~pyro_wakesleep.objectives._traces.log_weights`): a model whose latents are
    all local to a data plate gets one bound per datapoint and may be subsampled; a
    global latent makes the weights joint over the batch. There is no running state,
    so ``state_dict()`` is empty.

    :param int num_particles: particles :math:`K \\ge 2` per element.
    :param int max_plate_nesting: see :class:`~pyro_wakesleep.objectives.Objective`.
    :param bool vectorize_particles: see :class:`~pyro_wakesleep.objectives.Objective`.
    :param bool retain_graph: see :class:`~pyro_wakesleep.objectives.Objective`.
    :raises ValueError: if ``num_particles < 2``.
    """

    def __init__(
        self,
        num_particles: int = 2,
        *,
        max_plate_nesting: float = math.inf,
        vectorize_particles: bool = True,
        retain_graph: bool | None = None,
    ) -> None:
        super().__init__(num_particles, max_plate_nesting, vectorize_particles, retain_graph)
        if self.num_particles < 2:
            raise ValueError(
                "VimcoELBO needs num_particles >= 2 for its leave-one-out baselines, got "
                f"num_particles={self.num_particles}"
            )

    def _loss_and_surrogate(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, update: bool
    ) -> tuple[Tensor, Tensor]:
        particles = self._particles(model, guide, args, kwargs)
        weights = log_weights(particles)
        value = weights.value
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(
                f"VimcoELBO: {bad} of {value.numel()} log importance weights are not finite; "
                "check the model's log-densities at the guide's draws"
            )
        log_q = _score_log_q(particles, weights.plate_dims, value)
        surrogate = vimco_surrogate(value, log_q, dim=0)
        bound = surrogate.detach()
        scale = weights.scale
        return -scale * bound.sum(), -scale * surrogate.sum()


def _score_log_q(particles: Particles, dims: frozenset[int], like: Tensor) -> Tensor:
    """Per particle and plate element, the sum of the unscaled guide log-densities of the
    non-reparameterizable sites (unmasked: a masked site is still drawn from its
    distribution), reduced to the weights' plate dims; zero where there are none."""
    keep = dims | {-(particles.max_plate_nesting + 1)}
    per_pair = []
    for _, guide_trace in particles.pairs:
        parts = []
        for name in latent_sites(guide_trace):
            node: Mapping[str, Any] = guide_trace.nodes[name]
            if not node["fn"].has_rsample:
                value = particles.canonical(node["unscaled_log_prob"], name)
                parts.append(reduce_to_dims(value, keep))
        base = like.new_zeros((like.shape[0] // len(particles.pairs), *like.shape[1:]))
        per_pair.append(functools.reduce(torch.add, parts, base))
    return torch.cat(per_pair) if len(per_pair) > 1 else per_pair[0]


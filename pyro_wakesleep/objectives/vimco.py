"""VIMCO: the importance-weighted bound with per-sample leave-one-out baselines."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pyro_wakesleep._validation import check_finite
from pyro_wakesleep.objectives.base import Objective
from pyro_wakesleep.particles import Particles, check_finite_sites, log_weights
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
    :func:`~pyro_wakesleep.traces.log_weights`): a model whose latents are
    all local to a data plate gets one bound per datapoint and may be subsampled; a
    global latent makes the weights joint over the batch. There is no running state,
    so ``state_dict()`` is empty.

    :param int num_particles: particles :math:`K \\ge 2` per element.
    :param options: the keywords of :class:`pyro.infer.ELBO` (``max_plate_nesting``,
        ``vectorize_particles``, ``strict_enumeration_warning``, ``retain_graph``, ...),
        with the meaning :class:`~pyro_wakesleep.objectives.Objective` gives them.
    :raises ValueError: if ``num_particles < 2``.
    """

    def __init__(
        self,
        num_particles: int = 2,
        **options: Any,
    ) -> None:
        super().__init__(num_particles, **options)
        if self.num_particles < 2:
            raise ValueError(
                "VimcoELBO needs num_particles >= 2 for its leave-one-out baselines, got "
                f"num_particles={self.num_particles}"
            )

    def loss_and_surrogate(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, update: bool
    ) -> tuple[Tensor, Tensor]:
        particles = self.particles(model, guide, args, kwargs, check_finite=False)
        weights = log_weights(particles)
        check_finite(weights.value, "log importance weights (VimcoELBO)")
        check_finite_sites(particles)
        log_q = score_log_q(particles, weights.plate_dims)
        surrogate = vimco_surrogate(weights.value, log_q, dim=0)
        bound = surrogate.detach()
        scale = weights.scale
        return -scale * bound.sum(), -scale * surrogate.sum()


def score_log_q(particles: Particles, dims: frozenset[int]) -> Tensor:
    """Per particle and element of the plates ``dims``, the sum of the unscaled guide
    log-densities of the non-reparameterizable sites (unmasked: a masked site is still
    drawn from its distribution), in the canonical layout; zero where there are none.

    :param Particles particles: a run of the particles.
    :param frozenset dims: the plate dims to keep (those of
        :func:`~pyro_wakesleep.particles.log_weights`).
    """
    keep = dims | {particles.particle_dim}
    parts = [
        reduce_to_dims(site.score, keep) for site in particles.sites.values()
        if site.score is not None and not site.node["fn"].has_rsample
    ]
    return functools.reduce(torch.add, parts, particles.zeros())

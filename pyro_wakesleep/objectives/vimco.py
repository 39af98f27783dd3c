"""VIMCO: the importance-weighted bound with per-sample leave-one-out baselines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from pyro_wakesleep._replay import (
    hold_guide_constant,
    replay_log_weights,
    score_log_q,
    warn_if_no_pathwise_site,
)
from pyro_wakesleep._validation import check_bool, check_finite
from pyro_wakesleep.enumeration import MARGINAL, refuse_enumeration
from pyro_wakesleep.objectives.base import Objective
from pyro_wakesleep.particles import check_finite_sites, log_weights
from pyro_wakesleep.signals import dreg_vimco_surrogate, vimco_surrogate

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
    :func:`~pyro_wakesleep.particles.log_weights`): a model whose latents are
    all local to a data plate gets one bound per datapoint and may be subsampled; a
    global latent makes the weights joint over the batch. There is no running state,
    so ``state_dict()`` is empty.

    *Doubly reparameterized gradients* (``dreg=True``; Tucker, Lawson, Gu & Maddison,
    2019, *Doubly reparameterized gradient estimators for Monte Carlo objectives*, ICLR).
    The guide's gradient through the reparameterizable sites becomes

    .. math::

        \\nabla_\\phi \\sum_i \\hat L_i \\approx \\sum_i \\Big[\\sum_k
            \\big(\\hat L_i - \\hat L_{-k,i} - \\tilde w_{k,i}\\big)\\,
            \\nabla_\\phi \\log q_\\phi(z^{\\rm sf}_{k,i})
            + \\sum_k \\tilde w_{k,i}^2\\, \\frac{\\partial \\log w_{k,i}}{\\partial z_{k,i}}
            \\frac{\\partial z_{k,i}}{\\partial \\phi}\\Big],

    where :math:`\\partial \\log w/\\partial z \\cdot \\partial z/\\partial\\phi` is the
    derivative through the reparameterized draws only (the guide's log-density
    :math:`\\log q_{\\bot\\phi}(z)` with its parameters held constant, but not the draws
    they depend on), while the model keeps the IWAE gradient
    :math:`\\sum_k \\tilde w_{k,i} \\nabla_\\theta \\log w_{k,i}`. It has the same
    expectation as the standard estimator (the score term
    :math:`-\\tilde w_k \\nabla_\\phi \\log q_\\phi(z_k)|_{z_k}` of the reparameterized sites
    is replaced by its reparameterized form, Tucker et al. eq. 5), and its
    signal-to-noise ratio grows with :math:`K` where IWAE's falls (Rainforth et al.,
    2018). Non-reparameterizable (score-function) sites keep VIMCO's estimator; their
    log-density inside :math:`\\log w` keeps its gradient with weight
    :math:`\\tilde w_k` (including the path through reparameterized draws that their
    parameters depend on), which keeps the mixed estimator unbiased for any order of the
    sites. The score term is found by replaying the guide and the model against the
    same draws held constant (one more run of each per step): this is exact for any
    guide, whatever its distributions (``Independent``, ``TransformedDistribution``,
    autoguides' ``Delta`` sites) and however their parameters depend on earlier draws.
    A guide with no reparameterizable site gets VIMCO's estimator (with a
    :class:`UserWarning`).

    :param int num_particles: particles :math:`K \\ge 2` per element.
    :param bool dreg: use the doubly reparameterized estimator for the guide's
        reparameterizable sites (default ``False``).
    :param options: the keywords of :class:`pyro.infer.ELBO` (``max_plate_nesting``,
        ``vectorize_particles``, ``strict_enumeration_warning``, ``retain_graph``, ...),
        with the meaning :class:`~pyro_wakesleep.objectives.Objective` gives them.
    :raises ValueError: if ``num_particles < 2``.
    :raises TypeError: if ``dreg`` is not a ``bool``.
    """

    enumeration = MARGINAL

    def __init__(
        self,
        num_particles: int = 2,
        *,
        dreg: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(num_particles, **options)
        #: whether the guide's reparameterizable sites get the DReG estimator
        self.dreg: bool = check_bool(dreg, "dreg")
        self._dreg_checked = False
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
        if self.dreg and not self._dreg_checked:
            self._dreg_checked = True
            warn_if_no_pathwise_site(particles, type(self).__name__, "dreg")
        if self.dreg:
            refuse_enumeration(particles, "VimcoELBO(dreg=True)")
            replay = replay_log_weights(particles, model, guide, args, kwargs, weights)
            # gradient of the model's parameters only: log q of the replay held constant
            theta = log_weights(hold_guide_constant(replay.stopped)).value
            # the score-function sites' log q inside log w keeps its whole gradient
            masked = replay.score_q
            surrogate = dreg_vimco_surrogate(
                theta - (masked - masked.detach()), replay.path, log_q, dim=0
            )
        else:
            surrogate = vimco_surrogate(weights.value, log_q, dim=0)
        bound = surrogate.detach()
        scale = weights.scale
        return -scale * bound.sum(), -scale * surrogate.sum()

"""Wake-sleep (Hinton et al., 1995) and reweighted wake-sleep (Bornschein & Bengio, 2015;
Le et al., 2019) as :class:`pyro.infer.ELBO` objectives.

Both build one scalar surrogate whose gradient is the wake gradient for the model's
parameters :math:`\\theta` and the chosen :math:`\\phi` gradient for the guide's. The two
groups are told apart by which program registers them (``param`` sites in the model's
or the guide's trace; one registered by both is a ``ValueError``). The guide's draws are
detached, the dreams are drawn without gradients, and each term of the surrogate
depends on one group only, so a single ``backward`` gives each group its own gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pyro_wakesleep._replay import Replay, replay_log_weights, warn_if_no_pathwise_site
from pyro_wakesleep._validation import check_bool, check_int, check_real
from pyro_wakesleep.enumeration import MARGINAL, refuse_enumeration
from pyro_wakesleep.objectives._dreams import (
    DreamArgs,
    check_param_owners,
    dream,
    sleep_log_q,
)
from pyro_wakesleep.objectives.base import Objective
from pyro_wakesleep.particles import Particles, log_guide, log_joint, log_weights
from pyro_wakesleep.signals import dreg_wake_phi_surrogate, iwae_bound, self_normalized_weights

__all__ = ["ReweightedWakeSleepELBO", "WakeSleepELBO"]


class _WakeSleep(Objective):
    """Shared machinery: constructor checks, the sleep phase, the phase losses."""

    def __init__(
        self, num_particles: int, num_sleep_particles: int | None, dream_args: DreamArgs | None,
        **options: Any,
    ) -> None:
        super().__init__(num_particles, **options)
        if num_sleep_particles is None:
            num_sleep_particles = self.num_particles
        if dream_args is not None and not callable(dream_args):
            raise TypeError(f"dream_args must be callable or None, got {dream_args!r}")
        self.num_sleep_particles = check_int(num_sleep_particles, "num_sleep_particles")
        self.dream_args = dream_args
        self._phase_losses: dict[str, Tensor] = {}

    def _uses_vectorization(self) -> bool:
        return self.vectorize_particles and max(self.num_particles, self.num_sleep_particles) > 1

    def _outputs(self) -> dict[str, Tensor]:
        return dict(self._phase_losses)

    def _set_outputs(self, outputs: dict[str, Tensor]) -> None:
        self._phase_losses = dict(outputs)

    @property
    def last_phase_losses(self) -> dict[str, float]:
        """The separate phase losses of the last call (``loss``, ``differentiable_loss``
        or ``loss_and_grads``), as floats: ``"wake_theta"``, ``"wake_phi"`` and
        ``"sleep_phi"`` for those the objective computed (see the class docstring)."""
        return {name: float(value) for name, value in self._phase_losses.items()}

    def _wake(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Particles:
        particles = self.particles(model, guide, args, kwargs, detach_guide=True)
        check_param_owners(*particles.traces[0])
        return particles

    def _sleep(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Tensor:
        """The sleep-phi loss :math:`-\\frac1S\\sum_s \\log q_\\phi(z'_s \\mid x'_s)` on
        ``S`` dreams :math:`(z'_s, x'_s) \\sim p_\\theta`."""
        num = self.num_sleep_particles
        vectorize = self.vectorize_particles and num > 1
        self._know_plate_nesting(model, guide, args, kwargs, vectorize)
        nesting = self.max_plate_nesting
        total: Tensor | float = 0.0
        for trace in dream(model, args, kwargs, num, vectorize, nesting):
            total = total + sleep_log_q(
                guide, trace, args, kwargs, num if vectorize else 1, nesting, self.dream_args
            )
        return -torch.as_tensor(total) / num


class WakeSleepELBO(_WakeSleep):
    """The wake-sleep algorithm of the Helmholtz machine (Hinton et al., 1995).

    *Wake phase*: draw :math:`z_k \\sim q_\\phi(z \\mid x)` for the observed :math:`x`
    (detached: no gradient reaches the guide through the draws) and raise
    :math:`\\log p_\\theta(x, z_k)`. *Sleep phase*: dream
    :math:`(z'_s, x'_s) \\sim p_\\theta(z, x)` from the model and raise
    :math:`\\log q_\\phi(z'_s \\mid x'_s)`, i.e. lower :math:`\\mathrm{KL}(p\\,\\|\\,q)`
    in expectation over the model. The gradient of :meth:`differentiable_loss` is

    .. math::

        \\nabla_\\theta: \\; -\\frac1K \\sum_{k=1}^K \\nabla_\\theta
            \\log p_\\theta(x, z_k), \\qquad
        \\nabla_\\phi: \\; -\\frac1S \\sum_{s=1}^S \\nabla_\\phi
            \\log q_\\phi(z'_s \\mid x'_s),

    each log-density summed over its sites and scaled by any subsampling (so both are
    unbiased for the full data set). ``loss`` is :math:`-\\hat{\\mathcal L}`, the
    negative ELBO estimated by the :math:`K` wake particles,
    :math:`-\\frac1K\\sum_k [\\log p_\\theta(x, z_k) - \\log q_\\phi(z_k \\mid x)]`,
    comparable with every objective here that reports a negative ELBO or negative
    importance-weighted bound. :attr:`last_phase_losses` holds ``"wake_theta"``
    (:math:`-\\frac1K\\sum_k \\log p_\\theta(x, z_k)`) and ``"sleep_phi"``.

    *Dreams and amortized guides*: the model runs under
    :func:`pyro.poutine.uncondition` with the caller's arguments (which fix the batch
    shape). If an argument of the guide (or an element of a tuple, list or dict argument)
    is the very tensor the model observes at a site, the guide receives the dream in its
    place; the caller's arguments are never modified. Otherwise pass ``dream_args``. With
    ``num_sleep_particles > 1`` and vectorized particles the dreams carry a leading
    particle dimension, over which the guide must broadcast.

    :param int num_particles: wake particles :math:`K`.
    :param int num_sleep_particles: dreams :math:`S` per step (``None``: :math:`K`).
    :param callable dream_args: ``dream_args(dreams, args, kwargs) -> (args, kwargs)``,
        the guide's arguments for a dream, given the dreamed observations ``dreams``
        (a dict from observed site name to dreamed value) and the caller's arguments
        (a copy of ``kwargs``; do not modify ``args``' contents). ``None``: replace the
        observed tensors automatically, or raise ``ValueError`` naming the observed
        site(s) if the guide receives none of them.
    :param options: the keywords of :class:`pyro.infer.ELBO` (``max_plate_nesting``,
        ``vectorize_particles`` -- which here vectorizes dreams too --, ``retain_graph``,
        ...), with the meaning :class:`~pyro_wakesleep.objectives.Objective` gives them.

    References: Hinton, Dayan, Frey & Neal (1995), *The "wake-sleep" algorithm for
    unsupervised neural networks*, Science 268.
    """

    def __init__(
        self,
        num_particles: int = 1,
        num_sleep_particles: int | None = None,
        *,
        dream_args: DreamArgs | None = None,
        **options: Any,
    ) -> None:
        super().__init__(num_particles, num_sleep_particles, dream_args, **options)

    def loss_and_surrogate(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, update: bool
    ) -> tuple[Tensor, Tensor]:
        particles = self._wake(model, guide, args, kwargs)
        k = self.num_particles
        wake_theta = -log_joint(particles) / k
        sleep_phi = self._sleep(model, guide, args, kwargs)
        self._phase_losses = {"wake_theta": wake_theta.detach(), "sleep_phi": sleep_phi.detach()}
        loss = wake_theta.detach() + log_guide(particles).detach() / k
        return loss, wake_theta + sleep_phi


class ReweightedWakeSleepELBO(_WakeSleep):
    """Reweighted wake-sleep (Bornschein & Bengio, 2015; Le et al., 2019).

    With :math:`K \\ge 2` draws :math:`z_{ik} \\sim q_\\phi(z \\mid x_i)` per datapoint
    and log-weights :math:`\\log w_{ik} = \\log p_\\theta(x_i, z_{ik}) -
    \\log q_\\phi(z_{ik} \\mid x_i)`, formed per element of the plates that every site is
    in (e.g. per datapoint for latents local to the data plate; jointly otherwise),
    self-normalized weights :math:`\\tilde w_{ik} = w_{ik}/\\sum_j w_{ij}` and the
    subsampling scale :math:`c` (:math:`N/B` for a mini-batch of :math:`B` out of
    :math:`N`), the gradient of :meth:`differentiable_loss` is

    .. math::

        \\nabla_\\theta: \\; -c\\sum_i \\nabla_\\theta \\log \\frac1K \\sum_k w_{ik}
            = -c\\sum_i \\sum_k \\tilde w_{ik} \\nabla_\\theta \\log p_\\theta(x_i, z_{ik})
            \\quad\\text{(wake-}\\theta\\text{)},

        \\nabla_\\phi: \\; -\\alpha\\, c \\sum_i \\sum_k \\tilde w_{ik} \\nabla_\\phi
            \\log q_\\phi(z_{ik} \\mid x_i)
            \\;-\\; (1-\\alpha) \\frac1S \\sum_{s=1}^S \\nabla_\\phi
            \\log q_\\phi(z'_s \\mid x'_s),

    the wake-:math:`\\phi` term being the self-normalized estimate of
    :math:`\\nabla_\\phi \\mathrm{KL}(p_\\theta(z\\mid x)\\,\\|\\,q_\\phi(z \\mid x))`
    and the sleep-:math:`\\phi` term that of :class:`WakeSleepELBO` on :math:`S`
    dreams :math:`(z'_s, x'_s) \\sim p_\\theta`; :math:`\\alpha` is ``insomnia``
    (Pyro's name; :math:`\\alpha = 1`, pure wake-:math:`\\phi`, works best in Le et al.).
    Unlike :class:`pyro.infer.ReweightedWakeSleep`, weights are formed per datapoint,
    so the estimator is right for mini-batches and batches of many datapoints.

    ``loss`` is :math:`-c\\sum_i \\log\\frac1K\\sum_k w_{ik}`, the negative
    importance-weighted (IWAE) bound estimated by the particles, in nats and scaled to
    the full data like the negative ELBO that :class:`WakeSleepELBO` and the other
    objectives report (it would equal it at :math:`K = 1`, and is tighter for larger K).
    :attr:`last_phase_losses` holds ``"wake_theta"`` (the same value), ``"wake_phi"``
    (:math:`-c\\sum_i\\sum_k \\tilde w_{ik} \\log q_\\phi(z_{ik}\\mid x_i)`) and, when
    :math:`\\alpha < 1`, ``"sleep_phi"``.

    *Doubly reparameterized wake-phi* (``dreg=True``; Tucker, Lawson, Gu & Maddison,
    2019, section 5): at the guide's reparameterizable sites the wake-:math:`\\phi`
    gradient's score term is replaced by its reparameterized form,

    .. math::

        \\nabla_\\phi: \\; -\\alpha\\, c \\sum_i \\Big[\\sum_k
            \\big(\\tilde w_{ik} - \\tilde w_{ik}^2\\big)
            \\frac{\\partial \\log w_{ik}}{\\partial z_{ik}}
            \\frac{\\partial z_{ik}}{\\partial \\phi}
            + \\sum_k \\tilde w_{ik}\\, \\nabla_\\phi \\log q_\\phi(z^{\\rm sf}_{ik} \\mid x_i)
            \\Big],

    the derivative :math:`\\partial \\log w/\\partial z \\cdot \\partial z/\\partial\\phi`
    going through the reparameterized draws only (with :math:`q`'s parameters held
    constant), and :math:`z^{\\rm sf}` the non-reparameterizable sites, whose
    log-density keeps the path through reparameterized draws its parameters depend on.
    It has the wake-:math:`\\phi` gradient's expectation and a lower variance. The guide's
    draws are then pathwise, and the model and guide are replayed against them held
    constant for the other terms (one more run of each per step; see
    :class:`~pyro_wakesleep.objectives.VimcoELBO`); wake-:math:`\\theta`, sleep-:math:`\\phi`,
    ``loss`` and :attr:`last_phase_losses` are unchanged. A guide with no
    reparameterizable site gets the standard estimator (with a :class:`UserWarning`).

    The positional parameters are those of :class:`pyro.infer.ReweightedWakeSleep`, in
    its order, so that changing the class name is the whole swap.

    :param int num_particles: particles :math:`K \\ge 2` per datapoint.
    :param float insomnia: the weight :math:`\\alpha \\in [0, 1]` of wake-:math:`\\phi`
        against sleep-:math:`\\phi` (1: wake-:math:`\\phi` only, no dreams).
    :param bool model_has_params: accepted for Pyro's signature, no effect: which
        parameters belong to the model is read off the traces.
    :param int num_sleep_particles: dreams :math:`S` per step (``None``: :math:`K`).
    :param bool vectorize_particles: draw particles and dreams in one vectorized pass.
    :param int max_plate_nesting: see :class:`~pyro_wakesleep.objectives.Objective`.
    :param bool strict_enumeration_warning: see
        :class:`~pyro_wakesleep.objectives.Objective`.
    :param callable dream_args: how to feed dreams to the guide; see
        :class:`WakeSleepELBO`.
    :param bool dreg: the doubly reparameterized wake-:math:`\\phi` estimator at the
        reparameterizable guide sites (default ``False``).
    :param options: the other keywords of :class:`pyro.infer.ELBO` (``retain_graph``,
        ...), with the meaning :class:`~pyro_wakesleep.objectives.Objective` gives them.

    References: Bornschein & Bengio (2015), *Reweighted wake-sleep*, ICLR; Le, Kosiorek,
    Siddharth, Teh & Wood (2019), *Revisiting reweighted wake-sleep for models with
    stochastic control flow*, UAI.
    """

    enumeration = MARGINAL

    def __init__(
        self,
        num_particles: int = 2,
        insomnia: float = 1.0,
        model_has_params: bool = True,
        num_sleep_particles: int | None = None,
        vectorize_particles: bool = True,
        max_plate_nesting: float = math.inf,
        strict_enumeration_warning: bool = True,
        *,
        dream_args: DreamArgs | None = None,
        dreg: bool = False,
        **options: Any,
    ) -> None:
        #: whether wake-phi uses the doubly reparameterized estimator
        self.dreg: bool = check_bool(dreg, "dreg")
        self._dreg_checked = False
        super().__init__(
            num_particles, num_sleep_particles, dream_args,
            vectorize_particles=vectorize_particles, max_plate_nesting=max_plate_nesting,
            strict_enumeration_warning=strict_enumeration_warning, **options,
        )
        #: accepted for :class:`pyro.infer.ReweightedWakeSleep`'s signature; no effect
        self.model_has_params = check_bool(model_has_params, "model_has_params")
        if self.num_particles < 2:
            raise ValueError(
                f"reweighted wake-sleep needs num_particles >= 2 to self-normalize "
                f"importance weights, got {self.num_particles}"
            )
        self.insomnia = check_real(
            insomnia, "insomnia", 0.0, 1.0, " (the wake-phi weight of the mixture with sleep-phi)"
        )

    def loss_and_surrogate(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, update: bool
    ) -> tuple[Tensor, Tensor]:
        replay: Replay | None = None
        if self.dreg and self.insomnia > 0:
            pathwise = self.particles(model, guide, args, kwargs)
            refuse_enumeration(pathwise, "ReweightedWakeSleepELBO(dreg=True)")
            check_param_owners(*pathwise.traces[0])
            if not self._dreg_checked:
                self._dreg_checked = True
                warn_if_no_pathwise_site(pathwise, type(self).__name__, "dreg")
            replay = replay_log_weights(pathwise, model, guide, args, kwargs)
            # the draws held constant: the same tensors the detached wake run gives
            particles = replay.stopped
        else:
            particles = self._wake(model, guide, args, kwargs)
        with torch.no_grad():  # the weights enter the surrogate only as constants
            weights = log_weights(particles)
        log_w = weights.value
        normalized = self_normalized_weights(log_w, dim=0)
        bound = iwae_bound(log_w, dim=0).sum() * weights.scale
        # sum_i sum_k w_ik * (scaled) log-density of each site
        theta = -log_joint(particles, weights=normalized)
        phi = -log_guide(particles, weights=normalized)
        self._phase_losses = {"wake_theta": -bound, "wake_phi": phi.detach()}
        if replay is not None:
            dreg = dreg_wake_phi_surrogate(log_w, replay.path, replay.score_q, dim=0)
            phi = phi.detach() - replay.weights.scale * dreg.sum()
        surrogate = theta
        if self.insomnia > 0:
            surrogate = surrogate + self.insomnia * phi
        if self.insomnia < 1:
            sleep_phi = self._sleep(model, guide, args, kwargs)
            self._phase_losses["sleep_phi"] = sleep_phi.detach()
            surrogate = surrogate + (1.0 - self.insomnia) * sleep_phi
        return -bound, surrogate


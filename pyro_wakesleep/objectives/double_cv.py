"""Double control variates: leave-one-out plus a local Taylor-expansion control variate
for Bernoulli guide sites."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from pyro_wakesleep.control_variates import ControlVariate
from pyro_wakesleep.objectives._gradient_informed import GradientInformedELBO, SiteDraws
from pyro_wakesleep.stein import double_cv_gradient

__all__ = ["DoubleControlVariateELBO"]


class _TaylorCoefficient(ControlVariate):
    """A site's learned coefficient :math:`\\alpha` (parameter ``alpha``). Not a
    learning-signal transform: the objective reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(()))


class DoubleControlVariateELBO(GradientInformedELBO):
    """The ELBO with double control variates for Bernoulli guide sites (Titsias & Shi,
    2022, "Double Control Variates for Gradient Estimation in Discrete Latent Variable
    Models", AISTATS): a leave-one-out *global* baseline over :math:`K \\ge 2`
    independent draws and a *local* control variate, the first-order Taylor expansion
    of the learning signal around the other draws.

    For a Bernoulli guide site with logits :math:`\\eta_k` (:math:`\\theta_k =
    \\sigma(\\eta_k)`) in particle :math:`k`, draw :math:`x_k`, learning signal :math:`f_k`
    (the cost terms :math:`\\log p - \\log q` downstream of the site, per element of its
    plates, as for :class:`~pyro_wakesleep.objectives.ScoreFunctionELBO`) and
    :math:`g_k = \\nabla_{x_k} (\\log p - \\log q)` (the run's ELBO differentiated with
    respect to the draw as a real number, later draws held fixed: one backward pass,
    no further run of model or guide), the estimate of
    :math:`\\partial \\mathcal L / \\partial \\eta_k` is
    (:func:`~pyro_wakesleep.stein.double_cv_gradient`)

    .. math::

        \\hat g_k = \\Big(f_k + \\alpha c_k - \\frac{1}{K - 1}\\sum_{j \\ne k}
            (f_j + \\alpha c_j)\\Big)(x_k - \\theta_k)
            - \\alpha\\, \\bar g_{-k} \\odot \\theta_k (1 - \\theta_k),
        \\qquad c_k = \\bar g_{-k} \\cdot (x_k - \\theta_k),

    with :math:`\\bar g_{-k}` the mean of the other draws' :math:`g_j`, entering the
    gradient as :math:`\\frac1K \\sum_k \\hat g_k \\nabla_\\phi \\eta_k`. It is unbiased for
    every :math:`\\alpha`. :math:`\\alpha` (one per site, initially 0) is trained with the
    model by descending :math:`\\sum (\\frac1K \\sum_k \\hat g_k)^2`, the estimate's
    second moment (its mean does not depend on :math:`\\alpha`), which the surrogate loss
    carries for it alone: :class:`pyro.infer.SVI` and ``objective(model, guide)`` train
    it like any parameter (the paper's code: Adam, :math:`10^{-3}`). It lives in
    :attr:`control_variates` (saved by :meth:`state_dict`) and in Pyro's param store as
    ``"<name>.<site>$$$alpha"``.

    Reparameterizable sites keep their pathwise gradients; the model's parameters get the
    ordinary gradient of :math:`\\log p` averaged over the particles. ``loss`` is the
    negative ELBO of the :math:`K` draws. Under stochastic control flow a site present in
    only some particles gets the leave-one-out over those (unbiased; a site of one
    particle gets no baseline). The model must evaluate the Bernoulli draws as tensors
    (a draw read into Python, e.g. by ``.item()``, contributes no gradient there: still
    unbiased). ``jit=True`` runs eagerly, with one :class:`RuntimeWarning`: the step
    differentiates inside itself.

    :param int num_particles: the draws :math:`K \\ge 2` per step (:math:`K` evaluations).
    :param bool learn: train :math:`\\alpha` online (else it stays at its value).
    :param options: the keywords of :class:`pyro.infer.ELBO` (``max_plate_nesting``,
        ``vectorize_particles``, ``name``, ``jit``, ...), with the meaning
        :class:`~pyro_wakesleep.objectives.Objective` gives them.
    :raises ValueError: for ``num_particles < 2``; at a step, for a guide site that is
        neither Bernoulli nor reparameterizable (naming it).
    """

    def __init__(self, num_particles: int = 2, learn: bool = True, **options: Any) -> None:
        super().__init__(num_particles, learn, **options)

    def _new_state(self, site: str) -> ControlVariate:
        return _TaylorCoefficient()

    def _estimate(self, state: ControlVariate, draws: SiteDraws) -> Tensor:
        alpha = cast(_TaylorCoefficient, state).alpha
        return double_cv_gradient(draws.f, draws.grads, draws.values, draws.probs, alpha)

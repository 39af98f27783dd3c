"""RODEO: leave-one-out with control variates from the discrete Stein operator of the
guide's Gibbs chain, for Bernoulli guide sites."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from pyro_wakesleep._validation import check_int, check_site_modules
from pyro_wakesleep.control_variates import ControlVariate
from pyro_wakesleep.objectives._gradient_informed import (
    GradientInformedELBO,
    SiteDraws,
    default_network,
    seeded,
)
from pyro_wakesleep.stein import rodeo_gradient

__all__ = ["RodeoELBO"]

NetworkSpec = nn.Module | Mapping[str, nn.Module] | None


class _SteinControl(ControlVariate):
    """A site's learned Stein control variate: ``alpha``, ``beta`` and ``network``
    (:math:`H_\\psi`). Not a learning-signal transform: the objective reads it."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(()))
        self.beta = nn.Parameter(torch.zeros(()))
        self.network = network


class RodeoELBO(GradientInformedELBO):
    """The ELBO with RODEO gradients for Bernoulli guide sites (Shi, Zhou, Hwang, Titsias
    & Mackey, 2022, "Gradient Estimation with Discrete Stein Operators", NeurIPS):
    leave-one-out over :math:`K \\ge 2` independent draws with two control variates
    from the discrete Stein operator of a Markov chain on the guide, both of a function
    learned online, and no further evaluation of the model.

    The chain is the guide's Gibbs sampler: pick a unit :math:`i` of the site uniformly
    and redraw it, which flips it with probability :math:`w_i(x) = q(1 - x_i)`. Its
    Stein operator :math:`(\\mathcal A h)(x) = \\frac1D \\sum_i w_i(x) (h(x^{(i)}) -
    h(x))`, with :math:`x^{(i)}` the draw with unit :math:`i` flipped, has mean zero under
    the guide for any :math:`h` (:mod:`pyro_wakesleep.stein`). For a Bernoulli site with
    logits :math:`\\eta_k` (:math:`\\theta_k = \\sigma(\\eta_k)`), draws :math:`x_k`,
    learning signals :math:`f_k` (the cost terms downstream of the site per element of
    its plates, as for :class:`~pyro_wakesleep.objectives.ScoreFunctionELBO`) and
    :math:`g_k = \\nabla_{x_k} (\\log p - \\log q)` (one backward pass of the run's ELBO
    with respect to the draws as real numbers), the estimate of
    :math:`\\partial \\mathcal L / \\partial \\eta_k` is
    (:func:`~pyro_wakesleep.stein.rodeo_gradient`)

    .. math::

        \\hat g_k = \\Big(f_k - \\frac{1}{K - 1}\\sum_{j \\ne k}
                \\big(f_j + \\alpha\\, (\\mathcal A h_{0,j})(x_j)\\big)\\Big)(x_k - \\theta_k)
            + \\beta\\, \\big(\\mathcal A [h_{1,k} (\\cdot - \\theta_k)]\\big)(x_k),

    .. math::

        (h_{0,k}, h_{1,k})(y) = \\frac{1}{K - 1} \\sum_{j \\ne k}
            H_\\psi\\big(g_j \\cdot (y - x_j),\\; f_j\\big),

    entering the gradient as :math:`\\frac1K \\sum_k \\hat g_k \\nabla_\\phi \\eta_k`.
    :math:`H_\\psi: \\mathbb R^2 \\to \\mathbb R^2` sees the other draws' first-order
    expansions of :math:`f` at :math:`y` (the paper's "output average"; for :math:`K = 2`
    its "average"), so :math:`h_{\\cdot,k}` does not depend on draw :math:`k`, the first
    control variate (inside the baseline) and the second (on the gradient) have mean zero
    given the other draws, and the estimate is unbiased for every :math:`\\psi, \\alpha,
    \\beta`. Its cost beyond leave-one-out: one backward pass for :math:`g` and
    :math:`H_\\psi` at :math:`K (K - 1)(D + 1)` points per plate element.

    **Learned state.** Per site, :math:`\\alpha, \\beta` (initially 0) and
    :math:`H_\\psi` (default: the authors' one hidden layer of ``hidden`` units,
    LeakyReLU(0.3), its initial weights drawn from a seed made of the site's name), trained
    with the model by descending :math:`\\sum (\\frac1K \\sum_k \\hat g_k)^2`, the
    estimate's second moment, whose gradient with respect to them is that of its variance
    (the paper's code: Adam, :math:`10^{-3}`). The surrogate loss carries that gradient
    for them alone, so :class:`pyro.infer.SVI` and ``objective(model, guide)`` train them
    like any parameter. They live in :attr:`control_variates` (saved by
    :meth:`state_dict`) and in Pyro's param store as ``"<name>.<site>$$$alpha"``,
    ``"<name>.<site>$$$beta"`` and ``"<name>.<site>$$$network.<parameter>"``.

    Reparameterizable sites keep their pathwise gradients; the model's parameters get the
    ordinary gradient of :math:`\\log p`. ``loss`` is the negative ELBO of the :math:`K`
    draws. Under stochastic control flow a site present in only some particles gets the
    estimate over those (one particle: no baseline, no control variate). The model must
    evaluate the Bernoulli draws as tensors (a draw read into Python contributes no
    gradient there: still unbiased). ``jit=True`` runs eagerly, with one
    :class:`RuntimeWarning`: the step differentiates inside itself.

    :param int num_particles: the draws :math:`K \\ge 2` per step (:math:`K` evaluations).
    :param network: :math:`H_\\psi`, a module mapping ``(..., 2)`` to ``(..., 2)`` (each
        site gets its own copy), a mapping from site name to module, or ``None`` for the
        default.
    :param int hidden: hidden units of the default network (100, as in the paper's code).
    :param bool learn: train :math:`\\psi, \\alpha, \\beta` online.
    :param options: the keywords of :class:`pyro.infer.ELBO` (``max_plate_nesting``,
        ``vectorize_particles``, ``name``, ``jit``, ...), with the meaning
        :class:`~pyro_wakesleep.objectives.Objective` gives them.
    :raises TypeError: for a network that is not a module (naming the site).
    :raises ValueError: for ``num_particles < 2``; at a step, for a guide site that is
        neither Bernoulli nor reparameterizable (naming it), or a network whose output
        is not ``(..., 2)``.
    """

    def __init__(self, num_particles: int = 2, network: NetworkSpec = None, hidden: int = 100,
                 learn: bool = True, **options: Any) -> None:
        super().__init__(num_particles, learn, **options)
        check_site_modules(network, "RodeoELBO", "network")
        self.network = network
        self.hidden = check_int(hidden, "hidden")

    def _new_state(self, site: str) -> ControlVariate:
        given = self.network.get(site) if isinstance(self.network, Mapping) else self.network
        net = copy.deepcopy(given) if given is not None else seeded(
            site, lambda: default_network(self.hidden))
        return _SteinControl(net)

    def _estimate(self, state: ControlVariate, draws: SiteDraws) -> Tensor:
        state = cast(_SteinControl, state)

        def network(x: Tensor) -> Tensor:
            out = state.network(x)
            if out.shape != x.shape:
                raise ValueError(f"RodeoELBO: the network returned shape {tuple(out.shape)} "
                                 f"for input shape {tuple(x.shape)}; it must map (..., 2) "
                                 "to (..., 2)")
            return out

        return rodeo_gradient(draws.f, draws.grads, draws.values, draws.probs, network,
                              state.alpha, state.beta)

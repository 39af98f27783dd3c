"""Pure tensor math of the antithetic gradient estimators for binary latents.

ARM (Yin & Zhou, 2019) and DisARM (Dong, Mnih & Tucker, 2020) estimate the gradient of
:math:`\\mathbb E_{b \\sim \\mathrm{Bern}(\\sigma(\\alpha))}[f(b)]` with respect to the
logits :math:`\\alpha` from two *antithetic* draws sharing one uniform noise
:math:`u \\sim \\mathcal U(0, 1)^D`:

.. math::

    b = \\mathbb 1[u < \\sigma(\\alpha)], \\qquad
    \\tilde b = \\mathbb 1[1 - u < \\sigma(\\alpha)] = \\mathbb 1[u > \\sigma(-\\alpha)].

Both are draws from :math:`\\mathrm{Bern}(\\sigma(\\alpha))`. The categorical extension
(:func:`stick_breaking_logits`) writes a categorical draw as a chain of binary decisions
"is :math:`z = j` given :math:`z \\ge j`" and applies the binary estimators to each.

Nothing here knows about Pyro: :class:`~pyro_wakesleep.objectives.disarm.DisarmELBO`
turns traces into these tensors. ``f`` and ``f_anti`` may have fewer (broadcastable)
dimensions than the draws, e.g. one value per datapoint for a layer of units.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "antithetic_value",
    "arm_gradient",
    "conditional_uniform",
    "disarm_gradient",
    "stick_breaking_logits",
    "stick_breaking_noise",
    "stick_breaking_value",
]


def conditional_uniform(value: Tensor, logits: Tensor) -> Tensor:
    """Uniform noise consistent with a Bernoulli draw that has already been made.

    Given :math:`b \\sim \\mathrm{Bern}(\\sigma(\\alpha))`, draws
    :math:`u \\mid b` so that :math:`u \\sim \\mathcal U(0, 1)` and
    :math:`b = \\mathbb 1[u < \\sigma(\\alpha)]`:

    .. math::

        u \\mid b = 1 \\sim \\mathcal U(0, \\sigma(\\alpha)), \\qquad
        u \\mid b = 0 \\sim \\mathcal U(\\sigma(\\alpha), 1).

    The joint law of :math:`(u, b)` is then exactly that of the estimators' construction,
    so an estimator may let any sampler draw :math:`b` and recover the noise afterwards.

    :param torch.Tensor value: the draw :math:`b`, entries 0 or 1.
    :param torch.Tensor logits: :math:`\\alpha`, broadcastable to ``value``.
    :return: :math:`u`, the broadcast shape of ``value`` and ``logits``.
    """
    logits = logits.detach()
    value, logits = torch.broadcast_tensors(value.detach().to(logits), logits)
    r = torch.rand_like(logits)
    prob = torch.sigmoid(logits)
    return torch.where(value > 0.5, prob * r, prob + torch.sigmoid(-logits) * r)


def antithetic_value(u: Tensor, logits: Tensor) -> Tensor:
    """The antithetic draw :math:`\\tilde b = \\mathbb 1[1 - u < \\sigma(\\alpha)]`.

    :param torch.Tensor u: the uniform noise of the draw :math:`b`.
    :param torch.Tensor logits: :math:`\\alpha`.
    :return: :math:`\\tilde b` as a float tensor of 0s and 1s (the dtype of ``logits``).
    """
    logits = logits.detach()
    return (1.0 - u < torch.sigmoid(logits)).to(logits.dtype)


def disarm_gradient(
    f: Tensor, f_anti: Tensor, value: Tensor, anti_value: Tensor, logits: Tensor
) -> Tensor:
    """The DisARM estimate of :math:`\\nabla_\\alpha \\mathbb E[f(b)]` (Dong, Mnih & Tucker,
    2020, "DisARM: An Antithetic Gradient Estimator for Binary Latent Variables", eq. 7):

    .. math::

        \\hat g_i = \\tfrac12 \\big(f(b) - f(\\tilde b)\\big)\\,
            (-1)^{\\tilde b_i}\\, \\mathbb 1[b_i \\ne \\tilde b_i]\\, \\sigma(|\\alpha_i|).

    It is ARM (:func:`arm_gradient`) with the noise integrated out given the pair
    :math:`(b_i, \\tilde b_i)`, hence unbiased with variance at most ARM's.

    :param torch.Tensor f: :math:`f(b)`, broadcastable to ``value``.
    :param torch.Tensor f_anti: :math:`f(\\tilde b)`, broadcastable to ``value``.
    :param torch.Tensor value: :math:`b`.
    :param torch.Tensor anti_value: :math:`\\tilde b`.
    :param torch.Tensor logits: :math:`\\alpha`.
    :return: :math:`\\hat g`, detached, one entry per entry of ``value``.
    """
    logits = logits.detach()
    differ = (value != anti_value).to(logits.dtype)
    sign = 1.0 - 2.0 * anti_value.to(logits.dtype)
    weight = sign * differ * torch.sigmoid(logits.abs())
    return (0.5 * (f - f_anti)).detach() * weight


def arm_gradient(f: Tensor, f_anti: Tensor, u: Tensor) -> Tensor:
    """The ARM estimate of :math:`\\nabla_\\alpha \\mathbb E[f(b)]` (Yin & Zhou, 2019,
    "ARM: Augment-REINFORCE-Merge Gradient for Stochastic Binary Networks"):

    .. math:: \\hat g_i = \\big(f(\\tilde b) - f(b)\\big)\\,\\big(u_i - \\tfrac12\\big),

    with :math:`b, \\tilde b` built from :math:`u` as in the module docstring.

    :param torch.Tensor f: :math:`f(b)`, broadcastable to ``u``.
    :param torch.Tensor f_anti: :math:`f(\\tilde b)`, broadcastable to ``u``.
    :param torch.Tensor u: the shared uniform noise.
    :return: :math:`\\hat g`, detached, one entry per entry of ``u``.
    """
    return (f_anti - f).detach() * (u - 0.5)


def stick_breaking_logits(logits: Tensor) -> Tensor:
    """Logits of the binary decisions of a categorical draw written as a chain.

    A draw :math:`z` from :math:`\\mathrm{Cat}(\\mathrm{softmax}(\\ell))` over
    :math:`C` classes is the first :math:`j` with :math:`c_j = 1`, where
    :math:`c_j \\sim \\mathrm{Bern}(\\sigma(\\alpha_j))` is the decision "is
    :math:`z = j` given :math:`z \\ge j`" (:math:`c_{C-1} = 1`):

    .. math::

        \\alpha_j = \\ell_j - \\log \\sum_{k > j} e^{\\ell_k}, \\qquad j = 0, \\ldots, C-2.

    :param torch.Tensor logits: :math:`\\ell`, classes in the last dimension
        (unnormalized log-probabilities).
    :return: :math:`\\alpha`, shape ``logits.shape[:-1] + (C - 1,)``; differentiable.
    :raises ValueError: if there are fewer than 2 classes.
    """
    classes = logits.shape[-1]
    if classes < 2:
        raise ValueError(f"a categorical needs at least 2 classes, got {classes}")
    # tail[..., j] = logsumexp(logits[..., j:])
    tail = torch.logcumsumexp(logits.flip(-1), dim=-1).flip(-1)
    return logits[..., :-1] - tail[..., 1:]


def stick_breaking_value(u: Tensor, logits: Tensor) -> Tensor:
    """The categorical draw made by the chain of binary decisions
    :math:`c_j = \\mathbb 1[u_j < \\sigma(\\alpha_j)]`: the first :math:`j` with
    :math:`c_j = 1`, or :math:`C - 1` if there is none. With :math:`u \\sim \\mathcal
    U(0, 1)^{C-1}` it is a draw from :math:`\\mathrm{Cat}(\\mathrm{softmax}(\\ell))`, and
    ``stick_breaking_value(1 - u, logits)`` is its antithetic draw.

    :param torch.Tensor u: noise, shape ``logits.shape[:-1] + (C - 1,)``.
    :param torch.Tensor logits: :math:`\\ell`, classes in the last dimension.
    :return: class indices (``torch.long``), shape ``logits.shape[:-1]``.
    """
    decisions = u < torch.sigmoid(stick_breaking_logits(logits.detach()))
    first = decisions.to(torch.uint8).argmax(-1)  # first maximum: the first decision 1
    return torch.where(decisions.any(-1), first, torch.full_like(first, logits.shape[-1] - 1))


def stick_breaking_noise(value: Tensor, logits: Tensor) -> Tensor:
    """Uniform noise of the binary decisions consistent with a categorical draw already
    made: :math:`u \\sim \\mathcal U(0,1)^{C-1}` conditioned on
    ``stick_breaking_value(u, logits) == value``. Decisions :math:`j \\le z` are drawn
    with :func:`conditional_uniform` (:math:`c_j = \\mathbb 1[j = z]`); those after
    :math:`z` do not affect :math:`z` and are drawn unconditionally.

    :param torch.Tensor value: class indices :math:`z`, shape ``logits.shape[:-1]``.
    :param torch.Tensor logits: :math:`\\ell`, classes in the last dimension.
    :return: :math:`u`, shape ``logits.shape[:-1] + (C - 1,)``.
    """
    alpha = stick_breaking_logits(logits.detach())
    index = torch.arange(alpha.shape[-1], device=alpha.device)
    z = value.detach().long().unsqueeze(-1)
    fixed = conditional_uniform((index == z).to(alpha.dtype), alpha)
    return torch.where(index <= z, fixed, torch.rand_like(alpha))

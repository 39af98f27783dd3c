"""Pure tensor math of the gradient-informed control variates for binary latents: the
double control variate (Titsias & Shi, 2022) and RODEO's discrete Stein operators (Shi,
Zhou, Hwang, Titsias & Mackey, 2022), both on top of leave-one-out over :math:`K \\ge 2`
independent draws.

Both estimate :math:`\\nabla_\\eta \\mathbb E_{x \\sim q_\\eta}[f(x)]` for a factorized
Bernoulli :math:`q_\\eta(x) = \\prod_i \\theta_i^{x_i}(1 - \\theta_i)^{1 - x_i}` with
logits :math:`\\eta` (:math:`\\theta = \\sigma(\\eta)`) from draws :math:`x_1, \\ldots,
x_K`, their values :math:`f_k = f(x_k)` and the gradients :math:`g_k = \\nabla f(x_k)`
of :math:`f` extended to real inputs (one backward pass, no extra evaluation of
:math:`f`). Whatever is built from the *other* draws is independent of draw :math:`k`;
a control variate whose conditional mean given the other draws is known (zero, or the
analytic term of the double control variate) keeps the estimator exactly unbiased for
any learned coefficient or function.

*Discrete Stein operator.* For the Markov chain that picks a coordinate :math:`i`
uniformly and redraws it from :math:`q` (the Gibbs sampler, which flips it with
probability :math:`w_i(x) = q(1 - x_i)`) and any function :math:`h`,

.. math::

    (\\mathcal A h)(x) = \\frac1D \\sum_{i=1}^D w_i(x)\\,\\big(h(x^{(i)}) - h(x)\\big),
    \\qquad \\mathbb E_q[(\\mathcal A h)(x)] = 0,

where :math:`x^{(i)}` is :math:`x` with coordinate :math:`i` flipped (each term alone has
mean zero: summed over :math:`x_i \\in \\{0, 1\\}` it is
:math:`q(0)q(1)(h(x^{1}) - h(x^{0})) + q(1)q(0)(h(x^{0}) - h(x^{1})) = 0`).

Layout: particles on dim 0, the coordinates :math:`i` that share one value of :math:`f`
(a site's units, flattened) on the last dim, and any batch dims (plate elements, each
with its own :math:`f`) between: ``f`` is ``(K, *B)``; ``values``, ``probs``, ``grads``
are ``(K, *B, D)``. Nothing here knows about Pyro:
:class:`~pyro_wakesleep.objectives.DoubleControlVariateELBO` and
:class:`~pyro_wakesleep.objectives.RodeoELBO` turn traces into these tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pyro_wakesleep.signals import leave_one_out_mean

__all__ = [
    "double_cv_gradient",
    "flip_weights",
    "leave_one_out_pairs",
    "rodeo_features",
    "rodeo_gradient",
    "stein_operator",
    "stein_score_operator",
    "taylor_control_variate",
]


def flip_weights(values: Tensor, probs: Tensor) -> Tensor:
    """The Gibbs chain's probability of flipping each coordinate,
    :math:`w_i(x) = q(1 - x_i) = \\theta_i (1 - x_i) + (1 - \\theta_i) x_i`.

    :param torch.Tensor values: :math:`x`, entries 0 or 1.
    :param torch.Tensor probs: :math:`\\theta`, broadcastable to ``values``.
    :rtype: torch.Tensor
    """
    return probs * (1.0 - values) + (1.0 - probs) * values


def stein_operator(h_flipped: Tensor, h_value: Tensor, weights: Tensor) -> Tensor:
    """:math:`(\\mathcal A h)(x) = \\frac1D \\sum_i w_i (h(x^{(i)}) - h(x))`, mean zero
    under :math:`q` for every :math:`h` that does not depend on :math:`x` otherwise.

    :param torch.Tensor h_flipped: :math:`h(x^{(i)})`, ``(..., D)``.
    :param torch.Tensor h_value: :math:`h(x)`, ``(...)``.
    :param torch.Tensor weights: :math:`w_i(x)` (:func:`flip_weights`), ``(..., D)``.
    :return: ``(...)``.
    """
    return (weights * (h_flipped - h_value.unsqueeze(-1))).mean(-1)


def stein_score_operator(h_flipped: Tensor, h_value: Tensor, values: Tensor, probs: Tensor,
                         weights: Tensor) -> Tensor:
    """The Stein operator applied to the vector function
    :math:`h(x)\\,\\nabla_\\eta \\log q(x) = h(x)(x - \\theta)`, in :math:`O(D)`:

    .. math::

        \\big(\\mathcal A [h\\,(\\cdot - \\theta)]\\big)_j(x)
            = (x_j - \\theta_j)\\,(\\mathcal A h)(x)
              + \\frac1D\\, w_j(x)\\, h(x^{(j)})\\,(1 - 2 x_j),

    since :math:`x^{(i)}` differs from :math:`x` in coordinate :math:`i` only. Mean zero
    under :math:`q`, coordinatewise.

    :param torch.Tensor h_flipped: :math:`h(x^{(i)})`, ``(..., D)``.
    :param torch.Tensor h_value: :math:`h(x)`, ``(...)``.
    :param torch.Tensor values: :math:`x`, ``(..., D)``.
    :param torch.Tensor probs: :math:`\\theta`, ``(..., D)``.
    :param torch.Tensor weights: :math:`w(x)`, ``(..., D)``.
    :return: ``(..., D)``.
    """
    scalar = stein_operator(h_flipped, h_value, weights)
    size = values.shape[-1]
    return (values - probs) * scalar.unsqueeze(-1) \
        + weights * h_flipped * (1.0 - 2.0 * values) / size


def taylor_control_variate(grads: Tensor, values: Tensor, probs: Tensor) -> Tensor:
    """The double control variate's local term for each draw, a first-order Taylor
    expansion of :math:`f` with the other draws' mean gradient:
    :math:`c_k = \\bar g_{-k} \\cdot (x_k - \\theta_k)`,
    :math:`\\bar g_{-k} = \\frac{1}{K - 1}\\sum_{j \\ne k} g_j`.

    :param torch.Tensor grads: :math:`g`, ``(K, *B, D)``.
    :param torch.Tensor values: :math:`x`, ``(K, *B, D)``.
    :param torch.Tensor probs: :math:`\\theta`, broadcastable to ``values``.
    :return: ``(K, *B)``.
    """
    return (leave_one_out_mean(grads, 0) * (values - probs)).sum(-1)


def double_cv_gradient(f: Tensor, grads: Tensor, values: Tensor, probs: Tensor,
                       alpha: Tensor) -> Tensor:
    """The double control variate estimate (Titsias & Shi, 2022, "Double Control Variates
    for Gradient Estimation in Discrete Latent Variable Models"), one term per draw:

    .. math::

        \\hat g_k = \\Big(f_k + \\alpha c_k - \\frac{1}{K - 1}\\sum_{j \\ne k}
            (f_j + \\alpha c_j)\\Big)(x_k - \\theta_k)
            - \\alpha\\, \\bar g_{-k} \\odot \\theta_k (1 - \\theta_k),

    with :math:`c_k` of :func:`taylor_control_variate`; the estimate of
    :math:`\\nabla_\\eta \\mathbb E[f]` is :math:`\\frac1K \\sum_k \\hat g_k`. Unbiased
    for every :math:`\\alpha`: :math:`c_j` is linear in :math:`x_j - \\theta_j` (mean zero
    given the others), and :math:`\\mathbb E[c_k (x_k - \\theta_k) \\mid x_{-k}] =
    \\bar g_{-k} \\odot \\theta_k (1 - \\theta_k)` is subtracted.

    :param torch.Tensor f: ``(K, *B)``.
    :param torch.Tensor grads: ``(K, *B, D)``.
    :param torch.Tensor values: ``(K, *B, D)``.
    :param torch.Tensor probs: broadcastable to ``values``.
    :param torch.Tensor alpha: a scalar (learned).
    :return: ``(K, *B, D)``.
    """
    others = leave_one_out_mean(grads, 0)
    c = (others * (values - probs)).sum(-1)
    corrected = f + alpha * c
    signal = corrected - leave_one_out_mean(corrected, 0)
    return signal.unsqueeze(-1) * (values - probs) - alpha * others * probs * (1.0 - probs)


def leave_one_out_pairs(x: Tensor) -> Tensor:
    """For each draw :math:`k`, the entries of the other :math:`K - 1` draws:
    ``out[k, m]`` is ``x[j]`` for the :math:`m`-th :math:`j \\ne k`.

    :param torch.Tensor x: ``(K, ...)``.
    :return: ``(K, K - 1, ...)``.
    """
    k = x.shape[0]
    index = torch.tensor([[j for j in range(k) if j != i] for i in range(k)],
                         device=x.device, dtype=torch.long)
    return x[index]


def rodeo_features(f: Tensor, grads: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """The inputs of RODEO's learned function for draw :math:`k`, one per other draw
    :math:`j \\ne k`: the other draw's value :math:`f_j` and the first-order expansion of
    :math:`f` around :math:`x_j` evaluated at :math:`y`,
    :math:`g_j \\cdot (y - x_j)`, at :math:`y = x_k` and at each of its flips
    :math:`y = x_k^{(i)}` (where it is :math:`g_j \\cdot (x_k - x_j) + g_{j,i}(1 -
    2x_{k,i})`).

    :param torch.Tensor f: ``(K, *B)``.
    :param torch.Tensor grads: ``(K, *B, D)``.
    :param torch.Tensor values: ``(K, *B, D)``.
    :return: ``(at_value, at_flips)``: ``(K, K - 1, *B, 2)`` and ``(K, K - 1, *B, D,
        2)``, the last dim holding (expansion, :math:`f_j`).
    """
    g_other, x_other = leave_one_out_pairs(grads), leave_one_out_pairs(values)
    f_other = leave_one_out_pairs(f)
    x = values.unsqueeze(1)
    linear = (g_other * (x - x_other)).sum(-1)  # (K, K-1, *B)
    flipped = linear.unsqueeze(-1) + g_other * (1.0 - 2.0 * x)  # (K, K-1, *B, D)
    at_value = torch.stack([linear, f_other], -1)
    at_flips = torch.stack([flipped, f_other.unsqueeze(-1).expand_as(flipped)], -1)
    return at_value, at_flips


def rodeo_gradient(f: Tensor, grads: Tensor, values: Tensor, probs: Tensor,
                   network: Callable[[Tensor], Tensor], alpha: Tensor,
                   beta: Tensor) -> Tensor:
    """The RODEO estimate (Shi, Zhou, Hwang, Titsias & Mackey, 2022, "Gradient
    Estimation with Discrete Stein Operators"), one term per draw:

    .. math::

        \\hat g_k = \\Big(f_k - \\frac{1}{K - 1}\\sum_{j \\ne k}
                \\big(f_j + \\alpha\\, (\\mathcal A h_{0,j})(x_j)\\big)\\Big)(x_k - \\theta_k)
            + \\beta\\, \\big(\\mathcal A [h_{1,k} (\\cdot - \\theta_k)]\\big)(x_k),

    with :math:`\\mathcal A` the Gibbs chain's Stein operator (:func:`stein_operator`,
    :func:`stein_score_operator`, weights from :math:`\\theta_k`) and
    :math:`(h_{0,k}, h_{1,k})(y) = \\frac{1}{K - 1}\\sum_{j \\ne k}
    H_\\psi\\big(g_j \\cdot (y - x_j), f_j\\big)`, a learned :math:`H_\\psi:
    \\mathbb R^2 \\to \\mathbb R^2` of the other draws' first-order expansions of
    :math:`f` (:func:`rodeo_features`; the paper's "output average"). :math:`h_{\\cdot,k}`
    depends on the other draws only, so both control variates have mean zero given
    them: unbiased for every :math:`\\psi, \\alpha, \\beta`.

    :param torch.Tensor f: ``(K, *B)``.
    :param torch.Tensor grads: ``(K, *B, D)``.
    :param torch.Tensor values: ``(K, *B, D)``.
    :param torch.Tensor probs: :math:`\\theta`, ``(K, *B, D)``.
    :param callable network: :math:`H_\\psi`, mapping ``(..., 2)`` to ``(..., 2)``.
    :param torch.Tensor alpha: scalar coefficient of the baseline's control variate.
    :param torch.Tensor beta: scalar coefficient of the gradient's control variate.
    :return: ``(K, *B, D)``; the estimate is :math:`\\frac1K \\sum_k \\hat g_k`.
    """
    at_value, at_flips = rodeo_features(f, grads, values)
    h_value = network(at_value).mean(1)  # (K, *B, 2)
    h_flips = network(at_flips).mean(1)  # (K, *B, D, 2)
    weights = flip_weights(values, probs)
    scalar = stein_operator(h_flips[..., 0], h_value[..., 0], weights)  # (K, *B)
    vector = stein_score_operator(h_flips[..., 1], h_value[..., 1], values, probs, weights)
    baseline = leave_one_out_mean(f + alpha * scalar, 0)
    return (f - baseline).unsqueeze(-1) * (values - probs) + beta * vector

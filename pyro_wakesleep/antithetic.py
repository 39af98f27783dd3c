"""Pure tensor math of the antithetic gradient estimators for binary latents.

ARM (Yin & Zhou, 2019) and DisARM (Dong, Mnih & Tucker, 2020) estimate the gradient of
:math:`\\mathbb E_{b \\sim \\mathrm{Bern}(\\sigma(\\alpha))}[f(b)]` with respect to the
logits :math:`\\alpha` from two *antithetic* draws sharing one uniform noise
:math:`u \\sim \\mathcal U(0, 1)^D`:

.. math::

    b = \\mathbb 1[u < \\sigma(\\alpha)], \\qquad
    \\tilde b = \\mathbb 1[1 - u < \\sigma(\\alpha)] = \\mathbb 1[u > \\sigma(-\\alpha)].

Both are draws from :math:`\\mathrm{Bern}(\\sigma(\\alpha))`. ARMS (Dimitriev & Zhou,
2021) takes :math:`n \\ge 2` draws whose noises are exchangeable and negatively correlated
(a Dirichlet copula, :func:`dirichlet_copula`; for :math:`n = 2` it is the antithetic pair
above) and corrects the leave-one-out estimator for the correlation
(:func:`arms_gradient`). The categorical extension
(:func:`stick_breaking_logits`) writes a categorical draw as a chain of binary decisions
"is :math:`z = j` given :math:`z \\ge j`" and applies the binary estimators to each.

Nothing here knows about Pyro: :class:`~pyro_wakesleep.objectives.disarm.DisarmELBO`
turns traces into these tensors. ``f`` and ``f_anti`` may have fewer (broadcastable)
dimensions than the draws, e.g. one value per datapoint for a layer of units.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

__all__ = [
    "antithetic_value",
    "arm_gradient",
    "arms_correction",
    "arms_gradient",
    "conditional_uniform",
    "copula_bivariate_cdf",
    "copula_noise",
    "copula_pattern_law",
    "dirichlet_copula",
    "dirichlet_copula_given",
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


# -- ARMS: n correlated draws --------------------------------------------------------------
def _exponentials(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Standard exponential draws (``-log(1 - U)``, finite), of ``like``'s dtype and
    device."""
    return -torch.log1p(-torch.rand(shape, dtype=like.dtype, device=like.device))


def dirichlet_copula(num: int, shape: tuple[int, ...] | torch.Size,
                     dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """``num`` exchangeable, negatively correlated uniforms per element of ``shape``: the
    Dirichlet copula of Dimitriev & Zhou (2021),

    .. math::

        d \\sim \\mathrm{Dir}(1, \\ldots, 1) \\in \\Delta^{n-1}, \\qquad
        u_k = (1 - d_k)^{n-1}, \\quad k = 1, \\ldots, n.

    Each :math:`1 - d_k \\sim \\mathrm{Beta}(n - 1, 1)`, whose CDF is :math:`x^{n-1}`,
    so each :math:`u_k \\sim \\mathcal U(0, 1)`; at most one :math:`d_k` exceeds
    :math:`1/2`, so small :math:`u_k` exclude each other (:func:`copula_bivariate_cdf`).
    For :math:`n = 2`, :math:`u_2 = 1 - u_1`: the antithetic pair of ARM and DisARM.

    :param int num: :math:`n \\ge 2`.
    :param shape: the shape of one draw's noise.
    :param torch.dtype dtype: the result's dtype (default: torch's default).
    :param device: the result's device (default: torch's default).
    :return: ``(num, *shape)``.
    :raises ValueError: if ``num < 2``.
    """
    if num < 2:
        raise ValueError(f"the Dirichlet copula needs num >= 2 draws, got {num}")
    like = torch.empty((), dtype=dtype, device=device)
    e = _exponentials((num, *shape), like)
    d = e / e.sum(0, keepdim=True).clamp_min(torch.finfo(like.dtype).tiny)
    return (1.0 - d).pow(num - 1)


def dirichlet_copula_given(u: Tensor, num: int) -> Tensor:
    """The Dirichlet copula's ``num`` uniforms with the first one given: row 0 is ``u``,
    rows 1..n-1 are drawn from their law given it, so that the rows have the joint law of
    :func:`dirichlet_copula`. With :math:`1 - d_1 = u^{1/(n-1)}` and the aggregation
    property of the Dirichlet,

    .. math::

        (d_2, \\ldots, d_n) = u^{1/(n-1)}\\, e, \\quad
        e \\sim \\mathrm{Dir}(1, \\ldots, 1) \\in \\Delta^{n-2}, \\qquad
        u_k = (1 - d_k)^{n-1}.

    :param torch.Tensor u: the first uniform, any shape.
    :param int num: :math:`n \\ge 2`.
    :return: ``(num, *u.shape)``; for ``num == 2`` exactly ``(u, 1 - u)``.
    :raises ValueError: if ``num < 2``.
    """
    if num < 2:
        raise ValueError(f"the Dirichlet copula needs num >= 2 draws, got {num}")
    u = u.detach()
    if num == 2:
        return torch.stack([u, 1.0 - u])
    e = _exponentials((num - 1, *u.shape), u)
    e = e / e.sum(0, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
    rest = (1.0 - u.pow(1.0 / (num - 1)) * e).pow(num - 1)
    return torch.cat([u.unsqueeze(0), rest])


def copula_bivariate_cdf(a: Tensor, b: Tensor, num: int) -> Tensor:
    """:math:`P(u_i \\le a, u_j \\le b)` for two of the :math:`n` uniforms of
    :func:`dirichlet_copula` (:math:`i \\ne j`):

    .. math:: C_n(a, b) = \\big(a^{1/(n-1)} + b^{1/(n-1)} - 1\\big)_+^{\\,n-1}.

    :param torch.Tensor a: first bound in [0, 1].
    :param torch.Tensor b: second bound in [0, 1].
    :param int num: :math:`n \\ge 2`.
    """
    power = 1.0 / (num - 1)
    return (a.pow(power) + b.pow(power) - 1.0).clamp_min(0.0).pow(num - 1)


def copula_noise(w: Tensor, logits: Tensor, num: int) -> Tensor:
    """The noises of ``num`` exchangeable, negatively correlated Bernoulli draws
    :math:`b_k = \\mathbb 1[w_k < \\sigma(\\alpha)]`, given the first draw's noise
    :math:`w_1` (e.g. from :func:`conditional_uniform`, or
    :func:`stick_breaking_noise` for a categorical's decisions).

    As in the ARMS authors' construction, the copula is put on the side of the rarer
    outcome: :math:`w = u` where :math:`\\alpha \\le 0` (ones are rare and exclude each
    other) and :math:`w = 1 - u` where :math:`\\alpha > 0` (zeros are), with
    :math:`u` from :func:`dirichlet_copula_given`. Each :math:`w_k` is uniform.

    :param torch.Tensor w: the first draw's noise.
    :param torch.Tensor logits: :math:`\\alpha`, the shape of ``w``.
    :param int num: :math:`n \\ge 2`.
    :return: ``(num, *w.shape)``, row 0 exactly ``w``.
    """
    w = w.detach()
    flip = logits.detach() > 0
    joint = dirichlet_copula_given(torch.where(flip, 1.0 - w, w), num)
    return torch.cat([w.unsqueeze(0), torch.where(flip, 1.0 - joint[1:], joint[1:])])


def arms_correction(logits: Tensor, num: int) -> Tensor:
    """The factor that makes leave-one-out over the correlated draws of
    :func:`copula_noise` unbiased: with :math:`p = \\sigma(\\alpha)`,
    :math:`m = \\min(p, 1 - p) = \\sigma(-|\\alpha|)` and :math:`P_{11}` the
    probability that two of the draws are both 1,

    .. math::

        \\frac{p (1 - p)}{p - P_{11}} = \\frac{m (1 - m)}{m - C_n(m, m)}
        = \\frac{1}{1 - \\rho},

    :math:`\\rho` the correlation of two draws (negative). It is :math:`1 - m =
    \\sigma(|\\alpha|)` when :math:`C_n(m, m) = 0` (always for :math:`n = 2`).

    :param torch.Tensor logits: :math:`\\alpha`.
    :param int num: :math:`n \\ge 2`.
    :return: the factor, the shape of ``logits``, detached.
    """
    m = torch.sigmoid(-logits.detach().abs())
    both = copula_bivariate_cdf(m, m, num)
    return torch.where(both > 0, m * (1.0 - m) / (m - both).clamp_min(1e-30), 1.0 - m)


def arms_gradient(f: Tensor, values: Tensor, logits: Tensor) -> Tensor:
    """The ARMS estimate of :math:`\\nabla_\\alpha \\mathbb E[f(b)]` from :math:`n`
    correlated draws (Dimitriev & Zhou, 2021, "ARMS: Antithetic-REINFORCE-Multi-Sample
    Gradient for Binary Variables", ICML; Dirichlet copula):

    .. math::

        \\hat g_i = \\frac{1}{(n - 1)(1 - \\rho_i)} \\sum_{k=1}^n
            \\Big(f(b_k) - \\frac1n \\sum_{l=1}^n f(b_l)\\Big)\\,
            \\big(b_{k,i} - \\sigma(\\alpha_i)\\big),

    with :math:`1/(1 - \\rho_i)` from :func:`arms_correction`. For independent draws
    (:math:`\\rho = 0`) it is leave-one-out REINFORCE; for :math:`n = 2` it equals
    :func:`disarm_gradient` exactly.

    :param torch.Tensor f: :math:`f(b_k)` stacked along dim 0, broadcastable to
        ``values``.
    :param torch.Tensor values: the draws :math:`b_k`, ``(n, ...)``, from
        :func:`copula_noise`.
    :param torch.Tensor logits: :math:`\\alpha`, broadcastable to ``values[0]``.
    :return: :math:`\\hat g`, detached, the broadcast shape of ``values[0]`` and
        ``logits``.
    :raises ValueError: if there are fewer than 2 draws.
    """
    num = values.shape[0]
    if num < 2:
        raise ValueError(f"ARMS needs at least 2 draws, got {num}")
    logits = logits.detach()
    f = f.detach()
    centred = f - f.mean(0, keepdim=True)
    total = (centred * (values.to(logits.dtype) - torch.sigmoid(logits))).sum(0)
    return arms_correction(logits, num) * total / (num - 1)


def copula_pattern_law(logits: Tensor, num: int) -> tuple[Tensor, Tensor]:
    """The exact joint law of the :math:`n` draws :math:`b_1, \\ldots, b_n` of
    :func:`copula_noise` at one coordinate: every pattern in :math:`\\{0, 1\\}^n` and
    its probability, for exact expectations and variances of :func:`arms_gradient`.

    With :math:`m = \\sigma(-|\\alpha|)` the probability of the rarer outcome and
    :math:`L_j = P(u_1, \\ldots, u_j \\le m) = (1 - j(1 - m^{1/(n-1)}))_+^{n-1}`
    (a Dirichlet orthant probability), a pattern whose rare outcomes are exactly the set
    :math:`R` has probability, by inclusion and exclusion,

    .. math::

        P(R) = \\sum_{j=0}^{n - |R|} \\binom{n - |R|}{j} (-1)^j L_{|R| + j}.

    :param torch.Tensor logits: :math:`\\alpha`, any shape.
    :param int num: :math:`n \\ge 2`.
    :return: ``(patterns, probs)``: ``(2^n, n)`` patterns of 0/1 (float64) and their
        probabilities, ``(2^n, *logits.shape)`` (float64).
    """
    logits = logits.detach().double()
    m = torch.sigmoid(-logits.abs())
    root = m.pow(1.0 / (num - 1))
    law = [torch.ones_like(m)] + [
        (1.0 - j * (1.0 - root)).clamp_min(0.0).pow(num - 1) for j in range(1, num + 1)
    ]
    exactly = [
        sum((-1) ** j * math.comb(num - r, j) * law[r + j] for j in range(num - r + 1))
        for r in range(num + 1)
    ]
    patterns = torch.tensor(list(itertools.product([0.0, 1.0], repeat=num)),
                            dtype=torch.float64)
    ones = patterns.sum(-1).long()
    rare_is_one = logits <= 0
    probs = torch.stack([
        torch.where(rare_is_one, exactly[int(k)], exactly[num - int(k)]) for k in ones
    ])
    return patterns, probs.clamp_min(0.0)

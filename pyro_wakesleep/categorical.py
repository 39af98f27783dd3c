"""Pure tensor math of the categorical estimators that evaluate several values of one
variable: the unordered-set estimator (sampling without replacement) and IndeCateR (all
categories).

For a categorical variable :math:`z \\sim p = \\mathrm{softmax}(\\ell)` over the domain
:math:`D` and a function :math:`f`, both estimate :math:`\\nabla \\mathbb E_p[f(z)]` from
:math:`f` at several values of :math:`z`:

* the **unordered-set estimator** (Kool, van Hoof & Welling, 2020, "Estimating Gradients
  for Discrete Random Variables by Sampling without Replacement", ICLR) from a set
  :math:`S` of :math:`k` distinct values drawn without replacement by Gumbel-top-k
  (:func:`gumbel_top_k`), weighted by leave-one-out ratios of the probability of the
  unordered set (:func:`leave_one_out_log_ratios`) and centred by its built-in baseline
  (:func:`unordered_set_coefficients`);
* **IndeCateR** (De Smet, Sansone & Zuidberg Dos Martires, 2023, "Differentiable Sampling
  of Categorical Distributions Using the CatLog-Derivative Trick", NeurIPS) from every
  value, :math:`\\sum_{c \\in D} \\nabla p(c)\\, f(c)` (:func:`indecater_surrogate`).

Categories of probability exactly 0 (log-probability :math:`-\\infty`) are outside the
domain: :func:`support_log_probs` gives them :math:`-\\infty` exactly, Gumbel-top-k draws
them only after every other category, and a set member of probability 0 is *absent*: it
contributes no factor to the set's probability, a zero coefficient and nothing to the
surrogate or its gradient, whatever :math:`f` is there. A set of :math:`k` draws from a
support of :math:`m < k` categories is so the support itself, and the estimator exact.

Nothing here knows about Pyro:
:class:`~pyro_wakesleep.objectives.UnorderedSetELBO` and
:class:`~pyro_wakesleep.objectives.IndecaterELBO` turn traces into these tensors. The
leave-one-out ratios are computed in double precision and in log space throughout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "gumbel_top_k",
    "indecater_surrogate",
    "leave_one_out_log_ratios",
    "log1mexp",
    "plackett_luce_log_prob",
    "set_log_probs",
    "support_log_probs",
    "unordered_set_coefficients",
    "unordered_set_surrogate",
]

#: spacing of the quadrature grid of :func:`leave_one_out_log_ratios` (in :math:`y`)
QUADRATURE_STEP = 0.25
#: lower end of the quadrature grid (the integrand is below :math:`e^{y}` times its peak)
QUADRATURE_LOW = -40.0


def log1mexp(x: Tensor) -> Tensor:
    """:math:`\\log(1 - e^{-x})` for :math:`x \\ge 0`, accurate for small and large
    :math:`x` (Mächler, 2012): ``log(-expm1(-x))`` below :math:`\\log 2`, else
    ``log1p(-exp(-x))``. :math:`x = 0` gives :math:`-\\infty`, :math:`x = \\infty` gives 0.
    """
    x = x.clamp_min(0.0)
    small = x < math.log(2.0)
    safe_small = torch.where(small, x, torch.ones_like(x))
    safe_large = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, torch.log(-torch.expm1(-safe_small)),
                       torch.log1p(-torch.exp(-safe_large)))


def support_log_probs(logits: Tensor, probs: Tensor) -> Tensor:
    """Normalized log-probabilities that are exactly :math:`-\\infty` where ``probs`` is
    exactly 0: ``log_softmax(logits)`` with those categories masked out first. A
    distribution built from ``probs`` has logits clamped at :math:`\\log \\epsilon`
    (PyTorch's ``probs_to_logits``), which would give a category the sampler never draws a
    small positive probability; one built from logits has ``probs`` 0 where a logit is
    :math:`-\\infty` (or so far below the others that its probability underflows), where the
    sampler never draws it either. The masked entries get no gradient.

    :param torch.Tensor logits: :math:`\\ell`, categories in the last dimension.
    :param torch.Tensor probs: the probabilities of the same distribution, broadcastable
        to ``logits``.
    :return: ``(..., C)``, the broadcast shape; differentiable in ``logits``.
    """
    logits, zero = torch.broadcast_tensors(logits, probs == 0)
    return torch.log_softmax(logits.masked_fill(zero, -math.inf), -1)


def gumbel_top_k(logits: Tensor, k: int, first: Tensor | None = None) -> Tensor:
    """:math:`k` distinct categories drawn without replacement, in the order of the draws
    (Gumbel-top-k: the indices of the :math:`k` largest of :math:`\\ell_c + G_c`,
    :math:`G_c` standard Gumbel; Vieira, 2014; Kool, van Hoof & Welling, 2019).

    With ``first``, the first draw is given (e.g. made by a sampler already) and the
    others are drawn from their law given it: the maximum :math:`M` is a Gumbel with
    location :math:`\\log \\sum_c e^{\\ell_c}` independent of which category attains it,
    and given :math:`M` every other perturbed logit is a Gumbel truncated below :math:`M`,
    :math:`-\\log(e^{-M} + e^{-G'_c})` with :math:`G'_c \\sim \\mathrm{Gumbel}(\\ell_c)`.
    The ordered sample then has the law of unconditioned Gumbel-top-k with first element
    ``first`` (Maddison, Tarlow & Minka, 2014, the top-down construction of A* sampling).
    Categories with logit :math:`-\\infty` have perturbed logit :math:`-\\infty` and come
    after all others: with :math:`k` above the number :math:`m` of the others, the first
    :math:`m` draws are those and the rest fill the set in no particular order (absent
    members for :func:`unordered_set_coefficients`).

    :param torch.Tensor logits: :math:`\\ell`, categories in the last dimension.
    :param int k: the number of draws, at most the number of categories.
    :param torch.Tensor first: optional first draws, shape ``logits.shape[:-1]``.
    :return: indices (``torch.long``), shape ``logits.shape[:-1] + (k,)``; detached.
    :raises ValueError: if ``k`` is not between 1 and the number of categories.
    """
    classes = logits.shape[-1]
    if not 1 <= k <= classes:
        raise ValueError(f"k must be between 1 and the number of categories {classes}, got {k}")
    logits = logits.detach()
    log_p = torch.log_softmax(logits, -1)
    gumbel = -torch.log(-torch.log(torch.rand_like(log_p).clamp(1e-30, 1.0 - 1e-7)))
    perturbed = log_p + gumbel
    if first is not None:
        top = -torch.log(-torch.log(torch.rand_like(log_p[..., 0]).clamp(1e-30, 1.0 - 1e-7)))
        top = top.unsqueeze(-1)
        below = -torch.logaddexp(-top, -perturbed)
        is_first = torch.arange(classes, device=logits.device) == first.long().unsqueeze(-1)
        perturbed = torch.where(is_first, top, below)
    return perturbed.topk(k, -1).indices


def set_log_probs(logits: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """The normalized log-probabilities of the categories ``indices`` and the
    log-probability of all the others, :math:`\\log p(D \\setminus S)`, computed as a
    log-sum-exp over those others (exact also when :math:`S` holds nearly all the mass).

    :param torch.Tensor logits: :math:`\\ell`, categories in the last dimension.
    :param torch.Tensor indices: distinct categories :math:`S`, ``(..., k)``.
    :return: ``(log_p, log_rest)``: ``(..., k)``, differentiable (``-inf`` at members of
        probability 0), and ``(...)``, detached (``-inf`` when :math:`S` holds all the
        mass).
    """
    log_p_all = torch.log_softmax(logits, -1)
    log_p = log_p_all.gather(-1, indices)
    chosen = torch.zeros_like(log_p_all, dtype=torch.bool).scatter(-1, indices, True)
    rest = log_p_all.detach().masked_fill(chosen, -math.inf)
    return log_p, torch.logsumexp(rest, -1)


def plackett_luce_log_prob(log_p: Tensor) -> Tensor:
    """:math:`\\log` of the probability of drawing the categories in this order without
    replacement (the Plackett-Luce law of Gumbel-top-k):
    :math:`\\prod_i p_{s_i} / (1 - \\sum_{j < i} p_{s_j})`.

    :param torch.Tensor log_p: normalized log-probabilities of the ordered draws,
        ``(..., k)``.
    :return: ``(...)``.
    """
    before = torch.logcumsumexp(log_p, -1)[..., :-1].clamp_max(0.0)
    return log_p.sum(-1) - log1mexp(-before).sum(-1)


def _log_integral(log_terms: Tensor, grid: Tensor) -> Tensor:
    """:math:`\\log \\int e^{y - e^y} \\prod (\\text{factors}) \\, dy` by the trapezoid
    rule, from the summed log-factors on the grid (last dimension)."""
    return torch.logsumexp(log_terms + grid - grid.exp(), -1) + math.log(QUADRATURE_STEP)


def leave_one_out_log_ratios(log_p: Tensor, log_rest: Tensor) -> tuple[Tensor, Tensor]:
    """The first- and second-order leave-one-out ratios of the probability of an
    unordered sample without replacement (Kool et al., 2020, eqs. 8 and 12), in log space.

    Gumbel-top-k draws the unordered set :math:`S` with probability

    .. math::

        p(S) = \\int_0^1 \\prod_{s \\in S} \\big(1 - u^{r_s}\\big)\\, du
             = \\int_{-\\infty}^{\\infty} e^{y - e^y} \\prod_{s \\in S}
               \\big(1 - e^{-r_s e^y}\\big)\\, dy,
        \\qquad r_s = \\frac{p(s)}{p(D \\setminus S)}

    (the complement's largest perturbed logit is a Gumbel with location
    :math:`\\log p(D \\setminus S)`; substitute :math:`u = \\exp(-e^y)`). Leaving
    :math:`s` out of both :math:`S` and the domain leaves every :math:`r` unchanged, so
    :math:`p^{D \\setminus \\{s\\}}(S \\setminus \\{s\\})` is the same integral without the
    factor of :math:`s`. The ratios are

    .. math::

        R(S, s) = \\frac{p^{D \\setminus \\{s\\}}(S \\setminus \\{s\\})}{p(S)}, \\qquad
        R^{D \\setminus \\{s\\}}(S, s') =
            \\frac{p^{D \\setminus \\{s, s'\\}}(S \\setminus \\{s, s'\\})}
                 {p^{D \\setminus \\{s\\}}(S \\setminus \\{s\\})}, \\quad
        R^{D \\setminus \\{s\\}}(S, s) = 1.

    The integrand is smooth in :math:`y` (analytic in the strip
    :math:`|\\mathrm{Im}\\, y| < \\pi/2`), so the trapezoid rule with step 0.25 on
    :math:`[-40, \\log(k + 1) + 3]` is accurate to about double precision; every factor
    :math:`\\log(1 - e^{-r e^y})` is formed from :math:`\\log r + y` (:func:`log1mexp`,
    with its series below :math:`e^{-20}`), and the integrals by log-sum-exp. A set with
    all the mass (:math:`p(D \\setminus S) = 0`) gives :math:`R = 1` exactly. A member with
    :math:`p(s) = 0` (``log_p`` :math:`-\\infty`) is absent: its factor is 1 (it would be 0
    and :math:`p(S) = 0`), so the ratios are those of the set without it,
    :math:`R(S, s) = 1`, :math:`R^{D \\setminus \\{s'\\}}(S, s) = 1` and
    :math:`R^{D \\setminus \\{s\\}}(S, s') = R(S, s')`.

    :param torch.Tensor log_p: :math:`\\log p(s)`, :math:`s \\in S`, ``(..., k)``.
    :param torch.Tensor log_rest: :math:`\\log p(D \\setminus S)`, ``(...)``.
    :return: ``(log_r1, log_r2)``: ``(..., k)`` with :math:`\\log R(S, s)` and
        ``(..., k, k)`` with :math:`\\log R^{D \\setminus \\{s\\}}(S, s')` at
        ``[..., s, s']``; float64, detached.
    """
    log_p = log_p.detach().to(torch.float64)
    log_rest = log_rest.detach().to(torch.float64)
    k = log_p.shape[-1]
    high = math.log(k + 1.0) + 3.0
    num = math.ceil((high - QUADRATURE_LOW) / QUADRATURE_STEP) + 1
    grid = QUADRATURE_LOW + QUADRATURE_STEP * torch.arange(
        num, dtype=torch.float64, device=log_p.device)
    # x = log r_s + y, (..., k, N); factor log(1 - exp(-e^x))
    absent = (log_p == -math.inf).unsqueeze(-1)
    x = (log_p.masked_fill(absent.squeeze(-1), 0.0) - log_rest.unsqueeze(-1)).unsqueeze(-1)
    x = x + grid
    tiny = x < -20.0
    safe = torch.where(tiny, torch.zeros_like(x), x)
    factors = torch.where(tiny, x - 0.5 * torch.exp(x), log1mexp(torch.exp(safe)))
    factors = factors.masked_fill(absent, 0.0)
    total = factors.sum(-2)  # (..., N)
    without_s = total.unsqueeze(-2) - factors  # (..., k, N)
    eye = torch.eye(k, dtype=torch.bool, device=log_p.device).unsqueeze(-1)
    # (..., k, k, N): without s and s' (s' = s: without s only)
    without_ss = without_s.unsqueeze(-2) - torch.where(eye, 0.0, factors.unsqueeze(-3))
    log_s = _log_integral(total, grid)
    log_s1 = _log_integral(without_s, grid)
    log_s2 = _log_integral(without_ss, grid)
    return log_s1 - log_s.unsqueeze(-1), log_s2 - log_s1.unsqueeze(-1)


def unordered_set_coefficients(
    log_p: Tensor, log_rest: Tensor, f: Tensor, baseline: bool = True
) -> Tensor:
    """The coefficients :math:`c_s` of the unordered-set policy gradient, whose estimate of
    :math:`\\nabla \\mathbb E_p[f]` is :math:`\\sum_{s \\in S} c_s \\nabla \\log p(s)`
    (Kool, van Hoof & Welling, 2020, eqs. 10 and 13):

    .. math::

        c_s = p(s) R(S, s) \\Big(f(s) - \\sum_{s' \\in S} p(s')
              R^{D \\setminus \\{s\\}}(S, s') f(s')\\Big)

    with the built-in baseline (``baseline=True``, an unordered-set estimate of
    :math:`\\mathbb E_p[f]` from the other :math:`k - 1` draws, the term :math:`s' = s`
    being :math:`p(s) f(s)`; no further evaluations), or :math:`c_s = p(s) R(S, s) f(s)`
    without it. Unbiased for any :math:`k`; for :math:`k = 1` without the baseline it is
    REINFORCE, and a set holding all the mass gives the exact gradient. Members with
    :math:`p(s) = 0` are absent (see :func:`leave_one_out_log_ratios`): their coefficient
    is 0 and their :math:`f(s)`, which may be anything, is not read; the others' are those
    of the set without them.

    :param torch.Tensor log_p: :math:`\\log p(s)`, ``(..., k)``.
    :param torch.Tensor log_rest: :math:`\\log p(D \\setminus S)`, ``(...)``.
    :param torch.Tensor f: :math:`f(s)`, broadcastable to ``log_p``.
    :param bool baseline: use the built-in baseline (needs :math:`k \\ge 2` to matter).
    :return: :math:`c`, the shape of ``log_p``, the dtype of ``f``; detached.
    """
    log_r1, log_r2 = leave_one_out_log_ratios(log_p, log_rest)
    log_p = log_p.detach().to(torch.float64)
    f64 = f.detach().to(torch.float64).expand(log_p.shape)
    f64 = f64.masked_fill(log_p == -math.inf, 0.0)
    weight = torch.exp(log_p + log_r1)
    if baseline and log_p.shape[-1] > 1:
        inner = torch.exp(log_p.unsqueeze(-2) + log_r2)  # [..., s, s']
        advantage = f64 - (inner * f64.unsqueeze(-2)).sum(-1)
    else:
        advantage = f64
    return (weight * advantage).to(f.dtype)


def unordered_set_surrogate(
    log_p: Tensor, log_rest: Tensor, f: Tensor, baseline: bool = True
) -> Tensor:
    """The surrogate :math:`\\sum_{s \\in S} c_s \\log p(s)` of the unordered-set estimator,
    whose gradient is the estimate of :math:`\\nabla \\mathbb E_p[f]`, with the coefficients
    of :func:`unordered_set_coefficients`; absent members (:math:`p(s) = 0`) contribute
    nothing to its value or gradient.

    :param torch.Tensor log_p: :math:`\\log p(s)`, ``(..., k)``, differentiable.
    :param torch.Tensor log_rest: :math:`\\log p(D \\setminus S)`, ``(...)``.
    :param torch.Tensor f: :math:`f(s)`, broadcastable to ``log_p``.
    :param bool baseline: use the built-in baseline.
    :return: ``(...)``; differentiable in ``log_p``.
    """
    coefficients = unordered_set_coefficients(log_p, log_rest, f, baseline)
    return (coefficients * log_p.masked_fill(log_p == -math.inf, 0.0)).sum(-1)


def indecater_surrogate(logits: Tensor, f: Tensor) -> Tensor:
    """The surrogate of IndeCateR for one categorical variable,
    :math:`\\sum_{c \\in D} p(c) \\, \\bot f(c)`, whose gradient is the exact
    :math:`\\sum_c \\nabla p(c) f(c)` given the evaluations :math:`f(c)` (De Smet,
    Sansone & Zuidberg Dos Martires, 2023, eq. 9; the CatLog-derivative trick with the
    other variables sampled). Constants in :math:`f` contribute nothing
    (:math:`\\sum_c \\nabla p(c) = 0`), so no baseline is needed. Categories with logit
    :math:`-\\infty` contribute nothing, whatever :math:`f` is there (it is not read).

    :param torch.Tensor logits: :math:`\\ell`, categories in the last dimension.
    :param torch.Tensor f: :math:`f(c)` for every category, the shape of ``logits``.
    :return: the surrogate, ``logits.shape[:-1]``; differentiable in ``logits``.
    """
    f = f.detach().masked_fill(logits.detach() == -math.inf, 0.0)
    return (torch.softmax(logits, -1) * f).sum(-1)

"""Pure tensor math behind every estimator in this package.

Nothing here knows about Pyro: each function maps tensors to tensors, so it can be
tested against hand-derived values. The objectives in :mod:`pyro_wakesleep.objectives`
turn traces into tensors and call these functions.

Conventions: ``dim`` is the particle dimension (``K`` independent draws) and every
other dimension is a batch (plate) dimension that the function treats elementwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = [
    "debiased_average",
    "dreg_vimco_surrogate",
    "dreg_wake_phi_surrogate",
    "ema_update",
    "iwae_bound",
    "leave_one_out_mean",
    "normalize_signal",
    "path_only",
    "reduce_to_dims",
    "self_normalized_weights",
    "squared_self_normalized_weights",
    "vimco_baselines",
    "vimco_surrogate",
]


def reduce_to_dims(value: Tensor, keep: Iterable[int]) -> Tensor:
    """Sums ``value`` over every dimension not listed in ``keep``, keeping dimensions.

    This is the plate-wise Rao-Blackwellization step: a cost term is summed over the
    plates that a latent site is *not* in, and kept elementwise over the plates it is in.

    :param torch.Tensor value: a cost term, batch dimensions right-aligned.
    :param keep: negative dimension indices to keep (e.g. ``{-1}`` for a data plate at
        ``dim=-1``). Dimensions that ``value`` does not have are ignored.
    :return: a tensor with the same number of dimensions as ``value``, of size 1 in every
        summed dimension, so that it broadcasts against the site's own log-density.
    """
    keep = set(keep)
    dims = [d for d in range(-value.dim(), 0) if d not in keep and value.shape[d] != 1]
    return value.sum(dim=dims, keepdim=True) if dims else value


def ema_update(
    average: Tensor, weight: Tensor, value: Tensor, decay: float
) -> tuple[Tensor, Tensor]:
    """One step of an exponential moving average with bias-correction weight.

    .. math::

        a_t = \\beta a_{t-1} + (1-\\beta) v_t, \\qquad
        w_t = \\beta w_{t-1} + (1-\\beta),

    starting from :math:`a_0 = w_0 = 0`, so that :math:`a_t / w_t` is an unbiased
    weighted average at every step (as in Adam's bias correction).

    :return: the pair ``(a_t, w_t)``.
    """
    return decay * average + (1.0 - decay) * value, decay * weight + (1.0 - decay)


def debiased_average(average: Tensor, weight: Tensor, default: float = 0.0) -> Tensor:
    """The bias-corrected average :math:`a_t / w_t`, or ``default`` before any update."""
    safe = torch.where(weight > 0, weight, torch.ones_like(weight))
    return torch.where(weight > 0, average / safe, torch.full_like(average, default))


def leave_one_out_mean(value: Tensor, dim: int = 0) -> Tensor:
    """The mean of the other :math:`K-1` entries along ``dim``, for each entry.

    .. math:: b_k = \\frac{1}{K-1} \\sum_{j \\ne k} f_j

    This is the RLOO baseline of Kool et al. (2019): it is independent of draw
    :math:`k` and so leaves the score-function estimator unbiased.

    :raises ValueError: if ``value`` has fewer than 2 entries along ``dim``.
    """
    k = value.shape[dim]
    if k < 2:
        raise ValueError(f"leave-one-out needs at least 2 particles along dim {dim}, got {k}")
    return (value.sum(dim, keepdim=True) - value) / (k - 1)


def normalize_signal(signal: Tensor, mean: Tensor, variance: Tensor) -> Tensor:
    """NVIL centering and variance normalization (Mnih & Gregor, 2014, Alg. 1).

    .. math:: \\hat l = \\frac{l - c}{\\max(1, \\sqrt{v})}

    :param signal: the learning signal, already minus any input-dependent baseline.
    :param mean: running mean :math:`c` of that signal.
    :param variance: running variance :math:`v` of that signal.
    """
    return (signal - mean) / variance.sqrt().clamp(min=1.0)


def iwae_bound(log_weights: Tensor, dim: int = 0) -> Tensor:
    """The importance-weighted bound :math:`\\log \\frac{1}{K}\\sum_k w_k` along ``dim``.

    :param log_weights: :math:`\\log w_k = \\log p(x, z_k) - \\log q(z_k \\mid x)`.
    :return: the bound, with ``dim`` removed.
    """
    return torch.logsumexp(log_weights, dim) - math.log(log_weights.shape[dim])


def self_normalized_weights(log_weights: Tensor, dim: int = 0) -> Tensor:
    """Self-normalized importance weights :math:`\\tilde w_k = w_k / \\sum_j w_j`."""
    return torch.softmax(log_weights, dim)


def vimco_baselines(log_weights: Tensor, dim: int = 0) -> Tensor:
    """VIMCO's per-sample leave-one-out baselines (Mnih & Rezende, 2016, eq. 10).

    The geometric-mean variant: draw :math:`k`'s log-weight is replaced by the mean of
    the other :math:`K-1` log-weights and the bound recomputed,

    .. math::

        \\hat L_{-k} = \\log \\frac{1}{K}\\Big(\\sum_{j \\ne k} w_j
            + \\exp\\big(\\tfrac{1}{K-1} \\textstyle\\sum_{j\\ne k} \\log w_j\\big)\\Big).

    The learning signal of draw :math:`k` is then :math:`\\hat L - \\hat L_{-k}`.

    :return: :math:`\\hat L_{-k}` for every :math:`k`, same shape as ``log_weights``.
    """
    k = log_weights.shape[dim]
    if k < 2:
        raise ValueError(f"VIMCO needs at least 2 particles along dim {dim}, got {k}")
    log_weights = log_weights.movedim(dim, -1)
    geometric = leave_one_out_mean(log_weights, dim=-1)
    # Row k of `replaced` is log_weights with entry k swapped for its geometric mean.
    eye = torch.eye(k, dtype=torch.bool, device=log_weights.device)
    replaced = torch.where(eye, geometric.unsqueeze(-1), log_weights.unsqueeze(-2))
    return iwae_bound(replaced, dim=-1).movedim(-1, dim)


def vimco_surrogate(log_weights: Tensor, log_q: Tensor, dim: int = 0) -> Tensor:
    """The VIMCO surrogate of the importance-weighted bound, per batch element.

    Its value is the bound :math:`\\hat L = \\log \\frac1K \\sum_k w_k` and its gradient is
    VIMCO's (Mnih & Rezende, 2016, eqs. 5 and 10):

    .. math::

        \\nabla \\hat L \\approx \\sum_k \\big(\\hat L - \\hat L_{-k}\\big)\\,
            \\nabla \\log q(z_k) + \\sum_k \\tilde w_k\\, \\nabla \\log w_k,

    with :math:`\\hat L_{-k}` from :func:`vimco_baselines`
    (detached) and :math:`\\tilde w_k = w_k / \\sum_j w_j`.

    :param torch.Tensor log_weights: :math:`\\log w_k`, particles along ``dim``;
        differentiable (the second sum is its gradient).
    :param torch.Tensor log_q: :math:`\\log q(z_k)` of the sites whose gradient is the
        score function, broadcastable to ``log_weights``; only its gradient is used.
    :param int dim: the particle dimension.
    :return: :math:`\\hat L`, with ``dim`` removed.
    """
    bound = iwae_bound(log_weights, dim)
    signal = bound.detach().unsqueeze(dim) - vimco_baselines(log_weights.detach(), dim)
    score = (signal * (log_q - log_q.detach())).sum(dim)
    return bound + score


# -- doubly reparameterized gradients (Tucker et al., 2019; Roeder et al., 2017) ----------


def squared_self_normalized_weights(log_weights: Tensor, dim: int = 0) -> Tensor:
    """Squared self-normalized weights :math:`\\tilde w_k^2`, the coefficients of the
    doubly reparameterized IWAE gradient (Tucker et al., 2019, eq. 7)."""
    return torch.softmax(log_weights, dim) ** 2


def path_only(value: Tensor, stopped: Tensor) -> Tensor:
    """``value`` with the gradient of ``value - stopped``.

    With ``value`` :math:`= \\log q_\\phi(z(\\phi))` (a log-density at pathwise draws)
    and ``stopped`` :math:`= \\log q_\\phi(\\bot z)` (the same log-density at the draws
    held constant), the result has the value of :math:`\\log q` and the gradient of
    :math:`\\log q_{\\bot\\phi}(z(\\phi))`: the path through the draws only, the score
    :math:`\\nabla_\\phi \\log q_\\phi(z)|_{z}` removed ("sticking the landing",
    Roeder et al., 2017).
    """
    return value - (stopped - stopped.detach())


def dreg_vimco_surrogate(
    log_weights: Tensor, path_log_weights: Tensor, log_q: Tensor, dim: int = 0
) -> Tensor:
    """The doubly reparameterized (DReG) surrogate of the importance-weighted bound,
    per batch element, with VIMCO's estimator at the score-function sites.

    Its value is the bound :math:`\\hat L = \\log\\frac1K\\sum_k w_k` and its gradient

    .. math::

        \\sum_k \\tilde w_k\\, \\nabla \\ell_k
            + \\sum_k \\tilde w_k^2\\, \\nabla \\ell^{\\rm path}_k
            + \\sum_k \\big(\\hat L - \\hat L_{-k}\\big)\\, \\nabla \\log q(z^{\\rm sf}_k),

    with :math:`\\tilde w_k = w_k/\\sum_j w_j` and :math:`\\hat L_{-k}` of
    :func:`vimco_baselines` held constant (Tucker et al., 2019, eq. 7, for the
    reparameterized part; Mnih & Rezende, 2016, for the rest).

    :param torch.Tensor log_weights: :math:`\\ell_k = \\log w_k`, particles along
        ``dim``; the weights are computed from its value, and its gradient enters with
        coefficient :math:`\\tilde w_k` (the caller gives it the gradient of the model
        parameters and of the score-function sites' log-densities).
    :param torch.Tensor path_log_weights: a tensor whose gradient enters with coefficient
        :math:`\\tilde w_k^2`: :math:`\\partial \\log w_k/\\partial z_k \\cdot
        \\partial z_k/\\partial \\phi` through the reparameterized draws; its value is
        ignored.
    :param torch.Tensor log_q: :math:`\\log q(z^{\\rm sf}_k)`, broadcastable to
        ``log_weights``; only its gradient is used.
    :param int dim: the particle dimension.
    :return: :math:`\\hat L`, with ``dim`` removed.
    """
    weights = self_normalized_weights(log_weights.detach(), dim)
    bound = iwae_bound(log_weights.detach(), dim)
    signal = bound.unsqueeze(dim) - vimco_baselines(log_weights.detach(), dim)
    terms = (weights * log_weights + weights**2 * path_log_weights
             + signal * log_q).sum(dim)
    return bound + (terms - terms.detach())


def dreg_wake_phi_surrogate(
    log_weights: Tensor, path_log_weights: Tensor, log_q: Tensor, dim: int = 0
) -> Tensor:
    """The doubly reparameterized (DReG) estimator of reweighted wake-sleep's wake-phi
    gradient, per batch element: a tensor of value zero whose gradient is

    .. math::

        \\sum_k \\big(\\tilde w_k - \\tilde w_k^2\\big)\\, \\nabla \\ell^{\\rm path}_k
            + \\sum_k \\tilde w_k\\, \\nabla \\log q(z^{\\rm sf}_k),

    an estimator of :math:`\\sum_k \\tilde w_k \\nabla_\\phi \\log q_\\phi(z_k)`, the
    direction that lowers :math:`\\mathrm{KL}(p\\,\\|\\,q)` (Tucker et al., 2019,
    section 5), with the weights held constant.

    :param torch.Tensor log_weights: :math:`\\log w_k` (only its value is used).
    :param torch.Tensor path_log_weights: its gradient is :math:`\\partial \\log
        w_k/\\partial z_k \\cdot \\partial z_k/\\partial \\phi` through the
        reparameterized draws; its value is ignored.
    :param torch.Tensor log_q: :math:`\\log q(z^{\\rm sf}_k)` of the score-function
        sites, broadcastable to ``log_weights``; only its gradient is used.
    :param int dim: the particle dimension.
    :return: zeros of the shape of ``log_weights`` with ``dim`` removed.
    """
    weights = self_normalized_weights(log_weights.detach(), dim)
    terms = ((weights - weights**2) * path_log_weights + weights * log_q).sum(dim)
    return terms - terms.detach()

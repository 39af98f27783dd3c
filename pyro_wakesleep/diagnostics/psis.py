"""Importance weights of a guide, their Pareto k-hat, and PSIS-LOO for a variational fit.

The guide's draws :math:`z_s \\sim q(z \\mid x)` are drawn in one vectorized pass (an outer
plate of size :math:`S`), and their log importance weights
:math:`\\log w_s = \\log p(x, z_s) - \\log q(z_s \\mid x)` are read off the traces. Pareto
smoothed importance sampling (Vehtari et al., 2015/2024) fits a generalized Pareto
distribution to the largest weights; its shape :math:`\\hat k` says whether the guide
can be trusted as an importance proposal for the posterior (Yao et al., 2018, "Yes, but
did it work?": :math:`\\hat k < 0.5` good, :math:`0.5 \\le \\hat k \\le 0.7` usable,
:math:`\\hat k > 0.7` unreliable).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pyro.ops.stats import fit_generalized_pareto
from torch import Tensor

from pyro_wakesleep._validation import check_int
from pyro_wakesleep.diagnostics.backend import arviz_backend, as_chain_draw
from pyro_wakesleep.diagnostics.draws import draw_guide

__all__ = ["log_importance_weights", "psis_khat", "variational_loo"]


def log_importance_weights(
    model: Callable, guide: Callable, *args: Any, num_samples: int = 1000,
    max_plate_nesting: int | None = None, **kwargs: Any,
) -> Tensor:
    """The log importance weights :math:`\\log w_s = \\log p(x, z_s) - \\log q(z_s \\mid x)`
    of ``num_samples`` guide draws :math:`z_s \\sim q`, drawn in one vectorized pass (the
    model and guide must be vectorizable, as for
    :func:`pyro.infer.importance.vectorized_importance_weights`, which gives the same
    weights under the same seed). Densities are scaled as the ELBO scales them
    (subsampling).

    :param callable model: the model.
    :param callable guide: the guide.
    :param int num_samples: number of draws :math:`S`.
    :param int max_plate_nesting: the plate nesting of model and guide (guessed from one
        run if omitted).
    :return: a ``(num_samples,)`` tensor.
    :raises ValueError: if ``num_samples < 1``, the guide misses a latent of the model,
        or a weight is non-finite (naming the site and the number of draws).
    """
    draws = draw_guide(model, guide, args, kwargs, num_samples, max_plate_nesting)
    return draws.log_p - draws.log_q


def _as_log_weights(log_weights: Any) -> Tensor:
    if hasattr(log_weights, "groups") or hasattr(log_weights, "children"):  # ArviZ data
        try:
            log_weights = log_weights["sample_stats"]["log_weight"].values.reshape(-1)
        except KeyError as err:
            raise ValueError(
                "the ArviZ data has no sample_stats.log_weight; build it with "
                "pyro_wakesleep.diagnostics.from_guide(model, guide, ...)"
            ) from err
    value = torch.as_tensor(np.asarray(log_weights, dtype=np.float64))
    if value.numel() == 0:
        raise ValueError("psis_khat: no log weights given")
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"psis_khat: {bad} of {value.numel()} log weights are not finite")
    return value


def _khat_1d(log_weights: Tensor) -> float:
    # The tail selection and the fit of pyro.infer.importance.psis_diagnostic.
    num = log_weights.numel()
    lw = torch.sort(log_weights - log_weights.max())[0]
    cutoff_index = -math.ceil(min(0.2 * num, 3.0 * math.sqrt(num))) - 1
    if -cutoff_index > num:
        return math.inf
    cutoff = max(math.log(1.0e-15), float(lw[cutoff_index]))
    tail = lw[lw > cutoff]
    if tail.numel() < 10:
        return math.inf
    k, _ = fit_generalized_pareto(tail.exp() - math.exp(cutoff))
    return float(k)


def psis_khat(log_weights: Any, dim: int = -1) -> float | Tensor:
    """The Pareto shape :math:`\\hat k` of the largest importance weights (PSIS; Vehtari,
    Simpson, Gelman, Yao & Gabry, 2024; as a diagnostic of variational inference: Yao,
    Vehtari, Simpson & Gelman, 2018).

    The :math:`M = \\lceil\\min(0.2 S, 3\\sqrt S)\\rceil` largest of the :math:`S` weights,
    less the :math:`(M+1)`-th largest, are fitted by a generalized Pareto distribution
    (Zhang & Stephens, 2009, with the weakly informative prior of PSIS); the same tail,
    fit and result as :func:`pyro.infer.importance.psis_diagnostic` and classic
    ``arviz.psislw`` on the same weights. :math:`\\hat k < 0.5`: the guide is a good
    importance proposal for the posterior; :math:`\\hat k > 0.7`: it is not. The estimate
    is noisy (sd about 0.1 for :math:`S = 10^4` near :math:`k = 0.7`) and biased low before
    the asymptotic regime.

    :param log_weights: log importance weights :math:`\\log p(x, z_s) - \\log q(z_s)`: a
        tensor or array (draws along ``dim``; other dims are a batch of independent
        sets), e.g. from :func:`log_importance_weights`, or the result of
        :func:`~pyro_wakesleep.diagnostics.from_guide` /
        :func:`~pyro_wakesleep.diagnostics.to_arviz` (its ``sample_stats.log_weight``).
    :param int dim: the dimension that indexes draws.
    :return: :math:`\\hat k` (a float for 1-D input, else a tensor of the batch shape;
        ``inf`` where fewer than 10 weights are in the tail).
    :raises ValueError: for no weights or non-finite weights.
    """
    value = _as_log_weights(log_weights)
    check_int(dim, "dim", minimum=-max(value.dim(), 1))
    if dim >= max(value.dim(), 1):
        raise ValueError(
            f"dim={dim} is out of range for log-weights of shape {tuple(value.shape)}"
        )
    if value.dim() <= 1:
        return _khat_1d(value.reshape(-1))
    flat = value.movedim(dim, -1)
    out = torch.tensor([_khat_1d(row) for row in flat.reshape(-1, flat.shape[-1])])
    return out.reshape(flat.shape[:-1])


def variational_loo(data: Any, var_name: str | None = None, pointwise: bool = True) -> Any:
    """PSIS-LOO-CV of a variational fit, corrected for the guide being only an
    approximation of the posterior (Magnusson, Andersen, Jonasson & Vehtari, 2019).

    For draws :math:`z_s \\sim q` the leave-one-out weights of datapoint :math:`i` are
    Pareto smoothed from

    .. math:: \\log r_{s,i} = \\log p(x, z_s) - \\log q(z_s) - \\log p(x_i \\mid z_s),

    and :math:`\\widehat{\\mathrm{elpd}}_i = \\log \\sum_s \\tilde w_{s,i}\\, p(x_i \\mid z_s)`.
    With ArviZ 1.x this is ``arviz_stats.loo_approximate_posterior``; with classic ArviZ
    the same computation with ``arviz.psislw``, returned as the ``ELPDData`` of
    ``arviz.loo`` (so ``arviz.compare`` accepts it).

    :param data: the result of :func:`~pyro_wakesleep.diagnostics.from_guide` (or
        :func:`~pyro_wakesleep.diagnostics.to_arviz` of a model and guide): it needs
        ``log_likelihood`` and ``sample_stats.log_p/log_q``; its draws may be along
        ``(chain, draw)`` or ``sample``.
    :param str var_name: the observed site to use if the model has several.
    :param bool pointwise: keep the pointwise ``elpd_i`` / ``loo_i`` and ``pareto_k``.
    :return: ArviZ's ``ELPDData``.
    """
    try:
        log_p, log_q = data["sample_stats"]["log_p"], data["sample_stats"]["log_q"]
    except KeyError as err:
        raise ValueError(
            "variational_loo needs sample_stats.log_p and log_q: build the data with "
            "pyro_wakesleep.diagnostics.from_guide(model, guide, ...)"
        ) from err
    data = as_chain_draw(data)  # ArviZ's LOO reads (chain, draw) only
    if arviz_backend() == "datatree":
        import arviz_stats

        stats = data["sample_stats"]
        return arviz_stats.loo_approximate_posterior(
            data, log_p=stats["log_p"], log_q=stats["log_q"], var_name=var_name,
            pointwise=pointwise
        )
    return _classic_loo(data, np.asarray(log_p - log_q).reshape(-1), var_name, pointwise)


def _classic_loo(data: Any, correction: np.ndarray, var_name: str | None, pointwise: bool) -> Any:
    import warnings

    import arviz as az
    from scipy.special import logsumexp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = az.loo(data, pointwise=True, var_name=var_name)
    names = list(data.log_likelihood.data_vars)
    loglik = data.log_likelihood[var_name or names[0]].stack(__sample__=("chain", "draw"))
    loglik = loglik.transpose(..., "__sample__")
    log_ratios = -loglik.values + (correction - correction.max())
    log_ratios = log_ratios - log_ratios.max(axis=-1, keepdims=True)
    log_weights, pareto_k = az.psislw(log_ratios)
    elpd_i = logsumexp(np.asarray(log_weights) + loglik.values, axis=-1)
    num = loglik.shape[-1]
    lppd_i = logsumexp(loglik.values, axis=-1) - math.log(num)
    good_k = min(1 - 1 / np.log10(num), 0.7)
    result["elpd_loo"] = float(elpd_i.sum())
    result["se"] = float((elpd_i.size * np.var(elpd_i)) ** 0.5)
    result["p_loo"] = float((lppd_i - elpd_i).sum())
    result["warning"] = bool(np.any(np.asarray(pareto_k) > good_k))
    result["loo_i"] = result["loo_i"].copy(data=elpd_i)
    result["pareto_k"] = result["pareto_k"].copy(data=np.asarray(pareto_k))
    if not pointwise:
        result = result.drop(["loo_i", "pareto_k"])
    return result

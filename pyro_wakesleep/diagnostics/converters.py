"""From a Pyro model and guide, an MCMC run, or a dict of draws to ArviZ.

:func:`from_guide`, :func:`from_mcmc` and :func:`from_samples` follow ArviZ's own
``from_*`` converters; :func:`to_arviz` takes any of the three sources and dispatches.
Each returns the installed ArviZ's data structure: an :class:`arviz.InferenceData`
(classic ArviZ, ``arviz<1``) or an :class:`xarray.DataTree` (ArviZ 1.x,
``arviz-base``). ArviZ is an optional extra, imported only when a converter runs.

Groups: ``posterior`` (latents and ``pyro.deterministic`` sites), ``posterior_predictive``
(observed sites redrawn from the model at each draw), ``log_likelihood`` (pointwise
:math:`\\log p(x_i \\mid z_s)` of every observed site, unscaled), ``observed_data`` and
``sample_stats``: ``log_p`` :math:`= \\log p(x, z_s)` and, for a guide, ``log_q``
:math:`= \\log q(z_s \\mid x)` and ``log_weight`` :math:`= \\log p - \\log q` (for
:func:`~pyro_wakesleep.diagnostics.psis_khat`); for MCMC also ``diverging``. Dimensions of
:class:`pyro.plate` are named after the plate (the subsample indices are its coordinates
when subsampled); other batch dimensions of size 1 are dropped; event dimensions are
``<site>_dim_<k>``, as ArviZ names them.

The draws' own dimensions follow ArviZ: ``(chain, draw)`` for MCMC; for independent draws
(a guide's, or a dict of them) ``(chain, draw)`` of one chain under classic ArviZ and
``sample`` under ArviZ 1.x, as ``arviz_base.from_numpyro_svi`` does for NumPyro's SVI
(``sample_dims`` chooses). The model (and guide) must be vectorizable over an extra outer
plate, as for :func:`pyro.infer.importance.psis_diagnostic`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyro
from torch import Tensor

from pyro_wakesleep._validation import check_int
from pyro_wakesleep.diagnostics.backend import arviz_backend, container, sample_dims
from pyro_wakesleep.diagnostics.fits import Fit, guide_fit, mcmc_fit, samples_fit
from pyro_wakesleep.diagnostics.groups import datasets

__all__ = ["from_guide", "from_mcmc", "from_samples", "to_arviz"]

Dims = Mapping[str, Sequence[str]] | None


def _check_dims(dims: Dims, coords: Mapping[str, Any] | None) -> None:
    """Raises ``TypeError`` naming the entry of ``dims``/``coords`` of the wrong type
    (before anything is drawn)."""
    if dims is not None:
        if not isinstance(dims, Mapping):
            raise TypeError(f"dims must be a dict of site name to dimension names, got {dims!r}")
        for name, names in dims.items():
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise TypeError(f"dims['{name}'] must be a sequence of str, got {names!r}")
    if coords is not None and not isinstance(coords, Mapping):
        raise TypeError(f"coords must be a dict of dimension name to values, got {coords!r}")


def _convert(fit: Fit, independent: bool, given: Sequence[str] | None, dims: Dims,
             coords: Mapping[str, Any] | None, predictive: bool, loglik: bool) -> Any:
    layout = sample_dims(given, independent)
    return container(datasets(fit, layout, dict(dims or {}), dict(coords or {}), predictive,
                              loglik))


def from_guide(
    model: Callable, guide: Callable, *args: Any, num_samples: int = 1000,
    max_plate_nesting: int | None = None, dims: Dims = None,
    coords: Mapping[str, Any] | None = None, sample_dims: Sequence[str] | None = None,
    posterior_predictive: bool = True, log_likelihood: bool = True, **kwargs: Any,
) -> Any:
    """``num_samples`` draws :math:`z_s \\sim q(z \\mid x)` of a fitted guide, in one
    vectorized pass, with the model's densities at them, as ArviZ data (groups: see
    :mod:`~pyro_wakesleep.diagnostics.converters`; ``sample_stats`` has ``log_p``,
    ``log_q`` and ``log_weight``).

    :param callable model: the model.
    :param callable guide: the guide; it must sample every latent of the model.
    :param args: the model's and guide's positional arguments (``kwargs``: keyword ones).
    :param int num_samples: number of draws :math:`S`.
    :param int max_plate_nesting: the plate nesting of model and guide (guessed from one
        run if omitted).
    :param dict dims: variable name to the names of its dimensions after the draws', as
        in ``arviz.from_dict``; for ``log_likelihood`` the leading (batch) names of the
        observed variable's are used.
    :param dict coords: dimension name to coordinate values.
    :param tuple sample_dims: ``("sample",)`` or ``("chain", "draw")`` (one chain); default
        ``("sample",)`` under ArviZ 1.x (``arviz_base.from_numpyro_svi``'s convention),
        ``("chain", "draw")`` under classic ArviZ. ``arviz_stats.loo`` and ``compare``
        read ``(chain, draw)`` only (:func:`~pyro_wakesleep.diagnostics.variational_loo`
        reads both).
    :param bool posterior_predictive: include the posterior predictive group.
    :param bool log_likelihood: include the log likelihood (needs observed sites).
    :return: :class:`arviz.InferenceData` (classic ArviZ) or :class:`xarray.DataTree`.
    :raises ImportError: without ArviZ.
    :raises ValueError: for ``num_samples < 1``, a guide that misses a latent of the model,
        a model without observed sites (unless ``log_likelihood=False``), or non-finite
        log-densities (naming the site).
    """
    arviz_backend()
    _check_dims(dims, coords)
    fit = guide_fit(model, guide, args, kwargs, num_samples, max_plate_nesting)
    return _convert(fit, True, sample_dims, dims, coords, posterior_predictive,
                    log_likelihood)


def from_mcmc(
    mcmc: pyro.infer.MCMC, *args: Any, max_plate_nesting: int | None = None,
    dims: Dims = None, coords: Mapping[str, Any] | None = None,
    sample_dims: Sequence[str] | None = None, posterior_predictive: bool = True,
    log_likelihood: bool = True, **kwargs: Any,
) -> Any:
    """The draws of every chain of a :class:`pyro.infer.MCMC` run as ArviZ data, along
    ``(chain, draw)`` (``sample_stats``: ``log_p`` and ``diverging``): a reference to
    compare a guide with (classic ``arviz.from_pyro`` does this for classic ArviZ only;
    ArviZ 1.x has no Pyro converter).

    :param pyro.infer.MCMC mcmc: an MCMC run whose kernel was built from a model.
    :param args: the model's arguments (``kwargs``: keyword ones); those of ``mcmc.run``
        if none are given.
    :param int max_plate_nesting: the model's plate nesting (read off one run of the
        model if omitted).
    :param dict dims: variable name to the names of its dimensions after the draws'.
    :param dict coords: dimension name to coordinate values.
    :param tuple sample_dims: ``("chain", "draw")`` (default) or ``("sample",)`` (the
        chains one after the other).
    :param bool posterior_predictive: include the posterior predictive group.
    :param bool log_likelihood: include the log likelihood (needs observed sites).
    :return: :class:`arviz.InferenceData` (classic ArviZ) or :class:`xarray.DataTree`.
    :raises ImportError: without ArviZ.
    :raises ValueError: for a kernel built from a ``potential_fn``, a model without
        observed sites (unless ``log_likelihood=False``), or non-finite log-densities.
    """
    arviz_backend()
    _check_dims(dims, coords)
    fit = mcmc_fit(mcmc, args, kwargs, max_plate_nesting)
    return _convert(fit, False, sample_dims, dims, coords, posterior_predictive,
                    log_likelihood)


def from_samples(
    model: Callable, samples: Mapping[str, Tensor], *args: Any,
    max_plate_nesting: int | None = None, dims: Dims = None,
    coords: Mapping[str, Any] | None = None, sample_dims: Sequence[str] | None = None,
    posterior_predictive: bool = True, log_likelihood: bool = True, **kwargs: Any,
) -> Any:
    """Independent posterior draws of the model's latents, such as
    :class:`pyro.infer.Predictive` returns, as ArviZ data (``sample_stats``: ``log_p``).

    :param callable model: the model.
    :param dict samples: site name to a ``(S, ...)`` tensor of draws; it must have every
        latent of the model (with ``Predictive``, list them in ``return_sites``);
        Predictive's padded size-1 axes are removed; observed sites in it become the
        posterior predictive; ``pyro.deterministic`` sites are recomputed.
    :param args: the model's arguments (``kwargs``: keyword ones).
    :param int max_plate_nesting: the model's plate nesting (read off one run of the
        model if omitted).
    :param dict dims: variable name to the names of its dimensions after the draws'.
    :param dict coords: dimension name to coordinate values.
    :param tuple sample_dims: as for :func:`from_guide`: ``("sample",)`` under ArviZ 1.x
        and ``("chain", "draw")`` (one chain) under classic ArviZ unless given.
    :param bool posterior_predictive: include the posterior predictive group.
    :param bool log_likelihood: include the log likelihood (needs observed sites).
    :return: :class:`arviz.InferenceData` (classic ArviZ) or :class:`xarray.DataTree`.
    :raises ImportError: without ArviZ.
    :raises ValueError: for an empty dict, draws of a site the model does not have, of
        the wrong shape or number, a missing latent, a model without observed sites
        (unless ``log_likelihood=False``), or non-finite log-densities.
    """
    arviz_backend()
    _check_dims(dims, coords)
    fit = samples_fit(model, dict(samples), 1, args, kwargs, max_plate_nesting, {})
    return _convert(fit, True, sample_dims, dims, coords, posterior_predictive,
                    log_likelihood)


def to_arviz(
    model: Any, guide: Any = None, *args: Any, num_samples: int = 1000,
    dims: Dims = None, coords: Mapping[str, Any] | None = None,
    max_plate_nesting: int | None = None, sample_dims: Sequence[str] | None = None,
    posterior_predictive: bool = True, log_likelihood: bool = True, **kwargs: Any,
) -> Any:
    """Converts a fitted model to the data structure of the installed ArviZ, from any of
    three sources (each with the model's own ``*args, **kwargs``):

    * ``to_arviz(model, guide, *args, **kwargs)``: :func:`from_guide`;
    * ``to_arviz(mcmc)``: :func:`from_mcmc` (the arguments of ``mcmc.run`` are reused
      unless given after ``mcmc``);
    * ``to_arviz(model, samples, *args, **kwargs)``, ``samples`` a dict of draws:
      :func:`from_samples`.

    :param model: the model, or a :class:`pyro.infer.MCMC` that has run.
    :param guide: the guide, or a dict of posterior draws.
    :param int num_samples: number of guide draws (checked, but unused, for MCMC and
        given draws).
    :param dict dims: variable name to the names of its dimensions after the draws'.
    :param dict coords: dimension name to coordinate values.
    :param int max_plate_nesting: the model's plate nesting (guessed if omitted).
    :param tuple sample_dims: the draws' dimensions (see :func:`from_guide`).
    :param bool posterior_predictive: include the posterior predictive group.
    :param bool log_likelihood: include the log likelihood (needs observed sites).
    :return: :class:`arviz.InferenceData` (classic ArviZ) or :class:`xarray.DataTree`.
    :raises ImportError: without ArviZ.
    :raises TypeError: for another combination of sources.
    :raises ValueError: as the converter it dispatches to.
    """
    arviz_backend()
    check_int(num_samples, "num_samples")
    options: dict[str, Any] = {
        "max_plate_nesting": max_plate_nesting, "dims": dims, "coords": coords,
        "sample_dims": sample_dims, "posterior_predictive": posterior_predictive,
        "log_likelihood": log_likelihood,
    }
    if isinstance(model, pyro.infer.MCMC):
        args = (guide, *args) if guide is not None else args
        return from_mcmc(model, *args, **options, **kwargs)
    if isinstance(guide, Mapping):
        return from_samples(model, guide, *args, **options, **kwargs)
    if callable(model) and callable(guide):
        return from_guide(model, guide, *args, num_samples=num_samples, **options, **kwargs)
    raise TypeError(
        "to_arviz takes (model, guide, *args), (mcmc) or (model, samples_dict, *args); "
        f"got model={model!r}, guide={guide!r}"
    )

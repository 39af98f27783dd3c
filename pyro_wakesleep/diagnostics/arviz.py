"""From a Pyro model and guide (or MCMC, or ``Predictive`` draws) to ArviZ.

Classic ArviZ (``arviz<1``) gets an :class:`arviz.InferenceData`; ArviZ 1.x
(``arviz-base``) an :class:`xarray.DataTree`. ArviZ is an optional extra: it is imported
only when :func:`to_arviz` runs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from pyro_wakesleep.diagnostics._sources import Fit, from_guide, from_mcmc, from_samples, nodes
from pyro_wakesleep.diagnostics.psis import DRAW_PLATE, check_num_samples
from pyro_wakesleep.objectives._traces import is_sample

__all__ = ["arviz_backend", "to_arviz"]

_INSTALL = "pip install pyro-wakesleep[arviz]"


def arviz_backend() -> str:
    """Which ArviZ is installed: ``"classic"`` (``arviz<1``, :class:`arviz.InferenceData`)
    or ``"datatree"`` (ArviZ 1.x / ``arviz-base``, :class:`xarray.DataTree`).

    :raises ImportError: if neither is installed, saying what to install.
    """
    try:
        import arviz

        if int(arviz.__version__.split(".")[0]) < 1:
            return "classic"
    except ImportError:
        pass
    try:
        import arviz_base  # noqa: F401
    except ImportError as err:
        raise ImportError(f"this needs ArviZ, an optional extra: {_INSTALL}") from err
    return "datatree"


def to_arviz(
    model: Any, guide: Any = None, *args: Any, num_samples: int = 1000,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Any] | None = None, max_plate_nesting: int | None = None,
    posterior_predictive: bool = True, log_likelihood: bool = True, **kwargs: Any,
) -> Any:
    """Converts a fitted model to the data structure of the installed ArviZ.

    Three sources, each with the model's own ``*args, **kwargs``:

    * ``to_arviz(model, guide, *args, **kwargs)``: ``num_samples`` draws from the guide
      (one chain), in one vectorized pass;
    * ``to_arviz(mcmc)``: the draws of a :class:`pyro.infer.MCMC` run (all chains; the
      arguments of ``mcmc.run`` are reused unless given after ``mcmc``);
    * ``to_arviz(model, samples, *args, **kwargs)``: a dict of draws such as
      :class:`pyro.infer.Predictive` returns (``return_sites`` must include every latent;
      Predictive's padded size-1 axes are removed; observed sites in it become the
      posterior predictive).

    Groups: ``posterior`` (latents and ``pyro.deterministic`` sites), ``posterior_predictive``
    (observed sites redrawn from the model at each draw), ``log_likelihood`` (pointwise
    :math:`\\log p(x_i \\mid z_s)` of every observed site, unscaled), ``observed_data`` and
    ``sample_stats``: ``log_p`` :math:`= \\log p(x, z_s)` and, for a guide, ``log_q``
    :math:`= \\log q(z_s \\mid x)` and ``log_weight`` :math:`= \\log p - \\log q` (for
    :func:`~pyro_wakesleep.diagnostics.psis_khat`); for MCMC also ``diverging``.
    Dimensions of :class:`pyro.plate` are named after the plate (the subsample indices
    are its coordinates when subsampled); other batch dimensions of size 1 are dropped;
    event dimensions are ``<site>_dim_<k>``, as ArviZ names them.

    The model (and guide) must be vectorizable over an extra outer plate, as for
    :func:`pyro.infer.importance.psis_diagnostic`.

    :param model: the model, or a :class:`pyro.infer.MCMC` that has run.
    :param guide: the guide, or a dict of posterior draws.
    :param int num_samples: number of guide draws (ignored for MCMC and given draws).
    :param dict dims: variable name to the names of its dimensions after
        ``(chain, draw)``, as in ``arviz.from_dict``; for ``log_likelihood`` the leading
        (batch) names of the observed variable's are used.
    :param dict coords: dimension name to coordinate values.
    :param int max_plate_nesting: the model's plate nesting (guessed if omitted).
    :param bool posterior_predictive: include the posterior predictive group.
    :param bool log_likelihood: include the log likelihood (needs observed sites).
    :return: :class:`arviz.InferenceData` (classic ArviZ) or :class:`xarray.DataTree`.
    :raises ImportError: without ArviZ. :raises ValueError: for ``num_samples < 1``, a
        guide that misses a latent of the model, a model without observed sites,
        draws of the wrong shape, or non-finite log-densities.
    """
    backend = arviz_backend()
    check_num_samples(num_samples)
    if isinstance(model, pyro.infer.MCMC):
        args = (guide, *args) if guide is not None else args
        fit = from_mcmc(model, args, kwargs, max_plate_nesting)
    elif isinstance(guide, Mapping):
        fit = from_samples(model, dict(guide), 1, args, kwargs, max_plate_nesting, {})
    elif callable(model) and callable(guide):
        fit = from_guide(model, guide, args, kwargs, num_samples, max_plate_nesting)
    else:
        raise TypeError(
            "to_arviz takes (model, guide, *args), (mcmc) or (model, samples_dict, *args); "
            f"got model={model!r}, guide={guide!r}"
        )
    groups = _groups(fit, dict(dims or {}), dict(coords or {}), posterior_predictive,
                     log_likelihood)
    return _assemble(groups, backend)


def _named(name: str, node: Any, value: Tensor, nesting: int, num: int | None,
           event: bool) -> tuple[list[str], np.ndarray]:
    """A site's tensor as (dims, array): plate dims named, other size-1 batch dims
    dropped; ``num`` draws along a leading axis (``None``: no draw axis)."""
    value = value.detach()
    lead = 0 if num is None else 1
    rank = nesting + lead
    ev = node["fn"].event_dim if event else 0
    if node["infer"].get("_deterministic"):  # pyro.deterministic: event_dim=value.ndim
        ev = max(0, value.dim() - rank)
    batch = value.dim() - ev
    if batch > rank:
        raise ValueError(
            f"site '{name}' has {batch - lead} batch dimensions, more than max_plate_nesting="
            f"{nesting}; declare them with pyro.plate"
        )
    value = value.reshape((1,) * (rank - batch) + value.shape)
    if num is not None:
        value = value.expand((num, *value.shape[1:]))
    plates = {f.dim: f.name for f in node["cond_indep_stack"]
              if f.vectorized and f.name != DRAW_PLATE}
    dims: list[str] = []
    keep = list(range(lead))
    for i, pos in enumerate(range(-nesting, 0)):
        axis = lead + i
        if pos in plates:
            dims.append(plates[pos])
        elif value.shape[axis] == 1:
            continue
        else:
            dims.append(f"{name}_dim_{len(dims)}")
        keep.append(axis)
    dims += [f"{name}_dim_{len(dims) + j}" for j in range(ev)]
    keep += list(range(rank, value.dim()))
    squeeze = [a for a in range(rank) if a not in keep]
    array = value.squeeze(squeeze) if squeeze else value
    return dims, array.cpu().numpy()


Group = dict[str, tuple[list[str], np.ndarray]]


def _groups(fit: Fit, dims: dict, coords: dict, predictive: bool, loglik: bool) -> dict:
    trace, nest = nodes(fit.trace), fit.nesting
    num = next(iter(fit.stats.values())).shape[0]
    observed = [n for n, s in trace.items() if is_sample(s) and s["is_observed"]
                and n not in fit.latents and not s["infer"].get("_deterministic")]
    if loglik and not observed:
        raise ValueError(
            "the model has no observed sample site (pyro.sample(..., obs=data)) to compute "
            "log_likelihood from; pass the data to the model, or log_likelihood=False"
        )
    posterior_names = [n for n, s in trace.items() if is_sample(s) and (
        n in fit.latents or s["infer"].get("_deterministic"))]
    groups: dict[str, Group] = {
        "posterior": {n: _named(n, trace[n], trace[n]["value"], nest, num, True)
                      for n in posterior_names},
    }
    if observed:
        groups["observed_data"] = {n: _named(n, trace[n], _obs(trace[n]), nest,
                                             None, True) for n in observed}
    if loglik:
        groups["log_likelihood"] = {
            n: _named(n, trace[n], trace[n]["unscaled_log_prob"], nest, num, False)
            for n in observed}
    if predictive and observed:
        draws = fit.predictive or _predict(fit)
        groups["posterior_predictive"] = {
            n: _named(n, trace[n], draws[n], nest, num, True) for n in observed
            if n in draws}
    groups["sample_stats"] = {k: ([], v) for k, v in fit.stats.items()}
    for group in groups.values():
        for name, (default, array) in list(group.items()):
            if name in dims:
                given = list(dims[name])[:len(default)]
                if len(given) != len(default):
                    raise ValueError(f"dims for '{name}' name {len(given)} dimensions, "
                                     f"its draws have {len(default)}: {default}")
                group[name] = (given, array)
    coords = {**_subsample_coords(fit.trace), **coords}
    return {name: (group, coords, name != "observed_data", fit.chains)
            for name, group in groups.items()}


def _obs(node: Any) -> Tensor:
    fn = node["fn"]
    return torch.broadcast_to(node["value"], fn.batch_shape[1:] + fn.event_shape)


def _predict(fit: Fit) -> dict[str, Tensor]:
    num = next(iter(fit.stats.values())).shape[0]
    plate = pyro.plate(DRAW_PLATE, num, dim=-(fit.nesting + 1))
    # deterministic sites keep their traced values: unconditioned, they would be redrawn
    # and broadcast against the draws' plate a second time
    fixed = {**fit.latents, **{n: s["value"] for n, s in nodes(fit.trace).items()
                               if is_sample(s) and s["infer"].get("_deterministic")}}
    model = poutine.condition(poutine.uncondition(plate(fit.model)), data=fixed)
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(model).get_trace(*fit.args, **fit.kwargs)
    return {n: s["value"] for n, s in nodes(trace).items() if is_sample(s)}


def _subsample_coords(trace: Trace) -> dict[str, np.ndarray]:
    coords = {}
    for name, node in nodes(trace).items():
        if (node["type"] == "sample" and site_is_subsample(node) and name != DRAW_PLATE
                and node["value"].numel() < node["fn"].size):
            coords[name] = node["value"].cpu().numpy()
    return coords


def _assemble(groups: dict, backend: str) -> Any:
    import xarray as xr

    attrs = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "inference_library": "pyro",
             "inference_library_version": pyro.__version__,
             "creation_library": "pyro_wakesleep"}
    datasets = {}
    for name, (group, coords, sampled, chains) in groups.items():
        data_vars: dict[str, Any] = {}
        sizes: dict[str, int] = {}
        for var, (dims, array) in group.items():
            if sampled:
                array = array.reshape((chains, -1, *array.shape[1:]))
                dims = ["chain", "draw", *dims]
            data_vars[var] = (dims, array)
            sizes.update(zip(dims, array.shape, strict=True))
        axes = {d: np.asarray(coords[d]) if d in coords else np.arange(n)
                for d, n in sizes.items()}
        datasets[name] = xr.Dataset(data_vars, coords=axes, attrs=attrs)
    if backend == "classic":
        import arviz as az

        return az.InferenceData(**datasets)  # type: ignore[arg-type]
    return xr.DataTree.from_dict({f"/{k}": v for k, v in datasets.items()})

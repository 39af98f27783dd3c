"""From a :class:`~pyro_wakesleep.diagnostics.fits.Fit` to the ArviZ groups, one
:class:`xarray.Dataset` each: ``posterior``, ``observed_data``, ``log_likelihood``,
``posterior_predictive`` and ``sample_stats``.

Dimensions of :class:`pyro.plate` are named after the plate (the subsample indices are
its coordinates when subsampled); other batch dimensions of size 1 are dropped; event
dimensions are ``<site>_dim_<k>``, as ArviZ names them. Used by
:mod:`~pyro_wakesleep.diagnostics.converters`; nothing here is part of the public API.
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

from pyro_wakesleep.diagnostics.draws import DRAW_PLATE
from pyro_wakesleep.diagnostics.fits import Fit, nodes
from pyro_wakesleep.traces import is_sample

__all__: list[str] = []

Group = dict[str, tuple[list[str], np.ndarray]]


def datasets(fit: Fit, sample_dims: Sequence[str], dims: Mapping[str, Sequence[str]],
             coords: Mapping[str, Any], predictive: bool, loglik: bool) -> dict[str, Any]:
    """The groups of ``fit``, name to :class:`xarray.Dataset`; the draws along
    ``sample_dims`` (``("chain", "draw")`` or ``("sample",)``).

    :param dict dims: variable name to the names of its dimensions after the draws'.
    :param dict coords: dimension name to coordinate values.
    :raises ValueError: for ``loglik`` without observed sites, ``dims`` of the wrong
        length, or a site with more batch dimensions than the plate nesting.
    """
    import xarray as xr

    groups = _groups(fit, predictive, loglik)
    for group in groups.values():
        for name, (default, array) in list(group.items()):
            if name in dims:
                given = list(dims[name])
                if len(given) != len(default):
                    raise ValueError(f"dims for '{name}' name {len(given)} dimensions, "
                                     f"its draws have {len(default)}: {default}")
                group[name] = (given, array)
    coords = {**_subsample_coords(fit.trace), **coords}
    attrs = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "inference_library": "pyro",
             "inference_library_version": pyro.__version__,
             "creation_library": "pyro_wakesleep"}
    out = {}
    for group_name, group in groups.items():
        data_vars: dict[str, Any] = {}
        sizes: dict[str, int] = {}
        for var, (var_dims, array) in group.items():
            if group_name != "observed_data":
                shape = (fit.chains, -1) if len(sample_dims) == 2 else (-1,)
                array = array.reshape((*shape, *array.shape[1:]))
                var_dims = [*sample_dims, *var_dims]
            data_vars[var] = (var_dims, array)
            sizes.update(zip(var_dims, array.shape, strict=True))
        axes = {d: np.asarray(coords[d]) if d in coords else np.arange(n)
                for d, n in sizes.items()}
        out[group_name] = xr.Dataset(data_vars, coords=axes, attrs=attrs)
    return out


def _groups(fit: Fit, predictive: bool, loglik: bool) -> dict[str, Group]:
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
    return groups


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

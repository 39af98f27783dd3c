"""A fitted model as the converters see it: the model vectorized over its draws.

Draws come from a guide (:mod:`~pyro_wakesleep.diagnostics.draws`), an MCMC run, or a
dict of draws; each source becomes a :class:`Fit`, the model run once under a plate of
the draws with its latents conditioned on them. Used by
:mod:`~pyro_wakesleep.diagnostics.converters`; nothing here is part of the public API.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from pyro_wakesleep._validation import check_int
from pyro_wakesleep.diagnostics.draws import DRAW_PLATE, draw_guide, per_draw
from pyro_wakesleep.traces import is_sample, latent_sites, plate_nesting

__all__: list[str] = []


def nodes(trace: Trace) -> dict[str, Any]:
    """A trace's nodes, typed loosely (Pyro types a site's fields as optional)."""
    return trace.nodes


class Fit(NamedTuple):
    """The model vectorized over ``S`` draws, with what the ArviZ groups need."""

    model: Callable
    args: tuple
    kwargs: dict
    nesting: int
    chains: int
    trace: Trace  # the model, vectorized over the draws, log-densities computed
    latents: dict[str, Tensor]  # draws in the vectorized layout (S, batch..., event...)
    stats: dict[str, np.ndarray]  # per-draw sample statistics, shape (S,)
    predictive: dict[str, Tensor]  # given posterior-predictive draws (vectorized layout)


def guide_fit(model: Callable, guide: Callable, args: tuple, kwargs: dict,
              num_samples: int, nesting: int | None) -> Fit:
    """``num_samples`` draws of the guide, one chain; stats ``log_p``, ``log_q``,
    ``log_weight``."""
    draws = draw_guide(model, guide, args, kwargs, num_samples, nesting)
    guide_nodes = nodes(draws.guide_trace)
    latents = {n: guide_nodes[n]["value"] for n in latent_sites(draws.guide_trace)}
    stats = {"log_p": draws.log_p.numpy(), "log_q": draws.log_q.numpy(),
             "log_weight": (draws.log_p - draws.log_q).numpy()}
    return Fit(model, args, kwargs, draws.max_plate_nesting, 1, draws.model_trace, latents,
               stats, {})


def mcmc_fit(mcmc: Any, args: tuple, kwargs: dict, nesting: int | None) -> Fit:
    """The draws of every chain of a :class:`pyro.infer.MCMC` run (chain-major); stats
    ``log_p`` and ``diverging``. The run's own arguments unless ``args``/``kwargs``."""
    model = getattr(mcmc.kernel, "model", None)
    if model is None:
        raise ValueError("from_mcmc needs an MCMC kernel built from a model, not a potential_fn")
    if not args and not kwargs:
        args, kwargs = getattr(mcmc, "_args", ()), getattr(mcmc, "_kwargs", {})
    samples = mcmc.get_samples(group_by_chain=True)
    chains, num = next(iter(samples.values())).shape[:2]
    flat = {k: v.reshape((chains * num, *v.shape[2:])) for k, v in samples.items()}
    diverging = np.zeros((chains, num), dtype=bool)
    divergences = mcmc.diagnostics().get("divergences", {})
    for i, key in enumerate(sorted(divergences)):
        diverging[i, divergences[key]] = True
    return samples_fit(model, flat, chains, args, kwargs, nesting,
                       {"diverging": diverging.reshape(-1)})


def _per_draw_shape(name: str, value: Tensor, shape: torch.Size) -> Tensor:
    value = torch.as_tensor(value)
    per = value.shape[1:]
    while len(per) > len(shape) and per[0] == 1:  # Predictive's padded size-1 axes
        per = per[1:]
    if per != shape:
        raise ValueError(
            f"draws of site '{name}' have shape {tuple(value.shape[1:])} per draw, but the "
            f"model's site has shape {tuple(shape)}"
        )
    return value.reshape((value.shape[0], *shape))


def samples_fit(model: Callable, samples: Mapping[str, Tensor], chains: int, args: tuple,
                kwargs: dict, nesting: int | None, stats: dict[str, np.ndarray]) -> Fit:
    """Given draws (site name to a ``(S, ...)`` tensor) of every latent of the model;
    given observed sites become the posterior predictive. Stats: ``log_p``, ``stats``."""
    if not samples:
        raise ValueError("from_samples: the dict of draws is empty")
    with torch.no_grad(), poutine.block():
        prior = poutine.trace(model).get_trace(*args, **kwargs)
    nest = (plate_nesting([(prior, prior)]) if nesting is None
            else check_int(nesting, "max_plate_nesting", 0))
    num = int(next(iter(samples.values())).shape[0])
    latents: dict[str, Tensor] = {}
    predictive: dict[str, Tensor] = {}
    for name, value in samples.items():
        node = nodes(prior).get(name)
        if node is None or not is_sample(node):
            raise ValueError(f"draws given for '{name}', which is not a sample site of the model")
        if node["infer"].get("_deterministic"):
            continue
        if value.shape[0] != num:
            raise ValueError(f"site '{name}' has {value.shape[0]} draws, others have {num}")
        shape = node["value"].shape
        rank = len(shape) - node["fn"].event_dim
        value = _per_draw_shape(name, value, shape)
        value = value.reshape((num, *(1,) * (nest - rank), *shape))
        (predictive if node["is_observed"] else latents)[name] = value
    missing = [n for n in latent_sites(prior) if n not in latents]
    if missing:
        raise ValueError(
            f"no draws of the model's latent site(s) {missing}; with pyro.infer.Predictive "
            "pass return_sites listing them"
        )
    plate = pyro.plate(DRAW_PLATE, num, dim=-(nest + 1))
    with torch.no_grad():
        trace = poutine.trace(poutine.condition(plate(model), data=latents)).get_trace(
            *args, **kwargs
        )
        trace.compute_log_prob(lambda _, site: not site_is_subsample(site))
        names = [n for n, s in nodes(trace).items() if is_sample(s)]
        stats = {"log_p": per_draw(trace, names, nest, num, "model").numpy(), **stats}
    return Fit(model, args, kwargs, nest, chains, trace, latents, stats, predictive)

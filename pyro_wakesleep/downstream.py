"""Rao-Blackwellized learning signals: the cost terms downstream of each guide site.

A score-function term :math:`f_s \\nabla \\log q(z_s)` needs only the cost terms that can
depend on :math:`z_s`. As Pyro's ``TraceGraph_ELBO`` (Schulman et al., 2015), a term is
downstream of :math:`z_s` when it comes after :math:`z_s` in the guide's execution order
(for guide latents) or after it in the model's (for model-only terms), except for other
iterations of a sequential plate. The order is read off each particle's own traces, so
sites that exist because of earlier draws (stochastic control flow through Python) are
seen as downstream of those draws.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from pyro_wakesleep.particles import Particles
from pyro_wakesleep.signals import reduce_to_dims
from pyro_wakesleep.traces import guide_factors, is_sample, plate_frames, sample_sites

__all__ = ["downstream_sites", "learning_signals"]

_Stacks = tuple[tuple[str, tuple[tuple[str, int], ...]], ...]


def _frames(site: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    return tuple((f.name, f.counter) for f in site["cond_indep_stack"] if not f.vectorized)


def _independent(a: Sequence[tuple[str, int]], b: Sequence[tuple[str, int]]) -> bool:
    counters = dict(a)
    return any(name in counters and counters[name] != counter for name, counter in b)


@functools.lru_cache(maxsize=512)
def _downstream(guide: _Stacks, model: _Stacks, site: str) -> tuple[
    tuple[str, ...], tuple[str, ...]
]:
    names = [name for name, _ in guide]
    stacks = dict(guide)
    down = [site]
    for name in names[names.index(site) + 1:]:
        if any(not _independent(stacks[u], stacks[name]) for u in down):
            down.append(name)
    position = {name: i for i, (name, _) in enumerate(model)}
    model_stacks = dict(model)
    extra = tuple(
        m for m, stack in model if m not in down and any(
            u in position and position[m] > position[u]
            and not _independent(model_stacks[u], stack) for u in down
        )
    )
    return tuple(down), extra


def downstream_sites(model_trace: Trace, guide_trace: Trace, site: str) -> tuple[
    tuple[str, ...], tuple[str, ...]
]:
    """The cost terms that may depend on guide ``site``, as ``TraceGraph_ELBO`` finds them
    from the dense dependency graph (everything after the site, except other iterations
    of a sequential plate): ``(guide latents, model-only terms)``. Guide latents contribute
    :math:`\\log p - \\log q`, model-only terms (observations, and model terms of latents
    upstream in the guide) :math:`\\log p`; a ``pyro.factor`` of the guide counts as a
    guide term (:math:`-\\log` factor)."""
    factors = set(guide_factors(model_trace, guide_trace))
    guide = tuple(
        (n, _frames(s)) for n, s in guide_trace.nodes.items()
        if is_sample(s) and (not s["is_observed"] or n in factors)
    )
    model = tuple((n, _frames(model_trace.nodes[n])) for n in sample_sites(model_trace))
    return _downstream(guide, model, site)


def _run_signals(
    model_trace: Trace, guide_trace: Trace, sites: Iterable[str], particles: Particles
) -> dict[str, Tensor]:
    """The signals of one run (one particle, or all of a vectorized pass)."""
    def term(name: str, with_guide: bool) -> tuple[Tensor, frozenset[tuple[str, int]]]:
        if name in model_trace.nodes:
            node = model_trace.nodes[name]
            value = node["log_prob"]
            if with_guide:
                value = value - guide_trace.nodes[name]["log_prob"]
        else:  # an auxiliary guide site, or a factor of the guide
            node = guide_trace.nodes[name]
            value = -node["log_prob"]
        return particles.canonical(value.detach(), name), plate_frames(node)

    cache: dict[tuple[str, bool], tuple[Tensor, frozenset[tuple[str, int]]]] = {}
    signals = {}
    for site in sites:
        down, extra = downstream_sites(model_trace, guide_trace, site)
        frames = plate_frames(guide_trace.nodes[site])
        parts = []
        for key in [(n, True) for n in down] + [(n, False) for n in extra]:
            if key not in cache:
                cache[key] = term(*key)
            value, term_frames = cache[key]
            # kept per element of the plates the site shares with the term (by plate,
            # not by dim: another plate on the same dim is summed over)
            keep = {dim for _, dim in frames & term_frames} | {particles.particle_dim}
            parts.append(reduce_to_dims(value, keep))
        signals[site] = functools.reduce(torch.add, parts)
    return signals


def learning_signals(particles: Particles, sites: Iterable[str]) -> dict[str, Tensor]:
    """Rao-Blackwellized, detached learning signals of the given guide sites, in the
    canonical layout (zero in particles where the site is absent).

    Site :math:`s`'s signal is the sum of its downstream cost terms
    (:func:`downstream_sites`), each summed over the plates :math:`s` is not in and kept
    elementwise over the plates it is in (plates are told apart by name, so a term in
    another plate that uses the same ``dim`` is summed over).
    """
    sites = list(sites)
    runs = [
        _run_signals(m, g, [s for s in sites if s in g.nodes], particles)
        for m, g in particles.traces
    ]
    return {s: particles.stack(s, [run.get(s) for run in runs]) for s in sites}

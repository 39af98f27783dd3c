"""Rao-Blackwellized learning signals: the cost terms that depend on each guide draw.

A score-function term :math:`f_s \\nabla \\log q(z_s)` needs only the cost terms that can
depend on :math:`z_s`. A cost term (:math:`\\log p` of a model site, :math:`-\\log q` of
a guide site) depends on draw :math:`z_s` when

* its value was computed from :math:`z_s` (*provenance*: tracked through every tensor
  operation by :class:`~pyro_wakesleep.dataflow.Dataflow`, through later draws whose
  distributions were computed from :math:`z_s` too, as Pyro's ``TraceGraph_ELBO`` does
  since Pyro 1.8), or
* its site ran after a value computed from :math:`z_s` was read into Python (*control*:
  ``bool``, ``item``, ``tolist``, comparisons in ``if``/``while``...), in the same
  program (guide or model) and not in another iteration of a sequential plate that the
  site is in. A draw that decides *whether* later sites run leaves no trace in their
  values; provenance alone is biased there, and this keeps the estimator exact.

The dependencies are bitsets over the draws (:mod:`pyro_wakesleep.dataflow`), stored on
the trace nodes by :func:`~pyro_wakesleep.traces.importance_trace` (``track=True``).
The signals of many sites are computed in time linear in the number of cost terms and
sites: each term's dependency set is split into runs of consecutive draws (a chain's
term depends on one run), added at the run's ends into a difference array over the draws
and summed up once (:func:`signal_matrix`).
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple, cast

import torch
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from pyro_wakesleep.particles import Particles, canonical_field
from pyro_wakesleep.signals import reduce_to_dims
from pyro_wakesleep.traces import BIT, DEPENDS, guide_factors, is_sample, plate_frames

__all__ = ["bit_runs", "downstream_sites", "learning_signals", "signal_matrix",
           "site_signal"]

_Frames = frozenset[tuple[str, int]]


class _Term(NamedTuple):
    name: str
    guide: bool  # a -log q term of the guide (else log p of the model)
    node: Mapping[str, Any]
    depends: int


def _entry(node: Any) -> dict[str, Any]:
    """A trace node as a plain dict (it holds the dataflow keys beside Pyro's own)."""
    return cast(dict[str, Any], node)


def bit_runs(bits: int) -> Iterator[tuple[int, int]]:
    """The runs of consecutive set bits of ``bits``, as half-open ``(lo, hi)`` ranges in
    increasing order: ``0b1101`` gives ``(0, 1), (2, 4)``."""
    while bits:
        lo = (bits & -bits).bit_length() - 1
        rest = bits >> lo
        hi = lo + (~rest & (rest + 1)).bit_length() - 1
        yield lo, hi
        bits = (bits >> hi) << hi


def signal_matrix(values: Tensor, depends: list[int], num_bits: int) -> Tensor:
    """:math:`S_b = \\sum_{c:\\, b \\in D_c} v_c` for every bit ``b < num_bits``.

    :param torch.Tensor values: the terms :math:`v_c`, stacked along dim 0, of a common
        shape.
    :param list depends: the bitset :math:`D_c` of each term.
    :param int num_bits: the number of bits (draws).
    :return: ``(num_bits, *values.shape[1:])``, of ``values``' dtype. Each run of
        consecutive bits of a term is added at its two ends of a difference array, summed
        once, in double precision: time linear in the number of runs.
    """
    lo, hi, source = [], [], []
    for index, bits in enumerate(depends):
        for start, stop in bit_runs(bits):
            lo.append(start)
            hi.append(stop)
            source.append(index)
    double = values.to(torch.float64)
    if source != list(range(len(depends))):
        double = double[torch.tensor(source, device=values.device)]
    device = values.device
    diff = double.new_zeros((num_bits + 1, *values.shape[1:]))
    diff = diff.index_add(0, torch.tensor(lo, device=device), double)
    diff = diff.index_add(0, torch.tensor(hi, device=device), -double)
    return diff.cumsum(0)[:num_bits].to(values.dtype)


def _terms(model_trace: Trace, guide_trace: Trace) -> list[_Term]:
    """Every cost term of a run with its dependency bitset."""
    terms = []
    for trace, guide in ((model_trace, False), (guide_trace, True)):
        factors = set(guide_factors(model_trace, guide_trace)) if guide else set()
        for name, node in trace.nodes.items():
            if not is_sample(node) or (guide and node["is_observed"] and name not in factors):
                continue
            if DEPENDS not in _entry(node):
                raise ValueError(
                    f"site '{name}' was traced without dataflow tracking; run the particles "
                    "with track=True to compute learning signals"
                )
            terms.append(_Term(name, guide, node, _entry(node)[DEPENDS]))
    return terms


def downstream_sites(model_trace: Trace, guide_trace: Trace, site: str) -> tuple[
    tuple[str, ...], tuple[str, ...]
]:
    """The cost terms that depend on guide draw ``site`` (see the module docstring), as
    ``(guide sites, model sites)``: the guide sites whose :math:`-\\log q` and the model
    sites whose :math:`\\log p` depend on it (a guide ``pyro.factor`` counts as a guide
    term), each in execution order.

    :raises ValueError: if ``site`` is not a draw of the guide, or the traces were
        recorded without dataflow tracking.
    """
    node = _entry(guide_trace.nodes.get(site, {}))
    if BIT not in node:
        raise ValueError(f"'{site}' is not a tracked latent site of the guide")
    bit = 1 << node[BIT]
    terms = [t for t in _terms(model_trace, guide_trace) if t.depends & bit]
    return (tuple(t.name for t in terms if t.guide), tuple(t.name for t in terms if not t.guide))


def _value(term: _Term, particles: Particles) -> Tensor:
    value = canonical_field(term.node, "log_prob", particles)
    return -value if term.guide else value


def _run_signals(particles: Particles, model_trace: Trace, guide_trace: Trace,
                 sites: list[str], detach: bool, keep_plates: bool) -> dict[str, Tensor]:
    """The signals of one run (one particle, or all of a vectorized pass)."""
    terms = [t for t in _terms(model_trace, guide_trace) if t.depends]
    groups: dict[_Frames, list[str]] = defaultdict(list)
    for site in sites:
        frames = plate_frames(guide_trace.nodes[site]) if keep_plates else frozenset()
        groups[frames].append(site)
    with torch.no_grad() if detach else contextlib.nullcontext():
        return _signals(particles, terms, groups, guide_trace)


def _signals(particles: Particles, terms: list[_Term], groups: dict[_Frames, list[str]],
             guide_trace: Trace) -> dict[str, Tensor]:
    values = [_value(term, particles) for term in terms]
    signals = {}
    for frames, members in groups.items():
        reduced = []
        for term, value in zip(terms, values, strict=True):
            # kept per element of the plates the site shares with the term (by plate,
            # not by dim: another plate on the same dim is summed over)
            keep = {dim for _, dim in frames & plate_frames(term.node)} | {particles.particle_dim}
            reduced.append(reduce_to_dims(value, keep))
        if len(members) == 1:  # one site: the sum of its terms, directly
            bit = 1 << _entry(guide_trace.nodes[members[0]])[BIT]
            parts = [r for r, t in zip(reduced, terms, strict=True) if t.depends & bit]
            signals[members[0]] = functools.reduce(torch.add, parts)
            continue
        shape = torch.broadcast_shapes(*(r.shape for r in reduced))
        stacked = torch.stack([r if r.shape == shape else r.expand(shape) for r in reduced])
        num_bits = 1 + max(_entry(guide_trace.nodes[s])[BIT] for s in members)
        matrix = signal_matrix(stacked, [t.depends for t in terms], num_bits)
        for site in members:
            signals[site] = matrix[_entry(guide_trace.nodes[site])[BIT]]
    return signals


def learning_signals(particles: Particles, sites: Iterable[str]) -> dict[str, Tensor]:
    """Rao-Blackwellized, detached learning signals of the given guide sites, in the
    canonical layout (zero in particles where the site is absent).

    Site :math:`s`'s signal is the sum of the cost terms that depend on it
    (:func:`downstream_sites`), each summed over the plates :math:`s` is not in and kept
    elementwise over the plates it is in (plates are told apart by name, so a term in
    another plate that uses the same ``dim`` is summed over).

    :raises ValueError: if the particles were run without dataflow tracking.
    """
    sites = list(sites)
    runs = [
        _run_signals(particles, m, g, [s for s in sites if s in g.nodes], True, True)
        for m, g in particles.traces
    ]
    return {s: particles.stack(s, [run.get(s) for run in runs]) for s in sites}


def site_signal(particles: Particles, site: str) -> tuple[Tensor, Tensor]:
    """The differentiable learning signal of one guide site of a single run (as in
    :func:`learning_signals`, without detaching), and the sum of the same terms over
    everything but the particle dimension (each term counted once)."""
    (model_trace, guide_trace), = particles.traces
    signal = _run_signals(particles, model_trace, guide_trace, [site], False, True)[site]
    total = _run_signals(particles, model_trace, guide_trace, [site], False, False)[site]
    return signal, total

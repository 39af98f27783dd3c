"""Parallel enumeration: discrete sites summed out exactly, with Pyro's conventions.

Part of the trace layer (with :mod:`pyro_wakesleep.traces` and
:mod:`pyro_wakesleep.particles`). Guide and model run under
:func:`pyro.poutine.enum` (the guide from ``first_available_dim = -(P + 1)``, the model
after it, as :class:`pyro.infer.TraceEnum_ELBO` runs them), and :func:`reduce_enumerated`
turns the two traces into ordinary ones, so that every objective, learning signal and
importance weight reads them unchanged:

* **Model enumeration.** A model site marked ``infer={"enumerate": "parallel"}`` (or by
  :func:`~pyro.infer.enum.config_enumerate`) that the guide does not sample is summed
  out: the model factors that carry its enumeration dim (its own log-density and those
  of the sites downstream of it) are contracted per plate ordinal by
  :func:`pyro.ops.contract.contract_tensor_tree`, the message passing that
  ``TraceEnum_ELBO`` uses (so a chain under :func:`pyro.markov` costs time linear in its
  length). Each connected component becomes one model cost term, a node like that of a
  ``pyro.factor`` named ``"_sum[<sites>]"``, whose log-density is the log of the sum
  and whose dependencies (for Rao-Blackwellized learning signals) are the union of its
  factors'.
* **Guide enumeration** (expectation mode, for the ELBO). A guide site marked for
  enumeration is given every value of its support at once, and each cost term that
  carries its dim is replaced by its expectation under the guide,
  :math:`\\sum_{z} q(z \\mid \\ldots)\\, c(z)`, differentiable in :math:`q` (the
  exact gradient of the enumerated part). The probabilities are those of the guide's
  enumerated sites in the term's plates or outside them, multiplied jointly (cost
  exponential in the number of enumerated guide sites that a term sees).

Enumeration in the importance-weighted objectives (marginal mode) sums model sites out
of the weight :math:`w = \\sum_{z} p(x, z, \\ldots) / q(\\ldots)`; there the guide's
probabilities of an enumerated guide site would cancel, so such a site is refused.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, cast

import opt_einsum
import pyro.distributions as dist
import torch
from opt_einsum import shared_intermediates
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.distributions.util import scale_and_mask
from pyro.ops import packed
from pyro.ops.contract import contract_tensor_tree
from pyro.ops.rings import LogRing
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.runtime import _ENUM_ALLOCATOR
from pyro.poutine.trace_struct import Trace
from torch import Tensor

__all__ = ["EXPECTATION", "MARGINAL", "check_enumeration_marks", "enumerated_sites",
           "is_enumerated", "reduce_enumerated", "refuse_enumeration"]

#: guide-enumerated sites in expectation under the guide (the ELBO)
EXPECTATION = "expectation"
#: model sites summed out of the importance weight; guide enumeration refused
MARGINAL = "marginal"
#: trace-node key (in ``infer``) of a contracted factor: the sites summed out into it
SUMMED = "_pyro_wakesleep_summed"
_DEPENDS = "dataflow_depends"


def _nothing_allocated() -> bool:
    """Whether no enumeration dim (global or markov-local) has been allocated in this
    program so far: every allocation takes a fresh id."""
    return getattr(_ENUM_ALLOCATOR, "next_available_id", 1) == 0


class Enumerate(EnumMessenger):
    """:func:`pyro.poutine.enum` that costs next to nothing at sites before the first
    enumerated one, and reads each value's shape without a tensor op (Pyro's reads
    ``value.data``, a ``detach`` at every sample site, enumerated or not).

    Until a program allocates its first enumeration dim, every site's upstream dims
    (``_param_dims``) and exposed dims (``_value_dims``) are empty, which this records
    directly; the markov depths are kept as Pyro keeps them. From the first enumerated
    site on, Pyro's code runs unchanged."""

    def _pyro_sample(self, msg: Any) -> None:
        infer = msg["infer"]
        if msg["done"] or not isinstance(msg["fn"], TorchDistributionMixin) or infer is None \
                or not _nothing_allocated() or (
                    not msg["is_observed"] and infer.get("enumerate") == "parallel"):
            super()._pyro_sample(msg)
            return
        if infer.get("_markov_scope") is not None:
            self._markov_depths[msg["name"]] = infer["_markov_depth"]
        self._param_dims[msg["name"]] = {}

    def _pyro_post_sample(self, msg: Any) -> None:
        value = msg["value"]
        if value is None or not isinstance(msg["fn"], TorchDistributionMixin):
            return
        if _nothing_allocated() and not self._param_dims.get(msg["name"]):
            msg["infer"].setdefault("_dim_to_id", {})
            self._value_dims[msg["name"]] = {}
            return
        shape = value.shape[:len(value.shape) - msg["fn"].event_dim]
        dim_to_id = msg["infer"].setdefault("_dim_to_id", {})
        dim_to_id.update(self._param_dims.get(msg["name"], {}))
        self._value_dims[msg["name"]] = {
            dim: id_ for dim, id_ in dim_to_id.items() if len(shape) >= -dim and shape[dim] > 1
        }


def _nodes(trace: Trace) -> dict[str, Any]:
    """A trace's nodes, typed loosely (they hold the dataflow keys beside Pyro's own)."""
    return cast(dict[str, Any], trace.nodes)


def _is_sample(site: Mapping[str, Any]) -> bool:
    return site["type"] == "sample" and type(site["fn"]).__name__ != "_Subsample"


def is_enumerated(site: Mapping[str, Any]) -> bool:
    """Whether a trace node was enumerated in parallel (it has an enumeration dim)."""
    return site["type"] == "sample" and site["infer"].get("_enumerate_dim") is not None


def enumerated_sites(model_trace: Trace, guide_trace: Trace) -> list[str]:
    """The sites a reduced pair of traces sums over: the model sites inside its contracted
    factors, then the guide's enumerated sites."""
    names: list[str] = []
    for node in _nodes(model_trace).values():
        names.extend(node["infer"].get(SUMMED, ()) if node["type"] == "sample" else ())
    names.extend(n for n, s in _nodes(guide_trace).items() if is_enumerated(s))
    return names


def refuse_enumeration(particles: Any, what: str) -> None:
    """Raises ``ValueError`` if a run of the particles summed sites out, for an option
    (``what``) that replays the draws and does not enumerate."""
    if particles.enumerated:
        raise ValueError(
            f"{what} does not support enumeration; sites summed out: "
            f"{list(particles.enumerated)}"
        )


def check_enumeration_marks(trace: Trace, program: str) -> None:
    """Raises ``ValueError`` naming a site marked for sequential enumeration, which no
    objective here does (``program``: ``"model"`` or ``"guide"``, for the message)."""
    for name, site in _nodes(trace).items():
        if site["type"] == "sample" and site["infer"].get("enumerate") == "sequential":
            raise ValueError(
                f"{program} site '{name}' is marked infer={{'enumerate': 'sequential'}}; "
                "only parallel enumeration is supported here: mark it 'parallel' "
                "(config_enumerate's default)"
            )


def _symbols(site: Mapping[str, Any], plates: dict[str, str],
             symbol_to_dim: dict[str, int]) -> dict[int, str]:
    """The site's dim -> symbol map, as :meth:`pyro.poutine.Trace.symbolize_dims`
    makes it (even symbols for plates, odd ones for enumeration ids), without writing
    into the site."""
    out: dict[int, str] = {}
    for frame in site["cond_indep_stack"]:
        if frame.vectorized:
            symbol = plates.setdefault(frame.name, opt_einsum.get_symbol(2 * len(plates)))
            out[frame.dim] = symbol
            symbol_to_dim[symbol] = frame.dim
    for dim, id_ in site["infer"].get("_dim_to_id", {}).items():
        symbol = opt_einsum.get_symbol(1 + 2 * id_)
        out[dim] = symbol
        symbol_to_dim[symbol] = dim
    return out


def _ordinal(site: Mapping[str, Any], plates: Mapping[str, str]) -> frozenset[str]:
    return frozenset(plates[f.name] for f in site["cond_indep_stack"] if f.vectorized)


def _names(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{names[0]}, ..., {names[-1]}"


def _components(factors: list[tuple[str, Tensor]], sum_dims: set[str]) -> list[list[int]]:
    """The factors (by index) in connected components of shared summed dims."""
    parent = list(range(len(factors)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, (_, term) in enumerate(factors):
        for symbol in set(cast(str, term._pyro_dims)) & sum_dims:  # type: ignore[attr-defined]
            if symbol in owner:
                parent[find(i)] = find(owner[symbol])
            else:
                owner[symbol] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(factors)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _factor_node(name: str, template: Mapping[str, Any], frames: list[Any], value: Tensor,
                 scale: Any, summed: list[str], depends: int | None) -> dict[str, Any]:
    """A trace node like that of ``pyro.factor(name, value)`` in ``frames``."""
    node = dict(template)
    node.update(
        name=name, fn=dist.Unit(log_factor=value), value=value.new_empty((0,)),
        is_observed=True, scale=scale, mask=None, cond_indep_stack=tuple(frames),
        infer={SUMMED: tuple(summed)}, log_prob=scale_and_mask(value, scale),
        unscaled_log_prob=value, args=(), kwargs={},
    )
    node.pop("packed", None)
    if depends is not None:
        node[_DEPENDS] = depends
    return node


def _contract_model(model_trace: Trace, guide_trace: Trace) -> tuple[
    dict[str, None], list[dict[str, Any]]
]:
    """The model sites to drop and the contracted factor nodes that replace them."""
    plates: dict[str, str] = {}
    symbol_to_dim: dict[str, int] = {}
    non_enum: set[str] = set()
    for site in _nodes(guide_trace).values():
        if _is_sample(site):
            symbols = _symbols(site, plates, symbol_to_dim)
            non_enum.update(packed.pack(site["log_prob"], symbols)._pyro_dims)
    enum_names = [n for n, s in _nodes(model_trace).items()
                  if _is_sample(s) and is_enumerated(s) and n not in guide_trace.nodes]
    if not enum_names:
        return {}, []
    candidates = []
    enum_dims: set[str] = set()
    for name, site in _nodes(model_trace).items():
        if not _is_sample(site):
            continue
        symbols = _symbols(site, plates, symbol_to_dim)
        non_enum.update(plates[f.name] for f in site["cond_indep_stack"] if f.vectorized)
        enumerated = name in enum_names
        # the enumerated sites' own log-density unmasked (a masked latent still sums to
        # one), the others' masked inside and scaled outside the sum, as TraceEnum_ELBO
        raw = site["unscaled_log_prob"]
        value = raw if enumerated else scale_and_mask(raw, mask=site["mask"])
        term = packed.pack(value, symbols)
        if enumerated:
            enum_dims.update(term._pyro_dims)
        candidates.append((name, site, term, enumerated))
    enum_dims -= non_enum
    factors = [(n, t) for n, s, t, _ in candidates if enum_dims & set(t._pyro_dims)]
    nodes = {n: s for n, s, _, _ in candidates}
    drop = dict.fromkeys(n for n, _ in factors)
    scales = {n: nodes[n]["scale"] for n in drop}
    for name, scale in scales.items():
        if isinstance(scale, Tensor) and scale.numel() != 1:
            raise ValueError(f"site '{name}' depends on an enumerated site and has an "
                             "elementwise scale; enumeration needs one scale per site")
    if len({float(s) for s in scales.values()}) > 1:
        listed = ", ".join(f"'{n}': {float(s):g}" for n, s in scales.items())
        raise ValueError(
            "the sites that depend on enumerated sites must share one scale (poutine.scale "
            f"or a subsampled plate), got {{{listed}}}"
        )
    scale = next(iter(scales.values()))
    dim_to_size: dict[str, int] = {}
    for _, term in factors:
        dim_to_size.update(zip(term._pyro_dims, term.shape, strict=True))
    out = []
    with shared_intermediates() as cache:
        ring = LogRing(cache=cache, dim_to_size=dim_to_size)
        for members in _components(factors, enum_dims):
            tree: OrderedDict[frozenset[str], list[Tensor]] = OrderedDict()
            for i in members:
                name, term = factors[i]
                tree.setdefault(_ordinal(nodes[name], plates), []).append(term)
            dims = set().union(*(set(factors[i][1]._pyro_dims) for i in members)) & enum_dims
            contracted = contract_tensor_tree(tree, dims, ring=ring)
            (ordinal, (result,)), = contracted.items()
            value = packed.unpack(result, symbol_to_dim)
            names = [factors[i][0] for i in members]
            summed = [n for n in names if n in enum_names]
            frames = {f.name: f for n in names for f in nodes[n]["cond_indep_stack"]
                      if f.vectorized and plates[f.name] in ordinal}
            depends = [nodes[n].get(_DEPENDS) for n in names]
            union = (None if any(d is None for d in depends)
                     else functools.reduce(lambda a, b: a | b, cast(list[int], depends), 0))
            stack = sorted(frames.values(), key=lambda f: -f.dim)
            out.append(_factor_node(f"_sum[{_names(summed)}]", nodes[names[-1]], stack,
                                    value, scale, summed, union))
    return drop, out


def _expectation(name: str, node: Mapping[str, Any],
                 enumerated: Mapping[str, Mapping[str, Any]], rank: int) -> dict[str, Any]:
    """A node whose log-density carries enumeration dims of the guide, with its
    log-density replaced by the expectation under the guide's enumerated sites."""
    value = node["log_prob"]
    if value.dim() <= rank or all(size == 1 for size in value.shape[:-rank or None]):
        return cast(dict[str, Any], node)
    frames = {f.name for f in node["cond_indep_stack"] if f.vectorized}
    upstream = {n: s for n, s in enumerated.items()
                if {f.name for f in s["cond_indep_stack"] if f.vectorized} <= frames}
    available = {s["infer"]["_enumerate_dim"] for s in upstream.values()}
    for dim in range(-value.dim(), -rank):
        if value.shape[dim] > 1 and dim not in available:
            raise ValueError(
                f"site '{name}' carries the enumeration dim {dim} of a guide site in a plate "
                "that the site is not in; a site outside a plate cannot depend on an "
                "enumerated site inside it"
            )
    log_probs = functools.reduce(
        torch.add, [s["unscaled_log_prob"] for s in upstream.values()]
    )
    probs = log_probs.exp()

    def expect(term: Tensor) -> Tensor:
        product = probs * term
        lead = product.dim() - rank
        return product.sum(tuple(range(lead))) if lead > 0 else product

    entry = dict(node)
    entry["log_prob"] = expect(node["log_prob"])
    entry["unscaled_log_prob"] = expect(node["unscaled_log_prob"])
    if _DEPENDS in node:
        entry[_DEPENDS] = functools.reduce(
            lambda a, b: a | b, [s.get(_DEPENDS, 0) for s in upstream.values()], node[_DEPENDS]
        )
    return entry


def _rebuild(trace: Trace, replace: Mapping[str, dict[str, Any] | None],
             extra: list[dict[str, Any]]) -> Trace:
    """A new trace: ``trace``'s nodes, those in ``replace`` replaced (``None``:
    dropped), then ``extra``. ``trace`` itself is not changed."""
    out = Trace(graph_type=trace.graph_type)
    nodes = _nodes(out)
    for name, node in _nodes(trace).items():
        new = replace.get(name, node)
        if new is not None:
            nodes[name] = new
    for node in extra:
        nodes[node["name"]] = node
    return out


def reduce_enumerated(model_trace: Trace, guide_trace: Trace, rank: int,
                      mode: str, control: Callable[[str], int] | None = None) -> tuple[
    Trace, Trace
]:
    """The traces of a run under enumeration as ordinary traces (see the module
    docstring): new :class:`~pyro.poutine.Trace` objects sharing the unchanged nodes;
    the given traces are not changed. ``log_prob`` must have been computed.

    :param int rank: the plate dims of the layout (``max_plate_nesting``, plus one for
        vectorized particles); enumeration dims are left of them.
    :param str mode: :data:`EXPECTATION` or :data:`MARGINAL`.
    :param control: site name -> the draws read into Python before it ran (from the
        dataflow), to refuse enumeration under stochastic control flow; ``None``: no
        check.
    :raises ValueError: naming the site, for what cannot be enumerated.
    """
    guide_enum = {n: s for n, s in _nodes(guide_trace).items()
                  if _is_sample(s) and is_enumerated(s)}
    model_enum = [n for n, s in _nodes(model_trace).items()
                  if _is_sample(s) and is_enumerated(s) and n not in guide_trace.nodes]
    if not guide_enum and not model_enum:
        return model_trace, guide_trace
    if guide_enum and mode != EXPECTATION:
        name = next(iter(guide_enum))
        raise ValueError(
            f"guide site '{name}' is enumerated; an importance-weighted objective sums an "
            "enumerated site out of the weight, where the guide's probabilities cancel: "
            "enumerate it in the model instead (remove it from the guide), or use "
            "ScoreFunctionELBO"
        )
    if control is not None:
        for name in [*guide_enum, *model_enum]:
            if control(name):
                raise ValueError(
                    f"enumerated site '{name}' runs under stochastic control flow (after a "
                    "value drawn from the guide was read into Python); sample it instead"
                )
    for name, site in _nodes(guide_trace).items():
        if (_is_sample(site) and not site["is_observed"] and name not in guide_enum
                and site["log_prob"].dim() > rank and not site["fn"].has_rsample
                and any(size > 1 for size in site["log_prob"].shape[:-rank or None])):
            raise ValueError(
                f"guide site '{name}' is sampled (score function) but depends on the "
                f"enumerated guide site(s) {sorted(guide_enum)}; enumerate it too, or do "
                "not enumerate those"
            )
    drop, factors = _contract_model(model_trace, guide_trace)
    model_replace: dict[str, dict[str, Any] | None] = {n: None for n in drop}
    guide_replace: dict[str, dict[str, Any] | None] = {}
    if guide_enum:
        for trace, replace in ((model_trace, model_replace), (guide_trace, guide_replace)):
            for name, node in _nodes(trace).items():
                if name not in replace and _is_sample(node):
                    new = _expectation(name, node, guide_enum, rank)
                    if new is not node:
                        replace[name] = new
        factors = [_expectation(f["name"], f, guide_enum, rank) for f in factors]
    return (_rebuild(model_trace, model_replace, factors),
            _rebuild(guide_trace, guide_replace, []))

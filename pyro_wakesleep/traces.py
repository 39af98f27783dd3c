"""Running a model/guide pair: importance traces, their checks, and plate nesting.

This and :mod:`pyro_wakesleep.particles` (the traces as tensors) and
:mod:`pyro_wakesleep.downstream` (Rao-Blackwellized learning signals) form the trace
layer that objectives and diagnostics share. A site's log-density is put into the
*canonical layout* ``(K, d_{-P}, ..., d_{-1})`` by :func:`canonical`: ``K`` indexes
particles (or draws) at dim ``-(P+1)``, ``P = max_plate_nesting``, and plate dimensions
keep the negative ``dim`` their :class:`pyro.plate` gave them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import pyro.poutine as poutine
import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape
from torch import Tensor

from pyro_wakesleep.dataflow import Dataflow, TrackDraws, Writes
from pyro_wakesleep.enumeration import (
    Enumerate,
    check_enumeration_marks,
    is_enumerated,
    reduce_enumerated,
)

__all__ = [
    "canonical",
    "check_model_guide",
    "guess_max_plate_nesting",
    "guide_factors",
    "importance_trace",
    "is_auxiliary",
    "is_sample",
    "latent_sites",
    "own_guide_trace",
    "plate_dims",
    "plate_frames",
    "plate_nesting",
    "replayed_sites",
    "sample_sites",
]

PARTICLE_PLATE = "num_particles_vectorized"
#: trace-node key of a tracked guide draw's bit (:mod:`pyro_wakesleep.dataflow`)
BIT = "dataflow_bit"
#: trace-node key of the bitset of draws a tracked site's log-density depends on
DEPENDS = "dataflow_depends"

TracePair = tuple[Trace, Trace]
_NOTHING = contextlib.nullcontext()


class DetachSamples(Messenger):
    """Detaches the value of every latent sample site as soon as it is drawn, so that
    later computation sees no pathwise dependence on the sampler's parameters. Must be
    the outer handler around :func:`pyro.poutine.trace` to be recorded detached."""

    def _pyro_post_sample(self, msg: Any) -> None:
        if not msg["is_observed"] and isinstance(msg["value"], Tensor):
            msg["value"] = msg["value"].detach()


def is_sample(site: Mapping[str, Any]) -> bool:
    """Whether a trace node is a sample site (subsample sites of plates excluded)."""
    return site["type"] == "sample" and not site_is_subsample(site)  # type: ignore[arg-type]


def is_auxiliary(site: Mapping[str, Any]) -> bool:
    """Whether a guide site is auxiliary (``infer={"is_auxiliary": True}``, as autoguides
    such as :class:`~pyro.infer.autoguide.AutoNormal` declare): part of the guide's
    density, absent from the model."""
    return bool(site["infer"].get("is_auxiliary", False))


def sample_sites(trace: Trace) -> list[str]:
    """Names of the sample sites of a trace (observed too), in execution order."""
    return [name for name, site in trace.nodes.items() if is_sample(site)]


def latent_sites(trace: Trace) -> list[str]:
    """Names of the unobserved sample sites of a trace, in execution order."""
    return [n for n, s in trace.nodes.items() if is_sample(s) and not s["is_observed"]]


def guide_factors(model_trace: Trace, guide_trace: Trace) -> list[str]:
    """Names of the observed sample sites of a guide that the model does not have:
    ``pyro.factor`` statements of the guide, part of its log-density. The guide's observed
    sites that the model has too are the model's (:func:`replayed_sites`)."""
    return [
        n for n, s in guide_trace.nodes.items()
        if is_sample(s) and s["is_observed"] and n not in model_trace.nodes
    ]


def replayed_sites(model_trace: Trace, guide_trace: Trace) -> list[str]:
    """Names of the observed sample sites of a guide that the model has too.

    A guide that runs the model inside itself — Pyro's messenger autoguides
    (:class:`~pyro.infer.autoguide.AutoNormalMessenger`,
    :class:`~pyro.infer.autoguide.AutoHierarchicalNormalMessenger`,
    :class:`~pyro.infer.autoguide.AutoRegressiveMessenger`, any
    :class:`~pyro.poutine.guide.GuideMessenger`) — records the model's observations and
    ``pyro.factor`` statements in its trace. They are the model's sites, replayed: not
    guide latents, not guide factors, no part of the guide's density, as in the guide
    trace of :meth:`GuideMessenger.get_traces <pyro.poutine.guide.GuideMessenger.get_traces>`,
    which drops them. Unlike Pyro, a ``pyro.factor`` that such a guide adds of its own (a
    name the model does not have) stays a guide factor (:func:`guide_factors`).
    """
    return [
        n for n, s in guide_trace.nodes.items()
        if is_sample(s) and s["is_observed"] and n in model_trace.nodes
    ]


def own_guide_trace(model_trace: Trace, guide_trace: Trace) -> Trace:
    """The guide trace without the sites it replays from the model
    (:func:`replayed_sites`): the trace Pyro's checks
    (:func:`pyro.util.check_model_guide_match`, :func:`pyro.util.check_if_enumerated`)
    expect of a guide. A new :class:`~pyro.poutine.Trace` sharing the (read-only) nodes;
    ``guide_trace`` is not changed, and is returned itself when it replays nothing."""
    replayed = set(replayed_sites(model_trace, guide_trace))
    if not replayed:
        return guide_trace
    own = Trace(graph_type=guide_trace.graph_type)
    own.nodes.update((n, s) for n, s in guide_trace.nodes.items() if n not in replayed)
    return own


def plate_frames(site: Mapping[str, Any]) -> frozenset[tuple[str, int]]:
    """The ``(name, dim)`` of the vectorized plates a site is in: two plates on the same
    ``dim`` are told apart by name."""
    return frozenset((f.name, f.dim) for f in site["cond_indep_stack"] if f.vectorized)


def check_model_guide(model_trace: Trace, guide_trace: Trace) -> None:
    """Raises ``ValueError`` naming the site where the model and guide disagree."""
    model_latents = set(latent_sites(model_trace))
    for name in latent_sites(guide_trace):
        if is_auxiliary(guide_trace.nodes[name]):
            continue
        node = model_trace.nodes.get(name)
        if node is None or node["type"] != "sample":
            raise ValueError(f"guide site '{name}' does not appear in the model")
        if node["is_observed"]:
            raise ValueError(f"site '{name}' is observed in the model but sampled by the guide")
        sizes = {f.name: f.size for f in node["cond_indep_stack"]}
        for frame in guide_trace.nodes[name]["cond_indep_stack"]:
            if sizes.get(frame.name, frame.size) != frame.size:
                raise ValueError(
                    f"plate '{frame.name}' has size {frame.size} in the guide but "
                    f"{sizes[frame.name]} in the model at site '{name}'"
                )
    missing = model_latents - set(latent_sites(guide_trace))
    missing -= {n for n in missing if is_enumerated(model_trace.nodes[n])}
    if missing:
        raise ValueError(
            f"model latent site(s) {sorted(missing)} have no guide site; the guide must "
            "sample every latent of the model (ScoreFunctionELBO, VimcoELBO and "
            "ReweightedWakeSleepELBO sum out model sites marked "
            "infer={'enumerate': 'parallel'} instead)"
        )


def plate_nesting(pairs: Iterable[TracePair]) -> int:
    """The deepest vectorized plate nesting in some traces."""
    dims: list[int] = [
        frame.dim  # type: ignore[misc]
        for pair in pairs
        for trace in pair
        for site in trace.nodes.values()
        if is_sample(site)
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.name != PARTICLE_PLATE
    ]
    return -min(dims) if dims else 0


def guess_max_plate_nesting(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """Runs model and guide once (blocked from the outside world) and returns the deepest
    plate nesting found, as :meth:`pyro.infer.ELBO._guess_max_plate_nesting` does, but
    without consuming the random number stream (so a seeded call gives the same draws
    whether or not it is the first) and without changing any tensor it writes in place
    (a ``BatchNorm``'s running statistics are put back)."""
    writes = Writes([])
    try:
        with torch.random.fork_rng(), poutine.block(), writes:
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
    finally:
        writes.restore()
    return plate_nesting([(model_trace, guide_trace)])


def importance_trace(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, max_plate_nesting: float,
    detach_guide: bool = False, strict_enumeration_warning: bool = True,
    pyro_checks: bool = True, track: bool = False, enumeration: str | None = None,
) -> TracePair:
    """One guide trace and the model replayed against it, checked, with ``log_prob``
    (scaled and masked), ``log_prob_sum`` and ``unscaled_log_prob`` on every sample site
    (:func:`is_sample`). With ``detach_guide`` the guide's draws carry no pathwise
    gradient.

    Besides :func:`check_model_guide`, and while Pyro's validation is enabled (its
    default), the pair gets the checks Pyro's own ELBOs make: shapes that disagree
    between model and guide at a site and a guide ``pyro.factor`` without
    ``has_rsample`` raise ``ValueError``, plates in the guide but not in the model warn
    (:func:`pyro.util.check_model_guide_match`), and so do guide sites configured for
    enumeration when the run does not enumerate (``strict_enumeration_warning``).
    ``pyro_checks=False`` skips Pyro's checks, for internal replays of a checked run
    (replayed sites are not broadcast by plates, so Pyro's shape check misreads them).

    With ``track``, both programs run under a :class:`~pyro_wakesleep.dataflow.Dataflow`:
    each latent guide site's node gets its draw's bit (key :data:`BIT`) and every sample
    site's node the bitset of the draws its log-density depends on, by provenance or by
    control (key :data:`DEPENDS`; see :mod:`pyro_wakesleep.downstream`).

    With ``enumeration`` (:data:`~pyro_wakesleep.enumeration.EXPECTATION` or
    :data:`~pyro_wakesleep.enumeration.MARGINAL`), guide and model run under
    :func:`pyro.poutine.enum` (enumeration dims left of ``max_plate_nesting``, which must
    then be finite) and the returned traces are the reduced ones of
    :func:`~pyro_wakesleep.enumeration.reduce_enumerated`: enumerated model sites summed
    out into factor nodes, guide-enumerated terms in expectation.
    """
    flow = Dataflow() if track else None
    bits: dict[str, int] = {}
    if enumeration:
        first = -(int(max_plate_nesting) + 1)
        guide = Enumerate(first_available_dim=first)(guide)
        # the model allocates its dims after the guide's, as in TraceEnum_ELBO
        model = Enumerate()(model)
    with flow or _NOTHING:
        guide_tracker = TrackDraws(flow, bits, True) if flow else _NOTHING
        model_tracker = TrackDraws(flow, bits, False) if flow else _NOTHING
        with guide_tracker:
            tracer = poutine.trace(guide)
            if detach_guide:
                with DetachSamples():
                    guide_trace = tracer.get_trace(*args, **kwargs)
            else:
                guide_trace = tracer.get_trace(*args, **kwargs)
        if flow:
            flow.clear_control()
        with model_tracker:
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
    if enumeration:
        check_enumeration_marks(guide_trace, "guide")
        check_enumeration_marks(model_trace, "model")
    # a log-density is a function of the site's value, its distribution's tensors, scale
    # and mask: computed outside the flow, with its dependencies read off those
    _checked_log_probs(model_trace, guide_trace, max_plate_nesting, pyro_checks,
                       strict_enumeration_warning and not enumeration)
    if flow:
        for trace, tracker in ((guide_trace, guide_tracker), (model_trace, model_tracker)):
            for name, node in trace.nodes.items():
                if is_sample(node):
                    entry = cast(dict[str, Any], node)
                    entry[DEPENDS] = (
                        flow.held([node["value"], node["fn"], node["scale"], node["mask"]])
                        | cast(TrackDraws, tracker).control.get(name, 0)
                    )
                    if name in bits and trace is guide_trace:
                        entry[BIT] = bits[name]
    if enumeration:
        controls = [cast(TrackDraws, t).control for t in (guide_tracker, model_tracker)] \
            if flow else []
        model_trace, guide_trace = reduce_enumerated(
            model_trace, guide_trace, int(max_plate_nesting), enumeration,
            (lambda name: controls[0].get(name, 0) | controls[1].get(name, 0)) if flow else None,
        )
    return model_trace, guide_trace


def _checked_log_probs(model_trace: Trace, guide_trace: Trace, max_plate_nesting: float,
                       pyro_checks: bool, strict_enumeration_warning: bool) -> None:
    check_model_guide(model_trace, guide_trace)
    if pyro_checks and is_validation_enabled():
        own = own_guide_trace(model_trace, guide_trace)
        check_model_guide_match(model_trace, own, max_plate_nesting)
        if strict_enumeration_warning:
            check_if_enumerated(own)
    for trace in (model_trace, guide_trace):
        trace.compute_log_prob(lambda _, site: not site_is_subsample(site))
        if is_validation_enabled():
            for site in trace.nodes.values():
                if is_sample(site):
                    check_site_shape(site, max_plate_nesting)  # type: ignore[arg-type]


def canonical(value: Tensor, max_plate_nesting: int, vectorized: bool, site: str) -> Tensor:
    """Puts a site's log-density into the canonical ``(K, d_{-P}, ..., d_{-1})`` layout."""
    rank = max_plate_nesting if not vectorized else max_plate_nesting + 1
    if value.dim() > rank:
        raise ValueError(
            f"site '{site}' has batch shape {tuple(value.shape)} with more dimensions than "
            f"max_plate_nesting={max_plate_nesting} (+1 for particles) allows; declare its "
            "batch dimensions with pyro.plate or move them to the event with .to_event()"
        )
    shape = (1,) * (rank - value.dim() + (not vectorized)) + value.shape
    return value if shape == value.shape else value.reshape(shape)  # one view at most


def plate_dims(site: Mapping[str, Any]) -> frozenset[int]:
    """The negative dims of the vectorized plates a site is in."""
    return frozenset(f.dim for f in site["cond_indep_stack"] if f.vectorized)

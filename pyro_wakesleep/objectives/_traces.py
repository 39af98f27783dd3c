"""From a model/guide pair to traces, and from traces to tensors.

Every objective in this package runs its particles through :func:`run_particles` and
reads tensors in one *canonical layout*: a site's log-density has shape
``(K, d_{-P}, ..., d_{-1})`` where ``K`` indexes particles (dim ``-(P+1)``, i.e. 0) and
``P = max_plate_nesting``; plate dimensions keep the negative ``dim`` their
:class:`pyro.plate` gave them. Vectorized particles come out in this layout directly
(an outermost plate of size ``K``); sequential particles are padded and stacked into it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from pyro.util import check_site_shape
from torch import Tensor

from pyro_wakesleep.signals import reduce_to_dims

PARTICLE_PLATE = "num_particles_vectorized"

TracePair = tuple[Trace, Trace]


class Particles(NamedTuple):
    """One run of the particles.

    :param list pairs: ``(model_trace, guide_trace)`` pairs: one vectorized pair, or one
        per particle.
    :param int max_plate_nesting: the plate nesting :math:`P` of the canonical layout.
    :param bool vectorized: whether ``pairs`` is one vectorized pair whose tensors
        already carry the particle dimension.
    """

    pairs: list[TracePair]
    max_plate_nesting: int
    vectorized: bool

    def canonical(self, value: Tensor, site: str) -> Tensor:
        """A site's log-density (or any batch-shaped tensor) in the canonical layout."""
        return canonical(value, self.max_plate_nesting, self.vectorized, site)


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
    if missing:
        raise ValueError(
            f"model latent site(s) {sorted(missing)} have no guide site; the guide must "
            "sample every latent of the model"
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
    whether or not it is the first)."""
    with torch.random.fork_rng(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    return plate_nesting([(model_trace, guide_trace)])


def importance_trace(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, max_plate_nesting: float,
    detach_guide: bool = False,
) -> TracePair:
    """One guide trace and the model replayed against it, checked, with ``log_prob``
    (scaled and masked), ``log_prob_sum`` and ``unscaled_log_prob`` on every sample site
    (:func:`is_sample`). With ``detach_guide`` the guide's draws carry no pathwise
    gradient."""
    tracer = poutine.trace(guide)
    if detach_guide:
        with DetachSamples():
            guide_trace = tracer.get_trace(*args, **kwargs)
    else:
        guide_trace = tracer.get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    check_model_guide(model_trace, guide_trace)
    for trace in (model_trace, guide_trace):
        trace.compute_log_prob(lambda _, site: not site_is_subsample(site))
        if is_validation_enabled():
            for site in trace.nodes.values():
                if is_sample(site):
                    check_site_shape(site, max_plate_nesting)  # type: ignore[arg-type]
    return model_trace, guide_trace


def run_particles(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, *, num_particles: int,
    vectorize: bool, max_plate_nesting: float, detach_guide: bool = False,
) -> Particles:
    """``num_particles`` importance traces: one vectorized pair whose tensors carry the
    particle plate at ``dim=-(max_plate_nesting + 1)``, or one pair per particle (also
    for a single particle, which needs no particle plate). ``max_plate_nesting`` may be
    infinite only without vectorization; it is then read off the traces."""
    if vectorize and num_particles > 1:
        nesting = int(max_plate_nesting)
        plate = pyro.plate(PARTICLE_PLATE, num_particles, dim=-(nesting + 1))
        pair = importance_trace(plate(model), plate(guide), args, kwargs, nesting + 1,
                                detach_guide)
        return Particles([pair], nesting, True)
    pairs = [
        importance_trace(model, guide, args, kwargs, max_plate_nesting, detach_guide)
        for _ in range(num_particles)
    ]
    finite = max_plate_nesting != float("inf")
    return Particles(pairs, int(max_plate_nesting) if finite else plate_nesting(pairs), False)


def canonical(value: Tensor, max_plate_nesting: int, vectorized: bool, site: str) -> Tensor:
    """Puts a site's log-density into the canonical ``(K, d_{-P}, ..., d_{-1})`` layout."""
    rank = max_plate_nesting if not vectorized else max_plate_nesting + 1
    if value.dim() > rank:
        raise ValueError(
            f"site '{site}' has batch shape {tuple(value.shape)} with more dimensions than "
            f"max_plate_nesting={max_plate_nesting} (+1 for particles) allows; declare its "
            "batch dimensions with pyro.plate or move them to the event with .to_event()"
        )
    value = value.reshape((1,) * (rank - value.dim()) + value.shape)
    return value if vectorized else value.unsqueeze(0)


def plate_dims(site: Mapping[str, Any]) -> frozenset[int]:
    """The negative dims of the vectorized plates a site is in."""
    return frozenset(f.dim for f in site["cond_indep_stack"] if f.vectorized)


def _frames(site: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    return tuple((f.name, f.counter) for f in site["cond_indep_stack"] if not f.vectorized)


def _independent(a: Sequence[tuple[str, int]], b: Sequence[tuple[str, int]]) -> bool:
    counters = dict(a)
    return any(name in counters and counters[name] != counter for name, counter in b)


@functools.lru_cache(maxsize=512)
def _downstream(
    guide: tuple[tuple[str, tuple[tuple[str, int], ...]], ...],
    model: tuple[tuple[str, tuple[tuple[str, int], ...]], ...],
    site: str,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
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
    upstream in the guide) :math:`\\log p`."""
    guide = tuple((n, _frames(guide_trace.nodes[n])) for n in latent_sites(guide_trace))
    model = tuple((n, _frames(model_trace.nodes[n])) for n in sample_sites(model_trace))
    return _downstream(guide, model, site)


def learning_signals(
    model_trace: Trace, guide_trace: Trace, sites: Iterable[str], particles: Particles
) -> dict[str, Tensor]:
    """Rao-Blackwellized, detached learning signals of the given guide sites.

    Site :math:`s`'s signal is the sum of its downstream cost terms
    (:func:`downstream_sites`), each summed over the plates :math:`s` is not in and kept
    elementwise over the plates it is in, in the canonical layout.
    """
    def term(name: str, with_guide: bool) -> Tensor:
        if name in model_trace.nodes:
            value = model_trace.nodes[name]["log_prob"]
            if with_guide:
                value = value - guide_trace.nodes[name]["log_prob"]
        else:  # an auxiliary guide site
            value = -guide_trace.nodes[name]["log_prob"]
        return particles.canonical(value.detach(), name)

    cache: dict[tuple[str, bool], Tensor] = {}
    signals = {}
    particle_dim = -(particles.max_plate_nesting + 1)
    for site in sites:
        down, extra = downstream_sites(model_trace, guide_trace, site)
        keep = plate_dims(guide_trace.nodes[site]) | {particle_dim}
        parts = []
        for key in [(n, True) for n in down] + [(n, False) for n in extra]:
            if key not in cache:
                cache[key] = term(*key)
            parts.append(reduce_to_dims(cache[key], keep))
        signals[site] = functools.reduce(torch.add, parts)
    return signals


class LogWeights(NamedTuple):
    """Log importance weights :math:`\\log w = \\log p(x, z) - \\log q(z \\mid x)` of each
    particle, per element of the plates that every sample site shares.

    :param torch.Tensor value: canonical layout ``(K, d_{-P}, ..., d_{-1})``, of size 1
        in every dimension not in ``plate_dims``; unscaled (per datapoint).
    :param float scale: the common subsample/``poutine.scale`` factor of all sites, by
        which a sum over the plate elements must be multiplied to estimate the full data.
    :param frozenset plate_dims: the dims of the plates the weights are formed per
        element of (empty: one joint weight per particle).
    """

    value: Tensor
    scale: float
    plate_dims: frozenset[int]


def log_weights(particles: Particles) -> LogWeights:
    """Per-datapoint log importance weights of a run of the particles.

    The weights are formed per element of every vectorized plate that *all* sample
    sites (model and guide, observed included) are in — e.g. the data plate of a model
    whose latents are all local — and jointly over everything else, so a model with a
    global latent gets one weight per particle. All sites must share one scale (the
    plate's subsampling factor), which is divided out and returned. Differentiable with
    respect to everything the log-densities depend on.

    :raises ValueError: if sites have different or elementwise scales (e.g. global
        latents with a subsampled data plate: joint weights over a mini-batch estimate
        nothing).
    """
    particle_dim = -(particles.max_plate_nesting + 1)
    shared: frozenset[int] | None = None
    scales: dict[str, float] = {}
    per_pair = []
    for model_trace, guide_trace in particles.pairs:
        terms = []
        for name in sample_sites(model_trace):
            node = model_trace.nodes[name]
            value = node["log_prob"]
            if name in guide_trace.nodes:
                value = value - guide_trace.nodes[name]["log_prob"]
            terms.append(particles.canonical(value, name))
            scale = node["scale"]
            if isinstance(scale, Tensor) and scale.numel() != 1:
                raise ValueError(f"site '{name}' has an elementwise scale; importance "
                                 "weights need one scale per site")
            scales[name] = float(scale)
            dims = plate_dims(node) - {particle_dim}
            shared = dims if shared is None else shared & dims
        for name in latent_sites(guide_trace):  # auxiliary guide sites: -log q only
            node = guide_trace.nodes[name]
            if name not in model_trace.nodes:
                terms.append(particles.canonical(-node["log_prob"], name))
                dims = plate_dims(node) - {particle_dim}
                shared = dims if shared is None else shared & dims
        per_pair.append(terms)
    if len(set(scales.values())) > 1:
        raise ValueError(
            "importance weights need every sample site to have the same scale, got "
            f"{scales}; a subsampled plate with latents outside it cannot be importance "
            "weighted per mini-batch"
        )
    dims = shared or frozenset()
    keep = dims | {particle_dim}
    values = [
        functools.reduce(torch.add, [reduce_to_dims(t, keep) for t in terms])
        for terms in per_pair
    ]
    scale = next(iter(scales.values()), 1.0)
    value = torch.cat(values) if len(values) > 1 else values[0]
    return LogWeights(value / scale, scale, dims)

"""A run of the particles as tensors, and the sums every objective shares.

:func:`run_particles` runs the guide and the model replayed against it ``K`` times, in
one vectorized pass (an outermost plate of size ``K``) or one run after another, and
returns :class:`Particles`: every sample site's log-densities in the canonical layout
``(K, d_{-P}, ..., d_{-1})`` of :mod:`pyro_wakesleep.traces`, vectorized and sequential
particles alike. A site that appears in only some particles (stochastic control flow) is
zero where it is absent, and its presence mask says where. An objective is then only its
own math on these tensors; the sums they share (:func:`log_joint`, :func:`log_guide`,
:func:`log_weights`) are here once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import pyro
import torch
from torch import Tensor

from pyro_wakesleep._validation import check_finite
from pyro_wakesleep.enumeration import enumerated_sites
from pyro_wakesleep.signals import reduce_to_dims
from pyro_wakesleep.traces import (
    PARTICLE_PLATE,
    TracePair,
    canonical,
    guide_factors,
    importance_trace,
    latent_sites,
    plate_frames,
    plate_nesting,
    sample_sites,
)

__all__ = [
    "LogWeights",
    "Particles",
    "SiteTensors",
    "check_all_finite",
    "check_finite_sites",
    "log_guide",
    "log_joint",
    "log_weights",
    "run_particles",
]


class SiteTensors(NamedTuple):
    """One sample site over all particles, in the canonical layout.

    :param str name: the site's name.
    :param dict node: the site's trace node in the first particle that has it: the
        guide's for a latent (its ``fn``, ``infer``, plates), else the model's. Read-only.
    :param torch.Tensor log_p: the model's log-density (scaled and masked), or ``None``
        for an auxiliary guide site, which the model does not have.
    :param torch.Tensor log_q: the guide's log-density (scaled and masked), or ``None``
        for a site the guide does not sample (observed sites).
    :param torch.Tensor score: the guide's unscaled, unmasked log-density (the one whose
        gradient is the score function), or ``None`` like ``log_q``.
    :param torch.Tensor present: ``(K,)`` booleans, the particles in which the site
        appears; every tensor above is zero in the others.
    :param bool everywhere: whether the site appears in every particle (``present`` is
        all true), known without reading a tensor.
    """

    name: str
    node: Mapping[str, Any]
    log_p: Tensor | None
    log_q: Tensor | None
    score: Tensor | None
    present: Tensor
    everywhere: bool = True


class Particles(NamedTuple):
    """One run of ``K`` particles, as tensors (see the module docstring).

    :param dict sites: :class:`SiteTensors` of every sample site, model sites (observed
        included) first in execution order, then guide-only sites: auxiliary latents
        (autoguides) and the guide's ``pyro.factor`` statements (whose ``log_q`` is the
        factor).
    :param list guide_latents: the guide's latent sites, in execution order.
    :param int num_particles: :math:`K`.
    :param int max_plate_nesting: the plate nesting :math:`P` of the layout.
    :param bool vectorized: whether the particles were drawn in one vectorized pass.
    :param tuple traces: the ``(model_trace, guide_trace)`` pairs behind the tensors
        (one vectorized pair, or one per particle), for what needs the dependency
        structure (:mod:`pyro_wakesleep.downstream`) or a replay.
    :param tuple enumerated: the sites summed out exactly (:mod:`pyro_wakesleep.enumeration`):
        model sites inside the contracted factors (sites named ``"_sum[...]"``), then the
        guide's enumerated sites; empty without enumeration.
    """

    sites: dict[str, SiteTensors]
    guide_latents: list[str]
    num_particles: int
    max_plate_nesting: int
    vectorized: bool
    traces: tuple[TracePair, ...]
    enumerated: tuple[str, ...] = ()

    @property
    def particle_dim(self) -> int:
        """The particle dimension, counted from the right: ``-(P + 1)``."""
        return -(self.max_plate_nesting + 1)

    def canonical(self, value: Tensor, site: str) -> Tensor:
        """A batch-shaped tensor of one run (one particle, or all if vectorized) in the
        canonical layout."""
        return canonical(value, self.max_plate_nesting, self.vectorized, site)

    def zeros(self) -> Tensor:
        """Zeros of shape ``(K, 1, ..., 1)``, on the device and of the dtype of the
        sites' log-densities."""
        like = next((s.log_p for s in self.sites.values() if s.log_p is not None), None)
        shape = (self.num_particles,) + (1,) * self.max_plate_nesting
        return like.new_zeros(shape) if like is not None else torch.zeros(shape)

    def stack(self, name: str, values: Sequence[Tensor | None]) -> Tensor:
        """One canonical tensor per run (``None`` where the site is absent) as one
        tensor over all particles, zero for absent runs.

        :raises ValueError: if the runs give the site different shapes.
        """
        given = [v for v in values if v is not None]
        shapes = {tuple(v.shape) for v in given}
        if len(shapes) > 1:
            raise ValueError(
                f"site '{name}' has different batch shapes {sorted(shapes)} across particles; "
                "sequential particles must give a site the same shape each time"
            )
        if len(given) == len(values):
            return given[0] if len(given) == 1 else torch.cat(given)
        zero = given[0].new_zeros(given[0].shape)
        return torch.cat([v if v is not None else zero for v in values])


#: node key of a site's log-densities in the canonical layout, computed once per run
CANONICAL = "_pyro_wakesleep_canonical"


def canonical_field(node: Any, key: str, particles: Particles) -> Tensor:
    """``node[key]`` (a log-density of one run) in the canonical layout, kept in the node
    so that what reads it again (the learning signals) makes no new view of it."""
    cache = node.setdefault(CANONICAL, {})
    value = cache.get(key)
    if value is None or value[0] is not node[key]:
        value = cache[key] = (node[key], particles.canonical(node[key], node["name"]))
    return value[1]


def _particles(pairs: list[TracePair], nesting: int, vectorized: bool, num: int) -> Particles:
    """Collects the traces of a run into :class:`Particles`."""
    empty = Particles({}, [], num, nesting, vectorized, tuple(pairs))
    model_names: dict[str, None] = {}
    guide_names: dict[str, None] = {}
    factors: dict[str, None] = {}
    for model_trace, guide_trace in pairs:
        model_names.update(dict.fromkeys(sample_sites(model_trace)))
        guide_names.update(dict.fromkeys(latent_sites(guide_trace)))
        factors.update(dict.fromkeys(guide_factors(model_trace, guide_trace)))
    sites = {}
    everywhere_mask: Tensor | None = None
    guide_only = [n for n in [*guide_names, *factors] if n not in model_names]
    for name in [*model_names, *guide_only]:
        model_nodes: list[Any] = [m.nodes.get(name) for m, _ in pairs]
        in_model, in_guide = name in model_names, name in guide_names or name in factors
        guide_nodes: list[Any] = [g.nodes.get(name) if in_guide else None for _, g in pairs]
        present = [m is not None or g is not None
                   for m, g in zip(model_nodes, guide_nodes, strict=True)]
        node = next(g if g is not None else m
                    for m, g in zip(model_nodes, guide_nodes, strict=True)
                    if g is not None or m is not None)

        def field(nodes: list[Any], key: str, name: str = name) -> Tensor:
            return empty.stack(name, [
                canonical_field(n, key, empty) if n is not None else None for n in nodes
            ])

        everywhere = vectorized or all(present)
        if everywhere_mask is None:
            everywhere_mask = torch.ones(num, dtype=torch.bool)  # one, shared by the sites
        sites[name] = SiteTensors(
            name, node,
            field(model_nodes, "log_prob") if in_model else None,
            field(guide_nodes, "log_prob") if in_guide else None,
            field(guide_nodes, "unscaled_log_prob") if in_guide else None,
            everywhere_mask if everywhere else torch.tensor(present),
            everywhere,
        )
    summed = dict.fromkeys(n for pair in pairs for n in enumerated_sites(*pair))
    return empty._replace(sites=sites, guide_latents=list(guide_names), enumerated=tuple(summed))


def run_particles(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, *, num_particles: int,
    vectorize: bool, max_plate_nesting: float, detach_guide: bool = False,
    strict_enumeration_warning: bool = True, pyro_checks: bool = True, track: bool = False,
    enumeration: str | None = None,
) -> Particles:
    """``num_particles`` importance traces as :class:`Particles`: one vectorized run
    with the particle plate at ``dim=-(max_plate_nesting + 1)``, or one run per particle
    (also for a single particle, which needs no particle plate). ``max_plate_nesting``
    may be infinite only without vectorization; it is then read off the traces.
    With ``detach_guide`` the guide's draws carry no pathwise gradient; see
    :func:`~pyro_wakesleep.traces.importance_trace` for the checks each run gets, and
    :func:`check_finite_sites` for the one every objective makes of the result. With
    ``track`` the traces carry the dependencies that
    :func:`~pyro_wakesleep.downstream.learning_signals` needs. With ``enumeration``
    (which needs a finite ``max_plate_nesting``) sites marked for parallel enumeration
    are summed out (:mod:`pyro_wakesleep.enumeration`)."""
    if vectorize and num_particles > 1:
        nesting = int(max_plate_nesting)
        plate = pyro.plate(PARTICLE_PLATE, num_particles, dim=-(nesting + 1))
        pair = importance_trace(plate(model), plate(guide), args, kwargs, nesting + 1,
                                detach_guide, strict_enumeration_warning, pyro_checks, track,
                                enumeration)
        return _particles([pair], nesting, True, num_particles)
    pairs = [
        importance_trace(model, guide, args, kwargs, max_plate_nesting, detach_guide,
                         strict_enumeration_warning, pyro_checks, track, enumeration)
        for _ in range(num_particles)
    ]
    finite = max_plate_nesting != float("inf")
    nesting = int(max_plate_nesting) if finite else plate_nesting(pairs)
    return _particles(pairs, nesting, False, num_particles)


def check_finite_sites(particles: Particles) -> None:
    """Raises ``ValueError`` naming the first site (and the number of elements) whose
    model or guide log-density is not finite: an objective calls it before it forms any
    gradient, so that one bad draw never writes NaN into parameters."""
    check_all_finite([
        (value, f"{what} log-density at site '{site.name}'")
        for site in particles.sites.values()
        for what, value in (("model", site.log_p), ("guide", site.log_q)) if value is not None
    ], "check the site's support and the guide's draws")


def check_all_finite(items: Sequence[tuple[Tensor, str]],
                     hint: str = "check the model's log-densities at the guide's draws") -> None:
    """:func:`~pyro_wakesleep._validation.check_finite` of many ``(value, what)`` pairs
    at the cost of one check (of the sum of their norms, one op); only when that one
    fails are they checked one by one, so the error names the first bad one."""
    if not items:
        return
    with torch.no_grad():  # one op for all: a norm is finite iff every element is
        norms = torch._foreach_norm([v for v, _ in items], 1)
        total = norms[0] if len(norms) == 1 else torch.stack(norms).sum()
    try:
        check_finite(total, "values", hint)
    except ValueError:
        for value, what in items:
            check_finite(value.detach(), what, hint)
        # every value finite: only their norm overflowed


def log_joint(particles: Particles, *, weights: Tensor | None = None) -> Tensor:
    """:math:`\\sum_k \\log p(x, z_k)`: the model's log-density (scaled) summed over
    particles, sites and plates; with ``weights`` (e.g. self-normalized importance
    weights, which broadcast against the canonical layout) the weighted sum
    :math:`\\sum_{k,i} w_{k,i} \\log p(x_i, z_{k,i})`."""
    return _total([s.log_p for s in particles.sites.values() if s.log_p is not None], weights)


def log_guide(
    particles: Particles, where: Callable[[SiteTensors], bool] | None = None, *,
    weights: Tensor | None = None,
) -> Tensor:
    """:math:`\\sum_k \\log q(z_k)`: the guide's log-density (scaled) summed over
    particles, latent sites (those for which ``where`` holds, if given) and plates;
    weighted by ``weights`` as in :func:`log_joint`."""
    return _total([
        s.log_q for s in particles.sites.values()
        if s.log_q is not None and (where is None or where(s))
    ], weights)


def _total(values: list[Tensor], weights: Tensor | None = None) -> Tensor:
    terms = [(v if weights is None else weights * v).sum() for v in values]
    if terms:
        return functools.reduce(torch.add, terms)
    return torch.zeros(()) if weights is None else weights.new_zeros(())


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
    shared: frozenset[tuple[str, int]] | None = None
    scales: dict[str, float] = {}
    terms = []
    for site in particles.sites.values():
        frames = frozenset(f for f in plate_frames(site.node) if f[0] != PARTICLE_PLATE)
        shared = frames if shared is None else shared & frames
        if site.log_p is None:  # an auxiliary guide site: -log q only
            terms.append(-site.log_q)  # type: ignore[operator]
            continue
        terms.append(site.log_p if site.log_q is None else site.log_p - site.log_q)
        scale = site.node["scale"]
        if isinstance(scale, Tensor) and scale.numel() != 1:
            raise ValueError(f"site '{site.name}' has an elementwise scale; importance "
                             "weights need one scale per site")
        scales[site.name] = float(scale)
    if len(set(scales.values())) > 1:
        raise ValueError(
            "importance weights need every sample site to have the same scale, got "
            f"{scales}; a subsampled plate with latents outside it cannot be importance "
            "weighted per mini-batch"
        )
    dims = frozenset(dim for _, dim in shared or ())
    keep = dims | {particles.particle_dim}
    value = functools.reduce(torch.add, [reduce_to_dims(t, keep) for t in terms])
    scale = next(iter(scales.values()), 1.0)
    return LogWeights(value / scale, scale, dims)

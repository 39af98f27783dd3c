"""The guide's gradient split into its score-function and pathwise parts, and a run of the
particles replayed against its own draws held constant.

Part of the trace layer (with :mod:`pyro_wakesleep.particles`): objectives call it on
:class:`~pyro_wakesleep.particles.Particles` and keep only their own math. A guide site
is *scored* when its distribution has no ``rsample`` and *pathwise* otherwise;
:func:`score_log_q` sums the scored sites' log-densities per particle and plate element,
:func:`pathwise_sites` lists the others. :func:`replay_stopped` runs guide and model
again against the detached draws, which separates a pathwise site's score term
:math:`\\nabla_\\phi \\log q_\\phi(z)|_z` from the path through the draws: it serves the
doubly reparameterized estimators (``VimcoELBO(dreg=True)``,
``ReweightedWakeSleepELBO(dreg=True)``) and sticking the landing
(``ScoreFunctionELBO(stick_the_landing=True)``); :func:`replay_log_weights` forms the
log-weights' path-only part that the first two share.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from pyro_wakesleep.particles import (
    LogWeights,
    Particles,
    SiteTensors,
    log_weights,
    run_particles,
)
from pyro_wakesleep.signals import reduce_to_dims


def score_log_q(particles: Particles, dims: frozenset[int], masked: bool = False) -> Tensor:
    """Per particle and element of the plates ``dims``, the sum of the unscaled guide
    log-densities of the non-reparameterizable sites (unmasked: a masked site is still
    drawn from its distribution), in the canonical layout; zero where there are none.

    :param Particles particles: a run of the particles.
    :param frozenset dims: the plate dims to keep (those of
        :func:`~pyro_wakesleep.particles.log_weights`).
    :param bool masked: sum the masked log-densities instead, as they enter
        :func:`~pyro_wakesleep.particles.log_weights` (unscaled, like it).
    """
    keep = dims | {particles.particle_dim}
    parts = [
        reduce_to_dims(_unscaled_log_q(site) if masked else site.score, keep)
        for site in particles.sites.values()
        if site.score is not None and not site.node["fn"].has_rsample
    ]
    return functools.reduce(torch.add, parts, particles.zeros())


def _unscaled_log_q(site: SiteTensors) -> Tensor:
    scale = site.node["scale"]
    log_q = cast(Tensor, site.log_q)  # a scored site is a guide site
    return log_q / (float(scale) if isinstance(scale, Tensor) else scale)


def pathwise_sites(particles: Particles) -> list[str]:
    """The guide's reparameterizable latent sites (auxiliary ones included)."""
    return [name for name, site in particles.sites.items()
            if site.log_q is not None and name in particles.guide_latents
            and site.node["fn"].has_rsample]


def warn_if_no_pathwise_site(
    particles: Particles, objective: str, option: str, scored: bool = False
) -> None:
    """Warns (:class:`UserWarning`) that ``option`` has no effect when the guide has no
    reparameterizable site (or, with ``scored``, when every site is scored anyway)."""
    if scored or not pathwise_sites(particles):
        warnings.warn(
            f"{objective}({option}=True): the guide has no pathwise (reparameterized) "
            f"site (guide sites: {sorted(particles.guide_latents)}), so {option} has no "
            "effect; every guide site gets the score-function estimator",
            UserWarning, stacklevel=5,
        )


class _ReplayDraws(ReplayMessenger):
    """:class:`~pyro.poutine.replay_messenger.ReplayMessenger` that keeps the prior a
    messenger guide has recorded for the running site (see :func:`replay_draws`)."""

    def _pyro_sample(self, msg: Any) -> None:
        running = msg["infer"]
        super()._pyro_sample(msg)
        if msg["infer"] is not running and running and "prior" in running:
            msg["infer"] = {**msg["infer"], "prior": running["prior"]}


def replay_draws(fn: Callable, trace: Trace) -> Callable:
    """:func:`pyro.poutine.replay` of ``fn`` against the draws of ``trace``, for guides
    too that run the model inside themselves (Pyro's messenger autoguides,
    :class:`~pyro.poutine.guide.GuideMessenger`).

    Such a guide records each latent site's prior in ``infer["prior"]`` before the
    replay sees the site, and reads it back after (to batch it as the site, and to form
    its model trace). ``poutine.replay`` puts the traced run's ``infer`` in the site's
    place, whose prior is another run's, batched by plates that do not batch replayed
    sites, and shared with that trace, which the guide would then change. Here the site
    gets a new ``infer``: the traced one with the running prior. Sites without a recorded
    prior are replayed exactly as by ``poutine.replay``.
    """
    return _ReplayDraws(trace=trace)(fn)


def replay_stopped(
    particles: Particles, model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> Particles:
    """The same particles with every guide draw held constant: the guide and the model
    replayed against the detached values of ``particles``' guide traces (plates'
    subsample indices included), in the same layout and with the same site nodes.

    Each guide site's ``log_q`` is then :math:`\\log q_\\phi(\\bot z)`, whose gradient is
    the score :math:`\\nabla_\\phi \\log q_\\phi(z)` at fixed draws, with every
    parameter recomputed from the detached earlier draws; so ``log_q(particles) -
    log_q(replay)`` has the gradient of the path through the draws only, exactly, for
    any distribution and any dependence of the parameters on earlier draws. Each
    model site's ``log_p`` is :math:`\\log p_\\theta(x, \\bot z)`, with gradient for the
    model's parameters only. Costs one more run of guide and model.
    """
    runs = []
    for model_trace, guide_trace in particles.traces:
        del model_trace
        stopped = Trace()
        for name, node in guide_trace.nodes.items():
            if node["type"] == "sample" and not node["is_observed"]:
                value = node["value"]
                stopped.add_node(
                    name, type="sample", is_observed=False, infer=node["infer"],
                    value=value.detach() if isinstance(value, Tensor) else value,
                )
        runs.append(run_particles(
            model, replay_draws(guide, stopped), args, kwargs,
            num_particles=particles.num_particles if particles.vectorized else 1,
            vectorize=particles.vectorized, max_plate_nesting=particles.max_plate_nesting,
            pyro_checks=False,
        ))
    if len(runs) == 1:
        sites = {
            name: site._replace(log_p=runs[0].sites[name].log_p,
                                log_q=runs[0].sites[name].log_q,
                                score=runs[0].sites[name].score)
            for name, site in particles.sites.items()
        }
        return particles._replace(sites=sites)

    def field(name: str, key: str) -> Tensor | None:
        values = [getattr(run.sites[name], key) if name in run.sites else None for run in runs]
        if all(v is None for v in values):
            return None
        return particles.stack(name, values)

    sites = {
        name: site._replace(log_p=field(name, "log_p"), log_q=field(name, "log_q"),
                            score=field(name, "score"))
        for name, site in particles.sites.items()
    }
    return particles._replace(sites=sites)


def hold_guide_constant(particles: Particles) -> Particles:
    """``particles`` with every guide log-density detached (for a gradient of the
    model's parameters only)."""
    sites = {
        name: site._replace(
            log_q=None if site.log_q is None else site.log_q.detach(),
            score=None if site.score is None else site.score.detach(),
        )
        for name, site in particles.sites.items()
    }
    return particles._replace(sites=sites)


class Replay(NamedTuple):
    """A run of the particles (draws pathwise) beside its :func:`replay_stopped`, as
    the doubly reparameterized importance-weighted estimators use them.

    :param Particles stopped: the replay, every guide draw held constant.
    :param LogWeights weights: the run's log-weights, with their whole gradient.
    :param torch.Tensor path: ``weights.value - log_weights(stopped).value``, whose
        gradient is that of :math:`\\log w` through the reparameterized draws only.
    :param torch.Tensor score_q: :func:`score_log_q` of the run with ``masked=True``:
        the score-function sites' log-density as it enters :math:`\\log w`, with its
        whole gradient (the path through reparameterized draws included).
    """

    stopped: Particles
    weights: LogWeights
    path: Tensor
    score_q: Tensor


def replay_log_weights(
    particles: Particles, model: Callable, guide: Callable, args: tuple, kwargs: dict,
    weights: LogWeights | None = None,
) -> Replay:
    """:func:`replay_stopped` of ``particles`` and the log-weight terms built from it
    (see :class:`Replay`); ``weights`` are ``log_weights(particles)`` if already formed.
    Costs one more run of guide and model."""
    stopped = replay_stopped(particles, model, guide, args, kwargs)
    full = log_weights(particles) if weights is None else weights
    path = full.value - log_weights(stopped).value
    return Replay(stopped, full, path, score_log_q(particles, full.plate_dims, masked=True))

"""The ARMS step of :class:`~pyro_wakesleep.objectives.DisarmELBO` (``estimator="arms"``):
one group of :math:`n` correlated runs per discrete guide site, turned into tensors for
:func:`~pyro_wakesleep.antithetic.arms_gradient`.

The guide draws :math:`b_1` at each discrete site as usual (the *main* run, one particle).
For site :math:`s`, the noise of :math:`b_1` is recovered from its law given the draw,
the other :math:`n - 1` noises are drawn from the Dirichlet copula given it
(:func:`~pyro_wakesleep.antithetic.copula_noise`), and guide and model run again
:math:`n - 1` times (one vectorized pass, or one run each) with the sites before
:math:`s` replayed from the main run, :math:`b_k` at :math:`s` and the later sites drawn
afresh. Kept apart from ``disarm.py`` only for length; the class documents the estimator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Bernoulli, Categorical, Independent, OneHotCategorical

from pyro_wakesleep._replay import replay_draws
from pyro_wakesleep._validation import check_finite
from pyro_wakesleep.antithetic import (
    arms_gradient,
    conditional_uniform,
    copula_noise,
    stick_breaking_logits,
    stick_breaking_noise,
    stick_breaking_value,
)
from pyro_wakesleep.downstream import learning_signals
from pyro_wakesleep.particles import Particles, check_finite_sites, run_particles

if TYPE_CHECKING:
    from pyro_wakesleep.objectives.disarm import DisarmELBO

__all__ = ["arms_step"]


class _Group(NamedTuple):
    """A discrete site's :math:`n` correlated draws, in the layout ``(n, d_{-P}, ...,
    d_{-1}, *trailing)`` (batch dims padded to the plate nesting :math:`P`)."""

    logits: Tensor  # alpha of the binary decisions, (d..., *trailing), differentiable
    decisions: Tensor  # (n, d..., *trailing), 0/1
    active: Tensor | None  # decisions that some draw reaches (categorical), else None
    trailing: int  # dims of the decisions after the batch dims
    values: Tensor  # the site's values of draws 2..n, (n - 1, d..., *event)
    shape: torch.Size  # the site's value shape in the main run


def _pad(x: Tensor, nesting: int, trailing: int) -> Tensor:
    """``x`` with its batch dims (all but the last ``trailing``) padded to ``nesting``."""
    return x.reshape((1,) * (nesting - x.dim() + trailing) + x.shape)


def _group(name: str, node: Mapping[str, Any], num: int, nesting: int) -> _Group | None:
    """The correlated draws of a discrete guide site (``None`` for a reparameterizable
    one); raises for any other site."""
    fn, event = node["fn"], 0
    while isinstance(fn, Independent):
        event += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    value = node["value"]
    if isinstance(fn, Bernoulli):
        value, logits = torch.broadcast_tensors(value.detach(), fn.logits)
        logits = _pad(logits, nesting, event)
        noise = copula_noise(conditional_uniform(_pad(value, nesting, event), logits),
                             logits, num)
        decisions = (noise < torch.sigmoid(logits.detach())).to(logits.dtype)
        return _Group(logits, decisions, None, event, decisions[1:].to(value.dtype),
                      value.shape)
    if isinstance(fn, (Categorical, OneHotCategorical)):
        one_hot = isinstance(fn, OneHotCategorical)
        index = value.argmax(-1) if one_hot else value
        ell = _pad(fn.logits.expand(index.shape + fn.logits.shape[-1:]), nesting, event + 1)
        index = _pad(index, nesting, event)
        alpha = stick_breaking_logits(ell)
        noise = copula_noise(stick_breaking_noise(index, ell), alpha, num)
        decisions = (noise < torch.sigmoid(alpha.detach())).to(alpha.dtype)
        draws = stick_breaking_value(noise, ell.expand((num, *ell.shape)))
        reach = draws.max(0).values.unsqueeze(-1)
        active = (torch.arange(alpha.shape[-1], device=alpha.device) <= reach).to(alpha)
        rest = draws[1:]
        values = (F.one_hot(rest, ell.shape[-1]) if one_hot else rest).to(value.dtype)
        return _Group(alpha, decisions, active, event + 1, values, value.shape)
    if node["fn"].has_rsample:
        return None
    raise ValueError(
        f"DisarmELBO(estimator='arms'): guide site '{name}' has distribution "
        f"{type(node['fn']).__name__} ({type(fn).__name__}), which is neither "
        "reparameterizable nor Bernoulli or categorical; use ScoreFunctionELBO or VimcoELBO "
        "for it"
    )


def _expand(node: Mapping[str, Any], num: int, nesting: int) -> Any:
    """A main-run draw as the same draw for each of ``num`` vectorized particles."""
    value = node["value"]
    if site_is_subsample(cast(Any, node)) or not isinstance(value, Tensor):
        return value
    event = len(node["fn"].event_shape)
    padded = _pad(value, nesting, event)
    return padded.unsqueeze(0).expand((num, *padded.shape))


def _correlated_runs(
    objective: DisarmELBO, model: Callable, guide: Callable, args: tuple, kwargs: dict,
    main: Particles, site: str, group: _Group,
) -> list[Particles]:
    """The runs of draws 2..n at ``site``: the sites before it replayed from ``main``."""
    num = objective.num_particles
    nesting = main.max_plate_nesting
    vectorize = objective.vectorize_particles and num > 2
    nodes: Mapping[str, Mapping[str, Any]] = main.traces[0][1].nodes
    replays = []
    for k in range(1 if vectorize else num - 1):
        partial = Trace()
        for name, node in nodes.items():
            if node["type"] != "sample" or node["is_observed"]:
                continue
            if name == site:
                value = group.values if vectorize else group.values[k].reshape(group.shape)
            else:
                value = _expand(node, num - 1, nesting) if vectorize else node["value"]
            partial.add_node(name, **dict(node, value=value, infer=dict(node["infer"])))
            if name == site:
                break
        replays.append(run_particles(
            model, replay_draws(guide, partial), args, kwargs,
            num_particles=num - 1 if vectorize else 1, vectorize=vectorize,
            max_plate_nesting=nesting, pyro_checks=False, track=True,
        ))
    return replays


def arms_step(
    objective: DisarmELBO, model: Callable, guide: Callable, args: tuple, kwargs: dict,
    elbo_and_pathwise: Callable[[Particles], tuple[Tensor, Tensor]],
    num_discrete: Callable[[Particles], int],
) -> tuple[Tensor, Tensor]:
    """The ELBO estimate and the surrogate of one ARMS group (see
    :class:`~pyro_wakesleep.objectives.DisarmELBO`)."""
    num = objective.num_particles
    objective._know_plate_nesting(model, guide, args, kwargs, objective.vectorize_particles)
    main = run_particles(
        model, guide, args, kwargs, num_particles=1, vectorize=False,
        max_plate_nesting=objective.max_plate_nesting,
        strict_enumeration_warning=objective.strict_enumeration_warning, track=True,
    )
    nesting = main.max_plate_nesting
    groups = {}
    for name in main.guide_latents:
        group = _group(name, main.sites[name].node, num, nesting)
        if group is not None:
            groups[name] = group
    signals = learning_signals(main, list(groups))
    surrogate = torch.zeros(())
    extra: list[Particles] = []
    for name, group in groups.items():
        runs = _correlated_runs(objective, model, guide, args, kwargs, main, name, group)
        extra.extend(runs)
        f = torch.cat([signals[name], *(learning_signals(r, [name])[name] for r in runs)])
        check_finite(f, f"learning signal at site '{name}'")
        f = f.reshape(f.shape + (1,) * group.trailing)
        g = arms_gradient(f, group.decisions, group.logits)
        if group.active is not None:
            g = g * group.active
        surrogate = surrogate + (g.detach() * group.logits).sum()
    for run in (main, *extra):
        check_finite_sites(run)
    # every run is a draw from the guide: average them, with weights symmetric in the two
    # runs of each (main, extra) pair, which keeps the average unbiased when the number of
    # discrete sites varies with the draws (stochastic control flow)
    main_elbo, main_path = elbo_and_pathwise(main)
    elbo, pathwise = main_elbo, main_path
    for run in extra:
        weight = 1.0 / (1.0 + (num - 1) * (len(groups) + num_discrete(run)) / 2.0)
        run_elbo, run_path = elbo_and_pathwise(run)
        count = run.num_particles
        elbo = elbo + weight * (run_elbo - count * main_elbo)
        pathwise = pathwise + weight * (run_path - count * main_path)
    return elbo, surrogate + pathwise

"""The step shared by :class:`~pyro_wakesleep.objectives.UnorderedSetELBO` and
:class:`~pyro_wakesleep.objectives.IndecaterELBO`: the learning signal of a categorical
guide site evaluated at other values of the site, with everything before it held fixed.

One *main* run of guide and model draws every site as usual. For each categorical site
:math:`s`, its elements are split into

* *parallel* dims: the plate dims of :math:`s` in which every cost term that depends on
  :math:`s` also lies (e.g. a data plate): the learning signal is kept per element of
  them, and one run can set every element to another value at once;
* *joint* dims: the site's other batch dims and its event dims (e.g. ``D`` categoricals
  in an ``Independent`` or a plate whose elements feed one likelihood term): the
  *variables* of the site, set to another value one at a time with the others held at
  the main run's draws.

For :math:`A` alternative values per variable and :math:`J` variables, guide and model
run again :math:`J A` times (one vectorized pass, or one run each with
``vectorize_particles=False``), replaying every site before :math:`s` from the main run,
putting the variant at :math:`s` and drawing the later sites afresh; the site's learning
signal in each variant is read off per element. Kept apart from the objectives because
both use it; each objective documents its estimator.

A ``Bernoulli`` site is a two-category one: its value is the category index, its
log-probabilities :math:`(\\log(1 - p), \\log p)` from its logits, and the variants are
handed to the programs as the Bernoulli's floats. Categories the guide's sampler never
draws (``probs`` exactly 0, e.g. logits :math:`-\\infty`) get log-probability
:math:`-\\infty` (:func:`~pyro_wakesleep.categorical.support_log_probs`); the objectives
never run a variant at such a category: the signal there is the main draw's, and the
estimators give it no weight.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import Bernoulli, Categorical, Independent, OneHotCategorical

from pyro_wakesleep._replay import replay_draws
from pyro_wakesleep.categorical import support_log_probs
from pyro_wakesleep.downstream import downstream_sites, learning_signals
from pyro_wakesleep.particles import (
    Particles,
    check_all_finite,
    check_finite_sites,
    log_guide,
    log_joint,
    run_particles,
)
from pyro_wakesleep.traces import plate_frames

if TYPE_CHECKING:
    from pyro_wakesleep.objectives.base import Objective

__all__ = ["CategoricalSite", "SiteEstimator", "categorical_step"]


class CategoricalSite(NamedTuple):
    """A categorical guide site of the main run in the layout ``T = (d_{-P}, ..., d_{-1},
    *event)`` (batch dims padded to the plate nesting :math:`P`).

    :param str name: the site's name.
    :param torch.Tensor logits: normalized log-probabilities, ``(*T, C)``, differentiable;
        exactly ``-inf`` at categories of probability 0
        (:func:`~pyro_wakesleep.categorical.support_log_probs`; a Bernoulli's are
        :math:`(\\log(1 - p), \\log p)`).
    :param torch.Tensor draws: the main run's draws as category indices, ``T``, long.
    :param torch.Tensor position: the variable each element belongs to (a flat index over
        the joint dims), ``T``, long.
    :param int num_variables: :math:`J`, the number of variables.
    :param bool one_hot: whether values are one-hot (``OneHotCategorical``).
    :param torch.Size shape: the site's value shape in the main run.
    :param torch.dtype dtype: the site's value dtype (a Bernoulli's float).
    """

    name: str
    logits: Tensor
    draws: Tensor
    position: Tensor
    num_variables: int
    one_hot: bool
    shape: torch.Size
    dtype: torch.dtype


#: an objective's estimator for one site: ``(site, f_main, evaluate) -> surrogate``,
#: where ``f_main`` is the main run's learning signal per element (``T``) and
#: ``evaluate(alternatives)`` returns the signal with each variable set to each of the
#: ``(A, *T)`` alternatives, ``(A, *T)`` (at an alternative of probability 0, the main
#: draw's signal: the estimator must give it no weight)
SiteEstimator = Callable[[CategoricalSite, Tensor, Callable[[Tensor], Tensor]], Tensor]


def _base(fn: Any) -> tuple[Any, int]:
    event = 0
    while isinstance(fn, Independent):
        event += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    return fn, event


def _site(name: str, main: Particles, objective: str) -> CategoricalSite | None:
    """The categorical view of a guide site (a Bernoulli as two categories), ``None`` for
    a reparameterizable one; raises for any other site."""
    (model_trace, guide_trace), = main.traces
    node: Any = guide_trace.nodes[name]
    fn, event = _base(node["fn"])
    if not isinstance(fn, (Categorical, OneHotCategorical, Bernoulli)):
        if node["fn"].has_rsample:
            return None
        raise ValueError(
            f"{objective}: guide site '{name}' has distribution {type(node['fn']).__name__} "
            f"({type(fn).__name__}), which is neither reparameterizable nor Categorical, "
            "OneHotCategorical or Bernoulli; use ScoreFunctionELBO, VimcoELBO or DisarmELBO "
            "for it"
        )
    one_hot = isinstance(fn, OneHotCategorical)
    value = node["value"]
    index = value.argmax(-1) if one_hot else value.long()
    if isinstance(fn, Bernoulli):  # categories 0 and 1: log(1 - p) = -softplus(logit)
        logits = torch.stack([-F.softplus(fn.logits), -F.softplus(-fn.logits)], -1)
        logits = support_log_probs(logits, torch.stack([1.0 - fn.probs, fn.probs], -1))
    else:
        logits = support_log_probs(fn.logits, fn.probs)
    nesting = main.max_plate_nesting
    batch = index.dim() - event
    if batch > nesting:
        raise ValueError(
            f"{objective}: guide site '{name}' has {batch} batch dims, more than "
            f"max_plate_nesting={nesting}"
        )
    shape = (1,) * (nesting - batch) + tuple(index.shape)
    index = index.reshape(shape)
    logits = logits.reshape((1,) * (len(shape) + 1 - logits.dim()) + logits.shape)
    logits = logits.expand(shape + logits.shape[-1:])
    # parallel dims: plates of the site that every term depending on it shares
    terms = [guide_trace.nodes[n] for n in downstream_sites(model_trace, guide_trace, name)[0]]
    terms += [model_trace.nodes[n] for n in downstream_sites(model_trace, guide_trace, name)[1]]
    frames = plate_frames(node)
    joint = []
    for i, size in enumerate(shape):
        dim = i - nesting  # negative batch dim; event dims are >= 0
        frame = next((f for f in frames if f[1] == dim), None) if dim < 0 else None
        parallel = frame is not None and all(frame in plate_frames(t) for t in terms)
        joint.append(size > 1 and not parallel)
    sizes = [size if j else 1 for size, j in zip(shape, joint, strict=True)]
    count = functools.reduce(lambda a, b: a * b, sizes, 1)
    position = torch.arange(count, device=index.device).reshape(sizes).expand(shape)
    return CategoricalSite(name, logits, index, position, count, one_hot,
                           value.shape, value.dtype)


def _possible(site: CategoricalSite, alternatives: Tensor) -> Tensor:
    """``alternatives`` (category indices, ``(A, *T)``) with each category of probability 0
    replaced by the main run's draw, so that no variant runs the programs at a value the
    guide cannot draw (its coefficient is 0 whatever the signal there)."""
    log_p = site.logits.detach().expand(alternatives.shape[:1] + site.logits.shape)
    zero = log_p.gather(-1, alternatives.unsqueeze(-1)).squeeze(-1) == -math.inf
    return torch.where(zero, site.draws, alternatives)


def _expand(node: Mapping[str, Any], num: int, nesting: int) -> Any:
    """A main-run draw as the same draw for each of ``num`` vectorized particles."""
    value = node["value"]
    if site_is_subsample(cast(Any, node)) or not isinstance(value, Tensor):
        return value
    event = len(node["fn"].event_shape)
    padded = value.reshape((1,) * (nesting - value.dim() + event) + value.shape)
    return padded.unsqueeze(0).expand((num, *padded.shape))


def _variant_signals(
    objective: Objective, model: Callable, guide: Callable, args: tuple, kwargs: dict,
    main: Particles, site: CategoricalSite, alternatives: Tensor,
) -> Tensor:
    """The learning signal of ``site`` with each variable set to each alternative: ``(A,
    *T)``, element ``[a, t]`` from the run where ``t``'s variable takes ``alternatives[a,
    t]`` and the other variables their main-run draws."""
    num_alt, count = alternatives.shape[0], site.num_variables
    nesting = main.max_plate_nesting
    variables = torch.arange(count, device=site.draws.device)
    mask = site.position.unsqueeze(0) == variables.reshape((count,) + (1,) * site.draws.dim())
    values = torch.where(mask.unsqueeze(1), alternatives.unsqueeze(0), site.draws)
    values = values.reshape((count * num_alt, *site.draws.shape))
    if site.one_hot:
        values = F.one_hot(values, site.logits.shape[-1])
    values = values.to(site.dtype)
    num = count * num_alt
    vectorize = objective.vectorize_particles and num > 1
    nodes: Mapping[str, Mapping[str, Any]] = main.traces[0][1].nodes
    signals = []
    for m in range(1 if vectorize else num):
        partial = Trace()
        for name, node in nodes.items():
            if node["type"] != "sample" or node["is_observed"]:
                continue
            if name == site.name:
                value = values if vectorize else values[m].reshape(site.shape)
            else:
                value = _expand(node, num, nesting) if vectorize else node["value"]
            partial.add_node(name, **dict(node, value=value, infer=dict(node["infer"])))
            if name == site.name:
                break
        run = run_particles(
            model, replay_draws(guide, partial), args, kwargs,
            num_particles=num if vectorize else 1, vectorize=vectorize,
            max_plate_nesting=nesting, pyro_checks=False, track=True,
        )
        check_finite_sites(run)
        signals.append(learning_signals(run, [site.name])[site.name])
    f = torch.cat(signals).reshape((count, num_alt, *signals[0].shape[1:]))
    event = site.draws.dim() - nesting
    f = f.reshape(f.shape + (1,) * event)
    return (mask.unsqueeze(1).to(f.dtype) * f).sum(0)


def categorical_step(
    objective: Objective, model: Callable, guide: Callable, args: tuple, kwargs: dict,
    estimator: SiteEstimator, runs: int,
) -> tuple[Tensor, Tensor]:
    """``(elbo, surrogate)`` of ``runs`` main runs (summed), each with
    its categorical sites' variant runs and ``estimator``'s surrogate per site; the
    reparameterized sites and the model get the main runs' pathwise gradient."""
    name = type(objective).__name__
    objective._know_plate_nesting(model, guide, args, kwargs, True)
    elbo = surrogate = torch.zeros(())
    for _ in range(runs):
        main = run_particles(
            model, guide, args, kwargs, num_particles=1, vectorize=False,
            max_plate_nesting=objective.max_plate_nesting,
            strict_enumeration_warning=objective.strict_enumeration_warning, track=True,
        )
        sites = [s for s in (_site(n, main, name) for n in main.guide_latents) if s is not None]
        check_finite_sites(main)
        signals = learning_signals(main, [s.name for s in sites])
        check_all_finite([(v, f"learning signal at site '{n}'") for n, v in signals.items()])
        for site in sites:
            event = site.draws.dim() - main.max_plate_nesting
            f_main = signals[site.name][0]
            f_main = f_main.reshape(f_main.shape + (1,) * event).expand(site.draws.shape)

            def evaluate(alternatives: Tensor, site: CategoricalSite = site,
                         main: Particles = main) -> Tensor:
                f = _variant_signals(objective, model, guide, args, kwargs, main, site,
                                     _possible(site, alternatives))
                check_all_finite([(f, f"learning signal at site '{site.name}'")])
                return f

            surrogate = surrogate + estimator(site, f_main, evaluate).sum()
        log_p = log_joint(main)
        elbo = elbo + (log_p - log_guide(main)).detach()
        pathwise = log_p - log_guide(main, lambda s: bool(s.node["fn"].has_rsample))
        surrogate = surrogate + pathwise
    return elbo, surrogate

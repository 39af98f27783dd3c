"""The sleep phase of wake-sleep objectives: dreaming from the model and scoring the
dreams with the guide; and the check that tells model parameters from guide parameters.

A *dream* is one run of the model with every observed site sampled instead of observed
(:func:`pyro.poutine.uncondition`), under :func:`torch.no_grad`: the sleep phase trains
only the guide. The guide then scores the dreamed latents given the dreamed
observations. An amortized guide reads the observations from its arguments; when one of
its arguments (or an element of a tuple, list or dict argument) *is* the tensor that the
model observes at a site, it is replaced by that site's dream in fresh containers, so the
caller's ``args`` and ``kwargs`` are never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import Delta
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.poutine.uncondition_messenger import UnconditionMessenger
from pyro.util import check_site_shape
from torch import Tensor

from pyro_wakesleep._replay import replay_draws
from pyro_wakesleep._validation import check_finite
from pyro_wakesleep.traces import is_auxiliary, is_sample, latent_sites

DREAM_PLATE = "num_sleep_particles_vectorized"
_ADVICE = (
    "With num_sleep_particles > 1 and vectorized particles, dreams carry a leading "
    "particle dimension: write the guide to broadcast over leading dimensions of its data "
    "(e.g. plate sizes from x.shape[-2], not x.shape[0]), or use num_sleep_particles=1 "
    "or vectorize_particles=False"
)

#: ``dream_args(dreams, args, kwargs) -> (guide_args, guide_kwargs)``: how to feed the
#: dreamed observations (site name → dreamed value) to the guide.
DreamArgs = Callable[[Mapping[str, Tensor], tuple, dict], tuple[tuple, dict]]


def check_param_owners(model_trace: Trace, guide_trace: Trace) -> None:
    """Raises ``ValueError`` if a parameter is registered (as a ``param`` site) by both
    the model and the guide, by name or as the same tensor under two names: wake-sleep
    objectives give model and guide parameters different gradients, so each parameter
    must belong to exactly one of them."""
    model = {n: s["value"] for n, s in model_trace.nodes.items() if s["type"] == "param"}
    guide = {n: s["value"] for n, s in guide_trace.nodes.items() if s["type"] == "param"}
    both = sorted(set(model) & set(guide))
    by_id = {id(v): n for n, v in model.items()}
    aliases = [f"'{by_id[id(v)]}' = '{n}'" for n, v in guide.items()
               if n not in model and id(v) in by_id]
    if both or aliases:
        found = [f"'{n}'" for n in both] + aliases
        raise ValueError(
            f"parameter(s) {', '.join(found)} registered by both the model and the guide; "
            "wake-sleep objectives train model parameters by the wake phase and guide "
            "parameters by the wake-phi/sleep phase, so each must belong to one of them"
        )


class _Uncondition(UnconditionMessenger):
    """:func:`pyro.poutine.uncondition` that keeps ``pyro.deterministic`` sites (their
    value is a function of the dream, not a draw) and refuses ``pyro.factor``, which a
    dream drawn site by site cannot honour."""

    def _pyro_sample(self, msg: Any) -> None:
        if msg["infer"].get("_deterministic"):
            return
        if msg["is_observed"] and type(msg["fn"]).__name__ == "Unit":
            raise ValueError(
                f"the sleep phase cannot dream from this model: its pyro.factor "
                f"('{msg['name']}') reweights the model, and dreams are drawn site by site "
                "without it; use ReweightedWakeSleepELBO with insomnia=1 (no dreams)"
            )
        super()._pyro_sample(msg)


def dream(
    model: Callable, args: tuple, kwargs: dict, num_dreams: int, vectorize: bool,
    max_plate_nesting: float,
) -> list[Trace]:
    """``num_dreams`` traces of the model with its observed sites sampled: one vectorized
    trace (a plate of size ``num_dreams`` at ``dim=-(max_plate_nesting + 1)``) or one
    trace per dream. Run without gradients."""
    fn = _Uncondition()(model)
    if vectorize and num_dreams > 1:
        fn = pyro.plate(DREAM_PLATE, num_dreams, dim=-(int(max_plate_nesting) + 1))(fn)
        count = 1
    else:
        count = num_dreams
    with torch.no_grad():
        return [poutine.trace(fn).get_trace(*args, **kwargs) for _ in range(count)]


def dreamed_observations(dream_trace: Trace) -> dict[str, tuple[Any, Tensor]]:
    """``{site: (observed value, dreamed value)}`` for each observed site of the model.

    :raises ValueError: if the model has no observed site (nothing to dream).
    """
    nodes: Mapping[str, Any] = dream_trace.nodes
    found = {
        name: (node["infer"]["obs"], node["value"])
        for name, node in nodes.items()
        if is_sample(node) and (node["infer"] or {}).get("was_observed")
    }
    if not found:
        raise ValueError(
            "the model has no observed site (no pyro.sample(..., obs=...)): there is "
            "nothing to dream for the sleep phase"
        )
    return found


def _swap(value: Any, swaps: Mapping[int, Tensor], used: set[int]) -> Any:
    if isinstance(value, Tensor):
        if id(value) in swaps:
            used.add(id(value))
            return swaps[id(value)]
        return value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_swap(v, swaps, used) for v in value)
    if isinstance(value, list):
        return [_swap(v, swaps, used) for v in value]
    if isinstance(value, dict):
        return {k: _swap(v, swaps, used) for k, v in value.items()}
    return value


def guide_inputs(
    dream_trace: Trace, args: tuple, kwargs: dict, dream_args: DreamArgs | None
) -> tuple[tuple, dict]:
    """The arguments to run the guide with on a dream: ``dream_args`` if given, else the
    caller's arguments with each observed tensor replaced by its dream (new containers).

    :raises ValueError: if the model observes nothing, or if no argument of the guide is
        a tensor the model observes and no ``dream_args`` says how to feed the dream.
    """
    observed = dreamed_observations(dream_trace)
    if dream_args is not None:
        result = dream_args({n: v for n, (_, v) in observed.items()}, args, dict(kwargs))
        if not (isinstance(result, tuple) and len(result) == 2
                and isinstance(result[0], tuple) and isinstance(result[1], dict)):
            raise TypeError(
                f"dream_args must return a pair (args: tuple, kwargs: dict), got {result!r}"
            )
        return result
    swaps = {id(obs): value for obs, value in observed.values() if isinstance(obs, Tensor)}
    used: set[int] = set()
    new_args = _swap(args, swaps, used)
    new_kwargs = _swap(kwargs, swaps, used)
    if not used:
        raise ValueError(
            f"cannot feed the dream of observed site(s) {sorted(observed)} to the guide: "
            "none of the guide's arguments is the tensor the model observes there (the "
            "sleep phase replaces that argument by the dream); pass the observed tensor "
            "itself to both model and guide, or say how with dream_args="
            "lambda dreams, args, kwargs: (guide_args, guide_kwargs)"
        )
    return new_args, new_kwargs


def _shapes(value: Any) -> str:
    if isinstance(value, Tensor):
        return str(tuple(value.shape))
    if isinstance(value, tuple | list):
        return "(" + ", ".join(_shapes(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shapes(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


def _check_plates(
    name: str, guide_site: Mapping[str, Any], model_site: Mapping[str, Any], args: tuple,
    kwargs: dict,
) -> None:
    """A guide that reads a plate's size off a dream with an extra leading dimension
    gets it wrong silently (the subsample indices replayed from the dream hide it); the
    plates of the same name must agree in size and dim between guide and model."""
    def shape(frame: Any) -> tuple[Any, ...]:
        return frame.dim, getattr(frame, "full_size", None) or frame.size, frame.size

    model_plates = {f.name: f for f in model_site["cond_indep_stack"]}
    for frame in guide_site["cond_indep_stack"]:
        other = model_plates.get(frame.name)
        if other is not None and shape(frame) != shape(other):
            raise ValueError(
                f"the guide could not consume the dream: at site '{name}' its plate "
                f"'{frame.name}' has (dim, size, subsample size) {shape(frame)} but the "
                f"model's has {shape(other)}; the guide was called with argument shapes "
                f"{_shapes(args)} and {_shapes(kwargs)}. {_ADVICE}"
            )


def sleep_log_q(
    guide: Callable, dream_trace: Trace, args: tuple, kwargs: dict, num_dreams: int,
    max_plate_nesting: float, dream_args: DreamArgs | None,
) -> Tensor:
    """The guide's log-density (scaled and masked, summed) of the dreamed latents given
    the dreamed observations of one dream trace (vectorized if ``num_dreams > 1``).

    :raises ValueError: if the guide cannot consume the dream, or samples a site that the
        model does not have as a latent.
    """
    guide_args, guide_kwargs = guide_inputs(dream_trace, args, kwargs, dream_args)
    fn = guide
    if num_dreams > 1:
        fn = pyro.plate(DREAM_PLATE, num_dreams, dim=-(int(max_plate_nesting) + 1))(fn)
    try:
        guide_trace = poutine.trace(replay_draws(fn, dream_trace)).get_trace(
            *guide_args, **guide_kwargs
        )
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        raise ValueError(
            f"the guide could not consume the dream: it was called with argument shapes "
            f"{_shapes(guide_args)} and {_shapes(guide_kwargs)}. {_ADVICE} "
            f"({type(err).__name__}: {err})"
        ) from err
    names = latent_sites(guide_trace)
    for name in names:
        node: Any = dream_trace.nodes.get(name)
        if is_auxiliary(guide_trace.nodes[name]):
            raise ValueError(
                f"the sleep phase cannot score dreams with this guide: its site '{name}' is "
                "auxiliary (infer={'is_auxiliary': True}, as in autoguides such as "
                "AutoNormal), so the guide has no density at the dreamed latents. Use a "
                "guide that samples each latent of the model directly, or "
                "ReweightedWakeSleepELBO with insomnia=1 (wake-phi only, no dreams)"
            )
        if node is None or not is_sample(node):
            raise ValueError(f"guide site '{name}' does not appear in the model")
        if node["infer"].get("was_observed"):
            raise ValueError(f"site '{name}' is observed in the model but sampled by the guide")
        _check_plates(name, guide_trace.nodes[name], node, guide_args, guide_kwargs)
    dreamed = [n for n in latent_sites(dream_trace)
               if not (dream_trace.nodes[n]["infer"] or {}).get("was_observed")]
    missing = [n for n in dreamed if n not in names]
    if missing:
        raise ValueError(
            f"the guide scored {len(dreamed) - len(missing)} of the {len(dreamed)} latent "
            f"sites of the dream; it samples no site {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. {_ADVICE}"
        )
    guide_trace.compute_log_prob(lambda name, _: name in names)
    total: Tensor | float = 0.0
    for name in names:
        site = guide_trace.nodes[name]
        if is_validation_enabled():
            check_site_shape(site, max_plate_nesting + (num_dreams > 1))  # type: ignore[arg-type]
        hint = ("the guide's site is a point mass (Delta, as in AutoDelta), which has no "
                "density at the dream's values; the sleep phase needs a guide with a density"
                if isinstance(site["fn"], Delta) else "check the guide's support")
        check_finite(site["log_prob"].detach(), f"sleep-phase guide log-density at site "
                     f"'{name}'", hint)
        total = total + site["log_prob_sum"]
    return torch.as_tensor(total)

"""Draws from a guide for the diagnostics, in one vectorized pass.

The model and guide run under an outer :class:`pyro.plate` of the ``S`` draws (named
:data:`DRAW_PLATE`, at ``dim=-(max_plate_nesting + 1)``), the model replayed against the
guide's draws, without gradients. Used by
:func:`~pyro_wakesleep.diagnostics.log_importance_weights` and
:func:`~pyro_wakesleep.diagnostics.from_guide`; nothing here is part of the public API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from pyro_wakesleep._validation import check_int
from pyro_wakesleep.traces import (
    canonical,
    check_model_guide,
    guess_max_plate_nesting,
    latent_sites,
    sample_sites,
)

__all__: list[str] = []

#: name of the plate that carries the draws of the diagnostics
DRAW_PLATE = "_diagnostic_draws"


class Draws(NamedTuple):
    """``S`` guide draws in one vectorized pass.

    :param Trace model_trace: the model replayed against the guide's draws.
    :param Trace guide_trace: the guide's trace; every tensor carries the draw plate at
        ``dim=-(max_plate_nesting + 1)``.
    :param torch.Tensor log_p: ``log p(x, z_s)`` of each draw, shape ``(S,)``.
    :param torch.Tensor log_q: ``log q(z_s | x)`` of each draw, shape ``(S,)``.
    :param int max_plate_nesting: the model's plate nesting (without the draw plate).
    """

    model_trace: Trace
    guide_trace: Trace
    log_p: Tensor
    log_q: Tensor
    max_plate_nesting: int


def per_draw(trace: Trace, names: list[str], nesting: int, num: int, what: str) -> Tensor:
    """Sum of the (scaled) log-densities of ``names`` per draw, shape ``(num,)``, in
    float64.

    :param str what: ``"model"`` or ``"guide"``, for the error message.
    :raises ValueError: naming the first site whose log-density is non-finite in some
        draw, and in how many.
    """
    total = torch.zeros(num, dtype=torch.float64)
    for name in names:
        value = canonical(trace.nodes[name]["log_prob"], nesting, True, name)
        value = value.reshape(value.shape[0], -1).sum(-1).expand(num)
        # not _validation.check_finite: this message (site, count of draws) is relied on
        bad = ~torch.isfinite(value)
        if bool(bad.any()):
            raise ValueError(
                f"non-finite log importance weights: the {what} log-density of site "
                f"'{name}' is non-finite in {int(bad.sum())} of {num} draws; check the "
                "site's support and the guide's draws"
            )
        total = total + value.double()
    return total


def draw_guide(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, num_samples: int,
    max_plate_nesting: int | None,
) -> Draws:
    """Draws ``num_samples`` from the guide in one vectorized pass and replays the model
    against them (no gradients).

    :param int max_plate_nesting: the plate nesting of model and guide (guessed from one
        run if ``None``).
    :raises ValueError: if ``num_samples < 1``, model and guide disagree
        (:func:`~pyro_wakesleep.traces.check_model_guide`: a latent without a guide site,
        a guide site missing or observed in the model, a plate of another size), or a
        log-density is non-finite.
    """
    num = check_int(num_samples, "num_samples")
    with torch.no_grad():
        nesting = (
            guess_max_plate_nesting(model, guide, args, kwargs)
            if max_plate_nesting is None else check_int(max_plate_nesting,
                                                         "max_plate_nesting", 0)
        )
        plate = pyro.plate(DRAW_PLATE, num, dim=-(nesting + 1))
        guide_trace = poutine.trace(plate(guide)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(plate(model), trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        check_model_guide(model_trace, guide_trace)
        for trace in (model_trace, guide_trace):
            trace.compute_log_prob(lambda _, site: not site_is_subsample(site))
        log_p = per_draw(model_trace, sample_sites(model_trace), nesting, num, "model")
        log_q = per_draw(guide_trace, latent_sites(guide_trace), nesting, num, "guide")
    return Draws(model_trace, guide_trace, log_p, log_q, nesting)

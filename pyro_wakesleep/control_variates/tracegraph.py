"""Pyro ``TraceGraph_ELBO``'s per-site baseline options as a control variate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from pyro_wakesleep.control_variates.base import (
    Advantage,
    ControlVariate,
    SiteContext,
    detached,
    fit_baseline_shape,
    zero_loss,
)
from pyro_wakesleep.control_variates.moving_average import MovingAverageBaseline

__all__ = ["TraceGraphBaseline"]


class TraceGraphBaseline(ControlVariate):
    """The control variate of a site that declares ``infer={"baseline": {...}}`` for
    Pyro's ``TraceGraph_ELBO``; :class:`~pyro_wakesleep.objectives.ScoreFunctionELBO`
    builds one for each such site that is given no control variate explicitly.

    ``use_decaying_avg_baseline``/``baseline_beta`` become a
    :class:`~pyro_wakesleep.control_variates.MovingAverageBaseline` :math:`a` (the
    submodule ``average``, so its state is in ``state_dict()``); a user baseline
    :math:`b` (``nn_baseline(nn_baseline_input)``, or ``baseline_value``) is subtracted
    after it and regressed on what remains:

    .. math::

        \\hat f = (f - a) - b, \\qquad
        \\mathcal L_b = \\frac1K \\sum (f - a - b)^2 .

    As with ``TraceGraph_ELBO``, a user ``nn_baseline`` must be registered by the user
    (``pyro.module``) to be trained by ``SVI``. The options are read from the site at
    every step, so a ``baseline_value`` may change between steps.

    :param dict options: the site's ``infer["baseline"]`` dict.
    :param str site: the site's name (for error messages).
    :raises ValueError: for an option ``TraceGraph_ELBO`` does not know.
    """

    _KEYS = frozenset(
        {"use_decaying_avg_baseline", "baseline_beta", "nn_baseline", "nn_baseline_input",
         "baseline_value"}
    )

    def __init__(self, options: Mapping[str, Any], site: str) -> None:
        super().__init__()
        unknown = set(options) - self._KEYS
        if unknown:
            raise ValueError(f"site '{site}' declares unknown baseline options {sorted(unknown)}")
        self.average = (
            MovingAverageBaseline(options.get("baseline_beta", 0.9))
            if options.get("use_decaying_avg_baseline", False)
            else None
        )

    def forward(self, signal: Tensor, context: SiteContext) -> Advantage:
        options = context.guide_site["infer"].get("baseline", {})
        advantage = self.average(signal, context).value if self.average else signal
        baseline: Tensor | None = None
        if options.get("nn_baseline") is not None:
            x = options.get("nn_baseline_input")
            baseline = options["nn_baseline"](detached(x))
        elif options.get("baseline_value") is not None:
            baseline = options["baseline_value"]
        if baseline is None:
            return Advantage(advantage, zero_loss(signal))
        baseline = fit_baseline_shape(baseline, signal, context)
        loss = (advantage - baseline).pow(2).sum() / signal.shape[context.particle_dim]
        return Advantage(advantage - baseline.detach(), loss)

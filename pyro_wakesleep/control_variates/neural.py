"""NVIL: a learned input-dependent baseline with centering and variance normalization."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from pyro_wakesleep._validation import check_bool, check_real
from pyro_wakesleep.control_variates.base import (
    Advantage,
    ControlVariate,
    SiteContext,
    detached,
    fit_baseline_shape,
    zero_loss,
)
from pyro_wakesleep.distributed import all_reduce_moments
from pyro_wakesleep.signals import debiased_average, ema_update, normalize_signal

__all__ = ["NeuralBaseline"]


class NeuralBaseline(ControlVariate):
    """NVIL: an input-dependent learned baseline with centering and variance
    normalization (Mnih & Gregor, 2014, "Neural Variational Inference and Learning in
    Belief Networks", Algorithm 1).

    .. math::

        r = f - b_\\psi(x), \\qquad \\hat f = \\frac{r - c}{\\max(1, \\sqrt{v})},

    where :math:`c, v` are running (bias-corrected) averages of the mean and variance of
    :math:`r` over particles and plate elements. :math:`b_\\psi` is trained to minimise
    :math:`\\sum (f - c - b_\\psi(x))^2 / K` by the same optimizer and in the same step as
    the model and guide. The statistics used at a step are those from before the step,
    so :math:`\\mathbb E[\\hat f\\, \\nabla\\log q] = \\nabla \\mathcal L / \\max(1, \\sqrt v)`:
    unbiased in direction, scaled by a positive step-independent factor (set
    ``normalize_variance=False`` for the unscaled estimator).

    Under ``torch.distributed`` (world size > 1) the step's mean and variance of
    :math:`r` are those of the whole global batch (one all-reduce of 3 scalars per step,
    :func:`~pyro_wakesleep.distributed.all_reduce_moments`), so every rank holds the same
    statistics; :math:`b_\\psi` is trained like any parameter under DDP.

    Buffers: ``mean``, ``variance`` and ``weight`` (the bias-correction weight);
    parameters: those of ``module``, registered in Pyro's param store as
    ``"control_variates.<site>$$$module.<name>"``.

    :param torch.nn.Module module: maps the input to the baseline; its output must
        broadcast to the site's signal (a trailing size-1 dimension is dropped), e.g. an
        output of shape ``(batch,)`` or ``(batch, 1)`` for a latent in a data plate.
    :param callable input: maps the guide's ``(*args, **kwargs)`` to the module's input.
        By default the site's ``infer={"baseline": {"nn_baseline_input": x}}`` if the
        guide declares one (the ``TraceGraph_ELBO`` convention), otherwise the guide's
        first positional argument.
    :param float decay: decay of the running mean and variance (0.8 in the paper).
    :param bool center: subtract the running mean :math:`c`.
    :param bool normalize_variance: divide by :math:`\\max(1, \\sqrt{v})`.
    """

    mean: Tensor
    variance: Tensor
    weight: Tensor

    def __init__(
        self,
        module: nn.Module,
        input: Callable[..., Tensor] | None = None,
        decay: float = 0.8,
        center: bool = True,
        normalize_variance: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"NeuralBaseline: module must be a torch.nn.Module, got {module!r}")
        if input is not None and not callable(input):
            raise TypeError(f"NeuralBaseline: input must be callable or None, got {input!r}")
        decay = check_real(decay, "NeuralBaseline: decay")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"NeuralBaseline: decay must lie in [0, 1), got {decay!r}")
        self.module = module
        self.input = input
        self.decay = float(decay)
        self.center = check_bool(center, "NeuralBaseline: center")
        self.normalize_variance = check_bool(
            normalize_variance, "NeuralBaseline: normalize_variance"
        )
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("variance", torch.zeros(()))
        self.register_buffer("weight", torch.zeros(()))

    def _input(self, context: SiteContext) -> Tensor:
        if self.input is not None:
            return self.input(*context.args, **context.kwargs)
        declared = context.guide_site["infer"].get("baseline", {}).get("nn_baseline_input")
        if declared is not None:
            return declared
        if not context.args:
            raise ValueError(
                f"NeuralBaseline at site '{context.site}': the guide takes no positional "
                "argument to use as input; pass input=lambda *args, **kwargs: ..."
            )
        return context.args[0]

    def forward(self, signal: Tensor, context: SiteContext) -> Advantage:
        x = self._input(context)
        baseline = fit_baseline_shape(self.module(detached(x)), signal, context)
        weight = self.weight.to(signal)
        mean = debiased_average(self.mean.to(signal), weight) if self.center else zero_loss(signal)
        variance = debiased_average(self.variance.to(signal), weight, default=1.0)
        residual = signal - baseline.detach()
        value = residual - mean
        if self.normalize_variance:
            value = normalize_signal(residual, mean, variance)
        loss = (signal - mean - baseline).pow(2).sum() / signal.shape[context.particle_dim]
        if context.update and self.training:
            center, spread = all_reduce_moments(residual, shift=mean)
            m, w = ema_update(self.mean.to(signal), weight, center, self.decay)
            v, _ = ema_update(self.variance.to(signal), weight, spread, self.decay)
            self.mean, self.variance, self.weight = m, v, w
        return Advantage(value, loss)

    def extra_repr(self) -> str:
        return (
            f"decay={self.decay}, center={self.center}, "
            f"normalize_variance={self.normalize_variance}"
        )

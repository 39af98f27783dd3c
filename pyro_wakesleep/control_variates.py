"""Control variates for score-function gradients.

Every control variate is a :class:`torch.nn.Module` that implements one small protocol,
:class:`ControlVariate`: given the (detached) learning signal :math:`f` of one guide
site, it returns the *advantage* :math:`\\hat f` that multiplies
:math:`\\nabla_\\phi \\log q_\\phi(z)` in the surrogate, and a loss for its own learned
parameters (zero for those without any).

Running state (moving averages) lives in registered buffers and learned weights in
parameters, so ``state_dict()`` / ``load_state_dict()`` save and restore all of it.
Running state is updated only when the objective computes gradients and the module is in
training mode (``cv.train()``, the default); ``cv.eval()`` freezes it, as for
:class:`torch.nn.BatchNorm1d`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from pyro_wakesleep.signals import (
    debiased_average,
    ema_update,
    leave_one_out_mean,
    normalize_signal,
)

__all__ = [
    "Advantage",
    "ControlVariate",
    "LeaveOneOutBaseline",
    "MovingAverageBaseline",
    "NeuralBaseline",
    "SiteContext",
]


class SiteContext(NamedTuple):
    """What a control variate may read about the site it serves.

    :param str site: the guide site's name.
    :param dict guide_site: the guide trace's node for the site (its ``infer`` dict
        among others). Read-only.
    :param tuple args: the positional arguments the guide was called with.
    :param dict kwargs: the keyword arguments the guide was called with.
    :param int particle_dim: the dimension of the signal that indexes particles.
    :param bool update: whether running state may be updated on this call.
    """

    site: str
    guide_site: Mapping[str, Any]
    args: tuple
    kwargs: Mapping[str, Any]
    particle_dim: int
    update: bool


class Advantage(NamedTuple):
    """The output of a control variate.

    :param torch.Tensor value: the processed learning signal :math:`\\hat f`, same shape
        as the input signal; it is detached by the objective before use.
    :param torch.Tensor loss: a scalar loss for the control variate's own parameters
        (e.g. NVIL's baseline regression), added to the surrogate loss.
    """

    value: Tensor
    loss: Tensor


class ControlVariate(nn.Module):
    """The protocol every control variate implements.

    Subclasses override :meth:`forward`; objectives call the module as
    ``cv(signal, context)``. A control variate must keep the estimator unbiased, i.e.
    whatever it subtracts from draw :math:`k`'s signal must not depend on draw
    :math:`k`, or else state the bias it introduces.
    """

    #: the smallest number of particles the control variate works with
    min_particles: int = 1

    def forward(self, signal: Tensor, context: SiteContext) -> Advantage:  # pragma: no cover
        """Turns one site's learning signal into its advantage.

        :param torch.Tensor signal: the detached learning signal, particles along
            ``context.particle_dim``.
        :param SiteContext context: what the control variate may read about the site.
        :return: the :class:`Advantage`.
        """
        raise NotImplementedError


def _zero(signal: Tensor) -> Tensor:
    return signal.new_zeros(())


class MovingAverageBaseline(ControlVariate):
    """An exponential moving average of the learning signal as baseline.

    .. math::

        \\hat f = f - b_{t-1}, \\qquad
        b_t = \\frac{a_t}{1-\\beta^t}, \\quad a_t = \\beta a_{t-1} + (1-\\beta)\\,\\bar f_t,

    where :math:`\\bar f_t` is the mean of the step's signal over particles and
    plate elements. The baseline used at step :math:`t` is the one from before the
    step's update, so it is independent of the step's draws and the estimator stays
    unbiased; the division by :math:`1-\\beta^t` removes the start-up bias towards zero.
    Pyro's ``TraceGraph_ELBO`` keeps the same kind of average (``baseline_beta=0.9``)
    without the bias correction.

    Buffers: ``average`` (:math:`a_t`) and ``weight`` (:math:`1-\\beta^t`).

    :param float beta: decay rate in :math:`[0, 1)`.
    """

    average: Tensor
    weight: Tensor

    def __init__(self, beta: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"MovingAverageBaseline: beta must lie in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.register_buffer("average", torch.zeros(()))
        self.register_buffer("weight", torch.zeros(()))

    def forward(self, signal: Tensor, context: SiteContext) -> Advantage:
        average, weight = self.average.to(signal), self.weight.to(signal)
        baseline = debiased_average(average, weight)
        if context.update and self.training:
            self.average, self.weight = ema_update(average, weight, signal.mean(), self.beta)
        return Advantage(signal - baseline, _zero(signal))

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class LeaveOneOutBaseline(ControlVariate):
    """Leave-one-out (RLOO) baseline over the particles of each datapoint.

    .. math:: \\hat f_k = f_k - \\frac{1}{K-1}\\sum_{j\\ne k} f_j

    (Kool, van Hoof & Welling, 2019, "Buy 4 REINFORCE samples, get a baseline for
    free!"). Unbiased, stateless, and needs ``num_particles >= 2``.
    """

    min_particles = 2

    def forward(self, signal: Tensor, context: SiteContext) -> Advantage:
        if signal.shape[context.particle_dim] < 2:
            raise ValueError(
                f"LeaveOneOutBaseline at site '{context.site}' needs at least 2 particles, got "
                f"{signal.shape[context.particle_dim]}"
            )
        return Advantage(signal - leave_one_out_mean(signal, context.particle_dim), _zero(signal))


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
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"NeuralBaseline: decay must lie in [0, 1), got {decay!r}")
        self.module = module
        self.input = input
        self.decay = float(decay)
        self.center = center
        self.normalize_variance = normalize_variance
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
        baseline = _fit_baseline_shape(self.module(_detach(x)), signal, context)
        weight = self.weight.to(signal)
        mean = debiased_average(self.mean.to(signal), weight) if self.center else _zero(signal)
        variance = debiased_average(self.variance.to(signal), weight, default=1.0)
        residual = signal - baseline.detach()
        value = residual - mean
        if self.normalize_variance:
            value = normalize_signal(residual, mean, variance)
        loss = (signal - mean - baseline).pow(2).sum() / signal.shape[context.particle_dim]
        if context.update and self.training:
            spread = residual.var(correction=0)
            m, w = ema_update(self.mean.to(signal), weight, residual.mean(), self.decay)
            v, _ = ema_update(self.variance.to(signal), weight, spread, self.decay)
            self.mean, self.variance, self.weight = m, v, w
        return Advantage(value, loss)

    def extra_repr(self) -> str:
        return (
            f"decay={self.decay}, center={self.center}, "
            f"normalize_variance={self.normalize_variance}"
        )


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


def _broadcasts(value: Tensor, target: Tensor) -> bool:
    try:
        return torch.broadcast_shapes(value.shape, target.shape) == target.shape
    except RuntimeError:
        return False


def _fit_baseline_shape(baseline: Tensor, signal: Tensor, context: SiteContext) -> Tensor:
    if not isinstance(baseline, Tensor):
        raise TypeError(f"baseline at site '{context.site}' must be a Tensor, got {baseline!r}")
    if baseline.dim() > 1 and baseline.shape[-1] == 1 and _broadcasts(baseline.squeeze(-1), signal):
        baseline = baseline.squeeze(-1)  # a (batch, 1) network output: drop the feature dim
    if not _broadcasts(baseline, signal):
        raise ValueError(
            f"baseline at site '{context.site}' has shape {tuple(baseline.shape)}, which does "
            f"not broadcast to the site's learning signal of shape {tuple(signal.shape)}"
        )
    return baseline

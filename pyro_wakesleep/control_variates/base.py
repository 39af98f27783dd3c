"""The protocol every control variate implements, and helpers for writing one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["Advantage", "ControlVariate", "SiteContext"]


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


def zero_loss(signal: Tensor) -> Tensor:
    """A zero scalar loss (for control variates without parameters)."""
    return signal.new_zeros(())


def detached(x: Any) -> Any:
    """``x.detach()`` for a tensor, else ``x``."""
    return x.detach() if isinstance(x, Tensor) else x


def _broadcasts(value: Tensor, target: Tensor) -> bool:
    try:
        return torch.broadcast_shapes(value.shape, target.shape) == target.shape
    except RuntimeError:
        return False


def fit_baseline_shape(baseline: Tensor, signal: Tensor, context: SiteContext) -> Tensor:
    """A baseline made to broadcast to the site's signal (a trailing size-1 feature
    dimension dropped), or a ``TypeError``/``ValueError`` naming the site."""
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

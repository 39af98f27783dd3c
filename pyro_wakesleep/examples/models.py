"""Sigmoid belief nets (Helmholtz machines): the standard benchmark model for
discrete-latent inference (Neal, 1992; Hinton et al., 1995; Mnih & Gregor, 2014)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

__all__ = ["SigmoidBeliefNet"]


def _conditional(d_in: int, d_out: int, hidden: int | None) -> nn.Module:
    if hidden is None:
        return nn.Linear(d_in, d_out)
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
        nn.Linear(hidden, d_out),
    )


class _Generative(nn.Module):
    def __init__(self, sizes: tuple[int, ...], hidden: int | None) -> None:
        super().__init__()
        self.prior_logits = nn.Parameter(torch.zeros(sizes[-1]))
        self.layers = nn.ModuleList(
            _conditional(sizes[i + 1], sizes[i], hidden) for i in range(len(sizes) - 1)
        )


class SigmoidBeliefNet(nn.Module):
    """A sigmoid belief net with Bernoulli layers and its recognition network.

    Generative model, top layer :math:`h_L` down to the observation :math:`x = h_0`:

    .. math::

        p(h_L) = \\mathrm{Bern}(\\sigma(a)), \\quad
        p(h_{l-1} \\mid h_l) = \\mathrm{Bern}(\\sigma(g_l(h_l))),

    and recognition network :math:`q(h_l \\mid h_{l-1}) = \\mathrm{Bern}(\\sigma(r_l(h_{l-1})))`.
    :math:`g_l, r_l` are affine ("linear" SBN) or, with ``hidden``, two-hidden-layer tanh
    networks ("nonlinear" SBN, as in the REBAR/RELAX benchmarks).

    :meth:`model` registers only the generative parameters (as ``"generative"``) and
    :meth:`guide` only the recognition parameters (``"recognition"``), so wake-sleep
    objectives can tell them apart. Sites: ``"h1"`` … ``"hL"`` and the observed ``"x"``,
    all in the plate ``"data"`` (``dim=-1``), each an event of its layer's width.

    :param sizes: layer widths from the observation up, e.g. ``(784, 200)`` or
        ``(784, 200, 200)``.
    :param int hidden: width of the deterministic tanh layers of a nonlinear SBN.
    """

    def __init__(self, sizes: Sequence[int] = (784, 200), hidden: int | None = None) -> None:
        super().__init__()
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must list at least two positive widths, got {sizes}")
        self.sizes = sizes
        self.generative = _Generative(sizes, hidden)
        self.recognition = nn.ModuleList(
            _conditional(sizes[i], sizes[i + 1], hidden) for i in range(len(sizes) - 1)
        )

    @property
    def num_layers(self) -> int:
        """Number of latent layers :math:`L`."""
        return len(self.sizes) - 1

    def model(self, x: Tensor) -> Tensor:
        """The generative model :math:`p(x, h)`; returns the Bernoulli logits of
        :math:`x`. Run it under :func:`pyro.poutine.uncondition` to dream."""
        pyro.module("generative", self.generative)
        prior, layers = self.generative.prior_logits, self.generative.layers
        batch = x.shape[0]
        with pyro.plate("data", batch, dim=-1):
            h = pyro.sample(
                f"h{self.num_layers}",
                dist.Bernoulli(logits=prior.expand(batch, -1)).to_event(1),
            )
            for layer in range(self.num_layers - 1, 0, -1):
                h = pyro.sample(f"h{layer}", dist.Bernoulli(logits=layers[layer](h)).to_event(1))
            logits = layers[0](h)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)
        return logits

    def guide(self, x: Tensor) -> None:
        """The recognition network :math:`q(h_1, \\ldots, h_L \\mid x)`."""
        pyro.module("recognition", self.recognition)
        # x.shape[-2], not [0]: dreams carry leading particle dimensions
        with pyro.plate("data", x.shape[-2], dim=-1):
            h = x
            for layer, net in enumerate(self.recognition, start=1):
                h = pyro.sample(f"h{layer}", dist.Bernoulli(logits=net(h)).to_event(1))

"""Sigmoid belief nets (Helmholtz machines): the standard benchmark model for
discrete-latent inference (Neal, 1992; Hinton et al., 1995; Mnih & Gregor, 2014)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

__all__ = ["ParamStoreNamed", "SigmoidBeliefNet"]

#: every live instance of a :class:`ParamStoreNamed` subclass, to keep default names apart
_LIVE: weakref.WeakSet[ParamStoreNamed] = weakref.WeakSet()


def _name_in_store(name: str) -> bool:
    return any(key.startswith(f"{name}.") for key in pyro.get_param_store())


class ParamStoreNamed(nn.Module):
    """Base of the example models: the prefix ``name`` of their Pyro param-store names.

    Pyro's param store is global, keyed by name: two modules registered under the same
    name share one set of tensors, and only the first one's are trained. So each instance
    registers its parts as ``"<name>.<part>"`` (``"<name>.generative$$$<parameter>"``,
    ``"<name>.recognition$$$<parameter>"``), with ``name`` unique by default: the first of
    ``default_name``, ``"<default_name>_1"``, ``"<default_name>_2"``, … that no live
    instance uses (instances no longer referenced are garbage-collected first) and under
    which the param store holds nothing when the instance is created. A copy
    (:func:`copy.deepcopy`, pickling) of an instance with a default name gets a fresh
    default name; an explicit name is kept. A fresh process that creates its instances in
    the same order gives them the same names; pass an explicit ``name`` to restore a
    checkpoint saved by a process that created other instances first.

    Two live instances given the same explicit name cannot both train: the first to run
    :meth:`~SigmoidBeliefNet.model` or :meth:`~SigmoidBeliefNet.guide` registers its
    tensors, and the other one's first run raises ``ValueError`` (naming the param-store
    name) instead of silently training nothing.

    :param str name: the prefix, or ``None`` for a unique default.
    :raises TypeError: if ``name`` is neither a ``str`` nor ``None``.
    :raises ValueError: if ``name`` is empty or contains ``"$$$"`` (Pyro's separator).
    """

    #: the stem of default names
    default_name: ClassVar[str] = "model"
    #: the prefix of this instance's param-store names
    name: str

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        if name is not None and (not name or "$$$" in name):
            raise ValueError(f"name must be non-empty and free of '$$$', got {name!r}")
        self._default_named = name is None
        self.name = self._free_name() if name is None else name
        _LIVE.add(self)

    def _free_name(self) -> str:
        taken = {other.name for other in list(_LIVE) if other is not self}
        if self.default_name in taken:  # unreferenced instances in cycles give theirs back
            gc.collect()
            taken = {other.name for other in list(_LIVE) if other is not self}
        candidate, index = self.default_name, 0
        while candidate in taken or _name_in_store(candidate):
            index += 1
            candidate = f"{self.default_name}_{index}"
        return candidate

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self._default_named:
            self.name = self._free_name()
        _LIVE.add(self)

    def _register(self, part: str, module: nn.Module) -> None:
        """``pyro.module("<name>.<part>", module)``, then a check that the names hold this
        instance's tensors, not those of another live instance with the same ``name``
        (which would train instead of these, silently)."""
        prefix = f"{self.name}.{part}"
        pyro.module(prefix, module)
        store = pyro.get_param_store()
        for param_name, param in module.named_parameters():
            key = f"{prefix}$$${param_name}"
            if key not in store:
                continue
            held = cast(Any, store.get_param(key)).unconstrained()
            if held is param:
                continue
            for other in list(_LIVE):
                if other is not self and any(held is p for p in other.parameters()):
                    raise ValueError(
                        f"{type(self).__name__}(name={self.name!r}): the param-store name "
                        f"'{key}' holds the weights of another live "
                        f"{type(other).__name__} with the same name, so this one would "
                        "never train; give each instance its own name= (or leave it "
                        "unset for a unique default)"
                    )


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


class SigmoidBeliefNet(ParamStoreNamed):
    """A sigmoid belief net with Bernoulli layers and its recognition network.

    Generative model, top layer :math:`h_L` down to the observation :math:`x = h_0`:

    .. math::

        p(h_L) = \\mathrm{Bern}(\\sigma(a)), \\quad
        p(h_{l-1} \\mid h_l) = \\mathrm{Bern}(\\sigma(g_l(h_l))),

    and recognition network :math:`q(h_l \\mid h_{l-1}) = \\mathrm{Bern}(\\sigma(r_l(h_{l-1})))`.
    :math:`g_l, r_l` are affine ("linear" SBN) or, with ``hidden``, two-hidden-layer tanh
    networks ("nonlinear" SBN, as in the REBAR/RELAX benchmarks).

    :meth:`model` registers only the generative parameters (as ``"<name>.generative"``)
    and :meth:`guide` only the recognition parameters (``"<name>.recognition"``), so
    wake-sleep objectives can tell them apart; ``name`` is unique by default (``"sbn"``,
    ``"sbn_1"``, …; see :class:`ParamStoreNamed`), so two instances in one process train
    independently. Sites: ``"h1"`` … ``"hL"`` and the observed ``"x"``,
    all in the plate ``"data"`` (``dim=-1``), each an event of its layer's width.

    :param sizes: layer widths from the observation up, e.g. ``(784, 200)`` or
        ``(784, 200, 200)``.
    :param int hidden: width of the deterministic tanh layers of a nonlinear SBN.
    :param str name: the prefix of the param-store names (default: the first free of
        ``"sbn"``, ``"sbn_1"``, …).
    :raises TypeError: if ``name`` is neither a ``str`` nor ``None``.
    """

    default_name = "sbn"

    def __init__(self, sizes: Sequence[int] = (784, 200), hidden: int | None = None, *,
                 name: str | None = None) -> None:
        super().__init__(name)
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
        self._register("generative", self.generative)
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
        self._register("recognition", self.recognition)
        # x.shape[-2], not [0]: dreams carry leading particle dimensions
        with pyro.plate("data", x.shape[-2], dim=-1):
            h = x
            for layer, net in enumerate(self.recognition, start=1):
                h = pyro.sample(f"h{layer}", dist.Bernoulli(logits=net(h)).to_event(1))

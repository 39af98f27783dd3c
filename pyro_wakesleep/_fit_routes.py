"""The two adapters :func:`~pyro_wakesleep.training.fit` drives: the trainer route
(:class:`pyro.infer.SVI`, or an ``ELBOModule``, optionally in
:class:`~torch.nn.parallel.DistributedDataParallel`, with a torch optimizer, behind one
interface) and the data as a resumable stream of ``(args, kwargs)``; and the held-out
estimate of a step, evaluated through the route.

Private to :mod:`pyro_wakesleep.training`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from pyro.infer import SVI
from pyro.infer.elbo import ELBOModule
from pyro.util import get_rng_state, set_rng_state
from torch.nn.parallel import DistributedDataParallel

from pyro_wakesleep.checkpoints import (
    optimizer_settings,
    restore_training_state,
    training_state,
)


def _split(batch: Any) -> tuple[tuple, dict]:
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


class Route:
    """Adapts SVI or an ELBOModule (optionally in DistributedDataParallel) + torch
    optimizer to one interface. ``self.module`` is what is saved: the ELBOModule itself,
    never the DDP wrapper, so that checkpoints do not depend on the number of ranks.
    ``world``: the number of ranks, where several need the DDP wrapper."""

    def __init__(self, trainer: Any, optimizer: torch.optim.Optimizer | None,
                 world: int) -> None:
        module = trainer.module if isinstance(trainer, DistributedDataParallel) else trainer
        if isinstance(trainer, SVI):  # SVI keeps the ELBO's bound methods
            self.model, self.guide = trainer.model, trainer.guide
            self.loss = getattr(trainer.loss_and_grads, "__self__", None)
            if optimizer is not None:
                raise ValueError("optimizer is for fit(module, ...): SVI has its own")
        elif isinstance(module, ELBOModule):
            if optimizer is None:
                raise ValueError("fit(module, ...) needs optimizer=torch.optim.<...>")
            self.model, self.guide, self.loss = module.model, module.guide, module.elbo
        else:
            raise TypeError(f"fit takes a pyro.infer.SVI or the module of objective(model, "
                            f"guide) (an ELBOModule, or DistributedDataParallel of one), "
                            f"got {trainer!r}")
        if world > 1 and not isinstance(trainer, DistributedDataParallel):
            raise ValueError(
                f"fit: torch.distributed is initialized with {world} ranks, but the trainer "
                f"is a {type(trainer).__name__}, which does not average gradients over "
                "ranks; pass DistributedDataParallel(objective(model, guide)) with "
                "optimizer=..., so that every rank holds the same state (rank 0 alone "
                "writes the checkpoint)")
        self.trainer, self.module, self.optimizer = trainer, module, optimizer

    def step(self, args: tuple, kwargs: dict) -> float:
        if isinstance(self.trainer, SVI):
            return float(self.trainer.step(*args, **kwargs))
        assert self.optimizer is not None  # the DDP wrapper, if any, averages gradients
        loss = self.trainer(*args, **kwargs)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def evaluate(self, args: tuple, kwargs: dict) -> float:
        with torch.no_grad():
            if self.loss is None:
                return float(self.trainer.evaluate_loss(*args, **kwargs))
            return float(self.loss.loss(self.model, self.guide, *args, **kwargs))

    def state(self) -> dict[str, Any]:
        return training_state(self.module, self.optimizer, self.loss)

    def settings(self, names: Any = None) -> dict[str, Any]:
        return optimizer_settings(self.module, self.optimizer, names)

    def load(self, state: Mapping[str, Any], args: tuple, kwargs: dict) -> None:
        restore_training_state(state, self.module, self.optimizer, self.loss,
                               lambda: self.evaluate(args, kwargs))


class Data:
    """The data as a resumable stream of ``(args, kwargs)``."""

    def __init__(self, data: Any) -> None:
        self.fixed = _split(data) if isinstance(data, (tuple, Mapping)) else None
        if self.fixed is None and not isinstance(data, Iterable):
            raise TypeError(f"data must be a tuple of arguments, a dict of keyword "
                            f"arguments or an iterable of batches, got {data!r}")
        self.data = data
        self.iterator: Iterator[Any] | None = None
        self.epoch, self.batch, self.epoch_rng = 0, 0, get_rng_state()

    def first(self) -> tuple[tuple, dict]:
        return self.fixed or _split(next(iter(self.data)))

    def _iter(self) -> Iterator[Any]:
        set_epoch = getattr(getattr(self.data, "sampler", None), "set_epoch", None)
        if callable(set_epoch):  # a DistributedSampler: a new shuffle every epoch
            set_epoch(self.epoch)
        return iter(self.data)

    def next(self) -> tuple[tuple, dict]:
        if self.fixed is not None:
            return self.fixed
        if self.iterator is None:
            self.iterator = self._iter()
        try:
            batch = next(self.iterator)
        except StopIteration:
            self.epoch, self.batch, self.epoch_rng = self.epoch + 1, 0, get_rng_state()
            self.iterator = iterator = self._iter()
            batch = next(iterator, None)
            if batch is None:
                raise ValueError("fit: the data yielded no batch") from None
        self.batch += 1
        return _split(batch)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "epoch_rng": self.epoch_rng}

    def load(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.epoch_rng = state["epoch"], state["epoch_rng"]
        self.batch, self.iterator = 0, None
        if self.fixed is None:
            set_rng_state(self.epoch_rng)
            self.iterator = iterator = self._iter()
            for _ in range(state["batch"]):
                next(iterator)
        self.batch = state["batch"]


def validate(route: Route, validation: Any) -> float:
    if callable(validation):
        return float(validation())
    if isinstance(validation, (tuple, Mapping)):
        return route.evaluate(*_split(validation))
    values = [route.evaluate(*_split(batch)) for batch in validation]
    if not values:
        raise ValueError("fit: the validation data yielded no batch")
    return sum(values) / len(values)

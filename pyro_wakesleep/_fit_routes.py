"""The two adapters :func:`~pyro_wakesleep.training.fit` drives: the trainer route
(:class:`pyro.infer.SVI`, or an ``ELBOModule``, optionally in
:class:`~torch.nn.parallel.DistributedDataParallel`, with a torch optimizer, behind one
interface) and the data as a resumable stream of ``(args, kwargs)``; and the held-out
estimate of a step, evaluated through the route.

Private to :mod:`pyro_wakesleep.training`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import pyro
import torch
from pyro.infer import SVI
from pyro.infer.elbo import ELBOModule
from pyro.optim import PyroLRScheduler
from pyro.util import get_rng_state, set_rng_state
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

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


def count(args: tuple, kwargs: dict, datapoints: Any = None) -> int:
    """The number of datapoints in a batch: ``datapoints`` (an int, or a callable of
    ``(args, kwargs)``), else the length of the first tensor argument (1 for a scalar or
    no tensor)."""
    if datapoints is not None:
        n = datapoints(args, kwargs) if callable(datapoints) else datapoints
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"fit: datapoints gave {n!r} for a batch, not an int >= 1")
        return n
    tensor = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
    return 1 if tensor is None or tensor.dim() == 0 else int(tensor.shape[0])


class Route:
    """Adapts SVI or an ELBOModule (optionally in DistributedDataParallel) + torch
    optimizer to one interface. ``self.module`` is what is saved: the ELBOModule itself,
    never the DDP wrapper, so that checkpoints do not depend on the number of ranks.
    ``world``: the number of ranks, where several need the DDP wrapper. ``self.scheduler``:
    what :meth:`step_scheduler` steps (SVI's optimizer if it is a
    :class:`pyro.optim.PyroLRScheduler`, or the module route's torch scheduler);
    ``self.plateau``: whether it is a ``ReduceLROnPlateau``, stepped with a value."""

    def __init__(self, trainer: Any, optimizer: torch.optim.Optimizer | None,
                 world: int, scheduler: LRScheduler | None = None) -> None:
        module = trainer.module if isinstance(trainer, DistributedDataParallel) else trainer
        self.own_scheduler: LRScheduler | None = None  # saved with the module route
        if isinstance(trainer, SVI):  # SVI keeps the ELBO's bound methods
            self.model, self.guide = trainer.model, trainer.guide
            self.loss = getattr(trainer.loss_and_grads, "__self__", None)
            if optimizer is not None:
                raise ValueError("optimizer is for fit(module, ...): SVI has its own")
            if scheduler is not None:
                raise ValueError("scheduler is for fit(module, ...): with SVI, make a "
                                 "pyro.optim scheduler (e.g. pyro.optim.ExponentialLR(...)) "
                                 "SVI's optimizer, and fit steps it")
            self.scheduler: Any = (trainer.optim if isinstance(trainer.optim, PyroLRScheduler)
                                   else None)
            constructor = getattr(self.scheduler, "pt_scheduler_constructor", None)
            self.plateau = isinstance(constructor, type) and issubclass(constructor,
                                                                        ReduceLROnPlateau)
        elif isinstance(module, ELBOModule):
            if optimizer is None:
                raise ValueError("fit(module, ...) needs optimizer=torch.optim.<...>")
            if scheduler is not None and scheduler.optimizer is not optimizer:
                raise ValueError(f"scheduler {scheduler!r} schedules another optimizer than "
                                 "optimizer=...: build it with the optimizer passed to fit")
            self.model, self.guide, self.loss = module.model, module.guide, module.elbo
            self.scheduler = self.own_scheduler = scheduler
            self.plateau = isinstance(scheduler, ReduceLROnPlateau)
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
        if self.trainer is self.module and getattr(self.loss, "compiled", None) is not None \
                and callable(getattr(self.module, "step", None)):
            # jit=True: the whole step (loss, gradients, update) as one compiled step
            return float(self.module.step(self.optimizer, *args, **kwargs))
        loss = self.trainer(*args, **kwargs)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def step_scheduler(self, value: float | None = None) -> None:
        """Steps the learning-rate scheduler (a plateau scheduler with ``value``)."""
        if self.scheduler is not None:
            self.scheduler.step(*(() if value is None else (value,)))

    def learning_rates(self) -> dict[str, float]:
        """The learning rate of each param group (``"group<i>"``) or, for SVI, of each
        parameter's optimizer (by parameter name) that exists so far."""
        if self.optimizer is not None:
            groups = {f"group{i}": g.get("lr") for i, g in enumerate(self.optimizer.param_groups)}
        else:
            store = pyro.get_param_store()
            groups = {store.param_name(p) or "?": getattr(o, "optimizer", o).param_groups[0]
                      .get("lr") for p, o in self.trainer.optim.optim_objs.items()}
        return {name: float(lr) for name, lr in groups.items() if lr is not None}

    def evaluate(self, args: tuple, kwargs: dict) -> float:
        with torch.no_grad():
            if self.loss is None:
                return float(self.trainer.evaluate_loss(*args, **kwargs))
            return float(self.loss.loss(self.model, self.guide, *args, **kwargs))

    def state(self) -> dict[str, Any]:
        return training_state(self.module, self.optimizer, self.loss, self.own_scheduler)

    def settings(self, names: Any = None) -> dict[str, Any]:
        return optimizer_settings(self.module, self.optimizer, names, self.own_scheduler)

    def load(self, state: Mapping[str, Any], args: tuple, kwargs: dict) -> None:
        restore_training_state(state, self.module, self.optimizer, self.loss,
                               lambda: self.evaluate(args, kwargs), self.own_scheduler)


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


def validate(route: Route, validation: Any,
             datapoints: int | Callable[[tuple, dict], int] | None = None
             ) -> tuple[float, float | None]:
    """The held-out estimate (the objective's loss averaged over the validation batches,
    or the callable's value) and the mean number of datapoints per batch (``None`` for a
    callable)."""
    if callable(validation):
        return float(validation()), None
    batches = [validation] if isinstance(validation, (tuple, Mapping)) else validation
    values, sizes = [], []
    for batch in batches:
        args, kwargs = _split(batch)
        values.append(route.evaluate(args, kwargs))
        sizes.append(count(args, kwargs, datapoints))
    if not values:
        raise ValueError("fit: the validation data yielded no batch")
    return sum(values) / len(values), sum(sizes) / len(sizes)

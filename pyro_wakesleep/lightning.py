"""Training any objective with `Lightning <https://lightning.ai>`_ (the ``lightning``
extra: ``pip install pyro-wakesleep[lightning]``).

Not imported by ``import pyro_wakesleep``; import it explicitly::

    from pyro_wakesleep.lightning import ObjectiveLightningModule

    loss_module = objective(model, guide)
    loss_module.initialize(x[:batch_size])  # lazily built parameters exist first
    trainer = lightning.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1000)
    trainer.fit(ObjectiveLightningModule(loss_module, lr=1e-3), dataloader)

Under ``strategy="ddp"`` Lightning wraps the module in
:class:`~torch.nn.parallel.DistributedDataParallel`: each rank draws its own particles
for its own shard, DDP averages the gradients, and the control variates reduce their
running statistics across ranks (:mod:`pyro_wakesleep.distributed`). Lightning's
checkpoints hold the parameters and the control variates' running state (buffers) with
the optimizer; this module adds every rank's random-number state (Python, NumPy, torch:
what Pyro draws from), so a resumed run on the same number of ranks draws the particles
the uninterrupted one would have drawn, for a checkpoint written at the end of an epoch
(resuming mid-epoch re-creates the data iterator, which draws a base seed from torch's
generator).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import pyro
import torch
import torch.distributed as dist
from torch import Tensor

from pyro_wakesleep.distributed import is_distributed
from pyro_wakesleep.objectives.module import ObjectiveModule

__all__ = ["ObjectiveLightningModule"]

_RNG_KEY = "pyro_wakesleep_rng_states"


def _rng_state() -> dict[str, Any]:
    """Pyro's random-number state in types that ``torch.load(weights_only=True)``
    accepts (the NumPy key as a tensor)."""
    state = pyro.util.get_rng_state()
    kind, keys, pos, has_gauss, cached = state["numpy"]
    numpy = (kind, torch.as_tensor(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    return {"torch": state["torch"], "random": state["random"], "numpy": numpy}


def _set_rng_state(state: dict[str, Any]) -> None:
    kind, keys, pos, has_gauss, cached = state["numpy"]
    numpy = (kind, keys.numpy().astype("uint32"), pos, has_gauss, cached)
    pyro.util.set_rng_state({"torch": state["torch"], "random": state["random"], "numpy": numpy})


class ObjectiveLightningModule(pl.LightningModule):
    """A :class:`lightning.pytorch.LightningModule` whose training step is the loss of
    an :class:`~pyro_wakesleep.objectives.ObjectiveModule` (any objective).

    A batch is passed to the loss module as its positional arguments: a tensor as the one
    argument, a list or tuple (what a :class:`~torch.utils.data.TensorDataset` yields) as
    the arguments. Through Lightning's own logging (:meth:`~lightning.pytorch.LightningModule.log`,
    so to whichever logger the trainer has, TensorBoard by default) every training step
    logs ``"loss"`` (the batch's loss), ``"loss_per_datapoint"`` (divided by the length of
    the batch's first argument) and the learning rate ``"lr"`` (``"lr/group<i>"`` per
    param group where there are several); a validation step (given validation data,
    ``trainer.fit(module, train, val)``) logs ``"val_loss"`` and
    ``"val_loss_per_datapoint"``, the negative held-out bound, averaged over the
    validation set, with the control variates' running state left as it is.

    :param ObjectiveModule loss_module: ``objective(model, guide)``; call its
        :meth:`~pyro_wakesleep.objectives.ObjectiveModule.initialize` once before, so
        that lazily built parameters are among those given to the optimizer.
    :param callable optimizer: maps the parameters to a :class:`torch.optim.Optimizer`;
        by default :class:`torch.optim.Adam` with learning rate ``lr``.
    :param float lr: the learning rate of the default optimizer.
    :param callable scheduler: maps the optimizer to a learning-rate scheduler
        (:class:`torch.optim.lr_scheduler.LRScheduler`), which Lightning steps every
        ``scheduler_interval`` and saves in its checkpoints; ``None``: none.
    :param str scheduler_interval: ``"step"`` (default) or ``"epoch"``.
    """

    def __init__(
        self,
        loss_module: ObjectiveModule,
        optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
        lr: float = 1e-3,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        scheduler_interval: str = "step",
    ) -> None:
        super().__init__()
        if not isinstance(loss_module, ObjectiveModule):
            raise TypeError(
                "loss_module must be an ObjectiveModule, i.e. objective(model, guide), "
                f"got {loss_module!r}"
            )
        if optimizer is not None and not callable(optimizer):
            raise TypeError(f"optimizer must be callable or None, got {optimizer!r}")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if scheduler is not None and not callable(scheduler):
            raise TypeError(f"scheduler must be callable or None, got {scheduler!r}")
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got "
                             f"{scheduler_interval!r}")
        self.loss_module = loss_module
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.lr = float(lr)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The loss module's differentiable loss."""
        return self.loss_module(*args, **kwargs)

    def _loss(self, batch: Any, prefix: str) -> Tensor:
        args = tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)
        loss = self.loss_module(*args)
        first = args[0] if args and isinstance(args[0], Tensor) else None
        size = 1 if first is None or first.dim() == 0 else int(first.shape[0])
        self.log(f"{prefix}loss", loss.detach(), prog_bar=not prefix, batch_size=size)
        self.log(f"{prefix}loss_per_datapoint", loss.detach() / size, batch_size=size)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The loss of one batch (logged as ``"loss"``, with ``"loss_per_datapoint"`` and
        the learning rate ``"lr"``)."""
        loss = self._loss(batch, "")
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        rates = [g["lr"] for o in optimizers for g in o.param_groups if "lr" in g]
        for i, rate in enumerate(rates):
            self.log("lr" if len(set(rates)) == 1 else f"lr/group{i}", float(rate))
            if len(set(rates)) == 1:
                break
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The loss of one validation batch (logged as ``"val_loss"`` and
        ``"val_loss_per_datapoint"``, averaged over the validation set)."""
        return self._loss(batch, "val_")

    def configure_optimizers(self) -> Any:
        """The optimizer over every parameter of the loss module, with the scheduler if
        any."""
        params = list(self.parameters())
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(params)
        else:
            optimizer = torch.optim.Adam(params, lr=self.lr)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {
            "scheduler": self.scheduler_factory(optimizer),
            "interval": self.scheduler_interval}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds every rank's random-number state (a collective under DDP: Lightning calls
        this hook on every rank)."""
        state = _rng_state()
        if is_distributed():
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint[_RNG_KEY] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores this rank's random-number state if the checkpoint was written by as
        many ranks; otherwise keeps the current streams (seed each rank, e.g. with
        :func:`lightning.pytorch.seed_everything` and ``workers=True``) and warns."""
        states = checkpoint.get(_RNG_KEY)
        world = dist.get_world_size() if is_distributed() else 1
        if states is None:
            return
        if len(states) != world:
            warnings.warn(
                f"checkpoint written by {len(states)} rank(s), resumed on {world}: the "
                "random-number streams are not restored, so the particles differ from "
                "those of an uninterrupted run",
                RuntimeWarning, stacklevel=2,
            )
            return
        rank = dist.get_rank() if is_distributed() else 0
        _set_rng_state(states[rank])

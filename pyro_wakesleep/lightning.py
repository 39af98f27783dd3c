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
    the arguments. The loss is logged as ``"loss"``.

    :param ObjectiveModule loss_module: ``objective(model, guide)``; call its
        :meth:`~pyro_wakesleep.objectives.ObjectiveModule.initialize` once before, so
        that lazily built parameters are among those given to the optimizer.
    :param callable optimizer: maps the parameters to a :class:`torch.optim.Optimizer`;
        by default :class:`torch.optim.Adam` with learning rate ``lr``.
    :param float lr: the learning rate of the default optimizer.
    """

    def __init__(
        self,
        loss_module: ObjectiveModule,
        optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
        lr: float = 1e-3,
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
        self.loss_module = loss_module
        self.optimizer_factory = optimizer
        self.lr = float(lr)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The loss module's differentiable loss."""
        return self.loss_module(*args, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The loss of one batch (logged as ``"loss"``)."""
        args = tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)
        loss = self.loss_module(*args)
        self.log("loss", loss.detach(), prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimizer over every parameter of the loss module."""
        params = list(self.parameters())
        if self.optimizer_factory is not None:
            return self.optimizer_factory(params)
        return torch.optim.Adam(params, lr=self.lr)

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

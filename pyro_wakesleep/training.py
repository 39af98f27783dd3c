"""A training loop for users who do not want to write one: :func:`fit`.

Progress bar, history, callbacks, early stopping on a held-out estimate, periodic
gradient diagnostics, and checkpoint/resume of the whole training state (parameters,
optimizer, control-variate state, random number generators and the position in the
data) so that a resumed run continues exactly as if it had not stopped.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from pyro.infer import SVI
from pyro.infer.elbo import ELBOModule
from pyro.util import get_rng_state, set_rng_state
from torch.nn.parallel import DistributedDataParallel

from pyro_wakesleep._fit_routes import Data, Route, validate
from pyro_wakesleep._validation import check_int, check_real
from pyro_wakesleep.checkpoints import (
    FORMAT,
    check_checkpoint_path,
    check_optimizer_settings,
    load_checkpoint,
    save_checkpoint,
)
from pyro_wakesleep.diagnostics.history import History
from pyro_wakesleep.distributed import _agree, _any, _gather, _mean, _own_streams, _rank_and_world

__all__ = ["StepInfo", "fit"]


class StepInfo(NamedTuple):
    """What a callback of :func:`fit` receives after each step.

    :param int step: steps done so far.
    :param float loss: this step's loss.
    :param History history: the history so far.
    :param int epoch: passes over the data.
    """

    step: int
    loss: float
    history: History
    epoch: int


class _DeferInterrupt:
    """Defers Ctrl-C (SIGINT) to the end of the current step; a second one interrupts
    at once."""

    requested = False

    def __enter__(self) -> _DeferInterrupt:
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def fit(
    trainer: SVI | ELBOModule | DistributedDataParallel, data: Any, num_steps: int, *,
    optimizer: torch.optim.Optimizer | None = None, validation: Any = None,
    validate_every: int = 100, patience: int | None = None, min_delta: float = 0.0,
    restore_best: bool = False, checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100, resume: bool = True,
    callbacks: Sequence[Callable[[StepInfo], bool | None]] = (),
    gradient_stats_every: int | None = None, gradient_stats_draws: int = 20,
    progress: bool = True, description: str | None = None,
) -> History:
    """Runs ``num_steps`` optimization steps and returns the :class:`History`.

    With ``checkpoint`` the whole training state (param store, optimizer state, the
    objective's ``state_dict()`` with its control variates, the random number generators,
    the position in the data, the history and early-stopping state) is saved every
    ``checkpoint_every`` steps and at the end, atomically; when the file exists and
    ``resume`` is true, training continues from it, exactly (bit for bit) as if it had
    not stopped, also in a fresh process (the model, guide, optimizer and objective must
    be built as before). Ctrl-C finishes the current step, saves, and raises
    :class:`KeyboardInterrupt`. Checkpoints are pickles: load only your own
    (:func:`torch.load` with ``weights_only=False``).

    The optimizer must be built with the settings of the checkpointed run: resuming
    restores its state, learning rate included, so a run resumed with another learning
    rate (or betas, weight decay, optimizer class, ...) raises :class:`ValueError` naming
    the setting rather than silently keeping the checkpoint's; pass ``resume=False`` or a
    new checkpoint path to train on with new settings
    (:func:`~pyro_wakesleep.checkpoints.check_optimizer_settings`).

    **Data-parallel** (``torch.distributed`` initialized with several ranks): pass
    ``DistributedDataParallel(objective(model, guide))`` with ``optimizer``, and each
    rank's own ``data`` (e.g. a :class:`~torch.utils.data.DataLoader` with a
    :class:`~torch.utils.data.DistributedSampler`, whose ``set_epoch`` fit calls every
    epoch). Every rank holds the same training state, so rank 0 alone writes the
    checkpoint (once per save), with every rank's random-number state; every rank reads
    it when resuming (a file every rank can read). A checkpoint resumes on any number of
    ranks, whichever number wrote it: on as many ranks, exactly as the uninterrupted run;
    on another number, with the parameters, optimizer and control-variate state, history
    and position in the data (in batches) of the checkpoint on every rank, rank ``r``
    continuing the checkpoint's rank-``r`` random stream if it has one and a new one
    (:func:`~pyro_wakesleep.distributed.derived_rng_state`) otherwise (a warning says
    so). The loss in the history and the validation value are the means over ranks; a
    callback or early stopping that stops one rank, or Ctrl-C on one, stops them all
    after the same step (one small all-reduce per step each). Gradient statistics are
    each rank's own (rank 0's are saved).

    :param trainer: a :class:`pyro.infer.SVI`, or the module of
        ``objective(model, guide)`` (an :class:`pyro.infer.elbo.ELBOModule`, or
        :class:`~torch.nn.parallel.DistributedDataParallel` around one) with
        ``optimizer``.
    :param data: the arguments of every step (a tuple, or a dict of keyword arguments),
        or an iterable of batches (e.g. a :class:`torch.utils.data.DataLoader`) cycled
        over epochs; a batch is a tuple/list of arguments, a dict, or one tensor.
    :param int num_steps: total steps (a resumed run counts the steps already done).
    :param torch.optim.Optimizer optimizer: for the module route.
    :param validation: held-out estimate, lower is better: a callable ``() -> float``, or
        arguments (tuple/dict) or an iterable of batches at which the objective's
        ``loss`` is evaluated (averaged over batches) every ``validate_every`` steps.
    :param int patience: stop after this many validations without an improvement of at
        least ``min_delta``.
    :param bool restore_best: at the end, restore the parameters (and objective state)
        of the best validation.
    :param list callbacks: called with a :class:`StepInfo` after each step; returning
        ``True`` stops training.
    :param int gradient_stats_every: every so many steps, record
        :func:`~pyro_wakesleep.diagnostics.gradient_stats` (``gradient_stats_draws``
        draws, at the step's batch; it changes no training state) per group.
    :param bool progress: show a tqdm progress bar with the running loss.
    :param str description: the progress bar's label.
    :rtype: History
    """
    callbacks = _check_arguments(locals())  # first: only the arguments are local
    rank, world = _rank_and_world()
    route, stream, history = Route(trainer, optimizer, world), Data(data), History()
    early: dict[str, Any] = {"best": math.inf, "best_step": None, "bad": 0, "best_state": None}
    step = 0
    # the module route's settings as built, before a callback or scheduler changes them
    settings = route.settings() if route.optimizer is not None else None
    if checkpoint is not None and _agree(lambda: _exists(checkpoint, resume) if rank == 0
                                         else None):
        saved = _agree(lambda: load_checkpoint(checkpoint), everywhere=True)
        saved_settings = saved.get("optimizer_settings")
        if saved_settings is not None:
            names = (saved_settings.get("per_param_args") or {}).keys()
            check_optimizer_settings(saved_settings, settings or route.settings(names))
        route.load(saved["trainer"], *stream.first())
        own = _own_streams(saved, rank, world)
        stream.load({**saved["data"], "epoch_rng": own["epoch_rng"]})
        history, early, step = History.from_state(saved["history"]), saved["early"], saved["step"]
        set_rng_state(own["rng"])

    def save(path: str | os.PathLike) -> None:  # a collective: every rank calls it
        ranks = _gather({"rng": get_rng_state(), "epoch_rng": stream.epoch_rng})
        if rank == 0:  # every rank holds the same training state: rank 0 writes it
            save_checkpoint(path, {
                "format": FORMAT, "step": step, "trainer": route.state(),
                "data": stream.state(), "history": history.state(), "early": early,
                "rng": ranks[0]["rng"], "ranks": ranks,
                "optimizer_settings": settings if settings is not None else route.settings()})

    from tqdm.auto import tqdm

    stop = False
    with _DeferInterrupt() as interrupt, tqdm(
            total=num_steps, initial=step, desc=description, mininterval=1.0,
            disable=not progress or rank != 0) as bar:
        while step < num_steps and not stop:
            args, kwargs = stream.next()
            loss = _mean(route.step(args, kwargs))  # the ranks' mean: what DDP optimizes
            step += 1
            history.add_loss(step, loss)
            bar.set_postfix(loss=f"{history.running_loss:.4g}", refresh=False)
            bar.update(1)  # redraws at most once per mininterval, with the new postfix
            if gradient_stats_every and step % gradient_stats_every == 0 \
                    and route.loss is not None:
                from pyro_wakesleep.diagnostics.gradients import gradient_stats

                stats = gradient_stats(route.model, route.guide, route.loss, *args,
                                       num_draws=gradient_stats_draws, **kwargs)
                history.add_gradients(step, stats.rows("group"))
            if validation is not None and step % validate_every == 0:
                value = _mean(validate(route, validation))
                history.add_validation(step, value)
                if value < early["best"] - min_delta:
                    early.update(best=value, best_step=step, bad=0)
                    if restore_best:
                        early["best_state"] = route.state()
                else:
                    early["bad"] += 1
                stop = patience is not None and early["bad"] >= patience
            info = StepInfo(step, loss, history, stream.epoch)
            stop = any([cb(info) is True for cb in callbacks]) or stop
            if world > 1:  # one rank stopping or interrupted stops them all at this step
                stop, interrupt.requested = _any(stop, interrupt.requested)
            if checkpoint is not None and (step % checkpoint_every == 0 or stop
                                           or step == num_steps or interrupt.requested):
                save(checkpoint)
            if interrupt.requested:
                raise KeyboardInterrupt(f"fit interrupted after step {step}" + (
                    f"; resume from {os.fspath(checkpoint)!r}" if checkpoint else ""))
    if restore_best and early["best_state"] is not None:
        route.load(early["best_state"], *stream.first())
    history.stopped_early = stop
    return history


def _exists(checkpoint: str | os.PathLike, resume: bool) -> bool:
    check_checkpoint_path(checkpoint)
    return resume and os.path.exists(checkpoint)


def _check_arguments(a: Mapping[str, Any]) -> list[Callable[[StepInfo], bool | None]]:
    """Checks the arguments of :func:`fit` (by name) up front; returns the callbacks."""
    check_int(a["num_steps"], "num_steps", 0)
    for name, low in (("validate_every", 1), ("checkpoint_every", 1), ("patience", 1),
                      ("gradient_stats_every", 1), ("gradient_stats_draws", 2)):
        if a[name] is not None or name not in ("patience", "gradient_stats_every"):
            check_int(a[name], name, low)
    check_real(a["min_delta"], "min_delta", 0.0)
    for name in ("restore_best", "resume", "progress"):
        if not isinstance(a[name], bool):
            raise TypeError(f"{name} must be a bool, got {a[name]!r}")
    for name, kind, what in (("checkpoint", (str, os.PathLike), "a path"),
                             ("description", str, "a str"),
                             ("optimizer", torch.optim.Optimizer, "a torch.optim.Optimizer")):
        if a[name] is not None and not isinstance(a[name], kind):
            raise TypeError(f"{name} must be {what} or None, got {a[name]!r}")
    validation = a["validation"]
    if isinstance(validation, (str, bytes)) or not (
            validation is None or callable(validation) or isinstance(validation, Iterable)):
        raise TypeError(f"validation must be a callable () -> float, a tuple or dict of "
                        f"arguments or an iterable of batches, got {validation!r}")
    if validation is None and (a["patience"] is not None or a["restore_best"]):
        raise ValueError("patience and restore_best need validation=...")
    callbacks = a["callbacks"]
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Iterable):
        raise TypeError(f"callbacks must be a list of callables, got {callbacks!r}")
    callbacks = list(callbacks)
    for i, callback in enumerate(callbacks):
        if not callable(callback):
            raise TypeError(f"callbacks[{i}] must be callable, got {callback!r}")
    return callbacks

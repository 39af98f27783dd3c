"""A training loop for users who do not want to write one: :func:`fit`.

Progress bar, history, callbacks, early stopping on a held-out estimate, periodic
gradient diagnostics, learning-rate schedulers, logging to TensorBoard (or anything with
``add_scalar``), and checkpoint/resume of the whole training state (parameters,
optimizer and scheduler, control-variate state, random number generators and the
position in the data) so that a resumed run continues exactly as if it had not stopped.
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

from pyro_wakesleep._fit_routes import Data, Route, count, validate
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
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scheduler_interval: str = "step", logger: Any = None,
    datapoints: int | Callable[[tuple, dict], int] | None = None,
) -> History:
    """Runs ``num_steps`` optimization steps and returns the :class:`History`.

    With ``checkpoint`` the whole training state (param store, optimizer state, the
    objective's ``state_dict()`` with its control variates, the random number generators,
    the position in the data, the history and early-stopping state) is saved every
    ``checkpoint_every`` steps and at the end, atomically; when the file exists and
    ``resume`` is true, training continues from it, exactly (bit for bit) as if it had
    not stopped, also in a fresh process (the model, guide, optimizer and objective must
    be built as before). Ctrl-C finishes the current step, saves, and raises
    :class:`KeyboardInterrupt`. Checkpoints are read safely (:func:`torch.load` with
    ``weights_only=True``, :func:`~pyro_wakesleep.checkpoints.load_checkpoint`): a file
    that would need anything but tensors, plain containers and the types of
    :data:`~pyro_wakesleep.checkpoints.SAFE_TYPES` to load is refused with a
    :class:`ValueError`, before any of it runs.

    **Learning-rate schedulers** are stepped by ``fit`` and saved in the checkpoint with
    the optimizer, so that a resumed run continues the schedule exactly. With
    :class:`~pyro.infer.SVI`, make a :mod:`pyro.optim` scheduler
    (:class:`pyro.optim.PyroLRScheduler`, e.g. ``pyro.optim.ExponentialLR({"optimizer":
    torch.optim.Adam, "optim_args": {"lr": 0.01}, "gamma": 0.999})``) SVI's optimizer;
    in the module route pass a :mod:`torch.optim.lr_scheduler` scheduler of
    ``optimizer`` as ``scheduler``. It is stepped after every optimization step
    (``scheduler_interval="step"``) or after the last step of every pass over the data
    (``"epoch"``, for data with a length such as a
    :class:`~torch.utils.data.DataLoader`); a ``ReduceLROnPlateau`` is stepped with each
    validation value instead (``validation`` is needed). Do not step it yourself as well.

    **Logging**: ``logger`` is a :class:`torch.utils.tensorboard.SummaryWriter` or any
    object with a method ``add_scalar(tag, value, step)``. At every step it receives
    ``train/loss`` (the step's loss as in the history: the objective's loss of the batch)
    and ``train/loss_per_datapoint`` (divided by the batch's number of datapoints, see
    ``datapoints``), and the learning rate used for the step, ``lr`` (or ``lr/<name>``
    per param group ``group<i>``, or per parameter for SVI, where they differ); at each
    validation ``validation/loss`` (as in the history) and, for validation data,
    ``validation/loss_per_datapoint`` (the negative held-out bound per datapoint); at
    each gradient-statistics step ``gradients/<group>/<statistic>`` (``mean_norm``,
    ``variance``, ``snr``, ``mean_snr``, as in
    :meth:`~pyro_wakesleep.diagnostics.History.gradients_dataframe`). Its ``flush()``, if
    any, is called at the end. Under ``torch.distributed`` only rank 0 logs.

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
    :param scheduler: for the module route, a learning-rate scheduler
        (:class:`torch.optim.lr_scheduler.LRScheduler`, ``ReduceLROnPlateau`` included) of
        ``optimizer``, stepped by ``fit`` and saved in the checkpoint.
    :param str scheduler_interval: ``"step"`` (default) or ``"epoch"``: when ``fit`` steps
        the scheduler (of either route).
    :param logger: a :class:`torch.utils.tensorboard.SummaryWriter` or any object with
        ``add_scalar(tag, value, step)``; see above for what it receives.
    :param datapoints: the number of datapoints in a batch, for the per-datapoint values
        logged: an int, or a callable ``(args, kwargs) -> int``; by default the length of
        the first tensor argument (1 if it is a scalar).
    :rtype: History
    """
    callbacks = _check_arguments(locals())  # first: only the arguments are local
    rank, world = _rank_and_world()
    route, stream, history = Route(trainer, optimizer, world, scheduler), Data(data), History()
    epoch_length = _epoch_length(route, data, validation, scheduler_interval)
    log: Any = logger if rank == 0 else None
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
            if log is not None:  # the learning rates this step used
                _log(log, step, loss, count(args, kwargs, datapoints), "train")
                _log_rates(log, step, route.learning_rates())
            if not route.plateau and (scheduler_interval == "step"
                                      or stream.batch == epoch_length):
                route.step_scheduler()
            bar.set_postfix(loss=f"{history.running_loss:.4g}", refresh=False)
            bar.update(1)  # redraws at most once per mininterval, with the new postfix
            if gradient_stats_every and step % gradient_stats_every == 0 \
                    and route.loss is not None:
                from pyro_wakesleep.diagnostics.gradients import gradient_stats

                stats = gradient_stats(route.model, route.guide, route.loss, *args,
                                       num_draws=gradient_stats_draws, **kwargs)
                rows = stats.rows("group")
                history.add_gradients(step, rows)
                for row in rows if log is not None else ():
                    for key in ("mean_norm", "variance", "snr", "mean_snr"):
                        log.add_scalar(f"gradients/{row['group']}/{key}", row[key], step)
            if validation is not None and step % validate_every == 0:
                value, size = validate(route, validation, datapoints)
                value = _mean(value)
                history.add_validation(step, value)
                if log is not None:
                    _log(log, step, value, size, "validation")
                if route.plateau:
                    route.step_scheduler(value)
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
    if callable(getattr(log, "flush", None)):
        log.flush()
    return history


def _log(logger: Any, step: int, value: float, size: float | None, prefix: str) -> None:
    logger.add_scalar(f"{prefix}/loss", value, step)
    if size is not None:
        logger.add_scalar(f"{prefix}/loss_per_datapoint", value / size, step)


def _log_rates(logger: Any, step: int, rates: Mapping[str, float]) -> None:
    if len(set(rates.values())) == 1:
        logger.add_scalar("lr", next(iter(rates.values())), step)
    else:
        for name, rate in rates.items():
            logger.add_scalar(f"lr/{name}", rate, step)


def _epoch_length(route: Route, data: Any, validation: Any, interval: str) -> int | None:
    """The number of batches per pass over ``data`` if the scheduler is stepped per epoch;
    checks that the scheduler can be stepped as asked."""
    if route.plateau and validation is None:
        raise ValueError("a ReduceLROnPlateau scheduler is stepped with the validation "
                         "value: pass validation=...")
    if route.scheduler is None or route.plateau or interval == "step":
        return None
    try:
        length = len(data) if not isinstance(data, (tuple, Mapping)) else None
    except TypeError:
        length = None
    if not length:
        raise ValueError(f"scheduler_interval='epoch' needs data that is an iterable of "
                         f"batches with a length (such as a DataLoader), got {data!r}")
    return length


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
                             ("optimizer", torch.optim.Optimizer, "a torch.optim.Optimizer"),
                             ("scheduler", torch.optim.lr_scheduler.LRScheduler,
                              "a torch.optim.lr_scheduler.LRScheduler")):
        if a[name] is not None and not isinstance(a[name], kind):
            raise TypeError(f"{name} must be {what} or None, got {a[name]!r}")
    if a["scheduler_interval"] not in ("step", "epoch"):
        raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got "
                         f"{a['scheduler_interval']!r}")
    if a["logger"] is not None and not callable(getattr(a["logger"], "add_scalar", None)):
        raise TypeError(f"logger must be a torch.utils.tensorboard.SummaryWriter or an "
                        f"object with a method add_scalar(tag, value, step), got "
                        f"{a['logger']!r}")
    datapoints = a["datapoints"]
    if datapoints is not None and not callable(datapoints):
        check_int(datapoints, "datapoints", 1)
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

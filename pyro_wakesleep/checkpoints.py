"""Checkpoint files of :func:`~pyro_wakesleep.training.fit`.

Writes are atomic (a temporary file in the same directory, then :func:`os.replace`), so
a crash or a second Ctrl-C during a save leaves the previous checkpoint intact; reads are
safe (:func:`torch.load` with ``weights_only=True``: tensors, plain containers and the few
types of :data:`SAFE_TYPES`, never code), and turn a corrupt, empty, foreign or unsafe file
into a :class:`ValueError` naming the path; and
:func:`check_compatible` compares a checkpoint with the run about to resume from it
before anything is loaded, naming the parameter or control variate that differs.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np
import pyro
import pyro.distributions.constraints as pyro_constraints
import pyro.poutine as poutine
import torch
import torch.distributions.constraints as torch_constraints
from pyro.infer import SVI
from pyro.params.param_store import (
    module_from_param_with_module_name,
    normalize_param_name,
    user_param_name,
)
from pyro.util import get_rng_state, set_rng_state

__all__ = ["SAFE_TYPES", "check_checkpoint_path", "check_compatible", "check_optimizer_settings",
           "load_checkpoint", "optimizer_settings", "restore_training_state",
           "save_checkpoint", "training_state"]

FORMAT = "pyro_wakesleep.fit/1"


def _safe_types() -> list[Any]:
    array = np.zeros(1, dtype=np.uint32)
    constraints = {obj for module in (torch_constraints, pyro_constraints)
                   for obj in vars(module).values()
                   if isinstance(obj, type) and issubclass(obj, torch_constraints.Constraint)}
    return [array.__reduce__()[0], np.ndarray, np.dtype, type(array.dtype),
            *sorted(constraints, key=lambda c: (c.__module__, c.__qualname__))]


SAFE_TYPES: list[Any] = _safe_types()
"""What a checkpoint of :func:`~pyro_wakesleep.training.fit` may hold beyond tensors and
plain containers (dicts, lists, tuples, str, numbers), and all that
:func:`load_checkpoint` allow-lists (for that one call, with
:func:`torch.serialization.safe_globals`): NumPy arrays (NumPy's random-number state) and
the constraint classes of :mod:`torch.distributions.constraints` and
:mod:`pyro.distributions.constraints` (the param store's). A parameter with a constraint
of a class of your own needs ``torch.serialization.add_safe_globals([YourConstraint])``
before resuming.

:meta hide-value:
"""


def _prepare(path: str | os.PathLike) -> tuple[str, str]:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    return path, directory


def check_checkpoint_path(path: str | os.PathLike) -> None:
    """Checks, before training, that a checkpoint can be written at ``path``: creates its
    directory (as saving does) and a temporary file in it, which it removes.

    :param path: the checkpoint file.
    :raises ValueError: naming ``path`` if it is a directory or cannot be written.
    """
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {os.fspath(path)!r} is a directory, not a file")
    try:
        _, directory = _prepare(path)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"cannot write checkpoint {os.fspath(path)!r}: {error}") from error


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Saves ``state`` with :func:`torch.save` atomically: into a temporary file in the
    same directory, flushed to disk, then renamed over ``path``. If the save fails the
    temporary file is removed and a previous file at ``path`` is untouched.

    :param path: the checkpoint file.
    :param dict state: what to save.
    """
    path, directory = _prepare(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:  # also a second Ctrl-C in the middle of the write
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`~pyro_wakesleep.training.fit`, safely:
    :func:`torch.load` with ``weights_only=True``, which rebuilds tensors and plain
    containers and, here, only the types of :data:`SAFE_TYPES`. A file that needs
    anything else to load (a pickle that would import a module or call a function, as a
    planted file does to run code) is refused before any of it is run.

    :param path: the checkpoint file.
    :rtype: dict
    :raises ValueError: naming ``path`` if the file is empty, corrupt, needs a type
        outside :data:`SAFE_TYPES` (naming it), or is not a checkpoint of ``fit()``.
    """
    hint = "delete it, or pass resume=False to start over"
    try:
        with torch.serialization.safe_globals(SAFE_TYPES):
            saved = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
        if unsafe is None:
            why = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(error), re.S)
            raise ValueError(f"checkpoint {os.fspath(path)!r} cannot be read (empty, corrupt "
                             "or not a file of tensors and plain containers: "
                             f"{why.group(1) if why else error}); {hint}") from None
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} refused: it needs {unsafe.group(1)} to load, "
            "which a checkpoint of fit() never holds, and loading it could run arbitrary "
            "code (nothing in it was run). If you wrote it with a type of your own (e.g. a "
            "parameter constraint) and trust it, allow-list that type with "
            f"torch.serialization.add_safe_globals; otherwise {hint}") from None
    except Exception as error:
        raise ValueError(f"checkpoint {os.fspath(path)!r} cannot be read (empty or "
                         f"corrupt: {type(error).__name__}: {error}); {hint}") from error
    if not isinstance(saved, Mapping) or saved.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a checkpoint of fit(); {hint}")
    return dict(saved)


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _compare(what: str, saved: Mapping[str, Any], current: Mapping[str, Any],
             missing_ok: Collection[str] = (), unexpected_ok: Collection[str] = ()) -> None:
    for name in current:
        if name not in saved and name not in missing_ok:
            raise ValueError(f"{what} '{name}' of this run is missing from the checkpoint")
    for name in saved:
        if name not in current and name not in unexpected_ok:
            raise ValueError(f"the checkpoint has {what} '{name}', which this run does "
                             "not have")
    for name in saved.keys() & current.keys():
        if _shape(saved[name]) != _shape(current[name]):
            raise ValueError(f"{what} '{name}' has shape {_shape(saved[name])} in the "
                             f"checkpoint but {_shape(current[name])} in this run")


def _site(key: str) -> str:
    return key.partition(".")[0]


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any],
                     existing_sites: Collection[str] = ()) -> None:
    """Checks that the training state ``saved`` (from a checkpoint) belongs to the run
    whose state is ``current``: the same parameters with the same shapes, the same
    control-variate state, the same route and optimizer layout. Reads only.

    Control variates created lazily, one per site at its first step, may exist on one
    side only: a site the run has not reached yet keeps its saved state until it is
    created, and one the checkpoint never reached starts fresh. Their parameters are
    exempt from the parameter check likewise (listed in ``"control_variate_params"``).

    :param dict saved: the ``"trainer"`` entry of a checkpoint.
    :param dict current: the same entry of this run, after its parameters exist.
    :param existing_sites: control-variate sites the objective had before that (given
        per site at construction): these must be in the checkpoint.
    :raises ValueError: naming the first parameter, control variate or optimizer
        setting that differs.
    """
    if ("module" in saved) != ("module" in current):
        kind = {True: "fit(module, optimizer=...)", False: "fit(SVI)"}
        raise ValueError(f"the checkpoint was written by {kind['module' in saved]}, but "
                         f"this run is {kind['module' in current]}")
    saved_params, params = saved["params"]["params"], current["params"]["params"]
    _compare("parameter", saved_params, params, current.get("control_variate_params", ()),
             saved.get("control_variate_params", ()))
    objective, saved_objective = current.get("objective") or {}, saved.get("objective") or {}
    saved_sites, sites = {_site(k) for k in saved_objective}, {_site(k) for k in objective}
    _compare("control variate state", saved_objective, objective,
             [k for k in objective if _site(k) not in saved_sites | set(existing_sites)],
             [k for k in saved_objective if _site(k) not in sites])
    if "module" in current:
        prefix = current.get("control_variate_prefix")
        keep = {k for k in current["module"] | saved["module"]
                if prefix is None or not k.startswith(f"{prefix}.")}
        _compare("module state", {k: v for k, v in saved["module"].items() if k in keep},
                 {k: v for k, v in current["module"].items() if k in keep})
        if ("scheduler" in saved) != ("scheduler" in current):
            has = {True: "a learning-rate scheduler", False: "no learning-rate scheduler"}
            raise ValueError(f"this run has {has['scheduler' in current]} but the checkpoint "
                             f"was written with {has['scheduler' in saved]}")
        sizes = [[len(g["params"]) for g in s["optimizer"]["param_groups"]]
                 for s in (saved, current)]
        if sizes[0] != sizes[1]:
            raise ValueError(f"the optimizer has param groups of sizes {sizes[1]} in this "
                             f"run but {sizes[0]} in the checkpoint")


def training_state(trainer: Any, optimizer: torch.optim.Optimizer | None,
                   loss: Any, scheduler: Any = None) -> dict[str, Any]:
    """A copy of the training state: the param store, the objective's ``state_dict()``
    (with its control variates), the optimizer state (for SVI with a
    :class:`pyro.optim.PyroLRScheduler`, each parameter's scheduler state with it), and for
    the module route the module's ``state_dict()`` and the scheduler's, if any.

    :param trainer: a :class:`pyro.infer.SVI` or an :class:`pyro.infer.elbo.ELBOModule`.
    :param torch.optim.Optimizer optimizer: the module route's optimizer, else ``None``.
    :param loss: the objective (``None`` if unknown).
    :param scheduler: the module route's learning-rate scheduler
        (:class:`torch.optim.lr_scheduler.LRScheduler`), else ``None``.
    :rtype: dict
    """
    objective = getattr(loss, "state_dict", None)
    store = pyro.get_param_store()
    cvs = getattr(loss, "control_variates", None)
    ids = {id(p) for p in cvs.parameters()} if isinstance(cvs, torch.nn.Module) else set()
    state: dict[str, Any] = {
        "params": store.get_state(), "objective": objective() if callable(objective)
        else None, "control_variate_params": [
            n for n, p in store.named_parameters() if id(p) in ids]}
    if isinstance(trainer, SVI):
        state["optimizer"] = trainer.optim.get_state()
    else:
        assert optimizer is not None
        state["module"] = trainer.state_dict()
        state["optimizer"] = optimizer.state_dict()
        state["control_variate_prefix"] = next(
            (n for n, m in trainer.named_modules() if m is cvs and n), None)
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
    return copy.deepcopy(state)


def restore_training_state(state: Mapping[str, Any], trainer: Any,
                           optimizer: torch.optim.Optimizer | None, loss: Any,
                           warm_up: Callable[[], Any], scheduler: Any = None) -> None:
    """Restores what :func:`training_state` returned, in place (modules, optimizers and
    schedulers keep their tensors), after checking it with :func:`check_compatible`.

    :param callable warm_up: runs the objective once (e.g. its ``loss``), so that the
        parameters and lazily created control variates exist; what it registers is
        undone, and the random number generators restored, if the check fails.
    :param scheduler: the module route's learning-rate scheduler, else ``None``.
    :raises ValueError: from :func:`check_compatible`, with nothing changed.
    """
    store, cvs = pyro.get_param_store(), getattr(loss, "control_variates", None)
    cvs = cvs if isinstance(cvs, torch.nn.Module) else torch.nn.Module()
    names, children, rng = set(store.keys()), dict(cvs.named_children()), get_rng_state()
    objective = getattr(loss, "state_dict", None)
    sites = {k.partition(".")[0] for k in (objective() if callable(objective) else {})}
    with poutine.block():
        warm_up()
    try:
        check_compatible(state, training_state(trainer, optimizer, loss, scheduler), sites)
    except ValueError:  # undo what the warm-up created
        for name in set(store.keys()) - names:
            del store[name]
        for name, _ in list(cvs.named_children()):
            if name not in children:
                delattr(cvs, name)
        set_rng_state(rng)
        raise
    current = dict(store.named_parameters())
    saved = state["params"]
    missing = {n: v for n, v in saved["params"].items() if n not in current}
    with torch.no_grad():
        for name, value in saved["params"].items():
            if name in current:
                current[name].copy_(value)
    store.set_state({"params": missing, "constraints": {
        n: c for n, c in saved["constraints"].items() if n in missing}})
    if state.get("objective") is not None and loss is not None:
        # control variates that only this run has created keep their fresh state
        loss.load_state_dict({**loss.state_dict(), **state["objective"]})
    if isinstance(trainer, SVI):
        trainer.optim.optim_objs.clear()  # rebuilt from the loaded state
        trainer.optim.set_state(copy.deepcopy(state["optimizer"]))
    else:
        assert optimizer is not None
        trainer.load_state_dict({**trainer.state_dict(), **state["module"]})
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])


def _pyro_optim_args(optim: Any, names: Collection[str]) -> dict[str, Any]:
    """The arguments a :class:`pyro.optim.PyroOptim` builds each parameter's optimizer
    with: its dict, or for a callable its value at each name in ``names``."""
    args = optim.pt_optim_args
    if not callable(args):
        return {"args": dict(args)}
    if getattr(optim, "pt_optim_args_argc", 1) == 1:
        return {"per_param_args": {n: dict(args(normalize_param_name(n))) for n in names}}
    return {"per_param_args": {
        n: dict(args(module_from_param_with_module_name(n), user_param_name(n)))
        for n in names}}


def _plain(value: Any) -> Any:
    """``value`` with every class or function in it replaced by its qualified name: what
    a checkpoint can hold without allow-listing (and compare across processes)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(value) and not isinstance(value, torch.Tensor):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', '?')}"
    return value


def optimizer_settings(trainer: Any, optimizer: torch.optim.Optimizer | None,
                       names: Collection[str] | None = None,
                       scheduler: Any = None) -> dict[str, Any]:
    """The settings the optimizer was built with (learning rate, betas, weight decay, ...):
    for :func:`~pyro_wakesleep.training.fit`, which records them at the start of a run
    and compares them with :func:`check_optimizer_settings` when it resumes.

    For the module route, every param group's settings (all entries but ``"params"``)
    as they are now: call it before training changes them (a scheduler or a callback
    may). For :class:`pyro.infer.SVI`, the arguments its :class:`pyro.optim.PyroOptim`
    builds the per-parameter optimizers with (a callable's value at each parameter name
    in ``names``, by default those in the param store), which training never changes.
    Classes and functions among the settings (a scheduler's ``lr_lambda``, say) are given
    by their qualified names, so that the settings are plain data.

    :param trainer: a :class:`pyro.infer.SVI` or the module route's module.
    :param torch.optim.Optimizer optimizer: the module route's optimizer, else ``None``.
    :param names: for SVI with per-parameter arguments, the parameter names to list.
    :param scheduler: the module route's learning-rate scheduler (its class is listed),
        else ``None``.
    :rtype: dict
    """
    if isinstance(trainer, SVI):
        optim = trainer.optim
        store = pyro.get_param_store()
        constructor = getattr(optim, "pt_scheduler_constructor", None)
        return _plain({"optimizer": getattr(optim.pt_optim_constructor, "__name__", "?"),
                       "scheduler": None if constructor is None else (
                           getattr(constructor, "__name__", "?"), dict(optim.kwargs)),
                       **_pyro_optim_args(optim, store.keys() if names is None else names)})
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
    return _plain({"optimizer": type(optimizer).__name__, "param_groups": [
        {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
        for group in optimizer.param_groups],
        "scheduler": None if scheduler is None else type(scheduler).__name__})


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _differs(where: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    for key in sorted(saved.keys() | current.keys()):
        if key not in saved or key not in current or not _same(saved[key], current[key]):
            raise ValueError(
                f"optimizer setting {key!r}{where} is {current.get(key, '<unset>')!r} in this "
                f"run but {saved.get(key, '<unset>')!r} in the checkpoint: a resumed run "
                "continues with the checkpoint's optimizer state and settings, so build the "
                "optimizer as the checkpointed run did, or pass resume=False (or another "
                "checkpoint path) to start a run with the new settings")


def check_optimizer_settings(saved: Mapping[str, Any] | None,
                             current: Mapping[str, Any]) -> None:
    """Checks that this run's optimizer was built with the settings of the checkpointed
    run (both from :func:`optimizer_settings`): resuming restores the checkpoint's
    optimizer state, learning rate included, so a different learning rate (or any other
    setting) would be silently ignored; it is refused instead. Reads only.

    A checkpoint of the other route (SVI against the module route) is not compared here:
    :func:`check_compatible` refuses it.

    :param dict saved: the checkpoint's ``"optimizer_settings"`` (``None`` for a
        checkpoint that has none: nothing is checked).
    :param dict current: this run's.
    :raises ValueError: naming the first setting that differs, with both values.
    """
    if saved is None or ("param_groups" in saved) != ("param_groups" in current):
        return
    if saved["optimizer"] != current["optimizer"]:
        raise ValueError(f"the optimizer is {current['optimizer']} in this run but "
                         f"{saved['optimizer']} in the checkpoint")
    if not _same(saved.get("scheduler"), current.get("scheduler")):
        raise ValueError(f"the learning-rate scheduler is {current.get('scheduler')!r} in "
                         f"this run but {saved.get('scheduler')!r} in the checkpoint")
    if "param_groups" in saved and "param_groups" in current:
        groups = saved["param_groups"], current["param_groups"]
        if len(groups[0]) != len(groups[1]):
            raise ValueError(f"the optimizer has {len(groups[1])} param group(s) in this run "
                             f"but {len(groups[0])} in the checkpoint")
        for i, (old, new) in enumerate(zip(*groups, strict=True)):
            _differs(f" of param group {i}", old, new)
        return
    if "args" in saved and "args" in current:
        _differs("", saved["args"], current["args"])
    elif "per_param_args" in saved and "per_param_args" in current:
        old, new = saved["per_param_args"], current["per_param_args"]
        for name in sorted(old.keys() & new.keys()):
            _differs(f" of parameter {name!r}", old[name], new[name])
    else:
        raise ValueError("the optimizer takes one dict of arguments in one of this run and "
                         "the checkpoint and per-parameter arguments (a callable) in the "
                         "other")

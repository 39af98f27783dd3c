"""Call signatures of a compiled step: what a recorded graph is valid for.

A graph is a pure function of its inputs (parameters, tensor and number arguments,
running state); everything else it was recorded under is part of its *signature*, and a
call whose signature differs gets (or records) a graph of its own:

* the model and guide, and the structure of the arguments: tensors by shape, dtype,
  device and ``requires_grad``; Python ``float`` and ``int`` by type only (their values
  are graph inputs, so an annealed factor compiles once), unless the recording found the
  program reading them into Python, when they are keyed by value; anything else by value;
* the objective's own settings (``num_particles`` and every other attribute holding a
  number, string or flag), and Pyro's validation flag;
* the ``training`` flag and number-valued attributes of every module the step runs
  (found by a global forward hook when the step runs eagerly), of the model's and
  guide's owners and of the control variates.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyro.poutine.runtime as runtime
import torch
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.poutine.util import is_validation_enabled
from torch import Tensor, nn
from torch.utils import _pytree

__all__ = ["ArgSignature", "arguments", "identity", "modules_run", "plain_stack", "settings"]

_PRIMITIVE = (bool, int, float, str, type(None))


def identity(fn: Callable) -> Any:
    """A hashable identity of a model or guide that is the same for every access of a
    bound method (``sbn.model`` is a new object each time)."""
    return (fn.__func__, fn.__self__) if inspect.ismethod(fn) else fn


def is_scalar(leaf: Any) -> bool:
    """Python ``float`` and ``int`` (not ``bool``): graph inputs, not signature keys."""
    return isinstance(leaf, numbers.Real) and not isinstance(leaf, bool | Tensor) and \
        type(leaf) in (int, float)


class ArgSignature:
    """The arguments of a call: their key, and the graph inputs they give.

    :param tuple key: the hashable key (``None`` if an argument is not hashable).
    :param list inputs: the tensor arguments and, converted to 0-d tensors, the
        ``float``/``int`` ones, in the order of the flattened arguments.
    """

    __slots__ = ("inputs", "key", "leaves", "positions", "scalars", "spec")

    def __init__(self, key: Any, inputs: list[Tensor], leaves: list[Any], spec: Any,
                 positions: list[int], scalars: list[int]) -> None:
        self.key, self.inputs, self.leaves, self.spec = key, inputs, leaves, spec
        #: flat positions of the graph inputs; of those, the ones that were numbers
        self.positions, self.scalars = positions, scalars

    def rebuild(self, inputs: tuple[Tensor, ...]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with the graph inputs put back in place (numbers as the
        0-d tensors the graph is recorded with)."""
        if self.spec is None:
            return tuple(inputs), {}
        leaves = list(self.leaves)
        for position, value in zip(self.positions, inputs, strict=True):
            leaves[position] = value
        args, kwargs = _pytree.tree_unflatten(leaves, self.spec)
        return args, kwargs


def arguments(args: tuple, kwargs: dict, scalars_by_value: bool = False) -> ArgSignature:
    """The signature of a call's arguments (see the module docstring)."""
    if not kwargs and all(type(a) is Tensor for a in args):  # the common case, fast
        key = tuple((a.shape, a.dtype, a.device, a.requires_grad) for a in args)
        return ArgSignature(key, list(args), list(args), None, list(range(len(args))), [])
    leaves, spec = _pytree.tree_flatten((args, kwargs))
    parts: list[Any] = []
    inputs: list[Tensor] = []
    positions: list[int] = []
    scalars: list[int] = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor):
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.device, leaf.requires_grad))
            inputs.append(leaf)
            positions.append(i)
        elif is_scalar(leaf) and not scalars_by_value:
            parts.append(type(leaf))
            dtype = torch.get_default_dtype() if type(leaf) is float else torch.int64
            inputs.append(torch.tensor(leaf, dtype=dtype))
            scalars.append(len(positions))
            positions.append(i)
        else:
            parts.append((type(leaf), leaf))
    full: Any = (spec, tuple(parts))
    try:
        hash(full)
    except TypeError:
        full = None
    return ArgSignature(full, inputs, leaves, spec, positions, scalars)


def _numbers(obj: Any) -> tuple:
    return tuple((k, v) for k, v in vars(obj).items()
                 if type(v) in _PRIMITIVE and k != "_pyro_wakesleep_provenance")


def settings(objective: Any, modules: Iterable[nn.Module]) -> tuple:
    """The objective's number, string and flag attributes, Pyro's validation flag, and
    the ``training`` flag and number attributes of ``modules``."""
    return (_numbers(objective), is_validation_enabled(),
            torch.distributions.Distribution._validate_args,
            tuple(_numbers(m) for m in modules))


def plain_stack() -> bool:
    """Whether every Pyro handler around the call only records parameters (``SVI``'s
    and the module route's ``poutine.trace(param_only=True)``): a graph replays without
    handlers, so any other handler around the objective must see the eager step."""
    return all(isinstance(m, TraceMessenger) and m.param_only for m in runtime._PYRO_STACK)


@contextlib.contextmanager
def modules_run(found: dict[int, nn.Module]) -> Iterator[None]:
    """Collects every :class:`torch.nn.Module` whose ``forward`` runs (by a global
    forward pre-hook) into ``found``, by id."""
    def hook(module: nn.Module, _: Any) -> None:
        found.setdefault(id(module), module)

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def owned_modules(model: Callable, guide: Callable, objective: Any) -> list[nn.Module]:
    """The model and guide when they are modules, the modules bound methods belong to,
    and every control variate (whose flags a step reads without calling ``forward``)."""
    found: dict[int, nn.Module] = {}
    for fn in (model, guide):
        for owner in (fn, getattr(fn, "__self__", None)):
            if isinstance(owner, nn.Module):
                for module in owner.modules():
                    found.setdefault(id(module), module)
    for module in objective.control_variates.modules():
        found.setdefault(id(module), module)
    return list(found.values())

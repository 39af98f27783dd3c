"""What recording checks, by mechanism: a step is recorded only if its graph is a pure
function of its inputs that replays the eager step exactly.

* Every read of tensor data into Python, and every op whose output shape depends on
  data, is seen by a :class:`~pyro_wakesleep.dataflow.Dataflow` whose labels mark the
  graph inputs and every random draw: a read of a labelled value refuses the recording
  (:func:`read_refuser`), naming the read and the user's line. Reads of constants are
  fine. Reads of the ``float``/``int`` arguments alone ask for a recording with those
  numbers as constants (:class:`ScalarRead`).
* :class:`Guard` refuses draws from a user :class:`torch.Generator`, differentiation
  inside the step, and values computed by a custom :class:`torch.autograd.Function` that
  gradients flow through (its ``backward`` would be lost: e.g. the reparameterized
  ``Beta``/``Dirichlet`` samplers, a straight-through estimator). It also turns the reads
  of validation checks (``Distribution`` argument and support checks, under Pyro's
  validation) into graph outputs, so that a replay makes the same checks.
* :class:`Writes` notes every tensor from outside the step written in place (a
  ``BatchNorm``'s running statistics): those become state threaded through the graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

from pyro_wakesleep.dataflow import Read, Writes, call_site

__all__ = ["INPUT", "SCALAR", "Guard", "Refused", "ScalarRead", "Writes", "read_refuser"]

#: provenance label of the graph's tensor inputs, state and random draws
INPUT = 1
#: provenance label of the ``float``/``int`` arguments
SCALAR = 2


class Refused(Exception):
    """A step that cannot be recorded exactly (the reason is the message)."""


class ScalarRead(Exception):
    """The program reads a ``float``/``int`` argument into Python: record it again with
    the numbers as constants of the signature."""


def read_refuser(read: Read) -> None:
    """``on_read`` of the recording's :class:`~pyro_wakesleep.dataflow.Dataflow`."""
    if read.provenance & INPUT:
        raise Refused(
            f"the program reads a value out of a tensor into Python ({read.what} at "
            f"{read.where}) that depends on the parameters, arguments or random draws of "
            "the step (e.g. stochastic control flow, or a branch on data), so one recorded "
            "run would replay its structure"
        )
    if read.provenance & SCALAR:
        raise ScalarRead(f"{read.what} at {read.where}")


_READS = frozenset({"__bool__", "item", "is_nonzero", "__float__", "__int__", "__index__",
                    "__complex__", "tolist", "numpy", "__array__", "__format__", "equal"})


class Guard(TorchFunctionMode):
    """The checks of a recording made per torch function (see the module docstring).

    :ivar list checks: boolean tensors (true where the recorded branch of a validation
        check would be taken again), which the graph returns.
    """

    def __init__(self) -> None:
        super().__init__()
        self.checks: list[Tensor] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.autograd.grad, torch.autograd.backward, Tensor.backward):
            raise Refused("the step differentiates inside itself (torch.autograd.grad or "
                          "backward, e.g. a learned control variate's variance gradient), "
                          "which a recorded graph does not replay")
        generator = kwargs.get("generator")
        if isinstance(generator, torch.Generator) and not _default(generator):
            raise Refused(f"the step draws from a user torch.Generator ({_name(func)} at "
                          f"{call_site()[0]}), whose state a graph does not thread")
        for arg in args:
            if isinstance(arg, Tensor) and arg.requires_grad and isinstance(
                    arg.grad_fn, torch.autograd.function.BackwardCFunction):
                function = type(arg.grad_fn)._forward_cls
                raise Refused(
                    f"gradients flow through the custom torch.autograd.Function "
                    f"{function.__module__}.{function.__qualname__} (its result used at "
                    f"{call_site()[0]}; e.g. a straight-through estimator, or the "
                    "reparameterized sampler of Beta/Dirichlet), whose backward a recorded "
                    "graph would not call"
                )
        name = getattr(func, "__name__", "")
        if name in _READS and args and isinstance(args[0], Tensor):
            # a read into Python: made on the real tensor, out of sight of the recorder
            # (which would refuse it), then judged by the Dataflow above by what was read
            with _disable_current_modes():
                value = func(*args, **kwargs)
            if call_site()[1]:  # a validation check: the graph returns it, the replay checks it
                tensor = args[0].detach().reshape(-1).bool()
                self.checks.append((tensor if value else ~tensor).all())
            return value
        return func(*args, **kwargs)


def _default(generator: torch.Generator) -> bool:
    """Whether ``generator`` is PyTorch's global generator of its device."""
    if generator.device.type == "cpu":
        return generator is torch.default_generator
    return generator.device.type == "cuda" and generator is torch.cuda.default_generators[
        generator.device.index or 0]


def _name(func: Any) -> str:
    return str(getattr(func, "__qualname__", None) or getattr(func, "__name__", func))




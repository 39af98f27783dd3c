"""Recording a function of tensors below autograd, as a graph of aten operations
(:func:`record_below_autograd`), for the training step (:mod:`pyro_wakesleep.compiled.training`): the loss
graph, its differentiation and the optimizer update run no program of the user, so
what ``make_fx(tracing_mode="real")`` does there can be done by one dispatch-level mode
that appends each operation to an :class:`torch.fx.Graph` as it runs.

Every aten operation that runs while recording (forward, the backward pass of
:func:`torch.autograd.grad`, factory functions, random draws and writes in place) is
recorded in order with its real result; a tensor that no recorded operation produced
and that is not an input is a constant of the graph (the same tensor object, as
``make_fx`` keeps it). Replaying the graph runs the same operations on the same
aliasing (views stay views, in-place writes stay in place) and draws from the same
global generator. An operation that reads tensor data into Python
(``aten._local_scalar_dense``) is refused, since its value would be baked in. About ten
times less Python per operation than ``make_fx``, which builds proxies, fake-tensor
metadata and pytree specs for every value.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx
from torch.fx._lazy_graph_module import _make_graph_module, _use_lazy_graph_module
from torch.utils._python_dispatch import TorchDispatchMode

from pyro_wakesleep.compiled.checks import Refused

__all__ = ["record_below_autograd"]

_READS = frozenset({torch.ops.aten._local_scalar_dense.default})


class _Recorder(TorchDispatchMode):
    """Appends every aten operation to :attr:`graph` (see the module docstring)."""

    def __init__(self, inputs: list[Tensor]) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.root = torch.nn.Module()
        self.node: dict[int, fx.Node] = {}
        self.alive: list[Tensor] = []  # every tensor seen, so that ids stay unique
        for i, value in enumerate(inputs):
            self.node[id(value)] = self.graph.placeholder(f"input_{i}")
            self.alive.append(value)

    def arg(self, value: Any) -> Any:
        """``value`` with each tensor replaced by its node."""
        if isinstance(value, Tensor):
            node = self.node.get(id(value))
            if node is None:  # a constant: from outside the recorded function
                name = f"_tensor_constant{len(self.root._buffers)}"
                self.root.register_buffer(name, value, persistent=False)
                node = self.node[id(value)] = self.graph.get_attr(name)
                self.alive.append(value)
            return node
        if type(value) is list or type(value) is tuple:
            return type(value)(self.arg(v) for v in value)
        return value

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if func in _READS:
            raise Refused(f"the training step reads tensor data into Python ({func})")
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        node = self.graph.call_function(
            func, self.arg(args), {k: self.arg(v) for k, v in kwargs.items()}
        )
        if isinstance(result, Tensor):
            self.node[id(result)] = node
            self.alive.append(result)
        elif type(result) is list or type(result) is tuple:
            for i, item in enumerate(result):
                if isinstance(item, Tensor):
                    self.node[id(item)] = self.graph.call_function(operator.getitem, (node, i))
                    self.alive.append(item)
        return result


def record_below_autograd(fn: Callable[..., tuple[Tensor, ...]], *inputs: Tensor
                          ) -> fx.GraphModule:
    """Runs ``fn(*inputs)`` once and returns its graph of aten operations: a graph
    module that, called with tensors like ``inputs``, runs the same operations and
    returns the tuple of tensors ``fn`` returned (see the module docstring).

    :raises Refused: if ``fn`` reads tensor data into Python or returns a non-tensor.
    """
    recorder = _Recorder(list(inputs))
    with recorder:
        outputs = fn(*inputs)
    if not all(isinstance(out, Tensor) for out in outputs):
        raise Refused("the recorded function returned something other than tensors")
    recorder.graph.output(tuple(recorder.arg(out) for out in outputs))
    with _use_lazy_graph_module(True):
        return _make_graph_module(recorder.root, recorder.graph)

"""Recording a function of tensors as a graph of aten operations, from below autograd
(:func:`record_below_autograd`): one dispatch-level mode appends each operation to a
:class:`torch.fx.Graph` as it runs, with its real result. It records both graphs of the
compiled path: the loss step (:mod:`pyro_wakesleep.compiled.recording`, under that
module's checks), and the training step around it (:mod:`pyro_wakesleep.compiled.training`:
the loss graph, its differentiation and the optimizer update).

Every aten operation that runs while recording (forward, the backward pass of
:func:`torch.autograd.grad`, factory functions, random draws and writes in place) is
recorded in order; a tensor that no recorded operation produced and that is not an
input is a constant of the graph (the same tensor object), except that a constant made
fresh by the program (``torch.tensor(...)``, aten's ``lift_fresh``) is copied afresh
at each replay, as it was made at each eager run. Replaying runs the same operations on
the same aliasing (views stay views, in-place writes stay in place) and draws from the
same global generator.

A graph that will be differentiated (the loss step's, ``grad_mode=True``) is replayed
*above* autograd, which then sees the same operations as in the eager run: what the
eager run did without gradients (``torch.no_grad`` regions) is bracketed by grad-mode
switches, and ``detach`` is an aten operation like the others, so the replay's autograd
graph is the eager one. (Operations without an autograd formula of their own are
decomposed before they reach this level, in the eager run as in the replay.)

A read of tensor data into Python (``aten._local_scalar_dense``) of a computed value
would bake it in, and is refused (the loss step's
:class:`~pyro_wakesleep.dataflow.Dataflow` refuses reads of values computed from inputs
and random draws before they reach this level, naming the user's line); a constant's
value, the same at every replay, may be read (as in ``make_fx``). About ten times less
Python per operation than ``make_fx``, which builds proxies, fake-tensor metadata and
pytree specs for every value.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx
from torch.fx._lazy_graph_module import (
    _make_graph_module,
    _use_lazy_graph_module,
)
from torch.utils._python_dispatch import TorchDispatchMode

from pyro_wakesleep.compiled.checks import Refused
from pyro_wakesleep.compiled.simplify import lower_for_inductor

__all__ = ["CompiledGraph", "record_below_autograd"]

_READS = frozenset({torch.ops.aten._local_scalar_dense.default})
_FRESH_COPY = torch.ops.aten.lift_fresh_copy.default
#: ops that return a constant made fresh by the program: replayed as a fresh copy
_FRESH = {torch.ops.aten.lift_fresh.default: _FRESH_COPY}


class _Recorder(TorchDispatchMode):
    """Appends every aten operation to :attr:`graph` (see the module docstring)."""

    def __init__(self, inputs: list[Tensor], grad_mode: bool, meta: bool) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.root = torch.nn.Module()
        self.node: dict[int, fx.Node] = {}
        self.alive: list[Tensor] = []  # every tensor seen, so that ids stay unique
        self.grad_mode = torch.is_grad_enabled() if grad_mode else None
        self.meta = meta
        for i, value in enumerate(inputs):
            self._track(value, self.graph.placeholder(f"input_{i}"))

    def arg(self, value: Any) -> Any:
        """``value`` with each tensor replaced by its node."""
        if isinstance(value, Tensor):
            node = self.node.get(id(value))
            if node is None:  # a constant: from outside the recorded function
                name = f"_tensor_constant{len(self.root._buffers)}"
                self.root.register_buffer(name, value, persistent=False)
                node = self.graph.get_attr(name)
                self._track(value, node)
            return node
        if type(value) is list or type(value) is tuple:
            return type(value)(self.arg(v) for v in value)
        return value

    def set_grad_mode(self, enabled: bool) -> None:
        """Records a grad-mode switch if the mode differs from the recorded one."""
        if self.grad_mode is not None and enabled != self.grad_mode:
            self.graph.call_function(torch._C._set_grad_enabled, (enabled,))
            self.grad_mode = enabled

    def _track(self, value: Any, node: fx.Node) -> None:
        self.node[id(value)] = node
        self.alive.append(value)
        if self.meta and isinstance(value, Tensor):
            with torch._C.DisableTorchFunction():
                node.meta["val"] = torch.empty_strided(value.shape, value.stride(),
                                                       dtype=value.dtype, device="meta")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _READS:
            source = self.node.get(id(args[0]))
            if source is not None and source.op != "get_attr" \
                    and source.target is not _FRESH_COPY:
                raise Refused(f"the step reads tensor data into Python ({func})")
            return func(*args, **kwargs)  # a constant's value: the same at every replay
        func = _FRESH.get(func, func)  # the constant itself stays as it was made
        result = func(*args, **kwargs)
        self.set_grad_mode(torch.is_grad_enabled())
        node = self.graph.call_function(
            func, self.arg(args), {k: self.arg(v) for k, v in kwargs.items()}
        )
        if isinstance(result, Tensor):
            self._track(result, node)
        elif type(result) is list or type(result) is tuple:
            for i, item in enumerate(result):
                if isinstance(item, Tensor):
                    self._track(item, self.graph.call_function(operator.getitem, (node, i)))
        return result


def record_below_autograd(fn: Callable[..., tuple[Tensor, ...]], *inputs: Tensor,
                          grad_mode: bool = False, meta: bool = False) -> fx.GraphModule:
    """Runs ``fn(*inputs)`` once and returns its graph of aten operations: a lazy graph
    module that, called with tensors like ``inputs``, runs the same operations and
    returns the tuple of tensors ``fn`` returned (see the module docstring).

    :param bool grad_mode: record grad-mode switches, for a graph replayed under
        autograd (it starts, and ends, in the grad mode ``fn`` was called in).
    :param bool meta: give each value's node ``meta["val"]``, an empty tensor on the
        ``meta`` device of its shape, stride and dtype (which graph passes read).
    :raises Refused: if ``fn`` reads the data of a computed tensor into Python (a
        constant's may be read: its value is the same at every replay, as in
        ``make_fx``), or returns a non-tensor.
    """
    recorder = _Recorder(list(inputs), grad_mode, meta)
    start = torch.is_grad_enabled()
    with recorder:
        outputs = fn(*inputs)
    if not all(isinstance(out, Tensor) for out in outputs):
        raise Refused("the recorded function returned something other than tensors")
    recorder.set_grad_mode(start)
    recorder.graph.output(tuple(recorder.arg(out) for out in outputs))
    with _use_lazy_graph_module(True):
        return _make_graph_module(recorder.root, recorder.graph)


class CompiledGraph:
    """A recorded graph compiled with inductor at its first call, for the layout of that
    call's tensors (shape, stride, dtype, device, ``requires_grad``) and grad mode, and
    again for another layout (up to :attr:`MAX_LAYOUTS`; past that, the graph module
    itself runs, op by op, with one :class:`RuntimeWarning`). Random numbers come from
    torch's generator (``fallback_random``), as in the eager step.

    The graph goes to inductor directly (:func:`torch._inductor.compile`), not through
    :func:`torch.compile`: a recorded graph is already one flat graph of aten operations,
    and Dynamo would only add a frame whose guards cost ~40 µs per call. The layout key
    here stands for those guards. Ops inductor has no lowering for are first replaced by
    equal ones it fuses (:func:`~pyro_wakesleep.compiled.simplify.lower_for_inductor`).
    """

    #: layouts compiled at most, per graph
    MAX_LAYOUTS = 8

    def __init__(self, module: fx.GraphModule) -> None:
        self.module = module
        self._compiled: dict[tuple, Callable[..., Any]] = {}
        self._warned = False

    def __call__(self, *args: Tensor) -> Any:
        key = (torch.is_grad_enabled(), *((a.shape, a.stride(), a.dtype, a.device,
                                           a.requires_grad) for a in args))
        fn = self._compiled.get(key)
        if fn is None:
            if len(self._compiled) >= self.MAX_LAYOUTS:
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"jit_options compile: a recorded graph was called with more than "
                        f"{self.MAX_LAYOUTS} layouts of its tensors (shape, stride, dtype, "
                        "device, requires_grad, grad mode); further layouts replay the "
                        "graph op by op, uncompiled (exact, slower)", RuntimeWarning,
                        stacklevel=2)
                return self.module(*args)
            graph = copy.deepcopy(self.module.graph)
            lower_for_inductor(graph)
            lowered = fx.GraphModule(self.module, graph)
            # imported on first use (inductor and sympy: seconds and ~70 MB)
            from torch import _inductor
            from torch._subclasses.fake_tensor import FakeTensorMode
            from torch.fx.experimental.symbolic_shapes import ShapeEnv

            # fake inputs with a shape environment, as Dynamo passes them: without one,
            # inductor bypasses its on-disk cache and compiles afresh in every process
            fake = FakeTensorMode(shape_env=ShapeEnv())
            inputs: list[Any] = [fake.from_tensor(a, static_shapes=True) for a in args]
            fn = self._compiled[key] = _inductor.compile(
                lowered, inputs, options={"fallback_random": True})
        return fn(*args)

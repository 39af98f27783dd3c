"""The compiled training step (:class:`TrainingStep`): loss, gradients, control-variate
updates and the optimizer's update recorded together, so that a step is two graph calls
and no Python per operation.

It extends a recorded loss step (:class:`~pyro_wakesleep.compiled.recording.Graph`,
which was checked when it was recorded): the loss graph, its differentiation with
:func:`torch.autograd.grad` and the optimizer update
(:mod:`pyro_wakesleep.compiled.optimizers`) are recorded with
:func:`~pyro_wakesleep.compiled.below_autograd.record_below_autograd`, as one flat graph of
tensor operations; no program of the user runs while recording, so the checks of the
loss recording (which refuse differentiation inside the user's step) still hold and the
only differentiation recorded is this one. It is replayed as two calls: the forward and
backward pass, which returns the step's checks (finite log-densities, validation), and,
only if they pass, the update, which writes parameters and optimizer state in place:
a step whose checks fail changes nothing and runs again eagerly, raising the eager error.

The trust rule is the loss step's: replays 1, 2, 4, 8, ... (``jit_options["verify"]``)
run the eager training step as well, from the same state, and compare the loss, every
parameter, the optimizer's state, the control-variate state, the outputs and the random
state; on a mismatch the eager step's result stands and the call signature runs eagerly
from then on, with one warning. A step that cannot be recorded (an optimizer without a
compiled update, a tensor argument that requires grad, ...) runs its update eagerly, with
one warning naming the cause.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, cast

import pyro
import torch
from pyro.util import get_rng_state, set_rng_state
from torch import Tensor

from pyro_wakesleep.compiled.below_autograd import CompiledGraph, record_below_autograd
from pyro_wakesleep.compiled.checks import Refused
from pyro_wakesleep.compiled.optimizers import NOT_YET, Binding, bind, update_fn
from pyro_wakesleep.compiled.options import verifies
from pyro_wakesleep.compiled.recording import Graph
from pyro_wakesleep.compiled.signature import ArgSignature, plain_stack
from pyro_wakesleep.compiled.verification import (
    EXACT,
    differ,
    generator_states,
    restore_generators,
)

__all__ = ["TrainingGraph", "TrainingStep"]

Step = Callable[[], Tensor]


class TrainingGraph:
    """A recorded training step around a loss graph.

    :ivar forward: ``forward(*params, *arguments, *buffers, *threaded)`` returns
        ``(loss, check, *new buffers, *outputs, *gradients)`` (the gradients of the
        parameters in :attr:`trained`).
    :ivar update: ``update(*trained params, *gradients, *optimizer state, scalars)``,
        writing in place.
    """

    def __init__(self, loss: Graph, forward: Callable[..., Any], trained: list[int]) -> None:
        self.loss, self.forward, self.trained = loss, forward, trained
        self.update: Callable[..., Any] | None = None
        self.key: tuple | None = None  # the optimizer constants the update is valid for
        self.replays = 0


def _compile(module: torch.fx.GraphModule, compile: bool) -> Callable[..., Any]:
    module.graph.eliminate_dead_code()  # random draws and writes in place are kept
    module.recompile()
    if compile:
        return CompiledGraph(module)
    return module


def record_forward(graph: Graph, params: list[Tensor], inputs: list[Tensor],
                   state: list[Tensor], threaded: list[Tensor], compile: bool
                   ) -> TrainingGraph:
    """Records the loss graph and its gradients as one graph (see the module docstring).

    :raises Refused: where the result would differ from the eager step's.
    """
    module = graph.module
    if module is None:
        raise Refused("the loss step has no recorded graph")
    for node in module.graph.nodes:
        value = getattr(module, str(node.target), None) if node.op == "get_attr" else None
        if isinstance(value, Tensor) and value.requires_grad:
            raise Refused("the step trains a tensor that is not a Pyro parameter (a module "
                          "used without pyro.module?), which only the eager step updates")
    if any(t.requires_grad for t in inputs):
        raise Refused("a tensor argument requires grad: the eager step's backward would "
                      "accumulate its gradient")
    n = len(params)
    trained: list[int] = []

    def forward(*values: Tensor) -> tuple[Tensor, ...]:
        out = module(*values)
        surrogate = out[1]
        if not surrogate.requires_grad:
            raise Refused("the step's surrogate loss has no gradient")
        grads = torch.autograd.grad(surrogate, list(values[:n]), allow_unused=True)
        trained[:] = [i for i, g in enumerate(grads) if g is not None]
        k = len(graph.slots) + len(graph.outputs)
        kept = [out[2 + i].detach() for i in range(k)]
        return (out[0].detach(), out[-1].detach(), *kept, *(grads[i] for i in trained))

    rng = get_rng_state()
    before = [t.detach().clone() for t in threaded]
    try:
        leaves = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad():
            traced = record_below_autograd(forward, *leaves, *inputs, *state, *threaded)
    except Refused:
        raise
    except Exception as error:
        raise Refused(f"the training step could not be recorded ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''})") from error
    finally:
        set_rng_state(rng)
        with torch.no_grad():
            for tensor, value in zip(threaded, before, strict=True):
                tensor.copy_(value)
    if not trained:
        raise Refused("no parameter gets a gradient from the step")
    return TrainingGraph(graph, _compile(traced, compile), trained)


def record_update(binding: Binding, params: list[Tensor], grads: list[Tensor],
                  compile: bool) -> Callable[..., Any]:
    """Records the optimizer update of ``params`` (on copies: nothing changes)."""
    states = binding.states(params)
    scalars = binding.scalars(params)
    copies = [t.detach().clone() for t in (*params, *grads, *states)]
    update = update_fn(binding)

    def run(*values: Tensor) -> tuple[()]:
        update(*values)
        return ()

    with torch.no_grad():
        traced = record_below_autograd(run, *copies, scalars)
    return _compile(traced, compile)


class _Snapshot:
    """Everything a training step changes, copied (for verification)."""

    def __init__(self, objective: Any, graph: Graph, params: list[Tensor],
                 states: list[Tensor]) -> None:
        self.rng = get_rng_state()
        self.buffers = [module._buffers[name] for module, name in graph.slots]
        self.threaded = [t.detach().clone() for t in graph.threaded_tensors()]
        self.outputs = objective._outputs()
        self.params = [p.detach().clone() for p in params]
        # copies: a backward accumulates into an existing .grad in place
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        self.states = [s.detach().clone() for s in states]

    def restore(self, objective: Any, graph: Graph, params: list[Tensor],
                states: list[Tensor]) -> None:
        set_rng_state(self.rng)
        for (module, name), value in zip(graph.slots, self.buffers, strict=True):
            module._buffers[name] = value
        objective._set_outputs(self.outputs)
        with torch.no_grad():
            for tensors, values in ((graph.threaded_tensors(), self.threaded),
                                    (params, self.params), (states, self.states)):
                for tensor, value in zip(tensors, values, strict=True):
                    tensor.copy_(value)
        for p, grad in zip(params, self.grads, strict=True):
            p.grad = grad

    def compare(self, other: _Snapshot, names: list[str], tolerance: float) -> list[str]:
        def far(a: Tensor | None, b: Tensor | None) -> bool:
            if a is None or b is None:
                return (a is None) != (b is None)
            return differ(a, b, tolerance)

        found = [f"the parameter '{n}'" for n, a, b in zip(names, self.params, other.params,
                                                           strict=True) if far(a, b)]
        if any(far(a, b) for a, b in zip(self.states, other.states, strict=True)):
            found.append("the optimizer's state")
        if any(far(a, b) for a, b in zip(self.buffers, other.buffers, strict=True)) or any(
                far(a, b) for a, b in zip(self.threaded, other.threaded, strict=True)):
            found.append("the running state")
        if self.outputs.keys() != other.outputs.keys() or any(
                far(v, other.outputs[k]) for k, v in self.outputs.items()):
            found.append("the outputs")
        if not torch.equal(self.rng["torch"], other.rng["torch"]):
            found.append("the random stream")
        return found


class TrainingStep:
    """The compiled training steps of one objective with one optimizer (a
    :class:`torch.optim.Optimizer`, or SVI's :class:`pyro.optim.PyroOptim`), one
    :class:`TrainingGraph` per call signature of the loss step.

    :param compiled: the objective's :class:`~pyro_wakesleep.compiled.CompiledStep`.
    :param source: the optimizer.
    :param bool grads: whether a replay leaves the gradients in ``.grad`` (the module
        route's ``backward`` does; ``SVI`` zeroes them after its step).
    """

    def __init__(self, compiled: Any, source: Any, grads: bool) -> None:
        self.compiled, self.source, self.grads = compiled, source, grads
        self.graphs: dict[Any, TrainingGraph] = {}
        self._refused: set[Any] = set()
        self._zero: dict[int, tuple[Tensor, int]] = {}  # .grad known to be zero (SVI)

    def _no_gradient_left(self, params: list[Tensor]) -> bool:
        """Whether no parameter holds a non-zero ``.grad`` (SVI's eager step would add
        it to the step's gradient): ``None``, or a tensor seen zero and not written
        since (its version counter), or checked now."""
        for p in params:
            grad = p.grad
            if grad is None:
                continue
            known = self._zero.get(id(p))
            if known is not None and known[0] is grad and known[1] == grad._version:
                continue
            if grad.any():
                return False
            self._zero[id(p)] = (grad, grad._version)
        return True

    def __call__(self, model: Callable, guide: Callable, args: tuple, kwargs: dict,
                 eager: Step) -> Tensor | None:
        """One training step: replayed where it can be, else ``None`` (the caller runs
        its ordinary step: the loss step, compiled or not, and the optimizer eagerly).
        ``eager()`` is the fully eager training step, the reference of verification."""
        compiled = self.compiled
        if not plain_stack() or compiled._distributed_state():
            return None
        keys = compiled._key(model, guide, args, kwargs)
        if keys is None or keys[1] is None or keys[1] in self._refused:
            return None
        key, signature = keys[1], keys[2]
        loss = compiled.graphs.get(key)
        store = pyro.get_param_store()._params
        if loss is None or any(name not in store for name in loss.params) or \
                [store[name].shape for name in loss.params] != loss.shapes:
            self.graphs.pop(key, None)  # the loss step learns (or refuses) it again
            return None
        params = [store[name] for name in loss.params]
        graph = self.graphs.get(key)
        try:
            if graph is None or graph.loss is not loss:
                graph = self.graphs[key] = record_forward(
                    loss, params, signature.inputs, self._buffers(loss),
                    loss.threaded_tensors(), compiled.options["compile"])
            trained = [params[i] for i in graph.trained]
            binding = bind(self.source, trained)
            if isinstance(binding, str):
                if binding in NOT_YET:
                    return None  # the eager optimizer creates its state first
                raise Refused(f"the optimizer's update is not compiled: {binding}")
            if not self.grads and not self._no_gradient_left(trained):
                return None
            if graph.key != binding.key:
                grads = [torch.zeros_like(p) for p in trained]
                graph.update = record_update(binding, trained, grads,
                                             compiled.options["compile"])
                graph.key = binding.key
        except Refused as refusal:
            self._refused.add(key)
            self.graphs.pop(key, None)
            warnings.warn(
                f"{type(compiled.objective).__name__}(jit=True): {refusal}; the training "
                "step of this call signature runs its optimizer eagerly (exact; the loss "
                "step stays compiled)", RuntimeWarning, stacklevel=5)
            return None
        graph.replays += 1
        loss.replays += 1  # one count per signature: the schedule goes on from the loss step's
        if verifies(compiled.options["verify"], loss.replays):
            return self._verify(key, graph, params, binding, signature, eager)
        return self._replay(graph, params, binding, signature)

    @staticmethod
    def _buffers(graph: Graph) -> list[Tensor]:
        return [cast(Tensor, module._buffers[name]) for module, name in graph.slots]

    def _replay(self, graph: TrainingGraph, params: list[Tensor], binding: Binding,
                signature: ArgSignature) -> Tensor | None:
        """One replay; ``None`` (nothing changed) if its checks fail."""
        loss = graph.loss
        rng = generator_states()
        try:
            with torch.no_grad():
                out = graph.forward(*params, *signature.inputs, *self._buffers(loss),
                                    *loss.threaded_tensors())
            ok = math.isfinite(out[1].item())
        except Exception:
            ok = False
        if not ok:
            restore_generators(rng)  # the eager step runs from here and raises its error
            return None
        trained = [params[i] for i in graph.trained]
        n, m = len(loss.slots), len(loss.outputs)
        grads = out[2 + n + m:]
        with torch.no_grad():
            cast(Callable[..., Any], graph.update)(
                *trained, *grads, *binding.states(trained), binding.scalars(trained))
        for (module, name), value in zip(loss.slots, out[2:2 + n], strict=True):
            module._buffers[name] = value
        self.compiled.objective._set_outputs(dict(zip(loss.outputs, out[2 + n:2 + n + m],
                                                      strict=True)))
        if self.grads:
            for p, g in zip(trained, grads, strict=True):
                p.grad = g
        return cast(Tensor, out[0])

    def _verify(self, key: Any, graph: TrainingGraph, params: list[Tensor],
                binding: Binding, signature: ArgSignature, eager: Step) -> Tensor | None:
        """A replay checked against the eager step run from the same state."""
        objective, loss_graph = self.compiled.objective, graph.loss
        trained = [params[i] for i in graph.trained]
        states = binding.states(trained)
        before = _Snapshot(objective, loss_graph, params, states)
        value = eager()
        after = _Snapshot(objective, loss_graph, params, states)
        before.restore(objective, loss_graph, params, states)
        tolerance = 1e-4 if self.compiled.options["compile"] else EXACT
        replayed = self._replay(graph, params, binding, signature)
        if replayed is None:
            before.restore(objective, loss_graph, params, states)
            return None
        mine = _Snapshot(objective, loss_graph, params, states)
        found = mine.compare(after, loss_graph.params, tolerance)
        if differ(replayed, value, tolerance):
            found.insert(0, f"the loss ({float(replayed):.6g} replayed, "
                             f"{float(value):.6g} eager)")
        if not found:
            return replayed
        after.restore(objective, loss_graph, params, states)
        self._refused.add(key)
        self.graphs.pop(key, None)
        self.compiled.graphs.pop(key, None)
        self.compiled._refused[key] = "verification"
        warnings.warn(
            f"{type(objective).__name__}(jit=True): replay {loss_graph.replays} of the recorded "
            f"training step differs from the eager step in {', '.join(found)}: the step "
            "depends on something outside its arguments, parameters and optimizer state "
            "(e.g. a global the model reads, changed since recording); this call signature "
            "runs eagerly from now on", RuntimeWarning, stacklevel=5)
        return value.detach()

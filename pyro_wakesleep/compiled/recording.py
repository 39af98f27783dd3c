"""Recording a step as a graph (:func:`record`), and what a graph is (:class:`Graph`).

The step is recorded on real tensors by
:func:`~pyro_wakesleep.compiled.below_autograd.record_below_autograd` (with grad-mode
switches, so that ``torch.no_grad`` regions and ``detach`` replay as they ran), under
the checks of :mod:`pyro_wakesleep.compiled.checks`. A recording,
refused or not, changes nothing: the random state, the control-variate buffers, every
tensor the step wrote in place, the objective's attributes and outputs and the param
store are put back, and parameters are read out of sight of ``SVI``'s parameter capture.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, cast

import pyro
import torch
from pyro.util import get_rng_state, set_rng_state
from torch import Tensor, fx, nn

from pyro_wakesleep import _validation
from pyro_wakesleep.compiled.below_autograd import CompiledGraph, record_below_autograd
from pyro_wakesleep.compiled.checks import (
    INPUT,
    SCALAR,
    Guard,
    Refused,
    ScalarRead,
    Writes,
    read_refuser,
)
from pyro_wakesleep.compiled.signature import ArgSignature
from pyro_wakesleep.compiled.simplify import simplify
from pyro_wakesleep.dataflow import Dataflow

__all__ = ["Graph", "record", "slots"]

Slot = tuple[nn.Module, str]


class Graph:
    """One recorded step: ``fn(*params, *arguments, *buffers, *threaded)`` returns
    ``(loss, surrogate, *new buffers, *outputs, check)``, where ``check`` is finite if
    and only if every log-density was and every validation check passed.

    :ivar list params: names of its parameters in Pyro's param store.
    :ivar list slots: the control-variate buffers ``(module, name)``, replaced by their
        new values after a replay.
    :ivar list threaded: tensors from outside the step that it writes in place (module
        buffers such as ``BatchNorm``'s statistics, as ``(module, name)`` where the
        module is known, else the tensor itself).
    :ivar module: the recorded graph itself (``fn`` is it, or its
        :class:`~pyro_wakesleep.compiled.below_autograd.CompiledGraph`),
        which a training step records its gradients and update around
        (:mod:`pyro_wakesleep.compiled.training`).
    """

    def __init__(self, fn: Callable[..., Any], params: list[str], shapes: list[torch.Size],
                 slots: list[Slot], threaded: list[Slot | Tensor], outputs: list[str],
                 module: fx.GraphModule | None = None) -> None:
        self.fn, self.params, self.shapes, self.module = fn, params, shapes, module
        self.slots, self.threaded, self.outputs = slots, threaded, outputs
        #: how many times it has been replayed
        self.replays = 0

    def threaded_tensors(self) -> list[Tensor]:
        """The tensors of :attr:`threaded` now (a module's current buffer)."""
        return [cast(Tensor, t[0]._buffers[t[1]]) if isinstance(t, tuple) else t
                for t in self.threaded]


def slots(objective: Any) -> list[Slot]:
    """Every control-variate buffer, as ``(module, name)``."""
    return [(module, name) for module in objective.control_variates.modules()
            for name, value in module._buffers.items() if value is not None]


def unconstrained(name: str) -> Tensor:
    """The trained tensor of parameter ``name``, read through ``pyro.param``."""
    return cast(Any, pyro.param(name)).unconstrained()


def record(objective: Any, model: Callable, guide: Callable, signature: ArgSignature,
           names: list[str], modules: list[nn.Module], compile: bool) -> Graph:
    """Records one step (see the module docstring).

    :raises Refused: if the step cannot be recorded exactly.
    :raises ScalarRead: if it reads a ``float``/``int`` argument into Python.
    """
    with pyro.poutine.block():  # out of sight of SVI's parameter capture
        params = [unconstrained(name) for name in names]
    state_slots = slots(objective)
    saved = [cast(Tensor, module._buffers[name]) for module, name in state_slots]
    saved_outputs = objective._outputs()
    saved_settings = {k: v for k, v in vars(objective).items()
                      if isinstance(v, bool | int | float | str | type(None))}
    store = pyro.get_param_store()
    known = set(store.keys())
    buffers = {(id(m), n): b for m in modules for n, b in m._buffers.items()}
    tensors = signature.inputs
    outputs: list[str] = []
    writes = Writes([*params, *tensors, *saved])
    guard = Guard()

    def step(*inputs: Tensor) -> tuple[Tensor, ...]:
        p, t = len(params), len(tensors)
        for (module, name), value in zip(state_slots, inputs[p + t:], strict=True):
            module._buffers[name] = value
        flow = Dataflow(on_read=read_refuser, random=INPUT)
        for i, value in enumerate(inputs):
            flow.stamp(value, SCALAR if i - p in signature.scalars else INPUT)
        for module in modules:
            for own in (*module._parameters.values(), *module._buffers.values()):
                if own is not None:
                    flow.stamp(own, INPUT)
        call_args, call_kwargs = signature.rebuild(inputs[p:p + t])
        with _validation.deferred() as finite, writes, guard, flow:
            loss, surrogate = objective.loss_and_surrogate(
                model, guide, call_args, call_kwargs, True
            )
        if slots(objective) != state_slots:
            raise Refused("the step created control-variate state while recording")
        extra = objective._outputs()
        outputs[:] = list(extra)
        check = torch.stack([loss.detach().sum(), surrogate.detach().sum(), *finite]).sum()
        if guard.checks:
            check = check + torch.where(torch.stack(guard.checks).all(), 0.0, math.nan)
        new = [cast(Tensor, module._buffers[name]) for module, name in state_slots]
        return (loss, surrogate, *new, *extra.values(), check)

    rng = get_rng_state()
    try:
        with pyro.poutine.block(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the eager first step showed them
            module = record_below_autograd(step, *params, *tensors, *saved,
                                           grad_mode=True, meta=True)
        if set(store.keys()) != known:
            raise Refused("the step created parameters while recording")
        threaded_slots = {(id(m), n) for m, n in state_slots}
        changed = [f"{type(m).__name__}.{n}" for m in modules for n, b in m._buffers.items()
                   if (id(m), n) not in threaded_slots and buffers.get((id(m), n)) is not b]
        if changed:
            raise Refused(f"the step replaces module buffers ({', '.join(changed)}) rather "
                          "than writing them in place")
    except (Refused, ScalarRead):
        raise
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise Refused(f"the step could not be recorded ({type(error).__name__}: "
                      f"{message})") from error
    finally:
        set_rng_state(rng)
        for (owner, name), value in zip(state_slots, saved, strict=True):
            owner._buffers[name] = value
        writes.restore()
        for m in modules:
            for n in list(m._buffers):
                if (id(m), n) in buffers:
                    m._buffers[n] = buffers[(id(m), n)]
        objective._set_outputs(saved_outputs)
        vars(objective).update(saved_settings)
        for name in set(store.keys()) - known:
            del store[name]
    threaded = _thread(module, writes, modules)
    simplify(module.graph)
    module.recompile()
    fn: Callable[..., Any] = module
    if compile:
        fn = CompiledGraph(module)
    return Graph(fn, names, [p.shape for p in params], state_slots, threaded, outputs, module)


def _thread(module: fx.GraphModule, writes: Writes, modules: list[nn.Module]
            ) -> list[Slot | Tensor]:
    """Turns the constants the step writes in place into graph inputs (after the
    others), returning what to pass for them."""
    graph = module.graph
    written = dict(writes.written)
    owners = {id(b): (m, n) for m in modules for n, b in m._buffers.items() if b is not None}
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    threaded: list[Slot | Tensor] = []
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        value = getattr(module, cast(str, node.target), None)
        if not isinstance(value, Tensor) or id(value) not in written:
            continue
        del written[id(value)]
        with graph.inserting_after(last):
            last = graph.placeholder(f"threaded_{len(threaded)}")
        last.meta = dict(node.meta)
        node.replace_all_uses_with(last)
        graph.erase_node(node)
        threaded.append(owners.get(id(value), value))
    if written:
        raise Refused(f"the step writes in place to {len(written)} tensor(s) from outside "
                      "it that the recorded graph does not see")
    return threaded

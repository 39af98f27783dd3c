"""Verification of a replay against the eager step (``jit_options["verify"]``).

What no check at recording can see (a closure over a global that changes, a tensor read
from outside the arguments and changed, Python-side randomness) makes a graph replay a
step that is no longer the eager one. At the replays the ``verify`` option names
(1, 2, 4, 8, ... by default) the eager step runs as well, from the same random state and
the same running state; its loss, gradients, running state, outputs and the random
state after the step are compared with the replay's. On a mismatch the eager step's
results are the step's, and the caller warns and stays eager for the signature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pyro
import torch
from pyro.util import get_rng_state, set_rng_state
from torch import Tensor

from pyro_wakesleep.compiled.recording import Graph, unconstrained

__all__ = ["EXACT", "State", "differ", "verify"]

#: the tolerance of a verification without inductor (the replay is bit for bit on the CPU)
EXACT = 1e-5


def generator_states() -> tuple[Tensor, list[Tensor] | None]:
    """The state of PyTorch's default generators (the CPU's, and every CUDA device's once
    CUDA is initialized): all that a graph replay draws from. Cheaper than
    :func:`pyro.util.get_rng_state`, which also copies Python's and NumPy's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def restore_generators(states: tuple[Tensor, list[Tensor] | None]) -> None:
    """Puts back what :func:`generator_states` took."""
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state_all(states[1])


class State:
    """The running state a step changes: the random state, control-variate buffers
    (replaced), threaded tensors (written in place; copied) and the objective's outputs."""

    def __init__(self, objective: Any, graph: Graph) -> None:
        self.rng = get_rng_state()
        self.buffers = [module._buffers[name] for module, name in graph.slots]
        self.threaded = [t.detach().clone() for t in graph.threaded_tensors()]
        self.outputs = objective._outputs()

    def restore(self, objective: Any, graph: Graph) -> None:
        set_rng_state(self.rng)
        for (module, name), value in zip(graph.slots, self.buffers, strict=True):
            module._buffers[name] = value
        with torch.no_grad():
            for tensor, value in zip(graph.threaded_tensors(), self.threaded, strict=True):
                tensor.copy_(value)
        objective._set_outputs(self.outputs)


def _gradients(surrogate: Tensor, named: dict[str, Tensor]) -> dict[str, Tensor]:
    if not surrogate.requires_grad or not named:
        return {}
    grads = torch.autograd.grad(surrogate, list(named.values()), retain_graph=True,
                                allow_unused=True)
    return {n: g for n, g in zip(named, grads, strict=True) if g is not None}


def differ(a: Tensor, b: Tensor, tolerance: float) -> bool:
    """Whether ``a`` and ``b`` differ by more than float rounding: element by element
    (``rtol=tolerance``); above the eager tolerance (inductor, which reorders sums), by
    the norm of the difference relative to the norm of ``b``, since an element of a
    gradient that sums terms which nearly cancel carries the rounding of the terms."""
    if a.shape != b.shape:
        return True
    a, b = a.detach().double(), b.detach().double()
    if tolerance > EXACT:
        diff = torch.linalg.vector_norm(torch.nan_to_num(a - b, nan=0.0))
        nans = torch.isnan(a) != torch.isnan(b)
        return bool(nans.any()) or float(diff) > tolerance * float(
            torch.linalg.vector_norm(torch.nan_to_num(b, nan=0.0))) + tolerance * 1e-1
    return not torch.allclose(a, b, rtol=tolerance, atol=tolerance * 1e-1, equal_nan=True)


def verify(objective: Any, graph: Graph, replay: Callable[[], tuple[Tensor, ...] | None],
           eager: Callable[[], tuple[Tensor, Tensor]], tolerance: float
           ) -> tuple[tuple[Tensor, ...] | None, tuple[Tensor, Tensor] | None, list[str]]:
    """Runs the eager step, then (from the same state) ``replay()``, and compares them.

    :returns: ``(replay outputs, None, [])`` if they agree (the replay's state is left),
        ``(None, eager result, what differed)`` if not (the eager step's state is left),
        or ``(None, None, [])`` if the replay failed (the state before the step is left).
    """
    before = State(objective, graph)
    with pyro.poutine.trace(param_only=True) as capture:
        value, surrogate = eager()
    eager_params = {name: cast(Tensor, cast(Any, site["value"]).unconstrained())
                    for name, site in capture.trace.nodes.items() if site["type"] == "param"}
    eager_grads = _gradients(surrogate, eager_params)
    after = State(objective, graph)
    before.restore(objective, graph)
    out = replay()
    if out is None:
        before.restore(objective, graph)
        return None, None, []
    n, m = len(graph.slots), len(graph.outputs)
    with pyro.poutine.block():
        params = {name: unconstrained(name) for name in graph.params}
    graph_grads = _gradients(out[1], params)
    found = []
    if differ(out[0], value, tolerance):
        found.append(f"the loss ({float(out[0]):.6g} replayed, {float(value):.6g} eager)")
    if set(eager_params) != set(graph.params):
        found.append(f"the parameters ({sorted(set(eager_params) ^ set(graph.params))} "
                      "used by one of them only)")
    for name in sorted(set(eager_grads) | set(graph_grads)):
        a, b = graph_grads.get(name), eager_grads.get(name)
        if a is None and b is not None:
            a = torch.zeros_like(b)
        if b is None and a is not None:
            b = torch.zeros_like(a)
        if a is not None and b is not None and differ(a, b, tolerance):
            found.append(f"the gradient of '{name}'")
    for (module, name), new, old in zip(graph.slots, out[2:2 + n], after.buffers, strict=True):
        if old is None or differ(new, old, tolerance):
            found.append(f"the state {type(module).__name__}.{name}")
    for i, (tensor, old) in enumerate(zip(graph.threaded_tensors(), after.threaded,
                                          strict=True)):
        if differ(tensor, old, tolerance):
            slot = graph.threaded[i]
            what = f"{type(slot[0]).__name__}.{slot[1]}" if isinstance(slot, tuple) \
                else "a tensor written in place"
            found.append(f"the state {what}")
    for name, new in zip(graph.outputs, out[2 + n:2 + n + m], strict=True):
        if name not in after.outputs or differ(new, after.outputs[name], tolerance):
            found.append(f"the output '{name}'")
    if not torch.equal(torch.get_rng_state(), after.rng["torch"]):
        found.append("the random stream (a different number of draws)")
    if not found:
        return out, None, []
    after.restore(objective, graph)
    return None, (value, surrogate), found

"""The compiled training step of one objective (:class:`CompiledStep`): the dispatch
between the eager step, recording, replay and verification, one graph per signature.

The rule it keeps: a replay gives the eager step's loss, every gradient, every state
update and the same random streams, or the step runs eagerly, with one
:class:`RuntimeWarning` per signature that names the cause and the user's line or site.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import pyro
import pyro.poutine.runtime as runtime
import torch
from torch import Tensor, nn

from pyro_wakesleep.compiled.checks import Refused, ScalarRead
from pyro_wakesleep.compiled.options import verifies
from pyro_wakesleep.compiled.recording import Graph, record, unconstrained
from pyro_wakesleep.compiled.signature import (
    ArgSignature,
    arguments,
    identity,
    modules_run,
    owned_modules,
    plain_stack,
    settings,
)
from pyro_wakesleep.compiled.training import TrainingStep
from pyro_wakesleep.compiled.verification import (
    EXACT,
    generator_states,
    restore_generators,
    verify,
)

__all__ = ["CompiledStep", "Steppable"]

Eager = Callable[[], tuple[Tensor, Tensor]]


class Steppable(Protocol):
    """What a compiled step needs of an objective (an
    :class:`~pyro_wakesleep.objectives.Objective` is one): its step, its control variates
    and its extra outputs."""

    @property
    def control_variates(self) -> nn.Module: ...

    def loss_and_surrogate(self, model: Callable, guide: Callable, args: tuple,
                           kwargs: dict, update: bool) -> tuple[Tensor, Tensor]: ...

    def _outputs(self) -> dict[str, Tensor]: ...

    def _set_outputs(self, outputs: dict[str, Tensor]) -> None: ...


class _Base:
    """What the eager first step of a call-structure learned: the modules it runs."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.by_value = False  # float/int arguments keyed by value (they are read)


class CompiledStep:
    """The compiled training step of one objective: one graph per call signature.

    :param objective: the objective.
    :param dict options: the checked ``jit_options``
        (:func:`~pyro_wakesleep.compiled.check_jit_options`).
    """

    def __init__(self, objective: Steppable, options: dict[str, Any]) -> None:
        self.objective = objective
        self.options = options
        #: the recorded graphs, by call signature
        self.graphs: dict[Any, Graph] = {}
        self._bases: dict[Any, _Base] = {}
        self._warm: dict[Any, list[str]] = {}  # signature -> param names of its eager step
        self._refused: dict[Any, str] = {}
        self._training: dict[int, TrainingStep] = {}

    def training(self, source: Any, grads: bool) -> TrainingStep:
        """The compiled training step (loss, gradients and update) with the optimizer
        ``source`` (a :class:`torch.optim.Optimizer` or SVI's
        :class:`pyro.optim.PyroOptim`); ``grads``: whether it leaves the gradients in
        ``.grad``."""
        step = self._training.get(id(source))
        if step is None or step.source is not source:
            step = self._training[id(source)] = TrainingStep(self, source, grads)
        return step

    # -- signatures ----------------------------------------------------------------------
    def _key(self, model: Callable, guide: Callable, args: tuple, kwargs: dict
             ) -> tuple[Any, Any, ArgSignature] | None:
        """``(base key, full key, arguments)``; the full key is ``None`` before the first
        eager step of the base; ``None`` if an argument is unhashable."""
        signature = arguments(args, kwargs)
        if signature.key is None:
            return None
        base_key = (identity(model), identity(guide), signature.key)
        base = self._bases.get(base_key)
        if base is None:
            return base_key, None, signature
        if base.by_value:
            signature = arguments(args, kwargs, scalars_by_value=True)
        return base_key, (base_key, signature.key, settings(self.objective, base.modules)), \
            signature

    def replays(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> bool:
        """Whether a training call with these arguments would replay a recorded graph
        (the module route then skips its parameter bookkeeping)."""
        if not self.graphs or not plain_stack() or self._distributed_state():
            return False
        keys = self._key(model, guide, args, kwargs)
        return keys is not None and keys[1] in self.graphs

    def _distributed_state(self) -> bool:
        """Control-variate statistics reduced across ranks (an all-reduce, which a graph
        does not record) keep the step eager."""
        dist = torch.distributed
        return (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
                and any(True for _ in self.objective.control_variates.buffers()))

    # -- the step ------------------------------------------------------------------------
    def __call__(self, model: Callable, guide: Callable, args: tuple, kwargs: dict,
                 eager: Eager) -> tuple[Tensor, Tensor]:
        """One training step (``update=True``, gradients on): replayed where a graph is
        recorded, else ``eager()``."""
        if not plain_stack() or self._distributed_state():
            return eager()
        keys = self._key(model, guide, args, kwargs)
        if keys is None:
            return eager()
        base_key, key, signature = keys
        graph = self.graphs.get(key)
        if graph is not None:
            result = self._replay(key, graph, signature, eager)
            if result is not None:
                return result
            key = None  # parameters gone or reshaped: learn the step again
        elif key in self._refused:
            return eager()
        if key is None or key not in self._warm:
            return self._warm_up(model, guide, args, kwargs, base_key, eager)
        try:
            if len(self.graphs) >= self.options["max_graphs"]:
                raise Refused(f"it has recorded jit_options['max_graphs'] = "
                              f"{self.options['max_graphs']} call signatures already")
            graph = self._record(key, base_key, model, guide, signature)
        except ScalarRead:  # the numbers steer Python: key them by value (no warning:
            self._bases[base_key].by_value = True  # each value compiles at its 2nd call;
            return eager()  # max_graphs warns if there are too many)
        except Refused as refusal:
            self._refused[key] = str(refusal)
            warnings.warn(
                f"{type(self.objective).__name__}(jit=True): {refusal}; this call "
                "signature runs eagerly from now on (exact, not compiled)",
                RuntimeWarning, stacklevel=5,
            )
            return eager()
        result = self._replay(key, graph, signature, eager)
        return eager() if result is None else result

    def _warm_up(self, model: Callable, guide: Callable, args: tuple, kwargs: dict,
                 base_key: Any, eager: Eager) -> tuple[Tensor, Tensor]:
        """The eager step that precedes a recording: it creates lazily built parameters
        and control variates, makes every eager check, and shows which parameters and
        modules the step uses."""
        found: dict[int, nn.Module] = {}
        with pyro.poutine.trace(param_only=True) as capture, modules_run(found):
            result = eager()
        base = self._bases.get(base_key)
        modules = {id(m): m for m in owned_modules(model, guide, self.objective)}
        modules.update(found)
        if base is None:
            base = self._bases[base_key] = _Base(list(modules.values()))
        else:
            known = {id(m) for m in base.modules}
            base.modules.extend(m for i, m in modules.items() if i not in known)
        keys = self._key(model, guide, args, kwargs)  # the settings after the step
        if keys is not None and keys[1] is not None:
            self._warm[keys[1]] = list(capture.trace.nodes)
        return result

    def _record(self, key: Any, base_key: Any, model: Callable, guide: Callable,
                signature: ArgSignature) -> Graph:
        base = self._bases[base_key]
        graph = record(self.objective, model, guide, signature, self._warm[key],
                       base.modules, self.options["compile"])
        self.graphs[key] = graph
        return graph

    def _replay(self, key: Any, graph: Graph, signature: ArgSignature, eager: Eager
                ) -> tuple[Tensor, Tensor] | None:
        """A replay (verified where the ``verify`` option says so), or ``None`` if the
        graph's parameters are gone from the param store or changed shape."""
        store = pyro.get_param_store()._params
        if any(name not in store for name in graph.params) or \
                [store[name].shape for name in graph.params] != graph.shapes:
            del self.graphs[key]  # a cleared or replaced param store: record again
            self._warm.pop(key, None)
            return None
        if runtime._PYRO_STACK:  # SVI's parameter trace must see them
            params = [unconstrained(name) for name in graph.params]
        else:
            params = [store[name] for name in graph.params]
        inputs = [*params, *signature.inputs]

        def run() -> tuple[Tensor, ...] | None:
            state = [module._buffers[name] for module, name in graph.slots]
            rng = generator_states()
            try:
                out = graph.fn(*inputs, *state, *graph.threaded_tensors())
                if math.isfinite(out[-1].item()):
                    return out
            except Exception:
                torch._C._set_grad_enabled(True)  # a graph may fail inside no_grad
            # run again eagerly from the same random state: it raises the eager error
            restore_generators(rng)  # (naming the site) or is the step
            return None

        graph.replays += 1
        if verifies(self.options["verify"], graph.replays):
            tolerance = 1e-4 if self.options["compile"] else EXACT
            out, mismatch, differ = verify(self.objective, graph, run, eager, tolerance)
            if mismatch is not None:
                del self.graphs[key]
                self._refused[key] = "verification"
                warnings.warn(
                    f"{type(self.objective).__name__}(jit=True): replay {graph.replays} "
                    f"of the recorded step differs from the eager step in "
                    f"{', '.join(differ)}: the step depends on something outside its "
                    "arguments and parameters (e.g. a global the model reads, changed "
                    "since recording); this call signature runs eagerly from now on",
                    RuntimeWarning, stacklevel=6,
                )
                return mismatch
        else:
            out = run()
        if out is None:
            return eager()
        n, m = len(graph.slots), len(graph.outputs)
        for (module, name), value in zip(graph.slots, out[2:2 + n], strict=True):
            module._buffers[name] = value.detach()
        self.objective._set_outputs(dict(zip(graph.outputs, out[2 + n:2 + n + m],
                                             strict=True)))
        return out[0], out[1]

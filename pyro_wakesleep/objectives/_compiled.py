"""The compiled path of an objective (``jit=True``): one training step recorded once as
a graph of tensor operations and replayed without Python's model, guide, effect handlers
or distribution objects, with running state threaded through it explicitly. Private to
:mod:`pyro_wakesleep.objectives`; the user-facing account is the ``jit`` keyword of
:class:`~pyro_wakesleep.objectives.Objective` and the docs page "Compiled objectives".

A step is the pure function

.. code-block:: text

    (unconstrained params, tensor arguments, control-variate buffers)
        -> (loss value, surrogate, new buffers, phase losses, finiteness sum)

recorded with :func:`torch.fx.experimental.proxy_tensor.make_fx` (real tensors,
``pre_dispatch=True``, so that ``torch.no_grad`` regions and ``detach`` are recorded)
the second time the objective sees a call signature; the first runs eagerly, creating
lazily built parameters and control variates and making every eager check. Recording
runs the step once; its random state and buffers are then restored and the graph
replays it, so the compiled step draws what the eager one would.

Recording refuses any step that reads a value out of a tensor into Python (``bool``,
``.item()``, ``.tolist()``): that is how Python control flow that depends on draws or
parameters shows itself, and a graph recorded from one run of such a program would
replay that run's structure. Such a program (and one that cannot be recorded for any
other reason) runs eagerly, with one :class:`RuntimeWarning`. Shapes are fixed in a
graph: another call signature gets a graph of its own.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import pyro
import pyro.poutine.runtime as runtime
import torch
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.util import get_rng_state, set_rng_state
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree

from pyro_wakesleep import _validation
from pyro_wakesleep.objectives._simplify import simplify

if TYPE_CHECKING:
    from pyro_wakesleep.objectives.base import Objective

#: ``jit_options`` of Pyro's ``Jit*`` objectives (keywords of ``torch.jit.trace``),
#: accepted and without effect here
PYRO_JIT_OPTIONS = frozenset(
    {"check_trace", "check_inputs", "check_tolerance", "optimize", "strict",
     "time_compilation", "_force_outplace"}
)
#: this package's own ``jit_options``, with their defaults
JIT_OPTIONS: dict[str, Any] = {"compile": False, "max_graphs": 16}


def check_jit_options(options: dict | None) -> dict[str, Any]:
    """The ``jit_options`` with defaults filled in, or ``TypeError``/``ValueError``
    naming a wrong key or value."""
    options = dict(options or {})
    unknown = set(options) - set(JIT_OPTIONS) - PYRO_JIT_OPTIONS
    if unknown:
        raise ValueError(
            f"unknown jit_options {sorted(unknown)}; known: {sorted(JIT_OPTIONS)} (and "
            f"Pyro's torch.jit.trace keywords {sorted(PYRO_JIT_OPTIONS)}, which have no effect)"
        )
    result = {key: options.get(key, default) for key, default in JIT_OPTIONS.items()}
    if not isinstance(result["compile"], bool):
        raise TypeError(f"jit_options['compile'] must be a bool, got {result['compile']!r}")
    graphs = result["max_graphs"]
    if isinstance(graphs, bool) or not isinstance(graphs, int) or graphs < 1:
        raise ValueError(f"jit_options['max_graphs'] must be an int >= 1, got {graphs!r}")
    return result


class _Refused(Exception):
    """A step that cannot be recorded exactly (the reason is the message)."""


class _Graph:
    """One recorded step and how to read its outputs."""

    def __init__(self, fn: Callable[..., Any], params: list[str], shapes: list[torch.Size],
                 slots: list[tuple[torch.nn.Module, str]], outputs: list[str]) -> None:
        self.fn, self.params, self.shapes = fn, params, shapes
        self.slots, self.outputs = slots, outputs


def _identity(fn: Callable) -> Any:
    """A hashable identity of a model or guide that is the same for every access of a
    bound method (``sbn.model`` is a new object each time)."""
    return (fn.__func__, fn.__self__) if inspect.ismethod(fn) else fn


def _signature(args: tuple, kwargs: dict) -> tuple[Any, list[Tensor]] | None:
    """The cache key of a call's arguments (tensors by shape, dtype, device and
    ``requires_grad``, anything else by value) and its tensors, or ``None`` if an
    argument is not hashable."""
    if not kwargs and all(type(a) is Tensor for a in args):  # the common case, fast
        return tuple((a.shape, a.dtype, a.device, a.requires_grad) for a in args), list(args)
    leaves, spec = _pytree.tree_flatten((args, kwargs))
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    key = tuple(
        (tuple(leaf.shape), leaf.dtype, leaf.device, leaf.requires_grad)
        if isinstance(leaf, Tensor) else leaf
        for leaf in leaves
    )
    try:
        hash(key)
    except TypeError:
        return None
    return (spec, key), tensors


def _plain_stack() -> bool:
    """Whether every Pyro handler around the call only records parameters (``SVI``'s
    and the module route's ``poutine.trace(param_only=True)``): a graph replays without
    handlers, so any other handler around the objective must see the eager step."""
    return all(isinstance(m, TraceMessenger) and m.param_only for m in runtime._PYRO_STACK)


def _unconstrained(name: str) -> Tensor:
    """The trained tensor of parameter ``name``, read through ``pyro.param`` so that
    ``SVI``'s parameter trace sees it."""
    return cast(Any, pyro.param(name)).unconstrained()


def _slots(objective: Objective) -> list[tuple[torch.nn.Module, str]]:
    """Every control-variate buffer, as ``(module, name)``."""
    return [(module, name) for module in objective.control_variates.modules()
            for name, value in module._buffers.items() if value is not None]


class _NoInnerDifferentiation(TorchFunctionMode):
    """While recording, ``torch.autograd.grad`` and ``backward`` refuse: a graph of the
    forward operations would not replay a differentiation inside the step (e.g. the
    double backward of REBAR's and RELAX's variance-minimising updates)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if func in (torch.autograd.grad, torch.autograd.backward, Tensor.backward):
            raise _Refused("the step differentiates inside itself (torch.autograd.grad or "
                           "backward, e.g. a learned control variate's variance gradient), "
                           "which a recorded graph does not replay")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _deferred_checks() -> Iterator[list[Tensor]]:
    """While recording, :func:`~pyro_wakesleep._validation.check_finite` keeps sums."""
    collected: list[Tensor] = []
    previous, _validation.DEFERRED = _validation.DEFERRED, collected
    try:
        yield collected
    finally:
        _validation.DEFERRED = previous


class CompiledStep:
    """The compiled training step of one objective: one graph per call signature.

    :param Objective objective: the objective.
    :param dict options: the checked ``jit_options`` (:func:`check_jit_options`).
    """

    def __init__(self, objective: Objective, options: dict[str, Any]) -> None:
        self.objective = objective
        self.options = options
        #: the recorded graphs, by call signature
        self.graphs: dict[Any, _Graph] = {}
        self._warm: dict[Any, list[str]] = {}  # signature -> param names of its eager step
        self._refused: dict[Any, str] = {}

    def __call__(self, model: Callable, guide: Callable, args: tuple, kwargs: dict,
                 eager: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """One training step (``update=True``, gradients on): replayed where a graph is
        recorded, else ``eager()``."""
        signature = _signature(args, kwargs)
        if signature is None or not _plain_stack() or self._distributed_state():
            return eager()
        key, tensors = (_identity(model), _identity(guide), signature[0]), signature[1]
        graph = self.graphs.get(key)
        if graph is not None:
            return self._replay(graph, tensors, eager)
        if key in self._refused:
            return eager()
        if key not in self._warm:
            with pyro.poutine.trace(param_only=True) as capture:
                result = eager()
            self._warm[key] = list(capture.trace.nodes)
            return result
        try:
            if len(self.graphs) >= self.options["max_graphs"]:
                raise _Refused(f"it has recorded jit_options['max_graphs'] = "
                               f"{self.options['max_graphs']} call signatures already")
            graph = self._record(key, model, guide, args, kwargs, tensors)
        except _Refused as refusal:
            self._refused[key] = str(refusal)
            warnings.warn(
                f"{type(self.objective).__name__}(jit=True): {refusal}; this call "
                "signature runs eagerly from now on (exact, not compiled)",
                RuntimeWarning, stacklevel=5,
            )
            return eager()
        return self._replay(graph, tensors, eager)

    def replays(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> bool:
        """Whether a training call with these arguments would replay a recorded graph
        (the module route then skips its parameter bookkeeping: a graph's parameters
        were checked when it was recorded and cannot change)."""
        signature = _signature(args, kwargs)
        return (signature is not None and bool(self.graphs) and _plain_stack()
                and (_identity(model), _identity(guide), signature[0]) in self.graphs
                and not self._distributed_state())

    def _distributed_state(self) -> bool:
        """Control-variate statistics reduced across ranks (an all-reduce, which a graph
        does not record) keep the step eager."""
        dist = torch.distributed
        return (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
                and any(True for _ in self.objective.control_variates.buffers()))

    def _replay(self, graph: _Graph, tensors: list[Tensor],
                eager: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        if runtime._PYRO_STACK:  # SVI's parameter trace must see them
            params = [_unconstrained(name) for name in graph.params]
        else:
            store = pyro.get_param_store()._params
            params = [store[name] for name in graph.params]
        if [p.shape for p in params] != graph.shapes:
            raise ValueError(
                f"{type(self.objective).__name__}(jit=True): parameters changed shape since "
                f"the step was compiled ({graph.params}); build a new objective"
            )
        rng = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        state = [module._buffers[name] for module, name in graph.slots]
        try:
            out = graph.fn(*params, *tensors, *state)
            failed = not math.isfinite(out[-1].item())
        except Exception:
            torch._C._set_grad_enabled(True)  # a graph may fail inside a no_grad region
            failed = True
        if failed:  # run again eagerly from the same random state: it raises the
            torch.set_rng_state(rng)  # eager error (naming the site) or is the step
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            return eager()
        n, m = len(graph.slots), len(graph.outputs)
        for (module, name), value in zip(graph.slots, out[2:2 + n], strict=True):
            module._buffers[name] = value.detach()
        self.objective._set_outputs(dict(zip(graph.outputs, out[2 + n:2 + n + m], strict=True)))
        return out[0], out[1]

    def _record(self, key: Any, model: Callable, guide: Callable, args: tuple,
                kwargs: dict, tensors: list[Tensor]) -> _Graph:
        objective = self.objective
        names = self._warm[key]
        params = [_unconstrained(name) for name in names]
        slots = _slots(objective)
        saved = [module._buffers[name] for module, name in slots]
        saved_outputs = objective._outputs()
        leaves, spec = _pytree.tree_flatten((args, kwargs))
        positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
        outputs: list[str] = []

        def step(*inputs: Tensor) -> tuple[Tensor, ...]:
            p, t = len(params), len(tensors)
            for (module, name), value in zip(slots, inputs[p + t:], strict=True):
                module._buffers[name] = value
            new_leaves = list(leaves)
            for i, value in zip(positions, inputs[p:p + t], strict=True):
                new_leaves[i] = value
            call_args, call_kwargs = _pytree.tree_unflatten(new_leaves, spec)
            with _deferred_checks() as checks:
                loss, surrogate = objective.loss_and_surrogate(
                    model, guide, call_args, call_kwargs, True
                )
            if _slots(objective) != slots:
                raise _Refused("the step created control-variate state while recording")
            extra = objective._outputs()
            outputs[:] = list(extra)
            finite = torch.stack([loss.detach().sum(), surrogate.detach().sum(), *checks]).sum()
            buffers = [cast(Tensor, module._buffers[name]) for module, name in slots]
            return (loss, surrogate, *buffers,
                    *extra.values(), finite)

        rng = get_rng_state()
        try:
            with pyro.validation_enabled(False), pyro.poutine.block(), \
                    _NoInnerDifferentiation(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the eager first step showed them
                module = make_fx(step, tracing_mode="real", pre_dispatch=True)(
                    *params, *tensors, *saved
                )
        except _Refused:
            raise
        except Exception as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            if "value out of a tracing tensor" in message or "data-dependent" in message:
                raise _Refused(
                    "the program reads a value out of a tensor into Python while it runs "
                    "(e.g. stochastic control flow such as `while pyro.sample(...) == 1`, "
                    "or .item()), so one recorded run would replay its structure"
                ) from error
            raise _Refused(f"the step could not be recorded ({type(error).__name__}: "
                           f"{message})") from error
        finally:
            set_rng_state(rng)
            for (owner, name), value in zip(slots, saved, strict=True):
                owner._buffers[name] = value
            objective._set_outputs(saved_outputs)
        simplify(module.graph)
        module.recompile()
        fn: Callable[..., Any] = module
        if self.options["compile"]:
            fn = torch.compile(module, dynamic=False, options={"fallback_random": True})
        graph = _Graph(fn, names, [p.shape for p in params], slots, outputs)
        self.graphs[key] = graph
        return graph

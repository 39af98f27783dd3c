"""Where the values of a run come from: provenance of tensors, and reads into Python.

Part of the trace layer (with :mod:`pyro_wakesleep.traces` and
:mod:`pyro_wakesleep.particles`). While a :class:`Dataflow` is active, every torch
operation passes through it (a :class:`~torch.overrides.TorchFunctionMode`), and it keeps
two records, both by mechanism rather than by a list of the ways a program can do it:

* **Provenance.** A tensor can be *stamped* with a set of labels (a bitset, a Python
  ``int``); every operation's tensor outputs carry the union of the labels of its tensor
  inputs (including ``detach``, ``no_grad`` regions and sampling ops, so a draw from a
  distribution whose parameters were computed from a label carries it too). Random ops
  (aten ops tagged ``nondeterministic_seeded``) may add labels of their own (``random``).
* **Reads.** An operation that turns tensor *data* into a Python value (``bool``,
  ``item``, ``int``/``float``/``__index__``, ``tolist``, ``numpy``/``__array__``,
  ``torch.equal``, ``in``, formatting...) is recognised by its result: a Python number,
  string, list or NumPy array from a function that is not a metadata query (``dim``,
  ``size``, ``shape``, ``dtype``...). An op whose output *shape* depends on data (aten
  ops tagged ``dynamic_output_shape``: ``nonzero``, boolean-mask indexing,
  ``unique``...) counts as a read too, since the shape can steer Python later. Each read
  is a :class:`Read` with the labels of what was read and the user's line that read it.
  Reads that only guard an error or a warning (the argument and support checks of
  :class:`torch.distributions.Distribution` under validation, Pyro's NaN warnings on
  log-densities) change no control flow when they pass, and are not recorded.

The learning-signal engine (:mod:`pyro_wakesleep.downstream`) labels each guide draw
with a bit of its own (:class:`TrackDraws`): a cost term then depends on the draws in its
provenance, and on those read into Python before its site ran (control). The compiled
path labels its inputs and refuses to record a step that reads a labelled value.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import pyro.poutine.runtime as runtime
import torch
from pyro.poutine.indep_messenger import IndepMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Dataflow", "Read", "TrackDraws", "Writes", "call_site", "sequential_frames"]

_ATTR = "_pyro_wakesleep_provenance"
_KEYS = itertools.count(1)
_ACTIVE: set[int] = set()  # the keys of the flows entered and not yet left
_KINDS: dict[Any, int] = {}  # torch function -> how the mode treats it (see Dataflow._kind)
_PLAIN = 0
_METADATA = 1
_READ = 2
_DYNAMIC = 3
_RANDOM = 4
_INPLACE = 5
_PAIRWISE = 6
#: in-place operators that do not end with ``_``
_INPLACE_DUNDERS = frozenset({
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
    "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
    "__imatmul__",
})
#: ops whose i-th output is computed from the i-th input alone
_PAIRWISE_NAMES = frozenset({"broadcast_tensors", "atleast_1d", "atleast_2d", "atleast_3d"})

#: functions whose non-tensor result describes a tensor's metadata, not its data
_METADATA_NAMES = frozenset({
    "__get__", "__len__", "__hash__", "dim", "ndimension", "size", "numel", "nelement",
    "stride", "storage_offset", "element_size", "get_device", "data_ptr", "is_contiguous",
    "is_floating_point", "is_complex", "is_signed", "is_inference", "is_pinned",
    "is_shared", "is_set_to", "is_nonzero_shape", "has_names", "is_conj", "is_neg",
    "_is_view", "is_nested", "untyped_storage", "storage", "__reduce_ex__", "__deepcopy__",
    "__setstate__", "__getstate__", "_typed_storage", "type", "__dlpack_device__",
    "is_same_size", "__iter__", "unbind", "split", "chunk", "tensor_split", "broadcast_shapes",
    "_has_compatible_shallow_copy_type", "__instancecheck__", "dtype", "device",
})
_HOLDERS = (torch.distributions.Distribution, torch.distributions.transforms.Transform)
_SEQ = (list, tuple)
_TENSOR_OR_SEQ = (Tensor, list, tuple)
_MASK_DTYPES = (torch.bool, torch.uint8)
_READ_TYPES = (bool, int, float, complex, str, list, np.ndarray, np.generic)


@functools.cache
def _aten_names(tag: torch.Tag) -> frozenset[str]:
    """Names of the aten ops that carry ``tag`` (``torch.Tag``), without overload."""
    names = set()
    for name in dir(torch.ops.aten):
        packet = getattr(torch.ops.aten, name, None)
        overloads = getattr(packet, "overloads", None)
        if overloads is None:
            continue
        for overload in overloads():
            if tag in getattr(packet, overload).tags:
                names.add(name.lstrip("_"))
    return frozenset(names)


def _has_mask(args: tuple) -> bool:
    """Whether an indexing call's index holds a boolean tensor."""
    if len(args) < 2:
        return False
    index = args[1]
    if type(index) is tuple or type(index) is list:
        for item in index:  # noqa: SIM110 (a loop, not any(): runs at every indexing call)
            if isinstance(item, Tensor) and item.dtype in _MASK_DTYPES:
                return True
        return False
    return isinstance(index, Tensor) and index.dtype in _MASK_DTYPES


class Read(NamedTuple):
    """A read of tensor data into Python (or an op whose output shape depends on data).

    :param str what: the function, e.g. ``"Tensor.item"`` or ``"Tensor.__bool__"``.
    :param int provenance: the union of the labels of the tensors read.
    :param str where: ``file:line in function`` of the innermost frame outside torch,
        Pyro and this package (the user's line), or of the caller if there is none.
    """

    what: str
    provenance: int
    where: str


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    import pyro

    import pyro_wakesleep

    return tuple(os.path.dirname(m.__file__ or "") + os.sep for m in (torch, pyro, pyro_wakesleep))


@functools.cache
def _guard_codes() -> frozenset[Any]:
    """Code objects whose reads only guard an error or a warning: distribution
    validation, and Pyro's NaN/infinity warnings on log-densities."""
    import pyro.util

    dist = torch.distributions.Distribution
    return frozenset({dist.__init__.__code__, dist._validate_sample.__code__,
                      pyro.util.warn_if_nan.__code__, pyro.util.warn_if_inf.__code__})


def _guarded(depth: int = 8) -> bool:
    """Whether the current read is made by a validation guard (within ``depth`` frames
    of the mode)."""
    guards = _guard_codes()
    frame: Any = sys._getframe(3)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code in guards:
            return True
        frame = frame.f_back
    return False


def call_site() -> tuple[str, bool]:
    """Where the torch call being handled now comes from: the user's
    ``file:line in function`` (innermost frame outside torch, Pyro and this package), and
    whether a validation guard (distribution argument and support checks, Pyro's NaN
    warnings) is on the stack."""
    guards = _guard_codes()
    frame: Any = sys._getframe(1)
    guarded = False
    while frame is not None:
        if frame.f_code in guards:
            guarded = True
            break
        frame = frame.f_back
    return _user_line(), guarded


def _user_line() -> str:
    """``file:line in function`` of the innermost frame outside torch, Pyro and this
    package (else the innermost one outside torch)."""
    libraries = _library_dirs()
    frame: Any = sys._getframe(3)
    first: str | None = None
    while frame is not None:
        code = frame.f_code
        filename = code.co_filename
        if not filename.startswith(libraries[0]):
            here = f"{filename}:{frame.f_lineno} in {code.co_name}"
            if first is None:
                first = here
            if not filename.startswith(libraries):
                return here
        frame = frame.f_back
    return first or "<unknown>"


def sequential_frames() -> tuple[tuple[str, int], ...]:
    """The ``(name, counter)`` of the sequential (iterated) plates active now, outermost
    first, as Pyro puts them into a site's ``cond_indep_stack``."""
    return tuple(
        (m.name, m.counter) for m in runtime._PYRO_STACK
        if isinstance(m, IndepMessenger) and m._vectorized is False
    )


class Dataflow(TorchFunctionMode):
    """Tracks provenance labels through torch operations and records reads of tensor data
    into Python (see the module docstring).

    :param callable on_read: called with each :class:`Read` as it happens (it may raise
        to stop the program, as the compiled path does); the reads are also kept in
        :attr:`reads`.
    :param int random: labels that the outputs of random ops receive (default none).
    """

    def __init__(self, *, on_read: Callable[[Read], None] | None = None, random: int = 0,
                 ) -> None:
        super().__init__()
        self.key = next(_KEYS)
        self.on_read = on_read
        self.random = random
        #: every read made so far, in order
        self.reads: list[Read] = []
        # control: labels read so far, globally and per sequential plate iteration
        self._control = 0
        self._by_iteration: dict[tuple[str, int], int] = {}
        self._by_plate: dict[str, int] = {}

    # -- provenance ----------------------------------------------------------------------
    def provenance(self, value: Any) -> int:
        """The labels of a tensor in this flow (0 for anything else). Flows may nest: a
        tensor keeps each active flow's labels apart."""
        marks = getattr(value, _ATTR, None)
        return marks.get(self.key, 0) if marks is not None else 0

    def held(self, obj: Any) -> int:
        """The labels of every tensor that ``obj`` holds: itself if a tensor; the items of
        a list, tuple or dict; the attributes of a distribution or a transform, and of the
        distributions and transforms those hold (a distribution's ``log_prob`` is computed
        from its value and these)."""
        labels, todo, seen = 0, [obj], set()
        while todo:
            item = todo.pop()
            if isinstance(item, Tensor):
                labels |= self.provenance(item)
            elif id(item) in seen:
                continue
            elif isinstance(item, list | tuple):
                seen.add(id(item))
                todo.extend(item)
            elif isinstance(item, dict):
                seen.add(id(item))
                todo.extend(item.values())
            elif isinstance(item, _HOLDERS):
                seen.add(id(item))
                todo.extend(vars(item).values())
        return labels

    def stamp(self, value: Tensor, labels: int) -> None:
        """Adds ``labels`` to a tensor's provenance (forgetting the labels of flows that
        have ended, so a tensor that lives on keeps no history)."""
        if not labels:
            return
        marks = getattr(value, _ATTR, None)
        if marks is None:
            setattr(value, _ATTR, {self.key: labels})
            return
        if len(marks) > 1 or self.key not in marks:
            for key in [k for k in marks if k not in _ACTIVE]:
                del marks[key]
        marks[self.key] = marks.get(self.key, 0) | labels

    def __enter__(self) -> Dataflow:
        _ACTIVE.add(self.key)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.discard(self.key)
        super().__exit__(*exc)

    def _gather(self, args: tuple, kwargs: Mapping[str, Any]) -> int:
        labels = 0
        for group in (args, kwargs.values()):
            for arg in group:
                if isinstance(arg, Tensor):
                    labels |= self.provenance(arg)
                elif isinstance(arg, _SEQ):
                    for item in arg:
                        labels |= self.provenance(item)
        return labels

    def _stamp_outputs(self, result: Any, labels: int, inputs: tuple) -> None:
        """Adds ``labels`` to every tensor in ``result`` that is not one of ``inputs``
        (an op that returns an input unchanged, such as ``x.to(x.dtype)``, does not
        make it depend on the other inputs)."""
        if isinstance(result, Tensor):
            if not any(result is i for i in inputs):
                self.stamp(result, labels)
        elif isinstance(result, list | tuple):
            for item in result:
                if isinstance(item, Tensor) and not any(item is i for i in inputs):
                    self.stamp(item, labels)

    # -- control -------------------------------------------------------------------------
    def control(self, frames: tuple[tuple[str, int], ...] = ()) -> int:
        """The labels read into Python so far that a site in the sequential plate
        iterations ``frames`` can depend on: every read, except those made inside
        *another* iteration of a sequential plate the site is in (Pyro's conditional
        independence of its iterations). A read inside nested sequential plates counts
        for its whole outermost iteration."""
        labels = self._control
        inside = dict(frames)
        for plate, plate_labels in self._by_plate.items():
            if plate not in inside:
                labels |= plate_labels
            else:
                labels |= self._by_iteration.get((plate, inside[plate]), 0)
        return labels

    def clear_control(self) -> None:
        """Forgets the reads so far for :meth:`control` (a new program starts)."""
        self._control = 0
        self._by_iteration.clear()
        self._by_plate.clear()

    def _record(self, func: Any, labels: int) -> None:
        if _guarded():
            return
        read = Read(self._name(func), labels, _user_line())
        self.reads.append(read)
        if labels:
            frames = sequential_frames()
            if frames:
                outer = frames[0]
                self._by_iteration[outer] = self._by_iteration.get(outer, 0) | labels
                self._by_plate[outer[0]] = self._by_plate.get(outer[0], 0) | labels
            else:
                self._control |= labels
        if self.on_read is not None:
            self.on_read(read)

    # -- the mode ------------------------------------------------------------------------
    def _kind(self, func: Any) -> int:
        kind = _KINDS.get(func)
        if kind is None:
            name = getattr(func, "__name__", "") or ""
            bare = name.lstrip("_")
            if name in _METADATA_NAMES:
                kind = _METADATA
            elif bare in _aten_names(torch.Tag.dynamic_output_shape) and bare != "index":
                kind = _DYNAMIC
            elif name in ("__getitem__", "index_select_mask"):
                kind = _DYNAMIC  # decided per call: only with a boolean mask
            elif bare in _aten_names(torch.Tag.nondeterministic_seeded):
                kind = _RANDOM
            elif name in _PAIRWISE_NAMES:
                kind = _PAIRWISE
            elif (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS:
                kind = _INPLACE
            else:
                kind = _PLAIN
            _KINDS[func] = kind
        return kind

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        result = func(*args, **kwargs) if kwargs else func(*args)
        kind = _KINDS.get(func)
        if kind is None:
            kind = self._kind(func)
        if kind == _METADATA and (type(result) is torch.Size
                                  or not isinstance(result, _TENSOR_OR_SEQ)):
            return result  # shapes, dtypes, flags; a getter such as `.T` or `.data` goes on
        # the labels of the inputs (inlined: this runs for every torch operation)
        labels, key = 0, self.key
        for arg in args:
            if isinstance(arg, Tensor):
                marks = getattr(arg, _ATTR, None)
                if marks is not None:
                    labels |= marks.get(key, 0)
            elif isinstance(arg, _SEQ):
                for item in arg:
                    marks = getattr(item, _ATTR, None)
                    if marks is not None:
                        labels |= marks.get(key, 0)
        if kwargs:
            labels |= self._gather((), kwargs)
        if kind == _RANDOM:
            labels |= self.random
        if labels:
            if args and isinstance(args[0], Tensor) and (
                kind == _INPLACE or (kind == _RANDOM and result is args[0])
            ):
                self.stamp(args[0], labels)  # written in place: depends on every input
            out = kwargs.get("out") if kwargs else None
            if isinstance(out, Tensor):
                self.stamp(out, labels)
            if kind == _PAIRWISE and isinstance(result, list | tuple):
                sources = args[0] if len(args) == 1 and isinstance(args[0], list | tuple) \
                    else args
                for item, source in zip(result, sources, strict=False):
                    if item is not source:
                        self.stamp(item, self.provenance(source))
            elif isinstance(result, Tensor):
                for arg in args:
                    if arg is result:
                        break
                else:
                    self.stamp(result, labels)
            else:
                self._stamp_outputs(result, labels, args)
        if isinstance(result, Tensor):
            if kind == _DYNAMIC and (func.__name__ != "__getitem__" or _has_mask(args)):
                self._record(func, labels)
            return result
        if kind != _METADATA and isinstance(result, _READ_TYPES) and (
            labels or self.on_read is not None
        ) and any(isinstance(a, Tensor) for a in (*args, *(kwargs or {}).values())):
            self._record(func, labels)
        return result

    @staticmethod
    def _name(func: Any) -> str:
        owner = str(getattr(func, "__qualname__", None) or getattr(func, "__name__", func))
        return owner.replace("TensorBase.", "Tensor.").replace("_VariableFunctionsClass.",
                                                                 "torch.")


class TrackDraws(Messenger):
    """Gives every latent (unobserved) guide draw a label bit of its own, in execution
    order, and notes for every sample site the labels read into Python before it ran
    (:meth:`Dataflow.control`). Used around the guide (``guide=True``: draws get bits)
    and then the model replayed against it (``guide=False``: values come from the guide
    and keep their labels).

    :param Dataflow flow: the active flow.
    :param bool guide: whether this is the guide's run.
    """

    def __init__(self, flow: Dataflow, bits: dict[str, int], guide: bool) -> None:
        super().__init__()
        self.flow = flow
        #: draw name -> bit index (shared by the guide's and the model's tracker)
        self.bits = bits
        #: site name -> control labels when the site ran
        self.control: dict[str, int] = {}
        self.guide = guide

    def _pyro_post_sample(self, msg: Any) -> None:
        name = msg["name"]
        frames = tuple((f.name, f.counter) for f in msg["cond_indep_stack"]
                       if not f.vectorized)
        self.control[name] = self.flow.control(frames)
        value = msg["value"]
        if self.guide and not msg["is_observed"] and isinstance(value, Tensor) \
                and not site_is_subsample(msg) and name not in self.bits:
            self.bits[name] = len(self.bits)
            self.flow.stamp(value, 1 << self.bits[name])


class Writes(TorchDispatchMode):
    """Notes tensors from outside a program that it writes in place (a ``BatchNorm``'s
    running statistics), and keeps a copy of each as it was before the first write
    (:meth:`restore` puts it back): a dispatch-level mode, so every in-place op is seen.

    :param list inputs: tensors that count as the program's own (not noted).
    """

    def __init__(self, inputs: list[Tensor]) -> None:
        super().__init__()
        self._inside = {id(t) for t in inputs}
        self._created: list[Tensor] = []  # kept alive so that their ids stay unique
        #: id -> (tensor, its value before the step wrote it)
        self.written: dict[int, tuple[Tensor, Tensor]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        schema = func._schema
        # native_batch_norm updates its running statistics without saying so in its
        # schema (no alias annotation): those arguments are taken as written too
        stats = "batch_norm" in schema.name
        if schema.is_mutable or stats:
            for argument, value in zip(schema.arguments, args, strict=False):
                written = (argument.alias_info is not None and argument.alias_info.is_write) \
                    or (stats and argument.name in ("running_mean", "running_var"))
                if written and isinstance(value, Tensor) and id(value) not in self._inside \
                        and id(value) not in self.written:
                    self.written[id(value)] = (value, value.detach().clone())
        result = func(*args, **kwargs)
        for out in (result if isinstance(result, tuple | list) else (result,)):
            if isinstance(out, Tensor) and id(out) not in self._inside:
                self._inside.add(id(out))
                self._created.append(out)
        return result

    def restore(self) -> None:
        """Puts every written tensor back as it was before the step."""
        with torch.no_grad():
            for tensor, before in self.written.values():
                tensor.copy_(before)
        self._created.clear()

"""The base class every objective derives from (re-exported by
:mod:`pyro_wakesleep.objectives`, where it is documented)."""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import warnings
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, SVI
from pyro.infer.autoguide import AutoMessenger
from pyro.infer.util import torch_item, zero_grads
from pyro.util import get_rng_state, set_rng_state
from torch import Tensor

from pyro_wakesleep._validation import check_bool, check_int, check_real
from pyro_wakesleep.compiled import CompiledStep, check_jit_options
from pyro_wakesleep.objectives._site_control import SiteControlVariates
from pyro_wakesleep.particles import Particles, check_finite_sites, run_particles
from pyro_wakesleep.traces import guess_max_plate_nesting

if TYPE_CHECKING:
    from pyro_wakesleep.objectives.module import ObjectiveModule


def _calling_svi(objective: Objective) -> SVI | None:
    """The :class:`pyro.infer.SVI` whose ``step`` called ``objective.loss_and_grads``
    (two frames up), if any: the SVI whose optimizer the compiled training step runs."""
    frame = sys._getframe(2)
    if frame.f_code is not SVI.step.__code__:
        return None
    svi = frame.f_locals.get("self")
    bound = getattr(svi, "loss_and_grads", None)
    return svi if isinstance(svi, SVI) and getattr(bound, "__self__", None) is objective \
        else None


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector (:func:`gc.disable`) while an eager step
    runs, and restores its state after. A step makes thousands of short-lived objects
    (trace nodes, provenance labels, messages) that reference counting frees when the
    step ends; collections during the step would only find them alive, promote them to
    older generations and so trigger full collections of the whole process (~160 ms
    each at 300,000 objects: ~13 ms per step on a markov chain of 100 sites, every
    ~13 steps). Garbage in reference cycles made during the step is collected after it,
    at the next collection."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Objective(ELBO):
    """Base class of the objectives in this package (a :class:`pyro.infer.ELBO`).

    **Writing an objective.** A subclass implements one method,
    :meth:`loss_and_surrogate`, that draws the particles once (with :meth:`particles`,
    or :meth:`runs` when each particle needs further runs of model and guide of its
    own) and returns ``(loss_value, surrogate)``: the value it reports and a scalar
    whose gradient is the estimator. It reads the particles as tensors
    (:class:`~pyro_wakesleep.particles.Particles`) and calls the pure functions of
    :mod:`pyro_wakesleep.signals`; it never loops over traces. :meth:`loss`,
    :meth:`differentiable_loss`, :meth:`loss_and_grads` and ``objective(model, guide)``
    are derived from that single path, so they agree under the same random seed.
    Running state (control variates) goes into :attr:`control_variates`, so that
    :meth:`state_dict` saves it.

    The constructor takes the keywords of :class:`pyro.infer.ELBO`, with Pyro's
    meaning, so that an objective here is a drop-in for Pyro's; every subclass passes
    them on (its ``**options``).

    *Stochastic control flow.* A program whose structure depends on its draws through
    Python (``while pyro.sample(...).item() == 1``) cannot run vectorized over
    particles. If the first vectorized run of an objective fails and one run per
    particle succeeds, the objective warns once (:class:`RuntimeWarning`) and draws its
    particles one run after another from then on, with the random state of the failed
    attempt restored, so the result is the one ``vectorize_particles=False`` gives under
    the same seed; pass ``vectorize_particles=False`` to silence the warning. If both
    fail, the sequential error is raised.

    :param int num_particles: number of particles (samples) per step.
    :param int max_plate_nesting: bound on the number of nested :class:`pyro.plate`
        contexts in the model and guide; guessed from one run if left infinite.
    :param int max_iarange_nesting: deprecated name of ``max_plate_nesting`` (warns).
    :param bool vectorize_particles: draw the particles in one vectorized pass (an
        outermost plate of size ``num_particles``) rather than a Python loop (default
        ``True``, unlike Pyro's ``False``; see above for programs that cannot).
    :param bool strict_enumeration_warning: warn about guide sites configured for
        enumeration (``infer={"enumerate": ...}``) in an objective that does not
        enumerate them and samples them instead (those whose ``enumeration`` is ``None``:
        all but :class:`ScoreFunctionELBO`, :class:`VimcoELBO` and
        :class:`ReweightedWakeSleepELBO`).
    :param bool ignore_jit_warnings: accepted for compatibility with Pyro's ``Jit*``
        objectives; no effect (recording here raises rather than warns, see ``jit``).
    :param dict jit_options: options of the compiled path (``jit=True``):
        ``"compile"`` (default ``False``): also compile the recorded graph with
        inductor (slow to compile, faster per step, the same draws; see
        "Compiled objectives"); ``"max_graphs"`` (default 16): call signatures
        recorded at most, later ones run eagerly; ``"verify"`` (default ``True``):
        replays 1, 2, 4, 8, ... of each graph also run the eager step from the same
        state and compare loss, gradients and state (an ``int`` ``n``: replay 1 and
        every ``n``-th; ``False``: never). The :func:`torch.jit.trace` keywords that Pyro's ``Jit*``
        objectives pass (``check_trace``, ...) are accepted and have no effect.
    :param bool retain_graph: passed to ``backward`` in :meth:`loss_and_grads`.
    :param float tail_adaptive_beta: accepted for compatibility; it is used only by
        Pyro's ``TraceTailAdaptive_ELBO`` and has no effect here.
    :param str name: the prefix of the Pyro param-store names of this objective's learned
        control-variate weights, ``"<name>.<site>$$$<parameter>"`` (default
        ``"control_variates"``). The param store is authoritative, as for
        :func:`pyro.module`: an objective restored with the store continues with the
        saved weights. Two live objectives never share weights silently: an objective
        whose names would take weights that another live objective's control variate
        holds raises ``ValueError`` asking for a ``name`` of its own.
    :raises TypeError: for an argument of the wrong type, naming it.
    :raises ValueError: for an argument out of range, naming it.
    """

    #: how the objective's runs enumerate (:mod:`pyro_wakesleep.enumeration`):
    #: ``"expectation"`` (ELBO), ``"marginal"`` (importance weights) or ``None`` (sites
    #: marked for enumeration are sampled, with ``strict_enumeration_warning``'s warning)
    enumeration: str | None = None

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = math.inf,
        max_iarange_nesting: int | None = None,
        vectorize_particles: bool = True,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        jit_options: dict | None = None,
        retain_graph: bool | None = None,
        tail_adaptive_beta: float = -1.0,
        name: str | None = None,
        jit: bool = False,
    ) -> None:
        num_particles = check_int(num_particles, "num_particles")
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"name must be a non-empty str or None, got {name!r}")
        for keyword, nesting in (("max_plate_nesting", max_plate_nesting),
                                 ("max_iarange_nesting", max_iarange_nesting)):
            if nesting is None or nesting == math.inf:
                continue
            check_int(nesting, keyword, minimum=0)
        for keyword, flag in (("vectorize_particles", vectorize_particles),
                              ("strict_enumeration_warning", strict_enumeration_warning),
                              ("ignore_jit_warnings", ignore_jit_warnings),
                              ("jit", jit)):
            check_bool(flag, keyword)
        if retain_graph is not None:
            check_bool(retain_graph, "retain_graph")
        if jit_options is not None and not isinstance(jit_options, dict):
            raise TypeError(f"jit_options must be a dict or None, got {jit_options!r}")
        check_jit_options(jit_options)
        check_real(tail_adaptive_beta, "tail_adaptive_beta")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            max_iarange_nesting=max_iarange_nesting,
            vectorize_particles=False,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            jit_options=jit_options,
            retain_graph=retain_graph,
            tail_adaptive_beta=tail_adaptive_beta,
        )
        self.vectorize_particles = vectorize_particles
        #: the objective's control variates (and any other state), one per site
        self.control_variates: SiteControlVariates = SiteControlVariates()
        self._vectorizes: bool | None = None  # known after the first vectorized run
        self._warmed: set[int] = set()  # messenger autoguides called outside the plate
        #: the prefix of this objective's names in Pyro's param store (see ``name``)
        self.name: str = name or "control_variates"
        #: the compiled training step (``jit=True``), else ``None``
        self.compiled: CompiledStep | None = (
            CompiledStep(self, check_jit_options(jit_options)) if jit else None
        )

    def register(self, site: str, cv: torch.nn.Module) -> None:
        """Registers a learned control variate's parameters in Pyro's param store as
        ``"<name>.<site>$$$..."`` (:func:`pyro.module` with ``update_module_params``: a
        restored store reaches the module), once per step.

        :raises ValueError: if those names hold weights of another live objective's
            control variate (two objectives with the same ``name``).
        """
        self.control_variates.register(f"{self.name}.{site}", site, cv, type(self).__name__)

    # -- the one path --------------------------------------------------------------------
    @abstractmethod
    def loss_and_surrogate(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, update: bool
    ) -> tuple[Tensor, Tensor]:
        """The extension point: runs the particles once and returns the detached scalar
        loss value and the surrogate loss whose gradient is the estimator.

        :param callable model: the model.
        :param callable guide: the guide.
        :param tuple args: the model's and guide's positional arguments.
        :param dict kwargs: their keyword arguments (not to be modified).
        :param bool update: whether running state (control variates) may change.
        :rtype: tuple(torch.Tensor, torch.Tensor)
        """

    def particles(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict,
        detach_guide: bool = False, check_finite: bool = True, track: bool = False,
    ) -> Particles:
        """Runs the particles once, as :class:`~pyro_wakesleep.particles.Particles`
        (see :func:`~pyro_wakesleep.particles.run_particles`). Vectorized particles need
        ``max_plate_nesting``: it is guessed from one extra run of model and guide the
        first time if not given.

        :param bool detach_guide: detach the guide's draws (no pathwise gradient).
        :param bool check_finite: raise ``ValueError`` for a non-finite log-density
            (:func:`~pyro_wakesleep.particles.check_finite_sites`); an objective that
            first makes a more specific check of its own passes ``False`` and calls that
            function itself.
        :param bool track: record the dataflow that
            :func:`~pyro_wakesleep.downstream.learning_signals` needs.
        :rtype: ~pyro_wakesleep.particles.Particles
        """
        vectorize = self.vectorize_particles and self.num_particles > 1
        self._know_plate_nesting(model, guide, args, kwargs, vectorize)
        particles = run_particles(
            model, guide, args, kwargs, num_particles=self.num_particles, vectorize=vectorize,
            max_plate_nesting=self.max_plate_nesting, detach_guide=detach_guide,
            strict_enumeration_warning=self.strict_enumeration_warning, track=track,
            enumeration=self.enumeration,
        )
        if check_finite:
            check_finite_sites(particles)
        return particles

    def runs(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, track: bool = False,
    ) -> Iterator[Particles]:
        """The particles as independent runs: one vectorized run of all of them, or one
        run per particle, for objectives whose per-particle math needs further runs of
        model and guide of its own (e.g. :class:`~pyro_wakesleep.objectives.DisarmELBO`'s
        antithetic runs). Draws the same way :meth:`particles` does (``track`` as
        there)."""
        vectorize = self.vectorize_particles and self.num_particles > 1
        self._know_plate_nesting(model, guide, args, kwargs, vectorize)
        size = self.num_particles if vectorize else 1
        for _ in range(self.num_particles // size):
            yield run_particles(
                model, guide, args, kwargs, num_particles=size, vectorize=vectorize,
                max_plate_nesting=self.max_plate_nesting,
                strict_enumeration_warning=self.strict_enumeration_warning, track=track,
                enumeration=self.enumeration,
            )

    def _know_plate_nesting(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, vectorize: bool
    ) -> None:
        """Guesses ``max_plate_nesting`` (once) when a vectorized pass or enumeration
        needs it. A messenger autoguide (:class:`~pyro.infer.autoguide.AutoMessenger`)
        about to run vectorized for the first time is called once outside the particle
        plate (blocked, random state untouched), so that it creates its parameters
        without a particle dimension (Pyro's ``AutoMessenger._adjust_plates`` does not
        exclude outer plates)."""
        if (vectorize or self.enumeration) and self.max_plate_nesting == math.inf:
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        elif vectorize and isinstance(guide, AutoMessenger) and id(guide) not in self._warmed:
            guess_max_plate_nesting(model, guide, args, kwargs)
        if vectorize and isinstance(guide, AutoMessenger):
            self._warmed.add(id(guide))

    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError("objectives in pyro_wakesleep draw traces via particles()")

    def _uses_vectorization(self) -> bool:
        """Whether a step runs anything vectorized (particles; subclasses add dreams)."""
        return self.vectorize_particles and self.num_particles > 1

    def _outputs(self) -> dict[str, Tensor]:
        """Tensors besides the loss that a step leaves for later reading (e.g. phase
        losses); a compiled step returns them from its graph."""
        return {}

    def _set_outputs(self, outputs: dict[str, Tensor]) -> None:
        """Sets what :meth:`_outputs` returns (after a compiled step)."""

    def _run(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, update: bool
    ) -> tuple[Tensor, Tensor]:
        """A step: compiled (``jit=True``, training with gradients) or eager."""
        def eager() -> tuple[Tensor, Tensor]:
            return self._run_eager(model, guide, args, kwargs, update)

        if self.compiled is not None and update and torch.is_grad_enabled():
            return self.compiled(model, guide, args, kwargs, eager)
        return eager()

    def _run_eager(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, update: bool
    ) -> tuple[Tensor, Tensor]:
        """:meth:`loss_and_surrogate`, falling back to sequential particles once if the
        program cannot run vectorized (see the class docstring), with Python's cyclic
        garbage collector paused (:func:`_collector_paused`)."""
        with _collector_paused():
            return self._eager_step(model, guide, args, kwargs, update)

    def _eager_step(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, update: bool
    ) -> tuple[Tensor, Tensor]:
        if self._vectorizes is not None or not self._uses_vectorization():
            return self.loss_and_surrogate(model, guide, args, kwargs, update)
        state = get_rng_state()
        try:
            result = self.loss_and_surrogate(model, guide, args, kwargs, update)
        except (RuntimeError, ValueError, TypeError, IndexError) as vectorized_error:
            set_rng_state(state)
            self.vectorize_particles = False
            try:
                result = self.loss_and_surrogate(model, guide, args, kwargs, update)
            except Exception:
                self.vectorize_particles = True
                raise
            self._vectorizes = False
            warnings.warn(
                f"{type(self).__name__}: the model and guide could not run vectorized over "
                f"particles ({type(vectorized_error).__name__}: {vectorized_error}), e.g. "
                "because of stochastic control flow; drawing the particles one run after "
                "another from now on. Pass vectorize_particles=False to silence this.",
                RuntimeWarning, stacklevel=3,
            )
            return result
        self._vectorizes = True
        return result

    # -- derived interface ---------------------------------------------------------------
    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """An estimate of the loss (see the class docstring for its meaning), without
        gradients and without changing any running state.

        :rtype: float
        """
        with torch.no_grad():
            value, _ = self._run(model, guide, args, kwargs, update=False)
        return torch_item(value)

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> Tensor:
        """A scalar tensor whose value is the loss and whose gradient is the estimator's.
        Updates running state (control variates in training mode).

        :rtype: torch.Tensor
        """
        value, surrogate = self._run(model, guide, args, kwargs, update=True)
        return value + (surrogate - surrogate.detach())

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Computes the loss, and accumulates the estimator's gradients into ``.grad`` of
        every parameter it touches (as :class:`pyro.infer.SVI` expects).

        Called by :meth:`pyro.infer.SVI.step` with ``jit=True``, it takes SVI's whole
        step (loss, gradients and the update of SVI's optimizer) as one recorded
        training step where it can (see "Compiled objectives"): SVI then finds no
        parameter left to update.

        :rtype: float
        """
        if self.compiled is not None and torch.is_grad_enabled():
            svi = _calling_svi(self)
            if svi is not None:
                loss = self._svi_step(svi, model, guide, args, kwargs)
                if loss is not None:
                    return torch_item(loss)
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)

    def _svi_step(self, svi: SVI, model: Callable, guide: Callable, args: tuple,
                  kwargs: dict) -> Tensor | None:
        """SVI's step as a compiled training step, or ``None`` (SVI's own step)."""
        def eager() -> Tensor:  # SVI's step, eagerly, out of sight of SVI's capture
            with poutine.block(), poutine.trace(param_only=True) as capture:
                value, surrogate = self._run_eager(model, guide, args, kwargs, True)
                loss = value + (surrogate - surrogate.detach())
                if loss.requires_grad:
                    loss.backward(retain_graph=self.retain_graph)
            params = {cast(Any, site["value"]).unconstrained()
                      for site in capture.trace.nodes.values()}
            svi.optim(params)
            zero_grads(params)
            return loss.detach()

        compiled = self.compiled
        if compiled is None:
            return None
        return compiled.training(svi.optim, False)(model, guide, args, kwargs, eager)

    def __call__(self, model: Callable, guide: Callable) -> ObjectiveModule:
        """A :class:`~pyro_wakesleep.objectives.ObjectiveModule` computing
        :meth:`differentiable_loss` for this model and guide, for use with a plain
        PyTorch optimizer."""
        from pyro_wakesleep.objectives.module import ObjectiveModule

        return ObjectiveModule(model, guide, self)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The objective's running state and learned control-variate weights."""
        return dict(self.control_variates.state_dict())

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned (before or after the first step)."""
        self.control_variates.load_state_dict(dict(state_dict))

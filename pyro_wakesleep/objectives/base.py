"""The base class every objective derives from (re-exported by
:mod:`pyro_wakesleep.objectives`, where it is documented)."""

from __future__ import annotations

import math
import numbers
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from pyro.infer import ELBO
from pyro.infer.elbo import ELBOModule
from pyro.infer.util import torch_item
from torch import Tensor

from pyro_wakesleep._validation import check_int
from pyro_wakesleep.objectives._site_control import SiteControlVariates
from pyro_wakesleep.particles import Particles, run_particles
from pyro_wakesleep.traces import guess_max_plate_nesting


class ObjectiveModule(ELBOModule):
    """The :class:`torch.nn.Module` returned by ``objective(model, guide)``: calling it
    returns :meth:`Objective.differentiable_loss`. Besides the model and guide (when they
    are modules), it holds the objective's control variates as the submodule
    ``control_variates``, so that ``parameters()`` and ``state_dict()`` cover them too."""

    def __init__(self, model: Callable, guide: Callable, elbo: Objective) -> None:
        super().__init__(model, guide, elbo)  # type: ignore[arg-type]
        self.control_variates = elbo.control_variates


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

    :param int num_particles: number of particles (samples) per step.
    :param int max_plate_nesting: bound on the number of nested :class:`pyro.plate`
        contexts in the model and guide; guessed from one run if left infinite.
    :param bool vectorize_particles: draw the particles in one vectorized pass (an
        outermost plate of size ``num_particles``) rather than a Python loop.
    :param bool retain_graph: passed to ``backward`` in :meth:`loss_and_grads`.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = math.inf,
        vectorize_particles: bool = True,
        retain_graph: bool | None = None,
    ) -> None:
        num_particles = check_int(num_particles, "num_particles")
        if not (max_plate_nesting == math.inf or (
            isinstance(max_plate_nesting, numbers.Integral) and max_plate_nesting >= 0
        )):
            raise ValueError(
                f"max_plate_nesting must be a non-negative int, got {max_plate_nesting!r}"
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=False,
            retain_graph=retain_graph,
        )
        self.vectorize_particles = bool(vectorize_particles)
        #: the objective's control variates (and any other state), one per site
        self.control_variates: SiteControlVariates = SiteControlVariates()

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
        detach_guide: bool = False,
    ) -> Particles:
        """Runs the particles once, as :class:`~pyro_wakesleep.particles.Particles`
        (see :func:`~pyro_wakesleep.particles.run_particles`). Vectorized particles need
        ``max_plate_nesting``: it is guessed from one extra run of model and guide the
        first time if not given.

        :param bool detach_guide: detach the guide's draws (no pathwise gradient).
        :rtype: ~pyro_wakesleep.particles.Particles
        """
        vectorize = self.vectorize_particles and self.num_particles > 1
        self._know_plate_nesting(model, guide, args, kwargs, vectorize)
        return run_particles(
            model, guide, args, kwargs, num_particles=self.num_particles, vectorize=vectorize,
            max_plate_nesting=self.max_plate_nesting, detach_guide=detach_guide,
        )

    def runs(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> Iterator[Particles]:
        """The particles as independent runs: one vectorized run of all of them, or one
        run per particle, for objectives whose per-particle math needs further runs of
        model and guide of its own (e.g. :class:`~pyro_wakesleep.objectives.DisarmELBO`'s
        antithetic runs). Draws the same way :meth:`particles` does."""
        vectorize = self.vectorize_particles and self.num_particles > 1
        self._know_plate_nesting(model, guide, args, kwargs, vectorize)
        size = self.num_particles if vectorize else 1
        for _ in range(self.num_particles // size):
            yield run_particles(
                model, guide, args, kwargs, num_particles=size, vectorize=vectorize,
                max_plate_nesting=self.max_plate_nesting,
            )

    def _know_plate_nesting(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, vectorize: bool
    ) -> None:
        """Guesses ``max_plate_nesting`` (once) when a vectorized pass needs it."""
        if vectorize and self.max_plate_nesting == math.inf:
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)

    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError("objectives in pyro_wakesleep draw traces via particles()")

    # -- derived interface ---------------------------------------------------------------
    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """An estimate of the loss (see the class docstring for its meaning), without
        gradients and without changing any running state.

        :rtype: float
        """
        with torch.no_grad():
            value, _ = self.loss_and_surrogate(model, guide, args, kwargs, update=False)
        return torch_item(value)

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> Tensor:
        """A scalar tensor whose value is the loss and whose gradient is the estimator's.
        Updates running state (control variates in training mode).

        :rtype: torch.Tensor
        """
        value, surrogate = self.loss_and_surrogate(model, guide, args, kwargs, update=True)
        return value + (surrogate - surrogate.detach())

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Computes the loss, and accumulates the estimator's gradients into ``.grad`` of
        every parameter it touches (as :class:`pyro.infer.SVI` expects).

        :rtype: float
        """
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)

    def __call__(self, model: Callable, guide: Callable) -> ObjectiveModule:
        """A :class:`torch.nn.Module` computing :meth:`differentiable_loss` for this
        model and guide, for use with a plain PyTorch optimizer."""
        return ObjectiveModule(model, guide, self)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The objective's running state and learned control-variate weights."""
        return dict(self.control_variates.state_dict())

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned (before or after the first step)."""
        self.control_variates.load_state_dict(dict(state_dict))

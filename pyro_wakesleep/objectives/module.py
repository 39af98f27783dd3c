"""The plain-PyTorch route: an objective bound to a model and guide as a module."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyro.poutine as poutine
import torch
from pyro.infer.elbo import ELBOModule
from pyro.poutine.trace_struct import Trace
from torch import Tensor, nn

if TYPE_CHECKING:
    from pyro_wakesleep.objectives.base import Objective

__all__ = ["ObjectiveModule"]


def _owner(fn: Callable) -> nn.Module | None:
    """The module a bound method such as ``sbn.model`` belongs to, if any."""
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) and not isinstance(fn, nn.Module) else None


class ObjectiveModule(ELBOModule):
    """The :class:`torch.nn.Module` returned by ``objective(model, guide)``: calling it
    returns :meth:`Objective.differentiable_loss`, for a plain PyTorch loop::

        loss_module = objective(model, guide)
        loss_module.initialize(x)  # creates lazily built parameters (see below)
        optimizer = torch.optim.Adam(loss_module.parameters(), lr=1e-3)
        for _ in range(num_steps):
            optimizer.zero_grad()
            loss_module(x).backward()
            optimizer.step()

    ``parameters()`` and ``state_dict()`` hold the model and guide when they are modules,
    the module a bound-method model or guide belongs to (``owners``: e.g. ``sbn`` for
    ``sbn.model`` and ``sbn.guide``), and the objective's control variates
    (``control_variates``).

    The module never trains silently nothing:

    * a call with gradients raises ``ValueError`` naming any parameter that the model,
      guide or a control variate registers (``pyro.param``, ``pyro.module``) but that is
      not among ``parameters()``, since an optimizer built from them never updates it;
    * parameters that are created lazily at the first call (a control variate given for
      all sites is built per site at its first step; autoguides build theirs too) are
      not in an optimizer built before that call. Call :meth:`initialize` (or the module
      once) before building the optimizer; if a later call finds that such parameters
      kept their values while the others moved, it raises ``ValueError`` naming them.

    A call that replays a compiled step (``jit=True``) skips these checks: the graph's
    parameters were checked when it was recorded and cannot change.

    :param callable model: the model.
    :param callable guide: the guide.
    :param Objective elbo: the objective.
    """

    elbo: Objective

    def __init__(self, model: Callable, guide: Callable, elbo: Objective) -> None:
        super().__init__(model, guide, elbo)  # type: ignore[arg-type]
        owners = [o for o in (_owner(model), _owner(guide)) if o is not None]
        self.owners = nn.ModuleList(list({id(o): o for o in owners}.values()))
        self.control_variates = elbo.control_variates
        self._fresh: dict[str, tuple[Tensor, Tensor]] = {}  # created at the last call
        self._others: list[tuple[Tensor, Tensor]] = []
        self._known: set[int] | None = None  # ids of parameters() after the last call

    def initialize(self, *args: Any, **kwargs: Any) -> float:
        """Runs the objective's :meth:`~Objective.loss` once (no gradients, no change of
        running state), so that every lazily created parameter exists; returns the loss.

        :rtype: float
        """
        loss = self.elbo.loss(self.model, self.guide, *args, **kwargs)
        self._fresh, self._known = {}, None
        return float(loss)

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Tensor:
        """One training step with ``optimizer``: the loop body above
        (``optimizer.zero_grad()``, the loss, ``backward()``, ``optimizer.step()``),
        returning the detached loss. With ``jit=True`` the loss, its gradients, the
        control-variate updates and the optimizer's update (:class:`torch.optim.Adam`,
        ``AdamW``, ``SGD``) are replayed as one recorded training step; the gradients are
        left in ``.grad`` as ``backward()`` leaves them. See "Compiled objectives".

        :param torch.optim.Optimizer optimizer: the optimizer of :meth:`parameters`.
        :rtype: torch.Tensor
        """
        def ordinary() -> Tensor:
            loss = self(*args, **kwargs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.detach()

        def eager() -> Tensor:
            value, surrogate = self.elbo._run_eager(self.model, self.guide, args, kwargs, True)
            optimizer.zero_grad()
            loss = value + (surrogate - surrogate.detach())
            if loss.requires_grad:
                loss.backward()
            optimizer.step()
            return loss.detach()

        compiled = self.elbo.compiled
        if compiled is not None and torch.is_grad_enabled() and not self._fresh:
            loss = compiled.training(optimizer, True)(self.model, self.guide, args, kwargs,
                                                      eager)
            if loss is not None:
                return loss
        return ordinary()

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """:meth:`Objective.differentiable_loss` of the model and guide."""
        compiled = self.elbo.compiled
        if not torch.is_grad_enabled() or (
                compiled is not None and not self._fresh
                and compiled.replays(self.model, self.guide, args, kwargs)):
            return self.elbo.differentiable_loss(self.model, self.guide, *args, **kwargs)
        self._check_fresh()
        if self._known is None:  # the parameters before the first call
            self._known = {id(p) for p in self.parameters()}
        before = self._known
        with poutine.trace(param_only=True) as capture:
            loss = self.elbo.differentiable_loss(self.model, self.guide, *args, **kwargs)
        named = dict(self.named_parameters())
        self._known = {id(p) for p in named.values()}
        self._check_owned(capture.trace, self._known)
        self._fresh = {n: (p, p.detach().clone()) for n, p in named.items() if id(p) not in before}
        if self._fresh:
            self._others = [(p, p.detach().clone()) for p in named.values() if id(p) in before]
        return loss

    def _check_owned(self, trace: Trace, owned: set[int]) -> None:
        for name, site in trace.nodes.items():
            if site["type"] != "param":
                continue
            value = site["value"]
            unconstrained = getattr(value, "unconstrained", None)
            tensor = unconstrained() if callable(unconstrained) else value
            if tensor is not None and tensor.requires_grad and id(tensor) not in owned:
                raise ValueError(
                    f"parameter '{name}' is trained by this objective but is not among "
                    "the module's parameters(), so an optimizer built from them never "
                    "updates it; make the model and guide torch.nn.Modules (or methods of "
                    "one, e.g. pyro.nn.PyroModule), or train with pyro.infer.SVI"
                )

    def _check_fresh(self) -> None:
        if not self._fresh:
            return
        moved = any(not torch.equal(p.detach(), old) for p, old in self._others)
        stuck = [n for n, (p, old) in self._fresh.items() if torch.equal(p.detach(), old)]
        self._fresh = {}
        if moved and stuck:
            raise ValueError(
                f"parameters {stuck} were created at the previous call and have not "
                "changed since, while the others have: the optimizer was built before they "
                "existed. Call loss_module.initialize(*args) (or the module once) before "
                "building the optimizer"
            )

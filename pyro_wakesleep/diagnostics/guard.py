"""Snapshot and restore of the training state around a diagnostic, so that diagnostics
only read. Used by :mod:`~pyro_wakesleep.diagnostics.gradients`; nothing here is part of
the public API."""

from __future__ import annotations

from typing import Any

import pyro
import torch
from pyro.util import get_rng_state, set_rng_state
from torch import Tensor

__all__: list[str] = []


def _restore_store(values: dict[str, Tensor]) -> None:
    store = pyro.get_param_store()
    current = dict(store.named_parameters())
    for name in current:
        if name not in values:
            del store[name]
    with torch.no_grad():
        for name, value in values.items():
            if name in current:
                current[name].copy_(value)


class TrainingStateGuard:
    """Context manager that puts back, on exit, everything a diagnostic could change:
    param store contents and values (in place, so optimizers keep their references),
    ``.grad`` fields, the global RNGs, the loss's attributes and its control variates
    (modules created meanwhile removed, state and train/eval modes restored).

    :meth:`checkpoint` records the param store's values at some point inside, and
    :meth:`reset` goes back to them (between gradient draws).
    """

    def __init__(self, loss: Any) -> None:
        self.loss = loss

    def __enter__(self) -> TrainingStateGuard:
        self._params = dict(pyro.get_param_store().named_parameters())
        self._values = {n: p.detach().clone() for n, p in self._params.items()}
        self._grads = {n: p.grad for n, p in self._params.items()}
        for p in self._params.values():
            p.grad = None
        self._rng = get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self._attrs = dict(vars(self.loss))
        cvs = getattr(self.loss, "control_variates", None)
        self._cvs = cvs if isinstance(cvs, torch.nn.Module) else None
        if self._cvs is not None:
            self._cv_state = {k: v.detach().clone() for k, v in self._cvs.state_dict().items()}
            self._cv_keys = list(self._cvs._modules)
            self._modes = {m: m.training for m in self._cvs.modules()}
        self._checkpoint = self._values
        return self

    def checkpoint(self) -> None:
        """Records the param store's current values for :meth:`reset`."""
        self._checkpoint = {
            n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()
        }

    def reset(self) -> None:
        """Goes back to the values recorded by :meth:`checkpoint`."""
        _restore_store(self._checkpoint)

    def __exit__(self, *exc: Any) -> None:
        for name, param in dict(pyro.get_param_store().named_parameters()).items():
            if name not in self._params:
                param.grad = None
        _restore_store(self._values)
        for name, param in self._params.items():
            param.grad = self._grads[name]
        set_rng_state(self._rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng)
        vars(self.loss).clear()
        vars(self.loss).update(self._attrs)
        if self._cvs is not None:
            for key in list(self._cvs._modules):
                if key not in self._cv_keys:
                    del self._cvs._modules[key]
            self._cvs.load_state_dict(self._cv_state)
            for module, mode in self._modes.items():
                module.training = mode

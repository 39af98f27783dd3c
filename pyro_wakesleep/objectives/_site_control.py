"""How an objective holds its control variates: one per guide site.

Validation of the ``control_variate`` argument and the per-site container whose
``state_dict`` an objective exposes. Private to :mod:`pyro_wakesleep.objectives`.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Mapping
from typing import Any, cast

import pyro
from torch import Tensor, nn

from pyro_wakesleep.control_variates import ControlVariate

ControlVariateSpec = ControlVariate | Mapping[str, ControlVariate | None] | None


def check_spec(spec: Any, num_particles: int) -> None:
    """Validates the ``control_variate`` argument of an objective (raises, never returns
    a changed copy)."""
    items = spec.items() if isinstance(spec, Mapping) else [("<all sites>", spec)]
    for site, cv in items:
        if not isinstance(site, str):
            raise TypeError(f"control_variate keys must be site names (str), got {site!r}")
        if cv is None:
            continue
        if not isinstance(cv, ControlVariate):
            raise TypeError(
                f"control variate for site '{site}' must be a pyro_wakesleep ControlVariate "
                f"(MovingAverageBaseline, NeuralBaseline, LeaveOneOutBaseline), got {cv!r}"
            )
        if num_particles < cv.min_particles:
            raise ValueError(
                f"{type(cv).__name__} for site '{site}' needs num_particles >= "
                f"{cv.min_particles}, got num_particles={num_particles}"
            )


#: the live containers (to tell when two objectives would share weights)
_LIVE: weakref.WeakSet[SiteControlVariates] = weakref.WeakSet()


def _escape(site: str) -> str:
    return site.replace(".", ":")


class SiteControlVariates(nn.Module):
    """The control variates an objective holds, one per guide site.

    Site ``"a.b"`` is the submodule ``"a:b"`` (``torch`` forbids dots in module names),
    so a buffer shows in ``state_dict()`` as e.g. ``"a:b.average"``. State loaded for a
    site whose control variate is created lazily (at its first step) is kept and applied
    when it is created, so a fresh objective can be restored before its first step.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, dict[str, Tensor]] = {}
        self._registered: set[str] = set()
        _LIVE.add(self)

    def register(self, prefix: str, site: str, cv: nn.Module, owner: str) -> None:
        """``pyro.module(prefix, cv, update_module_params=True)``, first checking (once
        per site) that the names do not hold weights of another live container's
        control variate, else ``ValueError`` (``owner`` names the objective's class)."""
        if site not in self._registered:
            store = pyro.get_param_store()
            held = {id(cast(Any, store.get_param(key)).unconstrained())
                    for key in store if key.startswith(f"{prefix}$$$")}
            others = [o for o in list(_LIVE) if o is not self]
            if held and any(id(p) in held for o in others for p in o.parameters()):
                raise ValueError(
                    f"the control variate of site '{site}' would take the weights that "
                    f"another live objective holds under the param-store names "
                    f"'{prefix}$$$...'; give each objective its own name= (e.g. "
                    f"{owner}(..., name='{prefix.rsplit('.', 1)[0]}_2'))"
                )
            self._registered.add(site)
        pyro.module(prefix, cv, update_module_params=True)

    def get(self, site: str) -> ControlVariate | None:
        """The control variate for ``site``, or ``None``."""
        module = self._modules.get(_escape(site))
        return module if isinstance(module, ControlVariate) else None

    def set(self, site: str, cv: ControlVariate) -> None:
        """Installs ``cv`` for ``site``, applying state loaded before it existed."""
        key = _escape(site)
        self.add_module(key, cv)
        if key in self._pending:
            cv.load_state_dict(self._pending.pop(key))

    def sites(self) -> list[str]:
        """Names of the sites that have a control variate."""
        return [key.replace(":", ".") for key in self._modules]

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, state in self._pending.items():
            for name, value in state.items():
                destination[f"{prefix}{key}.{name}"] = value

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list, unexpected_keys: list, error_msgs: list,
    ) -> None:
        own = {}
        for full_key, value in state_dict.items():
            key, _, name = full_key[len(prefix):].partition(".")
            if full_key.startswith(prefix) and key not in self._modules:
                self._pending.setdefault(key, {})[name] = value
            else:
                own[full_key] = value
        super()._load_from_state_dict(
            own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def instantiate(template: ControlVariate) -> ControlVariate:
    """An independent copy of a control variate given for all sites."""
    return copy.deepcopy(template)

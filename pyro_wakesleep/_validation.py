"""Argument and value checks shared by the whole package (private).

Each raises ``TypeError`` or ``ValueError`` with a message naming the argument or the
site, as the house rules ask; none returns a changed copy of its input except the
normalized Python number.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an ``int`` if it is an integer (not a ``bool``) ``>= minimum``.

    :raises TypeError: if ``value`` is not an integer.
    :raises ValueError: if it is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_site_modules(spec: Any, owner: str, what: str) -> None:
    """A per-site module option (``None``, one :class:`torch.nn.Module`, or a mapping of
    site names to modules or ``None``).

    :raises TypeError: naming the site, for anything else.
    """
    items = spec.items() if isinstance(spec, Mapping) else [("<all>", spec)]
    for site, module in items:
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"{owner}: {what} for site '{site}' must be a torch.nn.Module, "
                            f"got {module!r}")


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a ``bool``.

    :raises TypeError: otherwise (``"no"``, ``0`` and ``None`` are not booleans).
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
    return value


def check_real(value: Any, name: str, low: float | None = None, high: float | None = None,
               what: str = "") -> float:
    """``value`` as a ``float`` if it is a real number (not a ``bool``) in
    ``[low, high]``.

    :raises TypeError: if ``value`` is not a real number.
    :raises ValueError: if it lies outside the interval.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {value!r}")
    value = float(value)
    if (low is not None and not value >= low) or (high is not None and not value <= high):
        interval = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name}{what} must be in {interval}, got {value!r}")
    return value


#: while a compiled step is recorded: where :func:`check_finite` puts the sums it checks
DEFERRED: list[Tensor] | None = None


@contextlib.contextmanager
def deferred() -> Iterator[list[Tensor]]:
    """While a compiled step is recorded: :func:`check_finite` keeps sums (yielded)."""
    global DEFERRED
    collected: list[Tensor] = []
    previous, DEFERRED = DEFERRED, collected
    try:
        yield collected
    finally:
        DEFERRED = previous


def check_finite(value: Tensor, what: str, hint: str = "check the model's log-densities "
                 "at the guide's draws") -> None:
    """Raises ``ValueError`` saying how many elements of ``value`` are not finite.

    While a compiled step is recorded (``jit=True``) it only keeps the sum of ``value``
    (finite if and only if every element is, barring overflow): the graph returns the sum
    of those sums, and a replay whose sum is not finite is run again eagerly, from the
    same random state, to raise this error.

    :param str what: what ``value`` is, e.g. ``"learning signal at site 'z'"``.
    """
    if DEFERRED is not None:
        DEFERRED.append(value.detach().sum())
        return
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        raise ValueError(
            f"non-finite {what}: {int((~finite).sum())} of {value.numel()} elements are not "
            f"finite; {hint}"
        )

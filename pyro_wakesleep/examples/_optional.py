"""Lazy imports of the packages that only the examples need (the ``examples`` extra)."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]

EXTRA = "pip install pyro-wakesleep[examples]"


def require(module: str, purpose: str) -> ModuleType:
    """Imports ``module`` (e.g. ``"sklearn.datasets"``), or raises :class:`ImportError`
    naming the ``examples`` extra that provides it.

    :param str module: dotted module name.
    :param str purpose: what it is needed for, for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        raise ImportError(
            f"{purpose} needs {package!r}, which is not installed; "
            f"install the examples extra: {EXTRA}"
        ) from error

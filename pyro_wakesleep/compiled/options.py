"""The ``jit_options`` of an objective's compiled path, and their check."""

from __future__ import annotations

from typing import Any

__all__ = ["JIT_OPTIONS", "PYRO_JIT_OPTIONS", "check_jit_options", "verifies"]

#: ``jit_options`` of Pyro's ``Jit*`` objectives (keywords of ``torch.jit.trace``),
#: accepted and without effect here
PYRO_JIT_OPTIONS = frozenset(
    {"check_trace", "check_inputs", "check_tolerance", "optimize", "strict",
     "time_compilation", "_force_outplace"}
)
#: this package's own ``jit_options``, with their defaults
JIT_OPTIONS: dict[str, Any] = {"compile": False, "max_graphs": 16, "verify": True}


def check_jit_options(options: dict | None) -> dict[str, Any]:
    """The ``jit_options`` with defaults filled in, or ``TypeError``/``ValueError``
    naming a wrong key or value.

    ``"verify"``: ``True`` (default) verifies replays 1, 2, 4, 8, ... of each graph
    against the eager step; an ``int`` ``n >= 1`` verifies the first replay and every
    ``n``-th after it; ``False`` never verifies.
    """
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
    verify = result["verify"]
    if not isinstance(verify, bool) and (not isinstance(verify, int) or verify < 1):
        raise ValueError(
            f"jit_options['verify'] must be True (replays 1, 2, 4, 8, ...), False (never) "
            f"or an int n >= 1 (replay 1 and every n-th), got {verify!r}"
        )
    return result


def verifies(option: bool | int, replay: int) -> bool:
    """Whether replay number ``replay`` (from 1) of a graph is verified under the
    ``"verify"`` option."""
    if option is False:
        return False
    if option is True:
        return replay & (replay - 1) == 0
    return replay == 1 or replay % option == 0

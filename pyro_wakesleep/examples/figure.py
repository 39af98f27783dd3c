"""The figure of the main job: what differs between objectives, in one picture.

Three panels against training seconds: the training bound, the importance-weighted bound
on held-out images, and the variance of the guide gradient (log scale; mean over the
guide's parameter elements; NVIL's normalization undone, as in
:class:`~pyro_wakesleep.examples.compare.Result`). The variance, not the
signal-to-noise ratio: with the few
gradient draws a short run can afford, the SNR of the high-variance estimators reads as
its noise floor :math:`1/\\sqrt{D}` and hides the differences. Each
objective keeps one colour of the Okabe–Ito palette (safe for the common forms of colour
blindness) and one line style, the same in every run; the legend sits outside the axes.
Needs matplotlib (the ``examples`` extra).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Protocol

from pyro_wakesleep.examples._optional import require

__all__ = ["PALETTE", "plot", "style"]

#: Okabe & Ito (2008), "Color Universal Design": distinguishable under protanopia,
#: deuteranopia and tritanopia (their yellow, too pale on white, replaced by grey)
PALETTE: tuple[str, ...] = (
    "#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#999999",
)
_LINES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_ORDER = ("pyro-tracegraph", "sf", "sf-nvil", "sf-loo", "vimco", "disarm", "rws", "ws",
          "sf-average", "rebar", "relax")


class _Curves(Protocol):
    """What :func:`plot` reads of a :class:`~pyro_wakesleep.examples.compare.Result`
    (a protocol, so that this module need not import that one)."""

    objective: str
    test_bound: float
    train_curve: list[float]
    train_seconds: list[float]
    checkpoints: list[dict[str, float]]


def style(name: str) -> dict[str, Any]:
    """The colour, line style and marker of objective ``name``: fixed for the known
    objectives (so figures of different runs agree), a stable pick for others."""
    index = _ORDER.index(name) if name in _ORDER else len(_ORDER) + sum(map(ord, name))
    return {"color": PALETTE[index % len(PALETTE)],
            "linestyle": _LINES[(index + index // len(PALETTE)) % len(_LINES)],
            "marker": _MARKERS[index % len(_MARKERS)]}


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    finite = [v if math.isfinite(v) else math.nan for v in values]
    for i, v in enumerate(finite):
        total += v
        if i >= window:
            total -= finite[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(results: Sequence[_Curves], path: str | os.PathLike,
         settings: dict[str, Any] | None = None) -> None:
    """Draws the three panels for ``results`` (from
    :func:`~pyro_wakesleep.examples.compare.compare`) into the image file ``path``.

    :param results: one per objective.
    :param path: a ``.png`` (or any format matplotlib writes).
    :param dict settings: shown in the title (data, budget, batch, particles, threads).
    """
    require("matplotlib", "the plot of save()").use("Agg")
    plt = require("matplotlib.pyplot", "the plot of save()")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    train_ax, test_ax, var_ax = axes
    low, high = math.inf, -math.inf
    for r in results:
        look = style(r.objective)
        line = {"color": look["color"], "linestyle": look["linestyle"], "linewidth": 1.6}
        if r.train_curve:
            smooth = _smooth(r.train_curve, max(1, len(r.train_curve) // 40))
            train_ax.plot(r.train_seconds, smooth, label=r.objective, **line)
            later = [v for v in smooth[len(smooth) // 5:] if math.isfinite(v)]
            if later:
                low, high = min(low, min(later)), max(high, max(later))
        marks = r.checkpoints
        seconds = [m["seconds"] for m in marks]
        test_ax.plot(seconds, [m["test_bound"] for m in marks], marker=look["marker"],
                     markersize=5, **line)
        var_ax.plot(seconds, [max(m["grad_variance"], 1e-12) for m in marks],
                    marker=look["marker"], markersize=5, **line)
    if math.isfinite(low):
        train_ax.set_ylim(low - 0.05 * (high - low + 1), high + 0.05 * (high - low + 1))
    finals = [r.test_bound for r in results if math.isfinite(r.test_bound)]
    starts = [m["test_bound"] for r in results for m in r.checkpoints[1:2]
              if math.isfinite(m["test_bound"])]
    if finals and starts:
        lo, hi = min(finals + starts), max(finals + starts)
        test_ax.set_ylim(lo - 0.1 * (hi - lo + 1), hi + 0.1 * (hi - lo + 1))
        first = results[0].checkpoints[0]["test_bound"] if results[0].checkpoints else None
        if first is not None and first < test_ax.get_ylim()[0]:
            test_ax.annotate(f"all start at {first:.1f}", xy=(0.98, 0.03), ha="right",
                             xycoords="axes fraction", fontsize=8)
    train_ax.set(xlabel="training seconds", ylabel="nats per image",
                 title="training bound (ELBO; IW bound for vimco, rws, ws)")
    test_ax.set(xlabel="training seconds", ylabel="nats per image",
                title="held-out importance-weighted bound")
    var_ax.set(xlabel="training seconds", ylabel="mean variance per parameter",
               title="guide-gradient variance",
               yscale="log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    handles = [
        plt.Line2D([], [], color=style(r.objective)["color"],
                   linestyle=style(r.objective)["linestyle"],
                   marker=style(r.objective)["marker"], linewidth=1.6, label=r.objective)
        for r in results
    ]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.875, 0.5),
               frameon=False, title="objective")
    if settings:
        fig.suptitle(_title(settings), fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _title(settings: dict[str, Any]) -> str:
    parts = [str(settings.get("data", ""))]
    budget = [f"{settings['seconds']:g} s" if settings.get("seconds") else "",
              f"{settings['steps']} steps" if settings.get("steps") else ""]
    parts.append(" or ".join(b for b in budget if b) + " per objective")
    for key, label in (("batch_size", "batch"), ("num_particles", "particles"),
                       ("learning_rate", "lr"), ("threads", "threads")):
        if key in settings:
            parts.append(f"{label} {settings[key]}")
    return "; ".join(p for p in parts if p)

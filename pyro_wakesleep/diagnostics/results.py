"""Result types of the gradient diagnostics: :class:`GradientStats` (one estimator) and
:class:`EstimatorComparison` (several), both re-exported from
:mod:`pyro_wakesleep.diagnostics`, and the running moments they are computed from."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["EstimatorComparison", "GradientStats"]

_COLUMNS = ("numel", "mean_norm", "variance", "snr", "mean_snr")


class Moments:
    """Running mean and sum of squared deviations of gradient draws, merged chunk by
    chunk in float64 (Chan, Golub & LeVeque's pairwise update)."""

    def __init__(self, params: Mapping[str, Tensor], keep_draws: bool) -> None:
        self.count = 0
        self.mean = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
        self.m2 = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
        self.draws: dict[str, list[Tensor]] | None = (
            {n: [] for n in params} if keep_draws else None)

    def add(self, chunk: Mapping[str, Tensor]) -> None:
        """Adds a ``(b, *shape)`` chunk of draws of every parameter."""
        size = next(iter(chunk.values())).shape[0]
        total = self.count + size
        for name, draws in chunk.items():
            draws = draws.detach().to("cpu", torch.float64)
            mean = draws.mean(0)
            delta = mean - self.mean[name]
            self.mean[name] = self.mean[name] + delta * (size / total)
            self.m2[name] = (self.m2[name] + (draws - mean).pow(2).sum(0)
                             + delta.pow(2) * (self.count * size / total))
            if self.draws is not None:
                self.draws[name].append(draws.float())
        self.count = total

    def result(self, groups: Mapping[str, str], method: str, loss: str) -> GradientStats:
        """The :class:`GradientStats` of the draws so far."""
        variance = {n: m2 / (self.count - 1) for n, m2 in self.m2.items()}
        draws = None if self.draws is None else {n: torch.cat(d) for n, d in self.draws.items()}
        return GradientStats(dict(self.mean), variance, dict(groups), self.count, method, loss,
                             draws)


def _summarize(means: list[Tensor], variances: list[Tensor]) -> dict[str, float]:
    m = torch.cat([t.reshape(-1) for t in means])
    v = torch.cat([t.reshape(-1) for t in variances])
    norm, total = float(m.norm()), float(v.sum())
    snr = norm / math.sqrt(total) if total > 0 else (math.inf if norm > 0 else math.nan)
    elementwise = m.abs() / v.sqrt()
    finite = elementwise[~torch.isnan(elementwise)]
    return {"numel": int(m.numel()), "mean_norm": norm, "variance": total, "snr": snr,
            "mean_snr": float(finite.mean()) if finite.numel() else math.nan}


class GradientStats:
    """Mean, variance and signal-to-noise ratio of a gradient estimator, per parameter
    (as returned by :func:`~pyro_wakesleep.diagnostics.gradient_stats`).

    Per element: ``mean[name]``, ``variance[name]`` (unbiased) and ``snr[name]``
    :math:`= |\\bar g| / s` (NaN where both are zero). Per tensor or group
    (:meth:`to_dataframe`, :meth:`summary`): ``numel``; ``mean_norm``
    :math:`\\|\\bar g\\|_2`; ``variance`` :math:`\\sum s^2` (the trace of the
    covariance); ``snr`` :math:`\\|\\bar g\\|_2 / \\sqrt{\\sum s^2}`; ``mean_snr``, the
    average elementwise SNR.

    :ivar dict groups: parameter name to ``"model"``, ``"guide"``, ``"shared"``,
        ``"control_variates"`` or ``"other"``.
    :ivar int num_draws: number of draws.
    :ivar str method: ``"batched"`` or ``"sequential"``.
    :ivar str loss: the objective's class name.
    :ivar dict draws: the ``(num_draws, *shape)`` draws, if kept.
    """

    def __init__(self, mean: dict[str, Tensor], variance: dict[str, Tensor],
                 groups: dict[str, str], num_draws: int, method: str, loss: str,
                 draws: dict[str, Tensor] | None = None) -> None:
        self.mean, self.variance, self.groups = mean, variance, groups
        self.num_draws, self.method, self.loss, self.draws = num_draws, method, loss, draws

    @property
    def snr(self) -> dict[str, Tensor]:
        """Elementwise signal-to-noise ratio :math:`|\\bar g| / s` of each parameter."""
        return {n: self.mean[n].abs() / self.variance[n].sqrt() for n in self.mean}

    def rows(self, by: str = "parameter") -> list[dict[str, Any]]:
        """The table as a list of dicts, one per parameter (``by="parameter"``) or per
        group (``by="group"``)."""
        if by == "parameter":
            return [{"parameter": n, "group": self.groups[n],
                     **_summarize([self.mean[n]], [self.variance[n]])} for n in self.mean]
        if by != "group":
            raise ValueError(f"by must be 'parameter' or 'group', got {by!r}")
        order = list(dict.fromkeys(self.groups[n] for n in self.mean))
        return [{"group": g, **_summarize(
            [self.mean[n] for n in self.mean if self.groups[n] == g],
            [self.variance[n] for n in self.mean if self.groups[n] == g])} for g in order]

    def to_dataframe(self, by: str = "parameter") -> Any:
        """A :class:`pandas.DataFrame` of :meth:`rows` (pandas is imported here)."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("to_dataframe needs pandas: pip install pandas") from err
        key = "parameter" if by == "parameter" else "group"
        return pd.DataFrame(self.rows(by)).set_index(key)

    def summary(self) -> Any:
        """:meth:`to_dataframe` per group (model, guide, ...)."""
        return self.to_dataframe(by="group")

    def __repr__(self) -> str:
        head = (f"GradientStats({self.loss}, {self.num_draws} draws, {self.method})\n"
                f"{'':38s}{'numel':>9s}{'|mean|':>11s}{'variance':>11s}{'snr':>9s}"
                f"{'mean_snr':>10s}")
        lines = [head]
        for label, rows in (("group", self.rows("group")), ("parameter", self.rows())):
            for row in rows:
                name = str(row[label])[:36] if label == "group" else "  " + str(row[label])[:34]
                lines.append(f"{name:38s}{row['numel']:9d}{row['mean_norm']:11.4g}"
                             f"{row['variance']:11.4g}{row['snr']:9.3g}{row['mean_snr']:10.3g}")
        return "\n".join(lines)


class EstimatorComparison(Mapping[str, GradientStats]):
    """The :class:`GradientStats` of several estimators (from
    :func:`~pyro_wakesleep.diagnostics.compare_estimators`), by display name."""

    def __init__(self, stats: Mapping[str, GradientStats]) -> None:
        self.stats = dict(stats)

    def __getitem__(self, name: str) -> GradientStats:
        return self.stats[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.stats)

    def __len__(self) -> int:
        return len(self.stats)

    def to_dataframe(self, by: str = "group") -> Any:
        """One row per estimator and group (or parameter, ``by="parameter"``)."""
        import pandas as pd

        frames = {name: s.to_dataframe(by) for name, s in self.stats.items()}
        return pd.concat(frames, names=["estimator"])

    def plot(self, by: str = "group", figsize: tuple[float, float] = (10.0, 4.0)) -> Any:
        """A :class:`matplotlib.figure.Figure`: total variance (log scale) and SNR of each
        estimator, per group (or parameter), side by side.

        :rtype: matplotlib.figure.Figure
        """
        import matplotlib.pyplot as plt
        import numpy as np

        key = "group" if by == "group" else "parameter"
        tables = {name: {r[key]: r for r in s.rows(by)} for name, s in self.stats.items()}
        labels = list(dict.fromkeys(k for t in tables.values() for k in t))
        fig, axes = plt.subplots(1, 2, figsize=figsize)
        width = 0.8 / max(len(tables), 1)
        x = np.arange(len(labels))
        for i, (name, table) in enumerate(tables.items()):
            for ax, column in zip(axes, ("variance", "snr"), strict=True):
                values = [table[k][column] if k in table else np.nan for k in labels]
                ax.bar(x + (i - (len(tables) - 1) / 2) * width, values, width, label=name)
        for ax, title in zip(axes, ("total gradient variance", "signal-to-noise ratio"),
                             strict=True):
            ax.set_xticks(x, labels, rotation=30 if by != "group" else 0)
            ax.set_title(title)
        axes[0].set_yscale("log")
        axes[1].legend()
        fig.tight_layout()
        return fig

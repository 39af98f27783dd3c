"""The record of a training run (:func:`pyro_wakesleep.fit`): loss per step, held-out
estimates, and gradient statistics; to pandas, xarray/ArviZ, and a plot."""

from __future__ import annotations

import math
from typing import Any

from pyro_wakesleep.diagnostics.backend import container

__all__ = ["History"]


class History:
    """Loss per step, validation estimates and gradient statistics of a run.

    :ivar list steps: step numbers (1-based).
    :ivar list losses: the loss of each step.
    :ivar list validation: ``(step, value)`` pairs.
    :ivar list gradients: one dict per step and group (``step``, ``group``, ``numel``,
        ``mean_norm``, ``variance``, ``snr``, ``mean_snr``; see
        :class:`~pyro_wakesleep.diagnostics.GradientStats`).
    :ivar bool stopped_early: whether early stopping or a callback ended the run.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.validation: list[tuple[int, float]] = []
        self.gradients: list[dict[str, Any]] = []
        self.stopped_early = False
        self.running_loss = math.nan

    def add_loss(self, step: int, loss: float) -> None:
        """Records a step's loss (and updates the running average shown while training)."""
        self.steps.append(step)
        self.losses.append(float(loss))
        if math.isfinite(loss):
            self.running_loss = (loss if not math.isfinite(self.running_loss)
                                 else 0.9 * self.running_loss + 0.1 * loss)

    def add_validation(self, step: int, value: float) -> None:
        """Records a held-out estimate."""
        self.validation.append((step, float(value)))

    def add_gradients(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Records per-group gradient statistics."""
        self.gradients.extend({"step": step, **row} for row in rows)

    @property
    def best(self) -> tuple[int, float] | None:
        """``(step, value)`` of the lowest validation estimate, if any."""
        return min(self.validation, key=lambda sv: sv[1]) if self.validation else None

    def state(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        return {"steps": list(self.steps), "losses": list(self.losses),
                "validation": list(self.validation), "gradients": list(self.gradients),
                "stopped_early": self.stopped_early, "running_loss": self.running_loss}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> History:
        """The history saved by :meth:`state`."""
        history = cls()
        for key, value in state.items():
            setattr(history, key, value)
        return history

    def to_dataframe(self) -> Any:
        """A :class:`pandas.DataFrame` indexed by step: ``loss`` and ``validation`` (NaN
        where none was taken)."""
        import pandas as pd

        frame = pd.DataFrame({"loss": self.losses}, index=pd.Index(self.steps, name="step"))
        frame["validation"] = pd.Series(dict(self.validation), dtype=float)
        return frame

    def gradients_dataframe(self) -> Any:
        """The gradient statistics as a :class:`pandas.DataFrame` indexed by
        ``(step, group)``."""
        import pandas as pd

        if not self.gradients:
            return pd.DataFrame()
        return pd.DataFrame(self.gradients).set_index(["step", "group"])

    def to_xarray(self) -> Any:
        """An :class:`xarray.Dataset`: ``loss`` over ``step``, ``validation`` over
        ``validation_step``, and the gradient statistics over ``(gradient_step, group)``."""
        import numpy as np
        import xarray as xr

        data: dict[str, Any] = {"loss": ("step", np.asarray(self.losses))}
        coords: dict[str, Any] = {"step": np.asarray(self.steps, dtype=int)}
        if self.validation:
            steps, values = zip(*self.validation, strict=True)
            data["validation"] = ("validation_step", np.asarray(values))
            coords["validation_step"] = np.asarray(steps)
        if self.gradients:
            table = self.gradients_dataframe()
            cube = table.drop(columns="numel").to_xarray()
            for name in cube.data_vars:
                data[f"gradient_{name}"] = cube[name].rename(step="gradient_step")
        return xr.Dataset(data, coords=coords)

    def to_arviz(self) -> Any:
        """The history as the group ``training`` of the installed ArviZ's data structure
        (:class:`arviz.InferenceData` or :class:`xarray.DataTree`), to keep or merge with
        the result of :func:`~pyro_wakesleep.diagnostics.to_arviz`."""
        return container({"training": self.to_xarray()})

    def plot(self, figsize: tuple[float, float] = (10.0, 4.0)) -> Any:
        """A :class:`matplotlib.figure.Figure`: loss and validation per step, and the
        gradient SNR per group when recorded.

        :rtype: matplotlib.figure.Figure
        """
        import matplotlib.pyplot as plt

        panels = 2 if self.gradients else 1
        fig, axes = plt.subplots(1, panels, figsize=figsize, squeeze=False)
        ax = axes[0][0]
        ax.plot(self.steps, self.losses, lw=0.8, label="loss")
        if self.validation:
            ax.plot(*zip(*self.validation, strict=True), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        if self.gradients:
            table = self.gradients_dataframe()["snr"].unstack("group")
            table.plot(ax=axes[0][1], logy=True, marker=".")
            axes[0][1].set_title("gradient signal-to-noise ratio")
        fig.tight_layout()
        return fig

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        last = f", last loss {self.losses[-1]:.4g}" if self.losses else ""
        best = f", best validation {self.best[1]:.4g} at step {self.best[0]}" if self.best else ""
        return f"History({len(self)} steps{last}{best})"

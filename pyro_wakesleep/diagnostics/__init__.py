"""Diagnostics that only read the training state: gradient variance and signal-to-noise
of an objective's estimator, export to ArviZ, and Pareto k-hat / PSIS-LOO of a guide.
ArviZ, pandas and matplotlib are imported only when a function that needs them runs."""

from pyro_wakesleep.diagnostics.arviz import arviz_backend, to_arviz
from pyro_wakesleep.diagnostics.gradients import (
    EstimatorComparison,
    GradientStats,
    compare_estimators,
    gradient_stats,
)
from pyro_wakesleep.diagnostics.history import History
from pyro_wakesleep.diagnostics.psis import log_importance_weights, psis_khat, variational_loo

__all__ = [
    "EstimatorComparison",
    "GradientStats",
    "History",
    "arviz_backend",
    "compare_estimators",
    "gradient_stats",
    "log_importance_weights",
    "psis_khat",
    "to_arviz",
    "variational_loo",
]

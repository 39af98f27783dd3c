"""Diagnostics that only read the training state: gradient variance and signal-to-noise
of an objective's estimator, conversion to ArviZ, and Pareto k-hat / PSIS-LOO of a guide.
ArviZ, pandas and matplotlib are imported only when a function that needs them runs."""

from pyro_wakesleep.diagnostics.backend import arviz_backend
from pyro_wakesleep.diagnostics.converters import from_guide, from_mcmc, from_samples, to_arviz
from pyro_wakesleep.diagnostics.gradients import compare_estimators, gradient_stats
from pyro_wakesleep.diagnostics.history import History
from pyro_wakesleep.diagnostics.psis import log_importance_weights, psis_khat, variational_loo
from pyro_wakesleep.diagnostics.results import EstimatorComparison, GradientStats

__all__ = [
    "EstimatorComparison",
    "GradientStats",
    "History",
    "arviz_backend",
    "compare_estimators",
    "from_guide",
    "from_mcmc",
    "from_samples",
    "gradient_stats",
    "log_importance_weights",
    "psis_khat",
    "to_arviz",
    "variational_loo",
]

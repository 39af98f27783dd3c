"""Inference objectives: each is a :class:`pyro.infer.ELBO` usable with
:class:`pyro.infer.SVI` or, through ``objective(model, guide)``, with plain PyTorch."""

from pyro_wakesleep.objectives._base import Objective, ObjectiveModule
from pyro_wakesleep.objectives.score_function import ScoreFunctionELBO

__all__ = ["Objective", "ObjectiveModule", "ScoreFunctionELBO"]

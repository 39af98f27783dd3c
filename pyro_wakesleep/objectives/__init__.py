"""Inference objectives: each is a :class:`pyro.infer.ELBO` usable with
:class:`pyro.infer.SVI` or, through ``objective(model, guide)``, with plain PyTorch."""

from pyro_wakesleep.objectives.base import Objective
from pyro_wakesleep.objectives.disarm import DisarmELBO
from pyro_wakesleep.objectives.module import ObjectiveModule
from pyro_wakesleep.objectives.rebar import RebarELBO
from pyro_wakesleep.objectives.relax import RelaxELBO
from pyro_wakesleep.objectives.score_function import ScoreFunctionELBO
from pyro_wakesleep.objectives.vimco import VimcoELBO
from pyro_wakesleep.objectives.wake_sleep import ReweightedWakeSleepELBO, WakeSleepELBO

__all__ = [
    "DisarmELBO",
    "Objective",
    "ObjectiveModule",
    "RebarELBO",
    "RelaxELBO",
    "ReweightedWakeSleepELBO",
    "ScoreFunctionELBO",
    "VimcoELBO",
    "WakeSleepELBO",
]

"""Inference objectives: each is a :class:`pyro.infer.ELBO` usable with
:class:`pyro.infer.SVI` or, through ``objective(model, guide)``, with plain PyTorch."""

from pyro_wakesleep.objectives.base import Objective
from pyro_wakesleep.objectives.disarm import DisarmELBO
from pyro_wakesleep.objectives.double_cv import DoubleControlVariateELBO
from pyro_wakesleep.objectives.indecater import IndecaterELBO
from pyro_wakesleep.objectives.module import ObjectiveModule
from pyro_wakesleep.objectives.rebar import RebarELBO
from pyro_wakesleep.objectives.relax import RelaxELBO
from pyro_wakesleep.objectives.rodeo import RodeoELBO
from pyro_wakesleep.objectives.score_function import ScoreFunctionELBO
from pyro_wakesleep.objectives.unordered_set import UnorderedSetELBO
from pyro_wakesleep.objectives.vimco import VimcoELBO
from pyro_wakesleep.objectives.wake_sleep import ReweightedWakeSleepELBO, WakeSleepELBO

__all__ = [
    "DisarmELBO",
    "DoubleControlVariateELBO",
    "IndecaterELBO",
    "Objective",
    "ObjectiveModule",
    "RebarELBO",
    "RelaxELBO",
    "ReweightedWakeSleepELBO",
    "RodeoELBO",
    "ScoreFunctionELBO",
    "UnorderedSetELBO",
    "VimcoELBO",
    "WakeSleepELBO",
]

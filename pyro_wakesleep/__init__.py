"""pyro_wakesleep: score-function, multi-sample and wake-sleep objectives for Pyro."""

from pyro_wakesleep.control_variates import (
    ControlVariate,
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    NeuralBaseline,
    TraceGraphBaseline,
)
from pyro_wakesleep.diagnostics import History
from pyro_wakesleep.objectives import (
    DisarmELBO,
    DoubleControlVariateELBO,
    IndecaterELBO,
    Objective,
    ObjectiveModule,
    RebarELBO,
    RelaxELBO,
    ReweightedWakeSleepELBO,
    RodeoELBO,
    ScoreFunctionELBO,
    UnorderedSetELBO,
    VimcoELBO,
    WakeSleepELBO,
)
from pyro_wakesleep.relaxed_sites import RelaxedSite, relax, relaxed
from pyro_wakesleep.training import StepInfo, fit

__version__ = "0.1.0.dev0"

__all__ = [
    "ControlVariate",
    "DisarmELBO",
    "DoubleControlVariateELBO",
    "History",
    "IndecaterELBO",
    "LeaveOneOutBaseline",
    "MovingAverageBaseline",
    "NeuralBaseline",
    "Objective",
    "ObjectiveModule",
    "RebarELBO",
    "RelaxELBO",
    "RelaxedSite",
    "ReweightedWakeSleepELBO",
    "RodeoELBO",
    "ScoreFunctionELBO",
    "StepInfo",
    "TraceGraphBaseline",
    "UnorderedSetELBO",
    "VimcoELBO",
    "WakeSleepELBO",
    "__version__",
    "fit",
    "relax",
    "relaxed",
]

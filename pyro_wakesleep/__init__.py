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
    Objective,
    ObjectiveModule,
    RebarELBO,
    RelaxELBO,
    ReweightedWakeSleepELBO,
    ScoreFunctionELBO,
    VimcoELBO,
    WakeSleepELBO,
)
from pyro_wakesleep.relaxed_sites import RelaxedSite, relax, relaxed
from pyro_wakesleep.training import StepInfo, fit

__version__ = "0.1.0.dev0"

__all__ = [
    "ControlVariate",
    "DisarmELBO",
    "History",
    "LeaveOneOutBaseline",
    "MovingAverageBaseline",
    "NeuralBaseline",
    "Objective",
    "ObjectiveModule",
    "RebarELBO",
    "RelaxELBO",
    "RelaxedSite",
    "ReweightedWakeSleepELBO",
    "ScoreFunctionELBO",
    "StepInfo",
    "TraceGraphBaseline",
    "VimcoELBO",
    "WakeSleepELBO",
    "__version__",
    "fit",
    "relax",
    "relaxed",
]

"""pyro_wakesleep: score-function, multi-sample and wake-sleep objectives for Pyro."""

from pyro_wakesleep.control_variates import (
    ControlVariate,
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    NeuralBaseline,
)
from pyro_wakesleep.objectives import (
    Objective,
    ObjectiveModule,
    ReweightedWakeSleepELBO,
    ScoreFunctionELBO,
    WakeSleepELBO,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "ControlVariate",
    "LeaveOneOutBaseline",
    "MovingAverageBaseline",
    "NeuralBaseline",
    "Objective",
    "ObjectiveModule",
    "ReweightedWakeSleepELBO",
    "ScoreFunctionELBO",
    "WakeSleepELBO",
    "__version__",
]

"""Control variates for score-function gradients.

Every control variate is a :class:`torch.nn.Module` that implements one small protocol,
:class:`ControlVariate`: given the (detached) learning signal :math:`f` of one guide
site, it returns the *advantage* :math:`\\hat f` that multiplies
:math:`\\nabla_\\phi \\log q_\\phi(z)` in the surrogate, and a loss for its own learned
parameters (zero for those without any).

Running state (moving averages) lives in registered buffers and learned weights in
parameters, so ``state_dict()`` / ``load_state_dict()`` save and restore all of it.
Running state is updated only when the objective computes gradients and the module is in
training mode (``cv.train()``, the default); ``cv.eval()`` freezes it, as for
:class:`torch.nn.BatchNorm1d`.
"""

from pyro_wakesleep.control_variates.base import Advantage, ControlVariate, SiteContext
from pyro_wakesleep.control_variates.leave_one_out import LeaveOneOutBaseline
from pyro_wakesleep.control_variates.moving_average import MovingAverageBaseline
from pyro_wakesleep.control_variates.neural import NeuralBaseline
from pyro_wakesleep.control_variates.tracegraph import TraceGraphBaseline

__all__ = [
    "Advantage",
    "ControlVariate",
    "LeaveOneOutBaseline",
    "MovingAverageBaseline",
    "NeuralBaseline",
    "SiteContext",
    "TraceGraphBaseline",
]

"""The compiled path of an objective (``jit=True``): one training step recorded once as
a graph of tensor operations and replayed without Python's model, guide, effect handlers
or distribution objects, with running state threaded through it explicitly. The
user-facing account is the ``jit`` keyword of
:class:`~pyro_wakesleep.objectives.Objective` and the docs page "Compiled objectives".

It sits below the objectives: it knows an objective only through
:class:`~pyro_wakesleep.compiled.step.Steppable` (its step, control variates and
outputs). Modules: :mod:`.options` (``jit_options``), :mod:`.signature` (what a graph
is valid for), :mod:`.checks` (what recording refuses, by mechanism), :mod:`.recording`,
:mod:`.simplify` (graph passes), :mod:`.verification` (replays checked against the eager
step), :mod:`.step` (the dispatch), and the training step around it: :mod:`.training`
(loss, gradients and optimizer update recorded together, by :mod:`.below_autograd`) and
:mod:`.optimizers` (the updates of torch's Adam, AdamW and SGD, operation for operation).
"""

from pyro_wakesleep.compiled.options import check_jit_options
from pyro_wakesleep.compiled.step import CompiledStep, Steppable

__all__ = ["CompiledStep", "Steppable", "check_jit_options"]

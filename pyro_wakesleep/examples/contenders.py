"""The objectives that :func:`~pyro_wakesleep.examples.compare.compare` trains, and how one
training step of each is taken: through :class:`pyro.infer.SVI` on one process, or with
:class:`~torch.nn.parallel.DistributedDataParallel` around ``objective(model, guide)`` on
every rank of a ``torch.distributed`` process group.

Neither :mod:`~pyro_wakesleep.examples.compare` nor
:mod:`~pyro_wakesleep.examples.parallel` is imported here: both import this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, SVI, TraceGraph_ELBO
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pyro_wakesleep.control_variates import (
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    NeuralBaseline,
)
from pyro_wakesleep.distributed import _rank_and_world
from pyro_wakesleep.examples.models import SigmoidBeliefNet
from pyro_wakesleep.objectives import (
    DisarmELBO,
    RebarELBO,
    RelaxELBO,
    ReweightedWakeSleepELBO,
    ScoreFunctionELBO,
    VimcoELBO,
    WakeSleepELBO,
)

__all__ = ["DEFAULT_OBJECTIVES", "OBJECTIVES", "Contender", "data_parallel_objectives"]

#: ``factory(num_particles, net, jit=False) -> (loss, guide)``
Factory = Callable[..., tuple[ELBO, Callable]]


def _decaying_average(guide: Callable) -> Callable:
    """The guide with every latent site declaring TraceGraph_ELBO's decaying-average
    baseline (Pyro's own best option for these models)."""
    options: Any = {"baseline": {"use_decaying_avg_baseline": True}}
    return poutine.infer_config(guide, config_fn=lambda msg: options)


def _nvil(width: int) -> NeuralBaseline:
    return NeuralBaseline(nn.Sequential(nn.Linear(width, 100), nn.Tanh(), nn.Linear(100, 1)))


#: Named objectives: ``factory(num_particles, net, jit=False) -> (loss, guide)``
#: (``jit``: the objective's ``jit`` option, where it has one). An entry whose loss has a
#: ``differentiable_loss`` also runs data-parallel (:func:`data_parallel_objectives`).
OBJECTIVES: dict[str, Factory] = {
    # Pyro's JitTraceGraph_ELBO raises with its decaying-average baseline (Pyro 1.9.2), so
    # this row stays eager under jit=True
    "pyro-tracegraph": lambda k, net, jit=False: (
        TraceGraph_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1),
        _decaying_average(net.guide),
    ),
    "sf": lambda k, net, jit=False: (
        ScoreFunctionELBO(k, max_plate_nesting=1, jit=jit), net.guide),
    "sf-average": lambda k, net, jit=False: (
        ScoreFunctionELBO(k, MovingAverageBaseline(), max_plate_nesting=1, jit=jit), net.guide
    ),
    "sf-nvil": lambda k, net, jit=False: (
        ScoreFunctionELBO(k, _nvil(net.sizes[0]), max_plate_nesting=1, jit=jit), net.guide
    ),
    "sf-loo": lambda k, net, jit=False: (
        ScoreFunctionELBO(k, LeaveOneOutBaseline(), max_plate_nesting=1, jit=jit), net.guide
    ),
    "ws": lambda k, net, jit=False: (WakeSleepELBO(k, max_plate_nesting=1, jit=jit), net.guide),
    "rws": lambda k, net, jit=False: (
        ReweightedWakeSleepELBO(max(k, 2), max_plate_nesting=1, jit=jit), net.guide),
    "vimco": lambda k, net, jit=False: (
        VimcoELBO(max(k, 2), max_plate_nesting=1, jit=jit), net.guide),
    # as many model evaluations per step as k particles: a DisARM draw costs 1 + L runs,
    # a REBAR/RELAX draw 1 + 2L (they refuse jit=True's recording and run eagerly)
    "disarm": lambda k, net, jit=False: (
        DisarmELBO(max(1, k // (1 + net.num_layers)), max_plate_nesting=1, jit=jit), net.guide
    ),
    "rebar": lambda k, net, jit=False: (
        RebarELBO(max(1, k // (1 + 2 * net.num_layers)), max_plate_nesting=1), net.guide
    ),
    "relax": lambda k, net, jit=False: (
        RelaxELBO(max(1, k // (1 + 2 * net.num_layers)), max_plate_nesting=1), net.guide
    ),
}

#: The objectives the main job compares by default (``--full``: all of :data:`OBJECTIVES`):
#: one of each family. Left out: ``sf-average`` (the same estimator as Pyro's row),
#: ``rebar`` and ``relax`` (a double backward per step: slow on a CPU budget).
DEFAULT_OBJECTIVES: tuple[str, ...] = (
    "pyro-tracegraph", "sf", "sf-nvil", "sf-loo", "vimco", "disarm", "rws", "ws",
)


def data_parallel_objectives(objectives: Sequence[str] = tuple(OBJECTIVES)) -> list[str]:
    """The names among ``objectives`` that can be trained data-parallel: those whose loss
    has a ``differentiable_loss`` (every objective of this package; not Pyro's
    ``TraceGraph_ELBO``), so that ``loss(model, guide)`` is a module that
    :class:`~torch.nn.parallel.DistributedDataParallel` can wrap.

    :param objectives: names from :data:`OBJECTIVES`.
    :rtype: list[str]
    """
    net = SigmoidBeliefNet((2, 1))
    return [name for name in objectives if name in OBJECTIVES and callable(
        getattr(OBJECTIVES[name](2, net)[0], "differentiable_loss", None))]


def check_data_parallel(objectives: Sequence[str], devices: int, batch_size: int) -> None:
    """Raises ``ValueError`` unless every objective can run data-parallel and the global
    batch splits evenly over ``devices`` ranks."""
    ok = data_parallel_objectives(objectives)
    refused = [name for name in objectives if name not in ok]
    if refused:
        raise ValueError(f"objective(s) {refused} have no differentiable_loss and cannot be "
                         f"trained data-parallel; choose from {ok or data_parallel_objectives()}")
    if batch_size % devices:
        raise ValueError(f"batch_size={batch_size} must be a multiple of devices={devices} "
                         "(the global batch is split evenly over the ranks)")


class Contender:
    """One objective in training: its network, loss, guide, optimizer, batches and its own
    random stream (so that interleaving the objectives changes none of their draws).

    On a process group (more than one rank), each step trains
    ``DistributedDataParallel(loss(model, guide))`` on this rank's shard of the global
    batch; otherwise it is an :class:`~pyro.infer.SVI` step.

    :param str name: the objective's name in :data:`OBJECTIVES`.
    :param SigmoidBeliefNet net: the network it trains (its own copy).
    :param Tensor train: training images ``(n, D)``.
    :param int num_particles: particles per step.
    :param int batch_size: the global batch size.
    :param float learning_rate: Adam's step size.
    :param int seed: seed of the batches (the same for every contender) and of the draws
        (``seed + rank``).
    :param bool jit: the objective's ``jit`` option.
    """

    def __init__(self, name: str, net: SigmoidBeliefNet, train: Tensor, *, num_particles: int,
                 batch_size: int, learning_rate: float, seed: int, jit: bool = False) -> None:
        rank, world = _rank_and_world()
        self.name, self.net = name, net
        self.loss, self.guide = OBJECTIVES[name](num_particles, net, jit=jit)
        self.per_rank = batch_size // world
        self._train = train
        # the same batches for every contender: a permutation per epoch from one stream
        self._order = torch.Generator().manual_seed(seed)
        self._epoch: list[int] = []
        self._rank, self._world = rank, world
        self.times: list[float] = []  # seconds of each step
        self.losses: list[float] = []  # loss per datapoint of each step
        self.elapsed = 0.0  # the sum of times
        if world > 1:
            module: Any = self.loss(net.model, self.guide)  # type: ignore[arg-type]
            module.initialize(train[:self.per_rank])  # lazily built control variates
            self._ddp = DistributedDataParallel(module)
            self._optimizer = torch.optim.Adam(module.parameters(), lr=learning_rate)
        else:
            optim = pyro.optim.Adam({"lr": learning_rate})  # type: ignore[attr-defined]
            self._svi = SVI(net.model, self.guide, optim, self.loss)
        self._cuda = train.is_cuda
        with torch.random.fork_rng(devices=[train.device] if self._cuda else []):
            pyro.set_rng_seed(seed + rank)  # each rank its own draws
            self._rng = self._get_rng()

    def batch(self) -> Tensor:
        """The next global batch's rows for this rank (epochs of a fixed permutation)."""
        need = self.per_rank * self._world
        if len(self._epoch) < need:
            self._epoch = torch.randperm(len(self._train), generator=self._order).tolist()
        rows, self._epoch = self._epoch[:need], self._epoch[need:]
        return self._train[rows[self._rank::self._world]]

    def step(self, x: Tensor) -> float:
        """One optimizer step on ``x``; returns the loss per datapoint (nats)."""
        if self._world > 1:
            self._optimizer.zero_grad()
            loss = self._ddp(x)
            loss.backward()
            self._optimizer.step()
            return float(loss.detach()) / len(x)
        return float(self._svi.step(x)) / len(x)

    def _get_rng(self) -> tuple[Tensor, Tensor | None]:
        return torch.get_rng_state(), torch.cuda.get_rng_state() if self._cuda else None

    def _set_rng(self, state: tuple[Tensor, Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1])

    def __enter__(self) -> Contender:
        """Switches the global random streams (CPU, and the current GPU's where the data
        lives on one) to this contender's own."""
        self._outer = self._get_rng()
        self._set_rng(self._rng)
        return self

    def __exit__(self, *exc: object) -> None:
        self._rng = self._get_rng()
        self._set_rng(self._outer)

"""What each rank runs in tests/test_distributed.py, and the same computations done one
after another in a single process (the reference). Module-level so that
``torch.multiprocessing.spawn`` can pickle the entry point."""

from __future__ import annotations

import datetime
import os

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as tdist
from models import MixedGuide, MixedModel
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from pyro_wakesleep import (
    DisarmELBO,
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    NeuralBaseline,
    ReweightedWakeSleepELBO,
    ScoreFunctionELBO,
    VimcoELBO,
    WakeSleepELBO,
)

WORLD = 2
STEPS = 2
LR = 0.05
#: the global batch: 8 datapoints, 4 per rank
DATA = torch.tensor([-2.0, -0.5, 0.3, 1.7, 3.5, 5.0, -1.2, 0.9])
CONFIGS = (
    "sf_moving_average", "sf_neural", "sf_leave_one_out", "vimco", "disarm",
    "wake_sleep", "rws",
)


class Affine(nn.Module):
    """b(x) = c0 + c1 x, per datapoint (NVIL's input-dependent baseline)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor([0.3, -0.2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c[0] + self.c[1] * x


def make_objective(name: str):
    if name == "sf_moving_average":
        return ScoreFunctionELBO(2, control_variate=MovingAverageBaseline(beta=0.5))
    if name == "sf_neural":
        return ScoreFunctionELBO(2, control_variate=NeuralBaseline(Affine(), decay=0.5))
    if name == "sf_leave_one_out":
        return ScoreFunctionELBO(3, control_variate=LeaveOneOutBaseline())
    if name == "vimco":
        return VimcoELBO(3)
    if name == "disarm":
        return DisarmELBO(2)
    if name == "wake_sleep":
        return WakeSleepELBO(2)
    if name == "rws":
        return ReweightedWakeSleepELBO(3)
    raise ValueError(name)


def shard(rank: int) -> torch.Tensor:
    """Rank ``rank``'s indices of DATA, as a DistributedSampler without shuffling gives."""
    sampler = DistributedSampler(range(len(DATA)), num_replicas=WORLD, rank=rank, shuffle=False)
    return torch.tensor(list(sampler))


def seed(step: int, rank: int) -> int:
    return 1000 * step + rank


def build(name: str):
    pyro.clear_param_store()
    torch.manual_seed(0)
    module = make_objective(name)(MixedModel(), MixedGuide())
    pyro.set_rng_seed(7)
    module.initialize(DATA[shard(0)])  # lazily built control variates exist before DDP
    return module


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def cv_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.control_variates.state_dict().items()}


class SubsampledModel(MixedModel):
    """MixedModel in a data plate of the full size that subsamples this rank's shard."""

    def forward(self, x, idx=None, size=None):
        pyro.module("model", self, update_module_params=True)
        w = self.w
        with pyro.plate("data", size, subsample=idx):
            z = pyro.sample("z", dist.Bernoulli(logits=w[0]))
            y = pyro.sample("y", dist.Normal(w[1] * z + w[2], 1.0))
            pyro.sample("x", dist.Normal(y, 0.5), obs=x)


class SubsampledGuide(MixedGuide):
    def forward(self, x, idx=None, size=None):
        pyro.module("guide", self, update_module_params=True)
        a = self.a
        with pyro.plate("data", size, subsample=idx):
            z = pyro.sample("z", dist.Bernoulli(logits=a[0] + a[1] * x))
            pyro.sample("y", dist.Normal(a[2] + a[3] * x + a[4] * z, a[5].exp()))


def subsampled_grads(rank: int, ddp: bool) -> dict[str, torch.Tensor]:
    """One step of ScoreFunctionELBO on rank ``rank``'s shard in a plate of the full size
    (scale N / n per datapoint), its gradient averaged over ranks by DDP."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    module = ScoreFunctionELBO(2, control_variate=LeaveOneOutBaseline())(
        SubsampledModel(), SubsampledGuide()
    )
    wrapped = DistributedDataParallel(module) if ddp else module
    idx = shard(rank)
    pyro.set_rng_seed(seed(0, rank))
    wrapped(DATA[idx], idx=idx, size=len(DATA)).backward()
    return grads(module)


def worker(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of WORLD: every objective under DDP for STEPS steps."""
    try:
        tdist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
            timeout=datetime.timedelta(seconds=60),
        )
    except Exception as error:  # the backend cannot start here: the test skips
        torch.save({"init_error": repr(error)}, os.path.join(out, f"rank{rank}.pt"))
        return
    torch.set_num_threads(1)
    pyro.enable_validation(True)
    results: dict = {}
    try:
        for name in CONFIGS:
            module = build(name)
            ddp = DistributedDataParallel(module)
            optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
            x = DATA[shard(rank)]
            steps = []
            for t in range(STEPS):
                pyro.set_rng_seed(seed(t, rank))
                optimizer.zero_grad()
                ddp(x).backward()
                steps.append((grads(module), cv_state(module)))
                optimizer.step()
            results[name] = steps
        results["subsampled"] = subsampled_grads(rank, ddp=True)
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        tdist.destroy_process_group()

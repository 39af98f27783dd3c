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
    RebarELBO,
    RelaxELBO,
    ReweightedWakeSleepELBO,
    ScoreFunctionELBO,
    VimcoELBO,
    WakeSleepELBO,
)

WORLD = 2
STEPS = 3  # the third replays a compiled step (the *_jit configurations)
LR = 0.05
#: the global batch: 8 datapoints, 4 per rank
DATA = torch.tensor([-2.0, -0.5, 0.3, 1.7, 3.5, 5.0, -1.2, 0.9])
CONFIGS = (
    "sf_moving_average", "sf_neural", "sf_leave_one_out", "vimco", "disarm",
    "wake_sleep", "rws", "rebar", "relax", "vimco_jit", "rws_jit",
    "sf_enum_leave_one_out", "sf_enum_moving_average",
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
    if name == "vimco_jit":  # compiled steps under DDP (no control-variate state to reduce)
        return VimcoELBO(3, jit=True)
    if name == "rws_jit":
        return ReweightedWakeSleepELBO(3, jit=True)
    if name == "rebar":  # learned temperature and scale: trained like any DDP parameter
        return RebarELBO(2)
    if name == "relax":
        return RelaxELBO(2)
    if name == "sf_enum_leave_one_out":  # EnumModel: assignments summed out, a sampled switch
        return ScoreFunctionELBO(3, control_variate=LeaveOneOutBaseline(), max_plate_nesting=1)
    if name == "sf_enum_moving_average":
        return ScoreFunctionELBO(2, control_variate=MovingAverageBaseline(beta=0.5),
                                 max_plate_nesting=1)
    raise ValueError(name)


class EnumModel(nn.Module):
    """A two-component mixture whose assignments z_i are enumerated (summed out) and whose
    shift is a global switch s that the guide samples (a score-function site)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -1.0, 2.5]))  # weight logit, two locations

    def forward(self, x):
        pyro.module("enum_model", self, update_module_params=True)
        w = self.w
        s = pyro.sample("s", dist.Bernoulli(0.5))
        with pyro.plate("data", x.shape[-1], device=x.device):
            z = pyro.sample("z", dist.Bernoulli(logits=w[0]), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(w[1] + (w[2] - w[1]) * z + 1.5 * s, 1.0), obs=x)


class EnumGuide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.2))

    def forward(self, x):
        pyro.module("enum_guide", self, update_module_params=True)
        pyro.sample("s", dist.Bernoulli(logits=self.a))


def shard(rank: int) -> torch.Tensor:
    """Rank ``rank``'s indices of DATA, as a DistributedSampler without shuffling gives."""
    sampler = DistributedSampler(range(len(DATA)), num_replicas=WORLD, rank=rank, shuffle=False)
    return torch.tensor(list(sampler))


def seed(step: int, rank: int) -> int:
    return 1000 * step + rank


def build(name: str):
    pyro.clear_param_store()
    torch.manual_seed(0)
    model, guide = (EnumModel(), EnumGuide()) if name.startswith("sf_enum") else (
        MixedModel(), MixedGuide())
    module = make_objective(name)(model, guide)
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
            if module.elbo.compiled is not None:  # how many steps replayed a graph
                results[f"{name}:graphs"] = len(module.elbo.compiled.graphs)
        results["subsampled"] = subsampled_grads(rank, ddp=True)
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        tdist.destroy_process_group()


# -- fit() on 2 ranks: checkpoints written by rank 0 only, resumed on any number of ranks ----
FIT_STEPS, FIT_CHECKPOINT_AT = 6, 3


def fit_setup(rank: int, world: int):
    """sf_neural (parameters, buffers and Adam state to restore) on this rank's loader:
    the global batch of 4 in one process, 2 per rank (a DistributedSampler) on 2 ranks,
    so that batch i of every rank together is global batch i."""
    from torch.utils.data import DataLoader, TensorDataset

    module = build("sf_neural")
    wrapped = DistributedDataParallel(module) if world > 1 else module
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)
    dataset = TensorDataset(DATA)
    if world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        loader = DataLoader(dataset, batch_size=4 // world, sampler=sampler)
    else:
        loader = DataLoader(dataset, batch_size=4, shuffle=False)
    pyro.set_rng_seed(100 + rank)  # each rank its own stream
    return module, wrapped, optimizer, loader


def fit_run(rank: int, world: int, steps: int, checkpoint: str, validation: bool = True,
            callbacks=()):
    """fit() with a checkpoint; returns the final state, the history and how many times
    this rank wrote a checkpoint."""
    import pyro_wakesleep.training as training

    module, wrapped, optimizer, loader = fit_setup(rank, world)
    saves = []
    original = training.save_checkpoint

    def counting(path, state):
        saves.append(state["step"])
        original(path, state)

    training.save_checkpoint = counting
    try:
        history = training.fit(
            wrapped, loader, steps, optimizer=optimizer, checkpoint=checkpoint,
            checkpoint_every=FIT_CHECKPOINT_AT, progress=False,
            validation=(DATA[shard(rank)],) if validation else None, validate_every=2,
            callbacks=callbacks)
    finally:
        training.save_checkpoint = original
    return {"state": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "losses": history.losses, "validation": history.validation, "saves": saves}


def hand_resume(rank: int, world: int, checkpoint: str) -> dict[str, torch.Tensor]:
    """What a 2-rank run does from a checkpoint's state, without fit(): the checkpoint's
    parameters, control-variate and optimizer state, its position in the data, rank 0's
    stream on rank 0 and derived_rng_state's on the others; a plain DDP loop."""
    from pyro.util import set_rng_state

    from pyro_wakesleep.distributed import derived_rng_state

    module, wrapped, optimizer, loader = fit_setup(rank, world)
    saved = torch.load(checkpoint, weights_only=False)
    module.load_state_dict(saved["trainer"]["module"])
    optimizer.load_state_dict(saved["trainer"]["optimizer"])
    first = saved["ranks"][0]
    epoch = saved["data"]["epoch"]
    set_epoch = getattr(loader.sampler, "set_epoch", lambda epoch: None)
    set_rng_state(first["epoch_rng"])
    set_epoch(epoch)
    batches = iter(loader)
    for _ in range(saved["data"]["batch"]):
        next(batches)
    set_rng_state(first["rng"] if rank == 0 else derived_rng_state(first["rng"], rank))
    for _ in range(saved["step"], FIT_STEPS):
        try:
            (x,) = next(batches)
        except StopIteration:
            epoch += 1
            set_epoch(epoch)
            batches = iter(loader)
            (x,) = next(batches)
        optimizer.zero_grad()
        wrapped(x).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def fit_worker(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of 2: an uninterrupted fit(), a fit() stopped at a checkpoint and
    resumed with fresh objects, and a resume from out/one.ckpt (written by 1 process)."""
    import shutil
    import warnings

    try:
        tdist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
            timeout=datetime.timedelta(seconds=60),
        )
    except Exception as error:
        torch.save({"init_error": repr(error)}, os.path.join(out, f"fit{rank}.pt"))
        return
    torch.set_num_threads(1)
    pyro.enable_validation(True)
    path = lambda name: os.path.join(out, name)  # noqa: E731
    results: dict = {}
    try:
        results["straight"] = fit_run(rank, WORLD, FIT_STEPS, path("straight.ckpt"))
        results["first"] = fit_run(rank, WORLD, FIT_CHECKPOINT_AT, path("same.ckpt"))
        if rank == 0:  # kept for the 1-process resume in the test
            shutil.copy(path("same.ckpt"), path("two.ckpt"))
        tdist.barrier()
        results["resumed"] = fit_run(rank, WORLD, FIT_STEPS, path("same.ckpt"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results["from_one"] = fit_run(rank, WORLD, FIT_STEPS, path("one.ckpt"),
                                          validation=False)
        results["from_one_warnings"] = [str(w.message) for w in caught]
        results["from_one_hand"] = hand_resume(rank, WORLD, path("one.ckpt.orig"))
        if rank == 0:
            with open(path("bad.ckpt"), "wb") as f:
                f.write(b"not a checkpoint")
        tdist.barrier()
        try:  # every rank raises the same error: none is left waiting for the others
            fit_run(rank, WORLD, FIT_STEPS, path("bad.ckpt"))
        except ValueError as error:
            results["bad"] = str(error)
        results["stopped"] = fit_run(  # rank 1 alone asks to stop after step 2
            rank, WORLD, FIT_STEPS, path("stop.ckpt"), validation=False,
            callbacks=[lambda info: rank == 1 and info.step == 2])
    finally:
        torch.save(results, path(f"fit{rank}.pt"))
        tdist.destroy_process_group()

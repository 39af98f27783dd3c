"""The Lightning route: ObjectiveLightningModule trains the SBN with every objective, and
Lightning's own checkpointing resumes exactly. Skipped where lightning is missing."""

import math
import warnings

import pyro
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
from pyro_wakesleep.examples.models import SigmoidBeliefNet

pl = pytest.importorskip("lightning.pytorch")
from pyro_wakesleep.lightning import ObjectiveLightningModule  # noqa: E402

PIXELS, BATCH = 16, 8
OBJECTIVES = {
    "sf_average": lambda: ScoreFunctionELBO(2, control_variate=MovingAverageBaseline()),
    "sf_nvil": lambda: ScoreFunctionELBO(
        2, control_variate=NeuralBaseline(nn.Linear(PIXELS, 1))),
    "sf_loo": lambda: ScoreFunctionELBO(3, control_variate=LeaveOneOutBaseline()),
    "vimco": lambda: VimcoELBO(3),
    "disarm": lambda: DisarmELBO(2),
    "wake_sleep": lambda: WakeSleepELBO(2),
    "rws": lambda: ReweightedWakeSleepELBO(3),
}


def _data() -> DataLoader:
    x = torch.bernoulli(torch.full((2 * BATCH, PIXELS), 0.3), generator=torch.Generator()
                        .manual_seed(0))
    return DataLoader(TensorDataset(x), batch_size=BATCH, shuffle=False)


def _module(name: str) -> ObjectiveLightningModule:
    pyro.clear_param_store()
    torch.manual_seed(0)
    sbn = SigmoidBeliefNet((PIXELS, 4), name="sbn")
    loss_module = OBJECTIVES[name]()(sbn.model, sbn.guide)
    loss_module.initialize(next(iter(_data()))[0])
    return ObjectiveLightningModule(loss_module, lr=1e-2)


def _fit(module, max_steps=-1, max_epochs=None, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*GPU available.*")
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=max_epochs,
            enable_progress_bar=False, logger=False, enable_checkpointing=False,
            enable_model_summary=False,
        )
        trainer.fit(module, _data(), **kwargs)
    return trainer


@pytest.mark.parametrize("name", OBJECTIVES)
def test_trains_the_sbn_with_every_objective(name):
    module = _module(name)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = _fit(module, 3)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["loss"])
    moved = [n for n, p in module.named_parameters() if not torch.equal(p, before[n])]
    assert moved, "no parameter changed"


def test_checkpoint_resumes_exactly(tmp_path):
    """1 epoch (2 steps), Lightning's checkpoint, a fresh module resumed to 2 epochs: the
    same parameters and control-variate state as 2 uninterrupted epochs (same seed).
    (A checkpoint written mid-epoch resumes with a re-created data iterator, which draws
    a base seed from torch's generator: exact only at epoch ends.)"""
    pyro.set_rng_seed(5)
    straight = _module("sf_nvil")
    pyro.set_rng_seed(5)
    _fit(straight, max_epochs=2)
    want = {k: v.clone() for k, v in straight.state_dict().items()}

    pyro.set_rng_seed(5)
    first = _module("sf_nvil")
    pyro.set_rng_seed(5)
    trainer = _fit(first, max_epochs=1)
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    pyro.set_rng_seed(123)  # a resumed run restores the streams from the checkpoint
    resumed = _module("sf_nvil")
    _fit(resumed, max_epochs=2, ckpt_path=path)
    got = resumed.state_dict()
    assert got.keys() == want.keys()
    assert any(k.endswith("variance") for k in want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_rejects_what_is_not_an_objective_module():
    with pytest.raises(TypeError, match="ObjectiveModule"):
        ObjectiveLightningModule(nn.Linear(1, 1))  # type: ignore[arg-type]
    module = _module("sf_loo").loss_module
    with pytest.raises(ValueError, match="lr"):
        ObjectiveLightningModule(module, lr=0.0)
    with pytest.raises(TypeError, match="optimizer"):
        ObjectiveLightningModule(module, optimizer=3)  # type: ignore[arg-type]


DDP_SCRIPT = """
import sys, warnings
sys.path.insert(0, {tests!r})
warnings.filterwarnings("ignore")
import pyro, torch
import lightning.pytorch as pl
import test_lightning as T

module = T._module("sf_nvil")
pyro.set_rng_seed(0)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2,
                     enable_progress_bar=False, logger=False, enable_checkpointing=False,
                     enable_model_summary=False)
trainer.fit(module, T._data())
torch.save((trainer.global_step, module.state_dict()), {out!r} + f"/rank{{trainer.global_rank}}.pt")
"""


@pytest.mark.slow  # ~35 s idle on 2 cores (two Lightning processes), minutes under load
def test_ddp_strategy_on_two_processes_holds_identical_state(tmp_path):
    """Trainer(strategy="ddp", devices=2) on CPU: both ranks end with the same parameters
    and control-variate state (gradients averaged by DDP, statistics all-reduced)."""
    import os
    import subprocess
    import sys

    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path)))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "gloo" in result.stderr.lower():
        pytest.skip(f"gloo processes cannot start here: {result.stderr[-500:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    (step0, state0), (step1, state1) = (
        torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert step0 == step1 == 2
    assert any(k.endswith("h1.variance") for k in state0)
    for k in state0:
        assert torch.equal(state0[k], state1[k]), k


def test_logs_loss_per_datapoint_learning_rate_and_validation_through_lightning():
    """Lightning's own logging: "loss", "loss_per_datapoint", "lr" every step (stepped by
    the scheduler), "val_loss" and "val_loss_per_datapoint" from validation batches,
    which leave the control variates' running state as it is."""

    class Recorder(pl.Callback):
        def __init__(self):
            self.metrics = []

        def on_train_batch_end(self, trainer, *args):
            self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    pyro.clear_param_store()
    torch.manual_seed(0)
    sbn = SigmoidBeliefNet((PIXELS, 4), name="sbn")
    loss_module = OBJECTIVES["sf_average"]()(sbn.model, sbn.guide)
    loss_module.initialize(next(iter(_data()))[0])
    module = ObjectiveLightningModule(
        loss_module, lr=1e-2, scheduler=lambda o: torch.optim.lr_scheduler.ExponentialLR(
            o, gamma=0.5))
    recorder = Recorder()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*GPU available.*")
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=3, enable_progress_bar=False,
            logger=False, enable_checkpointing=False, enable_model_summary=False,
            callbacks=[recorder], num_sanity_val_steps=0, val_check_interval=2)
        trainer.fit(module, _data(), _data())
    assert [m["lr"] for m in recorder.metrics] == pytest.approx([1e-2, 5e-3, 2.5e-3])
    for m in recorder.metrics:
        assert m["loss_per_datapoint"] == pytest.approx(m["loss"] / BATCH)
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["val_loss"]))
    assert float(metrics["val_loss_per_datapoint"]) == pytest.approx(
        float(metrics["val_loss"]) / BATCH)
    with pytest.raises(ValueError, match="scheduler_interval"):
        ObjectiveLightningModule(loss_module, scheduler_interval="batch")
    with pytest.raises(TypeError, match="scheduler must be callable"):
        ObjectiveLightningModule(loss_module, scheduler=3)  # type: ignore[arg-type]


def test_validation_leaves_the_control_variates_running_state_alone():
    module = _module("sf_average")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*trainer. reference is not registered.*")
        module.eval()
        module.validation_step(next(iter(_data())), 0)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

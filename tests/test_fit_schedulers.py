"""Learning-rate schedulers stepped by fit: Pyro's scheduler wrappers in the SVI route,
torch schedulers in the module route, per step, per epoch and on plateaus; saved in the
checkpoint, so that N steps straight equal N/2 + checkpoint + N/2 resumed (parameters,
learning rates, scheduler state)."""

import pyro
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_wakesleep import MovingAverageBaseline, ScoreFunctionELBO
from pyro_wakesleep.training import fit

DATA = torch.tensor([1.0, 2.0, 1.5, 0.5, 1.2, 0.8, 1.7])


def _model(x):
    loc = pyro.sample("loc", pyro.distributions.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", pyro.distributions.Normal(loc, 1.0), obs=x)


def _guide(x):
    loc = pyro.param("q_loc", torch.tensor(0.0))
    pyro.sample("loc", pyro.distributions.Normal(loc, 0.5))


def _loader():  # shuffled, ragged epochs of 3 batches: draws from the random stream
    return DataLoader(TensorDataset(DATA), batch_size=3, shuffle=True)


def _objective():
    return ScoreFunctionELBO(num_particles=2, control_variate=MovingAverageBaseline(),
                             force_score_function=True)


SVI_SCHEDULERS = {
    "exponential": (lambda: pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.1}, "gamma": 0.8}), "step"),
    "step_per_epoch": (lambda: pyro.optim.StepLR(
        {"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.05}, "step_size": 1,
         "gamma": 0.5}), "epoch"),
    "lambda": (lambda: pyro.optim.LambdaLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.1},
         "lr_lambda": lambda k: 1.0 / (1 + k)}), "step"),
    "plateau": (lambda: pyro.optim.ReduceLROnPlateau(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.1}, "patience": 0,
         "factor": 0.5}), "step"),
}


def _svi_run(name, steps, checkpoint=None):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    make, interval = SVI_SCHEDULERS[name]
    optim = make()
    svi = pyro.infer.SVI(_model, _guide, optim, _objective())
    # a held-out value that never improves: the plateau scheduler halves the rate at
    # every validation after the first (and a resumed run sees the same values)
    validation = (lambda: 1.0) if name == "plateau" else None
    fit(svi, _loader(), steps, checkpoint=checkpoint, checkpoint_every=100, progress=False,
        scheduler_interval=interval, validation=validation, validate_every=1)
    rates = [s.optimizer.param_groups[0]["lr"] for s in optim.optim_objs.values()]
    return pyro.param("q_loc").detach().clone(), rates, optim.get_state()


@pytest.mark.parametrize("name", SVI_SCHEDULERS)
@pytest.mark.parametrize("split", [4, 6])  # mid-epoch, and at the end of an epoch
def test_svi_route_resumes_the_schedule_exactly(tmp_path, name, split):
    loc, rates, state = _svi_run(name, 8)
    assert rates and rates[0] < SVI_SCHEDULERS[name][0]().pt_optim_args["lr"]  # it moved
    ckpt = tmp_path / "svi.ckpt"
    _svi_run(name, split, ckpt)
    resumed_loc, resumed_rates, resumed_state = _svi_run(name, 8, ckpt)
    assert torch.equal(loc, resumed_loc)
    assert rates == resumed_rates
    assert [s["scheduler"] for s in state.values()] == \
        [s["scheduler"] for s in resumed_state.values()]


def test_svi_schedule_is_the_one_of_the_interval():
    _, rates, _ = _svi_run("exponential", 5)
    assert rates == [pytest.approx(0.1 * 0.8**5)]  # stepped after every step
    _, rates, _ = _svi_run("step_per_epoch", 5)  # epochs of 3 batches: one epoch ended
    assert rates == [pytest.approx(0.025)]
    _, rates, _ = _svi_run("step_per_epoch", 6)
    assert rates == [pytest.approx(0.0125)]


class _Guide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_loc = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        pyro.sample("loc", pyro.distributions.Normal(self.q_loc, 0.5))


MODULE_SCHEDULERS = {
    "exponential": (lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8), "step"),
    "cosine_per_epoch": (
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5), "epoch"),
    "warmup_then_decay": (lambda o: torch.optim.lr_scheduler.SequentialLR(o, [
        torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
        torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)], milestones=[3]), "step"),
    "plateau": (lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(
        o, patience=0, factor=0.5), "step"),
}


def _module_run(name, steps, checkpoint=None):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    module = _objective()(_model, _Guide())
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    make, interval = MODULE_SCHEDULERS[name]
    scheduler = make(optimizer)
    # a held-out value that never improves: the plateau scheduler halves the rate at
    # every validation after the first (and a resumed run sees the same values)
    validation = (lambda: 1.0) if name == "plateau" else None
    fit(module, _loader(), steps, optimizer=optimizer, scheduler=scheduler,
        scheduler_interval=interval, checkpoint=checkpoint, progress=False,
        validation=validation, validate_every=1)
    return ({k: v.clone() for k, v in module.state_dict().items()},
            [g["lr"] for g in optimizer.param_groups], scheduler.state_dict())


@pytest.mark.parametrize("name", MODULE_SCHEDULERS)
@pytest.mark.parametrize("split", [4, 6])
def test_module_route_resumes_the_schedule_exactly(tmp_path, name, split):
    state, rates, scheduler = _module_run(name, 8)
    assert rates[0] != 0.1
    ckpt = tmp_path / "module.ckpt"
    _module_run(name, split, ckpt)
    resumed, resumed_rates, resumed_scheduler = _module_run(name, 8, ckpt)
    assert state.keys() == resumed.keys()
    assert all(torch.equal(state[k], resumed[k]) for k in state)
    assert rates == resumed_rates
    assert scheduler == resumed_scheduler


def test_resuming_with_another_or_no_scheduler_is_refused(tmp_path):
    ckpt = tmp_path / "module.ckpt"
    _module_run("exponential", 2, ckpt)
    pyro.clear_param_store()
    module = _objective()(_model, _Guide())
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="scheduler is None in this run but 'ExponentialLR'"):
        fit(module, _loader(), 4, optimizer=optimizer, checkpoint=ckpt, progress=False)
    other = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    with pytest.raises(ValueError, match="scheduler is 'StepLR' in this run but 'Exponen"):
        fit(module, _loader(), 4, optimizer=optimizer, scheduler=other, checkpoint=ckpt,
            progress=False)


def test_bad_scheduler_arguments_are_refused_before_training():
    pyro.clear_param_store()
    module = _objective()(_model, _Guide())
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    other = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9)
    data = (DATA,)
    with pytest.raises(TypeError, match="scheduler must be a torch.optim.lr_scheduler"):
        fit(module, data, 2, optimizer=optimizer, scheduler="exp", progress=False)
    with pytest.raises(ValueError, match="schedules another optimizer"):
        fit(module, data, 2, optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.ExponentialLR(other, 0.9), progress=False)
    with pytest.raises(ValueError, match="scheduler_interval must be 'step' or 'epoch'"):
        fit(module, data, 2, optimizer=optimizer, scheduler=scheduler,
            scheduler_interval="batch", progress=False)
    with pytest.raises(ValueError, match="'epoch' needs data .* with a length"):
        fit(module, data, 2, optimizer=optimizer, scheduler=scheduler,
            scheduler_interval="epoch", progress=False)
    with pytest.raises(ValueError, match="ReduceLROnPlateau .* pass validation"):
        fit(module, data, 2, optimizer=optimizer, progress=False,
            scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer))
    svi = pyro.infer.SVI(_model, _guide, pyro.optim.Adam({"lr": 0.1}), _objective())
    with pytest.raises(ValueError, match="scheduler is for fit\\(module"):
        fit(svi, data, 2, scheduler=scheduler, progress=False)
    assert module.guide.q_loc.item() == 0.0 and list(pyro.get_param_store().keys()) == []

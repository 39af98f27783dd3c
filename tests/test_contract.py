"""The contract every objective keeps, checked over all of them through the public API:

(a) one path: under one seed ``loss``, ``differentiable_loss`` and ``loss_and_grads`` agree
    in value, ``differentiable_loss().backward()`` gives the gradients of
    ``loss_and_grads``, and ``loss`` changes no running state, parameter or gradient;
(b) ``state_dict`` round trip: a checkpoint (param store, optimizer, ``state_dict()``)
    restored into a fresh objective, model and guide continues bit for bit;
(c) the SVI route and the plain PyTorch route (``objective(model, guide)``) give the same
    gradient under one seed;
(d) all of it on CUDA where present.

Each for vectorized and sequential particles. The model (tests/models.py) has a Bernoulli
and a reparameterized latent in a data plate.
"""

import io

import pyro
import pytest
import torch
from models import MixedGuide, MixedModel, X
from pyro.infer import SVI
from torch import nn

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


def nvil(device):
    net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))
    return NeuralBaseline(net, input=lambda x: x.unsqueeze(-1)).to(device)


# each: (device, **options) -> a fresh objective. NVIL is given per site, so that its
# parameters exist for a plain PyTorch optimizer from the start; the moving average is
# given for every site, so that it is created (and restored) at the first step.
OBJECTIVES = {
    "score_function": lambda device, **kw: ScoreFunctionELBO(3, **kw),
    "moving_average": lambda device, **kw: ScoreFunctionELBO(3, MovingAverageBaseline(0.8),
                                                             **kw),
    "nvil": lambda device, **kw: ScoreFunctionELBO(3, {"z": nvil(device)}, **kw),
    "leave_one_out": lambda device, **kw: ScoreFunctionELBO(3, LeaveOneOutBaseline(), **kw),
    "vimco": lambda device, **kw: VimcoELBO(3, **kw),
    "disarm": lambda device, **kw: DisarmELBO(2, **kw),
    "arm": lambda device, **kw: DisarmELBO(2, "arm", **kw),
    "wake_sleep": lambda device, **kw: WakeSleepELBO(2, 2, **kw),
    "rws": lambda device, **kw: ReweightedWakeSleepELBO(3, 1.0, **kw),
    "rws_half_insomnia": lambda device, **kw: ReweightedWakeSleepELBO(
        3, 0.5, num_sleep_particles=2, **kw),
    "rebar": lambda device, **kw: RebarELBO(2, **kw),
    "relax": lambda device, **kw: RelaxELBO(2, **kw),
}
#: objectives whose learned state is created at the first step (the module route needs
#: ``initialize`` before an optimizer is built)
LAZY = ("rebar", "relax")
NAMES = sorted(OBJECTIVES)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
LAYOUTS = pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "sequential"])


def setup(name, device, **options):
    """A fresh objective, model and guide (their initial values fixed), and the data."""
    pyro.set_rng_seed(0)  # NVIL's initial weights
    objective = OBJECTIVES[name](device, **options)
    return objective, MixedModel().to(device), MixedGuide().to(device), X.to(device)


def train(objective, model, guide, x, steps):
    optim = pyro.optim.Adam({"lr": 0.05})
    svi = SVI(model, guide, optim, objective)
    for _ in range(steps):
        svi.step(x)
    return svi, optim


def params():
    """Every parameter in the param store (model, guide, learned control variates)."""
    store = pyro.get_param_store()
    return {name: store[name].unconstrained() for name in sorted(store.keys())}


def zero_grads():
    for p in params().values():
        p.grad = None


def grads():
    return {name: p.grad.clone() for name, p in params().items() if p.grad is not None}


def snapshot(objective):
    """Copies of the parameter values and the objective's state."""
    return ({name: p.detach().clone() for name, p in params().items()},
            {k: v.clone() for k, v in objective.state_dict().items()})


def values(objective, model, guide):
    """Copies of the model's and guide's parameters and of the objective's state."""
    out = {"w": model.w, "a": guide.a, **objective.control_variates.state_dict()}
    return {k: v.detach().clone() for k, v in out.items()}


def assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, a[k], b[k])


# -- (a) one path ---------------------------------------------------------------------------
@LAYOUTS
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_loss_differentiable_loss_and_loss_and_grads_are_one_path(name, device, vectorize):
    objective, model, guide, x = setup(name, device, vectorize_particles=vectorize)
    train(objective, model, guide, x, steps=3)  # running state away from its start
    zero_grads()
    params_before, state_before = snapshot(objective)

    pyro.set_rng_seed(1)
    value = objective.loss(model, guide, x)
    assert isinstance(value, float)
    params_after, state_after = snapshot(objective)
    assert_equal(params_after, params_before)
    assert_equal(state_after, state_before)  # loss changes no running state
    assert grads() == {}

    pyro.set_rng_seed(1)
    loss = objective.differentiable_loss(model, guide, x)
    assert isinstance(loss, torch.Tensor) and loss.shape == () and loss.requires_grad
    loss.backward()
    by_backward = grads()
    _, state_by_backward = snapshot(objective)

    zero_grads()
    objective.load_state_dict(state_before)
    pyro.set_rng_seed(1)
    returned = objective.loss_and_grads(model, guide, x)
    assert isinstance(returned, float)
    assert value == pytest.approx(loss.item(), rel=1e-6) == pytest.approx(returned, rel=1e-6)
    assert_equal(grads(), by_backward)
    assert {"model$$$w", "guide$$$a"} <= by_backward.keys()
    assert_equal(snapshot(objective)[1], state_by_backward)


# -- (b) state_dict round trip ----------------------------------------------------------------
@LAYOUTS
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_restored_into_fresh_objective_continues_exactly(name, device, vectorize):
    objective, model, guide, x = setup(name, device, vectorize_particles=vectorize)
    svi, optim = train(objective, model, guide, x, steps=4)
    checkpoint = io.BytesIO()
    torch.save({"params": pyro.get_param_store().get_state(), "optim": optim.get_state(),
                "objective": objective.state_dict()}, checkpoint)
    pyro.set_rng_seed(11)
    expected_loss = svi.step(x)
    expected = snapshot(objective)

    # as a fresh process: everything rebuilt at its initial values, then restored
    pyro.clear_param_store()
    objective, model, guide, x = setup(name, device, vectorize_particles=vectorize)
    checkpoint.seek(0)
    state = torch.load(checkpoint, weights_only=False)
    pyro.get_param_store().set_state(state["params"])
    optim = pyro.optim.Adam({"lr": 0.05})
    optim.set_state(state["optim"])
    objective.load_state_dict(state["objective"])
    pyro.set_rng_seed(11)
    loss = SVI(model, guide, optim, objective).step(x)

    assert loss == expected_loss
    params_now, state_now = snapshot(objective)
    assert_equal(params_now, expected[0])
    assert_equal(state_now, expected[1])
    if name in ("moving_average", "nvil"):
        assert state_now  # the round trip carried running state


# -- (c) SVI and plain PyTorch ------------------------------------------------------------------
@LAYOUTS
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_svi_and_module_routes_give_the_same_gradient(name, device, vectorize):
    """One SGD step each way from the same start under one seed: SGD's update is the
    gradient times the learning rate, so equal updates are equal gradients."""
    lr = 0.01
    objective, model, guide, x = setup(name, device, vectorize_particles=vectorize)
    initial = values(objective, model, guide)
    svi = SVI(model, guide, pyro.optim.SGD({"lr": lr}), objective)
    pyro.set_rng_seed(5)
    svi_loss = svi.step(x)
    via_svi = values(objective, model, guide)

    pyro.clear_param_store()
    objective, model, guide, x = setup(name, device, vectorize_particles=vectorize)
    module = objective(model, guide)
    assert isinstance(module, nn.Module)
    if name in LAZY:
        module.initialize(x)
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    pyro.set_rng_seed(5)
    loss = module(x)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    via_module = values(objective, model, guide)

    assert loss.item() == pytest.approx(svi_loss, rel=1e-6)
    assert_equal(via_module, via_svi)
    for k in initial:  # model, guide and a per-site control variate all moved
        assert not torch.equal(via_module[k], initial[k]), k

"""The compiled path (``jit=True``): every objective draws the same particles, reports
the same losses, gives the same gradients and leaves the same running state as the
eager path under one seed, through SVI and the plain PyTorch route; programs that
cannot be recorded exactly run eagerly with a warning; a changed batch shape gets a
graph of its own; non-finite log-densities still raise naming the site.

The compiled graph runs the very operations of the eager step, so the two agree to
float rounding (in practice bit for bit on the CPU); ``close`` allows 1e-6 relative.
"""

import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from models import MixedGuide, MixedModel, X
from pyro.infer import SVI
from test_contract import DEVICES, LAZY, NAMES, params, setup
from test_matrix import GEO_X, geo_guide, geo_model

from pyro_wakesleep import ReweightedWakeSleepELBO, ScoreFunctionELBO, VimcoELBO, WakeSleepELBO

LAYOUTS = pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "sequential"])
#: the contract's objectives that compile (REBAR and RELAX differentiate inside their
#: step, which the compiled path refuses: tests/test_rebar.py checks that they run eagerly)
COMPILED = [name for name in NAMES if name not in LAZY]


def close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


def run_svi(name, device, jit, steps=4, **options):
    """Losses, parameters, gradients of the last step and objective state after
    ``steps`` SVI steps from one seed."""
    pyro.clear_param_store()
    objective, model, guide, x = setup(name, device, jit=jit, **options)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), objective)
    pyro.set_rng_seed(1)
    losses = [svi.step(x) for _ in range(steps)]
    grads = {n: p.grad.clone() for n, p in params().items() if p.grad is not None}
    values = {n: p.detach().clone() for n, p in params().items()}
    state = {k: v.clone() for k, v in objective.state_dict().items()}
    return objective, torch.tensor(losses), values, grads, state


@LAYOUTS
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", COMPILED)
def test_compiled_svi_equals_eager(name, device, vectorize):
    _, eager_losses, eager_values, eager_grads, eager_state = run_svi(
        name, device, False, vectorize_particles=vectorize)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
        compiled, losses, values, grads, state = run_svi(
            name, device, True, vectorize_particles=vectorize)
    assert len(compiled.compiled.graphs) == 1  # steps 2-4 replayed one recorded graph
    torch.testing.assert_close(losses, eager_losses, rtol=1e-6, atol=1e-6)
    close(values, eager_values)
    close(grads, eager_grads)
    close(state, eager_state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", COMPILED)
def test_compiled_module_route_equals_eager(name, device):
    results = []
    for jit in (False, True):
        pyro.clear_param_store()
        objective, model, guide, x = setup(name, device, jit=jit)
        loss_module = objective(model, guide)
        loss_module.initialize(x)
        optimizer = torch.optim.Adam(loss_module.parameters(), lr=0.05)
        pyro.set_rng_seed(2)
        losses = []
        for _ in range(4):
            optimizer.zero_grad()
            loss = loss_module(x)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        results.append((torch.stack(losses), {k: v.detach().clone()
                                              for k, v in loss_module.state_dict().items()}))
    assert len(objective.compiled.graphs) == 1
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    close(results[1][1], results[0][1])


def test_phase_losses_come_from_the_replayed_step():
    for cls, args in ((WakeSleepELBO, (2, 2)), (ReweightedWakeSleepELBO, (3, 0.5))):
        phases = []
        for jit in (False, True):
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            objective = cls(*args, jit=jit)
            svi = SVI(MixedModel(), MixedGuide(), pyro.optim.Adam({"lr": 0.05}), objective)
            pyro.set_rng_seed(3)
            phases.append([(svi.step(X), objective.last_phase_losses) for _ in range(3)])
        for (loss, eager), (compiled_loss, compiled) in zip(*phases, strict=True):
            assert compiled_loss == pytest.approx(loss, rel=1e-6)
            assert compiled == pytest.approx(eager, rel=1e-6)


def test_stochastic_control_flow_runs_eagerly_with_a_warning():
    results = []
    for jit in (False, True):
        pyro.clear_param_store()
        objective = ScoreFunctionELBO(4, vectorize_particles=False, jit=jit)
        svi = SVI(geo_model, geo_guide, pyro.optim.Adam({"lr": 0.05}), objective)
        pyro.set_rng_seed(4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = [svi.step(GEO_X) for _ in range(4)]
        results.append((losses, {k: v.detach().clone() for k, v in params().items()}))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "reads a value out of a tensor" in messages[0]
    assert "runs eagerly" in messages[0]
    assert not objective.compiled.graphs
    assert results[1][0] == results[0][0]
    close(results[1][1], results[0][1])


def test_a_new_batch_shape_gets_its_own_graph():
    x_small, x_large = X[:3], torch.cat([X, X + 0.5])
    batches = [X, X, X, x_small, x_small, x_small, x_large, x_large, X]
    results = []
    for jit in (False, True):
        pyro.clear_param_store()
        objective, model, guide, _ = setup("leave_one_out", "cpu", jit=jit)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), objective)
        pyro.set_rng_seed(5)
        results.append(([svi.step(x) for x in batches],
                        {k: v.detach().clone() for k, v in params().items()}))
    assert len(objective.compiled.graphs) == 3  # x_large was seen twice: warm-up, record
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    close(results[1][1], results[0][1])


def test_a_failing_replay_raises_the_eager_error_and_changes_nothing():
    bad = X.clone()
    bad[1] = float("nan")
    errors = []
    for jit in (False, True):
        pyro.clear_param_store()
        objective, model, guide, x = setup("moving_average", "cpu", jit=jit)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), objective)
        for _ in range(3):
            svi.step(x)
        before = {k: v.detach().clone() for k, v in params().items()}
        state = {k: v.clone() for k, v in objective.state_dict().items()}
        with pytest.raises(ValueError, match="Bernoulli") as error:
            svi.step(bad)
        errors.append(str(error.value))
        close({k: v.detach() for k, v in params().items()}, before)  # nothing changed
        close(objective.state_dict(), state)
    assert len(objective.compiled.graphs) == 1
    assert errors[1] == errors[0]


def test_a_non_finite_replay_raises_the_eager_error_naming_the_site():
    def model(x, shift):
        w = pyro.param("w", torch.tensor(0.5))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w * shift, 1.0), obs=x)

    def guide(x, shift):
        pass

    objective = ScoreFunctionELBO(jit=True)
    x, shift = torch.zeros(4), torch.ones(4)
    for _ in range(3):
        objective.differentiable_loss(model, guide, x, shift)
    assert len(objective.compiled.graphs) == 1
    with pyro.validation_enabled(False), pytest.raises(
            ValueError, match="non-finite model log-density at site 'x'"):
        objective.differentiable_loss(model, guide, x, shift * float("inf"))


def test_handlers_around_the_objective_see_the_eager_step():
    pyro.clear_param_store()
    objective, model, guide, x = setup("score_function", "cpu", jit=True)
    for _ in range(3):
        objective.differentiable_loss(model, guide, x)
    assert len(objective.compiled.graphs) == 1
    pyro.set_rng_seed(6)
    plain = objective.differentiable_loss(model, guide, x)
    pyro.set_rng_seed(6)
    with poutine.scale(scale=2.0):
        scaled = objective.differentiable_loss(model, guide, x)
    assert scaled.item() == pytest.approx(2 * plain.item(), rel=1e-6)


def test_loss_runs_eagerly_and_changes_nothing():
    pyro.clear_param_store()
    objective, model, guide, x = setup("moving_average", "cpu", jit=True)
    for _ in range(3):
        objective.loss(model, guide, x)
    assert not objective.compiled.graphs
    assert all(float(v) == 0 for v in objective.state_dict().values())


def test_distributed_control_variate_state_keeps_the_step_eager(monkeypatch):
    pyro.clear_param_store()
    objective, model, guide, x = setup("moving_average", "cpu", jit=True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    # the eager step itself must not try to all-reduce without a process group
    monkeypatch.setattr("pyro_wakesleep.distributed.is_distributed", lambda: False)
    objective.differentiable_loss(model, guide, x)  # creates the moving average
    for _ in range(3):
        objective.differentiable_loss(model, guide, x)
    assert not objective.compiled.graphs


def test_parameters_that_change_shape_record_again():
    pyro.clear_param_store()

    def model(x):
        loc = pyro.param("loc", torch.zeros(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc.sum(), 1.0), obs=x)

    def guide(x):
        pass

    objective = ScoreFunctionELBO(jit=True)
    x = torch.randn(5)
    for _ in range(3):
        objective.differentiable_loss(model, guide, x)
    pyro.get_param_store()["loc"] = torch.zeros(3)
    for _ in range(3):  # eager, then recorded again (issue 25, case 12)
        pyro.set_rng_seed(8)
        loss = objective.differentiable_loss(model, guide, x)
        pyro.set_rng_seed(8)
        expected = ScoreFunctionELBO().differentiable_loss(model, guide, x)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert len(objective.compiled.graphs) == 1


def test_jit_arguments_are_checked():
    with pytest.raises(TypeError, match="jit must be a bool"):
        ScoreFunctionELBO(jit="yes")
    with pytest.raises(ValueError, match="unknown jit_options \\['fast'\\]"):
        ScoreFunctionELBO(jit=True, jit_options={"fast": True})
    with pytest.raises(TypeError, match="jit_options\\['compile'\\] must be a bool"):
        ScoreFunctionELBO(jit=True, jit_options={"compile": 1})
    with pytest.raises(ValueError, match="max_graphs"):
        ScoreFunctionELBO(jit=True, jit_options={"max_graphs": 0})
    ScoreFunctionELBO(jit=True, jit_options={"check_trace": False})  # Pyro's: accepted


def test_max_graphs_caps_the_recorded_signatures():
    pyro.clear_param_store()
    objective, model, guide, _ = setup("score_function", "cpu", jit=True,
                                       jit_options={"max_graphs": 1})
    for x in (X, X, X[:3], X[:3]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            objective.differentiable_loss(model, guide, x)
    assert len(objective.compiled.graphs) == 1
    assert any("max_graphs" in str(w.message) for w in caught)


@pytest.mark.slow
def test_torch_compile_option_equals_eager():
    _, eager_losses, eager_values, _, _ = run_svi("nvil", "cpu", False)
    _, losses, values, _, _ = run_svi("nvil", "cpu", True, jit_options={"compile": True})
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-5)
    for k in values:
        torch.testing.assert_close(values[k], eager_values[k], rtol=1e-5, atol=1e-6)


DREG = {
    "vimco_dreg": lambda **kw: VimcoELBO(3, dreg=True, **kw),
    "rws_dreg": lambda **kw: ReweightedWakeSleepELBO(3, dreg=True, **kw),
    "stick_the_landing": lambda **kw: ScoreFunctionELBO(3, stick_the_landing=True, **kw),
}


@pytest.mark.parametrize("name", sorted(DREG))
def test_compiled_doubly_reparameterized_estimators_equal_eager(name):
    results = []
    for jit in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        objective = DREG[name](jit=jit)
        svi = SVI(MixedModel(), MixedGuide(), pyro.optim.Adam({"lr": 0.05}), objective)
        pyro.set_rng_seed(7)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            losses = [svi.step(X) for _ in range(4)]
        results.append((losses, {k: v.detach().clone() for k, v in params().items()}))
    assert len(objective.compiled.graphs) == 1
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    close(results[1][1], results[0][1])

"""Tier (a) for the control variates: each against hand-computed values."""

import pytest
import torch
from torch import nn

from pyro_wakesleep import LeaveOneOutBaseline, MovingAverageBaseline, NeuralBaseline
from pyro_wakesleep.control_variates import SiteContext
from pyro_wakesleep.objectives._site_control import SiteControlVariates, check_spec


def ctx(update=True, args=(), kwargs=None, infer=None, site="z"):
    return SiteContext(site, {"infer": infer or {}}, args, kwargs or {}, 0, update)


def test_moving_average_uses_the_average_from_before_the_step():
    cv = MovingAverageBaseline(beta=0.5)
    out = cv(torch.tensor([[2.0, 4.0]]), ctx())
    assert torch.equal(out.value, torch.tensor([[2.0, 4.0]]))  # nothing seen yet: baseline 0
    assert out.loss.item() == 0.0
    out = cv(torch.tensor([[0.0, 0.0]]), ctx())
    assert torch.allclose(out.value, torch.tensor([[-3.0, -3.0]]))  # debiased mean of step 1
    # a_2 = 0.5 * 1.5 + 0.5 * 0 = 0.75, w_2 = 0.75 -> baseline 1.0
    out = cv(torch.tensor([[5.0]]), ctx())
    assert torch.allclose(out.value, torch.tensor([[4.0]]))


def test_moving_average_state_frozen_without_update_or_in_eval():
    cv = MovingAverageBaseline()
    cv(torch.ones(2, 3), ctx())
    before = {k: v.clone() for k, v in cv.state_dict().items()}
    cv(torch.full((2, 3), 7.0), ctx(update=False))
    cv.eval()
    cv(torch.full((2, 3), 7.0), ctx())
    assert all(torch.equal(before[k], v) for k, v in cv.state_dict().items())


@pytest.mark.parametrize("beta", [-0.1, 1.0])
def test_moving_average_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        MovingAverageBaseline(beta)


def test_leave_one_out():
    signal = torch.tensor([[1.0, 0.0], [2.0, 0.0], [6.0, 3.0]])
    out = LeaveOneOutBaseline()(signal, ctx())
    expected = signal - torch.tensor([[4.0, 1.5], [3.5, 1.5], [1.5, 0.0]])
    assert torch.allclose(out.value, expected)
    # a site present in one particle only (stochastic control flow) gets no baseline
    lone = torch.tensor([[2.0, -1.0]])
    assert torch.equal(LeaveOneOutBaseline()(lone, ctx()).value, lone)
    with pytest.raises(ValueError, match="needs num_particles >= 2"):
        check_spec(LeaveOneOutBaseline(), 1)


def _fixed_linear(weight, bias):
    net = nn.Linear(1, 1)
    with torch.no_grad():
        net.weight.fill_(weight)
        net.bias.fill_(bias)
    return net


def test_neural_baseline_centering_normalization_and_loss():
    x = torch.tensor([[1.0], [2.0]])
    cv = NeuralBaseline(_fixed_linear(2.0, 0.0), decay=0.5)
    signal = torch.tensor([[3.0, 10.0], [5.0, 4.0]])  # (K=2, batch=2)
    out = cv(signal, ctx(args=(x,)))
    # first step: c = 0, v = 1 (defaults), baseline b(x) = (2, 4)
    residual = signal - torch.tensor([2.0, 4.0])
    assert torch.allclose(out.value, residual)
    assert out.loss.item() == pytest.approx(residual.pow(2).sum().item() / 2)
    # the statistics are bias-corrected running moments of the residual
    assert cv.mean.item() / cv.weight.item() == pytest.approx(residual.mean().item())
    variance = residual.var(correction=0).item()
    assert cv.variance.item() / cv.weight.item() == pytest.approx(variance)
    out = cv(signal, ctx(args=(x,)))
    expected = (residual - residual.mean()) / max(1.0, variance**0.5)
    assert torch.allclose(out.value, expected)


def test_neural_baseline_gradient_reaches_only_its_module():
    x = torch.tensor([[1.0], [2.0]])
    net = _fixed_linear(0.5, 0.1)
    cv = NeuralBaseline(net)
    signal = torch.tensor([[3.0, 10.0]])
    out = cv(signal, ctx(args=(x,)))
    out.loss.backward()
    assert net.weight.grad is not None and net.weight.grad.abs().item() > 0
    # the advantage carries no graph into the baseline network
    assert not out.value.requires_grad


def test_neural_baseline_input_resolution_and_errors():
    x = torch.tensor([[1.0], [2.0]])
    y = torch.tensor([[5.0], [7.0]])
    signal = torch.zeros(1, 2)
    cv = NeuralBaseline(_fixed_linear(1.0, 0.0), center=False, normalize_variance=False)
    assert torch.allclose(cv(signal, ctx(args=(x,))).value, -x.squeeze(-1))
    declared = {"baseline": {"nn_baseline_input": y}}
    assert torch.allclose(cv(signal, ctx(args=(x,), infer=declared)).value, -y.squeeze(-1))
    chosen = NeuralBaseline(_fixed_linear(1.0, 0.0), input=lambda a, b: b,
                            center=False, normalize_variance=False)
    assert torch.allclose(chosen(signal, ctx(args=(x, y))).value, -y.squeeze(-1))
    with pytest.raises(ValueError, match="site 'z'.*no positional"):
        cv(signal, ctx())
    with pytest.raises(ValueError, match="site 'z'.*shape"):
        cv(torch.zeros(1, 3), ctx(args=(x,)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        NeuralBaseline(lambda x: x)
    # a (batch, 1) output also serves a signal with more leading (particle, plate) dims
    deep = cv(torch.zeros(3, 1, 2), ctx(args=(x,)))
    assert torch.allclose(deep.value, -x.squeeze(-1).expand(3, 1, 2))


def test_check_spec_errors():
    with pytest.raises(ValueError, match="LeaveOneOutBaseline.*num_particles >= 2"):
        check_spec(LeaveOneOutBaseline(), 1)
    with pytest.raises(ValueError, match="site 'z'"):
        check_spec({"z": LeaveOneOutBaseline()}, 1)
    with pytest.raises(TypeError, match="site 'z'.*ControlVariate"):
        check_spec({"z": "moving average"}, 4)
    with pytest.raises(TypeError, match="ControlVariate"):
        check_spec(object(), 4)
    with pytest.raises(TypeError, match="site names"):
        check_spec({1: MovingAverageBaseline()}, 4)
    check_spec({"z": None, "w": MovingAverageBaseline()}, 1)


def test_site_container_escapes_dots_and_restores_before_creation():
    box = SiteControlVariates()
    box.set("layer.z", MovingAverageBaseline())
    box.get("layer.z")(torch.full((1, 2), 3.0), ctx())
    state = box.state_dict()
    assert set(state) == {"layer:z.average", "layer:z.weight"}
    fresh = SiteControlVariates()
    fresh.load_state_dict(state)  # the site's control variate does not exist yet
    assert fresh.state_dict().keys() == state.keys()
    fresh.set("layer.z", MovingAverageBaseline())
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())
    assert fresh.sites() == ["layer.z"]

"""Tier (a): the pure functions against hand-derived values."""

import math

import pytest
import torch

from pyro_wakesleep.signals import (
    debiased_average,
    dreg_vimco_surrogate,
    dreg_wake_phi_surrogate,
    ema_update,
    iwae_bound,
    leave_one_out_mean,
    normalize_signal,
    path_only,
    reduce_to_dims,
    self_normalized_weights,
    squared_self_normalized_weights,
    vimco_baselines,
)


def test_reduce_to_dims_keeps_listed_plate_dims():
    x = torch.arange(24.0).reshape(2, 3, 4)
    out = reduce_to_dims(x, {-1, -3})
    assert out.shape == (2, 1, 4)
    assert torch.equal(out, x.sum(-2, keepdim=True))
    assert torch.equal(reduce_to_dims(x, {-1, -2, -3}), x)
    assert reduce_to_dims(x, set()).shape == (1, 1, 1)
    assert reduce_to_dims(x, set()).item() == x.sum().item()


def test_ema_and_bias_correction():
    avg, w = torch.zeros(()), torch.zeros(())
    assert debiased_average(avg, w).item() == 0.0
    assert debiased_average(avg, w, default=1.0).item() == 1.0
    avg, w = ema_update(avg, w, torch.tensor(5.0), 0.9)
    assert debiased_average(avg, w).item() == pytest.approx(5.0)  # no pull towards 0
    avg, w = ema_update(avg, w, torch.tensor(1.0), 0.9)
    # (0.9 * 0.1 * 5 + 0.1 * 1) / (1 - 0.9**2)
    assert debiased_average(avg, w).item() == pytest.approx((0.45 + 0.1) / 0.19)


def test_leave_one_out_mean():
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [6.0, 60.0]])
    expected = torch.tensor([[11 / 3, 110 / 3], [10 / 3, 100 / 3], [3.0, 30.0], [2.0, 20.0]])
    assert torch.allclose(leave_one_out_mean(x, dim=0), expected)
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_mean(torch.ones(1, 3), dim=0)


def test_normalize_signal_divides_only_large_variance():
    signal = torch.tensor([3.0, 5.0])
    assert torch.allclose(
        normalize_signal(signal, torch.tensor(1.0), torch.tensor(4.0)), torch.tensor([1.0, 2.0])
    )
    assert torch.allclose(
        normalize_signal(signal, torch.tensor(1.0), torch.tensor(0.25)), torch.tensor([2.0, 4.0])
    )


def test_iwae_bound_and_weights():
    log_w = torch.log(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    assert torch.allclose(iwae_bound(log_w, dim=0), torch.log(torch.tensor([2.0, 4.0])))
    assert torch.allclose(
        self_normalized_weights(log_w, dim=0), torch.tensor([[0.25, 0.25], [0.75, 0.75]])
    )


def test_vimco_baselines_hand_values():
    # K = 2: replacing w_k by the geometric mean of the other (just w_j) gives log w_j.
    log_w = torch.tensor([0.3, -1.2])
    assert torch.allclose(vimco_baselines(log_w), torch.tensor([-1.2, 0.3]))
    # K = 3, entry 0: log((exp(b) + exp(c) + exp((b + c) / 2)) / 3).
    a, b, c = 0.5, -1.0, 2.0
    log_w = torch.tensor([[a, 1.0], [b, 1.0], [c, 1.0]])
    out = vimco_baselines(log_w, dim=0)
    expected0 = math.log((math.exp(b) + math.exp(c) + math.exp((b + c) / 2)) / 3)
    expected2 = math.log((math.exp(a) + math.exp(b) + math.exp((a + b) / 2)) / 3)
    assert out.shape == (3, 2)
    assert out[0, 0].item() == pytest.approx(expected0, rel=1e-6)
    assert out[2, 0].item() == pytest.approx(expected2, rel=1e-6)
    assert torch.allclose(out[:, 1], torch.ones(3))  # equal weights: baseline = bound
    with pytest.raises(ValueError):
        vimco_baselines(torch.zeros(1, 4))


def test_squared_self_normalized_weights():
    log_w = torch.log(torch.tensor([1.0, 3.0]))
    assert torch.allclose(squared_self_normalized_weights(log_w), torch.tensor([1 / 16, 9 / 16]))


def test_path_only_keeps_the_value_and_the_difference_of_gradients():
    phi = torch.tensor(2.0, requires_grad=True)
    value, stopped = 3.0 * phi, phi**2  # gradients 3 and 4 at phi = 2
    out = path_only(value, stopped)
    assert out.item() == 6.0
    (grad,) = torch.autograd.grad(out, phi)
    assert grad.item() == pytest.approx(-1.0)


def test_dreg_vimco_surrogate_gradient_by_hand():
    # K = 2, one batch element; leaf tensors stand for the three gradient carriers
    log_w = torch.log(torch.tensor([[1.0], [3.0]])).requires_grad_()
    path = torch.zeros(2, 1, requires_grad=True)
    log_q = torch.zeros(2, 1, requires_grad=True)
    out = dreg_vimco_surrogate(log_w, path, log_q, dim=0)
    assert torch.allclose(out, torch.log(torch.tensor([2.0])))  # log((1 + 3) / 2)
    g_w, g_path, g_q = torch.autograd.grad(out.sum(), [log_w, path, log_q])
    w = torch.tensor([[0.25], [0.75]])
    assert torch.allclose(g_w, w)
    assert torch.allclose(g_path, w**2)
    # VIMCO signal: L - L_{-k}, with L_{-1} = log((3 + 3) / 2), L_{-2} = log((1 + 1) / 2)
    expected = torch.tensor([[math.log(2.0) - math.log(3.0)], [math.log(2.0)]])
    assert torch.allclose(g_q, expected)


def test_dreg_wake_phi_surrogate_gradient_by_hand():
    log_w = torch.log(torch.tensor([1.0, 3.0]))
    path = torch.zeros(2, requires_grad=True)
    log_q = torch.zeros(2, requires_grad=True)
    out = dreg_wake_phi_surrogate(log_w, path, log_q)
    assert out.item() == 0.0
    g_path, g_q = torch.autograd.grad(out, [path, log_q])
    w = torch.tensor([0.25, 0.75])
    assert torch.allclose(g_path, w - w**2)
    assert torch.allclose(g_q, w)

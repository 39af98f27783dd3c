"""The relaxation math of REBAR and RELAX (tier a): conditional perturbations have the
right laws and the relaxations the right values."""

import math

import pytest
import torch

from pyro_wakesleep.relaxation import (
    conditional_gumbel,
    conditional_logistic,
    relaxed_bernoulli,
    relaxed_one_hot,
    through_noise,
)

N = 40000


def test_conditional_logistic_has_the_sign_of_b_and_the_logistic_law():
    torch.manual_seed(0)
    logits = torch.tensor([-2.0, 0.0, 0.7, 3.0])
    b = torch.bernoulli(torch.sigmoid(logits).expand(N, 4))
    z = conditional_logistic(b, logits, torch.rand(N, 4))
    assert torch.equal((z > 0).float(), b)
    # marginally z ~ Logistic(alpha, 1): compare the CDF at a few points
    for x in (-2.0, -0.5, 0.0, 1.0, 2.5):
        cdf = torch.sigmoid(torch.tensor(x) - logits)
        freq = (z <= x).float().mean(0)
        se = (cdf * (1 - cdf) / N).sqrt()
        assert ((freq - cdf).abs() <= 4 * se + 1e-6).all(), (x, freq, cdf)


def test_conditional_logistic_is_differentiable_and_stable():
    logits = torch.tensor([-30.0, 0.3, 30.0], requires_grad=True)
    v = torch.tensor([1e-12, 0.5, 1.0 - 1e-7])
    for b in (torch.zeros(3), torch.ones(3)):
        z = conditional_logistic(b, logits, v)
        assert torch.isfinite(z).all()
        (grad,) = torch.autograd.grad(z.sum(), logits)
        assert torch.isfinite(grad).all()
    # b = 1, v -> 0: z -> 0+ whatever alpha; b = 1 is alpha + logit(1 - theta + theta v)
    a = torch.tensor(0.3)
    theta = torch.sigmoid(a)
    u = 1 - theta + theta * 0.25
    direct = a + torch.log(u / (1 - u))
    assert conditional_logistic(torch.tensor(1.0), a, torch.tensor(0.25)).item() == \
        pytest.approx(direct.item(), rel=1e-5)
    u = (1 - theta) * 0.25
    direct = a + torch.log(u / (1 - u))
    assert conditional_logistic(torch.tensor(0.0), a, torch.tensor(0.25)).item() == \
        pytest.approx(direct.item(), rel=1e-5)


def test_conditional_gumbel_has_argmax_b_and_the_gumbel_law():
    torch.manual_seed(1)
    logits = torch.tensor([0.3, -1.0, 1.2, 0.0])
    index = torch.distributions.Categorical(logits=logits).sample((N,))
    z = conditional_gumbel(index, logits.expand(N, 4), torch.rand(N, 4))
    assert torch.equal(z.argmax(-1), index)
    # marginally z_k = log theta_k + Gumbel(0, 1): mean log theta_k + gamma, var pi^2 / 6
    log_theta = torch.log_softmax(logits, -1)
    gamma, var = 0.5772156649, math.pi**2 / 6
    se = math.sqrt(var / N)
    assert ((z.mean(0) - log_theta - gamma).abs() < 4 * se).all(), z.mean(0) - log_theta
    assert ((z.var(0) - var).abs() < 4 * math.sqrt(2.4 * var**2 / N)).all()  # Gumbel kurtosis


def test_through_noise_keeps_the_value_with_unit_gradient():
    logits = torch.tensor([0.5, -1.0], requires_grad=True)
    z = torch.tensor([2.0, -3.0])
    out = through_noise(z, logits)
    assert torch.equal(out, z)
    (grad,) = torch.autograd.grad((out * torch.tensor([2.0, 3.0])).sum(), logits)
    assert torch.equal(grad, torch.tensor([2.0, 3.0]))


def test_relaxations():
    z = torch.tensor([[1.0, -2.0, 0.5]])
    assert torch.allclose(relaxed_bernoulli(z, 0.5), torch.sigmoid(2 * z))
    assert torch.allclose(relaxed_one_hot(z, torch.tensor(2.0)), torch.softmax(z / 2, -1))
    assert torch.allclose(relaxed_one_hot(z, 1e-3), torch.tensor([[1.0, 0.0, 0.0]]))

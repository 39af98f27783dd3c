"""The Le et al. (2019) Gaussian mixture: true weights, exact posterior, metrics."""

from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyro_wakesleep.examples.mixture import GaussianMixture, true_mixture_weights


def test_true_weights_and_initialization() -> None:
    weights = true_mixture_weights(20)
    assert torch.allclose(weights, (torch.arange(20) + 5.0) / 290)
    gmm = GaussianMixture()
    init = torch.softmax(0.5 * 2 * (19 - torch.arange(20.0)), -1)
    assert torch.allclose(gmm.mixture_weights(), init)
    assert gmm.weight_error() == pytest.approx(float((init - weights).norm()), rel=1e-6)


def test_posterior_is_bayes_rule_and_matches_model_trace() -> None:
    gmm = GaussianMixture()
    x = torch.tensor([-3.0, 0.0, 47.0, 190.0, 260.0])
    post = gmm.posterior(x, gmm.mixture_weights().detach())
    assert torch.allclose(post.sum(-1), torch.ones(5))
    # p(c | x) from the model's own log-densities at every c
    log_joint = []
    for c in range(20):
        conditioned = poutine.condition(gmm.model, {"c": torch.full((5,), c)})
        trace = poutine.trace(conditioned).get_trace(x)
        trace.compute_log_prob()
        log_joint.append(trace.nodes["c"]["log_prob"] + trace.nodes["x"]["log_prob"])
    expected = torch.softmax(torch.stack(log_joint, -1).detach(), -1)
    assert torch.allclose(post, expected, atol=1e-6)


def test_sample_moments_within_standard_errors() -> None:
    gmm = GaussianMixture()
    pyro.set_rng_seed(1)
    n = 20000
    x = gmm.sample(n)
    c = torch.arange(20.0)
    mean = float((gmm.true_weights * 10 * c).sum())
    var = float((gmm.true_weights * (10 * c) ** 2).sum()) - mean**2 + 25.0
    assert abs(float(x.mean()) - mean) < 4.5 * math.sqrt(var / n)


def test_posterior_error_is_zero_for_exact_guide_and_guide_broadcasts() -> None:
    gmm = GaussianMixture()
    x = gmm.sample(6)
    exact = gmm.posterior(x)
    diff = (exact - gmm.guide_probs(x)).norm(dim=-1).mean().detach()
    assert gmm.posterior_error(x) == pytest.approx(float(diff), rel=1e-6)
    assert gmm.posterior_error(x, gmm.true_weights) == gmm.posterior_error(x)
    # leading dimensions of x broadcast through the guide (vectorized dreams)
    trace = poutine.trace(gmm.guide).get_trace(x.expand(3, 6))
    assert trace.nodes["c"]["value"].shape == (3, 6)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_clusters"):
        GaussianMixture(num_clusters=1)
    with pytest.raises(ValueError, match="scale"):
        GaussianMixture(scale=0.0)

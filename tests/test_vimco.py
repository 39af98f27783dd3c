"""VimcoELBO: pure math against hand-derived values (tier a), equivalence with Pyro's IWAE
(tier b), unbiasedness against exact enumeration and variance (tier c), interface."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from checks import (
    assert_one_path,
    assert_unbiased,
    draws,
    exact_iwae,
    flat_grad,
    param_grads,
    params_of,
)
from models import gauss_model
from pyro.infer import SVI, RenyiELBO
from pyro.optim import Adam
from torch import nn

from pyro_wakesleep.control_variates import MovingAverageBaseline, SiteContext
from pyro_wakesleep.objectives.vimco import VimcoELBO, score_log_q
from pyro_wakesleep.signals import iwae_bound, vimco_baselines, vimco_surrogate

D = 2  # latent units per datapoint
XS = torch.tensor([-1.5, 0.4, 2.5])  # distinct datapoints
Z_VALUES = {"z": list(torch.tensor(list(itertools.product([0.0, 1.0], repeat=D))))}


# -- tier (a): pure functions ---------------------------------------------------------
def test_vimco_baselines_hand_derived():
    w = torch.tensor([1.0, 4.0, 16.0])
    expected = torch.tensor([28.0 / 3, 7.0, 7.0 / 3]).log()  # geometric means 8, 4, 2
    assert torch.allclose(vimco_baselines(w.log()), expected)
    # K = 2: the other weight stands in for both, so L_{-k} = log w_{other}
    two = torch.tensor([[0.3, -1.2], [2.0, 0.5]])  # particles along dim 1
    assert torch.allclose(vimco_baselines(two, dim=1), two.flip(1))
    # along dim 0 with a batch dimension, each column on its own
    batch = torch.stack([w.log(), w.log() + 1.0], dim=1)
    assert torch.allclose(vimco_baselines(batch), torch.stack([expected, expected + 1], 1))
    with pytest.raises(ValueError, match="at least 2"):
        vimco_baselines(torch.zeros(1, 3))


def test_vimco_surrogate_value_and_gradients():
    log_w = torch.tensor([[0.1, -2.0], [1.5, 0.3], [-0.7, 0.9]], requires_grad=True)
    log_q = torch.tensor([[-0.2, -1.0], [-0.4, -0.3], [-2.0, -0.1]], requires_grad=True)
    out = vimco_surrogate(log_w, log_q)
    bound = torch.logsumexp(log_w, 0) - math.log(3)
    assert torch.allclose(out, bound)
    d_w, d_q = torch.autograd.grad(out.sum(), [log_w, log_q])
    assert torch.allclose(d_w, torch.softmax(log_w, 0))
    assert torch.allclose(d_q, bound - vimco_baselines(log_w))


# -- a tiny model whose IWAE bound can be enumerated -----------------------------------
def make_model():
    """Model and guide with Pyro params (so that Pyro's own ELBOs train them too), and
    the params' unconstrained leaf tensors: theta (2), mu (3), phi (4, last)."""
    inits = {
        "theta": torch.tensor([0.3, -0.8]),
        "mu": torch.tensor([-0.5, 1.5, 0.7]),
        "phi": torch.tensor([[0.2, 0.6], [-0.4, 0.3]]),
    }
    params = params_of(inits)

    def model(x, subsample_size=None):
        theta, mu = pyro.param("theta"), pyro.param("mu")
        with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
            z = pyro.sample("z", dist.Bernoulli(logits=theta).expand([len(idx), D]).to_event(1))
            pyro.sample("x", dist.Normal(mu[0] + (z * mu[1:]).sum(-1), 1.0), obs=x[idx])

    def guide(x, subsample_size=None):
        phi = pyro.param("phi")
        with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
            logits = phi[:, 0] + phi[:, 1] * x[idx].unsqueeze(-1)
            pyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))

    return model, guide, params


def renyi_draws(renyi, model, guide, params, x, num_draws, seed=100):
    """Pyro's RenyiELBO has no differentiable_loss: read what loss_and_grads accumulates."""
    out = []
    for i in range(num_draws):
        for p in params:
            p.grad = None
        pyro.set_rng_seed(seed + i)
        renyi.loss_and_grads(model, guide, x)
        out.append(torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params
        ]))
    return torch.stack(out)


# -- tier (c): unbiasedness -----------------------------------------------------------
@pytest.mark.parametrize("k,vectorize", [(2, True), (3, True), (3, False)])
def test_unbiased_against_enumerated_iwae_gradient(k, vectorize):
    model, guide, params = make_model()
    copies = 400 if vectorize else 60
    x = XS.repeat(copies)
    exact = -copies * flat_grad(exact_iwae(model, guide, XS, Z_VALUES, k), params)
    elbo = VimcoELBO(k, vectorize_particles=vectorize)
    samples = draws(elbo, model, guide, params, x, num_draws=20)
    assert_unbiased(samples, exact, atol=1e-5)
    # the guide gradient is far from zero, so the check has power
    assert exact[-4:].abs().max() > 8 * (samples[:, -4:].std(0) / math.sqrt(20)).max()


def test_unbiased_with_subsampled_plate():
    model, guide, params = make_model()
    x = XS.repeat(200)
    exact = -200 * flat_grad(exact_iwae(model, guide, XS, Z_VALUES, 3), params)
    elbo = VimcoELBO(3, max_plate_nesting=1)
    samples = torch.stack([
        flat_grad(elbo.differentiable_loss(model, guide, x, subsample_size=150), params)
        for _ in range(60)
    ])
    assert_unbiased(samples, exact, atol=1e-5)


def test_masked_guide_site_is_still_a_sampler():
    """A masked guide site drops out of the weights but is still drawn from q, so its score
    term stays (as in Trace_ELBO)."""
    model, guide, params = make_model()
    masked = poutine.mask(guide, mask=torch.tensor(False))
    x = XS.repeat(300)
    exact = -300 * flat_grad(exact_iwae(model, masked, XS, Z_VALUES, 3, sampler=guide), params)
    samples = draws(VimcoELBO(3), model, masked, params, x, num_draws=20)
    assert_unbiased(samples, exact, atol=1e-5)
    assert exact[-4:].abs().max() > 8 * (samples[:, -4:].std(0) / math.sqrt(20)).max()


def test_pyro_renyi_alpha_zero_gives_zero_guide_gradient_where_vimco_is_exact():
    model, guide, params = make_model()
    x = XS[0:1]
    exact = -flat_grad(exact_iwae(model, guide, x, Z_VALUES, 3), params)
    renyi = renyi_draws(RenyiELBO(alpha=0, num_particles=3, max_plate_nesting=1), model, guide,
                  params, x, 5)
    assert (renyi[:, -4:] == 0).all()  # phi: nothing flows to the discrete guide site
    ours = draws(VimcoELBO(3), model, guide, params, x.repeat(300), num_draws=20) / 300
    assert_unbiased(ours, exact, atol=1e-5)
    se = ours.std(0) / math.sqrt(len(ours))
    assert (exact[-4:].abs() > 6 * se[-4:]).all()  # so zero is clearly not the answer


def test_pyro_renyi_alpha_half_is_biased_for_a_discrete_guide():
    model, guide, params = make_model()
    x = XS[0:1]
    exact = -flat_grad(exact_iwae(model, guide, x, Z_VALUES, 2, alpha=0.5), params)[-4:]
    renyi = renyi_draws(RenyiELBO(alpha=0.5, num_particles=2, max_plate_nesting=1), model, guide,
                  params, x, 200)[:, -4:]
    mean, se = renyi.mean(0), renyi.std(0) / math.sqrt(200)
    assert ((mean - exact).abs() > 6 * se).any(), (mean, exact, se)


# -- tier (b): pathwise sites are IWAE, as Pyro's RenyiELBO(alpha=0) --------------------
def gauss_guide(x):
    loc = pyro.param("loc", torch.tensor(0.3))
    scale = pyro.param("scale", torch.tensor(0.8), constraint=dist.constraints.positive)
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(loc + 0.5 * x, scale))


def test_reparameterized_guide_equals_pyro_iwae_on_one_datapoint():
    x = torch.tensor([0.7])
    ours = param_grads(VimcoELBO(4, max_plate_nesting=1), gauss_model, gauss_guide, x)
    theirs = param_grads(RenyiELBO(alpha=0, num_particles=4, max_plate_nesting=1),
                         gauss_model, gauss_guide, x)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-5)
    for k in ours[1]:
        assert torch.allclose(ours[1][k], theirs[1][k], atol=1e-5), k


# -- tier (c): variance ----------------------------------------------------------------
class MovingAverageIWAE(VimcoELBO):
    """The same multi-sample bound with a moving-average baseline in place of VIMCO's:
    sum_k (L - b) grad log q(z_k) + sum_k w~_k grad log w_k."""

    def __init__(self, num_particles):
        super().__init__(num_particles, max_plate_nesting=1)
        self.baseline = MovingAverageBaseline(0.9)

    def loss_and_surrogate(self, model, guide, args, kwargs, update):
        from pyro_wakesleep.particles import log_weights

        particles = self.particles(model, guide, args, kwargs)
        weights = log_weights(particles)
        log_q = score_log_q(particles, weights.plate_dims)
        bound = iwae_bound(weights.value)
        context = SiteContext("z", {}, args, kwargs, 0, update)
        advantage = self.baseline(bound.detach().unsqueeze(0), context).value
        score = (advantage.detach() * (log_q - log_q.detach())).sum(0)
        return -bound.detach().sum(), -(bound + score).sum()


def test_variance_below_moving_average_baseline_on_the_same_bound():
    model, guide, params = make_model()
    x = XS.repeat(20)
    ma = MovingAverageIWAE(5)
    for _ in range(30):  # warm the moving average up
        ma.differentiable_loss(model, guide, x)
    ours = draws(VimcoELBO(5), model, guide, params, x, num_draws=40)[:, -4:]
    theirs = draws(ma, model, guide, params, x, num_draws=40)[:, -4:]
    ratio = theirs.var(0).sum() / ours.var(0).sum()
    assert ratio > 3.0, ratio


# -- interface -------------------------------------------------------------------------
def test_loss_differentiable_loss_and_loss_and_grads_agree():
    model, guide, _ = make_model()
    assert_one_path(VimcoELBO(4), model, guide, XS, seed=7)


def test_loss_is_negative_log_evidence_for_the_exact_posterior_with_subsampling():
    # guide = exact posterior: every weight is p(x), so the bound is exact per datapoint
    def model(x, subsample_size=None):
        with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
            z = pyro.sample("z", dist.Bernoulli(0.3))
            pyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x[idx])

    def guide(x, subsample_size=None):
        with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
            like1 = dist.Normal(2.0, 1.0).log_prob(x[idx]) + math.log(0.3)
            like0 = dist.Normal(0.0, 1.0).log_prob(x[idx]) + math.log(0.7)
            pyro.sample("z", dist.Bernoulli(logits=like1 - like0))

    x = torch.full((10,), 0.8)
    log_px = torch.logaddexp(dist.Normal(2.0, 1.0).log_prob(x[0]) + math.log(0.3),
                             dist.Normal(0.0, 1.0).log_prob(x[0]) + math.log(0.7))
    loss = VimcoELBO(3).loss(model, guide, x, subsample_size=4)
    assert loss == pytest.approx(-10 * float(log_px), rel=1e-5)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([0.3, -0.8]))
        self.phi = nn.Parameter(torch.tensor([0.2, 0.6]))

    def model(self, x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Bernoulli(logits=self.theta).expand([len(x), D])
                            .to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=x)

    def guide(self, x):
        with pyro.plate("data", len(x)):
            logits = (self.phi[0] + self.phi[1] * x).unsqueeze(-1).expand(len(x), D)
            pyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))


class Call(nn.Module):
    def __init__(self, net, method):
        super().__init__()
        self.net, self.method = net, method

    def forward(self, *args):
        return getattr(self.net, self.method)(*args)


def test_plain_pytorch_module_and_svi_train():
    net = Net()
    module = VimcoELBO(3)(Call(net, "model"), Call(net, "guide"))
    assert {n for n, _ in module.named_parameters()} == {"model.net.theta", "model.net.phi"}
    optim = torch.optim.Adam(module.parameters(), lr=0.05)
    before = net.phi.detach().clone()
    loss = module(XS)
    loss.backward()
    optim.step()
    assert torch.isfinite(loss) and not torch.equal(before, net.phi)

    def model(x):
        pyro.module("net", net)
        net.model(x)

    def guide(x):
        pyro.module("net", net)
        net.guide(x)

    svi = SVI(model, guide, Adam({"lr": 0.05}), VimcoELBO(3))
    losses = [svi.step(XS) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)


def test_state_dict_is_empty_and_round_trips():
    elbo = VimcoELBO(2)
    model, guide, _ = make_model()
    elbo.loss_and_grads(model, guide, XS)
    state = elbo.state_dict()
    assert state == {}
    fresh = VimcoELBO(2)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == {}


def test_loss_does_not_mutate_arguments():
    model, guide, _ = make_model()
    x = XS.clone()
    kwargs = {"subsample_size": 2}
    VimcoELBO(3).loss_and_grads(model, guide, x, **kwargs)
    assert torch.equal(x, XS) and kwargs == {"subsample_size": 2}


@pytest.mark.parametrize("bad,error", [(1, ValueError), (0, ValueError), (2.0, TypeError)])
def test_bad_num_particles(bad, error):
    with pytest.raises(error, match="num_particles"):
        VimcoELBO(bad)


def test_non_finite_weights_raise():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.factor("impossible", torch.where(z > 0, -math.inf, 0.0))  # p(x, z=1) = 0
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(0.999))

    with pytest.raises(ValueError, match="not finite"):
        VimcoELBO(2).loss(model, guide, XS)

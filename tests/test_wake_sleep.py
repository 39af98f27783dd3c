"""WakeSleepELBO and ReweightedWakeSleepELBO: exact expected gradients on enumerable
models, equivalence with Pyro's ReweightedWakeSleep, mini-batches, bad input, routes.

Stochastic checks compare the mean of M independent gradient estimates with the exact
expected gradient, within Z = 4.5 standard errors (estimated from the M estimates) per
coordinate: a false alarm has probability below 1e-5 per coordinate under normality.
"""

from __future__ import annotations

import itertools
import math
import os

import pyro
import pyro.distributions as dist
import pytest
import torch
from checks import assert_within, mean_and_se
from pyro.infer import SVI
from pyro.infer import ReweightedWakeSleep as PyroRWS
from torch import Tensor, nn

from pyro_wakesleep.examples.mixture import GaussianMixture
from pyro_wakesleep.examples.models import SigmoidBeliefNet
from pyro_wakesleep.objectives.wake_sleep import ReweightedWakeSleepELBO, WakeSleepELBO

Z = 4.5


class Tiny(nn.Module):
    """z ~ Bern(σ(a)), x | z ~ Bern(σ(b + c z)); q(z = 1 | x) = σ(u + v x), in a data
    plate (optionally subsampled: ``idx`` out of ``size``)."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = nn.Module()
        self.gen.theta = nn.Parameter(torch.tensor([0.3, -0.8, 1.9]))
        self.rec = nn.Module()
        self.rec.phi = nn.Parameter(torch.tensor([-0.4, 1.1]))

    def model(self, x: Tensor, idx: Tensor | None = None, size: int | None = None) -> None:
        pyro.module("gen", self.gen)
        a, b, c = self.gen.theta
        with pyro.plate("data", size or x.shape[-1], subsample=idx):
            z = pyro.sample("z", dist.Bernoulli(logits=a))
            pyro.sample("x", dist.Bernoulli(logits=b + c * z), obs=x)

    def guide(self, x: Tensor, idx: Tensor | None = None, size: int | None = None) -> None:
        pyro.module("rec", self.rec)
        u, v = self.rec.phi
        with pyro.plate("data", size or x.shape[-1], subsample=idx):
            pyro.sample("z", dist.Bernoulli(logits=u + v * x))

    # -- exact quantities by enumeration --------------------------------------------------
    def log_joint(self, z: Tensor, x: Tensor) -> Tensor:
        a, b, c = self.gen.theta
        return dist.Bernoulli(logits=a).log_prob(z) + dist.Bernoulli(logits=b + c * z).log_prob(x)

    def log_q(self, z: Tensor, x: Tensor) -> Tensor:
        u, v = self.rec.phi
        return dist.Bernoulli(logits=u + v * x).log_prob(z)

    def grads(self, value: Tensor) -> tuple[Tensor, Tensor]:
        theta, phi = torch.autograd.grad(value, [self.gen.theta, self.rec.phi],
                                         allow_unused=True)
        zero = torch.zeros
        return (theta if theta is not None else zero(3), phi if phi is not None else zero(2))

    def exact_rws(self, x: float, k: int) -> tuple[Tensor, Tensor]:
        """E[∇θ log (1/K) Σ w_k] and E[Σ_k w̃_k ∇φ log q(z_k|x)] for one datapoint, by
        enumerating all 2^K particle configurations."""
        zs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=k)))
        xs = torch.full_like(zs, x)
        log_q = self.log_q(zs, xs)
        prob = log_q.sum(-1).exp().detach()
        log_w_theta = self.log_joint(zs, xs) - log_q.detach()
        iwae = torch.logsumexp(log_w_theta, -1) - math.log(k)
        snis = torch.softmax(log_w_theta.detach(), -1)
        theta, _ = self.grads((prob * iwae).sum())
        _, phi = self.grads((prob * (snis * log_q).sum(-1)).sum())
        return theta, phi

    def exact_sleep(self) -> Tensor:
        """∇φ E_{p(x,z)}[log q(z|x)]."""
        zx = torch.tensor(list(itertools.product([0.0, 1.0], repeat=2)))
        z, x = zx[:, 0], zx[:, 1]
        prob = self.log_joint(z, x).exp().detach()
        return self.grads((prob * self.log_q(z, x)).sum())[1]

    def exact_wake_theta(self, x: float) -> Tensor:
        """E_{q(z|x)}[∇θ log p(x, z)]."""
        z = torch.tensor([0.0, 1.0])
        xs = torch.full_like(z, x)
        prob = self.log_q(z, xs).exp().detach()
        return self.grads((prob * self.log_joint(z, xs)).sum())[0]


def estimates(objective, tiny: Tiny, calls: int, *args_fn) -> tuple[Tensor, Tensor]:
    """M gradient estimates (θ then φ, concatenated) from ``loss_and_grads``."""
    out = []
    for m in range(calls):
        args = args_fn[0](m) if args_fn else ()
        tiny.zero_grad()
        objective.loss_and_grads(tiny.model, tiny.guide, *args)
        out.append(torch.cat([tiny.gen.theta.grad.clone(), tiny.rec.phi.grad.clone()]))
    return mean_and_se(torch.stack(out))


X01 = torch.tensor([0.0, 1.0]).repeat(40)  # 40 datapoints of each value


# -- exact expected gradients ---------------------------------------------------------------
@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("insomnia", [1.0, 0.0, 0.3])
def test_rws_expected_gradient_is_exact(vectorize: bool, insomnia: float) -> None:
    tiny, k, sleep = Tiny(), 3, 4
    objective = ReweightedWakeSleepELBO(k, insomnia, num_sleep_particles=sleep,
                                        vectorize_particles=vectorize)
    mean, se = estimates(objective, tiny, 60, lambda _: (X01,))
    theta0, phi0 = tiny.exact_rws(0.0, k)
    theta1, phi1 = tiny.exact_rws(1.0, k)
    n = len(X01) / 2
    wake_phi = n * (phi0 + phi1)
    sleep_phi = len(X01) * tiny.exact_sleep()
    exact_theta = -n * (theta0 + theta1)
    exact_phi = -(insomnia * wake_phi + (1 - insomnia) * sleep_phi)
    assert_within(mean, se, torch.cat([exact_theta, exact_phi]), Z, positive_se=True)


def test_ws_expected_gradient_is_exact() -> None:
    tiny = Tiny()
    objective = WakeSleepELBO(num_particles=2, num_sleep_particles=8)
    mean, se = estimates(objective, tiny, 60, lambda _: (X01,))
    n = len(X01) / 2
    exact_theta = -n * (tiny.exact_wake_theta(0.0) + tiny.exact_wake_theta(1.0))
    exact_phi = -len(X01) * tiny.exact_sleep()
    assert_within(mean, se, torch.cat([exact_theta, exact_phi]), Z, positive_se=True)


def test_minibatch_gradient_is_unbiased_for_full_data() -> None:
    """A subsampled plate (B = 3 of N = 9) gives an unbiased estimate of the full-data
    gradient, wake and sleep phases alike. Given the subset, the estimator's expectation
    is exactly (N/B) Σ_{i in subset} g(x_i) (wake) and N ∇E_p[log q] (sleep); averaged
    over uniform subsets that is the full-data gradient Σ_i g(x_i) (checked exactly
    below over all subsets). The random part, estimate minus conditional expectation,
    must have mean zero (within Z standard errors)."""
    tiny, k, insomnia = Tiny(), 3, 0.5
    full = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    n, b = len(full), 3
    exact = {x: tiny.exact_rws(x, k) for x in (0.0, 1.0)}
    per_point = torch.stack([-torch.cat([exact[float(x)][0], insomnia * exact[float(x)][1]])
                             for x in full])
    sleep = torch.cat([torch.zeros(3), -(1 - insomnia) * n * tiny.exact_sleep()])

    def conditional(idx: Tensor) -> Tensor:
        return n / b * per_point[idx].sum(0) + sleep

    subsets = torch.tensor(list(itertools.combinations(range(n), b)))
    over_subsets = torch.stack([conditional(idx) for idx in subsets]).mean(0)
    assert torch.allclose(over_subsets, per_point.sum(0) + sleep, atol=1e-5)

    objective = ReweightedWakeSleepELBO(k, insomnia, num_sleep_particles=2)
    generator = torch.Generator().manual_seed(1)
    residuals = []
    for _ in range(200):
        idx = torch.randperm(n, generator=generator)[:b]
        tiny.zero_grad()
        objective.loss_and_grads(tiny.model, tiny.guide, full[idx], idx, n)
        grad = torch.cat([tiny.gen.theta.grad, tiny.rec.phi.grad])
        residuals.append(grad - conditional(idx))
    assert_within(*mean_and_se(torch.stack(residuals)), torch.zeros(5), Z, positive_se=True)


def test_weights_are_per_datapoint() -> None:
    """On a batch, the importance weights of one datapoint do not depend on the others:
    the loss is the sum of single-datapoint IWAE bounds."""
    tiny = Tiny()
    objective = ReweightedWakeSleepELBO(4)
    x = torch.tensor([0.0, 1.0, 1.0])
    pyro.set_rng_seed(3)
    loss = objective.differentiable_loss(tiny.model, tiny.guide, x)
    pyro.set_rng_seed(3)
    particles = objective.particles(tiny.model, tiny.guide, (x,), {}, detach_guide=True)
    model_trace, guide_trace = particles.traces[0]
    log_w = (model_trace.nodes["z"]["log_prob"] + model_trace.nodes["x"]["log_prob"]
             - guide_trace.nodes["z"]["log_prob"])
    per_datapoint = torch.logsumexp(log_w, 0) - math.log(4)
    assert torch.allclose(loss, -per_datapoint.sum())


# -- equivalence with Pyro --------------------------------------------------------------------
def _single(tiny: Tiny):
    def model(x: Tensor) -> None:
        pyro.module("gen", tiny.gen)
        a, b, c = tiny.gen.theta
        z = pyro.sample("z", dist.Bernoulli(logits=a))
        pyro.sample("x", dist.Bernoulli(logits=b + c * z), obs=x)

    def guide(x: Tensor, observations: dict | None = None) -> None:
        pyro.module("rec", tiny.rec)
        x = observations["x"] if observations else x
        u, v = tiny.rec.phi
        pyro.sample("z", dist.Bernoulli(logits=u + v * x))

    return model, guide


@pytest.mark.parametrize("insomnia", [1.0, 0.0, 0.5])
def test_equivalent_to_pyro_rws_on_one_datapoint(insomnia: float) -> None:
    tiny = Tiny()
    model, guide = _single(tiny)
    x = torch.tensor(1.0)
    results = []
    for objective in (PyroRWS(5, insomnia, max_plate_nesting=0),
                      ReweightedWakeSleepELBO(5, insomnia, max_plate_nesting=0)):
        tiny.zero_grad()
        pyro.set_rng_seed(7)
        losses = objective.loss_and_grads(model, guide, x)
        grads = torch.cat([tiny.gen.theta.grad.clone(), tiny.rec.phi.grad.clone()])
        results.append((losses, grads))
    (pyro_theta_loss, pyro_phi_loss), pyro_grads = results[0]
    loss, grads = results[1]
    phases = objective.last_phase_losses
    assert torch.allclose(grads, pyro_grads, rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(pyro_theta_loss, rel=1e-5)
    phi = insomnia * phases["wake_phi"] + (1 - insomnia) * phases.get("sleep_phi", 0.0)
    assert phi == pytest.approx(pyro_phi_loss, rel=1e-5)


# -- dreams and amortized guides ----------------------------------------------------------------
def test_dream_replaces_data_inside_containers_without_mutation() -> None:
    tiny = Tiny()
    x = torch.tensor([0.0, 1.0, 1.0])

    def model(batch: dict) -> None:
        tiny.model(batch["x"])

    def guide(batch: dict) -> None:
        tiny.guide(batch["x"])

    batch = {"x": x}
    x_copy = x.clone()
    pyro.set_rng_seed(2)
    WakeSleepELBO(1, 3).loss_and_grads(model, guide, batch)
    auto = tiny.rec.phi.grad.clone()
    assert batch["x"] is x and torch.equal(x, x_copy) and list(batch) == ["x"]
    tiny.zero_grad()
    pyro.set_rng_seed(2)
    WakeSleepELBO(1, 3).loss_and_grads(tiny.model, tiny.guide, x)
    assert torch.equal(auto, tiny.rec.phi.grad)


def test_dream_args_explicit() -> None:
    """A guide that receives the data in another form says so with ``dream_args``."""
    tiny = Tiny()
    x = torch.tensor([0.0, 1.0, 1.0])

    def model(x2d: Tensor) -> None:
        tiny.model(x2d[..., 0])  # observes a new tensor, not the argument

    def guide(x2d: Tensor) -> None:
        tiny.guide(x2d[..., 0])

    with pytest.raises(ValueError, match="site\\(s\\) \\['x'\\]"):
        WakeSleepELBO().loss(model, guide, x.unsqueeze(-1))
    objective = WakeSleepELBO(dream_args=lambda dreams, args, kwargs: (
        (dreams["x"].unsqueeze(-1),), kwargs))
    pyro.set_rng_seed(4)
    objective.loss_and_grads(model, guide, x.unsqueeze(-1))
    explicit = tiny.rec.phi.grad.clone()
    tiny.zero_grad()
    pyro.set_rng_seed(4)
    WakeSleepELBO().loss_and_grads(tiny.model, tiny.guide, x)
    assert torch.equal(explicit, tiny.rec.phi.grad)


def test_vectorized_dream_guide_that_cannot_broadcast_falls_back_with_a_warning() -> None:
    sbn = SigmoidBeliefNet((6, 3))
    x = torch.bernoulli(torch.full((4, 6), 0.5))

    def batch_first_guide(x: Tensor) -> None:  # its plate size ignores leading dream dims
        pyro.module("recognition", sbn.recognition)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("h1", dist.Bernoulli(logits=sbn.recognition[0](x)).to_event(1))

    # the vectorized dream cannot be consumed (the error says why, in the warning); the
    # objective then dreams one run after another, as vectorize_particles=False does
    pyro.set_rng_seed(0)
    with pytest.warns(RuntimeWarning, match="could not consume the dream.*site 'h1'"):
        fallback = WakeSleepELBO(1, 3).loss(sbn.model, batch_first_guide, x)
    pyro.set_rng_seed(0)
    sequential = WakeSleepELBO(1, 3, vectorize_particles=False).loss(
        sbn.model, batch_first_guide, x)
    assert fallback == sequential
    # the library's own SBN guide broadcasts over vectorized dreams
    assert math.isfinite(WakeSleepELBO(1, 3).loss(sbn.model, sbn.guide, x))
    assert math.isfinite(ReweightedWakeSleepELBO(3, 0.5).loss(sbn.model, sbn.guide, x))


# -- bad input ----------------------------------------------------------------------
def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="num_particles >= 2"):
        ReweightedWakeSleepELBO(1)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="insomnia"):
            ReweightedWakeSleepELBO(2, bad)
    with pytest.raises(ValueError, match="num_sleep_particles"):
        WakeSleepELBO(1, 0)
    with pytest.raises(TypeError, match="dream_args"):
        WakeSleepELBO(dream_args=3)  # type: ignore[arg-type]


def test_bad_models_and_guides() -> None:
    tiny = Tiny()
    x = torch.tensor([0.0, 1.0])

    def no_obs_model(x: Tensor) -> None:
        pyro.module("gen", tiny.gen)
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("z", dist.Bernoulli(logits=tiny.gen.theta[0]))

    with pytest.raises(ValueError, match="no observed site"):
        WakeSleepELBO().loss(no_obs_model, tiny.guide, x)

    def extra_guide(x: Tensor) -> None:
        tiny.guide(x)
        pyro.sample("w", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="guide site 'w'"):
        ReweightedWakeSleepELBO(2).loss(tiny.model, extra_guide, x)

    def cloning_model(x: Tensor) -> None:
        tiny.model(x.clone())  # the guide never receives the observed tensor

    with pytest.raises(ValueError, match="observed site\\(s\\) \\['x'\\]"):
        ReweightedWakeSleepELBO(2, 0.5).loss(cloning_model, tiny.guide, x)

    def sharing_guide(x: Tensor) -> None:
        pyro.module("gen", tiny.gen)
        tiny.guide(x)

    with pytest.raises(ValueError, match="'gen\\$\\$\\$theta' registered by both"):
        WakeSleepELBO().loss(tiny.model, sharing_guide, x)

    with pytest.raises(TypeError, match="dream_args must return"):
        WakeSleepELBO(dream_args=lambda d, a, k: a).loss(tiny.model, tiny.guide, x)


# -- routes -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [lambda: WakeSleepELBO(), lambda: ReweightedWakeSleepELBO(3, 0.5, num_sleep_particles=1)],
)
def test_svi_and_module_routes(make) -> None:
    sbn = SigmoidBeliefNet((8, 4))
    x = torch.bernoulli(torch.full((5, 8), 0.3))
    objective = make()
    before = [p.detach().clone() for p in sbn.parameters()]
    svi = SVI(sbn.model, sbn.guide, pyro.optim.Adam({"lr": 0.01}), loss=objective)
    loss = svi.step(x)
    assert isinstance(loss, float) and math.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, sbn.parameters(), strict=True))
    assert set(objective.last_phase_losses) >= {"wake_theta"}

    module = objective(sbn.model, sbn.guide)
    sbn.zero_grad()
    pyro.set_rng_seed(5)
    module(x).backward()
    via_module = [p.grad.clone() for p in sbn.parameters()]
    sbn.zero_grad()
    pyro.set_rng_seed(5)
    objective.differentiable_loss(sbn.model, sbn.guide, x).backward()
    for a, p in zip(via_module, sbn.parameters(), strict=True):
        assert torch.equal(a, p.grad)


def test_loss_meaning_and_phase_losses() -> None:
    """``loss`` is the negative ELBO (WS) / negative IWAE bound (RWS) of the wake
    particles; phase losses come from the same call."""
    sbn = SigmoidBeliefNet((8, 4))
    x = torch.bernoulli(torch.full((5, 8), 0.3))
    ws = WakeSleepELBO(1)
    pyro.set_rng_seed(6)
    loss = ws.loss(sbn.model, sbn.guide, x)
    pyro.set_rng_seed(6)
    guide_trace = pyro.poutine.trace(sbn.guide).get_trace(x)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(sbn.model, guide_trace)).get_trace(x)
    elbo = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
    assert loss == pytest.approx(-float(elbo.detach()), rel=1e-5)
    assert ws.last_phase_losses["wake_theta"] == pytest.approx(
        -float(model_trace.log_prob_sum().detach()), rel=1e-5)
    rws = ReweightedWakeSleepELBO(2, 0.0, num_sleep_particles=1)
    loss = rws.loss(sbn.model, sbn.guide, x)
    assert set(rws.last_phase_losses) == {"wake_theta", "wake_phi", "sleep_phi"}
    assert rws.last_phase_losses["wake_theta"] == loss


def test_gmm_runs_with_vectorized_dreams() -> None:
    gmm = GaussianMixture()
    x = gmm.sample(7)
    objective = ReweightedWakeSleepELBO(4, 0.5)
    assert math.isfinite(objective.loss_and_grads(gmm.model, gmm.guide, x))
    assert gmm.generative.theta.grad is not None and gmm.recognition[0].weight.grad is not None


@pytest.mark.cuda
def test_cuda() -> None:
    sbn = SigmoidBeliefNet((8, 4)).cuda()
    x = torch.bernoulli(torch.full((5, 8), 0.3, device="cuda"))
    for objective in (WakeSleepELBO(), ReweightedWakeSleepELBO(3, 0.5, num_sleep_particles=1)):
        assert math.isfinite(objective.loss_and_grads(sbn.model, sbn.guide, x))


# -- convergence (slow) ----------------------------------------------------------------------------
def train_gmm(objective, steps: int, seed: int = 0, lr: float = 3e-3) -> GaussianMixture:
    """Le et al. (2019) GMM: Adam on all parameters, a fresh batch of 100 from the true
    model each step."""
    pyro.set_rng_seed(seed)
    gmm = GaussianMixture()
    optimizer = torch.optim.Adam(gmm.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        objective.loss_and_grads(gmm.model, gmm.guide, gmm.sample(100))
        optimizer.step()
    return gmm


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PYRO_WAKESLEEP_SLOW") != "1",
                    reason="slow: set PYRO_WAKESLEEP_SLOW=1 to run")
def test_rws_wake_phi_recovers_gmm() -> None:
    """K = 20 (the largest K of Le et al.), Adam(3e-3), 10,000 steps of batch 100.
    Thresholds: the RMS error of the mixture weights estimated from the *labels* of one
    batch of 100, sqrt((1 - Σπ²)/100) ≈ 0.097; and 0.1 for the posterior distance (whose
    maximum is √2), averaged over 10,000 fresh x."""
    pyro.enable_validation(False)
    gmm = train_gmm(ReweightedWakeSleepELBO(20), steps=10000)
    weights = gmm.true_weights
    pyro.set_rng_seed(123)
    x = gmm.sample(10000)
    assert gmm.weight_error() < math.sqrt((1 - float((weights**2).sum())) / 100)
    assert gmm.posterior_error(x) < 0.1

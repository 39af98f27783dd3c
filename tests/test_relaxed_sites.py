"""Relaxations as a per-site option (pyro_wakesleep.relaxed_sites): hard forward values
with the right law, the bias each estimator implies (exact by enumeration where the
estimator is deterministic given the draw, within standard errors otherwise), and the
site working through SVI with every objective, the module route and jit=True."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from checks import enum_grads, mean_and_se, store_draws
from models import X, two_layer_model
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import nn

from pyro_wakesleep import ScoreFunctionELBO, VimcoELBO, relax, relaxed
from pyro_wakesleep.relaxation import (
    gumbel_rao,
    one_hot_of,
    reinmax,
    straight_through,
    straight_through_gumbel_softmax,
)

RELAXATIONS = ["straight_through", "gumbel_softmax", "reinmax", "gumbel_rao"]
Z = 4.0  # standard errors


def _as_two_class(alpha, b):
    """A Bernoulli(logits alpha) draw b as the two-class one-hot with logits (0, alpha)."""
    logits = torch.stack([torch.zeros_like(alpha), alpha], -1)
    return logits, torch.stack([1 - b, b], -1)


def _toy_exact(alpha, f):
    """d/dalpha E_{b ~ Bernoulli(sigmoid(alpha))} f(b)."""
    p = torch.sigmoid(alpha)
    return p * (1 - p) * (f(torch.tensor(1.0)) - f(torch.tensor(0.0)))


def _deterministic_mean(estimator, alpha, f, temperature=1.0):
    """E over b of the gradient in alpha of a deterministic-given-b estimator, exactly."""
    p = torch.sigmoid(alpha)
    total = 0.0
    for b, prob in ((1.0, p), (0.0, 1 - p)):
        a = alpha.clone().requires_grad_(True)
        logits, one_hot = _as_two_class(a, torch.tensor(b))
        value = estimator(one_hot, logits, temperature)[..., 1]
        assert value.item() == b
        (grad,) = torch.autograd.grad(f(value), a)
        total = total + prob * grad
    return total


# -- (a) pure functions: forward values and exact means ----------------------------------
@pytest.mark.parametrize("alpha", [-1.3, 0.0, 0.7])
def test_straight_through_unbiased_for_linear_f(alpha):
    alpha = torch.tensor(alpha)
    f = lambda b: 2.5 * b - 0.3  # noqa: E731
    assert torch.allclose(_deterministic_mean(straight_through, alpha, f), _toy_exact(alpha, f))


@pytest.mark.parametrize("alpha", [-1.3, 0.7])
def test_straight_through_biased_reinmax_exact_for_quadratic_f(alpha):
    """On the toy (b - t)^2, straight-through's mean is p(1-p) E[2(b-t)] != the exact
    p(1-p)(1-2t) unless p = 1/2; ReinMax is exact for any f quadratic (two classes)."""
    alpha, t = torch.tensor(alpha), 0.499
    f = lambda b: (b - t) ** 2  # noqa: E731
    exact = _toy_exact(alpha, f)
    p = torch.sigmoid(alpha)
    st = _deterministic_mean(straight_through, alpha, f)
    assert torch.allclose(st, p * (1 - p) * 2 * (p - t))
    assert (st - exact).abs() > 0.05
    assert torch.allclose(_deterministic_mean(reinmax, alpha, f), exact, atol=1e-6)


def test_forward_values_are_one_hot_and_gradients_finite():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, requires_grad=True)
    index = torch.distributions.Categorical(logits=logits).sample()
    one_hot = one_hot_of(index, 4, logits.dtype)
    gumbel = -torch.log(-torch.log(torch.rand(5, 4)))
    outs = [straight_through(one_hot, logits, 0.5), reinmax(one_hot, logits, 0.5),
            gumbel_rao(one_hot, logits, torch.rand(7, 5, 4), 0.5),
            straight_through_gumbel_softmax(gumbel, logits, 0.5)]
    for out in outs[:3]:
        assert torch.equal(out, one_hot)
    assert torch.equal(outs[3], one_hot_of((logits + gumbel).argmax(-1), 4, logits.dtype))
    for out in outs:
        (grad,) = torch.autograd.grad((out * torch.arange(4.0)).sum(), logits)
        assert torch.isfinite(grad).all()
        assert torch.allclose(grad.sum(-1), torch.zeros(5), atol=1e-5)  # shift invariance


def _toy_draws(relaxation, alpha, t, n, temperature=1.0):
    """n independent gradients in alpha of (b - t)^2 through a relaxed Bernoulli site."""
    a = torch.full((n,), alpha, requires_grad=True)
    b = relaxed(dist.Bernoulli(logits=a), relaxation, temperature).rsample()
    (grad,) = torch.autograd.grad(((b - t) ** 2).sum(), a)
    return grad


def test_gumbel_rao_same_mean_lower_variance_than_gumbel_softmax():
    """Gumbel-Rao is the Rao-Blackwellization of straight-through Gumbel-softmax: the
    same mean (within standard errors), a variance lower beyond its standard error; and
    both are biased on the toy at temperature 1."""
    torch.manual_seed(1)
    alpha, t, n = 0.4, 0.499, 20000
    exact = _toy_exact(torch.tensor(alpha), lambda b: (b - t) ** 2)
    gs = _toy_draws("gumbel_softmax", alpha, t, n)
    gr = _toy_draws("gumbel_rao", alpha, t, n)
    (m_gs, se_gs), (m_gr, se_gr) = mean_and_se(gs), mean_and_se(gr)
    assert (m_gs - m_gr).abs() <= Z * math.hypot(se_gs, se_gr)
    assert (m_gr - exact).abs() > Z * se_gr
    # se of a sample variance: var * sqrt(2 / (n - 1)) (Gaussian approximation)
    v_gs, v_gr = gs.var(), gr.var()
    assert v_gr + Z * math.sqrt(2 / (n - 1)) * math.hypot(v_gs, v_gr) < v_gs


# -- the distribution: forward law -------------------------------------------------------
@pytest.mark.parametrize("relaxation", RELAXATIONS)
def test_forward_draws_have_the_law_of_the_site(relaxation):
    torch.manual_seed(2)
    n = 20000
    probs = torch.tensor([0.15, 0.6])
    b = relaxed(dist.Bernoulli(probs=probs), relaxation, 0.7).rsample((n,))
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    se = (probs * (1 - probs) / n).sqrt()
    assert ((b.mean(0) - probs).abs() <= Z * se).all()
    cat = torch.tensor([0.2, 0.5, 0.3])
    d = relaxed(dist.OneHotCategorical(probs=cat), relaxation, 0.7)
    h = d.rsample((n,))
    assert torch.equal(h.sum(-1), torch.ones(n))
    assert ((h.mean(0) - cat).abs() <= Z * (cat * (1 - cat) / n).sqrt()).all()
    assert torch.allclose(d.log_prob(h[:5]), dist.OneHotCategorical(probs=cat).log_prob(h[:5]))


def test_bad_arguments_raise_naming_the_site():
    with pytest.raises(ValueError, match="site 'c'.*OneHotCategorical"):
        relaxed(dist.Categorical(logits=torch.zeros(3)), "reinmax", site="c")
    with pytest.raises(ValueError, match="unknown relaxation"):
        relaxed(dist.Bernoulli(logits=torch.zeros(3)), "concrete")
    with pytest.raises(ValueError, match="temperature"):
        relaxed(dist.Bernoulli(logits=torch.zeros(3)), "reinmax", temperature=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        relaxed(dist.Bernoulli(logits=torch.zeros(3)), "gumbel_rao", num_samples=0)
    with pytest.raises(ValueError, match="Bernoulli or OneHotCategorical"):
        relaxed(dist.Normal(0.0, 1.0), "reinmax")

    def guide():
        pyro.sample("c", dist.Categorical(logits=torch.zeros(3)),
                    infer={"relaxation": "straight_through"})

    with pytest.raises(ValueError, match="site 'c'"):
        relax(guide)()


def test_to_event_kept_outside():
    d = relaxed(dist.Bernoulli(logits=torch.zeros(2, 3)).to_event(1), "reinmax")
    assert isinstance(d, dist.Independent) and d.has_rsample
    assert d.rsample((4,)).shape == (4, 2, 3) and d.event_shape == (3,)


# -- (b)/(c) a small model: two Bernoulli sites in a data plate ----------------------------
def two_layer_guide(x):
    ab = pyro.param("ab", torch.tensor([0.1, 0.3, -0.2]))
    with pyro.plate("data", len(x)):
        z1 = pyro.sample("z1", dist.Bernoulli(logits=ab[0] * x))
        pyro.sample("z2", dist.Bernoulli(logits=ab[1] + ab[2] * z1))


def _setup():
    pyro.clear_param_store()
    pyro.param("w", torch.tensor([0.3, -0.4, 0.9]))
    pyro.param("ab", torch.tensor([0.1, 0.3, -0.2]))


@pytest.mark.parametrize("relaxation", RELAXATIONS)
def test_model_gradients_unbiased_guide_gradients_biased(relaxation):
    """The model's parameters get unbiased gradients (the draws' law is exact); the
    guide's get the relaxation's bias: beyond Z standard errors on this model for the
    first-order estimators (straight-through and Gumbel-softmax at temperature 1);
    ReinMax's and Gumbel-Rao's are measured in benchmarks/bench_relaxations.py."""
    _setup()
    exact = enum_grads(two_layer_model, two_layer_guide, X)
    guide = relax(two_layer_guide, {"z1": relaxation, "z2": relaxation})
    elbo = ScoreFunctionELBO(num_particles=400)
    samples = store_draws(elbo, two_layer_model, guide, X, num_draws=40)
    mean, se = mean_and_se(samples["w"])
    assert ((mean - exact["w"]).abs() <= Z * se).all(), (mean, exact["w"], se)
    mean, se = mean_and_se(samples["ab"])
    assert torch.isfinite(mean).all()
    if relaxation in ("straight_through", "gumbel_softmax"):
        assert ((mean - exact["ab"]).abs() > Z * se).any(), (mean, exact["ab"], se)


def test_equal_to_trace_elbo_under_one_seed():
    _setup()
    guide = relax(two_layer_guide, {"z1": "reinmax", "z2": "gumbel_softmax"})
    grads = [store_draws(e, two_layer_model, guide, X, num_draws=1)
             for e in (ScoreFunctionELBO(), Trace_ELBO())]
    for g in grads[1:]:
        for name in ("w", "ab"):
            assert torch.allclose(g[name], grads[0][name], atol=1e-5), name


@pytest.mark.parametrize("make", [ScoreFunctionELBO, lambda: VimcoELBO(num_particles=4),
                                  Trace_ELBO])
def test_svi_with_infer_option(make):
    def guide(x):
        ab = pyro.param("ab", torch.tensor([0.1, 0.3, -0.2]))
        with pyro.plate("data", len(x)):
            z1 = pyro.sample("z1", dist.Bernoulli(logits=ab[0] * x),
                             infer={"relaxation": "reinmax", "temperature": 0.5})
            pyro.sample("z2", dist.Bernoulli(logits=ab[1] + ab[2] * z1),
                        infer={"relaxation": "gumbel_rao", "num_samples": 5})

    _setup()
    before = pyro.param("ab").detach().clone()
    svi = SVI(two_layer_model, relax(guide), Adam({"lr": 0.05}), make())
    for _ in range(3):
        assert math.isfinite(svi.step(X))
    assert not torch.equal(pyro.param("ab").detach(), before)


class Guide(nn.Module):
    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.2, -0.5, 0.1]))

    def forward(self):
        pyro.sample("c", relaxed(dist.OneHotCategorical(logits=self.logits), "straight_through"))


def model():
    pyro.sample("c", dist.OneHotCategorical(logits=torch.tensor([0.0, 1.0, -1.0])))


def test_module_route():
    guide = Guide()
    module = ScoreFunctionELBO()(model, guide)
    loss = module()
    loss.backward()
    assert torch.isfinite(guide.logits.grad).all() and guide.logits.grad.abs().sum() > 0


@pytest.mark.parametrize("relaxation", ["reinmax", "gumbel_rao"])
def test_jit_equal_to_eager(relaxation):
    guide = relax(two_layer_guide, {"z1": relaxation, "z2": relaxation})
    losses = []
    for jit in (False, True):
        _setup()
        pyro.set_rng_seed(5)
        svi = SVI(two_layer_model, guide, Adam({"lr": 0.05}), ScoreFunctionELBO(jit=jit))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # compiled, not fallen back
            losses.append([svi.step(X) for _ in range(4)] + pyro.param("ab").tolist())
        if jit:
            assert len(svi.loss_and_grads.__self__.compiled.graphs) == 1
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)

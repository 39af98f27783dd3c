"""Doubly reparameterized gradients (Tucker et al., 2019) and sticking the landing
(Roeder et al., 2017): ``VimcoELBO(dreg=True)``, ``ReweightedWakeSleepELBO(dreg=True)``,
``ScoreFunctionELBO(stick_the_landing=True)``.

Most tests draw many independent copies of one estimator in a single call: the data plate
holds ``N`` copies of the same datapoint and the guide has parameters of its own for each
copy, so the gradient with respect to the copy-``i`` parameters is draw ``i`` of the
per-datapoint estimator. Tolerances are multiples of the standard error of those means.
"""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_wakesleep.objectives import ReweightedWakeSleepELBO, ScoreFunctionELBO, VimcoELBO

X = 1.5  # the observation every copy shares
SIGMAS = 4.5  # |difference| bound in standard errors (several parameters per test)


# -- models ------------------------------------------------------------------------------
def normal_model(n, x=X):
    mu = pyro.param("mu", torch.tensor(0.2))
    with pyro.plate("data", n):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.full((n,), x))


def normal_guide(n, loc=0.3, log_scale=0.0):
    a = pyro.param("a", torch.full((n,), loc))
    b = pyro.param("b", torch.full((n,), log_scale))
    with pyro.plate("data", n):
        pyro.sample("z", dist.Normal(a, b.exp()))


def hierarchical_model(n):
    mu = pyro.param("mu", torch.tensor(0.2))
    with pyro.plate("data", n):
        z1 = pyro.sample("z1", dist.Normal(mu, 1.0))
        z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
        pyro.sample("x", dist.Normal(z2, 0.5), obs=torch.full((n,), X))


def hierarchical_guide(n):
    """z2's parameters depend on the reparameterized z1 (so the path through z1 into
    q(z2 | z1) is part of the DReG gradient), and z2 is a LogNormal-shifted
    TransformedDistribution."""
    a = pyro.param("a", torch.full((n,), 0.4))
    c = pyro.param("c", torch.full((n,), 0.5))
    with pyro.plate("data", n):
        z1 = pyro.sample("z1", dist.Normal(a, 0.8))
        base = dist.Normal(c * z1, 0.7)
        pyro.sample("z2", dist.TransformedDistribution(
            base, [dist.transforms.AffineTransform(0.1, 1.0)]))


def mixed_model(n):
    mu = pyro.param("mu", torch.tensor(0.2))
    with pyro.plate("data", n):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        c = pyro.sample("c", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(z + 2.0 * c - 1.0, 1.0), obs=torch.full((n,), X))


def mixed_guide(n):
    """The discrete site's parameters depend on the reparameterized draw."""
    a = pyro.param("a", torch.full((n,), 0.3))
    g = pyro.param("g", torch.full((n,), 0.8))
    r = pyro.param("r", torch.full((n,), -0.2))
    with pyro.plate("data", n):
        z = pyro.sample("z", dist.Normal(a, 0.9))
        pyro.sample("c", dist.Bernoulli(logits=r + g * z))


def discrete_model(n):
    with pyro.plate("data", n):
        c = pyro.sample("c", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(2.0 * c - 1.0, 1.0), obs=torch.full((n,), X))


def only_discrete_guide(n):
    r = pyro.param("r", torch.full((n,), -0.2))
    with pyro.plate("data", n):
        pyro.sample("c", dist.Bernoulli(logits=r))


# -- helpers -----------------------------------------------------------------------------
def gradients(loss, model, guide, n, seed=0):
    """The gradient of every parameter after one ``differentiable_loss`` call."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    value = loss.differentiable_loss(model, guide, n)
    params = dict(pyro.get_param_store().named_parameters())
    grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    return {name: (g if g is not None else torch.zeros_like(p))
            for (name, p), g in zip(params.items(), grads, strict=True)}


def mean_se(draws):
    return draws.mean().item(), draws.std().item() / math.sqrt(draws.numel())


def assert_same_mean(draws, other, name):
    (m1, s1), (m2, s2) = mean_se(draws), mean_se(other)
    tol = SIGMAS * math.hypot(s1, s2)
    assert abs(m1 - m2) < tol, f"{name}: {m1:.4f} vs {m2:.4f} (tolerance {tol:.4f})"


def snr(draws):
    """|mean| / sd, and its standard error by the delta method (normal draws)."""
    value = (draws.mean().abs() / draws.std()).item()
    return value, math.sqrt((1.0 + value**2 / 2.0) / draws.numel())


# -- (b) equivalence with a hand-written estimator under the same seed ---------------------
def hand_written_dreg(k, n, seed, rws=False):
    """DReG-IWAE (or DReG-RWS wake-phi) for the normal model, in plain torch, on the
    draws Pyro makes under ``seed``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    plate = pyro.plate("num_particles_vectorized", k, dim=-2)
    trace = poutine.trace(plate(normal_guide)).get_trace(n)
    mu, a, b = torch.tensor(0.2, requires_grad=True), pyro.param("a"), pyro.param("b")
    eps = ((trace.nodes["z"]["value"] - a) / b.exp()).detach()
    z = a + b.exp() * eps
    log_p = dist.Normal(mu, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(torch.tensor(X))
    log_w = log_p - dist.Normal(a.detach(), b.exp().detach()).log_prob(z)
    w = torch.softmax(log_w.detach(), 0)
    coef = (w - w**2) if rws else w**2
    (ga, gb) = torch.autograd.grad((coef * log_w).sum(), [a, b])
    z_stop = z.detach()
    log_p_stop = (dist.Normal(mu, 1.0).log_prob(z_stop)
                  + dist.Normal(z_stop, 1.0).log_prob(torch.tensor(X)))
    (gmu,) = torch.autograd.grad((w * log_p_stop).sum(), [mu])
    # both losses are minus the ascent direction: -bound, and RWS's wake-phi loss
    return {"a": -ga, "b": -gb, "mu": -gmu}


@pytest.mark.parametrize("vectorize", [True, False])
def test_vimco_dreg_equals_hand_written(vectorize):
    """Sequential particles draw the same numbers in the same order as vectorized ones."""
    k, n = 4, 3
    expected = hand_written_dreg(k, n, seed=3)
    got = gradients(VimcoELBO(k, dreg=True, max_plate_nesting=1,
                              vectorize_particles=vectorize), normal_model, normal_guide, n, 3)
    for name in ("a", "b", "mu"):
        assert torch.allclose(got[name], expected[name], atol=1e-5), name


def test_rws_dreg_wake_phi_equals_hand_written():
    k, n = 4, 3
    expected = hand_written_dreg(k, n, seed=5, rws=True)
    got = gradients(ReweightedWakeSleepELBO(k, dreg=True, max_plate_nesting=1),
                    normal_model, normal_guide, n, 5)
    for name in ("a", "b"):
        assert torch.allclose(got[name], expected[name], atol=1e-5), name


@pytest.mark.parametrize("make", [
    lambda dreg: VimcoELBO(6, dreg=dreg),
    lambda dreg: ReweightedWakeSleepELBO(6, dreg=dreg),
    lambda dreg: ScoreFunctionELBO(6, stick_the_landing=dreg),
], ids=["vimco", "rws", "stl"])
@pytest.mark.parametrize("vectorize", [True, False])
def test_model_gradient_unchanged(make, vectorize):
    """Same seed, same draws: the model's gradient and the loss are those of the standard
    estimator (equal up to the order of floating-point sums)."""
    for model, guide in ((normal_model, normal_guide), (mixed_model, mixed_guide)):
        standard, doubly = make(False), make(True)
        standard.vectorize_particles = doubly.vectorize_particles = vectorize
        g0 = gradients(standard, model, guide, 5, seed=11)
        g1 = gradients(doubly, model, guide, 5, seed=11)
        assert torch.allclose(g0["mu"], g1["mu"], rtol=1e-5, atol=1e-6)
        pyro.set_rng_seed(11)
        pyro.clear_param_store()
        l0 = standard.loss(model, guide, 5)
        pyro.set_rng_seed(11)
        pyro.clear_param_store()
        assert l0 == pytest.approx(doubly.loss(model, guide, 5), rel=1e-6)


def test_sequential_and_vectorized_agree_in_distribution():
    """Sequential particles run the same estimator (another order of draws): the means
    of the two agree."""
    n = 1500
    vec = gradients(VimcoELBO(5, dreg=True), normal_model, normal_guide, n, 1)
    seq = gradients(VimcoELBO(5, dreg=True, vectorize_particles=False, max_plate_nesting=1),
                    normal_model, normal_guide, n, 2)
    for name in ("a", "b"):
        assert_same_mean(vec[name], seq[name], name)


# -- (c) unbiasedness ----------------------------------------------------------------------
@pytest.mark.parametrize("model,guide,params", [
    (normal_model, normal_guide, ("a", "b")),
    (hierarchical_model, hierarchical_guide, ("a", "c")),
    (mixed_model, mixed_guide, ("a", "g", "r")),
], ids=["normal", "hierarchical", "mixed"])
def test_vimco_dreg_unbiased(model, guide, params):
    """DReG's guide gradient has the standard IWAE (VIMCO) gradient's expectation; the
    hierarchical guide (parameters of q(z2 | z1) depend on z1) and the mixed one (the
    discrete site's parameters depend on the reparameterized draw) check the paths that a
    per-site re-scoring with detached parameters would miss."""
    n, k = 6000, 5
    standard = gradients(VimcoELBO(k), model, guide, n, seed=1)
    doubly = gradients(VimcoELBO(k, dreg=True), model, guide, n, seed=2)
    for name in params:
        assert_same_mean(doubly[name], standard[name], name)


@pytest.mark.parametrize("model,guide,params", [
    (normal_model, normal_guide, ("a", "b")),
    (mixed_model, mixed_guide, ("a", "g", "r")),
], ids=["normal", "mixed"])
def test_rws_dreg_unbiased(model, guide, params):
    n, k = 6000, 5
    standard = gradients(ReweightedWakeSleepELBO(k), model, guide, n, seed=1)
    doubly = gradients(ReweightedWakeSleepELBO(k, dreg=True), model, guide, n, seed=2)
    for name in params:
        assert_same_mean(doubly[name], standard[name], name)


@pytest.mark.parametrize("make", [
    lambda flag: VimcoELBO(5, dreg=flag),
    lambda flag: ReweightedWakeSleepELBO(5, dreg=flag),
    lambda flag: ScoreFunctionELBO(5, stick_the_landing=flag),
], ids=["vimco", "rws", "stl"])
def test_unbiased_with_autonormal_on_a_constrained_site(make):
    """AutoNormal draws an auxiliary Normal and puts a Delta with the log-Jacobian at the
    positive site: the Jacobian's path through the auxiliary draw stays in the gradient."""
    from pyro.infer.autoguide import AutoNormal

    def model(n):
        with pyro.plate("data", n):
            s = pyro.sample("s", dist.Gamma(2.0, 1.0))
            pyro.sample("x", dist.Normal(0.0, s), obs=torch.full((n,), X))

    n, draws = 6000, []
    for flag, seed in ((False, 1), (True, 2)):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = AutoNormal(model, init_scale=0.5)
        value = make(flag).differentiable_loss(model, guide, n)
        params = dict(pyro.get_param_store().named_parameters())
        grads = torch.autograd.grad(value, list(params.values()))
        draws.append(dict(zip(params, grads, strict=True)))
    for name in draws[0]:
        assert_same_mean(draws[1][name], draws[0][name], name)


def test_stl_unbiased_against_analytic_elbo_gradient():
    """z ~ N(0, 1), x | z ~ N(z, 1), q = N(a, e^b): the ELBO is
    -(a^2 + s^2)/2 - ((x - a)^2 + s^2)/2 + log s + const, so dL/da = x - 2a and
    dL/db = 1 - 2 s^2."""
    def model(n):
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=torch.full((n,), X))

    n, loc, log_scale = 20000, 0.3, -0.4
    s = math.exp(log_scale)

    def guide(n):
        normal_guide(n, loc, log_scale)

    grads = gradients(ScoreFunctionELBO(1, stick_the_landing=True), model, guide, n, seed=4)
    for name, exact in (("a", X - 2 * loc), ("b", 1 - 2 * s**2)):
        m, se = mean_se(-grads[name])  # the loss is minus the ELBO
        assert abs(m - exact) < SIGMAS * se, (name, m, exact, se)


def test_stl_variance_vanishes_at_the_exact_posterior():
    """With q the exact posterior N(x/2, 1/2), log p(x, z) - log q(z) is constant in z:
    STL's gradient is zero for every draw, the standard pathwise one is not."""
    def model(n):
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=torch.full((n,), X))

    def guide(n):
        normal_guide(n, X / 2, 0.5 * math.log(0.5))

    n = 2000
    stl = gradients(ScoreFunctionELBO(1, stick_the_landing=True), model, guide, n, seed=0)
    standard = gradients(ScoreFunctionELBO(1), model, guide, n, seed=0)
    for name in ("a", "b"):
        assert stl[name].abs().max() < 1e-5
        assert standard[name].var() > 0.1


# -- (b) the known effect: SNR against K -------------------------------------------------------
def test_snr_falls_with_k_for_iwae_and_rises_with_dreg():
    """Rainforth et al. (2018): the SNR of IWAE's inference-network gradient falls like
    1/sqrt(K); Tucker et al. (2019): DReG's rises. Guide loc gradient, q off the
    posterior."""
    n = 3000
    values = {}
    for dreg in (False, True):
        for k in (2, 100):
            g = gradients(VimcoELBO(k, dreg=dreg), normal_model, normal_guide, n, seed=k)["a"]
            values[dreg, k] = snr(g)
    for dreg, direction in ((False, -1), (True, 1)):
        (low, se_low), (high, se_high) = values[dreg, 2], values[dreg, 100]
        margin = SIGMAS * math.hypot(se_low, se_high)
        assert direction * (high - low) > margin, (dreg, values)


# -- (d) bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: VimcoELBO(2, dreg="yes"),
    lambda: VimcoELBO(2, dreg=1),
    lambda: ReweightedWakeSleepELBO(2, dreg=None),
    lambda: ScoreFunctionELBO(1, stick_the_landing="true"),
])
def test_wrong_type_raises_type_error(make):
    with pytest.raises(TypeError, match="dreg|stick_the_landing"):
        make()


@pytest.mark.parametrize("make,option", [
    (lambda: VimcoELBO(3, dreg=True), "dreg"),
    (lambda: ReweightedWakeSleepELBO(3, dreg=True), "dreg"),
    (lambda: ScoreFunctionELBO(2, stick_the_landing=True), "stick_the_landing"),
])
def test_no_pathwise_site_warns_and_gives_the_standard_estimator(make, option):
    standard = make()
    setattr(standard, option, False)
    g0 = gradients(standard, discrete_model, only_discrete_guide, 4, seed=2)
    with pytest.warns(UserWarning, match=f"{option}=True.*no pathwise.*'c'"):
        g1 = gradients(make(), discrete_model, only_discrete_guide, 4, seed=2)
    assert torch.allclose(g0["r"], g1["r"], rtol=1e-5, atol=1e-6)


def test_stl_with_force_score_function_warns():
    loss = ScoreFunctionELBO(2, stick_the_landing=True, force_score_function=True)
    with pytest.warns(UserWarning, match="stick_the_landing=True"):
        gradients(loss, normal_model, normal_guide, 3)


def test_loss_does_not_mutate_inputs_and_is_repeatable():
    kwargs = {}
    loss = VimcoELBO(3, dreg=True)
    pyro.set_rng_seed(0)
    a = loss.loss(normal_model, normal_guide, 4, **kwargs)
    pyro.set_rng_seed(0)
    b = loss.loss(normal_model, normal_guide, 4, **kwargs)
    assert a == b and kwargs == {}

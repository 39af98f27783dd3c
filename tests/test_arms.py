"""ARMS (``DisarmELBO(estimator="arms")``) and its copula math: exact laws and expectations
by enumeration (tier a), unbiasedness on program families against exact gradients, the
RELAX/ARMS toy against its exact variance, variance against DisARM and RLOO (tier c),
interface (SVI, module route, fit, jit)."""

import itertools
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from checks import assert_one_path, assert_unbiased, draws, exact_iwae, flat_grad, params_of
from models import MixedGuide, MixedModel, X
from pyro.infer import SVI
from pyro.optim import Adam
from test_disarm import XS, categorical, two_layer
from test_matrix import FALLBACK, PROGRAMS, _check, _draws, _program_params, _reference

from pyro_wakesleep import DisarmELBO, LeaveOneOutBaseline, ScoreFunctionELBO, fit
from pyro_wakesleep.antithetic import (
    antithetic_value,
    arms_correction,
    arms_gradient,
    copula_bivariate_cdf,
    copula_noise,
    copula_pattern_law,
    dirichlet_copula,
    dirichlet_copula_given,
    disarm_gradient,
    stick_breaking_logits,
)
from pyro_wakesleep.examples.datasets import load_digits
from pyro_wakesleep.examples.models import SigmoidBeliefNet


# -- tier (a): the copula --------------------------------------------------------------
@pytest.mark.parametrize("num", [2, 3, 5])
def test_dirichlet_copula_has_uniform_marginals_and_its_pair_law(num):
    torch.manual_seed(0)
    n = 100_000
    u = dirichlet_copula(num, (n,))
    assert u.shape == (num, n)
    se = math.sqrt(1 / 12 / n)
    assert ((u.mean(1) - 0.5).abs() < 4 * se).all()
    assert ((u.pow(2).mean(1) - 1 / 3).abs() < 4 * math.sqrt(4 / 45 / n)).all()
    for a, b in ((0.2, 0.4), (0.5, 0.5), (0.7, 0.9)):
        freq = ((u[0] < a) & (u[-1] < b)).float().mean()
        cdf = copula_bivariate_cdf(torch.tensor(a), torch.tensor(b), num)
        assert abs(freq - cdf) < 4 * math.sqrt(cdf * (1 - cdf) / n) + 1e-6, (a, b, freq, cdf)
    if num == 2:
        assert torch.allclose(u[1], 1 - u[0], atol=1e-6)
    with pytest.raises(ValueError, match="num >= 2"):
        dirichlet_copula(1, (3,))


@pytest.mark.parametrize("num", [2, 4])
def test_copula_given_its_first_draw_has_the_joint_law(num):
    torch.manual_seed(1)
    n = 100_000
    u = dirichlet_copula_given(torch.rand(n), num)
    se = math.sqrt(1 / 12 / n)
    assert ((u.mean(1) - 0.5).abs() < 4 * se).all()
    for i, j in ((0, 1), (1, num - 1), (0, num - 1)):
        if i == j:
            continue
        freq = ((u[i] < 0.3) & (u[j] < 0.6)).float().mean()
        cdf = copula_bivariate_cdf(torch.tensor(0.3), torch.tensor(0.6), num)
        assert abs(freq - cdf) < 4 * math.sqrt(cdf * (1 - cdf) / n) + 1e-6


def test_copula_noise_keeps_the_first_draw_and_the_rare_outcome_exclusive():
    torch.manual_seed(2)
    logits = torch.tensor([-2.5, 2.5]).expand(20_000, 2)
    w = torch.rand(20_000, 2)
    noise = copula_noise(w, logits, 4)
    assert torch.equal(noise[0], w)
    b = (noise < torch.sigmoid(logits)).float()
    # p = 0.076 < 2^-3: under the copula two draws are never both of the rare outcome
    assert (b[..., 0].sum(0) <= 1).all() and ((1 - b[..., 1]).sum(0) <= 1).all()


def test_pattern_law_is_a_law_with_the_right_marginals():
    logits = torch.tensor([-3.0, -0.4, 0.0, 0.8, 2.0])
    for num in (2, 3, 5, 8):
        patterns, probs = copula_pattern_law(logits, num)
        assert torch.allclose(probs.sum(0), torch.ones(5, dtype=torch.float64), atol=1e-9)
        marginal = (probs.unsqueeze(1) * patterns.unsqueeze(-1)).sum(0)  # (num, 5)
        assert torch.allclose(marginal, torch.sigmoid(logits.double()).expand(num, 5),
                              atol=1e-9)


def test_pattern_law_agrees_with_sampling():
    torch.manual_seed(3)
    logits, num, n = torch.tensor([-0.7, 1.1]), 3, 100_000
    noise = copula_noise(torch.rand(n, 2), logits.expand(n, 2), num)
    b = (noise < torch.sigmoid(logits)).long()  # (num, n, 2)
    code = (b * torch.tensor([4, 2, 1]).view(3, 1, 1)).sum(0)  # pattern index, (n, 2)
    _, probs = copula_pattern_law(logits, num)
    for d in range(2):
        freq = torch.bincount(code[:, d], minlength=8).double() / n
        se = (probs[:, d] * (1 - probs[:, d]) / n).sqrt()
        assert ((freq - probs[:, d]).abs() <= 4 * se + 1e-6).all(), (freq, probs[:, d])


# -- tier (a): the estimator --------------------------------------------------------------
def test_two_draws_are_disarm_exactly():
    torch.manual_seed(4)
    logits = torch.randn(500, 3) * 2
    w = torch.rand(500, 3)
    noise = copula_noise(w, logits, 2)
    b = (noise < torch.sigmoid(logits)).float()
    assert torch.equal(b[1], antithetic_value(w, logits))
    f = torch.randn(2, 500, 1)
    got = arms_gradient(f, b, logits)
    want = disarm_gradient(f[0], f[1], b[0], b[1], logits)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(arms_correction(logits, 2), torch.sigmoid(logits.abs()))


def _exact_expectation(logits, num, f):
    """E[arms_gradient] over the exact joint law of the draws, coordinates independent."""
    patterns, probs = copula_pattern_law(logits, num)  # (2^n, n), (2^n, D)
    dims = len(logits)
    total = torch.zeros(dims, dtype=torch.float64)
    for combo in itertools.product(range(len(patterns)), repeat=dims):
        values = torch.stack([patterns[c] for c in combo], -1)  # (n, D)
        prob = math.prod(float(probs[c, d]) for d, c in enumerate(combo))
        total += prob * arms_gradient(f(values).unsqueeze(-1), values, logits.double())
    return total


@pytest.mark.parametrize("num", [2, 3, 4, 6])
def test_bernoulli_arms_is_exactly_unbiased(num):
    torch.manual_seed(5)
    logits = torch.tensor([0.9, -1.6], requires_grad=True)
    table = torch.randn(4, dtype=torch.float64) * 3 + 5  # an offset, as ELBO signals have

    def f(b):
        return table[(2 * b[..., 0] + b[..., 1]).long()]

    configs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=2)))
    probs = dist.Bernoulli(logits=logits).log_prob(configs).sum(-1).exp()
    exact = torch.autograd.grad((probs * f(configs).float()).sum(), logits)[0]
    got = _exact_expectation(logits.detach(), num, f)
    assert torch.allclose(got.float(), exact, atol=1e-5), (got, exact)


@pytest.mark.parametrize("num", [2, 3])
def test_categorical_arms_is_exactly_unbiased(num):
    """Stick-breaking decisions with the copula per decision; decisions that no draw
    reaches zeroed, as DisarmELBO does."""
    logits = torch.tensor([0.4, -0.9, 0.7], requires_grad=True)
    table = torch.tensor([2.0, -1.0, 4.0], dtype=torch.float64)
    exact = torch.autograd.grad((torch.softmax(logits, -1) * table.float()).sum(), logits)[0]
    alpha = stick_breaking_logits(logits)
    patterns, probs = copula_pattern_law(alpha, num)
    expected = torch.zeros(2, dtype=torch.float64)
    for c0, c1 in itertools.product(range(len(patterns)), repeat=2):
        c = torch.stack([patterns[c0], patterns[c1]], -1)  # (n, 2) decisions
        z = torch.where(c[:, 0] > 0, 0, torch.where(c[:, 1] > 0, 1, 2))
        active = (torch.arange(2) <= z.max()).double()
        g = arms_gradient(table[z].unsqueeze(-1), c, alpha.detach().double()) * active
        expected += float(probs[c0, 0] * probs[c1, 1]) * g
    got = torch.autograd.grad((expected.float() * alpha).sum(), logits)[0]
    assert torch.allclose(got, exact, atol=1e-5), (got, exact)


def toy_variances(p, num, t):
    """Exact variances of one step's gradient on E[(b - t)^2], b ~ Bern(p), with respect
    to the logit, at ``num`` evaluations: ARMS with ``num`` copula draws, DisARM with
    ``num / 2`` independent pairs, RLOO with ``num`` independent draws."""
    logit = torch.tensor([math.log(p / (1 - p))], dtype=torch.float64)

    def moments(patterns, probs, g):
        mean = (probs * g).sum()
        return mean.item(), ((probs * g * g).sum() - mean**2).item()

    out = {}
    for name, n in (("ARMS", num), ("DisARM", 2)):
        patterns, probs = copula_pattern_law(logit, n)
        values = patterns.T.unsqueeze(-1)  # (n, 2^n, 1): every pattern at once
        g = arms_gradient((values - t).pow(2), values, logit)[:, 0]
        out[name] = moments(patterns, probs[:, 0], g)
    out["DisARM"] = (out["DisARM"][0], out["DisARM"][1] / (num / 2))
    patterns = torch.tensor(list(itertools.product([0.0, 1.0], repeat=num)),
                            dtype=torch.float64)
    ones = patterns.sum(-1)
    probs = p**ones * (1 - p) ** (num - ones)
    f = (patterns - t).pow(2)
    g = ((f - f.mean(-1, keepdim=True)) * (patterns - p)).sum(-1) / (num - 1)
    out["RLOO"] = moments(patterns, probs, g)
    return out


@pytest.mark.parametrize("num", [4, 6, 8, 10])
def test_relax_toy_exact_variance_arms_below_disarm_and_rloo(num):
    """The ARMS paper's toy (the authors' script: N = 2..10 samples): away from p = 1/2,
    where DisARM's variance vanishes, ARMS has the lowest variance at equal evaluations."""
    t = 0.499
    for p in (0.02, 0.1, 0.3, 0.45, 0.7, 0.9):
        out = toy_variances(p, num, t)
        exact = p * (1 - p) * (1 - 2 * t)
        for mean, _ in out.values():
            assert mean == pytest.approx(exact, rel=1e-6, abs=1e-12)
        assert out["ARMS"][1] < out["DisARM"][1] and out["ARMS"][1] < out["RLOO"][1], (p, out)
    assert toy_variances(0.5, num, t)["DisARM"][1] < 1e-15


# -- tier (c): through the objective ---------------------------------------------------------
def relax_toy_vector(theta0, t, n):
    """E_{b_i ~ Bern(sigmoid(theta_i))}[(b_i - t)^2] for n copies, each with its own
    logit: one step gives n independent gradient estimates."""
    theta = pyro.param("theta", torch.full((n,), theta0)).unconstrained()

    def model():
        with pyro.plate("copies", n):
            b = pyro.sample("b", dist.Bernoulli(logits=pyro.param("theta").detach()))
            pyro.factor("cost", -(b - t) ** 2)

    def guide():
        with pyro.plate("copies", n):
            pyro.sample("b", dist.Bernoulli(logits=pyro.param("theta")))

    return model, guide, theta


@pytest.mark.parametrize("num", [2, 4, 10])
@pytest.mark.parametrize("p", [0.1, 0.3])
def test_relax_toy_through_the_objective_matches_the_exact_mean_and_variance(p, num):
    t, n = 0.499, 40_000
    model, guide, theta = relax_toy_vector(math.log(p / (1 - p)), t, n)
    pyro.set_rng_seed(6)
    grad = -flat_grad(DisarmELBO(num, "arms").differentiable_loss(model, guide), [theta])
    grad = -grad  # the gradient of E[(b - t)^2]
    mean, var = toy_variances(p, num, t)["ARMS"]
    se_mean = math.sqrt(var / n)
    assert abs(grad.mean().item() - mean) < 4 * se_mean
    # the sample variance of n draws: standard error from the fourth moment
    centred = grad.double() - mean
    se_var = math.sqrt(max((centred**4).mean().item() - var**2, 0.0) / n)
    assert abs(centred.pow(2).mean().item() - var) < 4 * se_var + 1e-14


@pytest.mark.parametrize("num,vectorize", [(2, True), (3, True), (5, True), (3, False)])
def test_unbiased_on_two_layer_model(num, vectorize):
    model, guide, params, configs = two_layer()
    copies = 300
    exact = -copies * flat_grad(exact_iwae(model, guide, XS, configs), params)
    elbo = DisarmELBO(num, "arms", vectorize_particles=vectorize)
    samples = draws(elbo, model, guide, params, XS.repeat(copies), num_draws=30)
    se = assert_unbiased(samples, exact, z=4.5, atol=1e-5)
    assert (exact[4:].abs() > 3 * se[4:]).sum() >= 6  # the guide check has power


def test_vectorized_and_sequential_groups_are_the_same_draws():
    model, guide, params, _ = two_layer()
    xs = XS.repeat(10)
    a = draws(DisarmELBO(4, "arms"), model, guide, params, xs, num_draws=2)
    b = draws(DisarmELBO(4, "arms", vectorize_particles=False), model, guide, params, xs,
              num_draws=2)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("one_hot", [False, True])
def test_unbiased_on_categorical_site(one_hot):
    model, guide, params, configs = categorical(one_hot)
    exact = -300 * flat_grad(exact_iwae(model, guide, XS, configs), params)
    samples = draws(DisarmELBO(4, "arms"), model, guide, params, XS.repeat(300), num_draws=30)
    se = assert_unbiased(samples, exact, z=4.5, atol=1e-5)
    assert (exact[8:].abs() > 3 * se[8:]).sum() >= 5


ARMS_K = 4


@pytest.mark.parametrize("prog", PROGRAMS, ids=lambda p: p.name)
def test_program_matrix(prog):
    """Every program of the acceptance matrix (plates, several sites, markov, stochastic
    control flow, subsampling, masks, scales, autoguides, categoricals, float64...): loss
    and gradient of the negative ELBO, or DisARM's clear error."""
    model, guide, args, kwargs = prog.build()
    if "disarm" in prog.errors:
        error, match = prog.errors["disarm"]
        with pytest.raises(error, match=match):
            DisarmELBO(2, "arms", **prog.options).differentiable_loss(model, guide, *args,
                                                                      **kwargs)
        return
    objective = DisarmELBO(ARMS_K, "arms", **prog.options)
    names, _ = _program_params(model, guide, args, kwargs)
    params = [pyro.param(n).unconstrained() for n in names]
    with warnings.catch_warnings():
        if not prog.fallback:
            warnings.filterwarnings("error", message=f".*{FALLBACK}")
        losses, grads = _draws(objective, model, guide, args, kwargs, params, 40,
                               prog.fallback)
    value, value_se, grad, grad_se = _reference(prog, 1, names)
    _check("loss", losses.mean(0), losses.std(0) / math.sqrt(40), value, value_se)
    _check("grad", grads.mean(0), grads.std(0) / math.sqrt(40), grad, grad_se)


def bits():
    """Three binary units, each of which moves the likelihood a lot, at moderate guide
    probabilities: where the copula's negative correlation matters."""
    params = params_of({"a": torch.tensor([[-1.0, 0.5], [0.3, -0.4], [1.2, 0.2]]),
                        "w": torch.tensor([2.0, -1.5, 1.0])})

    def model(x):
        w = pyro.param("w")
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Bernoulli(0.5).expand([len(x), 3]).to_event(1))
            pyro.sample("x", dist.Normal((z * w).sum(-1), 0.5), obs=x)

    def guide(x):
        a = pyro.param("a")
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(logits=a[:, 0] + a[:, 1] * x.unsqueeze(-1))
                        .to_event(1))

    return model, guide, params


def total_variance(samples):
    """The summed elementwise variance of the draws and its jackknife standard error."""
    n = len(samples)
    loo = torch.stack([torch.cat([samples[:i], samples[i + 1:]]).var(0).sum()
                       for i in range(n)])
    return samples.var(0).sum().item(), math.sqrt((n - 1) / n * ((loo - loo.mean())**2).sum())


def test_variance_below_disarm_and_rloo_at_equal_evaluations():
    """Four evaluations per step: ARMS with 4 copula draws, DisARM with 2 pairs, RLOO with
    4 particles. Measured (seed 100, 120 draws): ARMS about 0.6x DisARM's and RLOO's."""
    model, guide, params = bits()
    xs = XS.repeat(20)
    results = {}
    for name, objective in (("arms", DisarmELBO(4, "arms")), ("disarm", DisarmELBO(2)),
                            ("rloo", ScoreFunctionELBO(4, LeaveOneOutBaseline()))):
        results[name] = total_variance(draws(objective, model, guide, params, xs,
                                             num_draws=120))
    arms, arms_se = results["arms"]
    for name in ("disarm", "rloo"):
        other, other_se = results[name]
        assert other - arms > 2 * math.hypot(arms_se, other_se), (name, results)


# -- interface ------------------------------------------------------------------------------
def test_loss_differentiable_loss_and_loss_and_grads_agree():
    model, guide, _, _ = two_layer()
    assert_one_path(DisarmELBO(3, "arms"), model, guide, XS, seed=7)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_particles >= 2"):
        DisarmELBO(1, "arms")
    with pytest.raises(ValueError, match="'arms'"):
        DisarmELBO(2, "armz")  # type: ignore[arg-type]


def test_unsupported_site_is_named():
    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("count", dist.Poisson(2.0))
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    with pytest.raises(ValueError, match="'count'.*Poisson"):
        DisarmELBO(3, "arms").loss(model, model, XS)


def test_svi_module_route_and_fit_train_the_sbn():
    torch.manual_seed(0)
    net = SigmoidBeliefNet((64, 8, 4))
    x = load_digits().train[:32]
    svi = SVI(net.model, net.guide, Adam({"lr": 0.01}), DisarmELBO(3, "arms"))
    losses = [svi.step(x) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    history = fit(svi, (x,), 3, progress=False)
    assert len(history.losses) == 3 and all(math.isfinite(v) for v in history.losses)

    class Call(torch.nn.Module):
        def __init__(self, method):
            super().__init__()
            self.net, self.method = net, method

        def forward(self, *args):
            return getattr(self.net, self.method)(*args)

    module = DisarmELBO(3, "arms")(Call("model"), Call("guide"))
    optim = torch.optim.Adam(module.parameters(), lr=0.01)
    before = net.recognition[0].weight.detach().clone()
    module(x).backward()
    optim.step()
    assert not torch.equal(before, net.recognition[0].weight)


@pytest.mark.parametrize("vectorize", [True, False])
def test_jit_gives_the_eager_steps(vectorize):
    """``jit=True``: the same losses and parameters as eager steps under one seed, whether
    the step is recorded or runs eagerly (with a warning)."""
    results = []
    for jit in (False, True):
        pyro.clear_param_store()
        model, guide = MixedModel(), MixedGuide()
        objective = DisarmELBO(3, "arms", jit=jit, vectorize_particles=vectorize)
        svi = SVI(model, guide, Adam({"lr": 0.05}), objective)
        pyro.set_rng_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            losses = [svi.step(X) for _ in range(4)]
        results.append((losses, model.w.detach().clone(), guide.a.detach().clone()))
    (eager, w, a), (compiled, w_jit, a_jit) = results
    assert compiled == pytest.approx(eager, rel=1e-5)
    torch.testing.assert_close(w_jit, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_jit, a, rtol=1e-5, atol=1e-6)


def test_state_dict_is_empty_and_arguments_are_not_mutated():
    model, guide, _, _ = two_layer()
    x, kwargs = XS.clone(), {}
    elbo = DisarmELBO(3, "arms")
    elbo.loss_and_grads(model, guide, x, **kwargs)
    assert torch.equal(x, XS) and kwargs == {}
    assert elbo.state_dict() == {}


@pytest.mark.cuda
def test_runs_on_cuda_like_on_cpu_in_shape_and_finiteness():
    model, guide = MixedModel().to("cuda"), MixedGuide().to("cuda")
    svi = SVI(model, guide, Adam({"lr": 0.05}), DisarmELBO(3, "arms"))
    losses = [svi.step(X.to("cuda")) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert model.w.device.type == "cuda" and dirichlet_copula(3, (2,), device="cuda").is_cuda

"""The unordered-set estimator (``UnorderedSetELBO``) and its math: Gumbel-top-k given its
first draw, the leave-one-out ratios against exact enumeration in high precision (tier a),
exact unbiasedness of the coefficients by enumerating every ordered sample, unbiasedness
on program families against the exact gradient by enumeration, variance against RLOO at
equal evaluations (tier c), interface (SVI, module route, fit, jit, errors)."""

import itertools
import math
import warnings
from collections import Counter

import mpmath
import pyro
import pyro.distributions as dist
import pytest
import torch
from categorical_programs import (
    XS,
    CatGuide,
    CatModel,
    control_flow,
    data_plate,
    exact_elbo,
    independent,
    markov,
    two_sites,
)
from checks import assert_one_path, assert_unbiased, draws, flat_grad, params_of
from pyro.infer import SVI
from pyro.optim import Adam

from pyro_wakesleep import (
    IndecaterELBO,
    LeaveOneOutBaseline,
    ScoreFunctionELBO,
    UnorderedSetELBO,
    fit,
)
from pyro_wakesleep.categorical import (
    gumbel_top_k,
    leave_one_out_log_ratios,
    plackett_luce_log_prob,
    set_log_probs,
    unordered_set_coefficients,
)


# -- tier (a): sampling and the leave-one-out ratios ------------------------------------
def _set_probability(p, members):
    """P(the unordered set ``members``) under sampling without replacement from ``p``
    (mpmath numbers), by summing the Plackett-Luce probability of every order."""
    total = mpmath.mpf(0)
    for order in itertools.permutations(members):
        prob, used = mpmath.mpf(1), mpmath.mpf(0)
        for s in order:
            prob *= p[s] / (1 - used)
            used += p[s]
        total += prob
    return total


def _exact_ratios(logits, members):
    """log R(S, s) and log R^{D\\s}(S, s') by enumeration in 40-digit arithmetic."""
    mpmath.mp.dps = 40
    weights = [mpmath.e ** mpmath.mpf(float(v)) for v in logits]
    p = [w / sum(weights) for w in weights]
    k = len(members)
    r1, r2 = [0.0] * k, [[0.0] * k for _ in range(k)]
    whole = _set_probability(p, members)
    for i, s in enumerate(members):
        without = [v / (1 - p[s]) if t != s else 0 for t, v in enumerate(p)]
        one = _set_probability(without, [t for t in members if t != s])
        r1[i] = float(mpmath.log(one / whole))
        for j, s2 in enumerate(members):
            if s2 != s:
                norm = 1 - p[s] - p[s2]
                two = [v / norm if t not in (s, s2) else 0 for t, v in enumerate(p)]
                rest = [t for t in members if t not in (s, s2)]
                r2[i][j] = float(mpmath.log(_set_probability(two, rest) / one))
    return torch.tensor(r1, dtype=torch.float64), torch.tensor(r2, dtype=torch.float64)


@pytest.mark.parametrize("case", ["random", "peaked", "flat_pair", "wide"])
def test_leave_one_out_ratios_match_exact_enumeration(case):
    torch.manual_seed(3)
    logits = {
        "random": torch.randn(6),
        "peaked": torch.tensor([16.0, 0.0, -2.0, -4.0, -6.0]),  # p(D \ S) ~ 1e-9
        "flat_pair": torch.tensor([0.0, 0.0, -30.0, -30.0]),
        "wide": 3.0 * torch.randn(9),
    }[case].double()
    for k in range(1, min(5, len(logits)) + 1):
        members = torch.randperm(len(logits))[:k]
        log_p, log_rest = set_log_probs(logits, members)
        r1, r2 = leave_one_out_log_ratios(log_p, log_rest)
        e1, e2 = _exact_ratios(logits, members.tolist())
        torch.testing.assert_close(r1, e1, rtol=0, atol=1e-10)
        torch.testing.assert_close(r2, e2, rtol=0, atol=1e-10)


def test_a_set_with_all_the_mass_has_unit_ratios_and_single_draws_reinforce():
    logits = torch.tensor([0.3, -1.0, 2.0]).double()
    log_p, log_rest = set_log_probs(logits, torch.tensor([2, 0, 1]))
    assert log_rest == -math.inf
    r1, r2 = leave_one_out_log_ratios(log_p, log_rest)
    assert r1.abs().max() < 1e-12 and r2.abs().max() < 1e-12
    # k = 1: R = 1 / p(s), so p R f is f (REINFORCE)
    log_p, log_rest = set_log_probs(logits, torch.tensor([1]))
    c = unordered_set_coefficients(log_p, log_rest, torch.tensor([2.5]).double(), baseline=False)
    torch.testing.assert_close(c, torch.tensor([2.5]).double())


def test_gumbel_top_k_given_its_first_draw_has_the_plackett_luce_law():
    torch.manual_seed(4)
    logits = torch.tensor([1.0, 0.0, -0.5, 0.3])
    n = 60_000
    first = dist.Categorical(logits=logits).sample((n,))
    given = gumbel_top_k(logits.expand(n, 4), 3, first)
    free = gumbel_top_k(logits.expand(n, 4), 3)
    assert torch.equal(given[:, 0], first)
    log_p = torch.log_softmax(logits.double(), -1)
    for sample in (given, free):
        counts = Counter(map(tuple, sample.tolist()))
        assert len(counts) == 24 and all(len(set(t)) == 3 for t in counts)
        for order, count in counts.items():
            prob = plackett_luce_log_prob(log_p[list(order)]).exp().item()
            assert abs(count / n - prob) < 4.5 * math.sqrt(prob * (1 - prob) / n), order
    with pytest.raises(ValueError, match="k must be between 1 and"):
        gumbel_top_k(logits, 5)


@pytest.mark.parametrize("baseline", [True, False])
@pytest.mark.parametrize("logits", [[0.5, -0.3, 1.2, 0.0, -1.0], [6.0, 0.0, -1.0, -2.0, 1.0]])
def test_coefficients_are_exactly_unbiased(baseline, logits):
    """E over every ordered sample (Plackett-Luce law) of sum_s c_s grad log p(s) equals
    grad E_p[f], for every k."""
    theta = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    f = torch.tensor([1.0, -2.0, 0.5, 3.0, 10.0], dtype=torch.float64)
    exact = torch.autograd.grad((torch.softmax(theta, -1) * f).sum(), theta)[0]
    for k in range(1, 5):
        expected = torch.zeros(5, dtype=torch.float64)
        for order in itertools.permutations(range(5), k):
            index = torch.tensor(order)
            log_p, log_rest = set_log_probs(theta, index)
            weight = plackett_luce_log_prob(log_p.detach()).exp()
            c = unordered_set_coefficients(log_p, log_rest, f[index], baseline)
            expected += weight * torch.autograd.grad((c * log_p).sum(), theta)[0]
        torch.testing.assert_close(expected, exact, rtol=1e-9, atol=1e-11)


# -- tier (c): unbiasedness on program families -----------------------------------------
def _programs():
    def plate(one_hot=False):
        return (*data_plate(one_hot, n=1), XS[:1])

    return {
        "data_plate": plate,
        "one_hot": lambda: plate(True),
        "two_sites": two_sites,
        "markov": markov,
        "independent_event": independent,
        "independent_plate": lambda: independent(event=False),
    }


COPIES = 40


@pytest.mark.parametrize("program", list(_programs()))
def test_unbiased_on_program_families(program):
    """Many copies of a small datapoint in the data plate (parallel elements) give one
    draw; the exact gradient is the copies times the enumerated one."""
    model, guide, params, configs, x = _programs()[program]()
    exact = -COPIES * flat_grad(exact_elbo(model, guide, configs, x), params)
    xs = x.repeat((COPIES,) + (1,) * (x.dim() - 1))
    samples = draws(UnorderedSetELBO(3), model, guide, params, xs, num_draws=24)
    se = assert_unbiased(samples, exact, atol=1e-4)
    assert (exact.abs() > 3 * se).sum() >= len(exact) // 2  # the check has power


def test_unbiased_with_subsampling_and_sequential_runs():
    model, guide, params, configs = data_plate(n=3)
    exact = -flat_grad(exact_elbo(model, guide, configs, XS), params)
    xs = XS.repeat(COPIES)
    objective = UnorderedSetELBO(2, vectorize_particles=False)
    samples = []
    for i in range(24):
        pyro.set_rng_seed(200 + i)
        loss = objective.differentiable_loss(model, guide, xs, subsample_size=COPIES)
        samples.append(flat_grad(loss, params))
    assert_unbiased(torch.stack(samples), COPIES * exact, atol=1e-4)


@pytest.mark.parametrize("make", [UnorderedSetELBO, IndecaterELBO])
def test_unbiased_under_stochastic_control_flow(make):
    """A site drawn only when an earlier one takes value 0 (``.item()``): the variants
    replay the earlier draws, so whether the later site runs is the main run's. IndeCateR's
    vectorized variant pass (3 variants) cannot run it: the objective falls back to one
    run after another (the path of ``vectorize_particles=False``) with its one warning;
    the unordered set with k = 2 has one variant per variable, which runs as is."""
    model, guide, params, exact = control_flow()
    x = torch.tensor(0.7)

    def grad(value):  # a parameter of the untaken branch gets no gradient in a draw
        grads = torch.autograd.grad(value, params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                          for g, p in zip(grads, params, strict=True)])

    objective = make(2)
    samples = []
    fallback = pytest.warns(RuntimeWarning, match="could not run vectorized") \
        if make is IndecaterELBO else warnings.catch_warnings()
    with fallback:
        for i in range(120):
            pyro.set_rng_seed(i)
            samples.append(grad(objective.differentiable_loss(model, guide, x)))
    expected = -grad(exact(x))
    se = assert_unbiased(torch.stack(samples), expected, atol=1e-6)
    assert (expected.abs() > 3 * se).sum() >= len(expected) // 2  # the check has power


def test_a_set_of_every_category_gives_the_exact_guide_gradient():
    model, guide, params, configs = data_plate(n=3)
    exact = -flat_grad(exact_elbo(model, guide, configs, XS), params)
    samples = draws(UnorderedSetELBO(4), model, guide, params, XS, num_draws=3)
    torch.testing.assert_close(samples[:, -8:], exact[-8:].expand(3, 8), rtol=1e-4, atol=1e-5)


# -- tier (c): variance -------------------------------------------------------------------
def peaked(classes=20):
    """A categorical guide with one category of probability ~0.9 among ``classes``, a
    uniform prior and a likelihood that varies across categories."""
    params = params_of({"phi": torch.cat([torch.tensor([4.0]),
                                          torch.linspace(0.0, 1.0, classes - 1)])})
    mu = torch.linspace(-3.0, 3.0, classes)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(logits=torch.zeros(classes)))
            pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Categorical(logits=pyro.param("phi")))

    return model, guide, params


def test_variance_below_rloo_at_equal_evaluations_on_a_peaked_categorical():
    """k = 4 runs per step each: without replacement the peak is evaluated once and three
    other categories besides; with replacement it is mostly evaluated four times."""
    model, guide, params = peaked()
    x = torch.full((20,), 1.0)
    ours = draws(UnorderedSetELBO(4), model, guide, params, x, num_draws=60).var(0).sum()
    rloo = ScoreFunctionELBO(4, LeaveOneOutBaseline())
    theirs = draws(rloo, model, guide, params, x, num_draws=60).var(0).sum()
    assert theirs > 2.0 * ours, (theirs, ours)  # measured 3.5x


# -- interface ----------------------------------------------------------------------------
def test_loss_differentiable_loss_and_loss_and_grads_agree():
    model, guide, _, _ = data_plate()
    assert_one_path(UnorderedSetELBO(3), model, guide, XS)


def test_svi_module_route_and_fit_train_with_a_reparameterized_site():
    model, guide = CatModel(), CatGuide()
    svi = SVI(model, guide, Adam({"lr": 0.05}), UnorderedSetELBO(3))
    before = guide.a.detach().clone(), guide.s.detach().clone(), model.mu.detach().clone()
    losses = [svi.step(XS) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    after = guide.a, guide.s, model.mu
    assert all(not torch.equal(b, c) for b, c in zip(before, after, strict=True))
    module = UnorderedSetELBO(3)(model, guide)
    optim = torch.optim.Adam(module.parameters(), lr=0.05)
    before_a = guide.a.detach().clone()
    module(XS).backward()
    optim.step()
    assert not torch.equal(before_a, guide.a)
    svi = SVI(model, guide, Adam({"lr": 0.05}), UnorderedSetELBO(2))
    history = fit(svi, (XS,), 3, progress=False)
    assert len(history.losses) == 3 and all(math.isfinite(v) for v in history.losses)


@pytest.mark.parametrize("vectorize", [True, False])
def test_jit_gives_the_eager_steps(vectorize):
    results = []
    for jit in (False, True):
        pyro.clear_param_store()
        model, guide, _, _ = data_plate()
        svi = SVI(model, guide, Adam({"lr": 0.05}),
                  UnorderedSetELBO(3, jit=jit, vectorize_particles=vectorize))
        pyro.set_rng_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            losses = [svi.step(XS) for _ in range(3)]
        results.append((losses, pyro.param("a").detach().clone()))
    (eager, a), (compiled, a_jit) = results
    assert compiled == pytest.approx(eager, rel=1e-5)
    torch.testing.assert_close(a_jit, a, rtol=1e-5, atol=1e-6)


def test_unsupported_site_names_site_and_type():
    def model():
        pyro.sample("w", dist.Poisson(2.0))

    def guide():
        pyro.sample("w", dist.Poisson(2.0))

    with pytest.raises(ValueError, match="site 'w'.*Poisson.*use ScoreFunctionELBO"):
        UnorderedSetELBO(2).loss(model, guide)


def test_bad_arguments_state_and_no_mutation():
    with pytest.raises(TypeError):
        UnorderedSetELBO(2, baseline="yes")
    with pytest.raises((TypeError, ValueError)):
        UnorderedSetELBO(0)
    model, guide, _, _ = data_plate()
    x, kwargs = XS.clone(), {}
    objective = UnorderedSetELBO(3)
    objective.loss_and_grads(model, guide, x, **kwargs)
    assert torch.equal(x, XS) and kwargs == {} and objective.state_dict() == {}

"""Zero-probability categories and Bernoulli sites in the categorical estimators
(``UnorderedSetELBO``, ``IndecaterELBO``): the pure math with categories of probability 0
(tier a: exact unbiasedness by enumerating every ordered sample, absent set members,
no NaN whatever the signal at them), and the objectives against the exact gradient by
enumeration over the support (tier c): a batched site whose rows have supports of 4, 2
and 1 categories, guides with logits -inf or probs 0, sets covering the support (exact),
Bernoulli sites in a sigmoid belief net (k = 1, k = 2) and a Bernoulli of probability 1."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from categorical_programs import (
    SUPPORT,
    XS,
    bernoulli_plate,
    bernoulli_sbn,
    exact_elbo,
    zero_probs,
)
from checks import assert_jit_steps_equal_eager, assert_unbiased, draws, flat_grad

from pyro_wakesleep import IndecaterELBO, UnorderedSetELBO
from pyro_wakesleep.categorical import (
    gumbel_top_k,
    indecater_surrogate,
    leave_one_out_log_ratios,
    plackett_luce_log_prob,
    set_log_probs,
    support_log_probs,
    unordered_set_surrogate,
)

INF = math.inf


# -- tier (a): the math with categories of probability 0 ---------------------------------
def test_support_log_probs_are_minus_inf_exactly_where_the_sampler_never_draws():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 1.0, 0.0]])
    fn = dist.Categorical(probs=probs)
    assert torch.isfinite(fn.logits).all()  # PyTorch clamps: log(eps) at the zeros
    log_p = support_log_probs(fn.logits, fn.probs)
    torch.testing.assert_close(log_p.exp(), probs)
    assert torch.equal(log_p == -INF, probs == 0)
    logits = torch.tensor([0.3, -INF, 1.0, -INF], requires_grad=True)
    from_logits = dist.Categorical(logits=logits)
    log_p = support_log_probs(from_logits.logits, from_logits.probs)
    torch.testing.assert_close(log_p, torch.log_softmax(logits, -1))
    grad = torch.autograd.grad(log_p[2], logits)[0]
    assert torch.isfinite(grad).all() and grad[1] == 0 and grad[3] == 0


def test_gumbel_top_k_draws_the_support_first():
    torch.manual_seed(0)
    logits = torch.tensor([[0.3, -INF, 1.0, -INF, -0.5]]).expand(4000, 5)
    support = {0, 2, 4}
    first = dist.Categorical(logits=logits).sample()
    for k in range(1, 6):
        for sets in (gumbel_top_k(logits, k), gumbel_top_k(logits, k, first)):
            m = min(k, 3)
            assert all(set(row[:m]) <= support for row in sets.tolist())
            if k >= 3:
                assert all(set(row[:3]) == support for row in sets.tolist())


def test_absent_members_leave_the_ratios_of_the_set_without_them():
    logits = torch.tensor([0.4, -INF, -1.2, 0.9, -INF, 0.1], dtype=torch.float64)
    present = torch.tensor([0, 2, 3, 5])
    reduced = logits[present]
    for members in ([3, 1, 0], [0, 4, 2, 1], [2, 5, 0, 3, 1, 4]):  # with absent ones
        index = torch.tensor(members)
        log_p, log_rest = set_log_probs(logits, index)
        r1, r2 = leave_one_out_log_ratios(log_p, log_rest)
        keep = log_p > -INF
        # the same set in the domain without the zero-probability categories
        where = torch.tensor([present.tolist().index(s) for s in index[keep].tolist()])
        e1, e2 = leave_one_out_log_ratios(*set_log_probs(reduced, where))
        torch.testing.assert_close(r1[keep], e1, rtol=0, atol=1e-12)
        torch.testing.assert_close(r2[keep][:, keep], e2, rtol=0, atol=1e-12)
        assert torch.equal(r1[~keep], torch.zeros_like(r1[~keep]))
        assert (r2[:, ~keep] == 0).all()  # leaving an absent member out changes nothing
        torch.testing.assert_close(r2[~keep][:, keep], e1.expand(int((~keep).sum()), -1),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("baseline", [True, False])
def test_surrogate_is_exactly_unbiased_over_the_support_for_every_k(baseline):
    """E over every ordered sample of sum_s c_s grad log p(s) is grad E_p[f] over the
    support, for k below, at and above its size; members of probability 0 (padding
    beyond the support, in any order) have f = NaN there and contribute nothing."""
    theta = torch.tensor([0.5, -INF, 1.2, -INF, -1.0], dtype=torch.float64,
                         requires_grad=True)
    support, zeros = [0, 2, 4], [1, 3]
    f = torch.tensor([1.0, math.nan, 0.5, math.nan, 10.0], dtype=torch.float64)
    p = torch.softmax(theta, -1)
    exact = torch.autograd.grad((p[support] * f[support]).sum(), theta)[0]
    for k in range(1, 6):
        expected = torch.zeros(5, dtype=torch.float64)
        m = min(k, len(support))
        for order in itertools.permutations(support, m):
            for padding in itertools.permutations(zeros, k - m):
                index = torch.tensor(order + padding)
                log_p, log_rest = set_log_probs(torch.log_softmax(theta, -1), index)
                weight = plackett_luce_log_prob(log_p[:m].detach()).exp()
                value = unordered_set_surrogate(log_p, log_rest, f[index], baseline)
                assert torch.isfinite(value)
                grad = torch.autograd.grad(value, theta)[0]
                assert torch.isfinite(grad).all() and (grad[zeros] == 0).all()
                expected += weight * grad / math.perm(len(zeros), k - m)
        torch.testing.assert_close(expected, exact, rtol=1e-9, atol=1e-11)


def test_indecater_surrogate_ignores_zero_probability_categories():
    logits = torch.tensor([0.3, -INF, 2.0, -INF], requires_grad=True)
    f = torch.tensor([1.0, math.nan, -2.0, INF])
    value = indecater_surrogate(logits, f)
    grad = torch.autograd.grad(value, logits)[0]
    p = torch.softmax(logits, -1).detach()
    torch.testing.assert_close(value, (p[[0, 2]] * f[[0, 2]]).sum())
    mean = (p[[0, 2]] * f[[0, 2]]).sum()
    expected = torch.tensor([p[0] * (1.0 - mean), 0.0, p[2] * (-2.0 - mean), 0.0])
    torch.testing.assert_close(grad, expected)


# -- tier (c): zero-probability categories in the objectives -----------------------------
COPIES = 40


@pytest.mark.parametrize("make,k,kind", [
    (UnorderedSetELBO, 1, "logits"),
    (UnorderedSetELBO, 2, "logits"),
    (UnorderedSetELBO, 3, "probs"),
    (IndecaterELBO, 1, "probs"),
])
def test_unbiased_on_a_batched_site_whose_rows_differ_in_support(make, k, kind):
    """Datapoints with 4, 2 and 1 possible categories side by side in one site (guide and
    model -inf elsewhere, so a run at an impossible value would raise): unbiased against
    enumeration over the support, with k below, at and above a row's support."""
    model, guide, params, configs = zero_probs(kind)
    exact = -COPIES * flat_grad(exact_elbo(model, guide, configs, XS), params)
    samples = draws(make(k), model, guide, params, XS.repeat(COPIES), num_draws=24)
    assert torch.isfinite(samples).all()
    se = assert_unbiased(samples, exact, atol=1e-4)
    assert (exact.abs() > 3 * se).sum() >= len(exact) // 2  # the check has power


@pytest.mark.parametrize("kind", ["logits", "probs"])
@pytest.mark.parametrize("objective", [UnorderedSetELBO(2), UnorderedSetELBO(4),
                                       IndecaterELBO(1)], ids=["k=2", "k=4", "indecater"])
def test_sets_covering_the_support_give_the_exact_guide_gradient(objective, kind):
    """Rows of 2 and 1 possible categories: k = 2 draws the support of every row (k at
    and above it), k = 4 (every category) too with absent members; every draw is the
    exact gradient over the support."""
    model, guide, params, configs = zero_probs(kind, SUPPORT[1:])
    x = XS[:2]
    exact = -flat_grad(exact_elbo(model, guide, configs, x), params)
    samples = draws(objective, model, guide, params, x, num_draws=3)
    torch.testing.assert_close(samples[:, -8:], exact[-8:].expand(3, 8), rtol=1e-4,
                               atol=1e-5)


# -- tier (c): Bernoulli sites ----------------------------------------------------------
@pytest.mark.parametrize("objective", [UnorderedSetELBO(1), UnorderedSetELBO(2),
                                       IndecaterELBO(1)], ids=["k=1", "k=2", "indecater"])
def test_unbiased_on_bernoulli_sites_of_a_sigmoid_belief_net(objective):
    """Two Bernoulli sites per datapoint (an ``Independent`` and a joint plate, the second
    depending on the first), their values floats in the model (``z1 @ w``)."""
    model, guide, params, configs, x = bernoulli_sbn()
    exact = -COPIES * flat_grad(exact_elbo(model, guide, configs, x), params)
    samples = draws(objective, model, guide, params, x.repeat(COPIES), num_draws=24)
    se = assert_unbiased(samples, exact, atol=1e-4)
    assert (exact.abs() > 3 * se).sum() >= len(exact) // 2  # the check has power


def test_bernoulli_k1_is_reinforce_and_k2_the_exact_gradient():
    """One Bernoulli per datapoint without later sites, the guide's probability 1 at every
    third: k = 2 (and IndeCateR) evaluate both values, the exact guide gradient in every
    draw (value 0 of the sure datapoints never run); k = 1 unbiased."""
    model, guide, params, configs = bernoulli_plate()
    exact = -flat_grad(exact_elbo(model, guide, configs, XS), params)
    for objective in (UnorderedSetELBO(2), UnorderedSetELBO(5), IndecaterELBO(1)):
        samples = draws(objective, model, guide, params, XS, num_draws=3)
        torch.testing.assert_close(samples[:, -2:], exact[-2:].expand(3, 2), rtol=1e-4,
                                   atol=1e-5)
    samples = draws(UnorderedSetELBO(1), model, guide, params, XS.repeat(COPIES),
                    num_draws=40)
    assert_unbiased(samples, COPIES * exact, atol=1e-4)


def test_bernoulli_values_reach_the_programs_as_floats_of_the_site_shape():
    seen = []

    def model():
        z = pyro.sample("z", dist.Bernoulli(torch.full((3,), 0.5)).to_event(1))
        seen.append((z.dtype, z.shape[-1]))
        pyro.sample("x", dist.Normal(z.sum(), 1.0), obs=torch.tensor(1.0))

    def guide():
        pyro.sample("z", dist.Bernoulli(logits=pyro.param("b", torch.zeros(3))).to_event(1))

    for objective in (UnorderedSetELBO(2), IndecaterELBO(1)):
        seen.clear()
        assert math.isfinite(objective.loss(model, guide))
        assert len(seen) > 1 and set(seen) == {(torch.float32, 3)}


@pytest.mark.parametrize("make", [UnorderedSetELBO, IndecaterELBO])
def test_jit_gives_the_eager_steps_with_zero_probabilities_and_bernoulli_sites(make):
    """The masks of zero-probability categories and the Bernoulli's two categories are
    recorded in the compiled graph like any other tensor operation."""
    for program in (lambda: zero_probs()[:2], lambda: bernoulli_sbn()[:2]):
        assert_jit_steps_equal_eager(
            program, lambda jit: make(3 if make is UnorderedSetELBO else 1, jit=jit), XS)

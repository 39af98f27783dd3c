"""RODEO (``RodeoELBO``) and double control variates (``DoubleControlVariateELBO``): the
discrete Stein operator and both estimators exactly unbiased by enumeration (tier a);
unbiased through the objectives on program families against exact gradients, with the
learned control variates switched on, and variance below RLOO at equal evaluations once
trained (tier c); learned state through the param store; interface (SVI, module route,
fit, jit). The whole file runs in well under a minute; the rest of the program matrix is
in the slow tier (PYRO_WAKESLEEP_SLOW=1)."""

import gc
import itertools
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from checks import assert_jit_runs_eagerly, assert_one_path, draws, flat_grad, params_of
from pyro.infer import SVI
from pyro.optim import Adam
from test_disarm import XS, two_layer
from test_matrix import FALLBACK, PROGRAMS, _check, _draws, _program_params, _reference

from pyro_wakesleep import (
    DoubleControlVariateELBO,
    LeaveOneOutBaseline,
    RodeoELBO,
    ScoreFunctionELBO,
    fit,
)
from pyro_wakesleep.examples.datasets import load_digits
from pyro_wakesleep.examples.models import SigmoidBeliefNet
from pyro_wakesleep.stein import (
    double_cv_gradient,
    flip_weights,
    rodeo_gradient,
    stein_operator,
    stein_score_operator,
)

OBJECTIVES = {"rodeo": RodeoELBO, "dcv": DoubleControlVariateELBO}


# -- tier (a): the Stein operator and the estimators, by enumeration ------------------------
def _configs(d):
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=torch.float64)


def _flips(x):
    """(..., D) -> (..., D, D): row i is x with coordinate i flipped."""
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    return x.unsqueeze(-2) * (1 - eye) + (1 - x.unsqueeze(-2)) * eye


def test_stein_operators_have_mean_zero_and_the_linear_time_form():
    torch.manual_seed(0)
    d = 3
    x = _configs(d)
    probs = torch.tensor([0.2, 0.55, 0.9], dtype=torch.float64)
    q = (probs**x * (1 - probs) ** (1 - x)).prod(-1)
    table = torch.randn(2**d, dtype=torch.float64) * 5

    def h(y):
        return table[(y * torch.tensor([4.0, 2.0, 1.0], dtype=y.dtype)).sum(-1).long()]

    w = flip_weights(x, probs)
    scalar = stein_operator(h(_flips(x)), h(x), w)
    vector = stein_score_operator(h(_flips(x)), h(x), x, probs, w)
    assert abs((q * scalar).sum()) < 1e-12
    assert torch.allclose((q.unsqueeze(-1) * vector).sum(0), torch.zeros(d, dtype=x.dtype),
                          atol=1e-12)
    # the O(D) form against (1/D) sum_i w_i [h(x^i)(x^i - theta) - h(x)(x - theta)]
    flips = _flips(x)
    quadratic = (w.unsqueeze(-1) * (h(flips).unsqueeze(-1) * (flips - probs)
                                    - (h(x).unsqueeze(-1) * (x - probs)).unsqueeze(-2))).mean(-2)
    assert torch.allclose(vector, quadratic, atol=1e-12)


def _exact_expectation(estimator, probs, k, f, g):
    """E[(1/K) sum_k g_hat_k] over K independent draws from Bern(probs), by enumeration."""
    x = _configs(len(probs))
    q = (probs**x * (1 - probs) ** (1 - x)).prod(-1)
    total = torch.zeros(len(probs), dtype=torch.float64)
    for combo in itertools.product(range(len(x)), repeat=k):
        values = x[list(combo)]  # (K, D)
        prob = math.prod(float(q[c]) for c in combo)
        est = estimator(f(values), g(values), values, probs.expand_as(values))
        total += prob * est.mean(0)
    return total


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", ["dcv", "rodeo"])
def test_estimators_are_exactly_unbiased_for_any_learned_parameters(name, k):
    torch.manual_seed(1)
    logits = torch.tensor([0.7, -1.2], dtype=torch.float64, requires_grad=True)
    probs = torch.sigmoid(logits)
    table = torch.randn(4, dtype=torch.float64) * 3 + 20  # a large offset, as ELBOs have
    slopes = torch.randn(4, 2, dtype=torch.float64)

    def index(v):
        return (2 * v[..., 0] + v[..., 1]).long()

    def f(v):
        return table[index(v)]

    def g(v):  # any function of a draw works as its "gradient"
        return slopes[index(v)]

    x = _configs(2)
    q = (probs**x * (1 - probs) ** (1 - x)).prod(-1)
    exact = torch.autograd.grad((q * table).sum(), logits)[0]
    net = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    net = net.double()
    alpha, beta = torch.tensor(0.7, dtype=torch.float64), torch.tensor(-1.3, dtype=torch.float64)
    if name == "dcv":
        def estimator(f_, g_, v, p):
            return double_cv_gradient(f_, g_, v, p, alpha)
    else:
        def estimator(f_, g_, v, p):
            return rodeo_gradient(f_, g_, v, p, net, alpha, beta)
    with torch.no_grad():
        got = _exact_expectation(estimator, probs.detach(), k, f, g)
    assert torch.allclose(got, exact, atol=1e-9), (got, exact)


def test_zero_coefficients_are_rloo():
    torch.manual_seed(2)
    f = torch.randn(4, 3)
    values = (torch.rand(4, 3, 5) < 0.4).float()
    probs = torch.rand(4, 3, 5)
    grads = torch.randn(4, 3, 5)
    rloo = (f - (f.sum(0) - f) / 3).unsqueeze(-1) * (values - probs)
    zero = torch.zeros(())
    assert torch.allclose(double_cv_gradient(f, grads, values, probs, zero), rloo)
    net = torch.nn.Linear(2, 2)
    assert torch.allclose(rodeo_gradient(f, grads, values, probs, net, zero, zero), rloo,
                          atol=1e-6)


# -- tier (c): program families through the objectives -------------------------------------
def _perturb(objective, model, guide, args, kwargs):
    """One call creates each site's learned state; then set it to nonzero values, so that
    the unbiasedness checks below exercise the control variates (alpha = beta = 0 would be
    plain RLOO)."""
    pyro.set_rng_seed(0)
    objective.differentiable_loss(model, guide, *args, **kwargs)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in objective.control_variates.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype) + 0.2)


def markov_bits():
    """A chain of Bernoulli states under pyro.markov, guide coupled to the previous state."""
    params = params_of({"mk_w": torch.tensor([0.3, 1.2, -0.8]),
                        "mk_a": torch.tensor([[0.2, -0.4], [0.5, 0.3], [-0.1, 0.6]])})
    x = torch.tensor([0.8, -0.5, 1.5])

    def model(x):
        w = pyro.param("mk_w")
        z = torch.tensor(0.0)
        for t in pyro.markov(range(len(x))):
            z = pyro.sample(f"z_{t}", dist.Bernoulli(logits=w[0] + w[2] * z))
            pyro.sample(f"x_{t}", dist.Normal(w[1] * (2 * z - 1), 1.0), obs=x[t])

    def guide(x):
        a = pyro.param("mk_a")
        z = torch.tensor(0.0)
        for t in pyro.markov(range(len(x))):
            z = pyro.sample(f"z_{t}", dist.Bernoulli(logits=a[t, 0] + a[t, 1] * z))

    return model, guide, params, x


@pytest.mark.parametrize("name", ["rodeo", "dcv"])
def test_unbiased_on_a_markov_chain(name):
    model, guide, params, x = markov_bits()
    configs = list(itertools.product([0.0, 1.0], repeat=3))
    exact = 0.0
    for c in configs:  # the exact ELBO by enumerating the chain
        data = {f"z_{t}": torch.tensor(c[t]) for t in range(3)}
        trace_q = pyro.poutine.trace(pyro.poutine.condition(guide, data)).get_trace(x)
        trace_p = pyro.poutine.trace(pyro.poutine.condition(model, data)).get_trace(x)
        log_q, log_p = trace_q.log_prob_sum(), trace_p.log_prob_sum()
        exact = exact + log_q.exp() * (log_p - log_q)
    exact_grad = -flat_grad(exact, params)
    objective = OBJECTIVES[name](6, max_plate_nesting=0)
    _perturb(objective, model, guide, (x,), {})
    samples = draws(objective, model, guide, params, x, num_draws=60)
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(60)
    assert torch.all((mean - exact_grad).abs() <= 4.5 * se + 1e-5), (mean, exact_grad, se)
    assert (exact_grad.abs() > 3 * se).sum() >= 3  # the check has power


@pytest.mark.parametrize("name,vectorize", [("rodeo", True), ("dcv", True), ("rodeo", False)])
def test_unbiased_on_two_layer_model(name, vectorize):
    from checks import exact_iwae
    model, guide, params, configs = two_layer()
    copies = 100
    exact = -copies * flat_grad(exact_iwae(model, guide, XS, configs), params)
    objective = OBJECTIVES[name](3, vectorize_particles=vectorize)
    xs = XS.repeat(copies)
    _perturb(objective, model, guide, (xs,), {})
    samples = draws(objective, model, guide, params, xs, num_draws=30)
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(30)
    assert torch.all((mean - exact).abs() <= 4.5 * se + 1e-5), (mean, exact, se)
    assert (exact[4:].abs() > 3 * se[4:]).sum() >= 4  # the guide check has power


#: the programs of the acceptance matrix whose guide sites are Bernoulli or
#: reparameterized; the others must raise naming the site
_NOT_BINARY = {"gmm": "'z'", "hmm_markov": "'z_0'", "poisson": "'z'", "categorical": "'z'",
               "one_hot_categorical": "'z'"}
_FAST = {("nested_plates", "rodeo"), ("subsample_global", "dcv"),
         ("subsample_local", "rodeo"), ("geometric_sequential", "rodeo"),
         ("geometric_vectorized", "dcv"), ("categorical", "rodeo"), ("poisson", "dcv")}


def _matrix_cases():
    cases = []
    for prog in PROGRAMS:
        for name in OBJECTIVES:
            marks = [] if (prog.name, name) in _FAST else [pytest.mark.slow]
            cases.append(pytest.param(prog, name, id=f"{prog.name}-{name}", marks=marks))
    return cases


@pytest.mark.parametrize("prog,name", _matrix_cases())
def test_program_matrix(prog, name):
    """The acceptance matrix's programs (plates, several sites, stochastic control flow,
    subsampling, masks, scales, autoguides, float64...): loss and gradient of the negative
    ELBO with the control variates on, or the clear error naming a non-binary site."""
    model, guide, args, kwargs = prog.build()
    cls = OBJECTIVES[name]
    if prog.name in _NOT_BINARY:
        with pytest.raises(ValueError, match=f"{_NOT_BINARY[prog.name]}.*neither Bernoulli"):
            cls(2, **prog.options).differentiable_loss(model, guide, *args, **kwargs)
        return
    if "disarm" in prog.errors:  # an error of every objective (e.g. a guide factor)
        error, match = prog.errors["disarm"]
        with pytest.raises(error, match=match):
            cls(2, **prog.options).differentiable_loss(model, guide, *args, **kwargs)
        return
    k, num_draws = 8, 60
    objective = cls(k, **prog.options)
    names, _ = _program_params(model, guide, args, kwargs)
    params = [pyro.param(n).unconstrained() for n in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback, checked below
        _perturb(objective, model, guide, args, kwargs)
    with warnings.catch_warnings():
        if not prog.fallback:
            warnings.filterwarnings("error", message=f".*{FALLBACK}")
        losses, grads = _draws(objective, model, guide, args, kwargs, params, num_draws,
                               False)
    value, value_se, grad, grad_se = _reference(prog, 1, names)
    _check("loss", losses.mean(0), losses.std(0) / math.sqrt(num_draws), value, value_se)
    _check("grad", grads.mean(0), grads.std(0) / math.sqrt(num_draws), grad, grad_se)


# -- variance: trained control variates against RLOO at equal evaluations --------------------
def bits():
    """Three binary units per datapoint whose prior is far from the guide (a learning
    signal nearly linear in the units, with large slopes and a large offset) and a
    Gaussian likelihood that couples them: where gradient information pays."""
    params = params_of({"a": torch.tensor([[-1.0, 0.5], [0.3, -0.4], [1.2, 0.2]]),
                        "w": torch.tensor([1.0, -0.8, 0.6])})

    def model(x):
        w = pyro.param("w")
        prior = torch.tensor([4.0, -4.0, 3.0])
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Bernoulli(logits=prior).expand([len(x), 3]).to_event(1))
            pyro.sample("x", dist.Normal((z * w).sum(-1), 2.0), obs=x)

    def guide(x):
        a = pyro.param("a")
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(logits=a[:, 0] + a[:, 1] * x.unsqueeze(-1))
                        .to_event(1))

    return model, guide, params


def _train_control_variates(objective, model, guide, xs, steps):
    """Trains only the objective's learned control variates (the model and guide held)."""
    pyro.set_rng_seed(3)
    objective.differentiable_loss(model, guide, xs)
    optim = torch.optim.Adam(objective.control_variates.parameters(), lr=0.05)
    for _ in range(steps):
        optim.zero_grad()
        objective.differentiable_loss(model, guide, xs).backward()
        optim.step()


@pytest.mark.parametrize("name", ["dcv", "rodeo"])
def test_trained_control_variates_lower_the_variance_below_rloo(name):
    """K = 3 evaluations each, the control variates trained for 150 Adam steps (guide
    held). Measured (100 draws each): double CV about 0.002x (alpha near -1: the Taylor
    term cancels the nearly linear signal) and RODEO about 0.035x RLOO's summed
    guide-gradient variance."""
    model, guide, params = bits()
    xs = XS.repeat(8)
    objective = OBJECTIVES[name](3)
    _train_control_variates(objective, model, guide, xs, 150)
    guide_params = params[:1]
    ours = draws(objective, model, guide, guide_params, xs, num_draws=100)
    rloo = draws(ScoreFunctionELBO(3, LeaveOneOutBaseline()), model, guide, guide_params, xs,
                 num_draws=100)
    ratio = ours.var(0).sum() / rloo.var(0).sum()
    # the variance of a sample variance of n draws is about 2 var^2 / n: 100 draws each
    # put the ratio's standard error near 0.2 x ratio; 0.3 is many of those away
    assert ratio < 0.3, ratio


# -- learned state -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rodeo", "dcv"])
def test_learned_state_is_saved_and_restored_through_the_param_store(name):
    model, guide, params = bits()
    xs = XS.repeat(4)
    trained = OBJECTIVES[name](3)
    _train_control_variates(trained, model, guide, xs, 5)
    saved = pyro.get_param_store().get_state()
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    assert any("alpha" in k for k in state) and any(v.abs().sum() > 0 for v in state.values())
    keys = [k for k in saved["params"] if k.startswith("control_variates.z$$$")]
    assert "control_variates.z$$$alpha" in keys
    pyro.set_rng_seed(9)
    want = flat_grad(trained.differentiable_loss(model, guide, xs), params)

    del trained  # the live-objective check: its weights are the store's
    gc.collect()
    pyro.clear_param_store()
    pyro.get_param_store().set_state(saved)
    restored = OBJECTIVES[name](3)  # a fresh objective: its state comes from the store
    params = [pyro.param(n).unconstrained() for n in ("a", "w")]
    pyro.set_rng_seed(9)
    got = flat_grad(restored.differentiable_loss(model, guide, xs), params)
    assert torch.allclose(got, want, atol=1e-5)
    for key, value in restored.state_dict().items():
        assert torch.allclose(value, state[key])

    fresh = OBJECTIVES[name](3, name="other")
    fresh.load_state_dict(state)  # before its first step: applied when created
    pyro.set_rng_seed(9)
    params = [pyro.param(n).unconstrained() for n in ("a", "w")]
    got = flat_grad(fresh.differentiable_loss(model, guide, xs), params)
    assert torch.allclose(got, want, atol=1e-5)


# -- interface ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rodeo", "dcv"])
def test_one_path_and_arguments_not_mutated(name):
    model, guide, _, _ = two_layer()
    assert_one_path(OBJECTIVES[name](3), model, guide, XS, seed=7)
    x, kwargs = XS.clone(), {}
    OBJECTIVES[name](2).loss_and_grads(model, guide, x, **kwargs)
    assert torch.equal(x, XS) and kwargs == {}


def test_bad_arguments():
    for cls in OBJECTIVES.values():
        with pytest.raises(ValueError, match="num_particles >= 2"):
            cls(1)
    with pytest.raises(TypeError, match="network for site 'z'"):
        RodeoELBO(2, network={"z": "not a module"})  # type: ignore[dict-item]
    model, guide, _, _ = two_layer()
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        RodeoELBO(2, network=torch.nn.Linear(2, 3)).loss_and_grads(model, guide, XS)


def test_svi_fit_and_module_route_train_the_sbn():
    torch.manual_seed(0)
    net = SigmoidBeliefNet((64, 8, 4))
    x = load_digits().train[:16]
    for cls in OBJECTIVES.values():
        pyro.clear_param_store()
        objective = cls(2)
        svi = SVI(net.model, net.guide, Adam({"lr": 0.01}), objective)
        assert all(math.isfinite(svi.step(x)) for _ in range(2))
        alpha = pyro.param("control_variates.h1$$$alpha").item()
        history = fit(svi, (x,), 2, progress=False)
        assert len(history.losses) == 2 and all(math.isfinite(v) for v in history.losses)
        assert pyro.param("control_variates.h1$$$alpha").item() != alpha  # SVI trains it

    class Call(torch.nn.Module):
        def __init__(self, method):
            super().__init__()
            self.net, self.method = net, method

        def forward(self, *args):
            return getattr(self.net, self.method)(*args)

    pyro.clear_param_store()
    module = RodeoELBO(2, name="module")(Call("model"), Call("guide"))
    before = net.recognition[0].weight.detach().clone()
    module(x).backward()
    torch.optim.Adam(module.parameters(), lr=0.01).step()
    assert not torch.equal(before, net.recognition[0].weight)


@pytest.mark.parametrize("name", ["rodeo", "dcv"])
def test_jit_runs_eagerly_with_one_warning(name):
    model, guide, params, _ = two_layer()
    compiled, eager = OBJECTIVES[name](3, jit=True, name="jit"), OBJECTIVES[name](3)
    assert_jit_runs_eagerly(compiled, eager, model, guide, params, XS, exact=False)


def test_loss_without_gradients_changes_no_state():
    model, guide, _, _ = two_layer()
    objective = RodeoELBO(3)
    value = objective.loss(model, guide, XS)
    assert math.isfinite(value) and objective.state_dict() == {}

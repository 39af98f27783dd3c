"""Pyro's messenger autoguides (issue 24): ``AutoNormalMessenger``,
``AutoHierarchicalNormalMessenger``, ``AutoRegressiveMessenger`` and other
:class:`~pyro.poutine.guide.GuideMessenger` guides run the model inside the guide, so the
guide's trace holds the model's observations and ``pyro.factor`` sites. They are the
model's (:func:`~pyro_wakesleep.traces.replayed_sites`), as in Pyro's own objectives.

Tiers: the trace layer's view of such a pair; equality with ``Trace_ELBO`` and
``TraceGraph_ELBO`` under the same seed; unbiasedness against exact gradients on a model
whose latents can be enumerated; every objective trained a few steps eagerly and compiled,
with every warning an error, then ``Predictive`` and ``median()``; and the patterns of
Pyro's own autoguide tests with our objectives in place of Pyro's."""

import functools
import itertools
import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from checks import assert_unbiased, param_grads, store_draws
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceGraph_ELBO
from pyro.infer.autoguide import (
    AutoHierarchicalNormalMessenger,
    AutoNormalMessenger,
    AutoRegressiveMessenger,
)
from pyro.nn import PyroModule, PyroSample
from pyro.optim import Adam
from torch import nn

from pyro_wakesleep import (
    DisarmELBO,
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    NeuralBaseline,
    RebarELBO,
    RelaxELBO,
    ReweightedWakeSleepELBO,
    ScoreFunctionELBO,
    VimcoELBO,
    WakeSleepELBO,
)
from pyro_wakesleep._replay import replay_draws
from pyro_wakesleep.traces import (
    guide_factors,
    importance_trace,
    own_guide_trace,
    replayed_sites,
)

X = torch.tensor([-2.0, -0.5, 0.3, 1.7, 3.5, 5.0])

GUIDES = {
    "normal": AutoNormalMessenger,
    "hierarchical": AutoHierarchicalNormalMessenger,
    "regressive": AutoRegressiveMessenger,
}
each_guide = pytest.mark.parametrize("make_guide", list(GUIDES.values()), ids=list(GUIDES))


# -- models ---------------------------------------------------------------------------------
def model(x, subsample_size=None):
    """Global and local continuous latents, a global and a local ``pyro.factor``, a
    subsampled data plate."""
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    pyro.factor("shrink", -0.5 * loc**2)
    with pyro.plate("data", len(x), subsample_size=subsample_size) as i:
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.factor("tilt", -0.1 * z**2)
        pyro.sample("obs", dist.Normal(z, scale), obs=x[i])


def local_model(x, subsample_size=None):
    """Only local latents (importance weights per datapoint, so a mini-batch can be
    importance weighted), with a local ``pyro.factor``."""
    with pyro.plate("data", len(x), subsample_size=subsample_size) as i:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("tilt", -0.1 * z**2)
        pyro.sample("obs", dist.Normal(z, 1.0), obs=x[i])


def dream_model(x):
    """No factor (the sleep phase cannot dream through one) and the data observed as
    given (the sleep phase feeds the dream in its place); plate sizes read off the last
    dimension, so that vectorized dreams broadcast."""
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=x)


PRIOR_B, TILT = 0.4, 0.5


def discrete_model(x, subsample_size=None):
    """A Bernoulli latent per datapoint and a model factor that depends on it: every
    expectation is a finite sum."""
    with pyro.plate("data", len(x), subsample_size=subsample_size) as i:
        b = pyro.sample("b", dist.Bernoulli(PRIOR_B))
        pyro.factor("tilt", TILT * b)
        pyro.sample("obs", dist.Normal(2.0 * b - 1.0, 1.0), obs=x[i])


def mixed_model(x, subsample_size=None):
    """A global continuous latent beside the Bernoulli ones."""
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x), subsample_size=subsample_size) as i:
        b = pyro.sample("b", dist.Bernoulli(PRIOR_B))
        pyro.factor("tilt", TILT * b)
        pyro.sample("obs", dist.Normal(loc + 2.0 * b - 1.0, 1.0), obs=x[i])


class BernoulliMessenger(AutoNormalMessenger):
    """``AutoNormalMessenger`` with a learned Bernoulli posterior (``"<site>_logits"``,
    one per datapoint, subsampled by the plate) at the site ``b``: a messenger guide with
    a score-function site."""

    def get_posterior(self, name, prior):
        if name != "b":
            return super().get_posterior(name, prior)
        logits = pyro.param("b_logits", lambda: torch.linspace(-1.0, 1.0, len(X)),
                            event_dim=0)
        if self._computing_median:
            return (logits > 0).to(logits)
        return dist.Bernoulli(logits=logits)


def initialized(make_guide, fn, *args):
    """A messenger guide called once outside any particle plate (Pyro's ``AutoMessenger``
    creates its parameters on the first call and, if that call is inside a vectorized
    particle plate, gives them the particle dimension)."""
    guide = make_guide(fn)
    with torch.random.fork_rng():
        guide(*args)
    return guide


# -- the trace layer ----------------------------------------------------------------------
@each_guide
def test_replayed_model_sites_are_the_models(make_guide):
    guide = initialized(make_guide, model, X)
    model_trace, guide_trace = importance_trace(model, guide, (X, 3), {}, 1)
    assert replayed_sites(model_trace, guide_trace) == ["shrink", "tilt", "obs"]
    assert guide_factors(model_trace, guide_trace) == []
    own = own_guide_trace(model_trace, guide_trace)
    assert [n for n, s in own.nodes.items() if s["type"] == "sample"] == [
        "loc", "scale", "data", "z"]
    assert "obs" in guide_trace.nodes  # the run's trace is left as it was


def test_own_guide_trace_of_an_ordinary_guide_is_the_trace_itself():
    def guide(x, subsample_size=None):
        with pyro.plate("data", len(x), subsample_size=subsample_size):
            pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.factor("g", torch.tensor(0.0), has_rsample=True)

    model_trace, guide_trace = importance_trace(local_model, guide, (X,), {}, 1)
    assert replayed_sites(model_trace, guide_trace) == []
    assert guide_factors(model_trace, guide_trace) == ["g"]
    assert own_guide_trace(model_trace, guide_trace) is guide_trace


class FactoredMessenger(AutoNormalMessenger):
    """A messenger guide with a ``pyro.factor`` of its own at site ``z``."""

    def __init__(self, model, has_rsample):
        super().__init__(model)
        self.has_rsample = has_rsample

    def get_posterior(self, name, prior):
        if name == "z":
            pyro.factor("guide_tilt", torch.tensor(0.25), has_rsample=self.has_rsample)
        return super().get_posterior(name, prior)


def test_a_messenger_guides_own_factor_stays_a_guide_factor():
    guide = FactoredMessenger(local_model, has_rsample=True)
    pyro.set_rng_seed(0)
    model_trace, guide_trace = importance_trace(local_model, guide, (X,), {}, 1)
    assert guide_factors(model_trace, guide_trace) == ["guide_tilt"]
    assert replayed_sites(model_trace, guide_trace) == ["tilt", "obs"]
    # its log-density enters the loss as the guide's: the loss rises by exactly 0.25 for
    # each element of the data plate it is in
    elbo = ScoreFunctionELBO(max_plate_nesting=1)
    pyro.set_rng_seed(3)
    with_factor = elbo.loss(local_model, guide, X)
    pyro.set_rng_seed(3)
    without = elbo.loss(local_model, initialized(AutoNormalMessenger, local_model, X), X)
    assert with_factor - without == pytest.approx(0.25 * len(X), abs=1e-4)


def test_a_messenger_guides_own_factor_without_has_rsample_raises_as_in_pyro():
    guide = FactoredMessenger(local_model, has_rsample=None)
    with pytest.raises(ValueError, match="guide_tilt.*has_rsample"):
        ScoreFunctionELBO(max_plate_nesting=1).loss(local_model, guide, X)


@pytest.mark.parametrize("vectorized", [False, True], ids=["plain", "particle_plate"])
@each_guide
def test_replay_draws_leaves_the_run_trace_unchanged(make_guide, vectorized):
    guide = initialized(make_guide, model, X)
    if vectorized:
        guide = pyro.plate("particles", 3, dim=-2)(guide)
    trace = poutine.trace(guide).get_trace(X, 3)
    priors = {n: s["infer"]["prior"] for n, s in trace.nodes.items()
              if s["type"] == "sample" and "prior" in s["infer"]}
    replayed = poutine.trace(replay_draws(guide, trace)).get_trace(X, 3)
    for name, prior in priors.items():
        assert trace.nodes[name]["infer"]["prior"] is prior
        assert torch.equal(replayed.nodes[name]["value"], trace.nodes[name]["value"])


# -- tier (b): Pyro's objectives under the same seed --------------------------------------
def assert_same(ours, theirs, atol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = ours, theirs
    assert loss_a == pytest.approx(loss_b, rel=1e-6, abs=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=atol), name


PARTICLES = pytest.mark.parametrize(
    "num_particles,vectorize", [(1, False), (3, False), (3, True)],
    ids=["one", "sequential", "vectorized"])
SUBSAMPLE = pytest.mark.parametrize("subsample_size", [None, 3], ids=["full", "subsampled"])


@SUBSAMPLE
@PARTICLES
@each_guide
def test_without_control_variate_equals_trace_elbo(make_guide, num_particles, vectorize,
                                                    subsample_size):
    """Every guide site reparameterized: ScoreFunctionELBO is Trace_ELBO."""
    guide = initialized(make_guide, model, X)
    kw = dict(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1)
    ours = param_grads(ScoreFunctionELBO(**kw), model, guide, X, subsample_size)
    theirs = param_grads(Trace_ELBO(**kw), model, guide, X, subsample_size)
    assert_same(ours, theirs)


@SUBSAMPLE
@PARTICLES
def test_score_function_site_equals_tracegraph_elbo(num_particles, vectorize, subsample_size):
    """A Bernoulli site in a messenger guide, a global reparameterized one and a model
    factor that depends on the Bernoulli draw: Rao-Blackwellized as TraceGraph_ELBO."""
    guide = initialized(BernoulliMessenger, mixed_model, X)
    kw = dict(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1)
    ours = param_grads(ScoreFunctionELBO(**kw), mixed_model, guide, X, subsample_size)
    theirs = param_grads(TraceGraph_ELBO(**kw), mixed_model, guide, X, subsample_size)
    assert_same(ours, theirs)
    plain = param_grads(Trace_ELBO(**kw), mixed_model, guide, X, subsample_size)
    assert not torch.allclose(ours[1]["b_logits"], plain[1]["b_logits"])


# -- tier (c): unbiasedness against exact values ------------------------------------------
def _log_w(x, b, logits):
    """log p(x, b) + factor - log q(b) of discrete_model / BernoulliMessenger."""
    log_p = dist.Bernoulli(PRIOR_B).log_prob(b) + TILT * b
    log_p = log_p + dist.Normal(2.0 * b - 1.0, 1.0).log_prob(x)
    return log_p - dist.Bernoulli(logits=logits).log_prob(b)


def exact_loss_grads(k):
    """The exact gradient of minus the IWAE bound with ``k`` particles (``k = 1``: the
    ELBO) of discrete_model under BernoulliMessenger, with respect to ``b_logits``, by
    summing over every ``k``-tuple of each datapoint's draws (weights per datapoint)."""
    logits = pyro.param("b_logits").detach().clone().requires_grad_()
    bound = torch.zeros(())
    for draws in itertools.product([0.0, 1.0], repeat=k):
        b = torch.tensor(draws).unsqueeze(-1).expand(k, len(X))
        log_w = _log_w(X, b, logits)
        prob = dist.Bernoulli(logits=logits).log_prob(b).sum(0).exp()
        bound = bound + (prob * (torch.logsumexp(log_w, 0) - math.log(k))).sum()
    (grad,) = torch.autograd.grad(-bound, logits)
    return {"b_logits": grad}


def nvil():
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    return NeuralBaseline(net, input=lambda x, *a, **k: x.unsqueeze(-1),
                          normalize_variance=False)


UNBIASED = {  # name: (objective, particles of the bound it estimates, draws)
    "score_function": (lambda: ScoreFunctionELBO(4), 1, 300),
    "moving_average": (lambda: ScoreFunctionELBO(
        4, control_variate=MovingAverageBaseline(0.8)), 1, 300),
    "leave_one_out": (lambda: ScoreFunctionELBO(
        4, control_variate=LeaveOneOutBaseline()), 1, 300),
    "nvil": (lambda: ScoreFunctionELBO(4, control_variate=nvil()), 1, 300),
    "disarm": (lambda: DisarmELBO(4), 1, 200),
    "rebar": (lambda: RebarELBO(4), 1, 150),
    "relax": (lambda: RelaxELBO(4), 1, 150),
    "vimco": (lambda: VimcoELBO(2), 2, 300),
}


@pytest.mark.parametrize("name", list(UNBIASED))
def test_unbiased_with_a_score_function_site(name):
    make, k, num_draws = UNBIASED[name]
    guide = initialized(BernoulliMessenger, discrete_model, X)
    exact = exact_loss_grads(k)
    draws = store_draws(make(), discrete_model, guide, X, num_draws=num_draws)
    assert_unbiased(draws, exact, atol=1e-6, positive_se=True)


@pytest.mark.parametrize("name", ["score_function", "leave_one_out", "vimco"])
def test_unbiased_with_a_subsampled_plate(name):
    make, k, num_draws = UNBIASED[name]
    guide = initialized(BernoulliMessenger, discrete_model, X)
    exact = exact_loss_grads(k)  # of the full data
    draws = store_draws(make(), discrete_model, guide, X, 3, num_draws=num_draws)
    assert_unbiased(draws, exact, atol=1e-6, positive_se=True)


# -- every objective trains, eagerly and compiled, without a warning ----------------------
def _objectives():
    return {  # name: (objective factory, model, its data arguments)
        "score_function": (lambda **kw: ScoreFunctionELBO(2, **kw), model, (X, 3)),
        "moving_average": (lambda **kw: ScoreFunctionELBO(
            2, control_variate=MovingAverageBaseline(), **kw), model, (X, 3)),
        "leave_one_out": (lambda **kw: ScoreFunctionELBO(
            2, control_variate=LeaveOneOutBaseline(), **kw), model, (X, 3)),
        "nvil": (lambda **kw: ScoreFunctionELBO(2, control_variate=nvil(), **kw), model, (X,)),
        "stick_the_landing": (lambda **kw: ScoreFunctionELBO(
            2, stick_the_landing=True, **kw), model, (X, 3)),
        "disarm": (lambda **kw: DisarmELBO(2, **kw), model, (X, 3)),
        "rebar": (lambda **kw: RebarELBO(2, **kw), model, (X, 3)),
        "relax": (lambda **kw: RelaxELBO(2, **kw), model, (X, 3)),
        "vimco": (lambda **kw: VimcoELBO(2, **kw), local_model, (X, 3)),
        "vimco_dreg": (lambda **kw: VimcoELBO(2, dreg=True, **kw), local_model, (X, 3)),
        "vimco_global": (lambda **kw: VimcoELBO(2, **kw), model, (X,)),
        "rws": (lambda **kw: ReweightedWakeSleepELBO(2, **kw), local_model, (X, 3)),
        "rws_dreg": (lambda **kw: ReweightedWakeSleepELBO(2, dreg=True, **kw),
                     local_model, (X, 3)),
        "rws_sleep": (lambda **kw: ReweightedWakeSleepELBO(2, insomnia=0.5, **kw),
                      dream_model, (X,)),
        "wake_sleep": (lambda **kw: WakeSleepELBO(2, **kw), dream_model, (X,)),
    }


OBJECTIVES = _objectives()


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
@each_guide
def test_every_objective_trains_then_predicts(make_guide, name, jit):
    make, fn, args = OBJECTIVES[name]
    guide = make_guide(fn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svi = SVI(fn, guide, Adam({"lr": 0.01}), make(jit=jit))
        losses = [svi.step(*args) for _ in range(3)]
        assert all(math.isfinite(v) for v in losses), losses
        samples = Predictive(fn, guide=guide, num_samples=4)(X)
        median = guide.median(X) if hasattr(guide, "median") else None
    latents = ["z"] if fn is local_model else ["loc", "z"]
    for site in latents:
        assert samples[site].shape[0] == 4 and torch.isfinite(samples[site]).all(), site
    assert samples["obs"].shape == (4, len(X))
    if median is not None:  # AutoRegressiveMessenger has no median()
        assert median["z"].shape == (len(X),)
        for site in latents:
            assert torch.isfinite(median[site]).all(), site


@pytest.mark.parametrize("name,jit", [
    *[(name, jit) for name in ["score_function", "leave_one_out", "disarm", "vimco"]
      for jit in (False, True)],
    # REBAR and RELAX differentiate inside the step with a discrete site: never compiled
    ("rebar", False), ("relax", False),
])
def test_objectives_train_a_messenger_guide_with_a_score_function_site(name, jit):
    make = OBJECTIVES[name][0]
    guide = BernoulliMessenger(discrete_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svi = SVI(discrete_model, guide, Adam({"lr": 0.05}), make(jit=jit))
        losses = [svi.step(X, 3) for _ in range(3)]
        median = guide.median(X)
    assert all(math.isfinite(v) for v in losses), losses
    assert set(median["b"].tolist()) <= {0.0, 1.0}


def test_global_latents_with_a_subsampled_plate_are_refused_by_importance_weights():
    """As for any guide: a mini-batch cannot be importance weighted jointly."""
    guide = initialized(AutoNormalMessenger, model, X)
    with pytest.raises(ValueError, match="same scale"):
        VimcoELBO(2, max_plate_nesting=1).loss(model, guide, X, 3)


# -- the patterns of Pyro's autoguide tests, with our objectives --------------------------
PYRO_NAMES = {  # ours under Pyro's constructor keywords
    "score_function": ScoreFunctionELBO,
    "vimco": VimcoELBO,
    "disarm": DisarmELBO,
    "rws": ReweightedWakeSleepELBO,
    "rebar": RebarELBO,
    "relax": RelaxELBO,
}
each_pyro_name = pytest.mark.parametrize("elbo_class", list(PYRO_NAMES.values()),
                                         ids=list(PYRO_NAMES))


def factor_model(log_factor):
    pyro.sample("z1", dist.Normal(0.0, 1.0))
    pyro.factor("f1", log_factor)
    pyro.sample("z2", dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1))
    with pyro.plate("plate", 3):
        pyro.factor("f2", log_factor)
        pyro.sample("z3", dist.Normal(torch.zeros(3), torch.ones(3)))


@each_pyro_name
@each_guide
def test_pyro_pattern_model_factors_enter_the_loss_once(make_guide, elbo_class):
    """A unit more of log-factor at one global and three local factor sites lowers the
    loss by exactly 4 on the same draws: the factors are the model's, counted once."""
    guide = make_guide(factor_model)
    elbo = elbo_class(strict_enumeration_warning=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        elbo.loss(factor_model, guide, torch.tensor(0.0))
        pyro.set_rng_seed(123)
        loss_5 = elbo.loss(factor_model, guide, torch.tensor(5.0))
        pyro.set_rng_seed(123)
        loss_4 = elbo.loss(factor_model, guide, torch.tensor(4.0))
    assert loss_5 - loss_4 == pytest.approx(-1 - 3, abs=1e-4)


def median_model():
    pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.LogNormal(0.0, 1.0))
    pyro.sample("z", dist.Beta(2.0, 2.0))


@pytest.mark.parametrize("elbo_class", [ScoreFunctionELBO, functools.partial(
    ScoreFunctionELBO, stick_the_landing=True)], ids=["score_function", "stick_the_landing"])
@pytest.mark.parametrize("make_guide", [AutoNormalMessenger, AutoHierarchicalNormalMessenger],
                         ids=["normal", "hierarchical"])  # AutoRegressiveMessenger: no median
def test_pyro_pattern_median_after_training(make_guide, elbo_class):
    guide = make_guide(median_model)
    elbo = elbo_class(strict_enumeration_warning=False, num_particles=100,
                      vectorize_particles=True)
    svi = SVI(median_model, guide, Adam({"lr": 0.05, "betas": (0.8, 0.99)}), elbo)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(100):
            svi.step()
    median = guide.median()
    assert median["x"].item() == pytest.approx(0.0, abs=0.1)
    assert median["y"].item() == pytest.approx(1.0, abs=0.1)
    assert median["z"].item() == pytest.approx(0.5, abs=0.1)


class LinearRegression(PyroModule):
    def __init__(self):
        super().__init__()
        self.linear = PyroModule[nn.Linear](3, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 3]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        # the weights drawn outside the data plate, broadcast over leading (sample) dims
        weight, bias = self.linear.weight, self.linear.bias
        mean = (x * weight).sum(-1) + bias
        with pyro.plate("data", x.shape[0], subsample_size=4) as i:
            return pyro.sample("obs", dist.Normal(mean[..., i], sigma),
                               obs=None if y is None else y[i])


@pytest.mark.parametrize("elbo_class", [ScoreFunctionELBO, DisarmELBO, RebarELBO, RelaxELBO],
                         ids=["score_function", "disarm", "rebar", "relax"])
@each_guide
def test_pyro_pattern_linear_regression_smoke(make_guide, elbo_class):
    """Global latents and a subsampled plate (so no importance-weighted objective)."""
    torch.manual_seed(0)
    x, y = torch.randn(10, 3), torch.randn(10)
    regression = LinearRegression()
    guide = make_guide(regression)
    elbo = elbo_class(strict_enumeration_warning=False)
    svi = SVI(regression, guide, Adam({"lr": 1e-3}), elbo)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            assert math.isfinite(svi.step(x, y))
        samples = Predictive(regression, guide=guide, num_samples=3)(x)
        if hasattr(guide, "median"):  # AutoRegressiveMessenger has none
            assert set(guide.median(x)) >= {"sigma", "linear.weight", "linear.bias"}
    assert samples["obs"].shape == (3, 4)


@each_guide
def test_a_fresh_messenger_guide_gets_no_particle_dimension_with_max_plate_nesting(make_guide):
    """Pyro's ``AutoMessenger._adjust_plates`` does not exclude outer plates: a messenger
    guide first called inside the particle plate would create parameters with a particle
    dimension. The objective calls it once outside the plate first."""
    x = torch.linspace(-1.0, 1.0, 4)
    guide = make_guide(model)
    elbo = ScoreFunctionELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    elbo.differentiable_loss(model, guide, x)
    shapes = {name: tuple(p.shape) for name, p in pyro.get_param_store().items()}
    pyro.clear_param_store()
    reference = make_guide(model)
    with poutine.block():
        reference(x)  # outside any plate: the shapes the parameters should have
    expected = {name: tuple(p.shape) for name, p in pyro.get_param_store().items()}
    assert shapes == expected

"""gradient_stats / compare_estimators: values against direct computations, and that
no training state changes."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO

from pyro_wakesleep import MovingAverageBaseline, NeuralBaseline, ScoreFunctionELBO
from pyro_wakesleep.diagnostics import compare_estimators, gradient_stats
from pyro_wakesleep.examples.models import SigmoidBeliefNet

MU = torch.tensor([0.5, -1.0, 2.0])


def gauss_model():
    pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))


def gauss_guide():
    mu = pyro.param("mu", MU.clone())
    pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))


@pytest.fixture(autouse=True)
def clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.mark.parametrize("method", ["batched", "sequential"])
@pytest.mark.parametrize("particles", [1, 4])
def test_pathwise_gaussian_mean_and_variance(method, particles):
    # -ELBO gradient w.r.t. mu is z = mu + eps per particle: mean mu, variance 1/K.
    loss = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=0)
    draws = 1000 if method == "batched" else 300
    stats = gradient_stats(gauss_model, gauss_guide, loss, num_draws=draws, method=method, seed=1)
    assert stats.method == method and stats.num_draws == draws
    var = 1.0 / particles
    # mean: 5 standard errors; variance: sd of s^2 is var * sqrt(2 / (D - 1)), 5 of them
    assert torch.allclose(stats.mean["mu"], MU.double(), atol=5 * math.sqrt(var / draws))
    assert torch.allclose(stats.variance["mu"], torch.full((3,), var, dtype=torch.float64),
                          rtol=5 * math.sqrt(2 / (draws - 1)))


def test_batched_draws_equal_direct_computation():
    # With a seed the batched draws are z = mu + eps for eps drawn as the guide draws them.
    stats = gradient_stats(gauss_model, gauss_guide, Trace_ELBO(max_plate_nesting=0),
                           num_draws=50, method="batched", batch_size=50, seed=3,
                           keep_draws=True)
    pyro.set_rng_seed(3)
    z = dist.Normal(MU, 1.0).expand([50, 3]).rsample()
    assert torch.allclose(stats.draws["mu"], z, atol=1e-6)
    assert torch.allclose(stats.variance["mu"], z.double().var(0), atol=1e-6)


def test_sequential_variance_equals_manual_loop():
    loss = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=0)
    stats = gradient_stats(gauss_model, gauss_guide, loss, num_draws=20, method="sequential",
                           seed=5)
    gauss_guide()  # register mu
    mu = pyro.param("mu").unconstrained()
    pyro.set_rng_seed(5)
    grads = []
    for _ in range(20):
        mu.grad = None
        loss.loss_and_grads(gauss_model, gauss_guide)
        grads.append(mu.grad.clone())
    grads = torch.stack(grads).double()
    assert torch.allclose(stats.mean["mu"], grads.mean(0), atol=1e-6)
    assert torch.allclose(stats.variance["mu"], grads.var(0), atol=1e-6)


def test_score_function_draws_are_exact():
    # q = Bern(sigmoid(phi)), p = Bern(0.3), no data: each draw is -f(b) d/dphi log q(b).
    def model():
        pyro.sample("b", dist.Bernoulli(0.3))

    def guide():
        pyro.sample("b", dist.Bernoulli(logits=pyro.param("phi", torch.tensor(0.4))))

    stats = gradient_stats(model, guide, ScoreFunctionELBO(), num_draws=400, keep_draws=True,
                           seed=0)
    assert stats.method == "batched"
    p = torch.sigmoid(torch.tensor(0.4))
    g1 = -(math.log(0.3) - torch.log(p)) * (1 - p)
    g0 = (math.log(0.7) - torch.log(1 - p)) * p
    draws = stats.draws["phi"]
    is_g1 = torch.isclose(draws, g1, atol=1e-6)
    assert bool((is_g1 | torch.isclose(draws, g0, atol=1e-6)).all())
    assert abs(is_g1.double().mean() - p) < 5 * math.sqrt(p * (1 - p) / 400)


def _sbn_setup():
    torch.manual_seed(0)
    sbn = SigmoidBeliefNet((16, 5, 3))
    x = torch.bernoulli(torch.full((12, 16), 0.3))
    baseline = torch.nn.Sequential(torch.nn.Linear(16, 1), torch.nn.Flatten(0))  # (batch,)
    loss = ScoreFunctionELBO(num_particles=2, control_variate={
        "h1": NeuralBaseline(baseline), "h2": MovingAverageBaseline()})
    return sbn, x, loss


def _snapshot(loss):
    store = pyro.get_param_store()
    return ({n: p.detach().clone() for n, p in store.named_parameters()},
            {n: None if p.grad is None else p.grad.clone() for n, p in store.named_parameters()},
            {k: v.clone() for k, v in loss.state_dict().items()},
            [m.training for m in loss.control_variates.modules()],
            torch.get_rng_state(), dict(vars(loss)))


def _assert_same(before, after):
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert all((a is None and b is None) or torch.equal(a, b)
               for a, b in zip(before[1].values(), after[1].values(), strict=True))
    assert before[2].keys() == after[2].keys()
    assert all(torch.equal(before[2][k], after[2][k]) for k in before[2])
    assert before[3] == after[3]
    assert torch.equal(before[4], after[4])
    assert before[5] == after[5]


def test_leaves_training_state_untouched():
    sbn, x, loss = _sbn_setup()
    svi = pyro.infer.SVI(sbn.model, sbn.guide, pyro.optim.Adam({"lr": 0.01}), loss)
    for _ in range(3):
        svi.step(x)
    loss.loss_and_grads(sbn.model, sbn.guide, x)  # leave some .grad behind
    before = _snapshot(loss)
    stats = gradient_stats(sbn.model, sbn.guide, loss, x, num_draws=4)  # NVIL: sequential
    assert stats.method == "sequential" and "control_variates" in stats.groups.values()
    _assert_same(before, _snapshot(loss))
    stats = gradient_stats(sbn.model, sbn.guide, loss, x, num_draws=6, only=["model", "guide"])
    assert stats.method == "batched"
    assert set(stats.groups.values()) == {"model", "guide"}
    _assert_same(before, _snapshot(loss))
    after_step = svi.step(x)  # training goes on as if nothing happened
    assert math.isfinite(after_step)


def test_empty_store_stays_empty_and_lazy_state_is_not_created():
    sbn, x, _ = _sbn_setup()
    loss = ScoreFunctionELBO(control_variate=MovingAverageBaseline())
    gradient_stats(sbn.model, sbn.guide, loss, x, num_draws=3)
    assert list(pyro.get_param_store().keys()) == []
    assert loss.state_dict() == {} and loss.control_variates.sites() == []
    tg = TraceGraph_ELBO()
    stats = gradient_stats(sbn.model, sbn.guide, tg, x, num_draws=3)
    assert stats.method == "batched" and list(pyro.get_param_store().keys()) == []


def test_batched_agrees_with_sequential_on_sbn():
    sbn, x, _ = _sbn_setup()
    loss = ScoreFunctionELBO(control_variate=MovingAverageBaseline())
    a = gradient_stats(sbn.model, sbn.guide, loss, x, num_draws=300, method="batched", seed=0)
    b = gradient_stats(sbn.model, sbn.guide, loss, x, num_draws=80, method="sequential",
                       seed=1)
    ra, rb = a.summary(), b.summary()
    # total variance over hundreds of elements: both estimates within 35% of each other
    assert (ra["variance"] / rb["variance"]).between(0.65, 1.35).all()


def test_result_formats_and_errors():
    stats = gradient_stats(gauss_model, gauss_guide, Trace_ELBO(), num_draws=10, seed=0)
    frame = stats.to_dataframe()
    assert list(frame.index) == ["mu"] and frame.loc["mu", "group"] == "guide"
    assert {"numel", "mean_norm", "variance", "snr", "mean_snr"} <= set(frame.columns)
    assert "mu" in repr(stats) and "guide" in repr(stats)
    assert stats.snr["mu"].shape == (3,)
    with pytest.raises(ValueError, match="num_draws"):
        gradient_stats(gauss_model, gauss_guide, Trace_ELBO(), num_draws=1)
    with pytest.raises(ValueError, match="method"):
        gradient_stats(gauss_model, gauss_guide, Trace_ELBO(), method="fast")
    with pytest.raises(TypeError, match="ELBO"):
        gradient_stats(gauss_model, gauss_guide, object())
    with pytest.raises(ValueError, match="only"):
        gradient_stats(gauss_model, gauss_guide, Trace_ELBO(), num_draws=2, only=["nope"])
    sbn, x, loss = _sbn_setup()
    with pytest.raises(ValueError, match="log-densities"):
        gradient_stats(sbn.model, sbn.guide, loss, x, num_draws=2, method="batched")


def test_compare_estimators_table_and_plot():
    import matplotlib

    matplotlib.use("Agg")
    sbn, x, _ = _sbn_setup()
    comparison = compare_estimators(
        {"REINFORCE": ScoreFunctionELBO(), "TraceGraph": TraceGraph_ELBO()},
        sbn.model, sbn.guide, x, num_draws=8)
    frame = comparison.to_dataframe()
    assert set(frame.index.get_level_values("estimator")) == {"REINFORCE", "TraceGraph"}
    assert set(frame.index.get_level_values("group")) == {"model", "guide"}
    fig = comparison.plot()
    assert len(fig.axes) == 2
    matplotlib.pyplot.close(fig)

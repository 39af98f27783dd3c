"""ScoreFunctionELBO: equivalence with Pyro (tier b), unbiasedness and variance (tier c)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from checks import assert_one_path, assert_unbiased, enum_grads, param_grads, store_draws
from models import (
    X,
    bern_guide,
    bern_model,
    gauss_exact_loss_grads,
    gauss_guide,
    gauss_model,
    offset_model,
    two_layer_guide,
    two_layer_model,
)
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
from torch import nn

from pyro_wakesleep import (
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    NeuralBaseline,
    ScoreFunctionELBO,
)


def assert_same(a, b, atol=1e-5):
    (loss_a, ga), (loss_b, gb) = a, b
    assert loss_a == pytest.approx(loss_b, rel=1e-6, abs=1e-5)
    assert ga.keys() == gb.keys()
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=atol), (k, ga[k], gb[k])


# -- tier (b): agreement with Pyro under the same seed ---------------------------------
@pytest.mark.parametrize("num_particles,vectorize", [(1, True), (3, True), (3, False)])
def test_without_control_variate_equals_trace_elbo(num_particles, vectorize):
    kw = dict(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1)
    ours = param_grads(ScoreFunctionELBO(**kw), bern_model, bern_guide, X)
    pyro.clear_param_store()
    theirs = param_grads(Trace_ELBO(**kw), bern_model, bern_guide, X)
    assert_same(ours, theirs)


@pytest.mark.parametrize("num_particles", [1, 4])
def test_downstream_rao_blackwellization_equals_tracegraph_elbo(num_particles):
    kw = dict(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    ours = param_grads(ScoreFunctionELBO(**kw), two_layer_model, two_layer_guide, X)
    pyro.clear_param_store()
    theirs = param_grads(TraceGraph_ELBO(**kw), two_layer_model, two_layer_guide, X)
    assert_same(ours, theirs)
    # and it differs from Trace_ELBO, which uses the whole cost for both sites
    pyro.clear_param_store()
    plain = param_grads(Trace_ELBO(**kw), two_layer_model, two_layer_guide, X)
    assert not torch.allclose(ours[1]["ab"], plain[1]["ab"])


def test_loss_differentiable_loss_and_loss_and_grads_agree():
    elbo = ScoreFunctionELBO(num_particles=5, control_variate=LeaveOneOutBaseline())
    assert_one_path(elbo, bern_model, bern_guide, X, seed=3)


# -- tier (c): unbiasedness against exact gradients ------------------------------------
def nvil(normalize=True):
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    return NeuralBaseline(net, input=lambda x, *a, **k: x.unsqueeze(-1),
                          normalize_variance=normalize)


CONTROL_VARIATES = {
    "none": lambda: None,
    "moving_average": lambda: MovingAverageBaseline(0.8),
    "nvil": lambda: nvil(normalize=False),
    "leave_one_out": lambda: LeaveOneOutBaseline(),
}


@pytest.mark.parametrize("name", sorted(CONTROL_VARIATES))
def test_unbiased_on_enumerable_model_with_data_plate(name):
    exact = enum_grads(bern_model, bern_guide, X)
    pyro.clear_param_store()
    elbo = ScoreFunctionELBO(num_particles=20, control_variate=CONTROL_VARIATES[name]())
    draws = store_draws(elbo, bern_model, bern_guide, X, num_draws=150)
    assert_unbiased(draws, exact, atol=1e-6)


@pytest.mark.parametrize("name", ["none", "leave_one_out", "moving_average"])
def test_unbiased_with_subsampled_plate(name):
    exact = enum_grads(bern_model, bern_guide, X)  # the full-data gradient
    pyro.clear_param_store()
    elbo = ScoreFunctionELBO(num_particles=8, control_variate=CONTROL_VARIATES[name]())
    draws = store_draws(elbo, bern_model, bern_guide, X, 2, num_draws=400)
    assert_unbiased(draws, exact, atol=1e-6)


def test_nvil_with_variance_normalization_is_unbiased_up_to_its_stated_scale():
    exact = enum_grads(bern_model, bern_guide, X)
    pyro.clear_param_store()
    cv = nvil(normalize=True)
    elbo = ScoreFunctionELBO(num_particles=20, control_variate={"z": cv})

    def scale():  # max(1, sqrt(v)) from the statistics *before* the step
        v = (cv.variance / cv.weight).item() if cv.weight.item() > 0 else 1.0
        return max(1.0, math.sqrt(v))

    draws = store_draws(elbo, bern_model, bern_guide, X, num_draws=150,
                        factors=lambda: {"ab": scale()})
    assert cv.weight.item() > 0.9  # the statistics did move during the run
    assert_unbiased(draws, exact, atol=1e-6)


def test_unbiased_on_two_layer_model():
    exact = enum_grads(two_layer_model, two_layer_guide, X)
    pyro.clear_param_store()
    elbo = ScoreFunctionELBO(num_particles=20, control_variate=LeaveOneOutBaseline())
    draws = store_draws(elbo, two_layer_model, two_layer_guide, X, num_draws=150)
    assert_unbiased(draws, exact, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONTROL_VARIATES))
def test_unbiased_against_analytic_gaussian(name):
    x = X[:3]
    elbo = ScoreFunctionELBO(num_particles=20, control_variate=CONTROL_VARIATES[name]())
    draws = store_draws(elbo, gauss_model, gauss_guide, x, num_draws=150)
    assert_unbiased(draws, gauss_exact_loss_grads(x), atol=1e-6)


def test_force_score_function_matches_pathwise_in_expectation():
    x = X[:3]
    pathwise = ScoreFunctionELBO(num_particles=20)
    forced = ScoreFunctionELBO(num_particles=20, control_variate=LeaveOneOutBaseline(),
                               force_score_function=True)

    def guide(x):
        gauss_guide(x, normal=dist.Normal)

    model = gauss_model
    exact = None
    for elbo in (pathwise, forced):
        pyro.clear_param_store()
        draws = store_draws(elbo, model, guide, x, num_draws=100)
        exact = gauss_exact_loss_grads(x)
        assert_unbiased(draws, exact, atol=1e-6)
    # the pathwise estimator has the lower variance on this model
    pyro.clear_param_store()
    v_path = store_draws(pathwise, model, guide, x, num_draws=100)["loc"].var(0).sum()
    pyro.clear_param_store()
    v_score = store_draws(forced, model, guide, x, num_draws=100)["loc"].var(0).sum()
    assert v_path < v_score


# -- tier (c): variance ------------------------------------------------------------------
def guide_grad_variance(elbo, num_draws=300):
    draws = store_draws(elbo, offset_model, bern_guide, X, num_draws=num_draws)
    return draws["ab"].var(0).sum().item()


def test_every_control_variate_lowers_variance_and_input_dependent_ones_lower_more():
    n, k = 300, 4
    # the variance ratio of two independent n-draw estimates has log-sd ~ sqrt(4 / (n - 1));
    # demand a ratio 4 such standard deviations below 1
    margin = math.exp(-4 * math.sqrt(4 / (n - 1)))
    variances = {}
    for name in ["none", "moving_average", "leave_one_out", "nvil"]:
        pyro.clear_param_store()
        cv = CONTROL_VARIATES[name]()
        elbo = ScoreFunctionELBO(num_particles=k, control_variate=cv and {"z": cv})
        if cv is not None:  # warm up the running state / fit the baseline network
            optim = None
            for _ in range(300 if name == "nvil" else 30):
                loss = elbo.differentiable_loss(offset_model, bern_guide, X)
                if name == "nvil":
                    optim = optim or torch.optim.Adam(cv.parameters(), lr=0.03)
                    optim.zero_grad()
                    loss.backward()
                    optim.step()
            cv.eval()
        variances[name] = guide_grad_variance(elbo, n)
    for name in ["moving_average", "leave_one_out", "nvil"]:
        assert variances[name] < margin * variances["none"], variances
    for name in ["leave_one_out", "nvil"]:
        assert variances[name] < margin * variances["moving_average"], variances


# -- Pyro conventions: SVI, ELBOModule, TraceGraph_ELBO baselines, state ------------------
def test_svi_trains_the_neural_baseline_under_documented_names():
    cv = nvil()
    elbo = ScoreFunctionELBO(num_particles=2, control_variate={"z": cv})
    svi = SVI(bern_model, bern_guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    before = [p.detach().clone() for p in cv.parameters()]
    for _ in range(5):
        svi.step(X)
    names = set(pyro.get_param_store().keys())
    assert {"control_variates.z$$$module.0.weight", "control_variates.z$$$module.2.bias"} <= names
    assert all(not torch.equal(b, p) for b, p in zip(before, cv.parameters(), strict=True))
    assert cv.weight.item() > 0


class BernPair(nn.Module):
    """bern_model and bern_guide as methods of one module, so that the plain PyTorch
    route owns their parameters."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.4, 1.2]))
        self.ab = nn.Parameter(torch.tensor([0.2, 0.5]))

    def model(self, x):
        pyro.module("bern_pair", self)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Bernoulli(logits=self.w[0]))
            pyro.sample("x", dist.Normal(3.0 * self.w[1] * z - 1.0, 1.0), obs=x)

    def guide(self, x):
        pyro.module("bern_pair", self)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(logits=self.ab[0] + self.ab[1] * x))


def test_plain_pytorch_module_exposes_control_variates():
    elbo = ScoreFunctionELBO(num_particles=3, control_variate=MovingAverageBaseline())
    pair = BernPair()
    loss_fn = elbo(pair.model, pair.guide)  # bound methods: the module is held
    assert isinstance(loss_fn, nn.Module)
    assert {id(p) for p in pair.parameters()} <= {id(p) for p in loss_fn.parameters()}
    loss = loss_fn(X)
    loss.backward()
    assert "control_variates.z.average" in loss_fn.state_dict()
    assert pair.ab.grad is not None and pair.w.grad is not None


def test_plain_pytorch_module_refuses_parameters_it_does_not_hold():
    # bern_guide's pyro.param is not a parameter of the module: a torch optimizer built
    # from loss_fn.parameters() would never train it, so the first step says so
    loss_fn = ScoreFunctionELBO(num_particles=3)(bern_model, bern_guide)
    with pytest.raises(ValueError, match="parameter '(w|ab)' is trained by this objective but"):
        loss_fn(X)


def test_tracegraph_baseline_declarations_work_unchanged():
    net = nn.Linear(1, 1)

    def guide(x):
        pyro.module("my_baseline", net)
        ab = pyro.param("ab", torch.tensor([0.2, 0.5]))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(logits=ab[0] + ab[1] * x), infer={"baseline": {
                "use_decaying_avg_baseline": True, "baseline_beta": 0.95,
                "nn_baseline": net, "nn_baseline_input": x.unsqueeze(-1)}})

    elbo = ScoreFunctionELBO(num_particles=20)
    svi = SVI(bern_model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    w0 = net.weight.detach().clone()
    svi.step(X)
    assert elbo.control_variates.get("z").average.beta == 0.95
    assert not torch.equal(net.weight, w0)  # trained by SVI as with TraceGraph_ELBO
    pyro.clear_param_store()
    exact = enum_grads(bern_model, bern_guide, X)
    pyro.clear_param_store()
    draws = store_draws(elbo, bern_model, guide, X, num_draws=150)
    assert_unbiased(draws, exact, atol=1e-6)


def test_resume_continues_exactly():
    def run(steps, state=None):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        torch.manual_seed(0)
        cvs = {"z": nvil()}
        elbo = ScoreFunctionELBO(num_particles=3, control_variate=cvs)
        optim = pyro.optim.Adam({"lr": 0.05})
        svi = SVI(bern_model, bern_guide, optim, elbo)
        if state is not None:  # as a fresh process would restore a checkpoint
            pyro.get_param_store().set_state(state["params"])
            optim.set_state(state["optim"])
            elbo.load_state_dict(state["elbo"])
            torch.set_rng_state(state["rng"])
        for _ in range(steps):
            svi.step(X)
        return {"params": pyro.get_param_store().get_state(), "optim": optim.get_state(),
                "elbo": {k: v.clone() for k, v in elbo.state_dict().items()},
                "rng": torch.get_rng_state()}

    straight = run(10)
    half = run(6)
    resumed = run(4, state=half)
    for k, v in straight["params"]["params"].items():
        assert torch.equal(v, resumed["params"]["params"][k]), k
    for k, v in straight["elbo"].items():
        assert torch.equal(v, resumed["elbo"][k]), k


def test_state_loads_into_fresh_objective_before_first_step():
    elbo = ScoreFunctionELBO(num_particles=2, control_variate=MovingAverageBaseline())
    elbo.loss_and_grads(bern_model, bern_guide, X)
    state = elbo.state_dict()
    fresh = ScoreFunctionELBO(num_particles=2, control_variate=MovingAverageBaseline())
    fresh.load_state_dict(state)
    fresh.loss(bern_model, bern_guide, X)  # creates the site's control variate
    assert torch.equal(fresh.control_variates.get("z").average, state["z.average"])


# -- bad input ----------------------------------------------------------------------------
def test_control_variate_for_unknown_site_raises_and_changes_nothing():
    ma = MovingAverageBaseline()
    spec = {"z": ma, "nope": LeaveOneOutBaseline()}
    elbo = ScoreFunctionELBO(num_particles=2, control_variate=spec)
    with pytest.raises(ValueError, match="'nope'"):
        elbo.loss_and_grads(bern_model, bern_guide, X)
    assert ma.weight.item() == 0.0


def test_control_variate_for_pathwise_site_raises():
    elbo = ScoreFunctionELBO(control_variate={"z": MovingAverageBaseline()})

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(pyro.param("loc", torch.zeros(len(x))), 1.0))

    with pytest.raises(ValueError, match="site 'z'.*pathwise"):
        elbo.loss(gauss_model, guide, X)


def test_model_guide_mismatch_names_the_site():
    def extra_guide(x):
        bern_guide(x)
        pyro.sample("stray", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="'stray'"):
        ScoreFunctionELBO().loss(bern_model, extra_guide, X)
    with pytest.raises(ValueError, match="'z'"):
        ScoreFunctionELBO().loss(bern_model, lambda x: None, X)


def test_non_finite_learning_signal_names_the_site():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Delta(z), obs=torch.full((len(x),), 2.0))

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(pyro.param("p", torch.tensor(0.5))))

    pyro.enable_validation(False)
    with pytest.raises(ValueError, match="non-finite learning signal at site 'z'"):
        ScoreFunctionELBO().loss_and_grads(model, guide, X)


@pytest.mark.parametrize("bad,error", [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_num_particles(bad, error):
    with pytest.raises(error, match="num_particles"):
        ScoreFunctionELBO(num_particles=bad)


def test_leave_one_out_with_one_particle_raises():
    with pytest.raises(ValueError, match="num_particles >= 2"):
        ScoreFunctionELBO(num_particles=1, control_variate=LeaveOneOutBaseline())


def test_unknown_control_variate_object_raises():
    with pytest.raises(TypeError, match="ControlVariate"):
        ScoreFunctionELBO(control_variate="nvil")


def test_loss_does_not_mutate_arguments():
    x = X.clone()
    options = {"subsample_size": None}
    args = (x,)
    elbo = ScoreFunctionELBO(num_particles=3, control_variate=LeaveOneOutBaseline())
    elbo.loss_and_grads(bern_model, bern_guide, *args, **options)
    assert args[0] is x and torch.equal(x, X)
    assert options == {"subsample_size": None}


@pytest.mark.cuda
def test_cuda():
    x = X.cuda()

    def model(x):
        w = pyro.param("w", torch.tensor([0.4, 1.2], device=x.device))
        with pyro.plate("data", len(x), device=x.device):
            z = pyro.sample("z", dist.Bernoulli(logits=w[0]))
            pyro.sample("x", dist.Normal(3.0 * w[1] * z - 1.0, 1.0), obs=x)

    def guide(x):
        ab = pyro.param("ab", torch.tensor([0.2, 0.5], device=x.device))
        with pyro.plate("data", len(x), device=x.device):
            pyro.sample("z", dist.Bernoulli(logits=ab[0] + ab[1] * x))

    for cv in (MovingAverageBaseline(), LeaveOneOutBaseline(), nvil().cuda()):
        pyro.clear_param_store()
        elbo = ScoreFunctionELBO(num_particles=4, control_variate=cv)
        elbo.loss_and_grads(model, guide, x)
        assert pyro.param("ab").grad.is_cuda and torch.isfinite(pyro.param("ab").grad).all()
        assert all(b.is_cuda for b in elbo.control_variates.buffers())


def test_autoguide_with_auxiliary_sites_equals_trace_elbo():
    from pyro.infer.autoguide import AutoNormal

    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    guide = AutoNormal(model)
    guide(X)  # its lazy set-up draws random numbers
    kw = dict(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    ours = param_grads(ScoreFunctionELBO(**kw), model, guide, X)
    theirs = param_grads(Trace_ELBO(**kw), model, guide, X)
    assert_same(ours, theirs)


@pytest.mark.parametrize("disabled_before", [False, True])
def test_an_eager_step_runs_without_cyclic_garbage_collections(disabled_before):
    """The eager step pauses Python's cyclic collector: a program that makes thousands
    of objects that live through the step (as trace nodes and labels do) triggers no
    collection while it runs, and the collector's state is restored after the step."""
    import gc

    collections = []
    during = []

    def counted(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    def model():
        before = len(collections)
        kept = [{"i": i} for i in range(20000)]  # ~28 gen-0 thresholds of live objects
        during.append(len(collections) - before)
        z = pyro.sample("z", dist.Bernoulli(0.4))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5 + 0 * len(kept)))

    def guide():
        pyro.sample("z", dist.Bernoulli(pyro.param("p", torch.tensor(0.3),
                                                   constraint=dist.constraints.unit_interval)))

    pyro.clear_param_store()
    was = gc.isenabled()
    gc.enable()
    if disabled_before:
        gc.disable()
    gc.callbacks.append(counted)
    try:
        ScoreFunctionELBO().differentiable_loss(model, guide)
        assert during and not any(during)
        assert gc.isenabled() is not disabled_before
    finally:
        gc.callbacks.remove(counted)
        (gc.enable if was else gc.disable)()

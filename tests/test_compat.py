"""A drop-in for Pyro's objectives (issue 10): Pyro's constructor keywords, the checks
Pyro makes of invalid programs, refusal of non-finite values before any parameter
changes, the sleep phase's checks, param-store names that cannot collide, and the plain
PyTorch route that never trains silently nothing. The exactness of every objective on
many kinds of programs is in ``test_matrix.py``."""

import copy
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from models import MixedGuide, MixedModel, X, bern_guide, bern_model
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal
from torch import nn

from pyro_wakesleep import (
    DisarmELBO,
    MovingAverageBaseline,
    NeuralBaseline,
    ReweightedWakeSleepELBO,
    ScoreFunctionELBO,
    VimcoELBO,
    WakeSleepELBO,
)

OBJECTIVES = {
    "sf": lambda **kw: ScoreFunctionELBO(2, **kw),
    "vimco": lambda **kw: VimcoELBO(2, **kw),
    "disarm": lambda **kw: DisarmELBO(2, **kw),
    "ws": lambda **kw: WakeSleepELBO(2, **kw),
    "rws": lambda **kw: ReweightedWakeSleepELBO(2, **kw),
}
each = pytest.mark.parametrize("make", list(OBJECTIVES.values()), ids=list(OBJECTIVES))

PYRO_KEYWORDS = {
    "max_plate_nesting": 1, "vectorize_particles": True, "strict_enumeration_warning": True,
    "ignore_jit_warnings": False, "jit_options": {"check_trace": False},
    "retain_graph": None, "tail_adaptive_beta": -1.0,
}


# -- Pyro's constructor ------------------------------------------------------------------
@each
def test_every_objective_takes_pyro_elbo_keywords(make):
    objective = make(**PYRO_KEYWORDS)
    assert objective.max_plate_nesting == 1 and objective.strict_enumeration_warning
    assert math.isfinite(objective.loss(MixedModel(), MixedGuide(), X))
    with pytest.warns(DeprecationWarning, match="max_iarange_nesting"):
        assert make(max_iarange_nesting=1).max_plate_nesting == 1


@each
@pytest.mark.parametrize("keyword,bad", [
    ("vectorize_particles", "no"), ("strict_enumeration_warning", 1), ("retain_graph", "yes"),
    ("jit_options", "fast"), ("tail_adaptive_beta", "0.5"), ("max_plate_nesting", 1.5),
])
def test_bad_pyro_keyword_is_a_type_error_naming_it(make, keyword, bad):
    with pytest.raises(TypeError, match=keyword):
        make(**{keyword: bad})


def test_reweighted_wake_sleep_takes_pyros_positional_signature():
    # pyro.infer.ReweightedWakeSleep(num_particles, insomnia, model_has_params,
    # num_sleep_particles, vectorize_particles, max_plate_nesting, strict_enumeration_warning)
    rws = ReweightedWakeSleepELBO(3, 0.5, True, 2, False, 1, False)
    assert (rws.num_particles, rws.insomnia, rws.model_has_params) == (3, 0.5, True)
    assert (rws.num_sleep_particles, rws.vectorize_particles) == (2, False)
    assert (rws.max_plate_nesting, rws.strict_enumeration_warning) == (1, False)
    with pytest.raises(TypeError, match="model_has_params"):
        ReweightedWakeSleepELBO(3, 0.5, 2)


# -- the checks Pyro makes of invalid programs --------------------------------------------
def _shape_mismatch():
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(1, 2), 1.0).to_event(2))

    def guide():
        pyro.sample("z", dist.Normal(torch.zeros(2, 1), 1.0).to_event(2))

    return model, guide


@each
def test_model_and_guide_shapes_that_disagree_raise(make):
    model, guide = _shape_mismatch()
    with pytest.raises(ValueError, match="Model and guide shapes disagree at site 'z'"):
        make(vectorize_particles=False).loss(model, guide)
    # Pyro's own objective raises the same
    with pytest.raises(ValueError, match="Model and guide shapes disagree"):
        Trace_ELBO().loss(model, guide)


def test_guide_site_configured_for_enumeration_warns_where_it_is_sampled():
    def guide(x):
        ab = pyro.param("ab", torch.tensor([0.2, 0.5]))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(logits=ab[0] + ab[1] * x),
                        infer={"enumerate": "parallel"})

    # DisARM does not enumerate: the marked site is sampled, and Pyro's warning says so
    with pytest.warns(UserWarning, match="TraceEnum_ELBO"):
        DisarmELBO(2).loss(bern_model, guide, X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DisarmELBO(2, strict_enumeration_warning=False).loss(bern_model, guide, X)
        # the score-function objective sums the marked site out: nothing to warn about
        ScoreFunctionELBO(2).loss(bern_model, guide, X)


def test_sequential_plate_in_the_guide_only_warns():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        for _ in pyro.plate("extra", 2):
            pass
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))

    with pytest.warns(UserWarning, match="plate statements in guide but not model"):
        ScoreFunctionELBO().loss(model, guide)


def test_guide_factor_needs_has_rsample():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        z = pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.5)), 1.0))
        pyro.factor("f", z ** 2)

    with pytest.raises(ValueError, match='pyro.factor\\("f",...\\).*has_rsample'):
        ScoreFunctionELBO().loss(model, guide)


@pytest.mark.parametrize("make", [ScoreFunctionELBO, DisarmELBO])
def test_guide_factor_enters_loss_and_gradient_as_for_trace_elbo(make):
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(1.0))
        pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.factor("f", loc ** 2, has_rsample=True)

    def value_and_grad(objective):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        loss = objective.loss_and_grads(model, guide)
        return loss, pyro.param("loc").unconstrained().grad.item()

    # -ELBO = KL(N(loc,1) || N(0,1)) + loc^2 = 1.5 at loc = 1, gradient loc + 2 loc = 3
    # (the draws enter both objectives alike: one particle, same seed)
    ours, theirs = value_and_grad(make(1)), value_and_grad(Trace_ELBO())
    assert ours == pytest.approx(theirs, rel=1e-6)


# -- non-finite values are refused before any parameter changes ---------------------------
def _impossible_observation():
    def model(x):
        w = pyro.param("w", torch.tensor(0.3))
        with pyro.plate("data", len(x)):
            y = pyro.sample("y", dist.Normal(w, 1.0))
            pyro.sample("x", dist.Uniform(y - 10.0, y + 10.0), obs=x + 100.0)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(loc, 1.0))

    return model, guide


@each
def test_non_finite_log_density_raises_before_any_parameter_changes(make):
    model, guide = _impossible_observation()
    pyro.clear_param_store()
    pyro.enable_validation(False)  # else Pyro's support check raises first
    try:
        svi = SVI(model, guide, pyro.optim.SGD({"lr": 0.1}), make(max_plate_nesting=1))
        with pytest.raises(ValueError, match=r"(site 'x'|weights).*: \d+ of \d+ elements are "
                           "not finite"):
            svi.step(X)
    finally:
        pyro.enable_validation(True)
    # unchanged, bit for bit
    assert torch.equal(pyro.param("w"), torch.tensor(0.3))
    assert torch.equal(pyro.param("loc"), torch.tensor(0.0))


# -- the sleep phase ------------------------------------------------------------------------
def _continuous():
    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    return model


@pytest.mark.parametrize("autoguide,reason", [
    (AutoNormal, "auxiliary.*AutoNormal"), (AutoDelta, "point mass.*AutoDelta"),
])
@pytest.mark.parametrize("make", [lambda: WakeSleepELBO(1), lambda: ReweightedWakeSleepELBO(
    2, 0.0, num_sleep_particles=1)], ids=["ws", "rws-sleep"])
def test_sleep_phase_refuses_autoguides_saying_why(make, autoguide, reason):
    model = _continuous()
    with pytest.raises(ValueError, match=reason):
        make().loss(model, autoguide(model), X)


def test_rws_without_dreams_takes_autoguides():
    model = _continuous()
    assert math.isfinite(ReweightedWakeSleepELBO(3, 1.0).loss(model, AutoNormal(model), X))


def test_sleep_phase_checks_the_guide_scores_every_dreamed_latent():
    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("u", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(0.5))
            if x.dim() == 1 and x[0] != X[0]:  # a guide that skips a site on dreams
                return
            pyro.sample("u", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match=r"scored 1 of the 2 latent sites.*\['u'\]"):
        WakeSleepELBO(1, vectorize_particles=False).loss(model, guide, X)


# -- names in the param store ---------------------------------------------------------------
def _nvil():
    return NeuralBaseline(nn.Linear(1, 1), input=lambda x: x.unsqueeze(-1))


def test_two_objectives_never_share_baseline_weights_silently():
    first = ScoreFunctionELBO(2, {"z": _nvil()})
    first.loss_and_grads(bern_model, bern_guide, X)
    w1 = first.control_variates.get("z").module.weight
    assert pyro.get_param_store()["control_variates.z$$$module.weight"] is w1
    # a second live objective under the same names would take w1: it says so
    second = ScoreFunctionELBO(2, {"z": _nvil()})
    with pytest.raises(ValueError, match="another live objective.*name="):
        second.loss_and_grads(bern_model, bern_guide, X)
    named = ScoreFunctionELBO(2, {"z": _nvil()}, name="mine")
    named.loss_and_grads(bern_model, bern_guide, X)
    w3 = named.control_variates.get("z").module.weight
    assert pyro.get_param_store()["mine.z$$$module.weight"] is w3 and w3 is not w1
    with pytest.raises(TypeError, match="name"):
        ScoreFunctionELBO(name=3)


def test_objective_restored_beside_the_one_it_continues_takes_the_saved_weights():
    first = ScoreFunctionELBO(2, {"z": _nvil()})
    first.loss_and_grads(bern_model, bern_guide, X)
    saved = copy.deepcopy(pyro.get_param_store().get_state())  # as from a checkpoint file
    pyro.get_param_store().set_state(saved)  # a restore replaces the store's tensors
    resumed = ScoreFunctionELBO(2, {"z": _nvil()})
    resumed.loss_and_grads(bern_model, bern_guide, X)
    assert torch.equal(resumed.control_variates.get("z").module.weight.detach(),
                       saved["params"]["control_variates.z$$$module.weight"].detach())


# -- the plain PyTorch route ----------------------------------------------------------------
class Pair(nn.Module):
    """A model and guide as methods of one module (as SigmoidBeliefNet)."""

    def __init__(self):
        super().__init__()
        self.m, self.g = MixedModel(), MixedGuide()

    def model(self, x):
        self.m(x)

    def guide(self, x):
        self.g(x)


def test_module_route_holds_the_module_of_bound_methods():
    pair = Pair()
    module = ScoreFunctionELBO(2)(pair.model, pair.guide)
    assert {id(p) for p in pair.parameters()} <= {id(p) for p in module.parameters()}


def test_module_route_refuses_an_optimizer_built_before_lazy_parameters():
    pair = Pair()
    module = ScoreFunctionELBO(3, _nvil())(pair.model, pair.guide)  # a template: lazy
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)  # misses the baseline
    module(X).backward()
    optimizer.step()
    with pytest.raises(ValueError, match=r"\['control_variates.*created at the previous call"):
        module(X)


def test_module_route_initialize_creates_lazy_parameters_first():
    pair = Pair()
    module = ScoreFunctionELBO(3, _nvil())(pair.model, pair.guide)
    module.initialize(X)
    baseline = module.control_variates.get("z").module.weight
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    before = baseline.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        module(X).backward()
        optimizer.step()
    assert not torch.equal(before, baseline.detach())


# -- argument checks ------------------------------------------------------------------------
@pytest.mark.parametrize("make,name", [
    (lambda: MovingAverageBaseline(beta="0.9"), "beta"),
    (lambda: NeuralBaseline(nn.Linear(1, 1), decay="0.8"), "decay"),
    (lambda: NeuralBaseline(nn.Linear(1, 1), center="yes"), "center"),
])
def test_control_variate_arguments_are_checked_up_front(make, name):
    with pytest.raises(TypeError, match=name):
        make()

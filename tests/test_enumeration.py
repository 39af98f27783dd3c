"""Enumeration mixed with score-function sites (issue 21): model sites marked
``infer={"enumerate": "parallel"}`` summed out exactly, guide sites marked for
enumeration in expectation under the guide, the other discrete guide sites scored with
the objective's control variate. Every value and gradient is checked against an exact
one: Pyro's ``TraceEnum_ELBO`` with the guide enumerated too (the ELBO), or the
K-sample bound by enumerating K-tuples of the guide's configurations with the model's
marginal likelihood (VIMCO, reweighted wake-sleep)."""

from __future__ import annotations

import itertools
import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from checks import assert_unbiased, param_grads, store_draws
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.ops.indexing import Vindex
from pyro.poutine.util import site_is_subsample

from pyro_wakesleep import (
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    ReweightedWakeSleepELBO,
    ScoreFunctionELBO,
    VimcoELBO,
)
from pyro_wakesleep.particles import run_particles

Z = 4.5  # standard errors allowed between a many-draw mean and the exact value
simplex = dist.constraints.simplex
unit = dist.constraints.unit_interval


# -- the programs ---------------------------------------------------------------------------
MIX_DATA = torch.tensor([0.0, 1.0, 5.0, 6.0, 5.5])


def mix_model(x):
    """A mixture whose assignments are enumerated and whose shift is a global sampled
    switch."""
    s = pyro.sample("s", dist.Bernoulli(0.5))
    w = pyro.param("w", torch.tensor([0.3, 0.7]), constraint=simplex)
    locs = pyro.param("locs", torch.tensor([0.0, 4.0]))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(locs[z] + 2.0 * s, 1.0), obs=x)


def mix_guide(x):
    p = pyro.param("p", torch.tensor(0.4), constraint=unit)
    pyro.sample("s", dist.Bernoulli(p))


HMM_DATA = torch.tensor([0.1, 1.2, 0.9, -0.2, 2.1, 1.8])


def hmm_model(x):
    """An HMM whose states are enumerated along a pyro.markov chain and whose
    transition matrix is chosen by a sampled discrete parameter."""
    k = pyro.sample("k", dist.Categorical(torch.tensor([0.5, 0.3, 0.2])))
    stay = torch.tensor([0.9, 0.6, 0.2])
    table = torch.stack([torch.stack([stay, 1 - stay], -1), torch.stack([1 - stay, stay], -1)], 1)
    locs = pyro.param("hmm_locs", torch.tensor([0.0, 2.0]))
    state = torch.tensor(0)
    for t in pyro.markov(range(len(x))):
        state = pyro.sample(f"z_{t}", dist.Categorical(Vindex(table)[k, state]),
                            infer={"enumerate": "parallel"})
        pyro.sample(f"x_{t}", dist.Normal(locs[state], 0.8), obs=x[t])


def hmm_guide(x):
    logits = pyro.param("k_logits", torch.tensor([0.2, -0.1, 0.3]))
    pyro.sample("k", dist.Categorical(logits=logits))


NEST_DATA = torch.tensor([[0.5, 1.5], [2.0, 0.0], [1.0, 3.0]])


@config_enumerate
def nest_model(x):
    """Nested plates: a global sampled switch, a sampled local per outer element, an
    enumerated site per outer element and one per inner element (both summed out)."""
    g = pyro.sample("g", dist.Bernoulli(0.3), infer={"enumerate": None})
    bias = pyro.param("nest_bias", torch.tensor(0.5))
    with pyro.plate("outer", 3, dim=-2):
        a = pyro.sample("a", dist.Bernoulli(torch.sigmoid(bias + g)), infer={"enumerate": None})
        c = pyro.sample("c", dist.Bernoulli(0.4 + 0.2 * a))
        with pyro.plate("inner", 2, dim=-1):
            z = pyro.sample("z", dist.Bernoulli(0.3 + 0.4 * c))
            pyro.sample("x", dist.Normal(z + c + g, 1.0), obs=x)


def nest_guide(x):
    pg = pyro.param("pg", torch.tensor(0.6), constraint=unit)
    pa = pyro.param("pa", torch.tensor([[0.3], [0.5], [0.7]]), constraint=unit)
    g = pyro.sample("g", dist.Bernoulli(pg))
    with pyro.plate("outer", 3, dim=-2):
        pyro.sample("a", dist.Bernoulli(pa * (0.5 + 0.5 * g)))


def genum_model(x):
    """A mixture whose assignments the guide enumerates, with a global sampled switch."""
    s = pyro.sample("s", dist.Bernoulli(0.5))
    locs = pyro.param("glocs", torch.tensor([0.0, 4.0]))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.tensor([0.4, 0.6])))
        pyro.sample("x", dist.Normal(locs[z] + 2.0 * s, 1.0), obs=x)


def genum_guide(x):
    p = pyro.param("gp", torch.tensor(0.4), constraint=unit)
    s = pyro.sample("s", dist.Bernoulli(p))
    probs = pyro.param("gprobs", torch.full((len(x), 2), 0.5), constraint=simplex)
    with pyro.plate("data", len(x)):
        # the guide's assignment probabilities depend on the sampled switch
        q = torch.softmax(probs.log() + s.unsqueeze(-1) * torch.tensor([0.5, -0.5]), -1)
        pyro.sample("z", dist.Categorical(q), infer={"enumerate": "parallel"})


PROGRAMS = {
    "mixture": (mix_model, mix_guide, (MIX_DATA,), 1),
    "hmm": (hmm_model, hmm_guide, (HMM_DATA,), 0),
    "nested": (nest_model, nest_guide, (NEST_DATA,), 2),
}


# -- exact values -----------------------------------------------------------------------------
def exact_elbo_grads(model, guide, args, nesting):
    """The exact gradient of -ELBO: TraceEnum_ELBO with every guide site enumerated."""
    _, grads = param_grads(TraceEnum_ELBO(max_plate_nesting=nesting), model,
                           config_enumerate(guide, "parallel"), *args)
    return grads


def exact_elbo(model, guide, args, nesting):
    return TraceEnum_ELBO(max_plate_nesting=nesting).loss(
        model, config_enumerate(guide, "parallel"), *args)


def _all_configs(guide, args):
    """Every joint configuration, elementwise over plates, of the guide's latents."""
    trace = poutine.trace(guide).get_trace(*args)
    sites = [(n, s) for n, s in trace.nodes.items()
             if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]
    choices = []
    for _, s in sites:
        support = s["fn"].enumerate_support(expand=False).reshape(-1)
        shape, size = s["value"].shape, max(1, s["value"].numel())
        choices.append([torch.tensor(c, dtype=support.dtype).reshape(shape)
                        for c in itertools.product(support.tolist(), repeat=size)])
    return [dict(zip([n for n, _ in sites], combo, strict=True))
            for combo in itertools.product(*choices)]


def _log_q(guide, values, args):
    trace = poutine.trace(poutine.condition(guide, data=values)).get_trace(*args)
    trace.compute_log_prob()
    return sum(s["log_prob_sum"] for s in trace.nodes.values() if s["type"] == "sample")


def _log_marginal(model, values, args, nesting):
    """log p(x, values), the model's enumerated sites summed out (TraceEnum_ELBO with
    an empty guide)."""
    conditioned = poutine.condition(model, data=values)
    return -TraceEnum_ELBO(max_plate_nesting=nesting).differentiable_loss(
        conditioned, lambda *a: None, *args)


def exact_iwae(model, guide, args, nesting, k):
    """(bound, wake-phi surrogate): the exact K-sample bound E[log 1/K sum_k w_k] and
    E[sum_k w~_k log q(z_k)] (weights held constant), by enumerating K-tuples."""
    configs = _all_configs(guide, args)
    log_q = torch.stack([_log_q(guide, c, args) for c in configs])
    log_w = torch.stack([_log_marginal(model, c, args, nesting) for c in configs]) - log_q
    bound, phi = 0.0, 0.0
    for combo in itertools.product(range(len(configs)), repeat=k):
        idx = torch.tensor(combo)
        prob = log_q[idx].sum().exp()
        lw = log_w[idx]
        bound = bound + prob * (torch.logsumexp(lw, 0) - math.log(k))
        phi = phi + prob.detach() * (torch.softmax(lw.detach(), 0) * log_q[idx]).sum()
    return bound, phi


def exact_iwae_grads(model, guide, args, nesting, k, what="bound"):
    """{name: gradient} of the negative exact bound (or wake-phi surrogate)."""
    pyro.set_rng_seed(0)
    poutine.trace(guide).get_trace(*args)  # params created
    poutine.trace(poutine.enum(config_enumerate(model), first_available_dim=-nesting - 1)
                  ).get_trace(*args)
    store = pyro.get_param_store()
    names = sorted(store.keys())
    params = [store[n].unconstrained() for n in names]
    bound, phi = exact_iwae(model, guide, args, nesting, k)
    value = bound if what == "bound" else phi
    grads = torch.autograd.grad(-value, params, allow_unused=True)
    return bound.item(), {n: torch.zeros_like(p) if g is None else g
                          for n, p, g in zip(names, params, grads, strict=True)}


@pytest.fixture(autouse=True)
def _clear():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# -- the ELBO ---------------------------------------------------------------------------------
SF = {
    "none": lambda k, n: ScoreFunctionELBO(k, max_plate_nesting=n),
    "ma": lambda k, n: ScoreFunctionELBO(k, MovingAverageBaseline(), max_plate_nesting=n),
    "loo": lambda k, n: ScoreFunctionELBO(k, LeaveOneOutBaseline(), max_plate_nesting=n),
    "sequential": lambda k, n: ScoreFunctionELBO(k, LeaveOneOutBaseline(), max_plate_nesting=n,
                                                 vectorize_particles=False),
}


@pytest.mark.parametrize("program", list(PROGRAMS))
@pytest.mark.parametrize("cv", list(SF))
def test_score_function_exact(program, cv):
    model, guide, args, nesting = PROGRAMS[program]
    pyro.set_rng_seed(0)
    exact = exact_elbo_grads(model, guide, args, nesting)
    value = exact_elbo(model, guide, args, nesting)
    objective = SF[cv](8 if cv == "sequential" else 32, nesting)
    draws = 25 if cv != "sequential" else 12
    samples = store_draws(objective, model, guide, *args, num_draws=draws)
    assert_unbiased(samples, exact, z=Z, atol=1e-4)
    losses = torch.tensor([objective.loss(model, guide, *args) for _ in range(20)])
    assert abs(losses.mean() - value) <= Z * losses.std() / math.sqrt(20) + 1e-4


def test_guide_enumeration_exact():
    """A guide-enumerated site whose probabilities depend on a sampled switch: exact
    expectation over it, the switch's score Rao-Blackwellized against the weighted
    costs (a learning signal that missed them would be biased)."""
    model, guide, args = genum_model, genum_guide, (MIX_DATA,)
    pyro.set_rng_seed(0)
    exact = exact_elbo_grads(model, guide, args, 1)
    value = exact_elbo(model, guide, args, 1)
    for objective in (ScoreFunctionELBO(32, max_plate_nesting=1),
                      ScoreFunctionELBO(32, LeaveOneOutBaseline(), max_plate_nesting=1)):
        samples = store_draws(objective, model, guide, *args, num_draws=25)
        assert_unbiased(samples, exact, z=Z, atol=1e-4, positive_se=True)
        losses = torch.tensor([objective.loss(model, guide, *args) for _ in range(20)])
        assert abs(losses.mean() - value) <= Z * losses.std() / math.sqrt(20) + 1e-4


def test_single_particle_matches_trace_enum():
    """One particle, the same seed: the same loss and model-parameter gradient as
    Pyro's TraceEnum_ELBO (the guide's differ by the zero-mean term
    :math:`-\\nabla \\log q` that the score-function estimator here leaves out)."""
    for model, guide, args, nesting in PROGRAMS.values():
        pyro.clear_param_store()
        ours = param_grads(ScoreFunctionELBO(max_plate_nesting=nesting), model, guide, *args,
                           seed=3)
        theirs = param_grads(TraceEnum_ELBO(max_plate_nesting=nesting), model, guide, *args,
                             seed=3)
        assert ours[0] == pytest.approx(theirs[0], rel=1e-5)
        for name in ("locs", "w", "hmm_locs", "nest_bias"):
            if name in theirs[1]:
                assert torch.allclose(ours[1][name], theirs[1][name], atol=1e-5), name


def test_hmm_long_chain_linear():
    """A 300-step chain (2^300 joint states): summed by message passing, the loss equals
    TraceEnum_ELBO's under the same seed."""
    x = torch.randn(300, generator=torch.Generator().manual_seed(0)) + 1.0
    pyro.set_rng_seed(1)
    ours = ScoreFunctionELBO(2, max_plate_nesting=0).loss(hmm_model, hmm_guide, x)
    pyro.set_rng_seed(1)
    theirs = TraceEnum_ELBO(num_particles=2, vectorize_particles=True,
                            max_plate_nesting=0).loss(hmm_model, hmm_guide, x)
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_contracted_factor_is_a_cost_term():
    """The model sites summed out are listed, and replaced by one factor per connected
    component whose dependencies include the sampled site."""
    pyro.set_rng_seed(0)
    particles = run_particles(hmm_model, hmm_guide, (HMM_DATA,), {}, num_particles=3,
                              vectorize=True, max_plate_nesting=0, track=True,
                              enumeration="expectation")
    names = [f"z_{t}" for t in range(len(HMM_DATA))]
    assert list(particles.enumerated) == names
    factors = [n for n in particles.sites if n.startswith("_sum[")]
    assert factors == ["_sum[z_0, ..., z_5]"]
    assert particles.sites[factors[0]].log_p.shape == (3,)
    model_trace, guide_trace = particles.traces[0]
    bit = guide_trace.nodes["k"]["dataflow_bit"]
    assert model_trace.nodes[factors[0]]["dataflow_depends"] >> bit & 1


# -- importance-weighted objectives ------------------------------------------------------------
IW_PROGRAMS = PROGRAMS


@pytest.mark.parametrize("program", list(IW_PROGRAMS))
def test_vimco_exact(program):
    model, guide, args, nesting = IW_PROGRAMS[program]
    bound, exact = exact_iwae_grads(model, guide, args, nesting, 3)
    objective = VimcoELBO(3, max_plate_nesting=nesting)
    samples = store_draws(objective, model, guide, *args, num_draws=600, seed=5000)
    assert_unbiased(samples, exact, z=Z, atol=1e-4)
    losses = torch.tensor([objective.loss(model, guide, *args) for _ in range(200)])
    assert abs(losses.mean() + bound) <= Z * losses.std() / math.sqrt(200)


@pytest.mark.parametrize("program", list(IW_PROGRAMS))
def test_reweighted_wake_sleep_exact(program):
    """The model's gradient is the K-sample bound's; the guide's is wake-phi's."""
    model, guide, args, nesting = IW_PROGRAMS[program]
    bound, exact = exact_iwae_grads(model, guide, args, nesting, 3)
    _, phi = exact_iwae_grads(model, guide, args, nesting, 3, what="phi")
    guide_params = {"p", "k_logits", "pg", "pa"}
    expected = {n: phi[n] if n in guide_params else g for n, g in exact.items()}
    objective = ReweightedWakeSleepELBO(3, max_plate_nesting=nesting)
    samples = store_draws(objective, model, guide, *args, num_draws=600, seed=5000)
    assert_unbiased(samples, expected, z=Z, atol=1e-4)
    losses = torch.tensor([objective.loss(model, guide, *args) for _ in range(200)])
    assert abs(losses.mean() + bound) <= Z * losses.std() / math.sqrt(200)


# -- jit ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda jit: ScoreFunctionELBO(4, LeaveOneOutBaseline(), max_plate_nesting=1, jit=jit),
    lambda jit: VimcoELBO(3, max_plate_nesting=1, jit=jit),
    lambda jit: ReweightedWakeSleepELBO(3, max_plate_nesting=1, jit=jit),
], ids=["sf_loo", "vimco", "rws"])
def test_jit_equals_eager(make):
    """jit=True gives the eager losses and gradients, step by step (recorded, or run
    eagerly with a warning that says why)."""
    results = []
    for jit in (False, True):
        pyro.clear_param_store()
        objective = make(jit)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results.append([param_grads(objective, mix_model, mix_guide, MIX_DATA, seed=s)
                            for s in range(3)])
        if not jit:
            assert not caught, [str(w.message) for w in caught]
        else:
            assert all("jit=True" in str(w.message) for w in caught), \
                [str(w.message) for w in caught]
    for (eager_loss, eager), (jit_loss, jitted) in zip(*results, strict=True):
        assert jit_loss == pytest.approx(eager_loss, rel=1e-6)
        for name, grad in eager.items():
            assert torch.allclose(jitted[name], grad, atol=1e-6), name


# -- what cannot be done ---------------------------------------------------------------------------
def _sequential_model(x):
    s = pyro.sample("s", dist.Bernoulli(0.5))
    z = pyro.sample("z", dist.Bernoulli(0.3), infer={"enumerate": "sequential"})
    pyro.sample("x", dist.Normal(z + s, 1.0), obs=x[0])


def _control_flow_model(x):
    s = pyro.sample("s", dist.Bernoulli(0.5))
    if s.item() >= 0:  # always taken, but decided by a draw read into Python
        z = pyro.sample("z", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[0])


def _scored_after_enumerated_guide(x):
    z = pyro.sample("z", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
    pyro.sample("s", dist.Bernoulli(0.2 + 0.5 * z))


def _two_site_model(x):
    z = pyro.sample("z", dist.Bernoulli(0.5))
    s = pyro.sample("s", dist.Bernoulli(0.3))
    pyro.sample("x", dist.Normal(z + s, 1.0), obs=x[0])


def _guide_s(x):
    pyro.sample("s", dist.Bernoulli(pyro.param("p", torch.tensor(0.4), constraint=unit)))


def _guide_enumerating_z(x):
    pyro.sample("z", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
    _guide_s(x)


@pytest.mark.parametrize("objective, model, guide, match", [
    (ScoreFunctionELBO(max_plate_nesting=0), _sequential_model, _guide_s,
     "model site 'z' is marked infer={'enumerate': 'sequential'}"),
    (ScoreFunctionELBO(max_plate_nesting=0, vectorize_particles=False), _control_flow_model,
     _guide_s, "enumerated site 'z' runs under stochastic control flow"),
    (ScoreFunctionELBO(max_plate_nesting=0), _two_site_model, _scored_after_enumerated_guide,
     "guide site 's' is sampled .* depends on the enumerated guide site"),
    (VimcoELBO(2, max_plate_nesting=0), _two_site_model, _guide_enumerating_z,
     "guide site 'z' is enumerated; .* enumerate it in the model"),
    (ReweightedWakeSleepELBO(2, max_plate_nesting=0), _two_site_model, _guide_enumerating_z,
     "guide site 'z' is enumerated"),
    (VimcoELBO(2, dreg=True, max_plate_nesting=1), mix_model, mix_guide,
     r"VimcoELBO\(dreg=True\) does not support enumeration; sites summed out: \['z'\]"),
    (ScoreFunctionELBO(stick_the_landing=True, max_plate_nesting=1), mix_model, mix_guide,
     "stick_the_landing=True.* does not support enumeration"),
])
def test_clear_errors(objective, model, guide, match):
    pyro.set_rng_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            objective.loss_and_grads(model, guide, torch.tensor([0.5]))


def test_objective_without_enumeration_names_the_site():
    """An objective that does not enumerate asks for a guide site, and says which do."""
    from pyro_wakesleep import WakeSleepELBO

    with pytest.raises(ValueError, match=r"\['z'\] have no guide site.*VimcoELBO"):
        WakeSleepELBO(max_plate_nesting=1).loss(mix_model, mix_guide, MIX_DATA)


def _enum_infer(handler: type, model: object, max_plate_nesting: int) -> dict:
    """The enumeration bookkeeping of every site of one run of ``model`` under
    ``handler`` (Pyro's EnumMessenger or ours), with the values' shapes."""
    pyro.set_rng_seed(0)
    trace = poutine.trace(handler(first_available_dim=-1 - max_plate_nesting)(model)).get_trace()
    return {name: (site["infer"].get("_dim_to_id"), site["infer"].get("_enumerate_dim"),
                   tuple(site["value"].shape))
            for name, site in trace.nodes.items() if site["type"] == "sample"}


@pytest.mark.parametrize("first_marked", [0, 3, 6])
def test_enumerate_fast_path_matches_pyro(first_marked):
    """Our Enumerate skips Pyro's bookkeeping at sites before the first enumerated one:
    the dims and shapes it leaves on every site equal Pyro's EnumMessenger's, on a
    markov chain (local dims) whose first marked site comes early, late or never."""
    from pyro.poutine.enum_messenger import EnumMessenger

    from pyro_wakesleep.enumeration import Enumerate

    def model() -> None:
        with pyro.plate("data", 3):
            z = torch.zeros(3, dtype=torch.long)
            for t in pyro.markov(range(6)):
                infer = {"enumerate": "parallel"} if t >= first_marked else {}
                z = pyro.sample(f"z{t}", dist.Categorical(torch.tensor([[0.3, 0.7],
                                                                        [0.6, 0.4]])[z]),
                                infer=infer)
                pyro.sample(f"x{t}", dist.Normal(z.float(), 1.0), obs=torch.zeros(3))

    ours, pyros = _enum_infer(Enumerate, model, 1), _enum_infer(EnumMessenger, model, 1)
    assert ours == pyros
    assert any(dim is not None for _, dim, _ in ours.values()) == (first_marked < 6)

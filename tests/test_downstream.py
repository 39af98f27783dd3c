"""The learning-signal engine: dependencies by provenance and control, signals in linear
time. Exactness against enumeration for every objective is in tests/test_matrix.py."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.tracegraph_elbo import TrackNonReparam
from pyro.ops.provenance import get_provenance

from pyro_wakesleep import ScoreFunctionELBO
from pyro_wakesleep.downstream import (
    bit_runs,
    downstream_sites,
    learning_signals,
    signal_matrix,
)
from pyro_wakesleep.particles import run_particles
from pyro_wakesleep.traces import importance_trace
from tests.checks import param_grads, store_draws
from tests.models import NonreparameterizedNormal, two_layer_guide, two_layer_model

X = torch.tensor([0.0, 1.0, 2.0])


# -- pure parts -----------------------------------------------------------------------------
def test_bit_runs():
    assert list(bit_runs(0)) == []
    assert list(bit_runs(0b1101)) == [(0, 1), (2, 4)]
    assert list(bit_runs((1 << 200) - 1)) == [(0, 200)]
    assert list(bit_runs(0b1010_1000)) == [(3, 4), (5, 6), (7, 8)]


def test_signal_matrix_equals_the_sum_over_each_bits_terms():
    torch.manual_seed(0)
    values = torch.randn(40, 3, 2)
    depends = [int(torch.randint(0, 1 << 12, ()).item()) for _ in range(40)]
    matrix = signal_matrix(values, depends, 12)
    for b in range(12):
        expected = sum((v for v, d in zip(values, depends, strict=True) if d >> b & 1),
                       torch.zeros(3, 2))
        assert torch.allclose(matrix[b], expected, atol=1e-5)


# -- models ---------------------------------------------------------------------------------
def reversed_model(x):
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(a, 1.0))
    pyro.sample("x", dist.Normal(b, 0.5), obs=x)


def reversed_guide(x):
    """Draws b before a, the opposite of the model's order (as Pyro's NormalNormalNormal
    test with its guide reversed)."""
    m = pyro.param("m", torch.tensor([0.3, -0.2]))
    s = pyro.param("s", torch.tensor([0.8, 0.9]), constraint=dist.constraints.positive)
    c = pyro.param("c", torch.tensor(0.4))
    b = pyro.sample("b", NonreparameterizedNormal(m[0] + 0.1 * x, s[0]))
    pyro.sample("a", NonreparameterizedNormal(m[1] + c * b, s[1]))


def chain_model(x):
    w = pyro.param("cw", torch.tensor([0.2, 1.0]))
    with pyro.plate("batch", x.shape[0]):
        z = torch.zeros(x.shape[0])
        for t in pyro.markov(range(x.shape[1])):
            z = pyro.sample(f"z{t}", dist.Bernoulli(logits=w[0] + w[1] * z - 0.5))
            pyro.sample(f"x{t}", dist.Normal(z, 1.0), obs=x[:, t])


def chain_guide(x):
    v = pyro.param("cv", torch.tensor([0.1, 0.2, 0.3]))
    with pyro.plate("batch", x.shape[0]):
        z = torch.zeros(x.shape[0])
        for t in pyro.markov(range(x.shape[1])):
            z = pyro.sample(f"z{t}", dist.Bernoulli(logits=v[0] + v[1] * x[:, t] + v[2] * z))


def independent_model(x):
    for i in range(4):
        z = pyro.sample(f"z{i}", dist.Bernoulli(0.4))
        pyro.sample(f"x{i}", dist.Normal(z, 1.0), obs=x[i])


def independent_guide(x):
    p = pyro.param("p", torch.full((4,), 0.5), constraint=dist.constraints.unit_interval)
    for i in range(4):
        pyro.sample(f"z{i}", dist.Bernoulli(p[i]))


def nested_model(x):
    with pyro.plate("rows", 2, dim=-2):
        y = pyro.sample("y", dist.Bernoulli(0.3))
        with pyro.plate("cols", 2, dim=-1):
            z = pyro.sample("z", dist.Bernoulli(0.2 + 0.5 * y))
            pyro.sample("x", dist.Normal(z + y, 1.0), obs=x)


def nested_guide(x):
    v = pyro.param("nv", torch.tensor([0.1, 0.4, -0.2]))
    with pyro.plate("rows", 2, dim=-2):
        y = pyro.sample("y", dist.Bernoulli(logits=v[0] + v[1] * x.sum(-1, keepdim=True)))
        with pyro.plate("cols", 2, dim=-1):
            pyro.sample("z", dist.Bernoulli(logits=v[2] + x - y))


CHAIN_X = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
NEST_X = torch.tensor([[0.5, -0.3], [1.4, 2.2]])
PROGRAMS = {
    "two_layer": (two_layer_model, two_layer_guide, X, 1),
    "reversed": (reversed_model, reversed_guide, torch.tensor(1.5), 0),
    "chain": (chain_model, chain_guide, CHAIN_X, 1),
    "independent": (independent_model, independent_guide, X.repeat(2)[:4], 0),
    "nested": (nested_model, nested_guide, NEST_X, 2),
}


def pyro_dependencies(model, guide, x, nesting):
    """Pyro's provenance: the non-reparameterized guide sites each cost term depends on."""
    with TrackNonReparam():
        model_trace, guide_trace = get_importance_trace("dense", nesting, model, guide, (x,), {})
    return {
        (kind, name): set(get_provenance(node["log_prob_sum"]))
        for kind, trace in (("p", model_trace), ("q", guide_trace))
        for name, node in trace.nodes.items() if node["type"] == "sample"
        and not name.startswith(("batch", "rows", "cols"))
    }


def our_dependencies(model, guide, x, nesting):
    model_trace, guide_trace = importance_trace(model, guide, (x,), {}, nesting, track=True)
    result: dict = {}
    for site in guide_trace.nodes:
        if "dataflow_bit" not in guide_trace.nodes[site]:
            continue
        guide_terms, model_terms = downstream_sites(model_trace, guide_trace, site)
        for kind, names in (("q", guide_terms), ("p", model_terms)):
            for name in names:
                result.setdefault((kind, name), set()).add(site)
    for kind, trace in (("p", model_trace), ("q", guide_trace)):
        for name, node in trace.nodes.items():
            if "dataflow_depends" in node and (kind, name) not in result:
                result[(kind, name)] = set()
    return result


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_dependencies_equal_pyros_provenance_without_control_flow(name):
    model, guide, x, nesting = PROGRAMS[name]
    torch.manual_seed(0)
    theirs = pyro_dependencies(model, guide, x, nesting)
    torch.manual_seed(0)
    ours = our_dependencies(model, guide, x, nesting)
    assert ours == theirs


@pytest.mark.parametrize("name", ["reversed", "chain", "nested"])
def test_gradients_equal_tracegraph_elbo_under_the_same_seed(name):
    model, guide, x, nesting = PROGRAMS[name]
    ours = param_grads(ScoreFunctionELBO(max_plate_nesting=nesting), model, guide, x)
    pyro.clear_param_store()
    theirs = param_grads(TraceGraph_ELBO(max_plate_nesting=nesting), model, guide, x)
    (loss_a, ga), (loss_b, gb) = ours, theirs
    assert loss_a == pytest.approx(loss_b, rel=1e-6, abs=1e-5)
    for key in gb:
        assert torch.allclose(ga[key], gb[key], atol=1e-5), key


def test_provenance_lowers_variance_where_the_guide_draws_in_another_order():
    """Reversed order: the coupling parameter's signal drops log p(x | b), which the
    order-based rule (everything after the draw) kept. Same draws for both estimators
    here, so the ratio is not noise; Trace_ELBO (no Rao-Blackwellization) is the
    reference that keeps every term."""
    x = torch.tensor(1.5)
    n = 400
    ours = store_draws(ScoreFunctionELBO(), reversed_model, reversed_guide, x, num_draws=n)
    pyro.clear_param_store()
    whole = store_draws(Trace_ELBO(), reversed_model, reversed_guide, x, num_draws=n)
    # sd ratio of two n-draw estimates: log-sd ~ sqrt(1 / (2 (n - 1))); demand 4 of them
    margin = math.exp(-4 * math.sqrt(1 / (2 * (n - 1))))
    assert ours["c"].std() < margin * whole["c"].std()


def test_a_read_inside_a_sequential_plate_iteration_reaches_only_that_iteration():
    def model(x):
        for i in pyro.plate("data", 3):
            z = pyro.sample(f"z{i}", dist.Bernoulli(0.5))
            if z.item() == 1:
                pyro.sample(f"w{i}", dist.Normal(0.0, 1.0))
            pyro.sample(f"x{i}", dist.Normal(0.0, 1.0), obs=x[i])

    def guide(x):
        for i in pyro.plate("data", 3):
            z = pyro.sample(f"z{i}", dist.Bernoulli(0.5))
            if z.item() == 1:
                pyro.sample(f"w{i}", dist.Normal(0.0, 1.0))

    for seed in range(4):
        torch.manual_seed(seed)
        model_trace, guide_trace = importance_trace(model, guide, (X,), {}, 0, track=True)
        for i in range(3):
            guide_terms, model_terms = downstream_sites(model_trace, guide_trace, f"z{i}")
            expected = {f"z{i}"} | ({f"w{i}"} if f"w{i}" in guide_trace.nodes else set())
            assert set(guide_terms) == expected
            # x{i} ran after the read of z{i}; no term of another iteration depends on it
            assert set(model_terms) == expected | {f"x{i}"}


def test_geometric_control_flow_makes_every_later_term_depend_on_each_draw():
    def program(x):
        n = 0
        while pyro.sample(f"c{n}", dist.Bernoulli(0.6)).item() == 1 and n < 6:
            n += 1
        return n

    def model(x):
        n = program(x)
        pyro.sample("x", dist.Normal(float(n), 1.0), obs=x)

    torch.manual_seed(3)
    model_trace, guide_trace = importance_trace(model, program, (torch.tensor(2.0),), {}, 0,
                                                track=True)
    draws = [n for n in guide_trace.nodes if n.startswith("c")]
    assert len(draws) > 2
    for i, site in enumerate(draws):
        guide_terms, model_terms = downstream_sites(model_trace, guide_trace, site)
        assert list(guide_terms) == draws[i:]
        assert list(model_terms) == [*draws[i:], "x"]


@pytest.mark.parametrize("vectorize", [True, False])
def test_many_sites_at_once_equal_one_site_at_a_time(vectorize):
    x = CHAIN_X
    torch.manual_seed(0)
    particles = run_particles(chain_model, chain_guide, (x,), {}, num_particles=3,
                              vectorize=vectorize, max_plate_nesting=1, track=True)
    sites = particles.guide_latents
    together = learning_signals(particles, sites)
    for site in sites:
        alone = learning_signals(particles, [site])[site]
        assert torch.allclose(together[site], alone, atol=1e-5), site


def test_untracked_traces_are_refused_clearly():
    particles = run_particles(chain_model, chain_guide, (CHAIN_X,), {}, num_particles=1,
                              vectorize=False, max_plate_nesting=1)
    with pytest.raises(ValueError, match="without dataflow tracking"):
        learning_signals(particles, ["z0"])

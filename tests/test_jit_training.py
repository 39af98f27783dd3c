"""The compiled training step (loss, gradients, control-variate updates and the
optimizer update recorded together): step for step equal to the eager training loop
(parameters, optimizer state, control-variate state, random state), through
``ObjectiveModule.step``, ``fit`` (both routes) and ``pyro.infer.SVI`` with Pyro's
optimizers; programs and optimizers it cannot compile run eagerly with one warning."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from torch import nn

from pyro_wakesleep import MovingAverageBaseline, NeuralBaseline, ScoreFunctionELBO, fit
from pyro_wakesleep.examples.models import SigmoidBeliefNet

X = torch.bernoulli(torch.rand(8, 12, generator=torch.Generator().manual_seed(0)))
CHAIN_X = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))


class Chain(nn.Module):
    """A pyro.markov chain of Bernoulli latents, Normal emissions, amortized guide."""

    def __init__(self):
        super().__init__()
        self.trans = nn.Parameter(torch.tensor([0.1, 2.0]))
        self.w = nn.Parameter(torch.tensor([0.1, 0.2, 0.3]))

    def model(self, x):
        pyro.module("chain", self)
        with pyro.plate("batch", x.shape[0]):
            z = torch.zeros(x.shape[0])
            for t in pyro.markov(range(x.shape[1])):
                z = pyro.sample(f"z{t}", dist.Bernoulli(
                    logits=self.trans[0] + self.trans[1] * z - 1.0))
                pyro.sample(f"x{t}", dist.Normal(z, 1.0), obs=x[:, t])

    def guide(self, x):
        pyro.module("chain", self)
        w = self.w
        with pyro.plate("batch", x.shape[0]):
            z = torch.zeros(x.shape[0])
            for t in pyro.markov(range(x.shape[1])):
                z = pyro.sample(f"z{t}", dist.Bernoulli(logits=w[0] + w[1] * x[:, t] + w[2] * z))


class Geometric(nn.Module):
    """Stochastic control flow through Python: cannot be recorded."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(0.0))
        self.q = nn.Parameter(torch.tensor(-0.4))

    def model(self, x):
        pyro.module("geometric", self)
        n = 0
        while pyro.sample(f"b{n}", dist.Bernoulli(logits=self.p)).item() == 1 and n < 5:
            n += 1
        pyro.sample("x", dist.Normal(float(n), 1.0), obs=x.sum())

    def guide(self, x):
        pyro.module("geometric", self)
        n = 0
        while pyro.sample(f"b{n}", dist.Bernoulli(logits=self.q)).item() == 1 and n < 5:
            n += 1


class Program:
    """A model, guide and data, with a fresh objective per run."""

    def __init__(self, name):
        self.name = name

    def build(self, jit, compile=False):
        options = {"compile": compile}
        pyro.set_rng_seed(0)  # the same initial weights
        if self.name == "sbn":
            net = SigmoidBeliefNet((12, 4), name="sbn_training")
            objective = ScoreFunctionELBO(2, MovingAverageBaseline(), max_plate_nesting=1,
                                          jit=jit, jit_options=options)
            return objective, net.model, net.guide, X, net
        if self.name == "nvil":
            net = SigmoidBeliefNet((12, 4), name="sbn_nvil")
            baseline = NeuralBaseline(nn.Sequential(nn.Linear(12, 3), nn.Tanh(),
                                                    nn.Linear(3, 1)))
            objective = ScoreFunctionELBO(1, baseline, max_plate_nesting=1, jit=jit,
                                          jit_options=options)
            return objective, net.model, net.guide, X, net
        if self.name == "chain":
            objective = ScoreFunctionELBO(1, MovingAverageBaseline(), max_plate_nesting=1,
                                          jit=jit, jit_options=options)
            chain = Chain()
            return objective, chain.model, chain.guide, CHAIN_X, chain
        objective = ScoreFunctionELBO(1, max_plate_nesting=0, jit=jit,
                                      vectorize_particles=False, jit_options=options)
        geometric = Geometric()
        return objective, geometric.model, geometric.guide, torch.ones(2), geometric


PROGRAMS = ["sbn", "nvil", "chain"]


def snapshot(objective, optimizer_state):
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    state = {k: v.clone() for k, v in objective.state_dict().items()}
    return params, state, optimizer_state, torch.get_rng_state()


def assert_same(a, b, exact=True):
    kwargs = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-5}
    for x, y in zip(a[:2], b[:2], strict=True):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], **kwargs, msg=k)
    torch.testing.assert_close(a[2], b[2], **kwargs)
    assert torch.equal(a[3], b[3])


def module_run(program, jit, optimizer_class=torch.optim.Adam, steps=7, compile=False,
               **optimizer_args):
    """Losses and state after every step of ``ObjectiveModule.step``."""
    pyro.clear_param_store()
    objective, model, guide, x, _ = program.build(jit, compile)
    loss_module = objective(model, guide)
    loss_module.initialize(x)
    optimizer = optimizer_class(loss_module.parameters(), **optimizer_args)
    pyro.set_rng_seed(4)
    trail = []
    for _ in range(steps):
        loss = loss_module.step(optimizer, x)
        trail.append((float(loss), snapshot(objective, optimizer.state_dict()["state"])))
    return objective, trail, optimizer


def svi_run(program, jit, steps=7, optim=None):
    pyro.clear_param_store()
    objective, model, guide, x, _ = program.build(jit)
    svi = SVI(model, guide, optim or pyro.optim.Adam({"lr": 0.05}), objective)
    pyro.set_rng_seed(5)
    trail = []
    for _ in range(steps):
        loss = svi.step(x)
        trail.append((loss, snapshot(objective, svi.optim.get_state())))
    return objective, trail, svi


def compare(eager, compiled, exact=True):
    assert len(eager) == len(compiled)
    for (loss_a, a), (loss_b, b) in zip(eager, compiled, strict=True):
        assert loss_a == pytest.approx(loss_b, rel=0 if exact else 1e-4)
        assert_same(a, b, exact)


def training_graphs(objective):
    return [g for step in objective.compiled._training.values() for g in step.graphs.values()]


@pytest.mark.parametrize("name", PROGRAMS)
def test_module_route_step_equals_the_eager_loop(name):
    _, eager, _ = module_run(Program(name), False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        objective, compiled, _ = module_run(Program(name), True)
    compare(eager, compiled)
    (graph,) = training_graphs(objective)
    assert graph.replays == 5  # steps 3-7: one recorded training step replayed


@pytest.mark.parametrize("name", PROGRAMS)
def test_svi_with_pyro_optimizers_equals_eager_svi(name):
    _, eager, _ = svi_run(Program(name), False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        objective, compiled, svi = svi_run(Program(name), True)
    compare(eager, compiled)
    (graph,) = training_graphs(objective)
    assert graph.replays == 5
    # the optimizer state is Pyro's: one torch optimizer per parameter, saved as usual
    assert set(svi.optim.get_state()) == set(pyro.get_param_store().keys())


@pytest.mark.parametrize("optimizer_class, options", [
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    (torch.optim.SGD, {"lr": 0.05}),
    (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True}),
    (torch.optim.Adam, {"lr": 0.05, "weight_decay": 0.1, "maximize": True}),
])
def test_other_torch_optimizers_equal_eager(optimizer_class, options):
    _, eager, _ = module_run(Program("sbn"), False, optimizer_class, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        objective, compiled, _ = module_run(Program("sbn"), True, optimizer_class, **options)
    compare(eager, compiled)
    assert training_graphs(objective)[0].replays == 5


def test_an_optimizer_without_a_compiled_update_runs_it_eagerly_with_one_warning():
    _, eager, _ = module_run(Program("sbn"), False, torch.optim.RMSprop, lr=0.01)
    with pytest.warns(RuntimeWarning, match="RMSprop has no compiled update") as record:
        objective, compiled, _ = module_run(Program("sbn"), True, torch.optim.RMSprop, lr=0.01)
    assert len([w for w in record if "RMSprop" in str(w.message)]) == 1
    compare(eager, compiled)
    assert not training_graphs(objective)
    assert len(objective.compiled.graphs) == 1  # the loss step stays compiled


def test_stochastic_control_flow_falls_back_to_the_eager_step_with_one_warning():
    program = Program("geometric")
    _, eager, _ = module_run(program, False)
    with pytest.warns(RuntimeWarning, match="reads a value out of a tensor") as record:
        objective, compiled, _ = module_run(program, True)
    assert len([w for w in record if "jit=True" in str(w.message)]) == 1
    compare(eager, compiled)
    assert not training_graphs(objective) and not objective.compiled.graphs


def test_a_scheduler_changes_the_learning_rate_of_the_replayed_update():
    runs = []
    for jit in (False, True):
        pyro.clear_param_store()
        objective, model, guide, x, _ = Program("sbn").build(jit)
        loss_module = objective(model, guide)
        loss_module.initialize(x)
        optimizer = torch.optim.Adam(loss_module.parameters(), lr=0.05)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)
        pyro.set_rng_seed(6)
        history = fit(loss_module, (x,), 8, optimizer=optimizer, scheduler=scheduler,
                      progress=False)
        runs.append((history.losses, snapshot(objective, optimizer.state_dict()["state"])))
    assert runs[0][0] == runs[1][0]
    assert_same(runs[0][1], runs[1][1])
    assert training_graphs(objective)[0].replays == 6


def test_fit_with_svi_reaches_the_compiled_step():
    runs = []
    for jit in (False, True):
        pyro.clear_param_store()
        objective, model, guide, x, _ = Program("nvil").build(jit)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), objective)
        pyro.set_rng_seed(7)
        history = fit(svi, (x,), 8, progress=False)
        runs.append((history.losses, snapshot(objective, svi.optim.get_state())))
    assert runs[0][0] == runs[1][0]
    assert_same(runs[0][1], runs[1][1])
    assert training_graphs(objective)[0].replays == 6


def test_a_non_finite_step_changes_nothing_and_raises_the_eager_error():
    pyro.clear_param_store()
    objective, model, guide, x, _ = Program("chain").build(True)
    loss_module = objective(model, guide)
    loss_module.initialize(x)
    optimizer = torch.optim.Adam(loss_module.parameters(), lr=0.05)
    for _ in range(4):
        loss_module.step(optimizer, x)
    assert training_graphs(objective)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    state = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="invalid values"):
        loss_module.step(optimizer, bad)
    for k, v in pyro.get_param_store().items():
        assert torch.equal(v, before[k])
    for k, v in optimizer.state_dict()["state"][0].items():
        assert torch.equal(v, state[k])


def test_a_changed_global_is_caught_by_verification():
    scale = {"value": 1.0}

    def model(x):
        w = pyro.param("w", torch.tensor(0.3))
        with pyro.plate("n", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(logits=w.expand(x.shape[0])))
            pyro.sample("x", dist.Normal(z * scale["value"], 1.0), obs=x)

    def guide(x):
        v = pyro.param("v", torch.tensor(0.1))
        with pyro.plate("n", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=v.expand(x.shape[0])))

    pyro.clear_param_store()
    objective = ScoreFunctionELBO(max_plate_nesting=1, jit=True)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), objective)
    x = torch.randn(5)
    for _ in range(4):
        svi.step(x)
    scale["value"] = 3.0  # a global the recorded graph baked in
    with pytest.warns(RuntimeWarning, match="training step differs from the eager step"):
        for _ in range(5):
            svi.step(x)
    assert not training_graphs(objective)


def test_torch_compile_option_equals_eager_to_rounding():
    _, eager, _ = module_run(Program("sbn"), False, steps=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        objective, compiled, _ = module_run(Program("sbn"), True, steps=7, compile=True)
    compare(eager, compiled, exact=False)
    # inductor is reached without Dynamo, which would turn torch.distributions'
    # argument validation off for the whole process (a new signature)
    assert torch.distributions.Distribution._validate_args
    assert sum(g.replays for g in training_graphs(objective)) >= 5

"""The compiled path is never silently wrong (issue 25): on ordinary programs unlike the
benchmark models, 6 SVI steps with Adam under one seed give the same losses, parameters,
gradients and state with ``jit=True`` as eagerly; where the compiled path cannot replay
a step exactly it runs eagerly with one warning naming the cause and the user's line.

One test per numbered case of the issue.
"""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from torch import nn

from pyro_wakesleep import MovingAverageBaseline, NeuralBaseline, ScoreFunctionELBO

X = torch.tensor([0.3, -1.2, 2.5, 0.7])
HERE = "test_jit_trust.py"


def train(model, guide, make_objective, steps=6, args=lambda i: (X,), between=None,
          seed=0, modules=()):
    """``steps`` SVI steps (Adam) from one seed, eager and compiled; returns both runs'
    losses, parameters, last gradients, buffers of ``modules`` and objective state, the
    compiled objective and the RuntimeWarnings it raised."""
    runs = []
    for jit in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        for module in modules:  # the same initial weights and statistics
            for p in module.parameters():
                nn.init.normal_(p, 0.0, 0.3)
            for b in module.buffers():
                b.zero_() if b.dtype != torch.float32 or b.dim() == 0 else b.fill_(
                    1.0 if "var" in str(b) else 0.0)
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
        objective = make_objective(jit)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), objective)
        losses = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(steps):
                if between is not None:
                    between(i, objective)
                losses.append(svi.step(*args(i)))
        store = pyro.get_param_store()
        params = {k: v.detach().clone() for k, v in store.items()}
        grads = {k: store.get_param(k).unconstrained().grad.clone() for k in store
                 if store.get_param(k).unconstrained().grad is not None}
        buffers = {f"{i}.{k}": v.clone() for i, m in enumerate(modules)
                   for k, v in m.named_buffers()}
        state = {k: v.clone() for k, v in objective.state_dict().items()}
        warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        runs.append((losses, params, grads, buffers, state, objective, warned))
    return runs


def assert_same(runs):
    (losses, params, grads, buffers, state, _, _), compiled = runs[0], runs[1]
    assert compiled[0] == pytest.approx(losses, rel=1e-6, abs=1e-6)
    for expected, got in zip((params, grads, buffers, state), compiled[1:5], strict=True):
        assert expected.keys() == got.keys()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)


def warned_once(runs, *words):
    warned = runs[1][6]
    assert len(warned) == 1, warned
    for word in words:
        assert word in warned[0], warned[0]
    assert "eagerly" in warned[0]
    return warned[0]


def compiled_silently(runs, graphs=1):
    assert runs[1][6] == [], runs[1][6]
    assert len(runs[1][5].compiled.graphs) == graphs


def sf(**options):
    return lambda jit: ScoreFunctionELBO(jit=jit, **options)


# -- 1. reads of tensors into Python, by every route ---------------------------------
READS = {
    "tolist": lambda z: z.tolist() == 1.0,
    "numpy": lambda z: z.numpy() == 1.0,
    "array": lambda z: __import__("numpy").asarray(z) == 1.0,
    "int": lambda z: int(z) == 1,
    "float": lambda z: float(z) == 1.0,
    "index": lambda z: [False, True][z.long()],
    "iteration": lambda z: next(iter(z.reshape(1))) == 1,
}


@pytest.mark.parametrize("read", sorted(READS))
def test_1_a_branch_on_a_draw_read_into_python_runs_eagerly(read):
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        z = pyro.sample("z", dist.Bernoulli(0.5))
        mean = loc + 3.0 if READS[read](z) else loc - 3.0
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mean, 1.0), obs=x)

    def guide(x):
        p = pyro.param("p", torch.tensor(0.5), constraint=dist.constraints.unit_interval)
        pyro.sample("z", dist.Bernoulli(p))

    runs = train(model, guide, sf())
    assert_same(runs)
    warned_once(runs, "reads a value out of a tensor", HERE)


def test_1_a_branch_on_data_read_with_tolist_runs_eagerly():
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        shift = 2.0 if x.sum().tolist() > 0 else -2.0
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc + shift, 1.0), obs=x)

    def guide(x):
        pass

    runs = train(model, guide, sf(), args=lambda i: (X * (-1) ** i,))
    assert_same(runs)
    warned_once(runs, "Tensor.tolist", HERE)


# -- 2. BatchNorm in train mode: its statistics threaded as state ----------------------
class BNGuide(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x):
        pyro.module("bn_guide", self)
        logits = self.net(x.unsqueeze(-1)).squeeze(-1)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(logits=logits))


def mixture_model(x):
    loc = pyro.param("loc", torch.tensor(1.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(loc * (2 * z - 1), 1.0), obs=x)


def test_2_batchnorm_statistics_move_as_eagerly():
    guide = BNGuide()
    runs = train(mixture_model, guide, sf(), modules=[guide])
    assert_same(runs)
    compiled_silently(runs)
    assert int(guide.net[1].num_batches_tracked) == 6


# -- 3. module.eval() / .train() after recording ---------------------------------------
class DropoutGuide(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.5), nn.Linear(8, 1))

    def forward(self, x):
        pyro.module("drop_guide", self)
        logits = self.net(x.unsqueeze(-1)).squeeze(-1)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(logits=logits))


def test_3_switching_train_and_eval_after_recording_is_a_new_signature():
    guide = DropoutGuide()
    runs = train(mixture_model, guide, sf(), steps=8, modules=[guide],
                 between=lambda i, _: guide.train(i < 4))
    assert_same(runs)
    compiled_silently(runs, graphs=2)


# -- 4. a user torch.Generator --------------------------------------------------------
def test_4_a_user_generator_runs_eagerly_and_advances_as_eagerly():
    states = []
    generator = torch.Generator()

    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        noise = torch.randn(len(x), generator=generator) * 0.1
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc + noise, 1.0), obs=x)

    def guide(x):
        pass

    def reset(i, _):
        if i == 0:
            generator.manual_seed(3)
        if i == 5:
            states.append(generator.get_state())

    runs = train(model, guide, sf(), between=reset)
    assert_same(runs)
    warned_once(runs, "torch.Generator", HERE)
    assert torch.equal(states[0], states[1])


# -- 5. a custom autograd Function ----------------------------------------------------
class StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_5_a_custom_autograd_function_runs_eagerly_with_its_backward():
    def model(x):
        w = pyro.param("w", torch.tensor(0.3))
        gate = StraightThrough.apply(w)
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(gate * w, 1.0), obs=x)

    def guide(x):
        pass

    runs = train(model, guide, sf())
    assert_same(runs)
    warned_once(runs, "StraightThrough", HERE)


# -- 6. boolean-mask indexing ---------------------------------------------------------
def test_6_boolean_mask_indexing_runs_eagerly():
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        positive = x[x > 0]
        with pyro.plate("data", len(positive)):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=positive)

    def guide(x):
        pass

    runs = train(model, guide, sf(), args=lambda i: (X * (-1) ** (i // 3),))
    assert_same(runs)
    warned_once(runs, "__getitem__", HERE)


# -- 7. a refused recording changes nothing (NeuralBaseline under Adam) ----------------
def test_7_a_refused_recording_puts_no_parameter_into_the_optimizer():
    def model(x):
        a = pyro.param("a", torch.tensor(0.3))
        z = pyro.sample("z", dist.Bernoulli(logits=a))
        if z.item() == 1:
            pyro.sample("y", dist.Bernoulli(logits=a))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        b = pyro.param("b", torch.tensor(-0.2))
        z = pyro.sample("z", dist.Bernoulli(logits=b))
        if z.item() == 1:
            pyro.sample("y", dist.Bernoulli(logits=b))

    def make(jit):
        torch.manual_seed(0)
        net = nn.Linear(1, 1)
        return ScoreFunctionELBO(control_variate=NeuralBaseline(net, input=lambda x: x[None]),
                                 jit=jit)

    runs = train(model, guide, make, steps=8, args=lambda i: (torch.tensor(1.5),))
    assert_same(runs)
    warned_once(runs, "reads a value out of a tensor", HERE)


# -- 8. control variates switched to eval after recording ----------------------------
def test_8_control_variates_eval_after_recording_freezes_the_average():
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(loc + z, 1.0), obs=x)

    def guide(x):
        logits = pyro.param("logits", torch.zeros(len(x)))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(logits=logits))

    def switch(i, objective):
        objective.control_variates.train(i < 4)

    runs = train(model, guide, sf(control_variate=MovingAverageBaseline(0.8)), between=switch)
    assert_same(runs)
    compiled_silently(runs, graphs=2)


# -- 9. objective settings changed after recording ------------------------------------
def test_9_num_particles_changed_after_recording_is_a_new_signature():
    def set_particles(i, objective):
        objective.num_particles = 2 if i < 3 else 5

    def guide(x):
        logits = pyro.param("logits", torch.zeros(len(x)))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(logits=logits))

    runs = train(mixture_model, guide, sf(num_particles=2, max_plate_nesting=1),
                 steps=8, between=set_particles)
    assert_same(runs)
    compiled_silently(runs, graphs=2)


# -- 10. a global read by the model and reassigned: verification catches it -------------
ANNEAL = 1.0


def annealed_model(x):
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", len(x)), pyro.poutine.scale(scale=ANNEAL):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def test_10_a_changed_global_is_caught_by_verification():
    def anneal(i, _):
        global ANNEAL
        ANNEAL = 1.0 if i < 4 else 0.5  # step 5 is replay 4: verified

    runs = train(annealed_model, lambda x: None, sf(), between=anneal)
    assert_same(runs)
    message = warned_once(runs, "differs from the eager step", "the loss")
    # SVI's step is the compiled training step from step 3: it names the parameter
    assert "gradient of 'loc'" in message or "parameter 'loc'" in message


def test_verification_can_be_turned_off_and_its_schedule_set():
    calls = []
    from pyro_wakesleep.compiled import step as step_module
    original = step_module.verify

    def counting(*args, **kwargs):
        calls.append(args[1].replays)
        return original(*args, **kwargs)

    from pyro_wakesleep.compiled import training as training_module
    original_training = training_module.TrainingStep._verify

    def counting_training(self, key, graph, *args, **kwargs):  # SVI's training step
        calls.append(graph.loss.replays)
        return original_training(self, key, graph, *args, **kwargs)

    step_module.verify = counting
    training_module.TrainingStep._verify = counting_training
    try:
        for option, expected in ((True, [1, 2, 4, 8]), (3, [1, 3, 6, 9]), (False, [])):
            calls.clear()
            train(annealed_model, lambda x: None, sf(jit_options={"verify": option}),
                  steps=11)
            assert calls == expected, option  # the eager run verifies nothing
    finally:
        step_module.verify = original
        training_module.TrainingStep._verify = original_training


# -- 11. reparameterized Beta / Dirichlet ---------------------------------------------
@pytest.mark.parametrize("family", ["Beta", "Dirichlet"])
def test_11_reparameterized_beta_and_dirichlet_run_eagerly(family):
    def model(x):
        if family == "Beta":
            p = pyro.sample("p", dist.Beta(2.0, 2.0))
        else:
            p = pyro.sample("p", dist.Dirichlet(torch.ones(2)))[0]
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(p, 1.0), obs=x)

    def guide(x):
        c = pyro.param("c", torch.ones(2), constraint=dist.constraints.positive)
        if family == "Beta":
            pyro.sample("p", dist.Beta(c[0], c[1]))
        else:
            pyro.sample("p", dist.Dirichlet(c))

    runs = train(model, guide, sf())
    assert_same(runs)
    warned_once(runs, "custom torch.autograd.Function", "Dirichlet")


# -- 12. a cleared param store --------------------------------------------------------
def test_12_a_cleared_param_store_records_again():
    guide = BNGuide()
    results = []
    for jit in (False, True):
        torch.manual_seed(1)
        guide = BNGuide()
        objective = ScoreFunctionELBO(jit=jit)
        losses = []
        for _ in range(2):  # the notebook pattern: clear, train again, same objective
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            svi = SVI(mixture_model, guide, pyro.optim.Adam({"lr": 0.05}), objective)
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                losses += [svi.step(X) for _ in range(4)]
        results.append((losses, {k: v.detach().clone()
                                 for k, v in pyro.get_param_store().items()}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for k, v in results[0][1].items():
        torch.testing.assert_close(results[1][1][k], v, rtol=1e-6, atol=1e-7)
    assert len(objective.compiled.graphs) == 1


# -- 13. validation on replay ---------------------------------------------------------
def test_13_a_replay_makes_the_eager_validation_checks():
    def model(x):
        p = pyro.param("p", torch.tensor(0.5), constraint=dist.constraints.unit_interval)
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Bernoulli(p), obs=x)

    def guide(x):
        pass

    good, bad = torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.0, 2.0, 1.0])
    errors = []
    with pyro.validation_enabled(True):
        for jit in (False, True):
            pyro.clear_param_store()
            objective = ScoreFunctionELBO(jit=jit)
            for _ in range(4):
                objective.differentiable_loss(model, guide, good)
            with pytest.raises(ValueError) as error:
                objective.differentiable_loss(model, guide, bad)
            errors.append(str(error.value))
    assert len(objective.compiled.graphs) == 1
    assert errors[1] == errors[0]


# -- 14. a float argument (annealing factor) is a graph input -----------------------
def test_14_a_float_argument_compiles_once():
    def model(x, beta):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("x", dist.Normal(z * beta, 1.0), obs=x)

    def guide(x, beta):
        scale = pyro.param("scale", torch.ones(len(x)), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.5 * beta, scale))

    runs = train(model, guide, sf(), steps=8, args=lambda i: (X, 0.1 * (i + 1)))
    assert_same(runs)
    compiled_silently(runs)


def test_14_a_float_read_into_python_is_keyed_by_value():
    def model(x, n):
        loc = pyro.param("loc", torch.tensor(0.0))
        for i in range(n):
            pyro.sample(f"x{i}", dist.Normal(loc, 1.0), obs=x[i])

    runs = train(model, lambda x, n: None, sf(), steps=6, args=lambda i: (X, 3))
    assert_same(runs)
    compiled_silently(runs)  # keyed by value: eager, eager, recorded, replayed

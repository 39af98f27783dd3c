"""Shared checks for the estimator tests: gradients under a seed, exact gradients (by
``TraceEnum_ELBO`` or by enumerating every latent configuration), many-draw estimates and
the assertion that an estimate lies within ``z`` standard errors of the exact value."""

import itertools
import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate


# -- gradients ----------------------------------------------------------------------------
def flat_grad(value, params):
    """The gradient of ``value`` with respect to ``params``, flattened and concatenated."""
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, params)])


def params_of(inits):
    """Creates the params ``{name: init}`` in the param store; returns their unconstrained
    leaf tensors, in order."""
    return [pyro.param(name, init).unconstrained() for name, init in inits.items()]


def param_grads(objective, model, guide, *args, seed=0, **kwargs):
    """``(loss, {name: grad})``: one ``loss_and_grads`` call under ``seed``, with the
    gradient of every (unconstrained) parameter in the param store, which is then zeroed."""
    store = pyro.get_param_store()
    for name in store:
        store[name].unconstrained().grad = None
    pyro.set_rng_seed(seed)
    loss = objective.loss_and_grads(model, guide, *args, **kwargs)
    out = {}
    for name in sorted(store.keys()):
        p = store[name].unconstrained()
        out[name] = p.grad.clone()
        p.grad = None
    return loss, out


# -- exact gradients ----------------------------------------------------------------------
def enum_grads(model, guide, *args, max_plate_nesting=1):
    """The exact gradient of -ELBO by ``TraceEnum_ELBO``, the guide's discrete sites
    enumerated in parallel: ``{name: grad}`` over the param store."""
    elbo = TraceEnum_ELBO(max_plate_nesting=max_plate_nesting)
    _, grads = param_grads(elbo, model, config_enumerate(guide, "parallel"), *args)
    return grads


def log_density(fn, data, *args):
    """The log-density of ``fn`` at the values ``data`` of its sample sites, summed over
    the sites and kept per element of their batch shape."""
    trace = poutine.trace(poutine.condition(fn, data=data)).get_trace(*args)
    trace.compute_log_prob()
    return sum(site["log_prob"] for site in trace.nodes.values() if site["type"] == "sample")


def exact_iwae(model, guide, xs, configs, k=1, alpha=0.0, sampler=None):
    """E[(1/(1-alpha)) log (1/K) sum_k w_k^(1-alpha)] summed over the datapoints ``xs``,
    by enumerating every K-tuple of joint latent configurations (``configs``: site name
    -> list of its values; all joint values are placed side by side in the data plate).
    K = 1: the ELBO; alpha = 0: the IWAE bound. With ``sampler``, the draws come from it
    (e.g. the guide without its masks) instead of from ``guide``."""
    names = list(configs)
    joint = list(itertools.product(*(configs[n] for n in names)))
    data = {n: torch.stack([c[i] for c in joint]) for i, n in enumerate(names)}
    tuples = torch.tensor(list(itertools.product(range(len(joint)), repeat=k)))
    total = 0.0
    for x in xs:
        xx = x.expand(len(joint))
        log_p, log_q = log_density(model, data, xx), log_density(guide, data, xx)
        log_sampler = log_density(sampler or guide, data, xx)
        lw = (1 - alpha) * (log_p - log_q)[tuples]
        prob = log_sampler[tuples].sum(-1).exp()
        bound = torch.logsumexp(lw, -1) - math.log(k)
        total = total + (prob * (bound / (1 - alpha))).sum()
    return total


# -- many draws -----------------------------------------------------------------------------
def draws(objective, model, guide, params, *args, num_draws=20, seed=100):
    """``num_draws`` independent flat gradients of ``differentiable_loss`` with respect to
    ``params``, draw ``i`` under seed ``seed + i``: a ``(num_draws, dim)`` tensor."""
    out = []
    for i in range(num_draws):
        pyro.set_rng_seed(seed + i)
        out.append(flat_grad(objective.differentiable_loss(model, guide, *args), params))
    return torch.stack(out)


def store_draws(objective, model, guide, *args, num_draws, seed=1000, factors=None):
    """``num_draws`` independent ``loss_and_grads`` gradients over the param store, draw
    ``i`` under seed ``seed + i``: ``{name: (num_draws, *shape) tensor}``. ``factors()``,
    if given, is called before each draw and returns ``{name: factor}`` by which that
    draw's gradients are multiplied."""
    out = {}
    for i in range(num_draws):
        scale = factors() if factors else {}
        _, grads = param_grads(objective, model, guide, *args, seed=seed + i)
        for name, g in grads.items():
            out.setdefault(name, []).append(g * scale[name] if name in scale else g)
    return {name: torch.stack(g) for name, g in out.items()}


def mean_and_se(samples):
    """The mean of ``samples`` along dim 0 and its standard error."""
    return samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])


# -- assertions ---------------------------------------------------------------------------
def assert_within(mean, se, exact, z, atol=0.0, positive_se=False, name=None):
    """Every coordinate of ``mean`` within ``z * se + atol`` of ``exact``; with
    ``positive_se``, every standard error must be positive (so the check has content)."""
    if positive_se:
        assert torch.all(se > 0), (name, se)
    assert torch.all((mean - exact).abs() <= z * se + atol), (name, mean, exact, se)


def assert_unbiased(samples, exact, z=4.0, atol=0.0, positive_se=False):
    """The mean of the draws ``samples`` (a tensor, or a dict of them keyed like
    ``exact``) within ``z`` standard errors (plus ``atol``) of ``exact``, coordinatewise.
    Returns the standard error (or a dict of them)."""
    if isinstance(exact, dict):
        return {
            name: assert_unbiased(samples[name], value, z, atol, positive_se)
            for name, value in exact.items()
        }
    mean, se = mean_and_se(samples)
    assert_within(mean, se, exact, z, atol, positive_se)
    return se


# -- the one path ---------------------------------------------------------------------------
def assert_one_path(objective, model, guide, *args, seed=7, **kwargs):
    """``loss``, ``differentiable_loss`` and ``loss_and_grads``, each under ``seed``, agree
    in value; the first and last return floats, the second a tensor with a gradient."""
    values = []
    for method in (objective.loss, objective.differentiable_loss, objective.loss_and_grads):
        pyro.set_rng_seed(seed)
        values.append(method(model, guide, *args, **kwargs))
    loss, differentiable, returned = values
    assert isinstance(loss, float) and isinstance(returned, float), values
    assert isinstance(differentiable, torch.Tensor) and differentiable.requires_grad
    assert loss == pytest.approx(differentiable.item()) == pytest.approx(returned)


def assert_jit_runs_eagerly(compiled, eager, model, guide, params, *args, exact=True):
    """An objective whose step differentiates inside itself under ``jit=True``: the call
    that would record warns once and every step equals the eager objective's under the
    same seed (bit for bit with ``exact``, else to ``allclose``); no graph is kept."""
    for step in range(3):
        grads = []
        for objective in (compiled, eager):
            pyro.set_rng_seed(2 + step)
            if objective is compiled and step == 1:  # the call that would record
                with pytest.warns(RuntimeWarning, match="differentiates inside itself"):
                    loss = objective.differentiable_loss(model, guide, *args)
            else:
                loss = objective.differentiable_loss(model, guide, *args)
            grads.append(flat_grad(loss, params))
        assert torch.equal(*grads) if exact else torch.allclose(*grads)
    assert not compiled.compiled.graphs


def assert_jit_steps_equal_eager(program, make_objective, *args, steps=3, param="a"):
    """Runs ``steps`` SVI steps (Adam, seed 1) of ``program() -> (model, guide)`` with
    ``make_objective(jit)`` eagerly and compiled, and asserts a graph was recorded and the
    losses and the parameter ``param`` agree."""
    import warnings

    results = []
    for jit in (False, True):
        pyro.clear_param_store()
        model, guide = program()
        objective = make_objective(jit)
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), objective)
        pyro.set_rng_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            losses = [svi.step(*args) for _ in range(steps)]
        results.append((losses, pyro.param(param).detach().clone()))
    assert objective.compiled is not None and objective.compiled.graphs
    (eager, value), (compiled, value_jit) = results
    assert compiled == pytest.approx(eager, rel=1e-5)
    torch.testing.assert_close(value_jit, value, rtol=1e-5, atol=1e-6)

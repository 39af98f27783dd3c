"""The acceptance matrix of issue 10: every objective on each kind of real Pyro program,
each cell either *exact* (the mean of many draws of the loss and of the gradient within
``Z`` standard errors of the exact value, from enumeration of every discrete
configuration, an analytic formula, or a low-variance pathwise reference) or *a clear
error* (``ValueError``/``TypeError`` naming the site or the reason).

What "exact" means per objective:

- score-function (``sf*``), antithetic (``disarm``, ``arm``) and relaxation control
  variate (``rebar``, ``relax``, ``relax_nosignal``: RELAX without the relaxed signal
  term, the one that takes Categorical index sites) objectives: loss and gradient of
  every parameter are those of the negative ELBO;
- ``vimco``: loss and every gradient are those of the negative K-sample IWAE bound;
- ``ws`` (wake-sleep): loss is the negative ELBO and the model-parameter (theta)
  gradient is that of the negative ELBO (E_q[-grad log p]); its guide gradient is the
  sleep phase's, which is no ELBO gradient by design;
- ``rws``/``rws_sleep`` (reweighted wake-sleep): loss is the negative K-sample IWAE bound
  and the theta gradient is its gradient (q does not depend on theta, so the wake-theta
  gradient is unbiased for the gradient of the K-sample bound at every K).

The matrix itself is ``MATRIX`` (program x objective -> "exact" or the expected error);
``test_print_matrix`` prints it (``pytest -s``).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from checks import mean_and_se, param_grads
from pyro.infer import TraceGraph_ELBO
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroModule, PyroParam
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
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

Z = 4.5  # standard errors allowed between a many-draw mean and the exact value
ATOL = 1e-4  # for coordinates whose estimate has no variance (e.g. pathwise and exact)
FALLBACK = "could not run vectorized"


# -- objectives ---------------------------------------------------------------------------
class _Constant(nn.Module):
    """A learned constant, the smallest NVIL baseline network."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c


def _no_input(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.zeros(())


class _Surrogate(nn.Module):
    """A RELAX surrogate that is far from zero (RelaxELBO's default starts at zero, which
    without the relaxed signal would make the control variate vanish and the cell plain
    REINFORCE): ``r(v) = w * sum_k (k + 1) cos(2 v_k)`` of the relaxed sample ``v``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.w * (torch.arange(1, v.shape[-1] + 1).to(v) * torch.cos(2.0 * v)).sum(-1)


#: name -> (factory of (K, keyword options), what its loss and gradients estimate). For
#: objectives that estimate the ELBO (and wake-sleep) K is free: the matrix uses many
#: particles per draw, which costs little when they are vectorized; VIMCO's and RWS's
#: bound depends on K, so theirs is fixed at 3.
OBJECTIVES: dict[str, tuple[Callable[..., Any], str]] = {
    "sf": (lambda k, **kw: ScoreFunctionELBO(k, **kw), "elbo"),
    "sf_force": (lambda k, **kw: ScoreFunctionELBO(k, force_score_function=True, **kw), "elbo"),
    "sf_ma": (lambda k, **kw: ScoreFunctionELBO(k, MovingAverageBaseline(), **kw), "elbo"),
    "sf_nvil": (lambda k, **kw: ScoreFunctionELBO(
        k, NeuralBaseline(_Constant(), input=_no_input, normalize_variance=False), **kw),
        "elbo"),
    "sf_loo": (lambda k, **kw: ScoreFunctionELBO(k, LeaveOneOutBaseline(), **kw), "elbo"),
    "vimco": (lambda k, **kw: VimcoELBO(3, **kw), "iwae"),
    "disarm": (lambda k, **kw: DisarmELBO(k, **kw), "elbo"),
    "arm": (lambda k, **kw: DisarmELBO(k, estimator="arm", **kw), "elbo"),
    "ws": (lambda k, **kw: WakeSleepELBO(k, **kw), "ws"),
    "rws": (lambda k, **kw: ReweightedWakeSleepELBO(3, **kw), "rws"),
    "rws_sleep": (lambda k, **kw: ReweightedWakeSleepELBO(3, insomnia=0.5, **kw), "rws"),
    "rebar": (lambda k, **kw: RebarELBO(k, **kw), "elbo"),
    "relax": (lambda k, **kw: RelaxELBO(k, **kw), "elbo"),
    "relax_nosignal": (lambda k, **kw: RelaxELBO(
        k, relaxed_signal=False, surrogate=_Surrogate(), **kw), "elbo"),
}
IWAE_K = 3


# -- exact values by enumeration ----------------------------------------------------------
class _Escape(Exception):
    def __init__(self, msg: dict) -> None:
        super().__init__(msg["name"])
        self.msg = msg


class _Enumerate(Messenger):
    """Puts the values ``prefix`` at the guide's latent sites and escapes (raises
    ``_Escape``) at the first latent site it has no value for."""

    def __init__(self, prefix: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.prefix = prefix

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"] or site_is_subsample(msg):
            return
        if msg["name"] not in self.prefix:
            raise _Escape(msg)
        msg["value"] = self.prefix[msg["name"]]
        msg["done"] = True


def _values(msg: dict, supports: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every joint value of a discrete site: the product of its support over the
    elements of its batch shape (all elements of a plate, not just equal ones)."""
    fn = msg["fn"]
    batch, event = fn.batch_shape, fn.event_shape
    if msg["name"] in supports:
        support = supports[msg["name"]].reshape(-1, *event)
    elif fn.has_enumerate_support:
        support = fn.enumerate_support(expand=False).reshape(-1, *event)
    else:
        raise ValueError(f"cannot enumerate site {msg['name']!r} ({type(fn).__name__})")
    count = math.prod(batch)
    return [support[torch.tensor(c, dtype=torch.long)].reshape(batch + event)
            for c in itertools.product(range(len(support)), repeat=count)]


def _guide_traces(guide, args, kwargs, supports):
    """A trace of the guide for every joint configuration of its latent sites (whose
    structure may depend on earlier values: stochastic control flow)."""
    traces, queue = [], [{}]
    while queue:
        prefix = queue.pop()
        try:
            trace = poutine.trace(_Enumerate(prefix)(guide)).get_trace(*args, **kwargs)
        except _Escape as escape:
            queue.extend({**prefix, escape.msg["name"]: v} for v in _values(escape.msg, supports))
            continue
        traces.append(trace)
    return traces


def _per_element(t: torch.Tensor, local_dim: int | None, offset: int = 0) -> torch.Tensor:
    """A site's log-density summed to one number per element of ``local_dim``
    (shape ``(N,)``), or to one number (shape ``(1,)``) when ``local_dim`` is None.
    ``offset`` leading dims (draws) are kept in front."""
    lead, rest = t.shape[:offset], t.shape[offset:]
    if local_dim is None:
        return t.reshape(*lead, -1).sum(-1, keepdim=True)
    missing = -local_dim - len(rest)
    if missing > 0:
        t = t.reshape(*lead, *([1] * missing), *rest)
    t = t.movedim(local_dim, offset)
    return t.reshape(*t.shape[:offset + 1], -1).sum(-1)


def _site_terms(trace, local_dim, offset=0):
    """Per sample site: (scaled and masked log-density per element, the site's scale,
    the unscaled unmasked log-density of a guide draw summed, or None if observed)."""
    out = []
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        raw = site["fn"].log_prob(site["value"])
        scale = site["scale"]
        mask = site["mask"]
        value = raw if mask is None else raw * mask
        value = _per_element(value * scale, local_dim, offset)
        sampled = None if site["is_observed"] else _per_element(raw, None, offset)[..., 0]
        out.append((value, float(scale), sampled))
    return out


def _local_keys(trace, local_dim, size):
    """Per element of ``local_dim`` (``size`` of them; one if None): the values of the
    guide's latents there, a hashable key of the element's local configuration."""
    keys = [[] for _ in range(size)]
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        value = site["value"]
        if local_dim is None:
            keys[0].append((name, value.tolist()))
            continue
        dim = local_dim - len(site["fn"].event_shape)
        if value.dim() < -dim:
            value = value.reshape((1,) * (-dim - value.dim()) + value.shape)
        value = value.movedim(dim, 0)
        for i in range(size):
            keys[i].append((name, value[i if value.shape[0] > 1 else 0].tolist()))
    return [repr(k) for k in keys]


def enumerate_program(model, guide, args, kwargs, local_dim=None, supports=None):
    """For every joint configuration c of the guide's latents: the sampling log-density
    ``log q(c)`` (unscaled, unmasked), ``log p - log q`` per element of ``local_dim``
    scaled as the ELBO scales it, the common scale of the sites (None if they differ)
    and per element the key of its local configuration. Differentiable in the params."""
    log_s, cost, scales, keys = [], [], set(), []
    for trace in _guide_traces(guide, args, kwargs, supports or {}):
        model_trace = poutine.trace(poutine.replay(model, trace=trace)).get_trace(*args, **kwargs)
        q_terms = _site_terms(trace, local_dim)
        p_terms = _site_terms(model_trace, local_dim)
        log_s.append(sum(s for _, _, s in q_terms if s is not None))
        cost.append(sum(v for v, _, _ in p_terms) - sum(v for v, _, _ in q_terms))
        scales.update(s for _, s, _ in p_terms + q_terms)
        keys.append(trace)
    log_s = torch.stack(log_s)
    total = torch.logsumexp(log_s.detach(), 0).exp().item()
    assert abs(total - 1.0) < 1e-5, f"enumeration misses mass: {total}"
    cost = torch.stack([torch.broadcast_to(c, cost[0].shape) for c in cost])
    keys = [_local_keys(t, local_dim, cost.shape[1]) for t in keys]
    scale = scales.pop() if len(scales) == 1 else None
    return log_s, cost, scale, keys


def exact_bound(model, guide, args, kwargs, k=1, local_dim=None, supports=None):
    """The exact expected bound: k=1 the ELBO, k>1 the k-sample IWAE bound (per element of
    ``local_dim``, scaled by the sites' common scale), by enumeration."""
    log_s, cost, scale, keys = enumerate_program(model, guide, args, kwargs, local_dim,
                                                 supports)
    if k == 1:
        return (log_s.exp() * cost.sum(-1)).sum()
    assert scale is not None, "importance weights need one scale"
    log_w = cost / scale
    total = 0.0
    for i in range(log_w.shape[1]):
        # the bound of element i depends only on its local configuration: group the joint
        # configurations by it (its marginal law), then enumerate k-tuples of groups
        groups: dict[str, list[int]] = {}
        for c, config in enumerate(keys):
            groups.setdefault(config[i], []).append(c)
        members = list(groups.values())
        log_prob = torch.stack([torch.logsumexp(log_s[m], 0) for m in members])
        values = torch.stack([log_w[m[0], i] for m in members])
        tuples = torch.tensor(list(itertools.product(range(len(members)), repeat=k)))
        prob = log_prob[tuples].sum(-1).exp()
        total = total + (prob * (torch.logsumexp(values[tuples], 1) - math.log(k))).sum()
    return scale * total


# -- pathwise reference for continuous programs -------------------------------------------
def mc_bound(model, guide, args, kwargs, params, k=1, nesting=1, local_dim=None,
             batches=20, per_batch=400):
    """A low-variance reference for a fully reparameterized guide: ``batches`` means of
    ``per_batch`` pathwise estimates of the k-sample bound (k=1: the ELBO, as
    ``Trace_ELBO``), vectorized; returns (mean, se) of the bound and of its gradient."""
    values, grads = [], []
    n = per_batch * k

    def vectorized(fn):
        def run(*a, **kw):
            with pyro.plate("_reference_draws", n, dim=-(nesting + 1)):
                return fn(*a, **kw)
        return run

    for b in range(batches):
        pyro.set_rng_seed(5000 + b)
        trace = poutine.trace(vectorized(guide)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(vectorized(model), trace=trace)).get_trace(
            *args, **kwargs)
        terms = [(v, s) for v, s, _ in _site_terms(model_trace, local_dim, 1)]
        terms += [(-v, s) for v, s, _ in _site_terms(trace, local_dim, 1)]
        log_w = sum(torch.broadcast_to(v, (n, v.shape[-1])) for v, _ in terms)
        scales = {s for _, s in terms}
        if k == 1:
            bound = log_w.sum(-1).mean()
        else:
            (scale,) = scales
            lw = (log_w / scale).reshape(per_batch, k, -1)
            bound = scale * (torch.logsumexp(lw, 1) - math.log(k)).sum(-1).mean()
        values.append(bound.detach())
        grads.append(_flat(torch.autograd.grad(bound, params, allow_unused=True), params))
    value, value_se = mean_and_se(torch.stack(values))
    grad, grad_se = mean_and_se(torch.stack(grads))
    return value, value_se, grad, grad_se


def _flat(grads, params):
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                      for g, p in zip(grads, params, strict=True)])


# -- the programs -------------------------------------------------------------------------
@dataclass
class Program:
    """A model and guide with their arguments (``build()`` -> (model, guide, args,
    kwargs)), how to get exact values, and the cells that must raise."""

    name: str
    build: Callable[[], tuple]
    reference: str = "enum"  # "enum" | "mc"
    local_dim: int | None = None  # the dim of a plate that every site is in, if any
    nesting: int = 1  # max_plate_nesting, for the pathwise reference only
    supports: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # objective -> (exception, match)
    draws: int = 12  # draws of the ELBO objectives (K particles each) and of wake-sleep
    iwae_draws: int = 20  # draws of VIMCO and RWS (K = 3)
    k: int = 64  # particles of the ELBO objectives and wake-sleep
    options: dict = field(default_factory=dict)  # extra objective keywords
    fallback: bool = False  # vectorized particles must fall back (with the warning)
    full: Callable[[], tuple] | None = None  # the program whose exact values to use
    analytic_elbo: Callable[[], torch.Tensor] | None = None


PROGRAMS: list[Program] = []


# 1. Pyro's SVI part III coin flip: a Beta latent, TraceGraph-style baseline options.
COIN = torch.tensor([1.0, 1, 1, 1, 1, 1, 0, 0, 0, 0])


def coin_model(data):
    a0 = pyro.param("prior_conc", torch.tensor(10.0), constraint=dist.constraints.positive)
    f = pyro.sample("latent_fairness", dist.Beta(a0, a0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Bernoulli(f), obs=data)


def coin_guide(data):
    alpha = pyro.param("alpha_q", torch.tensor(15.0), constraint=dist.constraints.positive)
    beta = pyro.param("beta_q", torch.tensor(12.0), constraint=dist.constraints.positive)
    pyro.sample("latent_fairness", dist.Beta(alpha, beta),
                infer={"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}})


def coin_elbo():
    """The ELBO of the Beta-Bernoulli coin in closed form."""
    a0, alpha, beta = (pyro.param(n) for n in ("prior_conc", "alpha_q", "beta_q"))
    log_f = torch.digamma(alpha) - torch.digamma(alpha + beta)
    log_1mf = torch.digamma(beta) - torch.digamma(alpha + beta)
    heads = COIN.sum()
    prior = (a0 - 1) * (log_f + log_1mf) - (2 * torch.lgamma(a0) - torch.lgamma(2 * a0))
    likelihood = heads * log_f + (len(COIN) - heads) * log_1mf
    return prior + likelihood + dist.Beta(alpha, beta).entropy()


PROGRAMS.append(Program(
    "coin_beta", lambda: (coin_model, coin_guide, (COIN,), {}), reference="mc", nesting=1,
    analytic_elbo=coin_elbo))


# 2. Bayesian GMM with local Categorical assignments (means and weights as params).
GMM_X = torch.tensor([-1.5, 0.2, 2.0])


def gmm_model(x):
    weights = pyro.param("weights", torch.tensor([0.4, 0.6]), constraint=dist.constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.5]))
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)


def gmm_guide(x):
    logits = pyro.param("assign_logits", torch.tensor([[0.3, -0.2], [0.0, 0.1], [-0.4, 0.5]]))
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Categorical(logits=logits))


def _relaxed_index(site: str) -> dict:
    """REBAR and RELAX with its relaxed signal cannot relax a Categorical *index* site
    (only RelaxELBO(relaxed_signal=False), "relax_nosignal", handles one): a clear error
    naming the site."""
    error = (ValueError, f"the model cannot evaluate a relaxed value at site '{site}'")
    return {"rebar": error, "relax": error}


PROGRAMS.append(Program("gmm", lambda: (gmm_model, gmm_guide, (GMM_X,), {}), local_dim=-1,
                        errors=_relaxed_index("z")))


# 3. A pyro.markov HMM, 3 steps, binary states.
HMM_X = torch.tensor([0.5, -1.0, 1.2])


def hmm_model(x):
    trans = pyro.param("trans", torch.tensor([[0.7, 0.3], [0.4, 0.6]]),
                       constraint=dist.constraints.simplex)
    locs = pyro.param("emit_locs", torch.tensor([-1.0, 1.0]))
    z = torch.tensor(0)
    for t in pyro.markov(range(len(x))):
        z = pyro.sample(f"z_{t}", dist.Categorical(trans[z]))
        pyro.sample(f"x_{t}", dist.Normal(locs[z], 1.0), obs=x[t])


def hmm_guide(x):
    logits = pyro.param("q_logits", torch.tensor([[0.2, -0.1], [0.0, 0.3], [-0.2, 0.1]]))
    couple = pyro.param("q_couple", torch.tensor(0.5))
    z = torch.tensor(0)
    for t in pyro.markov(range(len(x))):
        zf = z.to(logits.dtype)
        z = pyro.sample(f"z_{t}", dist.Categorical(
            logits=logits[t] + couple * torch.stack([torch.zeros_like(zf), zf], -1)))


# The model observes x[t], not x: the sleep phase cannot feed the guide its dreams
# without dream_args (a clear error naming the sites).
HMM_DREAMS = (ValueError, "'x_0', 'x_1', 'x_2'")
PROGRAMS.append(Program("hmm_markov", lambda: (hmm_model, hmm_guide, (HMM_X,), {}),
                        errors={"ws": HMM_DREAMS, "rws_sleep": HMM_DREAMS,
                                **_relaxed_index("z_0")}))


# 4. Issue 10's geometric stochastic control flow: a = 0.3, b = -0.2, x = 3, cap 8.
# Exact (enumerating n = 0..8): -ELBO 4.0903, d/da 0.22585, d/db -0.95407.
CAP = 8
GEO_X = torch.tensor(3.0)


def geo_model(x):
    a = pyro.param("a", torch.tensor(0.3))
    n = 0
    while pyro.sample(f"c{n}", dist.Bernoulli(logits=a)).item() == 1 and n < CAP:
        n += 1
    pyro.sample("x", dist.Normal(torch.tensor(float(n)), 1.0), obs=x)


def geo_guide(x):
    b = pyro.param("b", torch.tensor(-0.2))
    n = 0
    while pyro.sample(f"c{n}", dist.Bernoulli(logits=b)).item() == 1 and n < CAP:
        n += 1


PROGRAMS.append(Program("geometric_vectorized", lambda: (geo_model, geo_guide, (GEO_X,), {}),
                        fallback=True, k=8, draws=10))
PROGRAMS.append(Program("geometric_sequential", lambda: (geo_model, geo_guide, (GEO_X,), {}),
                        options={"vectorize_particles": False}, k=8, draws=10))


# 5. Nested plates: a latent per row, a latent per cell.
NEST_X = torch.tensor([[0.5, -0.3], [1.4, 2.2]])


def nested_model(x):
    w = pyro.param("nest_w", torch.tensor([0.2, -0.3, 1.0]))
    with pyro.plate("rows", 2, dim=-2):
        y = pyro.sample("y", dist.Bernoulli(logits=w[0]))
        with pyro.plate("cols", 2, dim=-1):
            z = pyro.sample("z", dist.Bernoulli(logits=w[1] + y))
            pyro.sample("x", dist.Normal(w[2] * (z + y), 1.0), obs=x)


def nested_guide(x):
    v = pyro.param("nest_v", torch.tensor([0.1, 0.4, -0.2]))
    with pyro.plate("rows", 2, dim=-2):
        y = pyro.sample("y", dist.Bernoulli(logits=v[0] + v[1] * x.sum(-1, keepdim=True)))
        with pyro.plate("cols", 2, dim=-1):
            pyro.sample("z", dist.Bernoulli(logits=v[2] + x - y))


PROGRAMS.append(Program("nested_plates", lambda: (nested_model, nested_guide, (NEST_X,), {}),
                        local_dim=-2))


# 6. A subsampled plate: local latents only (every objective), and with a global latent.
SUB_X = torch.tensor([-2.0, -0.5, 0.3, 1.7, 3.5, 5.0])


def sub_model(x, subsample_size=None):
    w = pyro.param("sub_w", torch.tensor([0.4, 1.2]))
    with pyro.plate("data", x.shape[-1], subsample_size=subsample_size) as idx:
        z = pyro.sample("z", dist.Bernoulli(logits=w[0]))
        pyro.sample("x", dist.Normal(3.0 * w[1] * z - 1.0, 1.0), obs=x[..., idx])


def sub_guide(x, subsample_size=None):
    a = pyro.param("sub_a", torch.tensor([0.2, 0.5]))
    with pyro.plate("data", x.shape[-1], subsample_size=subsample_size) as idx:
        pyro.sample("z", dist.Bernoulli(logits=a[0] + a[1] * x[..., idx]))


def subg_model(x, subsample_size=None):
    w = pyro.param("subg_w", torch.tensor([0.3, -0.5, 1.0]))
    g = pyro.sample("g", dist.Bernoulli(logits=w[0]))
    with pyro.plate("data", x.shape[-1], subsample_size=subsample_size) as idx:
        z = pyro.sample("z", dist.Bernoulli(logits=w[1] + g))
        pyro.sample("x", dist.Normal(w[2] * (2 * z - g), 1.0), obs=x[..., idx])


def subg_guide(x, subsample_size=None):
    a = pyro.param("subg_a", torch.tensor([0.1, 0.2, 0.3]))
    g = pyro.sample("g", dist.Bernoulli(logits=a[0]))
    with pyro.plate("data", x.shape[-1], subsample_size=subsample_size) as idx:
        pyro.sample("z", dist.Bernoulli(logits=a[1] + a[2] * x[..., idx] - g))


# The sleep phase: the model observes x[idx], not x, so the guide cannot be fed the
# dream of a mini-batch without dream_args (a clear error naming the site).
SUB_SCALE = (ValueError, "same scale")
SUB_DREAMS = (ValueError, r"dream of observed site\(s\) \['x'\]")
PROGRAMS.append(Program(
    "subsample_local", lambda: (sub_model, sub_guide, (SUB_X, 3), {}), local_dim=-1,
    full=lambda: (sub_model, sub_guide, (SUB_X,), {}),
    errors={"ws": SUB_DREAMS, "rws_sleep": SUB_DREAMS}))
PROGRAMS.append(Program(
    "subsample_global", lambda: (subg_model, subg_guide, (SUB_X, 3), {}),
    full=lambda: (subg_model, subg_guide, (SUB_X,), {}),
    errors={"vimco": SUB_SCALE, "rws": SUB_SCALE, "rws_sleep": SUB_SCALE, "ws": SUB_DREAMS}))


# 7. Autoguides on a continuous model (a positive latent: autoguides transform it).
AUTO_X = torch.tensor([0.3, 1.1, -0.4, 0.9])


def auto_model(x):
    m = pyro.param("auto_m", torch.tensor(0.5))
    z = pyro.sample("z", dist.Normal(m, 1.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 0.5))
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("x", dist.Normal(z, sigma), obs=x)


def _auto(cls):
    def build():
        guide = cls(auto_model)
        guide(AUTO_X)  # creates its params
        return auto_model, guide, (AUTO_X,), {}
    return build


# Wake-sleep's sleep phase needs the guide's density at the dreamed latents: autoguides
# have none (auxiliary sites; AutoDelta a point mass), a clear error that says so.
# ReweightedWakeSleepELBO with insomnia=1 (rws) draws no dreams and is exact.
AUTO_SLEEP = (ValueError, "sleep phase")
for _cls in (AutoNormal, AutoDiagonalNormal, AutoDelta):
    _errors = {"ws": AUTO_SLEEP, "rws_sleep": AUTO_SLEEP}
    if _cls is AutoDelta:  # a point mass has no score function
        _errors["sf_force"] = (ValueError, "point mass")
    PROGRAMS.append(Program(_cls.__name__, _auto(_cls), reference="mc", nesting=1,
                            errors=_errors))


# 8. pyro.deterministic and pyro.factor in the model; pyro.factor in the guide.
DF_X = torch.tensor([0.2, 1.5, -0.7])


def df_model(x):
    w = pyro.param("df_w", torch.tensor([0.3, 1.1]))
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Bernoulli(logits=w[0]))
        mu = pyro.deterministic("mu", w[1] * z - 0.5)
        pyro.factor("penalty", -0.3 * z * w[1])
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def df_guide(x):
    a = pyro.param("df_a", torch.tensor([0.1, 0.6]))
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Bernoulli(logits=a[0] + a[1] * x))


GF_X = torch.tensor(0.7)


def gf_model(x):
    m = pyro.param("gf_m", torch.tensor(0.5))
    z = pyro.sample("z", dist.Normal(m, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def gf_guide(x):
    loc = pyro.param("gf_loc", torch.tensor(1.0))
    pyro.sample("z", dist.Normal(loc, 1.0))
    pyro.factor("f", loc**2, has_rsample=True)


def gf_bad_guide(x):
    loc = pyro.param("gf_loc", torch.tensor(1.0))
    pyro.sample("z", dist.Normal(loc, 1.0))
    pyro.factor("f", loc**2)


GUIDE_FACTOR = (ValueError, "has_rsample")
# the sleep phase cannot dream from a model with a factor (dreams are drawn site by site)
MODEL_FACTOR = (ValueError, "pyro.factor \\('penalty'\\)")
PROGRAMS.append(Program("deterministic_factor", lambda: (df_model, df_guide, (DF_X,), {}),
                        local_dim=-1, errors={"ws": MODEL_FACTOR, "rws_sleep": MODEL_FACTOR}))
PROGRAMS.append(Program("guide_factor", lambda: (gf_model, gf_guide, (GF_X,), {}),
                        reference="mc", nesting=0))
PROGRAMS.append(Program("guide_factor_no_rsample",
                        lambda: (gf_model, gf_bad_guide, (GF_X,), {}),
                        errors={name: GUIDE_FACTOR for name in OBJECTIVES}))


# 9. Masks (poutine.mask on a latent in model and guide, .mask() on an observation) and
# poutine.scale (on everything; on the likelihood only).
MASK_X = torch.tensor([-1.0, 0.4, 2.0, 1.1])
Z_MASK = torch.tensor([True, True, False, True])
X_MASK = torch.tensor([True, False, True, True])


def mask_model(x):
    w = pyro.param("mask_w", torch.tensor([0.4, 1.2]))
    with pyro.plate("data", x.shape[-1]):
        with poutine.mask(mask=Z_MASK):
            z = pyro.sample("z", dist.Bernoulli(logits=w[0]))
        pyro.sample("x", dist.Normal(3.0 * w[1] * z - 1.0, 1.0).mask(X_MASK), obs=x)


def mask_guide(x):
    a = pyro.param("mask_a", torch.tensor([0.2, 0.5]))
    with pyro.plate("data", x.shape[-1]), poutine.mask(mask=Z_MASK):
        pyro.sample("z", dist.Bernoulli(logits=a[0] + a[1] * x))


def scale_model_partial(x):
    w = pyro.param("mask_w", torch.tensor([0.4, 1.2]))
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Bernoulli(logits=w[0]))
        with poutine.scale(scale=2.5):
            pyro.sample("x", dist.Normal(3.0 * w[1] * z - 1.0, 1.0), obs=x)


def plain_guide(x):
    a = pyro.param("mask_a", torch.tensor([0.2, 0.5]))
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Bernoulli(logits=a[0] + a[1] * x))


SCALES = (ValueError, "same scale")
PROGRAMS.append(Program("masks", lambda: (mask_model, mask_guide, (MASK_X,), {}),
                        local_dim=-1))
PROGRAMS.append(Program("scale_all", lambda: (poutine.scale(mask_model, scale=3.0),
                                              poutine.scale(mask_guide, scale=3.0),
                                              (MASK_X,), {}), local_dim=-1))
PROGRAMS.append(Program("scale_likelihood", lambda: (scale_model_partial, plain_guide,
                                                     (MASK_X,), {}), local_dim=-1,
                        errors={"vimco": SCALES, "rws": SCALES, "rws_sleep": SCALES}))


# 10. PyroModule model and guide.
class ModModel(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = PyroParam(torch.tensor([0.4, 1.2]))

    def forward(self, x):
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Bernoulli(logits=self.w[0]))
            pyro.sample("x", dist.Normal(3.0 * self.w[1] * z - 1.0, 1.0), obs=x)


class ModGuide(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.a = PyroParam(torch.tensor([0.2, 0.5]))

    def forward(self, x):
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("z", dist.Bernoulli(logits=self.a[0] + self.a[1] * x))


PROGRAMS.append(Program("pyro_module", lambda: (ModModel(), ModGuide(), (MASK_X,), {}),
                        local_dim=-1))


# 11. Poisson, Categorical and OneHotCategorical latents.
POISSON = (ValueError, "'z'")
# REBAR and RELAX take Bernoulli and categorical discrete sites only
RELAXED_POISSON = (ValueError, "guide site 'z' has distribution Poisson")


def poisson_model(x):
    w = pyro.param("pois_w", torch.tensor([0.3, 0.8]))
    z = pyro.sample("z", dist.Poisson(w[0].exp()))
    pyro.sample("x", dist.Normal(w[1] * z, 1.0), obs=x)


def poisson_guide(x):
    b = pyro.param("pois_b", torch.tensor(0.2))
    pyro.sample("z", dist.Poisson(b.exp()))


def cat_model(x):
    w = pyro.param("cat_w", torch.tensor([0.2, -0.3, 0.5]))
    locs = pyro.param("cat_locs", torch.tensor([-1.0, 0.5, 2.0]))
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Categorical(logits=w))
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)


def cat_guide(x):
    a = pyro.param("cat_a", torch.tensor([[0.1, 0.2, -0.3], [0.4, -0.1, 0.0]]))
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Categorical(logits=a))


def onehot_model(x):
    w = pyro.param("oh_w", torch.tensor([0.2, -0.3, 0.5]))
    locs = pyro.param("oh_locs", torch.tensor([-1.0, 0.5, 2.0]))
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.OneHotCategorical(logits=w))
        pyro.sample("x", dist.Normal((z * locs).sum(-1), 1.0), obs=x)


def onehot_guide(x):
    a = pyro.param("oh_a", torch.tensor([[0.1, 0.2, -0.3], [0.4, -0.1, 0.0]]))
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.OneHotCategorical(logits=a))


TWO_X = torch.tensor([0.3, 1.8])
PROGRAMS.append(Program("poisson", lambda: (poisson_model, poisson_guide,
                                            (torch.tensor(1.3),), {}),
                        supports={"z": torch.arange(40.0)},
                        errors={"disarm": POISSON, "arm": POISSON, "rebar": RELAXED_POISSON,
                                "relax": RELAXED_POISSON, "relax_nosignal": RELAXED_POISSON}))
PROGRAMS.append(Program("categorical", lambda: (cat_model, cat_guide, (TWO_X,), {}),
                        local_dim=-1, errors=_relaxed_index("z")))
PROGRAMS.append(Program("one_hot_categorical",
                        lambda: (onehot_model, onehot_guide, (TWO_X,), {}), local_dim=-1))


# 12. float64 (explicitly float64 tensors and params; the default dtype is untouched).
def f64_model(x):
    w = pyro.param("f64_w", torch.tensor([0.4, 1.2], dtype=torch.float64))
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Bernoulli(logits=w[0]))
        pyro.sample("x", dist.Normal(3.0 * w[1] * z - 1.0, torch.ones((), dtype=x.dtype)), obs=x)


def f64_guide(x):
    a = pyro.param("f64_a", torch.tensor([0.2, 0.5], dtype=torch.float64))
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Bernoulli(logits=a[0] + a[1] * x))


PROGRAMS.append(Program("float64", lambda: (f64_model, f64_guide,
                                            (MASK_X.double(),), {}), local_dim=-1))


# 13. An amortized guide taking the data by keyword.
def kw_model(x=None):
    w = pyro.param("kw_w", torch.tensor([0.4, 1.2]))
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Bernoulli(logits=w[0]))
        pyro.sample("x", dist.Normal(3.0 * w[1] * z - 1.0, 1.0), obs=x)


def kw_guide(x=None):
    a = pyro.param("kw_a", torch.tensor([0.2, 0.5]))
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Bernoulli(logits=a[0] + a[1] * x))


PROGRAMS.append(Program("amortized_keyword", lambda: (kw_model, kw_guide, (), {"x": MASK_X}),
                        local_dim=-1))


# 14. A guide reading the data from a closure (no arguments at all).
def closure_program():
    data = MASK_X.clone()

    def model():
        w = pyro.param("cl_w", torch.tensor([0.4, 1.2]))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Bernoulli(logits=w[0]))
            pyro.sample("x", dist.Normal(3.0 * w[1] * z - 1.0, 1.0), obs=data)

    def guide():
        a = pyro.param("cl_a", torch.tensor([0.2, 0.5]))
        with pyro.plate("data", len(data)):
            pyro.sample("z", dist.Bernoulli(logits=a[0] + a[1] * data))

    return model, guide, (), {}


CLOSURE = (ValueError, "'x'")
PROGRAMS.append(Program("guide_closure", closure_program, local_dim=-1,
                        errors={"ws": CLOSURE, "rws_sleep": CLOSURE}))


# 15. Two plates on the same dim: plate a holds z, plate b observes x_j ~ N(sum z c_j, 1).
def same_dim_program(size_a, size_b):
    c = torch.linspace(0.5, 1.5, size_b)
    x = torch.linspace(-0.5, 1.0, size_b)

    def model(x):
        w = pyro.param("sd_w", torch.tensor(0.2))
        with pyro.plate("a", size_a, dim=-1):
            z = pyro.sample("z", dist.Bernoulli(logits=w))
        with pyro.plate("b", size_b, dim=-1):
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True) * c, 1.0), obs=x)

    def guide(x):
        v = pyro.param("sd_v", torch.full((size_a,), 0.1))
        with pyro.plate("a", size_a, dim=-1):
            pyro.sample("z", dist.Bernoulli(logits=v))

    return model, guide, (x,), {}


PROGRAMS.append(Program("same_dim_sizes_3_2", lambda: same_dim_program(3, 2)))
PROGRAMS.append(Program("same_dim_sizes_2_2", lambda: same_dim_program(2, 2)))


# -- the matrix ---------------------------------------------------------------------------
XFAIL: dict[tuple[str, str], str] = {}

_PROGRAM = {p.name: p for p in PROGRAMS}
MATRIX = {
    p.name: {o: ("BUG (xfail)" if (p.name, o) in XFAIL else "exact" if o not in p.errors else
                 f"{p.errors[o][0].__name__}({p.errors[o][1]})") for o in OBJECTIVES}
    for p in PROGRAMS
}


def _program_params(model, guide, args, kwargs):
    """(all param names, model param names), in order, creating the params."""
    pyro.set_rng_seed(0)
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        *args, **kwargs)
    model_names = [n for n, s in model_trace.nodes.items() if s["type"] == "param"]
    guide_names = [n for n, s in guide_trace.nodes.items() if s["type"] == "param"]
    return list(dict.fromkeys(model_names + guide_names)), model_names


_REFERENCES: dict[tuple[str, int], tuple] = {}


def _reference(prog: Program, k: int, names: list[str]):
    """(value, value_se, grad, grad_se) of the exact negative bound (k=1: ELBO) and its
    gradient over ``names``; cached per program (param inits are deterministic)."""
    key = (prog.name, k)
    if key in _REFERENCES:
        return _REFERENCES[key]
    model, guide, args, kwargs = (prog.full or prog.build)()
    params = [pyro.param(n).unconstrained() for n in names]
    if prog.reference == "enum" or (k == 1 and prog.analytic_elbo):
        if k == 1 and prog.analytic_elbo:
            bound = prog.analytic_elbo()
        else:
            bound = exact_bound(model, guide, args, kwargs, k, prog.local_dim, prog.supports)
        grad = _flat(torch.autograd.grad(-bound, params, allow_unused=True), params)
        out = (-bound.detach(), torch.zeros(()), grad, torch.zeros_like(grad))
    else:
        value, value_se, grad, grad_se = mc_bound(
            model, guide, args, kwargs, params, k, prog.nesting, prog.local_dim)
        out = (-value, value_se, -grad, grad_se)
    _REFERENCES[key] = out
    return out


def _draws(objective, model, guide, args, kwargs, params, num_draws, fallback):
    losses, grads = [], []
    for i in range(num_draws):
        pyro.set_rng_seed(100 + i)
        if i == 0 and fallback:
            with pytest.warns(RuntimeWarning, match="vectorize_particles=False"):
                loss = objective.differentiable_loss(model, guide, *args, **kwargs)
        else:
            loss = objective.differentiable_loss(model, guide, *args, **kwargs)
        losses.append(loss.detach())
        grads.append(_flat(torch.autograd.grad(loss, params, allow_unused=True), params))
    return torch.stack(losses), torch.stack(grads)


def _check(name, mean, se, exact, exact_se):
    tol = Z * torch.sqrt(se**2 + exact_se**2) + ATOL * (1 + exact.abs())
    assert torch.all((mean - exact).abs() <= tol), (name, mean, exact, se, exact_se)


#: The fast tier runs every objective class of issue 10 (CORE) on every program, every
#: expected error, the control variates and estimator variants where the issue names them,
#: and REBAR/RELAX on a Bernoulli, a one-hot and a Categorical index program; the slow
#: tier (PYRO_WAKESLEEP_SLOW=1) runs the rest, and every cell again with 10x the draws.
CORE = ("sf", "vimco", "disarm", "ws", "rws")
FAST_EXTRAS = {
    ("coin_beta", "sf_force"), ("coin_beta", "sf_ma"),
    ("geometric_sequential", "sf_loo"), ("geometric_sequential", "sf_ma"),
    ("geometric_sequential", "sf_nvil"), ("geometric_vectorized", "sf_loo"),
    ("gmm", "arm"), ("gmm", "rws_sleep"), ("AutoDelta", "sf_force"),
    ("masks", "rebar"), ("one_hot_categorical", "relax"), ("categorical", "relax_nosignal"),
}


def _cases(precision):
    cases = []
    for p in PROGRAMS:
        for o in OBJECTIVES:
            fast = precision == 1 and (o in CORE or (p.name, o) in FAST_EXTRAS or o in p.errors)
            marks = [] if fast else [pytest.mark.slow]
            if (p.name, o) in XFAIL:
                marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[p.name, o]))
            cases.append(pytest.param(p, o, precision, id=f"{p.name}-{o}-{precision}",
                                      marks=marks))
    return cases


@pytest.mark.parametrize("prog, objective_name, precision", _cases(1) + _cases(10))
def test_matrix(prog: Program, objective_name: str, precision: int):
    """One cell: exact (many-draw means of loss and gradient within Z standard errors of
    the exact values) or the expected clear error. ``precision`` multiplies the draws
    (the slow tier runs 10 times as many)."""
    factory, kind = OBJECTIVES[objective_name]
    model, guide, args, kwargs = prog.build()
    if objective_name in prog.errors:
        objective = factory(2, **prog.options)
        error, match = prog.errors[objective_name]
        with pytest.raises(error, match=match):
            objective.differentiable_loss(model, guide, *args, **kwargs)
        return
    objective = factory(prog.k, **prog.options)
    names, model_names = _program_params(model, guide, args, kwargs)
    params = [pyro.param(n).unconstrained() for n in names]
    num_draws = precision * (prog.iwae_draws if kind in ("iwae", "rws") else prog.draws)
    with warnings.catch_warnings():
        if not prog.fallback:
            warnings.filterwarnings("error", message=f".*{FALLBACK}")
        losses, grads = _draws(objective, model, guide, args, kwargs, params, num_draws,
                               prog.fallback)
    value, value_se, grad, grad_se = _reference(
        prog, 1 if kind in ("elbo", "ws") else IWAE_K, names)
    mean, se = mean_and_se(losses)
    _check("loss", mean, se, value, value_se)
    mean, se = mean_and_se(grads)
    if kind in ("ws", "rws"):  # only the model's (theta) gradient is the bound's
        keep = torch.cat([torch.full((pyro.param(n).numel(),), n in model_names)
                          for n in names])
        mean, se, grad, grad_se = mean[keep], se[keep], grad[keep], grad_se[keep]
    _check("grad", mean, se, grad, grad_se)
    assert grads.dtype == params[0].dtype


# -- stochastic control flow: Pyro's TraceGraph_ELBO is biased, ours is exact ------------
def test_tracegraph_is_biased_under_control_flow_where_score_function_is_exact():
    """On the geometric program (a = 0.3, b = -0.2, x = 3, cap 8) the exact guide gradient
    d(-ELBO)/db is -0.954. Pyro's TraceGraph_ELBO gives -0.227 +- 0.008 (measured here,
    400 particles; the issue: -0.225 +- 0.003): its provenance tracking cannot see that
    the later sites exist because of earlier draws. Its model gradient is right (0.218
    +- 0.029 against 0.226). ScoreFunctionELBO is exact on the same program (the
    geometric rows of the matrix)."""
    names, _ = _program_params(geo_model, geo_guide, (GEO_X,), {})
    _, _, exact, _ = _reference(_PROGRAM["geometric_sequential"], 1, names)
    assert names == ["a", "b"]
    assert exact.tolist() == pytest.approx([0.22585, -0.95407], abs=1e-4)
    grads = []
    for i in range(30):
        _, g = param_grads(TraceGraph_ELBO(), geo_model, geo_guide, GEO_X, seed=300 + i)
        grads.append(g["b"])
    mean, se = mean_and_se(torch.stack(grads))
    assert abs(mean - exact[1]) > 10 * se  # biased
    assert abs(mean - (-0.225)) < Z * se + 0.01  # by the amount the issue reports


# -- the sleep phase on pyro.deterministic and pyro.factor (not covered by the matrix,
# which checks wake-sleep's loss and theta gradient only) ---------------------------------
def _det_model(x, deterministic):
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Bernoulli(0.4))
        mu = 2.0 * z - 0.5
        if deterministic:
            mu = pyro.deterministic("mu", mu)
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def _det_guide(x, deterministic):
    a = pyro.param("a", torch.tensor(0.1))
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Bernoulli(logits=a * x))


@pytest.mark.parametrize("num_particles", [1, 3])
def test_sleep_phase_keeps_deterministic_sites(num_particles):
    """A pyro.deterministic site changes nothing about the model, so the sleep phase
    must give the same loss with and without it under the same seed (measured: 1.95
    without, 1169 with, over 200 vectorized dreams; sequential dreams raise a shape error
    at guide site 'z')."""
    losses = []
    for deterministic in (False, True):
        objective = WakeSleepELBO(num_particles)
        pyro.set_rng_seed(0)
        objective.loss(_det_model, _det_guide, DF_X, deterministic)
        losses.append(objective.last_phase_losses["sleep_phi"])
    assert losses[1] == pytest.approx(losses[0])


def _factor_model(x):
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Bernoulli(0.4))
        pyro.factor("penalty", -3.0 * z)
        pyro.sample("x", dist.Normal(2.0 * z - 0.5, 1.0), obs=x)


def test_sleep_phase_refuses_a_model_factor():
    """Dreams are draws from p(z, x); with a factor p is known only up to a constant and
    ancestral sampling does not draw from it (here the factor exp(-3 z) turns p(z=1)
    from 0.4 into 0.03), so the sleep phase has no dreams to learn from."""
    with pytest.raises(ValueError, match="pyro.factor \\('penalty'\\)"):
        WakeSleepELBO(2).loss(_factor_model, lambda x: _det_guide(x, False), DF_X)


def test_print_matrix():
    objectives = list(OBJECTIVES)
    width = max(len(p) for p in MATRIX)
    lines = [" " * width + " | " + " | ".join(objectives)]
    for name, row in MATRIX.items():
        lines.append(name.ljust(width) + " | " + " | ".join(row[o] for o in objectives))
    print("\n".join(lines))
    assert all(len(row) == len(objectives) for row in MATRIX.values())

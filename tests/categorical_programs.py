"""Small programs with categorical guide sites for the unordered-set and IndeCateR tests,
each with every latent configuration listed, and their exact ELBO by enumeration."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from checks import params_of
from torch.distributions import Bernoulli, Categorical, Independent

XS = torch.tensor([-1.5, 0.4, 2.5])


def exact_elbo(model, guide, configs, *args, **kwargs):
    """E_q[log p - log q] by enumerating every joint configuration of the guide sites
    (``configs``: site -> list of its full values) of positive guide probability (those
    of probability 0 contribute nothing); differentiable in the params."""
    names = list(configs)
    total = 0.0
    for values in itertools.product(*(configs[n] for n in names)):
        data = dict(zip(names, values, strict=True))
        guide_trace = poutine.trace(poutine.condition(guide, data)).get_trace(*args, **kwargs)
        if any(never_drawn(guide_trace.nodes[n]["fn"], data[n]) for n in names):
            continue
        log_q = sum(guide_trace.nodes[n]["fn"].log_prob(data[n]).sum() for n in names)
        model_trace = poutine.trace(poutine.condition(model, data)).get_trace(*args, **kwargs)
        log_p = model_trace.log_prob_sum()
        total = total + log_q.exp() * (log_p - log_q)
    return total


def never_drawn(fn, value):
    """Whether ``value`` has probability exactly 0 under a (possibly ``Independent``)
    ``Categorical`` or ``Bernoulli`` ``fn``, whose sampler so never draws it (a
    distribution built from ``probs`` has clamped, finite logits there)."""
    while isinstance(fn, Independent):
        fn = fn.base_dist
    if isinstance(fn, Bernoulli):
        probs = torch.where(value == 1, fn.probs, 1.0 - fn.probs)
    elif isinstance(fn, Categorical):
        probs = fn.probs.expand(value.shape + fn.probs.shape[-1:])
        probs = probs.gather(-1, value.long().unsqueeze(-1))
    else:
        return False
    return bool((probs == 0).any())


def all_values(shape, classes, one_hot=False):
    """Every value of a categorical site of batch/event ``shape``."""
    out = []
    for cells in itertools.product(range(classes), repeat=int(torch.Size(shape).numel())):
        value = torch.tensor(cells).reshape(shape)
        out.append(torch.nn.functional.one_hot(value, classes).float() if one_hot else value)
    return out


def data_plate(one_hot=False, n=3):
    """One categorical latent per datapoint (4 categories) in a data plate, with optional
    subsampling (``subsample_size``)."""
    params = params_of({
        "theta": torch.tensor([0.5, -0.3, 0.0, 0.8]),
        "mu": torch.tensor([-2.0, 0.0, 1.0, 3.0]),
        "a": torch.tensor([[0.2, -0.5], [0.1, 0.0], [-0.3, 0.4], [0.0, 0.9]]),
    })

    def model(x, subsample_size=None):
        theta, mu = pyro.param("theta"), pyro.param("mu")
        with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
            if one_hot:
                z = pyro.sample("z", dist.OneHotCategorical(logits=theta))
                loc = (z * mu).sum(-1)
            else:
                loc = mu[pyro.sample("z", dist.Categorical(logits=theta))]
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x[idx])

    def guide(x, subsample_size=None):
        a = pyro.param("a")
        with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
            logits = a[:, 0] + a[:, 1] * x[idx].unsqueeze(-1)
            fn = dist.OneHotCategorical if one_hot else dist.Categorical
            pyro.sample("z", fn(logits=logits))

    return model, guide, params, {"z": all_values((n,), 4, one_hot)}


def two_sites():
    """Two categorical sites per datapoint, the second's guide depending on the first."""
    params = params_of({
        "w": torch.tensor([0.3, -0.4, 0.9, 0.2]),
        "b": torch.tensor([[0.4, -0.2, 0.1], [-0.5, 0.3, 0.0]]),
        "g": torch.tensor([[0.1, 0.2], [0.0, -0.3], [0.5, 0.1], [-0.2, 0.4]]),
    })

    def model(x):
        w = pyro.param("w")
        with pyro.plate("data", len(x)):
            z1 = pyro.sample("z1", dist.Categorical(logits=w))
            z2 = pyro.sample("z2", dist.Categorical(logits=torch.stack([w[:3], -w[1:]])[
                (z1 > 1).long()]))
            pyro.sample("x", dist.Normal(z1.float() - 1.5 * z2.float(), 1.0), obs=x)

    def guide(x):
        b, g = pyro.param("b"), pyro.param("g")
        with pyro.plate("data", len(x)):
            z1 = pyro.sample("z1", dist.Categorical(logits=g[:, 0] + g[:, 1] * x.unsqueeze(-1)))
            pyro.sample("z2", dist.Categorical(logits=b[(z1 % 2)] + 0.3 * x.unsqueeze(-1)))

    x = XS[:1]
    return model, guide, params, {"z1": all_values((1,), 4), "z2": all_values((1,), 3)}, x


def markov(length=3):
    """A chain z_0 -> z_1 -> ... of 3-category latents with one observation each (a
    sequential plate), the guide a chain too."""
    params = params_of({
        "trans": torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.5, 0.0], [-1.0, 0.0, 1.0]]),
        "mu": torch.tensor([-1.0, 0.5, 2.0]),
        "q": torch.tensor([[0.2, -0.1, 0.3], [0.0, 0.4, -0.2], [0.1, 0.0, 0.5]]),
        "r": torch.tensor([0.3, -0.2, 0.1]),
    })
    xs = torch.tensor([[-0.8, 1.2, 2.4, 0.3][:length]])  # (sequences, length)

    def model(x):
        trans, mu = pyro.param("trans"), pyro.param("mu")
        with pyro.plate("data", x.shape[0]):
            z = torch.zeros(x.shape[0], dtype=torch.long)
            for t in pyro.markov(range(x.shape[1])):
                z = pyro.sample(f"z_{t}", dist.Categorical(logits=trans[z]))
                pyro.sample(f"x_{t}", dist.Normal(mu[z], 1.0), obs=x[:, t])

    def guide(x):
        q, r = pyro.param("q"), pyro.param("r")
        with pyro.plate("data", x.shape[0]):
            z = torch.zeros(x.shape[0], dtype=torch.long)
            for t in pyro.markov(range(x.shape[1])):
                z = pyro.sample(f"z_{t}", dist.Categorical(
                    logits=q[z] + r * x[:, t].unsqueeze(-1)))

    configs = {f"z_{t}": all_values((1,), 3) for t in range(length)}
    return model, guide, params, configs, xs


def independent(dims=3, classes=3, event=True):
    """``dims`` independent categoricals feeding one observation: as an ``Independent``
    site (``event=True``) or in a plate whose elements share the observation (joint
    plate dim)."""
    params = params_of({
        "prior": torch.tensor([0.2, -0.1, 0.4])[:classes],
        "levels": torch.tensor([-1.0, 0.5, 2.0])[:classes],
        "phi": torch.tensor([[0.3, -0.2, 0.5], [0.0, 0.6, -0.4], [-0.5, 0.1, 0.2],
                             [0.2, 0.2, -0.3]])[:dims, :classes],
    })
    x = torch.tensor([1.3])

    def model(x):
        prior, levels = pyro.param("prior"), pyro.param("levels")
        with pyro.plate("data", len(x), dim=-2):
            if event:
                z = pyro.sample("z", dist.Categorical(
                    logits=prior.expand(dims, classes)).to_event(1))
            else:
                with pyro.plate("vars", dims):
                    z = pyro.sample("z", dist.Categorical(logits=prior))
            total = levels[z].sum(-1) if event else levels[z].sum(-1, keepdim=True)
            pyro.sample("x", dist.Normal(total, 1.0), obs=x.unsqueeze(-1))

    def guide(x):
        phi = pyro.param("phi")
        with pyro.plate("data", len(x), dim=-2):
            logits = phi * x.reshape(-1, 1, 1)
            if event:
                pyro.sample("z", dist.Categorical(logits=logits.unsqueeze(-3)).to_event(1))
            else:
                with pyro.plate("vars", dims):
                    pyro.sample("z", dist.Categorical(logits=logits))

    shape = (1, 1, dims) if event else (1, dims)
    return model, guide, params, {"z": all_values(shape, classes)}, x


class CatModel(torch.nn.Module):
    """z_i ~ Cat(softmax(theta)), y_i | z_i ~ N(mu_{z_i}, 1), x_i | y_i ~ N(y_i, 0.5) in
    a data plate: a categorical and a reparameterizable latent; a module registered with
    ``pyro.module`` (SVI and the plain PyTorch route alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor([0.5, -0.3, 0.0, 0.8]))
        self.mu = torch.nn.Parameter(torch.tensor([-2.0, 0.0, 1.0, 3.0]))

    def forward(self, x):
        pyro.module("cat_model", self, update_module_params=True)
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Categorical(logits=self.theta))
            y = pyro.sample("y", dist.Normal(self.mu[z], 1.0))
            pyro.sample("x", dist.Normal(y, 0.5), obs=x)


class CatGuide(torch.nn.Module):
    """q(z_i | x_i) = Cat(softmax(a_0 + a_1 x_i)), q(y_i | z_i, x_i) = N(x_i + b_{z_i},
    exp(s))."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([[0.2, -0.5], [0.1, 0.0], [-0.3, 0.4],
                                                  [0.0, 0.9]]))
        self.b = torch.nn.Parameter(torch.zeros(4))
        self.s = torch.nn.Parameter(torch.tensor(-0.5))

    def forward(self, x):
        pyro.module("cat_guide", self, update_module_params=True)
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Categorical(logits=self.a[:, 0] + self.a[:, 1]
                                                  * x.unsqueeze(-1)))
            pyro.sample("y", dist.Normal(x + self.b[z], self.s.exp()))


def control_flow():
    """Stochastic control flow: a second categorical site only when the first is 0 (read
    into Python with ``.item()``); returns the program and its exact ELBO in closed form
    (the enumeration of ``exact_elbo`` assumes every site present)."""
    params = params_of({
        "theta": torch.tensor([0.3, -0.2, 0.5]), "phi": torch.tensor([0.1, 0.4, -0.6]),
        "mu": torch.tensor([-1.0, 0.5, 2.0]), "nu": torch.tensor([0.0, 1.5, -0.5]),
        "a": torch.tensor([0.2, 0.1, -0.3]), "b": torch.tensor([-0.4, 0.3, 0.2]),
    })

    def model(x):
        z = pyro.sample("z", dist.Categorical(logits=pyro.param("theta")))
        if z.item() == 0:
            loc = pyro.param("mu")[pyro.sample("w", dist.Categorical(logits=pyro.param("phi")))]
        else:
            loc = pyro.param("nu")[z]
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        z = pyro.sample("z", dist.Categorical(logits=pyro.param("a")))
        if z.item() == 0:
            pyro.sample("w", dist.Categorical(logits=pyro.param("b")))

    def exact(x):
        lq_z, lp_z = pyro.param("a").log_softmax(-1), pyro.param("theta").log_softmax(-1)
        lq_w, lp_w = pyro.param("b").log_softmax(-1), pyro.param("phi").log_softmax(-1)
        branch = (lq_w.exp() * (lp_w + dist.Normal(pyro.param("mu"), 1.0).log_prob(x)
                                - lq_w)).sum()
        rest = dist.Normal(pyro.param("nu"), 1.0).log_prob(x)
        inner = torch.cat([branch.reshape(1), rest[1:]])
        return (lq_z.exp() * (lp_z - lq_z + inner)).sum()

    return model, guide, params, exact


#: the support of each datapoint's categorical in ``zero_probs`` (rows repeat): 4, 2, 1
SUPPORT = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)


def zero_probs(kind="logits", support=SUPPORT):
    """``data_plate`` with categories of probability 0 in guide and model alike (a
    constrained assignment): datapoint ``i`` may take the categories ``support[i %
    len(support)]`` (by default 4, 2 and 1 of them). ``kind="logits"``: the guide's logits
    are -inf outside; ``"probs"``: its probs are 0 there. The model's log-density is -inf
    at those values, so a run there would raise. The configurations listed are those of
    ``len(support)`` datapoints."""
    params = params_of({
        "theta": torch.tensor([0.5, -0.3, 0.0, 0.8]),
        "mu": torch.tensor([-2.0, 0.0, 1.0, 3.0]),
        "a": torch.tensor([[0.2, -0.5], [0.1, 0.0], [-0.3, 0.4], [0.0, 0.9]]),
    })

    def rows(x):
        return support[torch.arange(len(x)) % len(support)]

    def model(x):
        theta, mu = pyro.param("theta"), pyro.param("mu")
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(logits=theta.masked_fill(~rows(x),
                                                                           -math.inf)))
            pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)

    def guide(x):
        a = pyro.param("a")
        with pyro.plate("data", len(x)):
            logits = (a[:, 0] + a[:, 1] * x.unsqueeze(-1)).masked_fill(~rows(x), -math.inf)
            if kind == "logits":
                pyro.sample("z", dist.Categorical(logits=logits))
            else:
                pyro.sample("z", dist.Categorical(probs=torch.softmax(logits, -1)))

    return model, guide, params, {"z": all_values((len(support),), 4)}


def bernoulli_sbn(units=2):
    """A two-layer sigmoid belief net per datapoint: ``z1`` (``units`` Bernoulli in an
    ``Independent``), ``z2 | z1`` (``units`` Bernoulli in a plate whose elements share
    the observation: a joint plate dim), ``x | z1, z2`` Normal; the guide ``z1 | x``,
    ``z2 | z1, x``."""
    params = params_of({
        "prior": torch.tensor([0.3, -0.4])[:units],
        "w": torch.tensor([[0.8, -0.6], [0.2, 0.5]])[:units, :units],
        "v": torch.tensor([1.5, -1.0])[:units],
        "u": torch.tensor([0.7, 0.4])[:units],
        "a": torch.tensor([[0.2, -0.5], [0.4, 0.3]])[:units],
        "b": torch.tensor([[0.3, -0.2], [-0.4, 0.6]])[:units, :units],
        "c": torch.tensor([0.1, -0.3])[:units],
    })

    def model(x):
        prior, w, v, u = (pyro.param(n) for n in ("prior", "w", "v", "u"))
        with pyro.plate("data", len(x), dim=-2):
            z1 = pyro.sample("z1", dist.Bernoulli(logits=prior.expand(len(x), 1, units))
                             .to_event(1))
            with pyro.plate("units", units, dim=-1):
                z2 = pyro.sample("z2", dist.Bernoulli(logits=(z1 @ w).squeeze(-2)))
            loc = (z2 * v).sum(-1, keepdim=True) + (z1 * u).sum(-1)
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x.reshape(-1, 1))

    def guide(x):
        a, b, c = pyro.param("a"), pyro.param("b"), pyro.param("c")
        with pyro.plate("data", len(x), dim=-2):
            logits1 = (a[:, 0] + a[:, 1] * x.reshape(-1, 1)).unsqueeze(-2)
            z1 = pyro.sample("z1", dist.Bernoulli(logits=logits1).to_event(1))
            with pyro.plate("units", units, dim=-1):
                pyro.sample("z2", dist.Bernoulli(
                    logits=(z1 @ b).squeeze(-2) + c * x.reshape(-1, 1)))

    x = XS[:1]
    bits = [v.float() for v in all_values((1, units), 2)]
    return model, guide, params, {"z1": [v.unsqueeze(-2) for v in bits], "z2": bits}, x


def bernoulli_plate(n=3):
    """One Bernoulli latent per datapoint in a data plate (no later sites), the guide's
    probability 1 for every third datapoint (``probs`` exactly 1: the value 0 has
    probability 0)."""
    params = params_of({"prior": torch.tensor(0.2), "mu": torch.tensor([-1.0, 2.0]),
                        "a": torch.tensor([0.3, -0.7])})

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Bernoulli(logits=pyro.param("prior")))
            pyro.sample("x", dist.Normal(pyro.param("mu")[z.long()], 1.0), obs=x)

    def guide(x):
        a = pyro.param("a")
        with pyro.plate("data", len(x)):
            sure = torch.arange(len(x)) % 3 == 2
            p = torch.where(sure, 1.0, torch.sigmoid(a[0] + a[1] * x))
            pyro.sample("z", dist.Bernoulli(probs=p))

    return model, guide, params, {"z": [v.float() for v in all_values((n,), 2)]}

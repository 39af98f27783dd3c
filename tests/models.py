"""Small models shared by the tests: every expectation can be computed exactly."""

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.testing.fakes import NonreparameterizedNormal
from torch import nn

# Inputs spread widely so that the learning signal depends strongly on the datapoint.
X = torch.tensor([-2.0, -0.5, 0.3, 1.7, 3.5, 5.0])


def bern_model(x, subsample_size=None):
    w = pyro.param("w", torch.tensor([0.4, 1.2]))
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        z = pyro.sample("z", dist.Bernoulli(logits=w[0]))
        pyro.sample("x", dist.Normal(3.0 * w[1] * z - 1.0, 1.0), obs=x[idx])


def bern_guide(x, subsample_size=None):
    ab = pyro.param("ab", torch.tensor([0.2, 0.5]))
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        pyro.sample("z", dist.Bernoulli(logits=ab[0] + ab[1] * x[idx]))


def two_layer_model(x):
    w = pyro.param("w", torch.tensor([0.3, -0.4, 0.9]))
    with pyro.plate("data", len(x)):
        z2 = pyro.sample("z2", dist.Bernoulli(logits=w[0]))
        z1 = pyro.sample("z1", dist.Bernoulli(logits=w[1] + 2.0 * z2))
        pyro.sample("x", dist.Normal(w[2] * (z1 + z2), 1.0), obs=x)


def two_layer_guide(x):
    ab = pyro.param("ab", torch.tensor([0.1, 0.3, -0.2]))
    with pyro.plate("data", len(x)):
        z1 = pyro.sample("z1", dist.Bernoulli(logits=ab[0] * x))
        pyro.sample("z2", dist.Bernoulli(logits=ab[1] + ab[2] * z1))


def gauss_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def gauss_guide(x, normal=NonreparameterizedNormal):
    """q(z_i) = normal(loc_i, exp(log_scale_i)); by default not reparameterizable."""
    loc = pyro.param("loc", torch.full((len(x),), 0.5))
    log_scale = pyro.param("log_scale", torch.full((len(x),), -0.3))
    with pyro.plate("data", len(x)):
        pyro.sample("z", normal(loc, log_scale.exp()))


def gauss_exact_loss_grads(x):
    """d(-ELBO) for gauss_model/gauss_guide, from the closed form
    ELBO_i = -(m^2 + s^2)/2 - ((x - m)^2 + s^2)/2 + log s + const."""
    loc = pyro.param("loc").detach()
    scale = pyro.param("log_scale").detach().exp()
    return {"loc": -(x - 2 * loc), "log_scale": -(1 - 2 * scale**2)}


def offset_model(x):
    """bern_model plus a strongly input-dependent term per datapoint that depends on z_i
    only weakly: the learning signal of z_i carries an offset of about -2 x_i^2 that a
    scalar baseline cannot remove but a per-datapoint one can. (A term that did not
    depend on z_i at all would not be in its signal.)"""
    w = pyro.param("w", torch.tensor([0.4, 1.2]))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Bernoulli(logits=w[0]))
        pyro.sample("x", dist.Normal(3.0 * w[1] * z - 1.0, 1.0), obs=x)
        pyro.sample("y", dist.Normal(0.1 * z, 1.0), obs=2.0 * x)


class MixedModel(nn.Module):
    """z_i ~ Bern(sigmoid(w0)), y_i | z_i ~ N(w1 z_i + w2, 1), x_i | y_i ~ N(y_i, 0.5) in
    a data plate: a discrete and a reparameterizable latent, which every objective supports.
    A module (for the plain PyTorch route) registered with ``pyro.module`` (for SVI) such
    that the param store is authoritative: a restored store reaches a fresh module."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.4, 1.2, -0.3]))

    def forward(self, x):
        pyro.module("model", self, update_module_params=True)
        w = self.w
        with pyro.plate("data", x.shape[-1], device=x.device):
            z = pyro.sample("z", dist.Bernoulli(logits=w[0]))
            y = pyro.sample("y", dist.Normal(w[1] * z + w[2], 1.0))
            pyro.sample("x", dist.Normal(y, 0.5), obs=x)


class MixedGuide(nn.Module):
    """q(z_i | x_i) = Bern(sigmoid(a0 + a1 x_i)),
    q(y_i | z_i, x_i) = N(a2 + a3 x_i + a4 z_i, exp(a5)); it broadcasts over leading
    dimensions of ``x`` (vectorized dreams)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.2, 0.5, 0.1, 0.6, 0.8, -0.5]))

    def forward(self, x):
        pyro.module("guide", self, update_module_params=True)
        a = self.a
        with pyro.plate("data", x.shape[-1], device=x.device):
            z = pyro.sample("z", dist.Bernoulli(logits=a[0] + a[1] * x))
            pyro.sample("y", dist.Normal(a[2] + a[3] * x + a[4] * z, a[5].exp()))

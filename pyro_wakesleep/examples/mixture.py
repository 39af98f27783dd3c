"""The Gaussian mixture of Le et al. (2019), a model with a discrete latent whose
posterior is known exactly, and the two exact metrics used to judge learning on it.

Generative model, with :math:`C` clusters :math:`c \\in \\{0, \\ldots, C-1\\}`:

.. math::

    p_\\theta(c) = \\mathrm{softmax}(0.5\\,\\theta)_c, \\qquad
    p(x \\mid c) = \\mathcal N(x;\\, 10c,\\, 5^2),

fitted to data from the true weights :math:`\\pi_c = (c+5)/\\sum_{c'}(c'+5)`
(:math:`= (c+5)/290` for :math:`C = 20`) starting from :math:`\\theta_c = 2(C-1-c)`, with
the inference network :math:`q_\\phi(c \\mid x) = \\mathrm{softmax}(\\eta_\\phi(x))`, a
1→16→16→C tanh multilayer perceptron. The exact posterior is
:math:`p_\\theta(c \\mid x) \\propto p_\\theta(c)\\,\\mathcal N(x; 10c, 5^2)`.

Reference: Le, Kosiorek, Siddharth, Teh & Wood (2019), *Revisiting reweighted
wake-sleep for models with stochastic control flow*, UAI, section 4.1.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyro_wakesleep.examples.models import ParamStoreNamed

__all__ = ["GaussianMixture", "true_mixture_weights"]


def true_mixture_weights(num_clusters: int = 20) -> Tensor:
    """The true mixture weights :math:`\\pi_c = (c+5)/\\sum_{c'}(c'+5)`.

    :param int num_clusters: :math:`C`.
    :rtype: torch.Tensor
    """
    weights = torch.arange(num_clusters, dtype=torch.get_default_dtype()) + 5.0
    return weights / weights.sum()


class _Generative(nn.Module):
    def __init__(self, num_clusters: int) -> None:
        super().__init__()
        c = torch.arange(num_clusters, dtype=torch.get_default_dtype())
        self.theta = nn.Parameter(2.0 * (num_clusters - 1 - c))


class GaussianMixture(ParamStoreNamed):
    """The Gaussian mixture of Le et al. (2019) with its inference network (see the
    module docstring). :meth:`model` registers only the generative parameter
    :math:`\\theta` (as ``"<name>.generative"``), :meth:`guide` only the inference
    network (``"<name>.recognition"``); ``name`` is unique by default (``"gmm"``,
    ``"gmm_1"``, …; see :class:`~pyro_wakesleep.examples.models.ParamStoreNamed`), so two
    instances in one process train independently. Sites: the latent ``"c"`` and the
    observed ``"x"``, both in the plate ``"data"`` (``dim=-1``) of size ``x.shape[-1]``;
    the guide broadcasts over leading dimensions of ``x``, so vectorized dreams work.

    :param int num_clusters: :math:`C` (20 in the paper).
    :param float spacing: distance between consecutive cluster means (10).
    :param float scale: standard deviation of every cluster (5).
    :param int hidden: width of the two tanh layers of the inference network (16).
    :param float softmax_multiplier: the factor on :math:`\\theta` in the prior (0.5).
    :param str name: the prefix of the param-store names (default: the first free of
        ``"gmm"``, ``"gmm_1"``, …).
    :raises TypeError: if ``name`` is neither a ``str`` nor ``None``.
    """

    default_name = "gmm"

    means: Tensor
    true_weights: Tensor

    def __init__(
        self, num_clusters: int = 20, spacing: float = 10.0, scale: float = 5.0,
        hidden: int = 16, softmax_multiplier: float = 0.5, *, name: str | None = None,
    ) -> None:
        super().__init__(name)
        if num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {num_clusters}")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.num_clusters = int(num_clusters)
        self.scale = float(scale)
        self.softmax_multiplier = float(softmax_multiplier)
        self.generative = _Generative(self.num_clusters)
        self.recognition = nn.Sequential(
            nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, self.num_clusters),
        )
        self.register_buffer(
            "means", float(spacing) * torch.arange(self.num_clusters,
                                                   dtype=torch.get_default_dtype())
        )
        self.register_buffer("true_weights", true_mixture_weights(self.num_clusters))

    def prior_logits(self) -> Tensor:
        """The logits :math:`0.5\\,\\theta` of :math:`p_\\theta(c)`."""
        return self.softmax_multiplier * self.generative.theta

    def mixture_weights(self) -> Tensor:
        """The model's mixture weights :math:`\\pi_\\theta = \\mathrm{softmax}(0.5\\,\\theta)`."""
        return torch.softmax(self.prior_logits(), -1)

    def model(self, x: Tensor) -> None:
        """The generative model :math:`p_\\theta(c, x)` for a batch ``x`` of shape
        ``(B,)``."""
        self._register("generative", self.generative)
        with pyro.plate("data", x.shape[-1], dim=-1):
            c = pyro.sample("c", dist.Categorical(logits=self.prior_logits()))
            pyro.sample("x", dist.Normal(self.means[c], self.scale), obs=x)

    def guide(self, x: Tensor) -> None:
        """The inference network :math:`q_\\phi(c \\mid x)`."""
        self._register("recognition", self.recognition)
        with pyro.plate("data", x.shape[-1], dim=-1):
            pyro.sample("c", dist.Categorical(logits=self.recognition(x.unsqueeze(-1))))

    def guide_probs(self, x: Tensor) -> Tensor:
        """:math:`q_\\phi(c \\mid x)`, shape ``x.shape + (C,)``."""
        return torch.softmax(self.recognition(x.unsqueeze(-1)), -1)

    def posterior(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """The exact posterior :math:`p(c \\mid x) \\propto \\pi_c \\mathcal N(x; 10c, 5^2)`,
        shape ``x.shape + (C,)``.

        :param torch.Tensor weights: the mixture weights :math:`\\pi` (default: the true
            ones).
        """
        weights = self.true_weights if weights is None else weights
        log_lik = dist.Normal(self.means, self.scale).log_prob(x.unsqueeze(-1))
        return torch.softmax(weights.log() + log_lik, -1)

    def sample(self, num: int, weights: Tensor | None = None) -> Tensor:
        """``num`` draws of :math:`x` from the mixture with weights ``weights`` (default:
        the true ones), using torch's global random state.

        :rtype: torch.Tensor
        """
        weights = self.true_weights if weights is None else weights
        c = torch.multinomial(weights, num, replacement=True)
        return self.means[c] + self.scale * torch.randn(num, device=self.means.device)

    def weight_error(self) -> float:
        """The exact :math:`\\lVert \\pi_\\theta - \\pi_{\\rm true} \\rVert_2`."""
        with torch.no_grad():
            return float((self.mixture_weights() - self.true_weights).norm())

    def posterior_error(self, x: Tensor, weights: Tensor | None = None) -> float:
        """The batch mean of :math:`\\lVert p(c \\mid x) - q_\\phi(c \\mid x)\\rVert_2`,
        exact for each :math:`x`, with :math:`p` the posterior under ``weights``
        (default: the true weights, as in Le et al.).
        """
        with torch.no_grad():
            diff = self.posterior(x, weights) - self.guide_probs(x)
            return float(diff.norm(dim=-1).mean())

"""Relaxed gradients as a per-site option: a discrete guide site that draws its hard value
and carries a *biased* surrogate gradient, so that every objective treats it as pathwise.

:func:`relaxed` wraps a :class:`~pyro.distributions.Bernoulli` or
:class:`~pyro.distributions.OneHotCategorical` into a :class:`RelaxedSite`: ``has_rsample``
is true, and ``rsample`` returns an exact draw :math:`b` of the wrapped distribution whose
gradient is that of one of the estimators of :mod:`pyro_wakesleep.relaxation`
(straight-through, straight-through Gumbel-softmax, ReinMax, Gumbel-Rao). Objectives need
no change: :class:`~pyro_wakesleep.ScoreFunctionELBO`, :class:`~pyro_wakesleep.VimcoELBO`
and :class:`pyro.infer.Trace_ELBO` take the site's gradient through the draw, as they do
for a reparameterized continuous site. :func:`relax` does the wrapping without rewriting
the guide, from the sample statements' ``infer={"relaxation": ..., "temperature": ...}``
or a ``{site: relaxation}`` mapping.

A Bernoulli site is the two-class categorical with logits :math:`(0, \\alpha)`, on which
each estimator is applied as written for categoricals. A
:class:`~pyro.distributions.Categorical` (index) site cannot carry a pathwise gradient:
draw a one-hot instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.poutine.messenger import Messenger
from torch import Tensor
from torch.distributions import Bernoulli, Categorical, Independent, OneHotCategorical

from pyro_wakesleep.relaxation import (
    _uniform,
    gumbel_rao,
    one_hot_of,
    reinmax,
    straight_through,
    straight_through_gumbel_softmax,
)

__all__ = ["RELAXATIONS", "RelaxedSite", "relax", "relaxed"]

#: the names :func:`relaxed` accepts
RELAXATIONS = ("straight_through", "gumbel_softmax", "reinmax", "gumbel_rao")


class RelaxedSite(TorchDistribution):
    """A Bernoulli or one-hot categorical distribution whose ``rsample`` is an exact draw
    carrying the surrogate gradient of a relaxation; use :func:`relaxed` to build one.
    ``sample``, ``log_prob`` (differentiable in the value, as the estimators need),
    ``enumerate_support``, ``mean`` and ``entropy`` are the wrapped distribution's.

    :param base: the wrapped :class:`~torch.distributions.Bernoulli` or
        :class:`~torch.distributions.OneHotCategorical` (no ``Independent``).
    :param str relaxation: one of :data:`RELAXATIONS`.
    :param float temperature: :math:`\\lambda > 0`.
    :param int num_samples: :math:`K`, the conditional draws of ``"gumbel_rao"``.
    """

    arg_constraints: ClassVar[dict] = {}
    has_rsample = True

    def __init__(
        self, base: Bernoulli | OneHotCategorical, relaxation: str,
        temperature: float = 1.0, num_samples: int = 10,
    ) -> None:
        self.base = base
        self.relaxation = relaxation
        self.temperature = temperature
        self.num_samples = num_samples
        self._bernoulli = isinstance(base, Bernoulli)
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self) -> Any:
        return self.base.support

    @property
    def has_enumerate_support(self) -> bool:  # type: ignore[override]
        return bool(self.base.has_enumerate_support)

    @property
    def mean(self) -> Tensor:
        return self.base.mean

    @property
    def variance(self) -> Tensor:
        return self.base.variance

    def entropy(self) -> Tensor:
        return self.base.entropy()

    def enumerate_support(self, expand: bool = True) -> Tensor:
        return self.base.enumerate_support(expand)

    def expand(self, batch_shape: Any, _instance: Any = None) -> RelaxedSite:
        return RelaxedSite(self.base.expand(batch_shape), self.relaxation,
                           self.temperature, self.num_samples)

    def sample(self, sample_shape: Any = ()) -> Tensor:
        with torch.no_grad():
            return self.base.sample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._bernoulli:
            return self.base.log_prob(value)
        return (value * torch.log_softmax(self.base.logits, -1)).sum(-1)

    def _logits(self, sample_shape: torch.Size) -> Tensor:
        """The categorical logits, classes last, expanded to ``sample_shape`` in front."""
        if self._bernoulli:
            alpha = self.base.logits
            logits = torch.stack([torch.zeros_like(alpha), alpha], -1)
        else:
            logits = self.base.logits
        return logits.expand(sample_shape + logits.shape)

    def rsample(self, sample_shape: Any = ()) -> Tensor:
        logits = self._logits(torch.Size(sample_shape))
        num_classes = logits.shape[-1]
        if self.relaxation == "gumbel_softmax":
            with torch.no_grad():
                gumbel = -torch.log(-torch.log(_uniform(torch.rand_like(logits))))
            out = straight_through_gumbel_softmax(gumbel, logits, self.temperature)
        else:
            with torch.no_grad():
                index = torch.distributions.Categorical(logits=logits).sample()
            one_hot = one_hot_of(index, num_classes, logits.dtype)
            if self.relaxation == "straight_through":
                out = straight_through(one_hot, logits, self.temperature)
            elif self.relaxation == "reinmax":
                out = reinmax(one_hot, logits, self.temperature)
            else:
                v = torch.rand((self.num_samples, *logits.shape), dtype=logits.dtype,
                               device=logits.device)
                out = gumbel_rao(one_hot, logits, v, self.temperature)
        return out[..., 1] if self._bernoulli else out


def relaxed(
    fn: Any, relaxation: str, temperature: float = 1.0, num_samples: int = 10,
    *, site: str | None = None,
) -> TorchDistribution:
    """``fn`` with the surrogate gradient of ``relaxation`` on its draws (a biased
    estimator; see :mod:`pyro_wakesleep.relaxation` for each one's gradient):

    .. code-block:: python

        pyro.sample("z", relaxed(dist.Bernoulli(logits=a), "reinmax", temperature=1.0))

    :param fn: a :class:`~pyro.distributions.Bernoulli` or
        :class:`~pyro.distributions.OneHotCategorical`, possibly inside ``Independent``
        (``.to_event``), which is kept outside the wrapper.
    :param str relaxation: ``"straight_through"``, ``"gumbel_softmax"`` (its
        straight-through form: hard forward), ``"reinmax"`` or ``"gumbel_rao"``.
    :param float temperature: :math:`\\lambda > 0`.
    :param int num_samples: :math:`K` of ``"gumbel_rao"``.
    :param str site: the site's name, for error messages.
    :rtype: RelaxedSite (or ``Independent`` of one)
    :raises ValueError: for an unknown relaxation, a bad temperature or :math:`K`, or a
        distribution that is not Bernoulli or one-hot categorical.
    """
    where = f" at site '{site}'" if site else ""
    if relaxation not in RELAXATIONS:
        raise ValueError(f"unknown relaxation {relaxation!r}{where}; expected one of {RELAXATIONS}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}{where}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}{where}")
    if isinstance(fn, Independent):
        inner = relaxed(fn.base_dist, relaxation, temperature, num_samples, site=site)
        return dist.Independent(inner, fn.reinterpreted_batch_ndims)
    if isinstance(fn, RelaxedSite):
        fn = fn.base
    if isinstance(fn, Categorical):
        raise ValueError(
            f"a Categorical (index) draw{where} cannot carry a pathwise gradient; use "
            "OneHotCategorical for relaxation {relaxation!r}"
        )
    if not isinstance(fn, (Bernoulli, OneHotCategorical)):
        raise ValueError(
            f"relaxation {relaxation!r}{where} needs a Bernoulli or OneHotCategorical, "
            f"got {type(fn).__name__}"
        )
    return RelaxedSite(fn, relaxation, float(temperature), num_samples)


class RelaxMessenger(Messenger):
    """Wraps the latent sample sites named in ``sites`` or with an ``infer`` key
    ``"relaxation"`` by :func:`relaxed` (``infer`` keys ``"temperature"`` and
    ``"num_samples"`` optional)."""

    def __init__(self, sites: Mapping[str, str | Mapping[str, Any]] | None = None) -> None:
        super().__init__()
        self.sites = dict(sites or {})

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"]:
            return
        options: dict[str, Any] = {}
        given = self.sites.get(msg["name"])
        if isinstance(given, str):
            options["relaxation"] = given
        elif given is not None:
            options.update(given)
        infer = msg.get("infer") or {}
        for key in ("relaxation", "temperature", "num_samples"):
            if key in infer and key not in options:
                options[key] = infer[key]
        if "relaxation" in options:
            unknown = set(options) - {"relaxation", "temperature", "num_samples"}
            if unknown:
                raise ValueError(f"unknown relaxation options {sorted(unknown)} at site "
                                 f"'{msg['name']}'")
            msg["fn"] = relaxed(msg["fn"], site=msg["name"], **options)


def relax(
    fn: Callable, sites: Mapping[str, str | Mapping[str, Any]] | None = None
) -> Callable:
    """``fn`` (a guide) with relaxed gradients at its discrete sites, without rewriting it:
    at the sites whose sample statements say ``infer={"relaxation": "reinmax",
    "temperature": 0.5}`` and at those named in ``sites`` (``{"z": "gumbel_rao"}`` or
    ``{"z": {"relaxation": "gumbel_rao", "num_samples": 100}}``; these take precedence).

    :param callable fn: the program.
    :param dict sites: site name → relaxation name or options of :func:`relaxed`.
    :rtype: callable
    """
    messenger = RelaxMessenger(sites)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with messenger:
            return fn(*args, **kwargs)

    return wrapped

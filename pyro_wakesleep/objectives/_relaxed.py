"""The relaxed runs of REBAR and RELAX: guide and model run again with a relaxed value
:math:`\\sigma_\\lambda(z)` at one discrete site, the sites before it replayed from the
main run and later discrete sites relaxed with their own fixed noise, and the
differentiable learning signal :math:`f` read from such a run.

Private: :class:`~pyro_wakesleep.objectives.RebarELBO` (and so
:class:`~pyro_wakesleep.objectives.RelaxELBO`) is its only user.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor
from torch.distributions import Bernoulli, Independent, OneHotCategorical

from pyro_wakesleep.downstream import site_signal
from pyro_wakesleep.particles import Particles, check_finite_sites, run_particles
from pyro_wakesleep.relaxation import relaxed_bernoulli, relaxed_one_hot


def base(fn: Any) -> Any:
    """``fn`` without its :class:`~torch.distributions.Independent` wrappers."""
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn


def relax(kind: str, z: Tensor, temperature: Tensor) -> Tensor:
    """:math:`\\sigma_\\lambda(z)`: ``z`` relaxed at ``temperature``, on (0, 1) for a
    ``"bernoulli"`` site and on the simplex otherwise."""
    return relaxed_bernoulli(z, temperature) if kind == "bernoulli" else relaxed_one_hot(
        z, temperature)


class _LinearOneHot(dist.OneHotCategorical):
    """``OneHotCategorical`` whose log-density is linear in the value,
    :math:`\\sum_k v_k \\log\\theta_k` (torch's takes the argmax: not smooth)."""

    def log_prob(self, value: Tensor) -> Tensor:
        return (value * self.logits).sum(-1)


def _smooth(fn: Any) -> Any:
    """``fn`` with a one-hot categorical inside replaced by :class:`_LinearOneHot`."""
    if isinstance(fn, Independent):
        return Independent(_smooth(fn.base_dist), fn.reinterpreted_batch_ndims)
    if isinstance(fn, OneHotCategorical):
        return _LinearOneHot(logits=fn.logits, validate_args=False)
    return fn


class _Smooth(Messenger):
    """The model with smooth log-densities at the relaxed sites."""

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        if msg["name"] in self.names:
            msg["fn"] = _smooth(msg["fn"])


class _RelaxedGuide(Messenger):
    """The guide with the sites before ``site`` replayed, ``value`` at ``site`` and every
    later discrete site relaxed with its fixed noise :math:`z - \\ell` from the main run
    (independent of the noise at ``site``), so the run is a smooth function of ``value``."""

    def __init__(self, owner: str, upstream: dict[str, Any], site: str, value: Tensor,
                 later: dict[str, tuple[str, Tensor, Tensor]]) -> None:
        super().__init__()
        self.owner, self.upstream, self.site, self.value = owner, upstream, site, value
        self.later = later

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        name = msg["name"]
        if msg["is_observed"] or (isinstance(msg["fn"], _Subsample)
                                  and name not in self.upstream):
            return
        if name in self.upstream:
            msg["value"] = self.upstream[name]
        elif name == self.site:
            msg["value"], msg["fn"] = self.value, _smooth(msg["fn"])
        elif name in self.later:
            kind, noise, temperature = self.later[name]
            msg["value"] = relax(kind, base(msg["fn"]).logits + noise, temperature)
            msg["fn"] = _smooth(msg["fn"])
        elif msg["fn"].has_rsample:
            return
        else:
            raise ValueError(
                f"{self.owner}: guide site '{name}' ({type(base(msg['fn'])).__name__}), "
                f"downstream of the relaxed site '{self.site}', can be neither relaxed nor "
                "reparameterized"
            )
        msg["done"] = True


def upstream_values(owner: str, main: Particles, site: str, kind: str) -> dict[str, Any]:
    """The values of the guide's latent sites before ``site`` in the main run; raises
    (naming the site) when the model cannot evaluate a relaxed value at ``site``."""
    model_trace, guide_trace = main.traces[0]
    model_fn = base(model_trace.nodes[site]["fn"]) if site in model_trace.nodes else None
    if not isinstance(model_fn, (Bernoulli, OneHotCategorical)) or kind == "categorical":
        raise ValueError(
            f"{owner}: the model cannot evaluate a relaxed value at site '{site}' "
            f"(guide: {kind}, model: {type(model_fn).__name__}); relaxed values need "
            "Bernoulli or OneHotCategorical at the site in both, or use "
            "RelaxELBO(relaxed_signal=False)"
        )
    names = list(guide_trace.nodes)
    return {name: node["value"] for name, node in guide_trace.nodes.items()
            if names.index(name) < names.index(site) and node["type"] == "sample"
            and not node["is_observed"]}


def relaxed_runner(owner: str, program: tuple[Callable, Callable, tuple, dict],
                   main: Particles, site: str, upstream: dict[str, Any],
                   later: dict[str, tuple[str, Tensor, Tensor]],
                   ) -> Callable[[Tensor], Particles]:
    """A function running ``program`` (model, guide, args, kwargs) as ``main`` ran it,
    with a relaxed value at ``site``, the ``upstream`` values replayed and the ``later``
    sites (``name: (kind, noise, temperature)``) relaxed."""
    model, guide, args, kwargs = program
    smooth_model = _Smooth({site, *later})(model)

    def run(relaxed: Tensor) -> Particles:
        relaxed_guide = _RelaxedGuide(owner, upstream, site, relaxed, later)(guide)
        try:
            with pyro.validation_enabled(False):
                out = run_particles(
                    smooth_model, relaxed_guide, args, kwargs,
                    num_particles=main.num_particles, vectorize=main.vectorized,
                    max_plate_nesting=main.max_plate_nesting, pyro_checks=False, track=True)
            check_finite_sites(out)
        except (RuntimeError, TypeError, IndexError, ValueError) as error:
            if str(error).startswith(owner):
                raise
            raise ValueError(
                f"{owner}: the model and guide could not be evaluated at the relaxed "
                f"value of site '{site}' ({type(error).__name__}: {error}); the code "
                "using the site's value must accept floats in (0, 1) (Bernoulli) or on "
                "the simplex (OneHotCategorical)"
            ) from error
        return out

    return run


def relaxed_signal(run: Particles, site: str) -> tuple[Tensor, Tensor]:
    """Differentiable :math:`f` of a relaxed run: the cost terms that depend on ``site``
    per element of its plates (:func:`~pyro_wakesleep.downstream.site_signal`), and their
    total (each term counted once)."""
    signal, total = site_signal(run, site)
    return signal, total.sum()

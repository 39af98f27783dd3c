"""The step shared by :class:`~pyro_wakesleep.objectives.DoubleControlVariateELBO` and
:class:`~pyro_wakesleep.objectives.RodeoELBO`: leave-one-out over :math:`K \\ge 2`
independent draws, with control variates built from the gradient of the ELBO with
respect to each Bernoulli draw (treated as a real number).

The particles run once, with each Bernoulli guide draw made a leaf tensor that requires
grad (:class:`_DifferentiableDraws`), so that one backward pass of the run's ELBO gives
:math:`g_k = \\nabla_{x_k} (\\log p - \\log q)` at every draw (later draws held fixed),
with no further run of model or guide. Each site's draws are then laid out as
:mod:`pyro_wakesleep.stein` wants them, ``(K, *B, D)``, and the subclass's estimate
:math:`\\hat g_k` (per draw, with respect to the site's logits) enters the surrogate as
:math:`\\frac1K \\sum_k \\hat g_k \\cdot \\eta_k`. Learned coefficients and functions are
trained by descending :math:`\\sum (\\frac1K \\sum_k \\hat g_k)^2`, the estimate's
second moment, whose gradient with respect to them is that of its variance (its mean
does not depend on them). Private: the two classes document the estimators.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn
from torch.distributions import Bernoulli, Independent

from pyro_wakesleep.control_variates import ControlVariate
from pyro_wakesleep.downstream import learning_signals
from pyro_wakesleep.objectives.base import Objective
from pyro_wakesleep.particles import (
    Particles,
    check_all_finite,
    check_finite_sites,
    log_guide,
    log_joint,
)

_NO_SHAPE = torch.Size()


class _LeafBernoulli(dist.Bernoulli):
    """A Bernoulli whose draws are leaf tensors that require grad (the value a sampler
    returns is unchanged: only autograd sees it)."""

    def sample(self, sample_shape: torch.Size = _NO_SHAPE) -> Tensor:
        return super().sample(sample_shape).requires_grad_()


def _leaf_draws(fn: Any) -> Any:
    """``fn`` with the Bernoulli inside (under ``Independent``/mask wrappers) drawing
    leaves, or ``fn`` itself for any other distribution."""
    if isinstance(fn, Independent):
        base = _leaf_draws(fn.base_dist)
        return fn if base is fn.base_dist else dist.Independent(
            base, fn.reinterpreted_batch_ndims)
    if isinstance(fn, MaskedDistribution):
        base = _leaf_draws(fn.base_dist)
        return fn if base is fn.base_dist else base.mask(fn._mask)
    if isinstance(fn, Bernoulli) and not isinstance(fn, _LeafBernoulli):
        return _LeafBernoulli(logits=fn.logits, validate_args=False)
    return fn


class _DifferentiableDraws(Messenger):
    """The guide with its Bernoulli draws made leaves that require grad. Applied around
    the guide, so inside the particle plate, which broadcasts (and so keeps) the
    replaced distribution."""

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        if not msg["is_observed"] and msg["value"] is None:
            msg["fn"] = _leaf_draws(msg["fn"])


def _base(fn: Any) -> tuple[Any, int]:
    """``fn`` without its ``Independent``/mask wrappers, and its event dims."""
    event = 0
    while isinstance(fn, (Independent, MaskedDistribution)):
        if isinstance(fn, Independent):
            event += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    return fn, event


def _pad(x: Tensor, nesting: int, trailing: int) -> Tensor:
    """``x`` with its batch dims (all but the last ``trailing``) padded to ``nesting``."""
    return x.reshape((1,) * (nesting - x.dim() + trailing) + x.shape)


class _Layout(NamedTuple):
    """How a site's ``(K, *batch, *event)`` tensors become ``(K, *B, D)``: batch dims
    that share one value of the learning signal join the event dims in ``D``."""

    perm: list[int]
    kept: list[int]  # the sizes of B
    moved: list[int]  # the sizes of the batch dims moved into D, then the event dims

    def group(self, x: Tensor) -> Tensor:
        y = x.permute(self.perm)
        return y.reshape((y.shape[0], *self.kept, -1))

    def ungroup(self, x: Tensor) -> Tensor:
        y = x.reshape((x.shape[0], *self.kept, *self.moved))
        return y.permute(sorted(range(len(self.perm)), key=self.perm.__getitem__))


def _layout(value_shape: torch.Size, signal_shape: torch.Size, nesting: int) -> _Layout:
    batch = value_shape[1:1 + nesting]
    merged = [i for i in range(nesting) if signal_shape[1 + i] == 1 and batch[i] != 1]
    kept = [i for i in range(nesting) if i not in merged]
    event = list(range(1 + nesting, len(value_shape)))
    perm = [0, *(1 + i for i in kept), *(1 + i for i in merged), *event]
    return _Layout(perm, [batch[i] for i in kept],
                   [batch[i] for i in merged] + [value_shape[d] for d in event])


class SiteDraws(NamedTuple):
    """One Bernoulli site's present draws as :mod:`pyro_wakesleep.stein` wants them."""

    logits: Tensor  # (n, *batch, *event), differentiable
    layout: _Layout
    f: Tensor  # (n, *B)
    grads: Tensor  # (n, *B, D)
    values: Tensor  # (n, *B, D)
    probs: Tensor  # (n, *B, D), detached


def default_network(hidden: int) -> nn.Module:
    """RODEO's learned function :math:`H_\\psi: \\mathbb R^2 \\to \\mathbb R^2` as in the
    authors' code: one hidden layer of ``hidden`` units, LeakyReLU(0.3)."""
    return nn.Sequential(nn.Linear(2, hidden), nn.LeakyReLU(0.3), nn.Linear(hidden, 2))


def seeded(site: str, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` with its initial weights drawn from a seed made of the site's name, not
    from the step's random stream (so they are the same in every route)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(site.encode()))
        return make()


class GradientInformedELBO(Objective):
    """Base class of the two objectives (see the module docstring)."""

    def __init__(self, num_particles: int = 2, learn: bool = True, **options: Any) -> None:
        super().__init__(num_particles, **options)
        if self.num_particles < 2:
            raise ValueError(f"{type(self).__name__} needs num_particles >= 2 (leave-one-out "
                             f"over the draws), got num_particles={self.num_particles}")
        self.learn = bool(learn)

    def _new_state(self, site: str) -> ControlVariate:  # pragma: no cover
        raise NotImplementedError

    def _estimate(self, state: ControlVariate, draws: SiteDraws) -> Tensor:  # pragma: no cover
        """:math:`\\hat g_k` per present draw, ``(n, *B, D)``."""
        raise NotImplementedError

    def _state(self, site: str, like: Tensor) -> ControlVariate:
        state = self.control_variates.get(site)
        if state is None:
            state = self._new_state(site).to(like)
            self.control_variates.set(site, state)
        self.register(site, state)
        return state

    def _check_site(self, name: str, node: Mapping[str, Any]) -> bool:
        """Whether a guide site is Bernoulli (``False``: reparameterizable); raises
        naming any other site."""
        fn, _ = _base(node["fn"])
        if isinstance(fn, Bernoulli):
            return True
        if node["fn"].has_rsample:
            return False
        raise ValueError(
            f"{type(self).__name__}: guide site '{name}' has distribution "
            f"{type(node['fn']).__name__} ({type(fn).__name__}), which is neither "
            "Bernoulli nor reparameterizable; its control variates need binary latents "
            "(use ScoreFunctionELBO, DisarmELBO or VimcoELBO for it)"
        )

    def loss_and_surrogate(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, update: bool
    ) -> tuple[Tensor, Tensor]:
        vectorize = self.vectorize_particles and self.num_particles > 1
        self._know_plate_nesting(model, guide, args, kwargs, vectorize)
        gradients = torch.is_grad_enabled()
        run = _DifferentiableDraws()(guide) if gradients else guide
        main = self.particles(model, run, args, kwargs, check_finite=False, track=True)
        sites = [n for n in main.guide_latents if self._check_site(n, main.sites[n].node)]
        signals = learning_signals(main, sites)
        check_all_finite([(s, f"learning signal at site '{n}'") for n, s in signals.items()])
        check_finite_sites(main)
        log_p = log_joint(main)
        elbo = log_p - log_guide(main)
        surrogate = log_p - log_guide(main, lambda s: bool(s.node["fn"].has_rsample))
        k = self.num_particles
        if not gradients or not sites:
            return -elbo.detach() / k, -surrogate / k
        grads = self._draw_gradients(main, sites, elbo)
        train = update and self.learn and self.control_variates.training
        variance = torch.zeros(())
        for name in sites:
            draws = self._site_draws(main, name, signals[name], grads[name])
            if draws is None:
                continue
            if draws.f.shape[0] == 1:  # a site of one particle only: no baseline
                estimate = draws.f.unsqueeze(-1) * (draws.values - draws.probs)
            else:
                estimate = self._estimate(self._state(name, draws.logits), draws)
            if train and estimate.requires_grad:
                variance = variance + (estimate.sum(0) / k).pow(2).sum()
            surrogate = surrogate + (draws.layout.ungroup(estimate.detach())
                                     * draws.logits).sum()
        return -elbo.detach() / k, -surrogate / k + variance

    def _draw_gradients(self, main: Particles, sites: list[str],
                        elbo: Tensor) -> dict[str, list[Tensor | None]]:
        """:math:`\\nabla_x (\\log p - \\log q)` at every Bernoulli draw, per run (``None``
        where the site is absent)."""
        leaves: list[tuple[str, int, Tensor]] = []
        for name in sites:
            for index, (_, guide_trace) in enumerate(main.traces):
                node = guide_trace.nodes.get(name)
                value = None if node is None else node["value"]
                if isinstance(value, Tensor) and value.requires_grad and value.is_leaf:
                    leaves.append((name, index, value))
        found = torch.autograd.grad(elbo, [v for _, _, v in leaves], allow_unused=True,
                                    retain_graph=True) if leaves else ()
        out: dict[str, list[Tensor | None]] = {n: [None] * len(main.traces) for n in sites}
        for (name, index, value), grad in zip(leaves, found, strict=True):
            out[name][index] = torch.zeros_like(value) if grad is None else grad
        return out

    def _site_draws(self, main: Particles, name: str, signal: Tensor,
                    grads: list[Tensor | None]) -> SiteDraws | None:
        """The site's present draws, grouped; ``None`` if it is in no particle."""
        nesting = main.max_plate_nesting
        logits: list[Tensor] = []
        values: list[Tensor] = []
        gradients: list[Tensor] = []
        rows: list[int] = []
        for index, (_, guide_trace) in enumerate(main.traces):
            node = guide_trace.nodes.get(name)
            if node is None:
                continue
            fn, event = _base(node["fn"])
            value, logit = torch.broadcast_tensors(cast(Tensor, node["value"]).detach(),
                                                   fn.logits)
            grad = grads[index]
            grad = torch.zeros_like(value) if grad is None else grad.detach().expand_as(value)
            for part, store in ((logit, logits), (value, values), (grad, gradients)):
                store.append(_pad(part, nesting + 1, event) if main.vectorized
                             else _pad(part, nesting, event).unsqueeze(0))
            rows.append(index)
        if not rows:
            return None
        logit, value = torch.cat(logits), torch.cat(values).to(logits[0].dtype)
        grad = torch.cat(gradients).to(value)
        if not main.vectorized:
            signal = signal[torch.tensor(rows, device=signal.device)]
        layout = _layout(value.shape, signal.shape, nesting)
        f = signal.reshape([signal.shape[0], *layout.kept])
        return SiteDraws(logit, layout, f, layout.group(grad), layout.group(value),
                         layout.group(torch.sigmoid(logit.detach())))

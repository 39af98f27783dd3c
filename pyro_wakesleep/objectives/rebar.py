"""REBAR: the score function with a concrete-relaxation control variate, its temperature
and scale learned online to minimise the estimator's variance."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Bernoulli, Categorical, Independent, OneHotCategorical

from pyro_wakesleep._validation import check_bool, check_real
from pyro_wakesleep.control_variates import ControlVariate
from pyro_wakesleep.downstream import learning_signals
from pyro_wakesleep.objectives._relaxed import (
    relax,
    relaxed_runner,
    relaxed_signal,
    upstream_values,
)
from pyro_wakesleep.objectives.base import Objective
from pyro_wakesleep.particles import (
    Particles,
    check_all_finite,
    check_finite_sites,
    log_guide,
    log_joint,
)
from pyro_wakesleep.relaxation import conditional_gumbel, conditional_logistic, through_noise

__all__ = ["RebarELBO"]


class _SiteRelaxation(ControlVariate):
    """The learned parameters of one site's relaxation control variate: ``log_temperature``
    (:math:`\\log\\lambda`), ``scale`` (:math:`\\eta`) and, for RELAX, ``surrogate``
    (:math:`r_\\psi`). Not a learning-signal transform: the objectives read its fields."""

    def __init__(self, temperature: float, scale: float, surrogate: nn.Module | None) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.surrogate = surrogate


class _Step(NamedTuple):
    """What one run's estimate reads: the program, the main run, its discrete sites'
    views and learned states, and whether the learned parameters train."""

    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict
    main: Particles
    views: dict[str, _View]
    states: dict[str, _SiteRelaxation]
    train: bool


class _View(NamedTuple):
    """A discrete guide site as the tensors the estimator needs."""

    kind: str  # "bernoulli", "one_hot" or "categorical"
    logits: Tensor  # alpha (Bernoulli) or normalized logits (categorical), differentiable
    value: Tensor  # b; one-hot for categorical sites
    trailing: int  # dims of `logits` after the site's batch dims
    perturbed: Tensor  # z~ (detached value): a draw of z given b


def _view(owner: str, name: str, node: Mapping[str, Any]) -> _View | None:
    """The site's view, ``None`` for a reparameterizable site; raises for others."""
    fn, event = node["fn"], 0
    while isinstance(fn, Independent):
        event += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    if isinstance(fn, Bernoulli):
        logits, value = fn.logits, node["value"].detach().to(fn.logits)
        return _View("bernoulli", logits, value, event,
                     conditional_logistic(value, logits.detach(), torch.rand_like(value)))
    if isinstance(fn, (Categorical, OneHotCategorical)):
        one_hot = isinstance(fn, OneHotCategorical)
        logits = fn.logits
        index = node["value"].argmax(-1) if one_hot else node["value"]
        value = F.one_hot(index.long(), logits.shape[-1]).to(logits)
        z = conditional_gumbel(index, logits.detach(), torch.rand_like(value))
        return _View("one_hot" if one_hot else "categorical", logits, value, event + 1, z)
    if node["fn"].has_rsample:
        return None
    raise ValueError(
        f"{owner}: guide site '{name}' has distribution {type(node['fn']).__name__} "
        f"({type(fn).__name__}), which is neither reparameterizable nor Bernoulli or "
        "categorical; use ScoreFunctionELBO or VimcoELBO for it"
    )


class RebarELBO(Objective):
    """The ELBO with REBAR gradients for Bernoulli and categorical guide sites (Tucker,
    Mnih, Maddison, Lawson & Sohl-Dickstein, 2017, "REBAR: Low-variance, unbiased gradient
    estimates for discrete latent variable models").

    For a discrete guide site with logits :math:`\\alpha`, draw :math:`b`, its logistic
    (Bernoulli) or Gumbel (categorical) perturbation :math:`\\tilde z` given :math:`b`
    and a second one :math:`\\hat z` given :math:`b` with fresh noise
    (:mod:`pyro_wakesleep.relaxation`). With the control variate
    :math:`c(z) = \\eta\\, f(\\sigma_\\lambda(z))`, the estimate of
    :math:`\\partial \\mathcal L / \\partial \\alpha` is

    .. math::

        \\hat g_\\alpha = \\sum_i \\big(f_i(b) - c_i(\\hat z)\\big)
            \\frac{\\partial \\log q(b_i)}{\\partial \\alpha}
            + \\frac{\\partial C(\\tilde z)}{\\partial \\alpha}
            - \\frac{\\partial C(\\hat z)}{\\partial \\alpha},

    where :math:`\\tilde z` is differentiated with its noise fixed
    (:math:`\\partial\\tilde z/\\partial\\alpha = I`), :math:`\\hat z` with :math:`b`
    fixed, and it enters the gradient as :math:`\\sum \\hat g_\\alpha \\nabla_\\phi \\alpha`.
    :math:`f_i(b)` is the learning signal of element :math:`i` of the site's plates (the
    cost terms :math:`\\log p - \\log q` downstream of the site, as for
    :class:`~pyro_wakesleep.objectives.ScoreFunctionELBO`); :math:`c_i(z)` the same sum
    from a run of guide and model with the relaxed value :math:`\\sigma_\\lambda(z)`
    (:math:`\\sigma(z/\\lambda)`, or :math:`\\mathrm{softmax}(z/\\lambda)` on the
    simplex) substituted at the site, the sites before it replayed and later discrete
    sites relaxed with their own fixed noise; :math:`C` the total of those terms (each
    once). As :math:`\\tilde z, \\hat z` have one law given :math:`b`, the last two terms
    and the control variate cancel in expectation: the estimate is unbiased for every
    :math:`\\lambda, \\eta`. Each discrete site costs two extra runs of guide and model.
    Reparameterizable sites keep their pathwise gradients; the model's parameters get
    the ordinary gradient of :math:`\\log p`.

    **Learned temperature and scale.** Each site has :math:`\\lambda = e^{\\log\\lambda}`
    and :math:`\\eta`, trained with the model by descending the variance proxy
    :math:`\\sum_{\\rm sites} \\|\\hat g_\\alpha\\|^2 / K`, whose gradient with respect
    to them (by double backward) is that of the variance, the mean of
    :math:`\\hat g_\\alpha` not depending on them. The surrogate loss carries that
    gradient for them alone, so :class:`pyro.infer.SVI` and ``objective(model, guide)``
    train them like any parameter. They live in :attr:`control_variates` (saved by
    :meth:`state_dict`) and in Pyro's param store as
    ``"<name>.<site>$$$log_temperature"`` and ``"<name>.<site>$$$scale"``.

    **Relaxed values.** The model must accept them at the site: its distribution there
    must be ``Bernoulli`` (whose log-density, evaluated with argument validation off, as
    here, is :math:`b\\alpha - \\log(1 + e^\\alpha)` for :math:`b \\in (0, 1)`) or
    ``OneHotCategorical``, and the code using the value must take floats. A
    ``Categorical`` (index) site cannot be relaxed: use ``OneHotCategorical``, or
    :class:`~pyro_wakesleep.objectives.RelaxELBO` with ``relaxed_signal=False``. Discrete
    sites downstream of a relaxed one must be Bernoulli or one-hot too.

    ``loss`` is :math:`-\\hat{\\mathcal L}`, the negative ELBO of the guide's own draws.
    ``jit=True`` is accepted and runs eagerly, with one :class:`RuntimeWarning` at the
    second call: the compiled path refuses a step that differentiates inside itself.

    :param int num_particles: particles :math:`K` per step.
    :param float temperature: initial :math:`\\lambda` (0.5, as in the paper).
    :param float scale: initial :math:`\\eta`.
    :param bool learn: train :math:`\\lambda, \\eta` (and :math:`\\psi`) online.
    :param options: the keywords of :class:`pyro.infer.ELBO`, with the meaning
        :class:`~pyro_wakesleep.objectives.Objective` gives them.
    :raises ValueError: for a non-positive ``temperature``; at a step, for a guide site
        that is neither reparameterizable nor Bernoulli/categorical, or a model that
        cannot evaluate the relaxed value at a site (naming it).
    """

    #: whether c(z) contains eta f(sigma_lambda(z)) (RELAX may leave it out)
    relaxed_signal: bool = True

    def __init__(self, num_particles: int = 1, temperature: float = 0.5, scale: float = 1.0,
                 learn: bool = True, **options: Any) -> None:
        super().__init__(num_particles, **options)
        self.temperature = check_real(temperature, "temperature")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        self.scale = check_real(scale, "scale")
        self.learn = check_bool(learn, "learn")

    def _surrogate_net(self, site: str, width: int) -> nn.Module | None:
        return None

    def _state(self, site: str, view: _View) -> _SiteRelaxation:
        state = self.control_variates.get(site)
        if not isinstance(state, _SiteRelaxation):
            shape = view.logits.shape
            width = int(torch.Size(shape[len(shape) - view.trailing:]).numel())
            with torch.random.fork_rng(devices=[]):  # initial weights: a function of the site
                torch.manual_seed(zlib.crc32(site.encode()))
                net = self._surrogate_net(site, width)
            state = _SiteRelaxation(self.temperature, self.scale, net)
            self.control_variates.set(site, state.to(view.logits))  # its device and dtype
        self.register(site, state)
        return state

    def loss_and_surrogate(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, update: bool
    ) -> tuple[Tensor, Tensor]:
        elbo = surrogate = variance = torch.zeros(())
        train = update and self.learn and self.control_variates.training
        # every main run first: the relaxed runs (skipped without gradients) draw after
        for main in list(self.runs(model, guide, args, kwargs, track=True)):
            e, s, v = self._group(_Step(model, guide, args, kwargs, main, {}, {}, train))
            elbo, surrogate, variance = elbo + e, surrogate + s, variance + v
        k = self.num_particles
        extra = torch.zeros(())
        params = [p for p in self.control_variates.parameters() if p.requires_grad]
        if train and params and variance.requires_grad:
            # a term whose gradient is d(variance)/d(lambda, eta, psi) and nothing else
            grads = torch.autograd.grad(variance / k, params, allow_unused=True,
                                        retain_graph=True)
            extra = sum(((g.detach() * p).sum() for g, p in zip(grads, params, strict=True)
                         if g is not None), extra)
        return -elbo.detach() / k, -surrogate / k + extra

    def _group(self, step: _Step) -> tuple[Tensor, Tensor, Tensor]:
        """The ELBO, surrogate and variance proxy of one run (all particles if
        vectorized, else one)."""
        main = step.main
        for name in main.guide_latents:
            view = _view(type(self).__name__, name, main.sites[name].node)
            if view is not None:
                step.views[name], step.states[name] = view, self._state(name, view)
        signals = learning_signals(main, list(step.views))
        check_all_finite([(s, f"learning signal at site '{n}'") for n, s in signals.items()])
        check_finite_sites(main)
        log_p = log_joint(main)
        elbo = log_p - log_guide(main)
        surrogate = log_p - log_guide(main, lambda s: bool(s.node["fn"].has_rsample))
        variance = torch.zeros(())
        if not torch.is_grad_enabled():
            return elbo, surrogate, variance
        for name, view in step.views.items():
            g = self._estimate(step, name, signals[name])
            surrogate = surrogate + (g.detach() * view.logits).sum()
            if step.train:
                variance = variance + g.pow(2).sum()
        return elbo, surrogate, variance

    def _estimate(self, step: _Step, site: str, signal: Tensor) -> Tensor:
        """:math:`\\hat g_\\alpha` of one site (differentiable in the learned parameters
        when training)."""
        view, logits = step.views[site], step.views[site].logits
        noise = torch.rand_like(view.perturbed)
        if view.kind == "bernoulli":
            z_hat = conditional_logistic(view.value, logits, noise)
            score = view.value - torch.sigmoid(logits)
        else:
            z_hat = conditional_gumbel(view.value.argmax(-1), logits, noise)
            score = view.value - torch.softmax(logits, -1)
        replay = self._replay(step, site) if self.relaxed_signal else None
        _, total_tilde = self._control(step, site, through_noise(view.perturbed, logits), replay)
        c_hat, total_hat = self._control(step, site, z_hat, replay)
        coef = signal - c_hat
        g = coef.reshape(coef.shape + (1,) * view.trailing) * score
        difference = total_tilde - total_hat
        if not difference.requires_grad:
            return g
        (path,) = torch.autograd.grad(difference, logits, retain_graph=True,
                                      create_graph=step.train, allow_unused=True)
        return g if path is None else g + path

    def _control(self, step: _Step, site: str, z: Tensor,
                 replay: Callable[[Tensor], Particles] | None) -> tuple[Tensor, Tensor]:
        """:math:`c_i(z)` per element of the site's plates and its total :math:`C(z)`."""
        view, state = step.views[site], step.states[site]
        relaxed = relax(view.kind, z, state.log_temperature.exp())
        c = total = torch.zeros(())
        if replay is not None:
            f, f_total = relaxed_signal(replay(relaxed), site)
            c, total = state.scale * f, state.scale * f_total
        if state.surrogate is not None:
            batch = relaxed.shape[:relaxed.dim() - view.trailing]
            out = state.surrogate(relaxed.reshape((*batch, -1)))
            if out.dim() == len(batch) + 1 and out.shape[-1] == 1:
                out = out.squeeze(-1)
            if out.shape != batch:
                raise ValueError(
                    f"{type(self).__name__}: the surrogate of site '{site}' returned shape "
                    f"{tuple(out.shape)}, expected the site's batch shape {tuple(batch)}"
                )
            c, total = c + step.main.canonical(out, site), total + out.sum()
        return c, total

    def _replay(self, step: _Step, site: str) -> Callable[[Tensor], Particles]:
        """A function running guide and model with a relaxed value at ``site``, the sites
        before it replayed from the main run and later discrete sites relaxed."""
        owner = type(self).__name__
        upstream = upstream_values(owner, step.main, site, step.views[site].kind)
        later = {name: (v.kind, (v.perturbed - v.logits).detach(),
                        step.states[name].log_temperature.exp())
                 for name, v in step.views.items()
                 if name != site and name not in upstream and v.kind != "categorical"}
        return relaxed_runner(owner, (step.model, step.guide, step.args, step.kwargs),
                              step.main, site, upstream, later)

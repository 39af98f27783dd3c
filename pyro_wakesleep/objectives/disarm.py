"""DisARM, ARM and ARMS: antithetic gradients for Bernoulli and categorical guide sites."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pyro.poutine.trace_struct import Trace
from torch import Tensor
from torch.distributions import Bernoulli, Categorical, Independent, OneHotCategorical

from pyro_wakesleep._replay import replay_draws
from pyro_wakesleep._validation import check_finite
from pyro_wakesleep.antithetic import (
    antithetic_value,
    arm_gradient,
    conditional_uniform,
    disarm_gradient,
    stick_breaking_logits,
    stick_breaking_noise,
    stick_breaking_value,
)
from pyro_wakesleep.downstream import learning_signals
from pyro_wakesleep.objectives._arms import arms_step
from pyro_wakesleep.objectives.base import Objective
from pyro_wakesleep.particles import (
    Particles,
    SiteTensors,
    check_finite_sites,
    log_guide,
    log_joint,
    run_particles,
)

__all__ = ["DisarmELBO"]

Estimator = Literal["disarm", "arm", "arms"]


class _Binary(NamedTuple):
    """A discrete guide site seen as independent binary decisions :math:`c` with logits
    :math:`\\alpha`: the site's units (Bernoulli), or its stick-breaking chains
    (categorical, one more trailing dimension)."""

    logits: Tensor  # alpha, differentiable
    noise: Tensor  # u
    value: Tensor  # c = 1[u < sigma(alpha)]
    anti: Tensor  # c~ = 1[1 - u < sigma(alpha)]
    active: Tensor | None  # decisions that can matter (categorical), else None
    trailing: int  # dims of `value` after the site's batch dims
    anti_value: Tensor  # the site's antithetic draw, as a value of the site


class DisarmELBO(Objective):
    """The ELBO with antithetic (DisARM, ARM or ARMS) gradients for discrete guide sites.

    For a Bernoulli guide site with logits :math:`\\alpha` the guide's draw :math:`b` is
    paired with its antithetic draw :math:`\\tilde b` (same uniform noise :math:`u`,
    :mod:`pyro_wakesleep.antithetic`), and the gradient of the ELBO with respect to the
    logits is, per unit :math:`j` and plate element :math:`i` (``estimator="disarm"``,
    Dong, Mnih & Tucker, 2020)

    .. math::

        \\hat g_{ij} = \\tfrac12 \\big(f_i(b) - f_i(\\tilde b)\\big)\\,
            (-1)^{\\tilde b_{ij}}\\, \\mathbb 1[b_{ij} \\ne \\tilde b_{ij}]\\,
            \\sigma(|\\alpha_{ij}|),

    which enters the gradient as :math:`\\sum_{ij} \\hat g_{ij} \\nabla_\\phi \\alpha_{ij}`
    (the chain rule through the logits, so upstream reparameterized draws get it too);
    or, with ``estimator="arm"`` (Yin & Zhou, 2019),
    :math:`\\hat g_{ij} = (f_i(\\tilde b) - f_i(b))(u_{ij} - \\tfrac12)`. Here
    :math:`f_i(b)` is the sum of the cost terms :math:`\\log p - \\log q` downstream of
    the site for element :math:`i` of its plates, as for
    :class:`~pyro_wakesleep.objectives.ScoreFunctionELBO`, and :math:`f_i(\\tilde b)`
    the same sum from a second run of guide and model that replays every site before
    this one, puts :math:`\\tilde b` at it and draws the later sites afresh. Several
    discrete sites (layers) each get their own antithetic run, so one particle costs
    :math:`1 + S` runs of guide and model for :math:`S` discrete sites; the downstream
    layers' expected ELBO is the function being differentiated, which keeps every
    layer's estimate unbiased. The guide draws :math:`b` as usual; the noise :math:`u`
    is drawn afterwards from its law given :math:`b`, which gives the same joint law.

    With ``estimator="arms"`` (Dimitriev & Zhou, 2021) ``num_particles`` is the size
    :math:`n \\ge 2` of one group of *correlated* draws: the guide's draw
    :math:`b_1` and :math:`n - 1` more whose uniform noises are exchangeable and
    negatively correlated under a Dirichlet copula
    (:func:`~pyro_wakesleep.antithetic.copula_noise`), put on the side of each unit's
    rarer outcome. Each of the :math:`n` is marginally a draw from the guide, and the
    leave-one-out estimate is corrected for their correlation :math:`\\rho_{ij} < 0`:

    .. math::

        \\hat g_{ij} = \\frac{1}{(n - 1)(1 - \\rho_{ij})} \\sum_{k=1}^n
            \\Big(f_i(b_k) - \\frac1n \\sum_{l=1}^n f_i(b_l)\\Big)
            \\big(b_{k,ij} - \\sigma(\\alpha_{ij})\\big)

    (:func:`~pyro_wakesleep.antithetic.arms_gradient`), unbiased for
    :math:`\\nabla_{\\alpha_{ij}} \\mathbb E[f_i(b)]`; for :math:`n = 2` it is
    DisARM exactly, draw for draw. Site :math:`s`'s draws :math:`b_2, \\ldots, b_n` come
    from :math:`n - 1` runs that replay the sites before :math:`s` from the main run (one
    vectorized pass, or one run each with ``vectorize_particles=False``), so a step costs
    :math:`1 + S(n - 1)` runs, and the weights below become
    :math:`c_s = 1/(1 + (n - 1)(S + \\tilde S_s)/2)` per extra run. Later layers'
    gradients condition on the main run's draws upstream (one group per step); a guide
    without discrete sites gets the main run only.

    A categorical site (``Categorical`` or ``OneHotCategorical``) is written as a chain
    of binary decisions "is :math:`z = j` given :math:`z \\ge j`" with logits
    :math:`\\alpha_j = \\ell_j - \\log\\sum_{k>j} e^{\\ell_k}`
    (:func:`~pyro_wakesleep.antithetic.stick_breaking_logits`); the decisions are
    independent Bernoullis, so the estimator above applies to them unchanged and stays
    exactly unbiased, with decisions that neither draw reaches set to zero
    (their conditional expectation).

    Reparameterizable sites get pathwise gradients, and the model's parameters the
    ordinary gradient of :math:`\\log p`; both use every run, each of which is a draw
    from the guide. With :math:`h(z) = \\log p_\\theta(x, z) - \\log q_\\phi(z_{\\rm rep})`
    (reparameterized sites only), :math:`z` the main run, :math:`\\tilde z^{(s)}` site
    :math:`s`'s antithetic run, and :math:`S, \\tilde S_s` their numbers of discrete
    sites, the full estimate is

    .. math::

        \\nabla \\mathcal L \\approx \\frac1K \\sum_{k=1}^K \\Big[
            \\nabla h(z) + \\sum_s c_s \\nabla\\big(h(\\tilde z^{(s)}) - h(z)\\big)
            + \\sum_s \\sum_{ij} \\hat g_{ij}\\,\\nabla_\\phi \\alpha_{ij} \\Big],
        \\qquad c_s = \\frac{1}{1 + (S + \\tilde S_s)/2}.

    With a fixed set of discrete sites (:math:`S = \\tilde S_s`) this is the average of
    :math:`\\nabla h` over all :math:`1 + S` runs. Under stochastic control flow the
    number of sites varies with the draws, and the plain average would weight draws by
    how many sites they have (biased); :math:`c_s` is symmetric in the two runs of the
    pair, which are exchangeable given the sites before :math:`s`, so each correction
    term has expectation zero and the estimate stays unbiased.

    ``loss`` is :math:`-\\hat{\\mathcal L}`, the negative ELBO combined from all runs in
    the same way (averaged when the sites are fixed) and over the particles (scaled by
    any subsampling), comparable with
    :class:`~pyro_wakesleep.objectives.ScoreFunctionELBO`'s. There is no running state.

    :param int num_particles: independent antithetic groups :math:`K` per step
        (``"disarm"``, ``"arm"``), or the correlated draws :math:`n \\ge 2` of the one
        group (``"arms"``).
    :param str estimator: ``"disarm"`` (default), ``"arm"`` or ``"arms"``.
    :param options: the keywords of :class:`pyro.infer.ELBO` (``max_plate_nesting``,
        ``vectorize_particles``, ``strict_enumeration_warning``, ``retain_graph``, ...),
        with the meaning :class:`~pyro_wakesleep.objectives.Objective` gives them.
    :raises ValueError: for an unknown ``estimator``, or ``"arms"`` with fewer than 2
        particles; at a step, for a guide site that is
        neither reparameterizable nor Bernoulli/categorical (naming it).
    """

    def __init__(
        self,
        num_particles: int = 1,
        estimator: Estimator = "disarm",
        **options: Any,
    ) -> None:
        super().__init__(num_particles, **options)
        if estimator not in ("disarm", "arm", "arms"):
            raise ValueError(f"estimator must be 'disarm', 'arm' or 'arms', got {estimator!r}")
        if estimator == "arms" and self.num_particles < 2:
            raise ValueError(
                "estimator='arms' needs num_particles >= 2 (the correlated draws of its one "
                f"group), got num_particles={self.num_particles}"
            )
        self.estimator: Estimator = estimator

    def loss_and_surrogate(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, update: bool
    ) -> tuple[Tensor, Tensor]:
        if self.estimator == "arms":
            elbo, surrogate = arms_step(self, model, guide, args, kwargs,
                                        _elbo_and_pathwise, _num_discrete)
            return -elbo.detach(), -surrogate
        elbo = surrogate = torch.zeros(())
        for main in self.runs(model, guide, args, kwargs, track=True):
            group_elbo, group_surrogate = self._group(model, guide, args, kwargs, main)
            elbo, surrogate = elbo + group_elbo, surrogate + group_surrogate
        k = self.num_particles
        return -elbo.detach() / k, -surrogate / k

    def _group(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, main: Particles
    ) -> tuple[Tensor, Tensor]:
        """The ELBO and surrogate of one run (all particles if vectorized, else one) with
        the antithetic runs of its discrete sites."""
        views = {}
        for name in main.guide_latents:
            view = _binary_view(name, main.sites[name].node)
            if view is not None:
                views[name] = view
        signals = learning_signals(main, list(views))
        surrogate = torch.zeros(())
        antis = {}
        for name, view in views.items():
            anti = antis[name] = self._antithetic(model, guide, args, kwargs, main, name, view)
            f_anti = learning_signals(anti, [name])[name]
            g = self._gradient(name, signals[name], f_anti, view)
            surrogate = surrogate + (g * view.logits).sum()
        for run in (main, *antis.values()):
            check_finite_sites(run)
        main_elbo, main_path = _elbo_and_pathwise(main)
        elbo, pathwise = main_elbo, main_path
        for anti in antis.values():
            weight = 1.0 / (1.0 + (len(views) + _num_discrete(anti)) / 2.0)
            anti_elbo, anti_path = _elbo_and_pathwise(anti)
            elbo = elbo + weight * (anti_elbo - main_elbo)
            pathwise = pathwise + weight * (anti_path - main_path)
        return elbo, surrogate + pathwise

    def _antithetic(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, main: Particles,
        site: str, view: _Binary,
    ) -> Particles:
        """Guide and model run again with the sites before ``site`` (and any plate
        subsamples) replayed from ``main``'s guide trace and the antithetic draw at
        ``site``."""
        partial = Trace()
        nodes: Mapping[str, Mapping[str, Any]] = main.traces[0][1].nodes
        for name, node in nodes.items():
            if node["type"] != "sample" or node["is_observed"]:
                continue
            value = view.anti_value if name == site else node["value"]
            partial.add_node(name, **dict(node, value=value, infer=dict(node["infer"])))
            if name == site:
                break
        return run_particles(
            model, replay_draws(guide, partial), args, kwargs,
            num_particles=main.num_particles, vectorize=main.vectorized,
            max_plate_nesting=main.max_plate_nesting, pyro_checks=False, track=True,
        )

    def _gradient(self, name: str, f: Tensor, f_anti: Tensor, view: _Binary) -> Tensor:
        for signal in (f, f_anti):
            check_finite(signal, f"learning signal at site '{name}'")
        shape = (1,) * view.trailing
        f, f_anti = f.reshape(f.shape + shape), f_anti.reshape(f_anti.shape + shape)
        if self.estimator == "arm":
            g = arm_gradient(f, f_anti, view.noise)
        else:
            g = disarm_gradient(f, f_anti, view.value, view.anti, view.logits)
        if view.active is not None:
            g = g * view.active
        return g.detach()


def _elbo_and_pathwise(run: Particles) -> tuple[Tensor, Tensor]:
    """A run's ELBO (summed over its particles) and its pathwise surrogate."""
    log_p = log_joint(run)
    return log_p - log_guide(run), log_p - log_guide(run, _reparameterized)


def _discrete(node: Mapping[str, Any]) -> bool:
    fn = node["fn"]
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return isinstance(fn, (Bernoulli, Categorical, OneHotCategorical))


def _num_discrete(run: Particles) -> int:
    """The number of discrete (Bernoulli or categorical) guide sites of a run."""
    return sum(_discrete(run.sites[name].node) for name in run.guide_latents)


def _reparameterized(site: SiteTensors) -> bool:
    """Whether a guide site's gradient is pathwise (discrete sites' :math:`\\log q` is
    left out of the surrogate: its expected gradient is zero)."""
    return bool(site.node["fn"].has_rsample)


def _binary_view(name: str, node: Mapping[str, Any]) -> _Binary | None:
    """The binary decisions of a discrete guide site with their antithetic pair, or
    ``None`` for a reparameterizable site; raises for any other site."""
    fn, event = node["fn"], 0
    while isinstance(fn, Independent):
        event += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    value = node["value"]
    if isinstance(fn, Bernoulli):
        logits = fn.logits
        u = conditional_uniform(value, logits)
        anti = antithetic_value(u, logits)
        return _Binary(logits, u, value.detach().to(anti), anti, None, event,
                       anti.to(value.dtype))
    if isinstance(fn, (Categorical, OneHotCategorical)):
        one_hot = isinstance(fn, OneHotCategorical)
        index = value.argmax(-1) if one_hot else value
        alpha = stick_breaking_logits(fn.logits)
        u = stick_breaking_noise(index, fn.logits)
        decisions = (u < torch.sigmoid(alpha.detach())).to(alpha.dtype)
        anti = antithetic_value(u, alpha)
        anti_index = stick_breaking_value(1.0 - u, fn.logits)
        reach = torch.maximum(index.detach().long(), anti_index).unsqueeze(-1)
        active = (torch.arange(alpha.shape[-1], device=alpha.device) <= reach).to(alpha)
        anti_value = (
            F.one_hot(anti_index, fn.logits.shape[-1]).to(value.dtype) if one_hot
            else anti_index.to(value.dtype)
        )
        return _Binary(alpha, u, decisions, anti, active, event + 1, anti_value)
    if node["fn"].has_rsample:
        return None
    raise ValueError(
        f"DisarmELBO: guide site '{name}' has distribution {type(node['fn']).__name__} "
        f"({type(fn).__name__}), which is neither reparameterizable nor Bernoulli or "
        "categorical; use ScoreFunctionELBO or VimcoELBO for it"
    )

"""The score-function (REINFORCE) ELBO with control variates."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from pyro.distributions import Delta
from torch import Tensor
from torch.distributions import Independent

from pyro_wakesleep._replay import replay_stopped, warn_if_no_pathwise_site
from pyro_wakesleep._validation import check_bool
from pyro_wakesleep.control_variates import ControlVariate, SiteContext, TraceGraphBaseline
from pyro_wakesleep.downstream import learning_signals
from pyro_wakesleep.enumeration import EXPECTATION, is_enumerated, refuse_enumeration
from pyro_wakesleep.objectives._site_control import (
    ControlVariateSpec,
    check_spec,
    instantiate,
)
from pyro_wakesleep.objectives.base import Objective
from pyro_wakesleep.particles import check_all_finite, check_finite_sites, log_guide, log_joint
from pyro_wakesleep.signals import path_only

__all__ = ["ScoreFunctionELBO"]


class ScoreFunctionELBO(Objective):
    """The ELBO with score-function gradients and control variates.

    For a guide site :math:`z_s` that cannot be reparameterized (or every site, with
    ``force_score_function=True``) the gradient is the REINFORCE estimator with a
    Rao-Blackwellized learning signal and a control variate; for the other sites it is
    pathwise, as in :class:`pyro.infer.Trace_ELBO`:

    .. math::

        \\nabla_{\\theta,\\phi} \\mathcal L \\approx \\frac{1}{K}\\sum_{k=1}^K \\Big[
            \\nabla \\big(\\log p_\\theta(x, z^{(k)}) - \\log q_\\phi(z^{(k)}_{\\rm rep})\\big)
            + \\sum_{s} \\sum_{i \\in \\text{plates}(s)} \\hat f_{s,i}^{(k)}\\,
              \\nabla_\\phi \\log q_\\phi(z^{(k)}_{s,i} \\mid \\ldots) \\Big],

    where :math:`f_{s,i}` is the sum of the cost terms :math:`\\log p - \\log q`
    *downstream* of site :math:`s` (Schulman et al., 2015; as Pyro's
    ``TraceGraph_ELBO``), summed over the plates :math:`s` is not in and kept per element
    of the plates it is in, so that a latent in a data plate sees only its own datapoint's
    terms; and :math:`\\hat f` is :math:`f` after the site's control variate
    (:mod:`pyro_wakesleep.control_variates`). Williams (1992); Ranganath et al. (2014).

    ``loss`` is :math:`-\\hat{\\mathcal L}`, the negative ELBO estimated by the
    :math:`K` particles (in nats, scaled by any subsampling), comparable across all
    objectives in this package that report a negative ELBO.

    Models written for ``TraceGraph_ELBO`` that declare
    ``infer={"baseline": {...}}`` at a guide site work unchanged: those options build the
    site's control variate unless one is given for the site explicitly.

    :param int num_particles: particles :math:`K` per step.
    :param control_variate: a :class:`~pyro_wakesleep.control_variates.ControlVariate`
        for every score-function site (each site gets its own copy), or a mapping from
        site name to control variate (``None`` for none), or ``None``.
    :param bool force_score_function: use the score-function estimator at every guide
        site, reparameterizable or not (to compare the two estimators).
    :param bool stick_the_landing: drop the score term of the pathwise sites (Roeder,
        Wu & Duvenaud, 2017, *Sticking the landing*, NeurIPS): their
        :math:`\\log q_\\phi(z^{(k)}_{\\rm rep})` above is differentiated through the draws
        only, as :math:`\\nabla_\\phi \\log q_{\\bot\\phi}(z_\\phi^{(k)})`, removing
        :math:`\\nabla_\\phi \\log q_\\phi(z)|_{z}`, whose expectation is zero. Unbiased,
        and exactly zero at the optimum when :math:`q` is the posterior (the pathwise term
        :math:`\\nabla_z(\\log p - \\log q)` vanishes there). The score term is found by
        replaying guide and model against the draws held constant (one more run of each
        per step; see :class:`~pyro_wakesleep.objectives.VimcoELBO`). With no pathwise
        site (e.g. ``force_score_function=True``) it has no effect and warns
        (:class:`UserWarning`).
    :param options: the keywords of :class:`pyro.infer.ELBO` (``max_plate_nesting``,
        ``vectorize_particles``, ``strict_enumeration_warning``, ``retain_graph``, ...),
        with the meaning :class:`~pyro_wakesleep.objectives.Objective` gives them.
    """

    enumeration = EXPECTATION

    def __init__(
        self,
        num_particles: int = 1,
        control_variate: ControlVariateSpec = None,
        *,
        force_score_function: bool = False,
        stick_the_landing: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(num_particles, **options)
        check_spec(control_variate, self.num_particles)
        self.force_score_function = bool(force_score_function)
        #: whether the pathwise sites' score term is dropped (Roeder et al., 2017)
        self.stick_the_landing: bool = check_bool(stick_the_landing, "stick_the_landing")
        self._per_site = dict(control_variate) if isinstance(control_variate, Mapping) else {}
        self._template = control_variate if isinstance(control_variate, ControlVariate) else None
        for site, cv in self._per_site.items():
            if cv is not None:
                self.control_variates.set(site, cv)
        self._checked = False

    def _is_score_site(self, node: Mapping[str, Any]) -> bool:
        return self.force_score_function or not node["fn"].has_rsample

    def _control_variate(self, site: str, node: Mapping[str, Any]) -> ControlVariate | None:
        cv = self.control_variates.get(site)
        if cv is not None or site in self._per_site:
            return cv
        options = node["infer"].get("baseline")
        if options:
            cv = TraceGraphBaseline(options, site)
        elif self._template is not None:
            cv = instantiate(self._template)
        else:
            return None
        self.control_variates.set(site, cv)
        return cv

    def _check_sites(self, nodes: Mapping[str, Mapping[str, Any]]) -> None:
        # a point mass with no auxiliary site to draw it from (AutoDelta, unlike the Delta
        # sites of AutoNormal) has no score: its parameters would get no gradient
        auxiliary = any(node["infer"].get("is_auxiliary") for node in nodes.values())
        for site, node in nodes.items():
            fn = node["fn"]
            while isinstance(fn, Independent):
                fn = fn.base_dist
            if self.force_score_function and isinstance(fn, Delta) and not auxiliary:
                raise ValueError(
                    f"guide site '{site}' is a point mass (Delta, as in AutoDelta), which has "
                    "no score function; use force_score_function=False for it"
                )
        for site in self._per_site:
            if site not in nodes:
                raise ValueError(
                    f"control variate given for site '{site}', which the guide does not have "
                    f"(guide sites: {sorted(nodes)})"
                )
            if not self._is_score_site(nodes[site]):
                raise ValueError(
                    f"control variate given for site '{site}', whose gradient is pathwise "
                    "(reparameterized); pass force_score_function=True to use the score "
                    "function there"
                )
        self._checked = True

    def loss_and_surrogate(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, update: bool
    ) -> tuple[Tensor, Tensor]:
        particles = self.particles(
            model, guide, args, kwargs, detach_guide=self.force_score_function,
            check_finite=False, track=True,
        )
        nodes = {name: particles.sites[name].node for name in particles.guide_latents}
        if not self._checked:
            self._check_sites(nodes)
            if self.stick_the_landing:
                warn_if_no_pathwise_site(particles, type(self).__name__, "stick_the_landing",
                                         scored=self.force_score_function)
        if self.stick_the_landing:
            refuse_enumeration(particles, "ScoreFunctionELBO(stick_the_landing=True)")
        score_sites = [name for name, node in nodes.items()
                       if self._is_score_site(node) and not is_enumerated(node)]
        signals = learning_signals(particles, score_sites)
        check_all_finite([(s, f"learning signal at site '{n}'") for n, s in signals.items()])
        check_finite_sites(particles)
        log_p = log_joint(particles)
        elbo = log_p - log_guide(particles)
        pathwise_q = log_guide(particles, lambda site: site.name not in signals)
        if self.stick_the_landing and not self.force_score_function:
            stopped = replay_stopped(particles, model, guide, args, kwargs)
            pathwise_q = path_only(
                pathwise_q, log_guide(stopped, lambda site: site.name not in signals)
            )
        surrogate = log_p - pathwise_q
        extra: Tensor | float = 0.0
        for name, signal in signals.items():
            site = particles.sites[name]
            score = cast(Tensor, site.score)  # a guide latent always has one
            if not site.everywhere:  # a site of only some particles: those
                signal, score = signal[site.present], score[site.present]
            cv = self._control_variate(name, site.node)
            if cv is not None:
                if not isinstance(cv, TraceGraphBaseline) and any(True for _ in cv.parameters()):
                    # the param store is authoritative, so a restored store reaches the module
                    self.register(name, cv)
                context = SiteContext(name, site.node, args, kwargs, 0, update)
                signal, cv_loss = cv(signal, context)
                extra = extra + cv_loss
            surrogate = surrogate + (signal.detach() * score).sum()
        k = self.num_particles
        return -elbo.detach() / k, -surrogate / k + extra

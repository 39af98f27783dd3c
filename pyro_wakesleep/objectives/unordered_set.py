"""The unordered-set estimator: categorical guide sites sampled without replacement."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pyro_wakesleep._validation import check_bool, check_int
from pyro_wakesleep.categorical import gumbel_top_k, set_log_probs, unordered_set_surrogate
from pyro_wakesleep.objectives._categorical_runs import CategoricalSite, categorical_step
from pyro_wakesleep.objectives.base import Objective

__all__ = ["UnorderedSetELBO"]


class UnorderedSetELBO(Objective):
    """The ELBO with the unordered-set policy gradient (Kool, van Hoof & Welling, 2020,
    "Estimating Gradients for Discrete Random Variables by Sampling without Replacement",
    ICLR) for categorical guide sites (``Categorical``, ``OneHotCategorical``, and
    ``Bernoulli`` as two categories).

    For each variable :math:`z` of a categorical site, with :math:`p = q_\\phi(z \\mid
    \\ldots)`, the guide's draw :math:`s_1` is completed to :math:`k` distinct values
    :math:`S = \\{s_1, \\ldots, s_k\\}` drawn without replacement (Gumbel-top-k given its
    first draw, :func:`~pyro_wakesleep.categorical.gumbel_top_k`), and the gradient
    with respect to the guide's parameters is

    .. math::

        \\hat g = \\sum_{s \\in S} p(s) R(S, s) \\Big(f(s) - \\sum_{s' \\in S}
            p(s') R^{D \\setminus \\{s\\}}(S, s') f(s')\\Big) \\nabla_\\phi \\log p(s),

    with the leave-one-out ratios :math:`R` of the probability of the unordered set
    (:func:`~pyro_wakesleep.categorical.leave_one_out_log_ratios`) and the built-in
    baseline (``baseline=False`` drops the inner sum). Here :math:`f(s)` is the learning
    signal of the site (the cost terms :math:`\\log p - \\log q` downstream of it, kept
    per element of its plates, as for
    :class:`~pyro_wakesleep.objectives.ScoreFunctionELBO`) from a run of guide and model
    that replays every site before this one, puts :math:`s` at the variable (the site's
    other variables at the guide's draws) and draws the later sites afresh. The
    elements of the site's plates that every downstream term shares (a data plate) are
    treated in parallel; its event dims and other plates are variables of their own
    (see :mod:`pyro_wakesleep.objectives._categorical_runs`). A step costs
    :math:`1 + \\sum_s J_s (k - 1)` runs of guide and model for sites with :math:`J_s`
    variables, so :math:`k` runs for one variable: compare with :math:`k` particles of
    other estimators. Unbiased for every :math:`k`; a set that holds all the mass (e.g.
    :math:`k` equal to the number of categories) gives the exact gradient.

    *Zero-probability categories* (``probs`` exactly 0, e.g. logits :math:`-\\infty`) are
    outside the domain: they are never drawn while a category of positive probability is
    left, and where :math:`k` exceeds a variable's support (rows of a batch may differ)
    the set is the whole support, so that variable's gradient is the exact sum over it;
    the surplus members are absent (weight 0, no run at an impossible value, no NaN).
    *Bernoulli sites* are two categories, :math:`(\\log(1 - p), \\log p)` from the logits,
    the value handed to the programs as the Bernoulli's float: :math:`k = 2` sums over
    both values of each variable (exact for one variable without later sites),
    :math:`k = 1` is REINFORCE without a baseline (the built-in one needs :math:`k \\ge
    2`).

    Reparameterizable sites get pathwise gradients and the model's parameters the
    gradient of :math:`\\log p`, both from the main runs, whose average ELBO is also the
    reported ``-loss``. There is no running state.

    :param int num_particles: :math:`k`, the size of the set drawn without replacement
        per variable (at most the number of categories; more is capped there, and at a
        variable's support the surplus is absent).
    :param bool baseline: use the built-in baseline (default ``True``).
    :param int num_sets: independent main runs (each with its sets) averaged per step
        (default 1).
    :param options: the keywords of :class:`pyro.infer.ELBO` (``max_plate_nesting``,
        ``vectorize_particles``, ``strict_enumeration_warning``, ``retain_graph``, ...),
        with the meaning :class:`~pyro_wakesleep.objectives.Objective` gives them;
        ``vectorize_particles`` applies to the :math:`k - 1` runs of each variable.
    :raises ValueError: at a step, for a guide site that is neither reparameterizable nor
        categorical or Bernoulli (naming it).
    """

    def __init__(self, num_particles: int = 2, baseline: bool = True, *, num_sets: int = 1,
                 **options: Any) -> None:
        super().__init__(num_particles, **options)
        #: whether the built-in baseline is used
        self.baseline: bool = check_bool(baseline, "baseline")
        #: independent main runs per step
        self.num_sets: int = check_int(num_sets, "num_sets")

    def _estimate(self, site: CategoricalSite, f_main: Tensor,
                  evaluate: Callable[[Tensor], Tensor]) -> Tensor:
        k = min(self.num_particles, site.logits.shape[-1])
        sets = gumbel_top_k(site.logits, k, site.draws)
        if k > 1:
            f_rest = evaluate(sets[..., 1:].movedim(-1, 0))
            f = torch.cat([f_main.unsqueeze(0), f_rest]).movedim(0, -1)
        else:
            f = f_main.unsqueeze(-1)
        log_p, log_rest = set_log_probs(site.logits, sets)
        return unordered_set_surrogate(log_p, log_rest, f, self.baseline)

    def loss_and_surrogate(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, update: bool
    ) -> tuple[Tensor, Tensor]:
        elbo, surrogate = categorical_step(self, model, guide, args, kwargs, self._estimate,
                                           runs=self.num_sets)
        return -elbo / self.num_sets, -surrogate / self.num_sets

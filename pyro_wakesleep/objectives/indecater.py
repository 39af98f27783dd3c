"""IndeCateR: the CatLog-derivative trick for many independent categorical variables."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pyro_wakesleep.categorical import indecater_surrogate
from pyro_wakesleep.objectives._categorical_runs import CategoricalSite, categorical_step
from pyro_wakesleep.objectives.base import Objective

__all__ = ["IndecaterELBO"]


class IndecaterELBO(Objective):
    """The ELBO with IndeCateR gradients (De Smet, Sansone & Zuidberg Dos Martires, 2023,
    "Differentiable Sampling of Categorical Distributions Using the CatLog-Derivative
    Trick", NeurIPS) for categorical guide sites (``Categorical``,
    ``OneHotCategorical``, and ``Bernoulli`` as two categories).

    For a site of :math:`J` independent categorical variables :math:`z_1, \\ldots, z_J`
    (its event dims, or plates whose elements feed a common term) with
    :math:`p_j = q_\\phi(z_j \\mid \\ldots)` over :math:`C` categories, each of the
    :math:`K` particles draws :math:`z^{(k)}` from the guide and sums over the categories
    of each variable with the others held at their draws (Rao-Blackwellized):

    .. math::

        \\hat g = \\frac1K \\sum_{k=1}^K \\sum_{j=1}^J \\sum_{c=1}^C
            \\nabla_\\phi p_j(c)\\; f\\big(z^{(k)}_{-j}, z_j = c\\big),

    where :math:`f` is the learning signal of the site (the cost terms
    :math:`\\log p - \\log q` downstream of it, kept per element of its plates, as for
    :class:`~pyro_wakesleep.objectives.ScoreFunctionELBO`), evaluated by a run of guide
    and model that replays every site before this one, puts the variant at the site and
    draws the later sites afresh (:func:`~pyro_wakesleep.categorical.indecater_surrogate`).
    Elements of plates that every downstream term shares (a data plate) are summed over
    in parallel. A particle costs :math:`1 + \\sum_s J_s C_s` runs of guide and model (one
    vectorized pass per site with ``vectorize_particles=True``). Unbiased; for a single
    categorical variable with no later sites it is the exact gradient.

    A category of probability 0 (``probs`` exactly 0, e.g. logits :math:`-\\infty`)
    contributes nothing: the programs are not run at it (its variant repeats the draw,
    with weight :math:`p_j(c) = 0`), so the sum is exactly over the support, without NaN.
    A ``Bernoulli`` site is two categories, :math:`(\\log(1 - p), \\log p)` from the
    logits, the value handed to the programs as the Bernoulli's float.

    Reparameterizable sites get pathwise gradients and the model's parameters the
    gradient of :math:`\\log p`, both from the :math:`K` main draws, whose average ELBO is
    also the reported ``-loss``. There is no running state.

    :param int num_particles: :math:`K`, the guide draws per step.
    :param options: the keywords of :class:`pyro.infer.ELBO` (``max_plate_nesting``,
        ``vectorize_particles``, ``strict_enumeration_warning``, ``retain_graph``, ...),
        with the meaning :class:`~pyro_wakesleep.objectives.Objective` gives them;
        ``vectorize_particles`` applies to the :math:`J C` runs of each site.
    :raises ValueError: at a step, for a guide site that is neither reparameterizable nor
        categorical or Bernoulli (naming it).
    """

    def __init__(self, num_particles: int = 1, **options: Any) -> None:
        super().__init__(num_particles, **options)

    @staticmethod
    def _estimate(site: CategoricalSite, f_main: Tensor,
                  evaluate: Callable[[Tensor], Tensor]) -> Tensor:
        del f_main
        classes = site.logits.shape[-1]
        categories = torch.arange(classes, device=site.draws.device)
        alternatives = categories.reshape((classes,) + (1,) * site.draws.dim())
        f = evaluate(alternatives.expand((classes, *site.draws.shape)))
        return indecater_surrogate(site.logits, f.movedim(0, -1))

    def _uses_vectorization(self) -> bool:
        # a site's variants run as one vectorized pass whatever the number of main runs,
        # so a program that cannot run vectorized falls back to one run after another
        return self.vectorize_particles

    def loss_and_surrogate(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, update: bool
    ) -> tuple[Tensor, Tensor]:
        k = self.num_particles
        elbo, surrogate = categorical_step(self, model, guide, args, kwargs, self._estimate,
                                           runs=k)
        return -elbo / k, -surrogate / k

"""Pure tensor math of the continuous relaxations behind REBAR and RELAX.

A Bernoulli draw with logits :math:`\\alpha` is the sign of a logistic perturbation,
and a categorical draw with logits :math:`\\ell` is the argmax of a Gumbel perturbation
(Maddison et al., 2017; Jang et al., 2017):

.. math::

    z = \\alpha + \\log\\frac{u}{1 - u},\\; b = H(z); \\qquad
    z_k = \\ell_k - \\log(-\\log u_k),\\; b = \\arg\\max_k z_k,

with :math:`u \\sim \\mathcal U(0, 1)`. The *relaxed* draws replace :math:`H` and the
argmax by :math:`\\sigma(z / \\lambda)` and :math:`\\mathrm{softmax}(z / \\lambda)` at a
temperature :math:`\\lambda > 0`. REBAR (Tucker et al., 2017) also needs :math:`\\hat z`,
a draw of :math:`z` *given* :math:`b`, reparameterized by fresh noise :math:`v` so that
it is differentiable in the logits with :math:`b` held fixed (:func:`conditional_logistic`,
:func:`conditional_gumbel`).

Nothing here knows about Pyro: :class:`~pyro_wakesleep.objectives.RebarELBO` and
:class:`~pyro_wakesleep.objectives.RelaxELBO` turn traces into these tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "conditional_gumbel",
    "conditional_logistic",
    "relaxed_bernoulli",
    "relaxed_one_hot",
    "through_noise",
]


def _uniform(v: Tensor) -> Tensor:
    """``v`` clamped into the open interval (0, 1)."""
    tiny = torch.finfo(v.dtype).tiny
    return v.clamp(tiny, 1.0 - torch.finfo(v.dtype).eps)


def conditional_logistic(value: Tensor, logits: Tensor, v: Tensor) -> Tensor:
    """The logistic perturbation :math:`\\hat z` of a Bernoulli draw :math:`b` given
    :math:`b`: with :math:`v \\sim \\mathcal U(0, 1)` and :math:`\\theta = \\sigma(\\alpha)`,

    .. math::

        \\hat z = \\alpha + \\log\\frac{u'}{1 - u'}, \\qquad
        u' = \\begin{cases} 1 - \\theta + \\theta v & b = 1 \\\\
                            (1 - \\theta)\\, v & b = 0, \\end{cases}

    which is distributed as :math:`z` given :math:`H(z) = b` (Tucker et al., 2017,
    Appendix) and differentiable in :math:`\\alpha`. Computed in log space as
    :math:`\\hat z = \\log(1 + \\tfrac{v}{1 - v}(1 + e^{\\alpha}))` for :math:`b = 1` and
    :math:`\\hat z = -\\log(1 + \\tfrac{1 - v}{v}(1 + e^{-\\alpha}))` for :math:`b = 0`.

    :param torch.Tensor value: :math:`b`, entries 0 or 1.
    :param torch.Tensor logits: :math:`\\alpha`, broadcastable to ``value``.
    :param torch.Tensor v: the noise, the broadcast shape of ``value`` and ``logits``.
    :return: :math:`\\hat z`, positive where :math:`b = 1` and negative where it is 0.
    """
    v = _uniform(v)
    log_odds = torch.log(v) - torch.log1p(-v)  # logit(v)
    zeros = torch.zeros_like(log_odds)
    one = torch.logaddexp(zeros, log_odds + F.softplus(logits))
    zero = -torch.logaddexp(zeros, -log_odds + F.softplus(-logits))
    return torch.where(value > 0.5, one, zero)


def conditional_gumbel(index: Tensor, logits: Tensor, v: Tensor) -> Tensor:
    """The Gumbel perturbation :math:`\\hat z` of a categorical draw :math:`b` given
    :math:`b`: with :math:`v \\sim \\mathcal U(0, 1)^C` and :math:`\\theta =
    \\mathrm{softmax}(\\ell)`,

    .. math::

        \\hat z_b = -\\log(-\\log v_b), \\qquad
        \\hat z_k = -\\log\\Big(-\\frac{\\log v_k}{\\theta_k} - \\log v_b\\Big)
        \\quad (k \\ne b),

    which is distributed as :math:`\\log\\theta + g` (:math:`g` standard Gumbel) given
    its argmax is :math:`b` (Tucker et al., 2017, Appendix; Grathwohl et al., 2018) and
    differentiable in :math:`\\ell`.

    :param torch.Tensor index: class indices :math:`b`, shape ``logits.shape[:-1]``.
    :param torch.Tensor logits: :math:`\\ell`, classes in the last dimension.
    :param torch.Tensor v: the noise, shape ``logits.shape``.
    :return: :math:`\\hat z`, shape ``logits.shape``; its argmax is ``index``.
    """
    log_theta = torch.log_softmax(logits, -1)
    log_v = torch.log(_uniform(v))
    one_hot = F.one_hot(index.long(), logits.shape[-1]).to(logits.dtype)
    log_v_b = (log_v * one_hot).sum(-1, keepdim=True)
    top = -torch.log(-log_v_b)
    # -log(-log v_k / theta_k - log v_b), with -log v_k / theta_k = e^{log(-log v_k) - log theta_k}
    rest = -torch.logaddexp(torch.log(-log_v) - log_theta, torch.log(-log_v_b))
    return torch.where(one_hot > 0.5, top.expand_as(rest), rest)


def through_noise(perturbed: Tensor, logits: Tensor) -> Tensor:
    """:math:`z` with its value, differentiable in the logits as :math:`\\ell + \\epsilon`
    with the noise :math:`\\epsilon = z - \\ell` held fixed (the unconditional
    reparameterization :math:`\\partial z / \\partial \\ell = I`), whatever way the value
    was drawn (e.g. by :func:`conditional_logistic` given the guide's draw).

    :param torch.Tensor perturbed: the value of :math:`z`.
    :param torch.Tensor logits: :math:`\\ell` (or :math:`\\log\\theta`), broadcastable.
    :rtype: torch.Tensor
    """
    return logits + (perturbed - logits).detach()


def relaxed_bernoulli(z: Tensor, temperature: Tensor | float) -> Tensor:
    """The concrete relaxation :math:`\\sigma_\\lambda(z) = \\sigma(z / \\lambda)` of
    :math:`H(z)`, in (0, 1), differentiable in :math:`z` and :math:`\\lambda`.

    :param torch.Tensor z: the logistic perturbation.
    :param temperature: :math:`\\lambda > 0` (a tensor or a float).
    :rtype: torch.Tensor
    """
    return torch.sigmoid(z / temperature)


def relaxed_one_hot(z: Tensor, temperature: Tensor | float) -> Tensor:
    """The Gumbel-softmax relaxation :math:`\\mathrm{softmax}(z / \\lambda)` of the
    one-hot argmax of :math:`z` (classes in the last dimension), on the simplex.

    :param torch.Tensor z: the Gumbel perturbation.
    :param temperature: :math:`\\lambda > 0` (a tensor or a float).
    :rtype: torch.Tensor
    """
    return torch.softmax(z / temperature, -1)

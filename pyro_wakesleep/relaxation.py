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
    "gumbel_rao",
    "one_hot_of",
    "reinmax",
    "relaxed_bernoulli",
    "relaxed_one_hot",
    "replace_gradient",
    "straight_through",
    "straight_through_gumbel_softmax",
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
    one_hot = one_hot_of(index, logits.shape[-1], logits.dtype)
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


# -- straight-through estimators of discrete sites (relaxed_sites) -----------------------
# Each returns the hard one-hot draw ``b`` as its value, with a surrogate gradient: the
# value is exactly ``b`` (``s - s.detach()`` is exactly zero) and the gradient is that of
# the surrogate ``s``. They are *biased* estimators of the gradient of E_q[f(b)].


def one_hot_of(index: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """The one-hot encoding of ``index`` by comparison (no read of its values into
    Python, unlike :func:`torch.nn.functional.one_hot`, so it records for ``jit=True``)."""
    classes = torch.arange(num_classes, device=index.device)
    return (index.unsqueeze(-1) == classes).to(dtype)


def replace_gradient(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` with the gradient of ``surrogate``:
    :math:`b + s - \\bot(s)`, with :math:`\\bot` the stop-gradient.

    :param torch.Tensor value: the forward value :math:`b`.
    :param torch.Tensor surrogate: :math:`s`, broadcastable to ``value``.
    :rtype: torch.Tensor
    """
    return value + (surrogate - surrogate.detach())


def straight_through(one_hot: Tensor, logits: Tensor, temperature: Tensor | float) -> Tensor:
    """The straight-through estimator (Bengio, Léonard & Courville, 2013, *Estimating or
    propagating gradients through stochastic neurons*): the draw :math:`b \\sim
    \\mathrm{Cat}(\\mathrm{softmax}(\\ell))` forward, the gradient of the probabilities
    backward,

    .. math::

        \\hat\\nabla_\\ell f = \\frac{\\partial\\,\\mathrm{softmax}(\\ell/\\lambda)}
            {\\partial \\ell}^{\\!\\top} \\nabla_b f(b).

    Biased in general; at :math:`\\lambda = 1` it is unbiased exactly when :math:`f` is
    linear in :math:`b` (then :math:`\\mathbb E[\\nabla_b f] \\cdot \\partial\\theta/\\partial\\ell
    = \\nabla_\\ell\\, \\mathbb E[f(b)]`).

    :param torch.Tensor one_hot: the draw :math:`b`, classes in the last dimension.
    :param torch.Tensor logits: :math:`\\ell`, broadcastable to ``one_hot``.
    :param temperature: :math:`\\lambda > 0`.
    :return: :math:`b` with the surrogate gradient.
    """
    return replace_gradient(one_hot, torch.softmax(logits / temperature, -1))


def straight_through_gumbel_softmax(
    gumbel: Tensor, logits: Tensor, temperature: Tensor | float
) -> Tensor:
    """The straight-through Gumbel-softmax estimator (Jang, Gu & Poole, 2017,
    *Categorical reparameterization with Gumbel-softmax*, ICLR; Maddison, Mnih & Teh, 2017,
    *The concrete distribution*, ICLR): with Gumbel noise :math:`g`, the draw
    :math:`b = \\mathrm{onehot}(\\arg\\max_k(\\ell_k + g_k))` forward and the concrete
    relaxation's gradient backward,

    .. math::

        \\hat\\nabla_\\ell f = \\frac{\\partial\\,\\mathrm{softmax}((\\ell + g)/\\lambda)}
            {\\partial \\ell}^{\\!\\top} \\nabla_b f(b),

    biased for every :math:`\\lambda > 0`.

    :param torch.Tensor gumbel: the noise :math:`g` (standard Gumbel), broadcast shape.
    :param torch.Tensor logits: :math:`\\ell`, classes in the last dimension.
    :param temperature: :math:`\\lambda > 0`.
    :return: :math:`b` with the surrogate gradient.
    """
    z = logits + gumbel
    hard = one_hot_of(z.argmax(-1), z.shape[-1], z.dtype)
    return replace_gradient(hard, relaxed_one_hot(z, temperature))


def _softmax_vjp_surrogate(pi: Tensor, logits: Tensor) -> Tensor:
    """A zero-valued tensor whose gradient in ``logits`` is the softmax Jacobian at the
    (held) probabilities ``pi``: :math:`(\\mathrm{diag}\\,\\pi - \\pi\\pi^\\top)\\,\\delta`."""
    delta = logits - logits.detach()
    pi = pi.detach()
    return pi * delta - pi * (pi * delta).sum(-1, keepdim=True)


def reinmax(one_hot: Tensor, logits: Tensor, temperature: Tensor | float) -> Tensor:
    """ReinMax (Liu, Zhao, Chen, Gao & He, 2023, *Bridging discrete and backpropagation:
    straight-through and beyond*, NeurIPS, Algorithm 2), a second-order (Heun's method)
    straight-through estimator: with :math:`\\pi_0 = \\mathrm{softmax}(\\ell)`,
    :math:`\\pi_1 = \\tfrac12(b + \\mathrm{softmax}(\\ell/\\lambda))` and
    :math:`J(\\pi) = \\mathrm{diag}\\,\\pi - \\pi\\pi^\\top`,

    .. math::

        \\hat\\nabla_\\ell f = \\big(2 J(\\pi_1) - \\tfrac12 J(\\pi_0)\\big)\\,\\nabla_b f(b).

    Biased, but exact to second order: unbiased at :math:`\\lambda = 1` when :math:`f` is
    quadratic in :math:`b` for two classes (a Bernoulli site), the case of the paper's
    Theorem (straight-through is first order only).

    :param torch.Tensor one_hot: the draw :math:`b \\sim \\mathrm{Cat}(\\pi_0)`.
    :param torch.Tensor logits: :math:`\\ell`, broadcastable to ``one_hot``.
    :param temperature: :math:`\\lambda > 0`.
    :return: :math:`b` with the surrogate gradient.
    """
    pi0 = torch.softmax(logits, -1)
    pi1 = 0.5 * (one_hot + torch.softmax(logits / temperature, -1))
    return one_hot + 2.0 * _softmax_vjp_surrogate(pi1, logits) - 0.5 * _softmax_vjp_surrogate(
        pi0, logits
    )


def gumbel_rao(
    one_hot: Tensor, logits: Tensor, v: Tensor, temperature: Tensor | float
) -> Tensor:
    """The Gumbel-Rao estimator (Paulus, Maddison & Krause, 2021, *Rao-Blackwellizing the
    straight-through Gumbel-softmax gradient estimator*, ICLR): the straight-through
    Gumbel-softmax gradient averaged over :math:`K` Gumbel perturbations drawn *given*
    the draw :math:`b` (:func:`conditional_gumbel`, noise held fixed),

    .. math::

        \\hat\\nabla_\\ell f = \\frac1K \\sum_{k=1}^K
            \\frac{\\partial\\,\\mathrm{softmax}((\\ell + g^{(k)})/\\lambda)}
            {\\partial \\ell}^{\\!\\top} \\nabla_b f(b), \\qquad
            g^{(k)} \\sim \\mathrm{Gumbel} \\mid \\arg\\max(\\ell + g) = b.

    Its mean is the straight-through Gumbel-softmax's (so it is exactly as biased), and
    its variance is no larger (Rao-Blackwell).

    :param torch.Tensor one_hot: the draw :math:`b \\sim \\mathrm{Cat}(\\mathrm{softmax}(\\ell))`.
    :param torch.Tensor logits: :math:`\\ell`, the shape of ``one_hot``.
    :param torch.Tensor v: uniform noise, shape ``(K,) + one_hot.shape``.
    :param temperature: :math:`\\lambda > 0`.
    :return: :math:`b` with the surrogate gradient.
    """
    log_theta = torch.log_softmax(logits, -1)
    z = conditional_gumbel(one_hot.argmax(-1), log_theta.detach(), v)
    soft = relaxed_one_hot(through_noise(z, log_theta), temperature).mean(0)
    return replace_gradient(one_hot, soft)

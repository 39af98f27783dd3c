"""Variance and signal-to-noise ratio of an objective's gradient estimator.

:func:`gradient_stats` draws the estimator's gradient :math:`\\hat g_1, \\ldots, \\hat g_D`
repeatedly at the current parameters and reports, per parameter element,

.. math::

    \\bar g = \\frac1D \\sum_d \\hat g_d, \\qquad
    s^2 = \\frac{1}{D-1} \\sum_d (\\hat g_d - \\bar g)^2, \\qquad
    \\mathrm{SNR} = |\\bar g| / s

(Rainforth et al., 2018, "Tighter variational bounds are not necessarily better"), and
per tensor and per group (model / guide / control variates) the norm of the mean, the
total variance :math:`\\sum s^2` and their ratio :math:`\\|\\bar g\\| / \\sqrt{\\sum s^2}`.
It changes no training state (see :func:`gradient_stats`).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from pyro_wakesleep._validation import check_int
from pyro_wakesleep.diagnostics.guard import TrainingStateGuard
from pyro_wakesleep.diagnostics.results import EstimatorComparison, GradientStats, Moments
from pyro_wakesleep.objectives.base import Objective
from pyro_wakesleep.traces import guess_max_plate_nesting

__all__ = ["compare_estimators", "gradient_stats"]

_PLATE = "_gradient_draws"
_METHODS = ("auto", "batched", "sequential")


class _NotBatchable(Exception):
    pass


def gradient_stats(
    model: Callable, guide: Callable, loss: ELBO, *args: Any, num_draws: int = 100,
    method: str = "auto", batch_size: int = 32, only: Sequence[str] | None = None,
    seed: int | None = None, keep_draws: bool = False, **kwargs: Any,
) -> GradientStats:
    """Draws the gradient of ``loss`` (any :class:`pyro.infer.ELBO`: the objectives of
    this package, ``Trace_ELBO``, ``TraceGraph_ELBO``, ...) ``num_draws`` times at the
    current parameters and returns its mean, variance and signal-to-noise ratio.

    Nothing of the training state changes: parameter values, the param store's contents
    (parameters the call had to create are removed again), ``.grad`` fields, the
    objective's control variates (run in ``eval()`` mode: running averages are frozen,
    so every draw sees the same baseline; restored afterwards) and its attributes, and
    the global random number generators (restored, so training continues as if the call
    had not happened; pass ``seed`` for independent repeats).

    Vectorization (``method``):

    * ``"batched"``: ``batch_size`` draws at a time in one pass of the loss, through
      an outer :class:`pyro.plate` of draws around model and guide (so they must be
      vectorizable, and their plate nesting known or guessable). The per-draw
      gradients come from one batched vector-Jacobian product (``is_grads_batched``)
      from the sites' log-densities to the parameters; this is exact when the gradient
      reaches the parameters only through the log-densities, which is checked (their sum
      must equal the pass's gradient). It is not the case for learned baselines
      (``NeuralBaseline``, ``nn_baseline``): exclude them with ``only=["model",
      "guide"]`` or use ``"sequential"``.
    * ``"sequential"``: one ``loss_and_grads`` call per draw (its particles vectorized as
      the loss does it); works for any loss.
    * ``"auto"`` (default): ``"batched"``, falling back to ``"sequential"`` when the check
      fails or the model cannot be batched.

    :param callable model: the model.
    :param callable guide: the guide.
    :param pyro.infer.ELBO loss: the objective whose estimator is measured.
    :param int num_draws: number of gradient draws :math:`D \\ge 2`.
    :param str method: ``"auto"``, ``"batched"`` or ``"sequential"``.
    :param int batch_size: draws per batched pass; memory grows with its square (the
        vector-Jacobian products carry one masked copy of the log-densities per draw).
    :param list only: names of parameters or groups (``"model"``, ``"guide"``,
        ``"control_variates"``, ``"other"``) to report; default all.
    :param int seed: seed the draws (the global RNG is restored afterwards either way).
    :param bool keep_draws: keep the ``(num_draws, *shape)`` gradients in ``.draws``.
    :rtype: GradientStats
    """
    if not isinstance(loss, ELBO):
        raise TypeError(f"loss must be a pyro.infer.ELBO, got {loss!r}")
    check_int(num_draws, "num_draws", 2)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    check_int(batch_size, "batch_size")
    with TrainingStateGuard(loss) as guard:
        groups = _warm_up(model, guide, loss, args, kwargs)
        params = _select(groups, only)
        guard.checkpoint()
        if seed is not None:
            pyro.set_rng_seed(seed)
        used = "sequential" if method == "sequential" else "batched"
        moments = Moments(params, keep_draws)
        if used == "batched":
            try:
                nesting = _nesting(model, guide, loss, args, kwargs)
                for size in _chunks(num_draws, batch_size):
                    moments.add(_batched(model, guide, loss, args, kwargs, size, nesting, params))
                    guard.reset()
            except _NotBatchable as err:
                if method == "batched":
                    raise ValueError(f"gradient_stats cannot batch the draws: {err}") from err
                used, moments = "sequential", Moments(params, keep_draws)
                guard.reset()
        if used == "sequential":
            for _ in range(num_draws):
                moments.add(_sequential(model, guide, loss, args, kwargs, params))
                guard.reset()
    return moments.result({n: groups[n] for n in params}, used, type(loss).__name__)


def _warm_up(model: Callable, guide: Callable, loss: ELBO, args: tuple, kwargs: dict
             ) -> dict[str, str]:
    """Registers the parameters and lazily created control variates; freezes the latter;
    returns each parameter's group."""
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        loss.loss(model, guide, *args, **kwargs)  # type: ignore[attr-defined]
    cvs = getattr(loss, "control_variates", None)
    if isinstance(cvs, torch.nn.Module):
        cvs.eval()
    groups = {}
    for name, _ in pyro.get_param_store().named_parameters():
        in_model = model_trace.nodes.get(name, {}).get("type") == "param"
        in_guide = guide_trace.nodes.get(name, {}).get("type") == "param"
        groups[name] = (
            "shared" if in_model and in_guide else "model" if in_model else
            "guide" if in_guide else
            "control_variates" if name.startswith("control_variates.") else "other"
        )
    return groups


def _select(groups: Mapping[str, str], only: Sequence[str] | None) -> dict[str, Tensor]:
    store = dict(pyro.get_param_store().named_parameters())
    if only is not None:
        unknown = [o for o in only if o not in groups and o not in groups.values()]
        if unknown:
            raise ValueError(f"only names no parameter or group: {unknown}; parameters: "
                             f"{sorted(groups)}")
    params = {n: p for n, p in store.items() if p.requires_grad and (
        only is None or n in only or groups[n] in only)}
    if not params:
        raise ValueError("gradient_stats found no parameter to differentiate")
    return params


def _pyro_vectorized(loss: ELBO) -> bool:
    # Pyro's own ELBOs put a particle plate at dim=-max_plate_nesting when vectorized
    return not isinstance(loss, Objective) and bool(loss.vectorize_particles)


def _nesting(model: Callable, guide: Callable, loss: ELBO, args: tuple, kwargs: dict) -> int:
    """The plate nesting of model and guide (without any particle plate)."""
    if loss.max_plate_nesting == math.inf:
        with poutine.block(), torch.no_grad():
            return guess_max_plate_nesting(model, guide, args, kwargs)
    counted = _pyro_vectorized(loss) and loss.num_particles > 1
    return int(loss.max_plate_nesting) - int(counted)


def _chunks(total: int, size: int) -> Iterator[int]:
    while total > 0:
        yield min(size, total)
        total -= size


def _sequential(model: Callable, guide: Callable, loss: ELBO, args: tuple, kwargs: dict,
                params: dict[str, Tensor]) -> dict[str, Tensor]:
    for p in params.values():
        p.grad = None
    loss.loss_and_grads(model, guide, *args, **kwargs)  # type: ignore[attr-defined]
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            .unsqueeze(0) for n, p in params.items()}


@contextlib.contextmanager
def _recording(records: list[tuple[Tensor, list]]) -> Iterator[None]:
    """Records every site's unscaled log-density computed by a trace, with a hook that
    keeps the gradient reaching it."""
    original = Trace.compute_log_prob, Trace.compute_score_parts
    seen: set[int] = set()

    def record(trace: Trace) -> None:
        for site in trace.nodes.values():
            value = site.get("unscaled_log_prob")
            if isinstance(value, Tensor) and value.requires_grad and id(value) not in seen:
                seen.add(id(value))
                slot: list = [None]
                value.register_hook(lambda g, slot=slot: slot.__setitem__(0, g))
                records.append((value, slot))

    def compute_log_prob(self: Trace, *a: Any, **k: Any) -> None:
        original[0](self, *a, **k)
        record(self)

    def compute_score_parts(self: Trace) -> None:
        original[1](self)
        record(self)

    Trace.compute_log_prob, Trace.compute_score_parts = (  # type: ignore[method-assign]
        compute_log_prob, compute_score_parts)
    try:
        yield
    finally:
        Trace.compute_log_prob, Trace.compute_score_parts = original  # type: ignore[method-assign]


def _batched(model: Callable, guide: Callable, loss: ELBO, args: tuple, kwargs: dict,
             size: int, nesting: int, params: dict[str, Tensor]) -> dict[str, Tensor]:
    batched_loss: Any = copy.copy(loss)
    batched_loss.max_plate_nesting = nesting + 1 + int(_pyro_vectorized(loss))
    batched_loss.retain_graph = True
    plate = pyro.plate(_PLATE, size, dim=-(nesting + 1))
    records: list[tuple[Tensor, list]] = []
    for p in params.values():
        p.grad = None
    try:
        with _recording(records):
            batched_loss.loss_and_grads(plate(model), plate(guide), *args, **kwargs)
    except (RuntimeError, ValueError) as err:
        raise _NotBatchable(f"the loss failed on the batched model ({err})") from err
    totals = {n: p.grad if p.grad is not None else torch.zeros_like(p)
              for n, p in params.items()}
    outputs, grad_outputs = [], []
    eye = torch.eye(size)
    for value, (grad,) in records:
        if grad is None:
            continue
        axis = value.dim() - (nesting + 1)
        if axis < 0 or value.shape[axis] != size:
            raise _NotBatchable(f"a log-density of shape {tuple(value.shape)} has no draw axis")
        shape = [size if i == axis else 1 for i in range(value.dim())]
        outputs.append(value)
        grad_outputs.append(grad.unsqueeze(0) * eye.reshape(size, *shape))
    names = list(params)
    draws = _vjp(outputs, [params[n] for n in names], grad_outputs, size)
    result = {}
    for name, draw in zip(names, draws, strict=True):
        draw = torch.zeros((size, *params[name].shape)) if draw is None else draw
        scale = float(draw.abs().max()) if draw.numel() else 0.0
        if not torch.allclose(draw.sum(0), totals[name], rtol=1e-3, atol=1e-4 * scale + 1e-12):
            raise _NotBatchable(
                f"the gradient of '{name}' does not reach it only through the sites' "
                "log-densities (e.g. a learned baseline's regression loss)"
            )
        result[name] = draw.detach()
    return result


def _vjp(outputs: list[Tensor], inputs: list[Tensor], grad_outputs: list[Tensor],
         size: int) -> Sequence[Tensor | None]:
    if not outputs:
        return [None] * len(inputs)
    try:
        return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True,
                                   allow_unused=True, is_grads_batched=True)
    except RuntimeError:  # an operation without a batching rule: one draw at a time
        per_draw = [torch.autograd.grad(outputs, inputs, [g[d] for g in grad_outputs],
                                        retain_graph=True, allow_unused=True)
                    for d in range(size)]
        return [None if per_draw[0][i] is None else torch.stack([g[i] for g in per_draw])
                for i in range(len(inputs))]


def compare_estimators(
    losses: Mapping[str, ELBO], model: Callable, guide: Callable, *args: Any,
    num_draws: int = 100, method: str = "auto", only: Sequence[str] | None = None,
    seed: int | None = 0, **kwargs: Any,
) -> EstimatorComparison:
    """:func:`gradient_stats` of several objectives on the same model, guide and
    parameters, e.g. ``{"REINFORCE": ScoreFunctionELBO(), "NVIL": ScoreFunctionELBO(
    control_variate=NeuralBaseline(...))}``. Each is drawn with the same ``seed``.

    :param dict losses: display name to objective.
    :return: an :class:`EstimatorComparison`: ``.to_dataframe()`` (one row per estimator
        and group) and ``.plot()`` (variance and SNR side by side).
    """
    if not losses:
        raise ValueError("compare_estimators needs at least one loss")
    return EstimatorComparison({
        name: gradient_stats(model, guide, loss, *args, num_draws=num_draws, method=method,
                             only=only, seed=seed, **kwargs)
        for name, loss in losses.items()
    })

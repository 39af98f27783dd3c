"""Optimizer updates inside a compiled training step (private to
:mod:`pyro_wakesleep.compiled`).

A recorded training step applies the optimizer's update itself, as one graph over every
parameter, reading the optimizer's hyperparameters and state where the optimizer keeps
them (so ``state_dict()``, schedulers and checkpoints see the same optimizer). The
updates are those of :class:`torch.optim.Adam`, :class:`torch.optim.AdamW` and
:class:`torch.optim.SGD` (their single-tensor and ``foreach`` paths, which compute the
same numbers on the CPU), operation for operation:

* the constants of a parameter group (betas, ``eps``, weight decay, momentum, ...) are
  constants of the graph and part of its signature;
* what changes from step to step (the learning rate, which a scheduler moves, and Adam's
  bias corrections, which depend on the step count) is computed in Python exactly as the
  optimizer computes it, in double precision, and passed to the graph as one tensor; the
  graph rounds each number to the parameter's dtype as the optimizer's kernels do with a
  Python number.

Parameters come from one :class:`torch.optim.Optimizer` (the module route) or from a
:class:`pyro.optim.PyroOptim` (``SVI``), which keeps one optimizer per parameter.
Anything else (another optimizer class, ``fused``/``capturable``/``differentiable``, a
tensor learning rate, step hooks, gradient clipping in a ``PyroOptim``) is named by
:func:`bind`, and the training step then runs its update eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import SGD, Adam, AdamW, Optimizer
from torch.optim import optimizer as optimizer_module

__all__ = ["NOT_YET", "Binding", "bind", "optimizer_of", "update_fn"]

#: what :func:`bind` answers before the eager optimizer has created its objects and state
NO_OPTIMIZER = "a parameter has no optimizer yet"
NO_STATE = "the optimizer has no state for a parameter yet"
NOT_YET = frozenset({NO_OPTIMIZER, NO_STATE})

_SUPPORTED = (Adam, AdamW, SGD)


class Binding:
    """The optimizer of each trained parameter, bound for one step.

    :ivar list optimizers: the torch optimizer of each parameter.
    :ivar list groups: the parameter group of each parameter.
    :ivar tuple key: the constants the update graph is valid for.
    """

    def __init__(self, optimizers: list[Optimizer], groups: list[dict], key: tuple) -> None:
        self.optimizers, self.groups, self.key = optimizers, groups, key

    def states(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The optimizer state tensors the update reads and writes, in graph order."""
        out: list[Tensor] = []
        for opt, group, p in zip(self.optimizers, self.groups, params, strict=True):
            out.extend(opt.state[p][name] for name in _state_names(opt, group))
        return out

    def scalars(self, params: Sequence[Tensor]) -> Tensor:
        """The numbers that change between steps (learning rates, bias corrections), as
        the optimizer computes them in Python."""
        values: list[float] = []
        adam = [i for i, opt in enumerate(self.optimizers) if isinstance(opt, Adam)]
        steps = torch.stack([self.optimizers[i].state[params[i]]["step"] for i in adam]
                            ).tolist() if adam else []
        counts = dict(zip(adam, steps, strict=True))
        for i, group in enumerate(self.groups):
            lr = group["lr"]
            if i in counts:
                beta1, beta2 = group["betas"]
                step = counts[i] + 1
                bias_correction1 = 1 - beta1 ** step
                bias_correction2 = 1 - beta2 ** step
                values += [-(lr / bias_correction1), bias_correction2 ** 0.5,
                           1 - lr * group["weight_decay"]]
            else:
                values.append(-lr)
        # one rounding of each double to the parameters' dtype, as the kernels round a
        # Python number (float64 and a cast per parameter where dtypes differ)
        dtypes = {p.dtype for p in params}
        return torch.tensor(values, dtype=dtypes.pop() if len(dtypes) == 1 else torch.float64)


def optimizer_of(source: Any, param: Tensor) -> tuple[Optimizer, dict] | str:
    """The torch optimizer and group that update ``param``, or why there is none."""
    optim_objs = getattr(source, "optim_objs", None)
    if optim_objs is not None:  # a pyro.optim.PyroOptim: one optimizer per parameter
        obj = optim_objs.get(param)
        if obj is None:
            return NO_OPTIMIZER
        if source.grad_clip.get(param) is not None:
            return "the PyroOptim clips gradients"
        if isinstance(obj, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return "a ReduceLROnPlateau scheduler steps its optimizer"
        opt = getattr(obj, "optimizer", obj)
    else:
        opt = source
    for group in opt.param_groups:
        if any(p is param for p in group["params"]):
            return opt, group
    return "a parameter the step trains is not in the optimizer"


def _state_names(opt: Optimizer, group: dict) -> tuple[str, ...]:
    if isinstance(opt, Adam):
        return ("step", "exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if group["amsgrad"]
                                                     else ()))
    return ("momentum_buffer",) if group["momentum"] != 0 else ()


def _constants(opt: Optimizer, group: dict) -> tuple | str:
    if type(opt) not in _SUPPORTED:
        return (f"{type(opt).__module__}.{type(opt).__qualname__} has no compiled update "
                "(Adam, AdamW and SGD do)")
    if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks or \
            optimizer_module._global_optimizer_pre_hooks or \
            optimizer_module._global_optimizer_post_hooks:
        return "the optimizer has step hooks"
    for flag in ("fused", "capturable", "differentiable"):
        if group.get(flag):
            return f"the optimizer is {flag}"
    if isinstance(group["lr"], Tensor) or not isinstance(group["lr"], float | int):
        return f"the learning rate is a {type(group['lr']).__name__}"
    if isinstance(opt, Adam):
        betas = group["betas"]
        if any(isinstance(b, Tensor) for b in betas):
            return "Adam's betas are tensors"
        decoupled = isinstance(opt, AdamW) or bool(group.get("decoupled_weight_decay"))
        return ("adam", float(betas[0]), float(betas[1]), float(group["eps"]),
                float(group["weight_decay"]), bool(group["amsgrad"]),
                bool(group["maximize"]), decoupled)
    return ("sgd", float(group["momentum"]), float(group["dampening"]),
            float(group["weight_decay"]), bool(group["nesterov"]), bool(group["maximize"]))


def bind(source: Any, params: Sequence[Tensor]) -> Binding | str:
    """The :class:`Binding` of ``params`` to ``source`` (a torch optimizer or a
    :class:`pyro.optim.PyroOptim`), or why the update cannot be compiled."""
    optimizers: list[Optimizer] = []
    groups: list[dict] = []
    key: list[Any] = []
    seen: dict[int, tuple | str] = {}
    for p in params:
        found = optimizer_of(source, p)
        if isinstance(found, str):
            return found
        opt, group = found
        constants = seen.get(id(group))
        if constants is None:
            constants = seen[id(group)] = _constants(opt, group)
        if isinstance(constants, str):
            return constants
        state = opt.state.get(p)
        names = _state_names(opt, group)
        if names and (state is None or any(name not in state for name in names)):
            return NO_STATE
        optimizers.append(opt)
        groups.append(group)
        key.append(constants)
    return Binding(optimizers, groups, tuple(key))


def update_fn(binding: Binding) -> Callable[..., None]:
    """The update of every bound parameter as a function
    ``update(*params, *grads, *states, scalars)`` that writes parameters and state in
    place, to be recorded (see the module docstring)."""
    constants = list(binding.key)
    counts = [len(_state_names(opt, group))
              for opt, group in zip(binding.optimizers, binding.groups, strict=True)]
    n = len(constants)

    def update(*inputs: Tensor) -> None:
        params, grads, rest = inputs[:n], inputs[n:2 * n], list(inputs[2 * n:])
        scalars = rest.pop().unbind()
        k = 0  # position in scalars
        for p, g, c, count in zip(params, grads, constants, counts, strict=True):
            states, rest = rest[:count], rest[count:]
            if c[0] == "adam":
                k = _adam(p, g, states, scalars, k, *c[1:])
            else:
                _sgd(p, g, states, _as(scalars[k], p), *c[1:])
                k += 1
    return update


def _as(scalar: Tensor, p: Tensor) -> Tensor:
    return scalar if scalar.dtype == p.dtype else scalar.to(p.dtype)


def _adam(p: Tensor, g: Tensor, states: list[Tensor], scalars: Sequence[Tensor], k: int,
          beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
          maximize: bool, decoupled: bool) -> int:
    """``torch.optim.Adam``'s single-tensor update (``addcdiv_`` with a number is
    ``p + (exp_avg * value) / denom``, the same operations in the same order)."""
    step, exp_avg, exp_avg_sq = states[:3]
    neg_step_size, bias_correction2_sqrt, decay = (_as(scalars[k + i], p) for i in range(3))
    if maximize:
        g = -g
    step.add_(1)
    if weight_decay != 0:
        if decoupled:
            p.mul_(decay)
        else:
            g = g.add(p, alpha=weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if amsgrad:
        states[3].copy_(torch.maximum(states[3], exp_avg_sq))
        denom = (states[3].sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.add_((exp_avg * neg_step_size) / denom)
    return k + 3


def _sgd(p: Tensor, g: Tensor, states: list[Tensor], neg_lr: Tensor, momentum: float,
         dampening: float, weight_decay: float, nesterov: bool, maximize: bool) -> None:
    """``torch.optim.SGD``'s single-tensor update (``add_(g, alpha=-lr)`` is
    ``addcmul_(g, -lr)``, bit for bit on the CPU)."""
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    if momentum != 0:
        buf = states[0]
        buf.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add(buf, alpha=momentum) if nesterov else buf
    p.addcmul_(g, neg_lr)

"""Storchastic's estimators on the linear sigmoid belief net of ``bench_discrete.py``.

Not run by hand: ``python benchmarks/bench_discrete.py --storchastic PYTHON`` starts this
script under ``PYTHON``, a Python with storchastic installed (storchastic is a contender,
never a dependency of this project; this script imports nothing of the project), and
drives it through one JSON command per line on stdin, one reply per line on stdout
(prefixed ``@storch``); the weights, batches and results travel through files in a folder
the caller owns. Commands:

* ``{"cmd": "init", "file": PATH, "names": [...], "layers": L, ...}``: the training data
  (``uint8``), the batch order, the initial ``state_dict`` of the caller's
  ``SigmoidBeliefNet`` and the variance batch, saved with ``torch.save``; builds one run
  per name (same weights, seeded once with ``seed``, like the caller's runs);
* ``{"cmd": "advance", "name": N, "seconds": S}``: trains for about ``S`` seconds of the
  run's own step time; the ``state_dict`` at each checkpoint of the budget goes to a file
  whose path is returned (the caller computes the ELBO there, with its own code);
* ``{"cmd": "moments", "name": N, "weights": PATH or null, "out": PATH}``: the mean and
  elementwise variance of the recognition-network gradient over ``grad_draws`` draws on the
  variance batch, at the run's own parameters or at the given ones (put back afterwards),
  with the running state of the estimator frozen;
* ``{"cmd": "toy", "name": N, "draws": D}``: the estimator's mean gradient on a toy with
  a known answer, :math:`\\nabla_\\theta \\mathbb E_{b \\sim \\mathrm{Bern}(\\sigma(\\theta))}
  [\\sum_d (b_d - t)^2]` at :math:`\\theta = 0`, :math:`t = 0.45`, one unit, 1,000 copies in
  a ``data`` plate (exact: :math:`\\sigma'(0)(1 - 2t) = 0.025`), over ``D`` draws:
  the ratio of the mean to the exact gradient and its standard error;
* ``{"cmd": "quit"}``.

The model is the caller's: the same modules, so the ``state_dict`` keys agree, and each
term of the ELBO registered as its own cost (``-log p`` per layer, ``log q`` per layer),
scaled by the batch size so that the gradient is that of the ELBO summed over the batch,
as Pyro's. Each layer is sampled by its own storchastic method (plates ``h1``, ``h2``:
storchastic refuses one plate for two samples), so a layer's draws multiply: two layers
of two draws are four runs of the model.

Storchastic 0.3.7's DisARM and ARM have bugs on a batched, multi-unit Bernoulli; the
``*_fixed`` variants below patch them as narrowly as possible, and the unpatched ones
are run as shipped:

* ``DisARM.comp_estimator`` indexes the sample plate with ``(None,) * plate_index``
  instead of ``(slice(None),) * plate_index``: it raises as soon as the sample plate is not
  the first dimension (here, after the ``data`` plate);
* ``DisARM.estimator`` returns the antithetic cost :math:`f(\\tilde b)` as the control
  variate itself, so the surrogate adds :math:`f(\\tilde b)\\,\\nabla L` where it must
  subtract it: the estimate of the score term is
  :math:`\\tfrac12 w (f(b) + f(\\tilde b))`, whose mean is zero; and its ``plate_weighting``
  (weight 1 on the draw, 0 on its antithetic partner) is defined but never installed, so
  the plate weights are 1/2 each and the estimate is halved once more;
* ``ARM.estimator`` leaves the per-unit log-densities unsummed over the event dimension,
  so every cost is broadcast over the 200 units and its direct (pathwise) gradient counted
  200 times (the generative gradient is 200 times too large, the recognition gradient gets
  200 times the zero-mean :math:`\\nabla_\\phi \\log q` term).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import storch
import torch
import torch.nn.functional as F
from storch.method import ARM, REBAR, RELAX, DisARM, ScoreFunction
from storch.util import magic_box
from torch import Tensor, nn
from torch.distributions import Bernoulli


class FixedDisARM(DisARM):
    """Storchastic's DisARM with its three bugs fixed (see the module docstring)."""

    def __init__(self, plate_name: str, n_samples: int = 1) -> None:
        super().__init__(plate_name, n_samples=n_samples)
        self.sampling_method.set_mc_weighting_function(self.plate_weighting)

    @storch.deterministic
    def comp_estimator(self, tensor: Any, cost: Any, logits: Any, plate_index: int,
                       n: int) -> tuple[Any, Any]:
        first = (slice(None),) * plate_index + (slice(n),)
        second = (slice(None),) * plate_index + (slice(n, 2 * n),)
        b, b_tilde = tensor[first], tensor[second]
        weighting = ((-1) ** b_tilde.float()) * ~b.eq(b_tilde) * logits.abs().sigmoid()
        log_prob = torch.zeros_like(tensor, dtype=cost.dtype)
        log_prob[first] = weighting.detach() * logits
        baseline = torch.zeros_like(cost)
        baseline[first] = cost[second]
        return log_prob, baseline

    def estimator(self, tensor: Any, cost: Any) -> tuple[Any, Any]:
        plate = tensor.get_plate(tensor.name)
        index = tensor.get_plate_dim_index(plate.name)
        multiplicative, baseline = self.comp_estimator(
            tensor, cost, tensor.distribution.logits, index, plate.n // 2)
        log_prob = 0.5 * multiplicative.sum(dim=multiplicative.event_dim_indices)
        return log_prob, (1.0 - magic_box(log_prob)) * baseline


class IndexFixedDisARM(FixedDisARM):
    """Only the indexing fixed: storchastic's DisARM as it computes once it runs."""

    def __init__(self, plate_name: str, n_samples: int = 1) -> None:
        DisARM.__init__(self, plate_name, n_samples=n_samples)

    def estimator(self, tensor: Any, cost: Any) -> tuple[Any, Any]:
        plate = tensor.get_plate(tensor.name)
        index = tensor.get_plate_dim_index(plate.name)
        multiplicative, baseline = self.comp_estimator(
            tensor, cost, tensor.distribution.logits, index, plate.n // 2)
        return 0.5 * multiplicative.sum(dim=multiplicative.event_dim_indices), baseline


class FixedARM(ARM):
    """Storchastic's ARM with the log-density summed over the event dimension."""

    def estimator(self, tensor: Any, cost: Any) -> tuple[Any, Any]:
        plate = tensor.get_plate(tensor.name)
        index = tensor.get_plate_dim_index(plate.name)
        log_prob, baseline = storch.deterministic(self.comp_estimator)(
            tensor, cost, tensor.distribution.logits, index, plate.n // 2)
        log_prob = log_prob.sum(log_prob.event_dim_indices)
        return log_prob, (1.0 - magic_box(log_prob)) * baseline


#: key -> (factory(plate, width) -> method, draws per layer)
METHODS: dict[str, tuple[Callable[[str, int], nn.Module], int]] = {
    "avg": (lambda p, w: ScoreFunction(p, n_samples=1, baseline_factory="moving_average"), 1),
    "rloo": (lambda p, w: ScoreFunction(p, n_samples=2, baseline_factory="batch_average"), 2),
    "arm": (lambda p, w: ARM(p, n_samples=1), 2),
    "arm_fixed": (lambda p, w: FixedARM(p, n_samples=1), 2),
    "disarm": (lambda p, w: DisARM(p, n_samples=1), 2),
    "disarm_index": (lambda p, w: IndexFixedDisARM(p, n_samples=1), 2),
    "disarm_fixed": (lambda p, w: FixedDisARM(p, n_samples=1), 2),
    "rebar": (lambda p, w: REBAR(p, n_samples=1), 3),
    "relax": (lambda p, w: RELAX(p, n_samples=1, in_dim=w), 1),
    "relax_rebar": (lambda p, w: RELAX(p, n_samples=1, in_dim=w, rebar=True), 3),
}


class Generative(nn.Module):
    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.prior_logits = nn.Parameter(torch.zeros(sizes[-1]))
        self.layers = nn.ModuleList(
            nn.Linear(sizes[i + 1], sizes[i]) for i in range(len(sizes) - 1))


class SBN(nn.Module):
    """The caller's linear ``SigmoidBeliefNet``, module for module."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.generative = Generative(sizes)
        self.recognition = nn.ModuleList(
            nn.Linear(sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1))


@storch.deterministic
def bernoulli_log_prob(logits: Tensor, value: Tensor) -> Tensor:
    return (logits * value - F.softplus(logits)).sum(-1)


@storch.deterministic
def affine(layer: nn.Module, h: Tensor) -> Tensor:
    return layer(h.float())


class Run:
    """One storchastic estimator's training run."""

    def __init__(self, key: str, init: dict[str, Any], setup: dict[str, Any]) -> None:
        self.setup = setup
        sizes = (784, *([200] * setup["layers"]))
        self.net = SBN(sizes)
        self.net.load_state_dict(init["initial"])
        factory, draws = METHODS[key]
        self.evaluations = draws ** setup["layers"]
        self.methods = nn.ModuleList(factory(f"h{i + 1}", sizes[i + 1])
                                     for i in range(setup["layers"]))
        self.optim = torch.optim.Adam(
            [*self.net.parameters(), *self.methods.parameters()], lr=setup["lr"])
        seconds = setup["seconds"]
        self.checkpoints = [seconds / 4, seconds / 2, seconds]
        self.saved: list[str] = []
        self.elapsed, self.step = 0.0, 0

    def loss(self, x: Tensor) -> Tensor:
        """One storchastic backward pass of the negative ELBO summed over the batch."""
        storch.reset()
        scale = float(len(x))
        data = storch.denote_independent(x, 0, "data")
        h: Any = data
        hs = []
        for i, (layer, method) in enumerate(zip(self.net.recognition, self.methods,
                                                strict=True)):
            logits = affine(layer, h)
            h = method(Bernoulli(logits=logits))
            h = h.float() if h.dtype == torch.bool else h
            storch.add_cost(scale * bernoulli_log_prob(logits, h), f"log_q{i + 1}")
            hs.append(h)
        generative = self.net.generative
        storch.add_cost(-scale * bernoulli_log_prob(generative.prior_logits, hs[-1]), "log_p_top")
        for i in range(len(hs) - 1, 0, -1):
            logits = affine(generative.layers[i], hs[i])
            storch.add_cost(-scale * bernoulli_log_prob(logits, hs[i - 1]), f"log_p{i}")
        storch.add_cost(-scale * bernoulli_log_prob(affine(generative.layers[0], hs[0]), data),
                        "log_p_x")
        return storch.backward()

    def advance(self, seconds: float, data: Tensor, order: Tensor, folder: str,
                tag: str) -> None:
        until = self.elapsed + seconds
        batch = self.setup["batch"]
        while len(self.saved) < len(self.checkpoints) and self.elapsed < until:
            if self.step < self.setup["steps"]:
                begin = (self.step * batch) % (len(data) - batch)
                x = data[order[begin:begin + batch] % len(data)].float()
                tic = time.perf_counter()
                self.optim.zero_grad(set_to_none=True)
                self.loss(x)
                self.optim.step()
                self.elapsed += time.perf_counter() - tic
                self.step += 1
            while len(self.saved) < len(self.checkpoints) and (
                    self.elapsed >= self.checkpoints[len(self.saved)]
                    or self.step >= self.setup["steps"]):
                path = f"{folder}/{tag}_{len(self.saved)}.pt"
                torch.save(self.net.state_dict(), path)
                self.saved.append(path)

    def moments(self, x: Tensor, weights: str | None, out: str) -> None:
        own = {k: v.clone() for k, v in self.net.state_dict().items()}
        state = {k: v.clone() for k, v in self.methods.state_dict().items()}
        if weights is not None:
            self.net.load_state_dict(torch.load(weights))
        params = list(self.net.recognition.parameters())
        samples = []
        try:
            for _ in range(self.setup["grad_draws"]):
                for p in [*self.net.parameters(), *self.methods.parameters()]:
                    p.grad = None
                self.loss(x)
                samples.append(torch.cat([p.grad.flatten() for p in params]).detach())
                self.methods.load_state_dict(state)  # running baselines frozen
        finally:
            self.net.load_state_dict(own)
            self.methods.load_state_dict(state)
            self.optim.zero_grad(set_to_none=True)
        stack = torch.stack(samples)
        torch.save({"mean": stack.mean(0), "var": stack.var(0)}, out)


def toy(key: str, draws: int) -> dict[str, float]:
    """The mean gradient over the exact one on the toy of the ``toy`` command."""
    theta = torch.zeros(1, requires_grad=True)
    method = METHODS[key][0]("b", 1)
    target = 0.45
    grads = []
    for _ in range(draws):
        storch.reset()
        theta.grad = None
        copies = storch.denote_independent(torch.zeros(1000, 1), 0, "data")
        logits = storch.deterministic(lambda c: theta + 0.0 * c)(copies)
        b = method(Bernoulli(logits=logits))
        b = b.float() if b.dtype == torch.bool else b
        storch.add_cost(storch.deterministic(lambda v: (v - target).pow(2).sum(-1))(b), "f")
        storch.backward()
        grads.append(theta.grad.item())
    ratio = torch.tensor(grads, dtype=torch.float64) / (0.25 * (1 - 2 * target))
    return {"ratio": ratio.mean().item(), "se": (ratio.std() / draws**0.5).item()}


def main() -> None:
    torch.set_num_threads(1)
    runs: dict[str, Run] = {}
    failed: dict[str, str] = {}
    init: dict[str, Any] = {}
    setup: dict[str, Any] = {}
    for line in sys.stdin:
        command = json.loads(line)
        reply: dict[str, Any] = {}
        try:
            if command["cmd"] == "quit":
                break
            if command["cmd"] == "init":
                setup = command
                init = torch.load(command["file"])
                torch.set_num_threads(command["threads"])
                torch.manual_seed(command["seed"])
                runs, failed = {}, {}
                for name in command["names"]:
                    try:
                        runs[name] = Run(name, init, setup)
                    except Exception as error:  # reported as the run's result
                        failed[name] = _message(error)
                reply = {"evaluations": {n: r.evaluations for n, r in runs.items()},
                         "failed": failed, "storchastic": _version()}
            elif command["name"] in failed:
                reply = {"error": failed[command["name"]]}
            elif command["cmd"] == "advance":
                run = runs[command["name"]]
                try:
                    run.advance(command["seconds"], init["data"], init["order"],
                                setup["folder"], command["tag"])
                except Exception as error:  # reported as the run's result
                    failed[command["name"]] = _message(error)
                    storch.reset()
                    raise
                reply = {"saved": run.saved, "steps": run.step, "elapsed": run.elapsed}
            elif command["cmd"] == "toy":
                reply = toy(command["name"], command["draws"])
            elif command["cmd"] == "moments":
                runs[command["name"]].moments(init["x"], command["weights"], command["out"])
        except Exception as error:  # the caller marks the run as failed
            reply = {"error": _message(error)}
        print("@storch " + json.dumps(reply), flush=True)


def _message(error: Exception) -> str:
    first = (str(error).splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:160]}"


def _version() -> str:
    from importlib.metadata import version

    return version("storchastic")


if __name__ == "__main__":
    main()

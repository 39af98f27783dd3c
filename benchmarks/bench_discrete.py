"""Benchmark: multi-sample and antithetic estimators for discrete latents.

Sigmoid belief nets on binarized MNIST as in the RELAX paper's Table 1 (linear, one layer
784-200 and two layers 784-200-200, batch 24) and the DisARM, ARMS and RODEO papers'
nonlinear one (``--layers nonlinear``: one stochastic layer of 200 units, recognition and
generative networks each with two deterministic hidden layers of 200 LeakyReLU(0.3)
units, 784-200-200-[200]-200-200-784), trained with, in one run:

* ``VimcoELBO`` with K = 2, 5, 10 (the importance-weighted bound, VIMCO baselines);
* ``DisarmELBO`` (and its ARM variant) with one antithetic group per step;
* ARMS (``DisarmELBO(4, "arms")``: 4 copula-correlated draws per layer, 1 + 3 x layers
  evaluations) beside DisARM with two independent groups and RLOO at ARMS's number of
  evaluations;
* RLOO: ``ScoreFunctionELBO`` with ``LeaveOneOutBaseline`` at the same number of model
  evaluations per step as DisARM (1 + number of layers), and again at REBAR's
  (1 + 2 x number of layers);
* NVIL: ``ScoreFunctionELBO`` with ``NeuralBaseline`` (784-100-1 tanh MLP), one particle;
* ``RebarELBO`` and ``RelaxELBO`` (default surrogate: a 32-unit tanh MLP on the relaxed
  layer, plus the REBAR term), one particle, 1 + 2 x (number of layers) evaluations per
  step (the guide's draw and two relaxed runs per layer) and a double backward; their
  temperature, scale and surrogate are trained with the rest by the same optimizer;
* Pyro's best option: ``TraceGraph_ELBO`` with the decaying-average baseline declared on
  every guide site;
* ``DoubleControlVariateELBO`` and ``RodeoELBO`` (leave-one-out with a Taylor or a
  discrete-Stein control variate, learned online) with K = 1 + number of layers draws
  (DisARM's and RLOO's evaluations) and K = 1 + 3 x number of layers (ARMS n=4's): K
  evaluations each, plus one backward pass for the gradient with respect to the draws.

Every estimator starts from the same initial weights, sees the same mini-batches and
trains for the same budget of its own step time, in interleaved slices (so a change in
the machine's load hits all of them alike). Reported per estimator: model evaluations per
step, steps per second, the training-set ELBO (nats per image: the plain single-sample
ELBO, 10 draws, on a fixed 1,000-image training subset, whatever the estimator optimizes)
at a quarter, half and all of the budget, and the variance of the guide gradient at the
trained parameters (mean over recognition-weight elements of the variance over repeated
draws on one fixed batch; running baselines frozen during the draws), and the same at
one common point, the parameters the RLOO run reached (each estimator keeps its own
baseline state there). NVIL's variance
normalization divides its gradient by a running scale, which lowers its figure by that
factor.

With ``--storchastic PYTHON`` (or ``STORCHASTIC_PYTHON``), a Python with storchastic
installed, the nearest peer joins the same run: its estimators that apply to Bernoulli
latents (``ScoreFunction`` with its moving-average or batch-average (leave-one-out)
baseline, ``ARM``, ``DisARM``, ``REBAR``, ``RELAX``), each as shipped and, where
storchastic 0.3.7 has a bug on this model, patched (see ``storch_sbn.py``), trained
through ``storch_sbn.py`` in that Python from the same initial weights on the same
batches, advanced in the same interleaved slices as ours, its ELBO computed here from its
checkpoints by the same code and its gradient variance at the same two points. The table
then also reports a bias check of storchastic's estimators: their mean gradient over the
exact one on a toy, :math:`\\mathbb E[(b - 0.45)^2]` (``storch_sbn.toy``).

Run: ``python benchmarks/bench_discrete.py --seconds 10`` (``--layers 1,2,nonlinear`` for all
three models); ``--toy`` prints instead the
ARMS paper's toy, :math:`\\mathbb E[(b - t)^2]` with :math:`t = 0.499`: exact gradient
variances of ARMS, DisARM and RLOO at equal evaluations, and ARMS's measured through
``DisarmELBO``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from common import (
    CONTROL_VARIATES,
    ParamStoreSlot,
    decaying_average,
    frozen_control_variates,
    gradient,
    machine,
    versions,
    write_table,
)
from pyro.infer import ELBO, SVI, TraceGraph_ELBO
from torch import Tensor, nn

from pyro_wakesleep import MovingAverageBaseline
from pyro_wakesleep.examples.datasets import load_binarized_mnist
from pyro_wakesleep.examples.models import SigmoidBeliefNet
from pyro_wakesleep.objectives.disarm import DisarmELBO
from pyro_wakesleep.objectives.double_cv import DoubleControlVariateELBO
from pyro_wakesleep.objectives.rebar import RebarELBO
from pyro_wakesleep.objectives.relax import RelaxELBO
from pyro_wakesleep.objectives.rodeo import RodeoELBO
from pyro_wakesleep.objectives.score_function import ScoreFunctionELBO
from pyro_wakesleep.objectives.vimco import VimcoELBO

BATCH = 24
#: the contender whose trained parameters serve as the common point for the variances
REFERENCE = "RLOO"
Factory = Callable[[SigmoidBeliefNet], tuple[ELBO, Callable, int]]
#: the ``--layers`` choices: linear SBNs with 1 or 2 stochastic layers, and the nonlinear one
MODELS = ("1", "2", "nonlinear")


def make_sbn(model: str) -> SigmoidBeliefNet:
    """A fresh SBN (weights from the global seed) for a ``--layers`` choice: ``"1"``,
    ``"2"`` (linear, 200 units per stochastic layer) or ``"nonlinear"``: one stochastic
    layer of 200 units whose recognition and generative networks each have two
    deterministic hidden layers of 200 units with LeakyReLU(0.3), as in the DisARM, ARMS
    and RODEO papers' nonlinear model (the authors' launchers: 200-200 LeakyReLU(0.3)
    hidden layers; the RELAX paper's uses tanh)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
    if model != "nonlinear":
        return SigmoidBeliefNet((784, *([200] * int(model))))
    net = SigmoidBeliefNet((784, 200), hidden=200)  # tanh hidden layers, replaced here
    for module in list(net.modules()):
        if isinstance(module, nn.Sequential):
            for index, part in enumerate(module):
                if isinstance(part, nn.Tanh):
                    module[index] = nn.LeakyReLU(0.3)
    return net


def model_title(model: str) -> str:
    """The heading of a ``--layers`` choice's table."""
    if model == "nonlinear":
        return (f"Nonlinear SBN 784-200-200-[200]-200-200-784 (one stochastic layer, "
                f"LeakyReLU(0.3)), batch {BATCH}")
    return f"Linear SBN 784-{'-'.join(['200'] * int(model))}, batch {BATCH}"


def _vimco(k: int) -> Factory:
    return lambda net: (VimcoELBO(k, max_plate_nesting=1), net.guide, k)


#: name -> factory(net) -> (objective, guide, model evaluations per step)
ESTIMATORS: dict[str, Factory] = {
    **{f"VIMCO K={k}": _vimco(k) for k in (2, 5, 10)},
    "DisARM": lambda net: (
        DisarmELBO(1, max_plate_nesting=1), net.guide, 1 + net.num_layers),
    "ARM": lambda net: (
        DisarmELBO(1, "arm", max_plate_nesting=1), net.guide, 1 + net.num_layers),
    "RLOO": lambda net: (
        ScoreFunctionELBO(1 + net.num_layers, CONTROL_VARIATES["loo"](), max_plate_nesting=1),
        net.guide, 1 + net.num_layers),
    "ARMS n=4": lambda net: (
        DisarmELBO(4, "arms", max_plate_nesting=1), net.guide, 1 + 3 * net.num_layers),
    "DisARM x2 groups": lambda net: (
        DisarmELBO(2, max_plate_nesting=1), net.guide, 2 * (1 + net.num_layers)),
    "RLOO @ ARMS n=4 evals": lambda net: (
        ScoreFunctionELBO(1 + 3 * net.num_layers, CONTROL_VARIATES["loo"](),
                          max_plate_nesting=1), net.guide, 1 + 3 * net.num_layers),
    "RLOO @ REBAR evals": lambda net: (
        ScoreFunctionELBO(1 + 2 * net.num_layers, CONTROL_VARIATES["loo"](),
                          max_plate_nesting=1), net.guide, 1 + 2 * net.num_layers),
    "NVIL": lambda net: (
        ScoreFunctionELBO(1, CONTROL_VARIATES["nvil"](), max_plate_nesting=1), net.guide, 1),
    "REBAR": lambda net: (
        RebarELBO(1, max_plate_nesting=1), net.guide, 1 + 2 * net.num_layers),
    "RELAX": lambda net: (
        RelaxELBO(1, max_plate_nesting=1), net.guide, 1 + 2 * net.num_layers),
    "Pyro TraceGraph_ELBO + avg": lambda net: (
        TraceGraph_ELBO(num_particles=1, max_plate_nesting=1),
        decaying_average(net.guide), 1),
    "Double CV": lambda net: (
        DoubleControlVariateELBO(1 + net.num_layers, max_plate_nesting=1), net.guide,
        1 + net.num_layers),
    "RODEO": lambda net: (
        RodeoELBO(1 + net.num_layers, max_plate_nesting=1), net.guide, 1 + net.num_layers),
    "Double CV @ ARMS n=4 evals": lambda net: (
        DoubleControlVariateELBO(1 + 3 * net.num_layers, max_plate_nesting=1), net.guide,
        1 + 3 * net.num_layers),
    "RODEO @ ARMS n=4 evals": lambda net: (
        RodeoELBO(1 + 3 * net.num_layers, max_plate_nesting=1), net.guide,
        1 + 3 * net.num_layers),
    # storchastic's moving average's decay; not in the default set
    "REINFORCE + avg": lambda net: (
        ScoreFunctionELBO(1, MovingAverageBaseline(0.95), max_plate_nesting=1), net.guide, 1),
}
DEFAULT_ESTIMATORS = [name for name in ESTIMATORS if name != "REINFORCE + avg"]

#: storchastic's estimators (``--storchastic``): name -> key in ``storch_sbn.METHODS``
STORCH_ESTIMATORS = {
    "storchastic REINFORCE + avg": "avg",
    "storchastic RLOO": "rloo",
    "storchastic ARM": "arm",
    "storchastic ARM, fixed": "arm_fixed",
    "storchastic DisARM": "disarm",
    "storchastic DisARM, index fixed": "disarm_index",
    "storchastic DisARM, fixed": "disarm_fixed",
    "storchastic REBAR": "rebar",
    "storchastic RELAX": "relax",
    "storchastic RELAX(rebar=True)": "relax_rebar",
}


@dataclass
class Row:
    name: str
    evaluations: int
    steps: int
    seconds: float
    elbo: list[float]  # at 1/4, 1/2, 1 of the budget
    variance: float  # at the contender's own trained parameters
    common_variance: float  # at the reference contender's trained parameters
    toy: str = ""  # storchastic's estimators: mean / exact gradient on the toy
    note: str = ""  # why the run failed, if it did


def train_elbo(net: SigmoidBeliefNet, x: Tensor, draws: int = 10) -> float:
    """The single-sample ELBO per image averaged over ``draws`` draws (no gradients)."""
    with torch.no_grad():
        loss = ScoreFunctionELBO(draws, max_plate_nesting=1).loss(net.model, net.guide, x)
    return -loss / len(x)


def grouped_moments(objective: ELBO, net: SigmoidBeliefNet, guide: Callable, x: Tensor,
                    groups: int, size: int) -> tuple[Tensor, Tensor]:
    """Mean and elementwise variance of the recognition-network gradient over ``groups``
    groups of ``size`` draws each (shapes ``(groups, parameters)``; a group's variance is
    the unbiased one over its draws), with running baselines frozen. Only one group's
    draws are held at a time."""
    params = list(net.recognition.parameters())
    store = pyro.get_param_store()
    frozen = {k: v.detach().clone() for k, v in store.items() if k.startswith("__baseline")}
    means, variances = [], []
    with frozen_control_variates(objective):
        for _ in range(groups):
            samples = []
            for _ in range(size):
                samples.append(gradient(params, lambda: objective.loss_and_grads(  # type: ignore
                    net.model, guide, x)))
                with torch.no_grad():
                    for k, v in frozen.items():
                        store[k].copy_(v)
            stack = torch.stack(samples)
            means.append(stack.mean(0))
            variances.append(stack.var(0))
    for value in store.values():
        value.unconstrained().grad = None  # type: ignore[attr-defined]
    return torch.stack(means), torch.stack(variances)


def guide_moments(objective: ELBO, net: SigmoidBeliefNet, guide: Callable, x: Tensor,
                  draws: int) -> tuple[Tensor, Tensor]:
    """Mean and elementwise variance of the recognition-network gradient over ``draws``
    draws, with running baselines frozen."""
    mean, var = grouped_moments(objective, net, guide, x, 1, draws)
    return mean[0], var[0]


class Contender:
    """One estimator's training run, advanced a time slice at a time. Pyro's param store
    is global, so each contender keeps its own store state and swaps it in to run."""

    def __init__(self, name: str, initial: SigmoidBeliefNet, args: argparse.Namespace) -> None:
        pyro.clear_param_store()
        self.name, self.args = name, args
        self.net = copy.deepcopy(initial)
        self.objective, self.guide, self.evaluations = ESTIMATORS[name](self.net)
        optim = pyro.optim.Adam({"lr": args.lr})  # type: ignore[attr-defined]
        self.svi = SVI(self.net.model, self.guide, optim, self.objective)
        self.order = torch.randperm(50_000, generator=torch.Generator().manual_seed(args.seed))
        self.checkpoints = [args.seconds / 4, args.seconds / 2, args.seconds]
        self.elbos: list[float] = []
        self.elapsed, self.step = 0.0, 0
        self.slot = ParamStoreSlot()

    @property
    def done(self) -> bool:
        return len(self.elbos) == len(self.checkpoints)

    def batch(self, data: Tensor, step: int) -> Tensor:
        """The mini-batch of step ``step`` (the same for every contender)."""
        begin = (step * BATCH) % (len(data) - BATCH)
        return data[self.order[begin:begin + BATCH] % len(data)]

    def advance(self, data: Tensor, subset: Tensor, slice_seconds: float) -> None:
        """Trains for about ``slice_seconds`` of this contender's own step time."""
        with self.slot.active():
            until = self.elapsed + slice_seconds
            while not self.done and self.elapsed < until:
                if self.step >= self.args.steps:  # stopped by --steps
                    self.elbos.append(train_elbo(self.net, subset))
                    continue
                x = self.batch(data, self.step)
                tic = time.perf_counter()
                self.svi.step(x)
                self.elapsed += time.perf_counter() - tic
                self.step += 1
                while not self.done and self.elapsed >= self.checkpoints[len(self.elbos)]:
                    self.elbos.append(train_elbo(self.net, subset))

    def moments(self, x: Tensor, weights: dict[str, Tensor] | None = None
                ) -> tuple[Tensor, Tensor]:
        """Guide-gradient moments at the trained parameters, or at ``weights`` (a
        ``state_dict`` of another contender's net, put back afterwards)."""
        self.slot.restore()
        own = copy.deepcopy(self.net.state_dict())
        if weights is not None:
            self.net.load_state_dict(weights)
        try:
            return guide_moments(self.objective, self.net, self.guide, x, self.args.grad_draws)
        finally:
            self.net.load_state_dict(own)


class StorchSession:
    """``storch_sbn.py`` under a Python with storchastic: one process for the whole
    invocation, driven by one JSON command per line; files go through ``folder``."""

    def __init__(self, python: str, folder: str) -> None:
        self.folder, self.version = folder, "?"
        self.log = open(os.path.join(folder, "stderr.log"), "w")  # noqa: SIM115
        script = Path(__file__).resolve().with_name("storch_sbn.py")
        self.process = subprocess.Popen(
            [python, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True, cwd=folder)

    def ask(self, **command: Any) -> dict[str, Any]:
        stdin, stdout = self.process.stdin, self.process.stdout
        if stdin is None or stdout is None:
            raise RuntimeError("storchastic companion: no pipes")
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        for line in stdout:
            if line.startswith("@storch "):
                return json.loads(line[len("@storch "):])
        self.log.flush()
        with open(self.log.name) as log:
            tail = log.read()[-2000:]
        raise RuntimeError(f"storchastic companion (storch_sbn.py) exited:\n{tail}")

    def start(self, names: list[str], initial: SigmoidBeliefNet, data: Tensor, x: Tensor,
              args: argparse.Namespace) -> dict[str, Any]:
        """Builds one run per name (storchastic keys) from ``initial``'s weights."""
        file = os.path.join(self.folder, "init.pt")
        order = torch.randperm(50_000, generator=torch.Generator().manual_seed(args.seed))
        torch.save({"data": data.to(torch.uint8), "order": order, "x": x,
                    "initial": initial.state_dict()}, file)
        reply = self.ask(cmd="init", file=file, names=names, layers=initial.num_layers,
                         seed=args.seed, lr=args.lr, seconds=args.seconds, steps=args.steps,
                         batch=BATCH, grad_draws=args.grad_draws, threads=args.threads,
                         folder=self.folder)
        if "error" in reply:
            raise RuntimeError(f"storchastic companion: {reply['error']}")
        self.version = reply["storchastic"]
        return reply

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.process.stdin.close()
        self.process.wait(timeout=60)
        self.log.close()


class StorchContender:
    """A storchastic estimator's run in the companion process, seen as a ``Contender``:
    its checkpoints come back as files, and their ELBO is computed here."""

    def __init__(self, name: str, session: StorchSession, initial: SigmoidBeliefNet,
                 started: dict[str, Any], args: argparse.Namespace) -> None:
        self.name, self.session, self.args = name, session, args
        self.key = STORCH_ESTIMATORS[name]
        self.failure: str = started["failed"].get(self.key, "")
        self.evaluations: int = started["evaluations"].get(self.key, 0)
        self.net = copy.deepcopy(initial)  # holds the checkpoints for the ELBO
        self.elbos: list[float] = []
        self.elapsed, self.step = 0.0, 0

    @property
    def done(self) -> bool:
        return bool(self.failure) or len(self.elbos) == 3

    def advance(self, data: Tensor, subset: Tensor, slice_seconds: float) -> None:
        reply = self.session.ask(cmd="advance", name=self.key, seconds=slice_seconds,
                                 tag=self.key)
        if "error" in reply:
            self.failure = reply["error"]
            return
        self.step, self.elapsed = reply["steps"], reply["elapsed"]
        for path in reply["saved"][len(self.elbos):]:
            self.net.load_state_dict(torch.load(path))
            pyro.clear_param_store()  # the net's own weights, whatever the store held
            self.elbos.append(train_elbo(self.net, subset))
            pyro.clear_param_store()

    def toy(self, draws: int) -> str:
        """Mean over exact gradient on the toy (``storch_sbn.toy``), ± a standard error."""
        reply = self.session.ask(cmd="toy", name=self.key, draws=draws)
        if "error" in reply:
            return "fails"
        return f"{reply['ratio']:.3f} ± {reply['se']:.3f}"

    def moments(self, x: Tensor, weights: dict[str, Tensor] | None = None
                ) -> tuple[Tensor, Tensor] | None:
        if self.failure:
            return None
        path = None
        if weights is not None:
            path = os.path.join(self.session.folder, "common.pt")
            torch.save(weights, path)
        out = os.path.join(self.session.folder, f"moments_{self.key}.pt")
        reply = self.session.ask(cmd="moments", name=self.key, weights=path, out=out)
        if "error" in reply:
            self.failure = reply["error"]
            return None
        moments = torch.load(out)
        return moments["mean"], moments["var"]


def run_all(
    names: list[str], initial: SigmoidBeliefNet, data: Tensor, subset: Tensor,
    args: argparse.Namespace, session: StorchSession | None = None,
) -> list[Row]:
    """Trains every estimator in interleaved slices of 1/20 of the budget, so that drift in
    the machine's load hits every contender alike."""
    pyro.set_rng_seed(args.seed)
    x = data[:BATCH]
    contenders: list[Contender | StorchContender] = [
        Contender(name, initial, args) for name in names if name in ESTIMATORS]
    storch_names = [name for name in names if name in STORCH_ESTIMATORS]
    if storch_names:
        if session is None:
            raise ValueError(f"{storch_names} need --storchastic PYTHON")
        started = session.start([STORCH_ESTIMATORS[n] for n in storch_names], initial, data,
                                x, args)
        contenders += [StorchContender(n, session, initial, started, args)
                       for n in storch_names]
        order = {name: i for i, name in enumerate(names)}
        contenders.sort(key=lambda c: order[c.name])
    while not all(c.done for c in contenders):
        for c in contenders:
            if not c.done:
                c.advance(data, subset, args.seconds / 20)
    reference = next((c for c in contenders if c.name == REFERENCE), contenders[0])
    weights = copy.deepcopy(reference.net.state_dict())
    rows = []
    for c in contenders:
        own = c.moments(x)
        common = c.moments(x, weights)
        nan = float("nan")
        rows.append(Row(
            c.name, c.evaluations, c.step, c.elapsed, c.elbos + [nan] * (3 - len(c.elbos)),
            own[1].mean().item() if own is not None else nan,
            common[1].mean().item() if common is not None else nan,
            c.toy(10 * args.grad_draws) if isinstance(c, StorchContender) else "",
            getattr(c, "failure", "")))
    return rows


def table(rows: list[Row], seconds: float, toy: bool = False) -> str:
    lines = [
        f"| estimator | evals/step | steps/s | ELBO @ {seconds / 4:g} s | ELBO @ {seconds / 2:g} s"
        f" | ELBO @ {seconds:g} s | grad variance (own) | grad variance (common) |"
        + (" toy: mean / exact |" if toy else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if toy else ""),
    ]
    for r in rows:
        if r.note and not r.steps:
            lines.append(f"| {r.name} | {r.evaluations or ''} | fails: {r.note} |"
                         + " |" * (4 + toy) + (f" {r.toy} |" if toy else ""))
            continue
        lines.append(
            f"| {r.name}{' (fails later: ' + r.note + ')' if r.note else ''} | "
            f"{r.evaluations} | {r.steps / r.seconds:.1f} | "
            + " | ".join(f"{e:.2f}" for e in r.elbo)
            + f" | {r.variance:.3g} | {r.common_variance:.3g} |"
            + (f" {r.toy} |" if toy else "")
        )
    return "\n".join(lines)


def toy_table(t: float = 0.499, copies: int = 20_000, seed: int = 0) -> str:
    """The ARMS toy: per number of evaluations ``n`` and guide probability ``p``, the exact
    variance of one gradient draw of :math:`\\mathbb E_{b \\sim \\mathrm{Bern}(p)}[(b -
    t)^2]` with respect to the logit for ARMS (``n`` copula draws), DisARM (``n / 2``
    pairs) and RLOO (``n`` independent draws), from the exact law of the draws
    (:func:`~pyro_wakesleep.antithetic.copula_pattern_law`); and ARMS's variance measured
    through ``DisarmELBO(n, "arms")`` over ``copies`` independent copies."""
    import itertools
    import math

    from pyro_wakesleep.antithetic import arms_gradient, copula_pattern_law

    def exact(logit: Tensor, n: int, copula: bool) -> float:
        if copula:
            patterns, probs = copula_pattern_law(logit, n)
            values = patterns.T.unsqueeze(-1)
            g = arms_gradient((values - t).pow(2), values, logit)[:, 0]
            probs = probs[:, 0]
        else:
            patterns = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)),
                                    dtype=torch.float64)
            p = torch.sigmoid(logit)
            probs = p**patterns.sum(-1) * (1 - p) ** (n - patterns.sum(-1))
            f = (patterns - t).pow(2)
            g = ((f - f.mean(-1, keepdim=True)) * (patterns - p)).sum(-1) / (n - 1)
        mean = (probs * g).sum()
        return ((probs * g * g).sum() - mean**2).item()

    def measured(logit: float, n: int) -> float:
        pyro.clear_param_store()
        theta = pyro.param("theta", torch.full((copies,), logit)).unconstrained()

        def model() -> None:
            with pyro.plate("copies", copies):
                b = pyro.sample("b", pyro.distributions.Bernoulli(
                    logits=pyro.param("theta").detach()))
                pyro.factor("cost", -(b - t) ** 2)

        def guide() -> None:
            with pyro.plate("copies", copies):
                pyro.sample("b", pyro.distributions.Bernoulli(logits=pyro.param("theta")))

        pyro.set_rng_seed(seed)
        loss = DisarmELBO(n, "arms").differentiable_loss(model, guide)
        (grad,) = torch.autograd.grad(loss, [theta])
        return grad.double().var().item()

    lines = [
        f"t = {t}; variance of one gradient draw (w.r.t. the logit) at n evaluations; "
        f"ARMS measured over {copies:,} copies through `DisarmELBO(n, \"arms\")`.",
        "",
        "| n | p | ARMS (exact) | ARMS (measured) | DisARM, n/2 pairs | RLOO, n draws |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n in (2, 4, 6, 8, 10):
        for p in (0.1, 0.3, 0.45, 0.5, 0.7, 0.9):
            logit = math.log(p / (1 - p))
            tensor = torch.tensor([logit], dtype=torch.float64)
            arms = exact(tensor, n, True)
            disarm = exact(tensor, 2, True) / (n / 2)
            rloo = exact(tensor, n, False)
            lines.append(f"| {n} | {p:g} | {arms:.3g} | {measured(logit, n):.3g} | "
                         f"{disarm:.3g} | {rloo:.3g} |")
    return "\n".join(lines)


STORCH_NOTE = (
    "\n\nstorchastic {version} (in its own Python, driven by `benchmarks/storch_sbn.py`): "
    "same initial weights, batches and interleaved slices, its ELBO computed from its "
    "checkpoints by the same code. Each layer is sampled by its own storchastic method "
    "(its plates cannot be shared by two samples), so draws multiply across layers "
    "(evals/step: runs of the model per step). storchastic RLOO: `ScoreFunction` with "
    "its batch-average (leave-one-out) baseline, 2 draws per layer; REINFORCE + avg: its "
    "moving average (decay 0.95; ours the same decay, bias-corrected); RELAX: its "
    "default learned surrogate (200-50-1 ReLU MLP), no REBAR term, 1 run of the model. "
    "Rows without *fixed* run storchastic's code unchanged; *fixed* rows patch its bugs "
    "on this model (ARM: the log-density is not "
    "summed over the 200 units, so every cost's direct gradient counts 200 times; DisARM: "
    "an indexing error that raises once a data plate comes first, the antithetic cost "
    "added where it must be subtracted, and the draw/partner plate weights (1, 0) "
    "defined but never installed). *toy: mean / exact*: storchastic's mean gradient over "
    "the exact one on E[(b - 0.45)^2], b ~ Bernoulli(sigmoid(theta)), "
    "theta = 0, one unit, 1,000 copies in a data plate, {toy_draws} draws (± one standard "
    "error; 1 when unbiased). Ours are checked against enumeration in the test suite."
)


def section(model: str, names: list[str], data: Tensor, subset: Tensor,
            args: argparse.Namespace, session: StorchSession | None) -> str:
    """One model's table (``model``: a ``--layers`` choice): a warm-up run, then the
    measured one."""
    torch.manual_seed(args.seed)
    initial = make_sbn(model)
    start_elbo = train_elbo(initial, subset)
    warm = argparse.Namespace(**{**vars(args), "steps": 3, "grad_draws": 2})
    run_all(names, initial, data, subset, warm, session)  # first calls allocate
    rows = run_all(names, initial, data, subset, args, session)
    for row in rows:
        print(f"{model}: {row}", flush=True)
    return (f"### {model_title(model)}\n\nELBO at initialization: {start_elbo:.2f}\n\n"
            + table(rows, args.seconds, toy=session is not None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/binarized_mnist.npz")
    parser.add_argument("--steps", type=int, default=10**9, help="step cap per estimator")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="training wall-clock budget per estimator and model")
    parser.add_argument("--out", default="docs/benchmarks/discrete.md")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grad-draws", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", default="1,2",
                        help=f"comma-separated models, from {list(MODELS)} (1, 2: linear SBNs "
                        "with that many stochastic layers)")
    parser.add_argument("--estimators", default=",".join(DEFAULT_ESTIMATORS),
                        help=f"comma-separated, from {list(ESTIMATORS)} and (with "
                        f"--storchastic) {list(STORCH_ESTIMATORS)}")
    parser.add_argument("--storchastic", default=os.environ.get("STORCHASTIC_PYTHON"),
                        help="a Python with storchastic installed (never our venv): adds "
                        "storchastic's estimators to the run")
    parser.add_argument("--toy", action="store_true",
                        help="print the ARMS toy table (exact and measured) and exit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.toy:
        print(toy_table(seed=args.seed))
        return
    data = load_binarized_mnist(args.data, "train")
    subset = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[:1000]]
    names = [n.strip() for n in args.estimators.split(",")]
    if args.storchastic and not any(n in STORCH_ESTIMATORS for n in names):
        names += list(STORCH_ESTIMATORS)
    unknown = [n for n in names if n not in ESTIMATORS and n not in STORCH_ESTIMATORS]
    if unknown:
        parser.error(f"unknown estimator(s) {unknown}; choose from {list(ESTIMATORS)} "
                     f"and {list(STORCH_ESTIMATORS)}")
    if any(n in STORCH_ESTIMATORS for n in names) and not args.storchastic:
        parser.error("storchastic's estimators need --storchastic PYTHON")
    models = [m.strip() for m in args.layers.split(",")]
    if any(m not in MODELS for m in models):
        parser.error(f"--layers: unknown model(s) in {models}; choose from {list(MODELS)}")
    if args.storchastic and "nonlinear" in models:
        parser.error("storchastic's companion (storch_sbn.py) builds linear SBNs only")
    with tempfile.TemporaryDirectory(prefix="bench_storch_") as folder:
        session = StorchSession(args.storchastic, folder) if args.storchastic else None
        try:
            sections = [section(model, names, data, subset, args, session)
                        for model in models]
        finally:
            if session is not None:
                session.close()
    capped = f" --steps {args.steps}" if args.steps < 10**9 else ""
    note = (f" Every estimator stops at {args.steps} steps (equal steps): an ELBO column "
            "whose time comes after that shows the ELBO at the cap." if capped else "")
    if session is not None:
        capped += f" --storchastic PYTHON --estimators \"{','.join(names)}\""
        note += STORCH_NOTE.format(version=session.version, toy_draws=10 * args.grad_draws)
    if args.layers != parser.get_default("layers"):
        capped += f" --layers {args.layers}"
    if args.out != parser.get_default("out"):
        capped += f" --out {args.out}"
    title = ("storchastic's estimators beside ours on binarized MNIST" if session is not None
             else "Discrete-latent estimators on binarized MNIST")
    header = (
        f"## {title}\n\n"
        f"`python benchmarks/bench_discrete.py --seconds {args.seconds:g}{capped}` "
        f"(lr {args.lr:g}, seed {args.seed}, {args.grad_draws} gradient draws, "
        f"{args.threads} thread(s); {machine()}, {versions()}).{note}\n\n"
        "ELBO: nats per image on a fixed 1,000-image training subset (single-sample ELBO, "
        "10 draws), after the stated training time. Variance: mean elementwise variance "
        "of the recognition-network gradient over the draws, at the estimator's own "
        f"trained parameters and at those of the {REFERENCE} run (common; each estimator "
        "keeps its own baseline state). Same initial weights and batches for every "
        "estimator; steps/s is the estimator's own step time, runs interleaved. REBAR and "
        "RELAX: one draw and two relaxed runs per layer (1 + 2 x layers evaluations, the "
        "same as the \"RLOO @ REBAR evals\" row) and a double backward per step; their "
        "temperature, scale and surrogate train with the model by the same optimizer, and "
        "are frozen during the variance draws.\n"
    )
    write_table(header + "\n" + "\n\n".join(sections), args.out)


if __name__ == "__main__":
    main()

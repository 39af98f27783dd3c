"""Benchmark: multi-sample and antithetic estimators for discrete latents.

Sigmoid belief nets on binarized MNIST as in the RELAX paper's Table 1 (linear, one layer
784-200 and two layers 784-200-200, batch 24), trained with, in one run:

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

Run: ``python benchmarks/bench_discrete.py --seconds 10``; ``--toy`` prints instead the
ARMS paper's toy, :math:`\\mathbb E[(b - t)^2]` with :math:`t = 0.499`: exact gradient
variances of ARMS, DisARM and RLOO at equal evaluations, and ARMS's measured through
``DisarmELBO``.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

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
from torch import Tensor

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


def train_elbo(net: SigmoidBeliefNet, x: Tensor, draws: int = 10) -> float:
    """The single-sample ELBO per image averaged over ``draws`` draws (no gradients)."""
    with torch.no_grad():
        loss = ScoreFunctionELBO(draws, max_plate_nesting=1).loss(net.model, net.guide, x)
    return -loss / len(x)


def guide_variance(objective: ELBO, net: SigmoidBeliefNet, guide: Callable, x: Tensor,
                   draws: int) -> float:
    params = list(net.recognition.parameters())
    store = pyro.get_param_store()
    frozen = {k: v.detach().clone() for k, v in store.items() if k.startswith("__baseline")}
    samples = []
    with frozen_control_variates(objective):
        for _ in range(draws):
            samples.append(gradient(params, lambda: objective.loss_and_grads(  # type: ignore
                net.model, guide, x)))
            with torch.no_grad():
                for k, v in frozen.items():
                    store[k].copy_(v)
    for value in store.values():
        value.unconstrained().grad = None  # type: ignore[attr-defined]
    return torch.stack(samples).var(0).mean().item()


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

    def advance(self, data: Tensor, subset: Tensor, slice_seconds: float) -> None:
        """Trains for about ``slice_seconds`` of this contender's own step time."""
        with self.slot.active():
            until = self.elapsed + slice_seconds
            while not self.done and self.elapsed < until:
                if self.step >= self.args.steps:  # stopped by --steps
                    self.elbos.append(train_elbo(self.net, subset))
                    continue
                begin = (self.step * BATCH) % (len(data) - BATCH)
                x = data[self.order[begin:begin + BATCH] % len(data)]
                tic = time.perf_counter()
                self.svi.step(x)
                self.elapsed += time.perf_counter() - tic
                self.step += 1
                while not self.done and self.elapsed >= self.checkpoints[len(self.elbos)]:
                    self.elbos.append(train_elbo(self.net, subset))

    def variance(self, x: Tensor, weights: dict[str, Tensor] | None = None) -> float:
        """Guide-gradient variance at the trained parameters, or at ``weights`` (a
        ``state_dict`` of another contender's net, put back afterwards)."""
        self.slot.restore()
        own = copy.deepcopy(self.net.state_dict())
        if weights is not None:
            self.net.load_state_dict(weights)
        try:
            return guide_variance(self.objective, self.net, self.guide, x, self.args.grad_draws)
        finally:
            self.net.load_state_dict(own)


def run_all(
    names: list[str], initial: SigmoidBeliefNet, data: Tensor, subset: Tensor,
    args: argparse.Namespace,
) -> list[Row]:
    """Trains every estimator in interleaved slices of 1/20 of the budget, so that drift in
    the machine's load hits every contender alike."""
    pyro.set_rng_seed(args.seed)
    contenders = [Contender(name, initial, args) for name in names]
    while not all(c.done for c in contenders):
        for c in contenders:
            if not c.done:
                c.advance(data, subset, args.seconds / 20)
    x = data[:BATCH]
    reference = next((c for c in contenders if c.name == REFERENCE), contenders[0])
    weights = copy.deepcopy(reference.net.state_dict())
    return [
        Row(c.name, c.evaluations, c.step, c.elapsed, c.elbos, c.variance(x),
            c.variance(x, weights))
        for c in contenders
    ]


def table(rows: list[Row], seconds: float) -> str:
    lines = [
        f"| estimator | evals/step | steps/s | ELBO @ {seconds / 4:g} s | ELBO @ {seconds / 2:g} s"
        f" | ELBO @ {seconds:g} s | grad variance (own) | grad variance (common) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.evaluations} | {r.steps / r.seconds:.1f} | "
            + " | ".join(f"{e:.2f}" for e in r.elbo)
            + f" | {r.variance:.3g} | {r.common_variance:.3g} |"
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
    parser.add_argument("--layers", default="1,2", help="comma-separated: 1 and/or 2")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
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
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown:
        parser.error(f"unknown estimator(s) {unknown}; choose from {list(ESTIMATORS)}")
    sections = []
    for layers in (int(n) for n in args.layers.split(",")):
        torch.manual_seed(args.seed)
        initial = SigmoidBeliefNet((784, *([200] * layers)))
        start_elbo = train_elbo(initial, subset)
        warm = argparse.Namespace(**{**vars(args), "steps": 3, "grad_draws": 2})
        run_all(names, initial, data, subset, warm)  # first calls allocate: keep them out
        rows = run_all(names, initial, data, subset, args)
        for row in rows:
            print(f"{layers} layer(s): {row}", flush=True)
        title = f"### Linear SBN 784-{'-'.join(['200'] * layers)}, batch {BATCH}"
        sections.append(f"{title}\n\nELBO at initialization: {start_elbo:.2f}\n\n"
                        + table(rows, args.seconds))
    capped = f" --steps {args.steps}" if args.steps < 10**9 else ""
    note = (f" Every estimator stops at {args.steps} steps (equal steps): an ELBO column "
            "whose time comes after that shows the ELBO at the cap." if capped else "")
    header = (
        "## Discrete-latent estimators on binarized MNIST\n\n"
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

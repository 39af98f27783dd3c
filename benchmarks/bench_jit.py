"""Benchmark: compiled objectives (``jit=True``) against the same estimators eager, written
by hand in plain PyTorch, and Pyro's ``Trace_ELBO``/``TraceGraph_ELBO`` and their ``Jit*``
variants.

Three models: the linear sigmoid belief net 784-200 and the two-layer 784-200-200 on
binarized MNIST (batch 24), and the Gaussian mixture of Le et al. (2019) (batch 100 from
the true model). Every one of our contenders and every hand-written one takes a
``torch.optim.Adam`` step over the same parameters (ours through ``objective(model,
guide)``), Pyro's go through ``SVI`` with ``pyro.optim.Adam`` (and so do ours in the
"SVI" rows); validation off, 1 thread. Rounds are interleaved in a shuffled order, so
drift in the machine's load hits every contender alike; the table reports median step
times and their ratio to the hand-written step of the same estimator, all from one run.

Run: ``python benchmarks/bench_jit.py --data ../shared/data/binarized_mnist.npz``
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pyro
import torch
from common import (
    HandREINFORCE,
    bernoulli_log_prob,
    hand_wake_sleep_gmm,
    hand_wake_sleep_sbn,
    interleaved_times,
    machine,
    medians,
    nvil,
    repo_path,
    rws_wake_loss,
    timing_parser,
    timing_setup,
    versions,
    write_table,
)
from pyro.infer import SVI, JitTrace_ELBO, JitTraceGraph_ELBO, Trace_ELBO, TraceGraph_ELBO
from torch import Tensor, nn

from pyro_wakesleep import (
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    ReweightedWakeSleepELBO,
    ScoreFunctionELBO,
    VimcoELBO,
    WakeSleepELBO,
)
from pyro_wakesleep.examples.mixture import GaussianMixture
from pyro_wakesleep.examples.models import SigmoidBeliefNet

#: a hand-written contender: net -> (loss function, its parameters)
Hand = Callable[[Any], tuple[Callable[[Tensor], Tensor], list[Tensor]]]


# -- hand-written estimators not in common -------------------------------------------------
def sbn_log_densities(net: SigmoidBeliefNet, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``log p(x, h)`` and ``log q(h | x)`` (shape ``(k, batch)``) of ``k`` draws of an
    SBN of any depth."""
    gen = net.generative
    h, log_q, layers = x.expand(k, *x.shape), 0.0, []
    for rec in net.recognition:
        logits = rec(h)
        h = torch.bernoulli(torch.sigmoid(logits).detach())
        log_q = log_q + bernoulli_log_prob(logits, h)
        layers.append(h)
    log_p = bernoulli_log_prob(gen.prior_logits, layers[-1])
    below = [x.expand(k, *x.shape), *layers]
    for i in range(net.num_layers - 1, -1, -1):
        log_p = log_p + bernoulli_log_prob(gen.layers[i](below[i + 1]), below[i])
    return log_p, log_q


def hand_reinforce(net: SigmoidBeliefNet) -> Callable[[Tensor], Tensor]:
    def loss(x: Tensor) -> Tensor:
        log_p, log_q = sbn_log_densities(net, x, 1)
        return -(log_p.sum() + ((log_p - log_q).detach() * log_q).sum())
    return loss


def hand_vimco(net: SigmoidBeliefNet, k: int) -> Callable[[Tensor], Tensor]:
    """VIMCO (Mnih & Rezende 2016) with the geometric-mean leave-one-out baselines."""
    eye = torch.eye(k, dtype=torch.bool).unsqueeze(-1)

    def loss(x: Tensor) -> Tensor:
        log_p, log_q = sbn_log_densities(net, x, k)
        log_w = log_p - log_q
        bound = torch.logsumexp(log_w, 0) - math.log(k)
        geometric = (log_w.sum(0, keepdim=True) - log_w) / (k - 1)
        replaced = torch.where(eye, geometric.unsqueeze(1), log_w.unsqueeze(0))
        loo = torch.logsumexp(replaced.detach(), 1) - math.log(k)
        return -(bound.sum() + ((bound.detach() - loo) * log_q).sum())
    return loss


def hand_rws_deep(net: SigmoidBeliefNet, k: int) -> Callable[[Tensor], Tensor]:
    def loss(x: Tensor) -> Tensor:
        return rws_wake_loss(*sbn_log_densities(net, x, k))
    return loss


# -- contenders ----------------------------------------------------------------------------
class Runner:
    """One contender; ``step(x)`` is one optimizer step."""

    def __init__(self, label: str, kind: str, net: nn.Module, make: Callable[..., Any],
                 hand: Hand | None,
                 x0: Tensor, index: int) -> None:
        self.label, self.kind = label, kind
        self.net = copy.deepcopy(net)
        if kind == "hand":
            self.loss, params = hand(self.net)  # type: ignore[misc]
            self.svi = None
            self.optim = torch.optim.Adam(params, 1e-3)
        elif kind.startswith("pyro") or kind.endswith("SVI"):
            self.svi = SVI(self.net.model, self.net.guide, pyro.optim.Adam({"lr": 1e-3}),
                           make(index))
        else:
            module = make(index)(self.net.model, self.net.guide)
            module.initialize(x0)
            self.loss, self.svi = module, None
            self.optim = torch.optim.Adam(module.parameters(), 1e-3)

    def step(self, x: Tensor) -> None:
        if self.svi is not None:
            self.svi.step(x)
            return
        self.optim.zero_grad()
        self.loss(x).backward()
        self.optim.step()


def _sf(cv: Callable[[], Any] | None, k: int = 1) -> Callable[..., Callable[[int], Any]]:
    def make(jit: bool, inductor: bool = False) -> Callable[[int], Any]:
        return lambda i: ScoreFunctionELBO(k, cv() if cv else None, max_plate_nesting=1,
                                           jit=jit, jit_options={"compile": inductor},
                                           name=f"cv{i}")
    return make


def _objective(cls: type, *args: Any) -> Callable[..., Callable[[int], Any]]:
    def make(jit: bool, inductor: bool = False) -> Callable[[int], Any]:
        return lambda i: cls(*args, max_plate_nesting=1, jit=jit,
                             jit_options={"compile": inductor}, name=f"cv{i}")
    return make


def _reinforce(cv: str, k: int = 1) -> Hand:
    def hand(net: SigmoidBeliefNet) -> tuple[Callable[[Tensor], Tensor], list[Tensor]]:
        estimator = HandREINFORCE(net, k, cv)
        return estimator.loss, estimator.parameters()
    return hand


def _plain(loss: Callable[[Any], Callable[[Tensor], Tensor]]) -> Hand:
    return lambda net: (loss(net), list(net.parameters()))


#: (estimator, ours (jit -> factory), hand-written)
SBN_CASES: list[tuple[str, Callable[..., Callable[[int], Any]], Hand]] = [
    ("SF, no control variate", _sf(None), _reinforce("none")),
    ("SF + moving average", _sf(MovingAverageBaseline), _reinforce("average")),
    ("SF + RLOO, K=4", _sf(LeaveOneOutBaseline, 4), _reinforce("loo", 4)),
    ("SF + NVIL", _sf(nvil), _reinforce("nvil")),
    ("VIMCO, K=5", _objective(VimcoELBO, 5), _plain(lambda net: hand_vimco(net, 5))),
    ("RWS, K=5", _objective(ReweightedWakeSleepELBO, 5),
     _plain(lambda net: hand_wake_sleep_sbn(net, 5, True))),
    ("WS, K=1", _objective(WakeSleepELBO, 1),
     _plain(lambda net: hand_wake_sleep_sbn(net, 1, False))),
]
DEEP_CASES: list[tuple[str, Callable[..., Callable[[int], Any]], Hand]] = [
    ("SF, no control variate", _sf(None), _plain(hand_reinforce)),
    ("VIMCO, K=5", _objective(VimcoELBO, 5), _plain(lambda net: hand_vimco(net, 5))),
    ("RWS, K=5", _objective(ReweightedWakeSleepELBO, 5),
     _plain(lambda net: hand_rws_deep(net, 5))),
]
GMM_CASES: list[tuple[str, Callable[..., Callable[[int], Any]], Hand]] = [
    ("RWS, K=5", _objective(ReweightedWakeSleepELBO, 5),
     _plain(lambda gmm: hand_wake_sleep_gmm(gmm, 5, True))),
    ("WS, K=1", _objective(WakeSleepELBO, 1),
     _plain(lambda gmm: hand_wake_sleep_gmm(gmm, 1, False))),
]
PYRO = {"pyro Trace_ELBO": Trace_ELBO, "pyro JitTrace_ELBO": JitTrace_ELBO,
        "pyro TraceGraph_ELBO": TraceGraph_ELBO, "pyro JitTraceGraph_ELBO": JitTraceGraph_ELBO}


def runners_for(net: nn.Module, cases: list, x0: Tensor, with_pyro: bool,
                inductor: bool) -> list[Runner]:
    runners, i = [], 0
    for label, make, hand in cases:
        runners.append(Runner(label, "hand", net, make, hand, x0, i))
        for kind, jit in (("eager", False), ("jit", True)):
            i += 1
            runners.append(Runner(label, kind, net, make(jit), None, x0, i))
        if inductor:
            i += 1
            runners.append(Runner(label, "jit + inductor", net, make(True, True), None, x0, i))
        if label == cases[0][0]:
            i += 1
            runners.append(Runner(label, "jit, SVI", net, make(True), None, x0, i))
            if with_pyro:
                for kind, cls in PYRO.items():
                    runners.append(Runner(label, kind, net,
                                          lambda _i, cls=cls: cls(max_plate_nesting=1),
                                          None, x0, i))
    return runners


#: where the sections of other scripts on the same page begin
LATER = "\n## "


def main() -> None:
    parser = timing_parser(__doc__, "docs/benchmarks/jit.md", rounds=9, steps=20)
    parser.add_argument("--no-inductor", action="store_true",
                        help="skip the jit_options={'compile': True} rows (~20 s each)")
    args = parser.parse_args()
    mnist = timing_setup(args)
    n = args.rounds * args.steps + 5
    sbn_batches = [mnist[i] for i in torch.randint(len(mnist), (n, 24))]
    gmm = GaussianMixture()
    gmm_batches = [gmm.sample(100) for _ in range(n)]
    lines = [
        "# Compiled objectives: step time",
        "",
        f"Median milliseconds per optimizer step over {args.rounds} interleaved rounds of "
        f"{args.steps} steps (after 5 warm-up steps, which include recording); validation "
        f"off; {versions()}, {args.threads} thread(s), {machine()}. \"× hand\": ratio to "
        "the same estimator hand-written in plain PyTorch (`torch.optim.Adam`); ours as "
        "`objective(model, guide)` with `torch.optim.Adam` (eager and `jit=True`) and, in "
        "the \"SVI\" row, through `pyro.infer.SVI` with `pyro.optim.Adam`, as Pyro's rows "
        "(Pyro's without a baseline, so they compute the \"SF, no control variate\" "
        "estimator). \"jit + inductor\": `jit_options={\"compile\": True}`. Replay "
        "verification on, as users get it (its default: replays 1, 2, 4, 8, ... of each graph "
        "also run the eager step from the same state and compare): its cost is in the "
        "medians.",
        "",
        "| model | estimator | implementation | ms / step | × hand |",
        "|---|---|---|---:|---:|",
    ]
    models = [
        ("SBN 784-200, batch 24", SigmoidBeliefNet((784, 200)), SBN_CASES, sbn_batches, True),
        ("SBN 784-200-200, batch 24", SigmoidBeliefNet((784, 200, 200)), DEEP_CASES,
         sbn_batches, False),
        ("GMM (Le et al.), batch 100", gmm, GMM_CASES, gmm_batches, False),
    ]
    for name, net, cases, batches, with_pyro in models:
        pyro.clear_param_store()
        runners = runners_for(net, cases, batches[0], with_pyro, not args.no_inductor)
        times = medians(interleaved_times(runners, Runner.step, batches.__getitem__,
                                          args.rounds, args.steps, shuffle_seed=args.seed,
                                          warmup=5))
        hand = {r.label: t for r, t in zip(runners, times, strict=True) if r.kind == "hand"}
        for r, t in zip(runners, times, strict=True):
            lines.append(f"| {name} | {r.label} | {r.kind} | {1e3 * t:.2f} | "
                         f"{t / hand[r.label]:.2f}× |")
    # the page's later sections (bench_jit_training.py's) are kept
    out = repo_path(args.out)
    text = out.read_text() if out.exists() else ""
    later = text[text.index(LATER):] if LATER in text else ""
    write_table("\n".join(lines) + ("\n" + later if later else ""), out)


if __name__ == "__main__":
    main()

"""Benchmark: how the cost of Rao-Blackwellized learning signals grows with the number of
sites and particles, against Pyro's ``Trace_ELBO`` (no Rao-Blackwellization: the floor)
and ``TraceGraph_ELBO`` (Rao-Blackwellized by provenance, as ours).

Programs, one thread, ms per SVI step (Adam), contenders interleaved in rounds:

* a ``pyro.markov`` chain of T Bernoulli latents (batch 16 in a plate, Normal emissions,
  an amortized guide reading x[t] and z[t-1]) for T = 10 ... 1000;
* S independent named Bernoulli sites, each with its own observation;
* the chain at T = 100 with K vectorized particles.

``TraceGraph_ELBO`` is timed only where one step takes under ``--tracegraph-limit``
seconds (its provenance sets grow with the chain). With ``--jit`` the chain is also run
compiled (``ScoreFunctionELBO(jit=True)``, verification on as users get it): recording
time (the second and third calls: the loss step, then SVI's whole training step) apart
from replay time, timed after 12 warm-up steps (past the verified replays 1, 2, 4, 8;
later verified replays, 16, 32, ..., fall in the timed rounds).

Run: ``python benchmarks/bench_signals.py`` (writes ``docs/benchmarks/signals.md``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from common import ParamStoreSlot, interleaved_times, machine, medians, versions, write_table
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO

from pyro_wakesleep import ScoreFunctionELBO

BATCH = 16


def chain_model(x: torch.Tensor) -> None:
    trans = pyro.param("trans", torch.tensor([0.1, 2.0]))
    with pyro.plate("batch", x.shape[0]):
        z = torch.zeros(x.shape[0])
        for t in pyro.markov(range(x.shape[1])):
            z = pyro.sample(f"z{t}", dist.Bernoulli(logits=trans[0] + trans[1] * z - 1.0))
            pyro.sample(f"x{t}", dist.Normal(z, 1.0), obs=x[:, t])


def chain_guide(x: torch.Tensor) -> None:
    w = pyro.param("w", torch.tensor([0.1, 0.2, 0.3]))
    with pyro.plate("batch", x.shape[0]):
        z = torch.zeros(x.shape[0])
        for t in pyro.markov(range(x.shape[1])):
            z = pyro.sample(f"z{t}", dist.Bernoulli(logits=w[0] + w[1] * x[:, t] + w[2] * z))


def independent_model(x: torch.Tensor) -> None:
    for i in range(x.shape[0]):
        z = pyro.sample(f"z{i}", dist.Bernoulli(0.4))
        pyro.sample(f"x{i}", dist.Normal(z, 1.0), obs=x[i])


def independent_guide(x: torch.Tensor) -> None:
    logits = pyro.param("logits", torch.zeros(x.shape[0]))
    for i in range(x.shape[0]):
        pyro.sample(f"z{i}", dist.Bernoulli(logits=logits[i]))


class Runner:
    """One contender: an SVI object with its own param-store state."""

    def __init__(self, name: str, model: Callable, guide: Callable, elbo: Any,
                 x: torch.Tensor, warmup: int = 3) -> None:
        pyro.clear_param_store()
        self.name = name
        self.svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
        start = time.perf_counter()
        self.svi.step(x)
        self.first = time.perf_counter() - start
        start = time.perf_counter()
        self.svi.step(x)
        self.second = time.perf_counter() - start
        self.third = 0.0
        if warmup > 2:
            start = time.perf_counter()
            self.svi.step(x)
            self.third = time.perf_counter() - start
        for _ in range(warmup - 3):  # past the verified replays 1, 2, 4, 8
            self.svi.step(x)
        self.slot = ParamStoreSlot()


def measure(runners: list[Runner], x: torch.Tensor, rounds: int, steps: int) -> list[float]:
    times = interleaved_times(runners, lambda r, b: r.svi.step(b), lambda i: x, rounds,
                              steps, slot=lambda r: _swap(r))
    return [1e3 * t for t in medians(times)]


class _swap:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def __enter__(self) -> None:
        self.runner.slot.restore()

    def __exit__(self, *exc: object) -> None:
        self.runner.slot.save()


def contenders(model: Callable, guide: Callable, x: torch.Tensor, tracegraph: bool,
               k: int = 1, jit: bool = False) -> list[Runner]:
    vec = {"num_particles": k, "vectorize_particles": True, "max_plate_nesting": 1}
    runners = [Runner("ours", model, guide, ScoreFunctionELBO(**vec), x),
               Runner("Trace_ELBO", model, guide, Trace_ELBO(**vec), x)]
    if tracegraph:
        runners.append(Runner("TraceGraph_ELBO", model, guide, TraceGraph_ELBO(**vec), x))
    if jit:
        runners.append(Runner("ours jit", model, guide, ScoreFunctionELBO(jit=True, **vec), x,
                              warmup=12))
    return runners


def fmt(value: float | None) -> str:
    return "—" if value is None else (f"{value:.1f}" if value >= 10 else f"{value:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[10, 100, 300, 1000])
    parser.add_argument("--sites", type=int, nargs="+", default=[100, 600])
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--tracegraph-limit", type=float, default=2.0)
    parser.add_argument("--tracegraph-max-length", type=int, default=None,
                        help="longest chain TraceGraph_ELBO runs on (its step grows as T^3)")
    parser.add_argument("--jit", action="store_true", help="also time jit=True")
    parser.add_argument("--jit-max-length", type=int, default=300,
                        help="longest chain timed with jit=True (recording grows with T)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/benchmarks/signals.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    pyro.set_rng_seed(args.seed)
    rows = []

    def run(label: str, size: str, model: Callable, guide: Callable, x: torch.Tensor,
            k: int = 1, jit: bool = False) -> None:
        skip = args.tracegraph_max_length is not None and size.startswith("T=") and \
            int(size.split(",")[0][2:]) > args.tracegraph_max_length
        probe = None if skip else Runner(
            "TraceGraph_ELBO probe", model, guide,
            TraceGraph_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=1),
            x, warmup=2)
        slow = probe is None or probe.second > args.tracegraph_limit
        runners = contenders(model, guide, x, not slow, k, jit)
        ms = dict(zip([r.name for r in runners], measure(runners, x, args.rounds, args.steps),
                      strict=True))
        graph = ms.get("TraceGraph_ELBO", 1e3 * probe.second if probe and slow else None)
        # the second call records the loss step; SVI's third records the training step
        record = next((r.second + r.third for r in runners if r.name == "ours jit"), None)
        rows.append((label, size, ms["ours"], ms["Trace_ELBO"], graph, slow,
                     ms.get("ours jit"), record))
        print(rows[-1], flush=True)

    for t in args.lengths:
        run("markov chain", f"T={t}", chain_model, chain_guide, torch.randn(BATCH, t),
            jit=args.jit and t <= args.jit_max_length)
    for s in args.sites:
        run("independent sites", f"S={s}", independent_model, independent_guide,
            torch.randn(s))
    for k in args.particles:
        run("markov chain, K particles", f"T=100, K={k}", chain_model, chain_guide,
            torch.randn(BATCH, 100), k=k)

    jit_cols = " ours jit=True, ms | recording, s |" if args.jit else ""
    lines = [
        "# Learning signals: cost against the number of sites and particles",
        "",
        f"ScoreFunctionELBO (no control variate) through SVI, one thread, {args.rounds}×"
        f"{args.steps} timed steps per row interleaved with the other contenders (median), "
        f"Pyro's validation off. {versions()}, {machine()}. TraceGraph_ELBO marked * took "
        f"over {args.tracegraph_limit} s per step: its one timed step is shown"
        + (f"; not run past T={args.tracegraph_max_length} (—)."
           if args.tracegraph_max_length is not None else ".")
        + (f" `jit=True` (markov chains up to T={args.jit_max_length}): timed after 12 "
           "warm-up steps, replay verification on (its default); recording is the time of "
           "the 2nd and 3rd calls, which record and compile the graph." if args.jit else ""),
        "",
        f"| program | size | ours, ms | Trace_ELBO, ms | ours ÷ Trace_ELBO | "
        f"TraceGraph_ELBO, ms | ours ÷ TraceGraph_ELBO |{jit_cols}",
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.jit else ""),
    ]
    for label, size, ours, trace, graph, slow, jit_ms, record in rows:
        graph_text = "—" if graph is None else fmt(graph) + ("*" if slow else "")
        ratio = "—" if graph is None else f"{ours / graph:.2f}"
        extra = (f" {fmt(jit_ms)} | {fmt(record)} |" if args.jit and jit_ms is not None
                 else (" — | — |" if args.jit else ""))
        lines.append(f"| {label} | {size} | {fmt(ours)} | {fmt(trace)} | {ours / trace:.2f} | "
                     f"{graph_text} | {ratio} |{extra}")
    write_table("\n".join(lines), args.out)


if __name__ == "__main__":
    main()

"""Benchmark: the compiled training step (``jit=True``: loss, gradients and the optimizer
update replayed as one recorded step) against the same estimator hand-written in eager
PyTorch, the compiled loss step with an eager optimizer, Pyro, and NumPyro's SVI step
under ``jax.jit`` (an optional contender: ``pip install -e .[bench]``).

Models, each written equivalently in NumPyro:

- the linear sigmoid belief net 784-200 on binarized MNIST (batch 24, one particle, no
  baseline, Adam 1e-3);
- a discrete VAE on binarized MNIST: encoder 784-200-50 (tanh), 50 Bernoulli latents
  under a uniform prior, decoder 50-200-784 (tanh); batch 24, one particle, Adam 1e-3;
  ours, the hand-written step and Pyro's ``TraceGraph_ELBO`` with a moving-average
  baseline (NumPyro's ``TraceGraph_ELBO`` has none), ours also without one;
- a ``pyro.markov`` chain of T Bernoulli latents (batch 16, Normal emissions, amortized
  guide; ours with a moving-average baseline, Adam 1e-2), T = 10, 100, 1000.

Torch on one thread; jax on one thread
(``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"``, set
before jax is imported). Rounds of every contender are interleaved in one run, so the
machine's load hits them alike; the first steps (recording, compilation) are timed apart.
A compilation that may exceed ``--budget`` seconds (NumPyro at T >= 1000) runs first in a
child process killed at the budget; if it finishes, this process loads its result from
jax's persistent compilation cache (both with ``PYTHONHASHSEED=0``, so that they lower
the same program). Then, unless ``--no-memory``: the peak resident memory
of a fresh child process per contender (SBN, chain T=100); unless ``--no-profile``: where
the time of a compiled step goes (recorded graphs against the Python around them; NumPyro's
executable against its dispatch).

Run: ``python benchmarks/bench_jit_training.py --data ../shared/data/binarized_mnist.npz``
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS",
                      "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import argparse
import copy
import ctypes
import gc
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as pdist
import torch
from common import (
    HandREINFORCE,
    bernoulli_log_prob,
    decaying_average,
    interleaved_times,
    machine,
    medians,
    repo_path,
    timing_parser,
    timing_setup,
    versions,
    write_table,
)
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
from torch import Tensor, nn

from pyro_wakesleep import MovingAverageBaseline, ScoreFunctionELBO
from pyro_wakesleep.compiled.below_autograd import CompiledGraph
from pyro_wakesleep.examples.models import SigmoidBeliefNet

BATCH = 16
HIDDEN, LATENT = 200, 50
FIRST, WARM = 4, 36  # first steps timed apart; ours jit warmed past verified replay 32
TITLE = "## Compiled training step: step time against NumPyro"
SBN_REF = "hand-written eager PyTorch + torch Adam"
VAE_REF = "hand-written eager PyTorch + moving average + torch Adam"
CHAIN_REF = "Pyro Trace_ELBO, SVI"


class Runner:
    """One contender: ``step(x)`` is one training step; ``first`` the seconds of its
    first steps (recording and compilation included); ``objective`` ours (for the
    profile), ``jax`` NumPyro's jitted update and state."""

    def __init__(self, label: str, step: Callable[[Any], Any], *, objective: Any = None,
                 jax: dict | None = None) -> None:
        self.label, self._step = label, step
        self.objective, self.jax = objective, jax
        self.first = 0.0
        self.child: float | None = None  # compile seconds in a child process

    @property
    def warm(self) -> bool:
        return self.objective is not None and self.objective.compiled is not None

    def step(self, x: Any) -> None:
        self._step(x)


def svi_runner(label: str, model: Callable, guide: Callable, lr: float,
               objective: Any) -> Runner:
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), objective)
    ours = objective if isinstance(objective, ScoreFunctionELBO) else None
    return Runner(label, svi.step, objective=ours)


def module_runner(label: str, model: Callable, guide: Callable, lr: float, objective: Any,
                  x0: Tensor) -> Runner:
    module = objective(model, guide)
    module.initialize(x0)
    opt = torch.optim.Adam(module.parameters(), lr)
    return Runner(label, lambda x: module.step(opt, x), objective=objective)


def jit(baseline: bool = False, compile: bool = False) -> ScoreFunctionELBO:
    return ScoreFunctionELBO(1, MovingAverageBaseline() if baseline else None,
                             max_plate_nesting=1, jit=True, jit_options={"compile": compile})


# -- the SBN ---------------------------------------------------------------------------------
def sbn_runners(net: SigmoidBeliefNet, x0: Tensor, inductor: bool) -> list[Runner]:
    hand = HandREINFORCE(copy.deepcopy(net), 1, "none")
    hand_opt = torch.optim.Adam(hand.parameters(), 1e-3)

    def hand_step(x: Tensor) -> None:
        hand_opt.zero_grad()
        hand.loss(x).backward()
        hand_opt.step()

    runners = [Runner(SBN_REF, hand_step)]
    for suffix, compile in [("", False)] + ([(" + inductor", True)] if inductor else []):
        c = copy.deepcopy(net)  # a fresh default name: param-store names of its own
        runners.append(module_runner(
            f"ours jit{suffix}, training step (module.step / fit) + torch Adam",
            c.model, c.guide, 1e-3, jit(compile=compile), x0))
        c = copy.deepcopy(net)
        runners.append(svi_runner(f"ours jit{suffix}, pyro.infer.SVI + pyro.optim.Adam",
                                  c.model, c.guide, 1e-3, jit(compile=compile)))
        if not compile:
            c = copy.deepcopy(net)
            module = jit()(c.model, c.guide)
            module.initialize(x0)
            opt = torch.optim.Adam(module.parameters(), 1e-3)

            def step(x: Tensor, m: Any = module, o: Any = opt) -> None:
                o.zero_grad()
                m(x).backward()
                o.step()
            runners.append(Runner("ours jit, loss step only (loop: backward, torch Adam)",
                                  step, objective=module.elbo))
    eager = copy.deepcopy(net)
    runners.append(svi_runner("ours eager, pyro.infer.SVI", eager.model, eager.guide, 1e-3,
                              ScoreFunctionELBO(1, max_plate_nesting=1)))
    return runners


# -- the discrete VAE ------------------------------------------------------------------------
class DiscreteVAE(nn.Module):
    """Encoder 784-200-50 and decoder 50-200-784 (tanh), 50 Bernoulli latents under a
    uniform prior; param-store names ``"<name>.encoder"``, ``"<name>.decoder"``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.encoder = nn.Sequential(nn.Linear(784, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, LATENT))
        self.decoder = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 784))

    def model(self, x: Tensor) -> None:
        pyro.module(f"{self.name}.decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pdist.Bernoulli(logits=x.new_zeros(x.shape[0], LATENT))
                            .to_event(1))
            pyro.sample("x", pdist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        pyro.module(f"{self.name}.encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", pdist.Bernoulli(logits=self.encoder(x)).to_event(1))


class HandVAE:
    """The VAE's REINFORCE step with a moving-average baseline (β = 0.9, debiased, the
    step's baseline from before its update), by hand."""

    def __init__(self, vae: DiscreteVAE) -> None:
        self.vae, self.avg, self.weight = vae, torch.zeros(()), torch.zeros(())

    def loss(self, x: Tensor) -> Tensor:
        q_logits = self.vae.encoder(x)
        z = torch.bernoulli(torch.sigmoid(q_logits.detach()))
        log_q = bernoulli_log_prob(q_logits, z)
        log_p = bernoulli_log_prob(self.vae.decoder(z), x) - LATENT * math.log(2.0)
        f = (log_p - log_q).detach()
        b = self.avg / self.weight if self.weight > 0 else torch.zeros(())
        self.avg, self.weight = 0.9 * self.avg + 0.1 * f.mean(), 0.9 * self.weight + 0.1
        return -(log_p.sum() + ((f - b) * log_q).sum() - log_q.sum())


def vae_runners(x0: Tensor, inductor: bool) -> list[Runner]:
    torch.manual_seed(0)
    vae = DiscreteVAE("vae")
    fresh = iter(range(1000))

    def copy_() -> DiscreteVAE:
        c = copy.deepcopy(vae)
        c.name = f"vae{next(fresh)}"
        return c

    hand = HandVAE(copy_())
    hand_opt = torch.optim.Adam(hand.vae.parameters(), 1e-3)

    def hand_step(x: Tensor) -> None:
        hand_opt.zero_grad()
        hand.loss(x).backward()
        hand_opt.step()

    runners = [Runner(VAE_REF, hand_step)]
    for suffix, compile in [("", False)] + ([(" + inductor", True)] if inductor else []):
        c = copy_()
        runners.append(module_runner(
            f"ours jit{suffix} + moving average, module.step + torch Adam", c.model,
            c.guide, 1e-3, jit(True, compile), x0))
    c = copy_()
    runners.append(module_runner("ours jit, no baseline (NumPyro's estimator), module.step",
                                 c.model, c.guide, 1e-3, jit(), x0))
    c = copy_()
    runners.append(svi_runner("ours jit + moving average, SVI + pyro.optim.Adam", c.model,
                              c.guide, 1e-3, jit(True)))
    c = copy_()
    runners.append(svi_runner("ours eager + moving average, SVI", c.model, c.guide, 1e-3,
                              ScoreFunctionELBO(1, MovingAverageBaseline(),
                                                max_plate_nesting=1)))
    c = copy_()
    runners.append(svi_runner("Pyro TraceGraph_ELBO + decaying average, SVI", c.model,
                              decaying_average(c.guide), 1e-3,
                              TraceGraph_ELBO(max_plate_nesting=1)))
    return runners


# -- the markov chain ------------------------------------------------------------------------
def chain(prefix: str) -> tuple[Callable[[Tensor], None], Callable[[Tensor], None]]:
    """The chain's model and guide, with param-store names of their own."""
    def model(x: Tensor) -> None:
        trans = pyro.param(f"{prefix}.trans", torch.tensor([0.1, 2.0]))
        with pyro.plate("batch", x.shape[0]):
            z = torch.zeros(x.shape[0])
            for t in pyro.markov(range(x.shape[1])):
                z = pyro.sample(f"z{t}", pdist.Bernoulli(logits=trans[0] + trans[1] * z - 1.0))
                pyro.sample(f"x{t}", pdist.Normal(z, 1.0), obs=x[:, t])

    def guide(x: Tensor) -> None:
        w = pyro.param(f"{prefix}.w", torch.tensor([0.1, 0.2, 0.3]))
        with pyro.plate("batch", x.shape[0]):
            z = torch.zeros(x.shape[0])
            for t in pyro.markov(range(x.shape[1])):
                z = pyro.sample(f"z{t}", pdist.Bernoulli(
                    logits=w[0] + w[1] * x[:, t] + w[2] * z))
    return model, guide


def chain_runners(inductor: bool) -> list[Runner]:
    contenders: list[tuple[str, Any]] = [
        ("ours jit + moving average, SVI + pyro.optim.Adam", lambda: jit(True)),
        ("ours eager + moving average, SVI", lambda: ScoreFunctionELBO(
            1, MovingAverageBaseline(), max_plate_nesting=1)),
        (CHAIN_REF, lambda: Trace_ELBO(max_plate_nesting=1)),
    ]
    if inductor:
        contenders.insert(1, ("ours jit + inductor + moving average, SVI",
                              lambda: jit(True, True)))
    return [svi_runner(label, *chain(f"chain{i}"), 1e-2, make())
            for i, (label, make) in enumerate(contenders)]


# -- NumPyro ---------------------------------------------------------------------------------
def _jax(cache: str | None) -> Any:
    """jax, configured (once) to keep compilations over 1 s in ``cache``."""
    import jax

    if cache and not getattr(_jax, "configured", False):
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        _jax.configured = True  # type: ignore[attr-defined]
    return jax


def numpyro_program(kind: str) -> tuple[Callable, Callable, float]:
    """NumPyro's model, guide and learning rate for ``kind`` ("sbn", "vae", "chain")."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    keys = jax.random.split(jax.random.PRNGKey(0), 4)

    def linear(name: str, key: Any, n_out: int, n_in: int) -> tuple[Any, Any]:
        bound = 1 / math.sqrt(n_in)  # torch's nn.Linear initialization
        return (numpyro.param(f"{name}.w", jax.random.uniform(key, (n_out, n_in),
                                                              minval=-bound, maxval=bound)),
                numpyro.param(f"{name}.b", jnp.zeros(n_out)))

    if kind == "sbn":
        def model(x: Any) -> None:
            prior = numpyro.param("prior", jnp.zeros(200))
            w = numpyro.param("w", 0.01 * jax.random.normal(keys[0], (784, 200)))
            b = numpyro.param("b", jnp.zeros(784))
            with numpyro.plate("batch", x.shape[0]):
                h = numpyro.sample("h", nd.Bernoulli(logits=prior).to_event(1))
                numpyro.sample("x", nd.Bernoulli(logits=h @ w.T + b).to_event(1), obs=x)

        def guide(x: Any) -> None:
            r = numpyro.param("r", 0.01 * jax.random.normal(keys[1], (200, 784)))
            c = numpyro.param("c", jnp.zeros(200))
            with numpyro.plate("batch", x.shape[0]):
                numpyro.sample("h", nd.Bernoulli(logits=x @ r.T + c).to_event(1))
        return model, guide, 1e-3
    if kind == "vae":
        def model(x: Any) -> None:
            (w1, b1), (w2, b2) = (linear("dec1", keys[0], HIDDEN, LATENT),
                                  linear("dec2", keys[1], 784, HIDDEN))
            with numpyro.plate("batch", x.shape[0]):
                z = numpyro.sample("z", nd.Bernoulli(
                    logits=jnp.zeros((x.shape[0], LATENT))).to_event(1))
                logits = jnp.tanh(z @ w1.T + b1) @ w2.T + b2
                numpyro.sample("x", nd.Bernoulli(logits=logits).to_event(1), obs=x)

        def guide(x: Any) -> None:
            (w1, b1), (w2, b2) = (linear("enc1", keys[2], HIDDEN, 784),
                                  linear("enc2", keys[3], LATENT, HIDDEN))
            with numpyro.plate("batch", x.shape[0]):
                numpyro.sample("z", nd.Bernoulli(
                    logits=jnp.tanh(x @ w1.T + b1) @ w2.T + b2).to_event(1))
        return model, guide, 1e-3

    def model(x: Any) -> None:
        trans = numpyro.param("trans", jnp.array([0.1, 2.0]))
        with numpyro.plate("batch", x.shape[0]):
            z = jnp.zeros(x.shape[0])
            for t in range(x.shape[1]):
                z = numpyro.sample(f"z{t}", nd.Bernoulli(logits=trans[0] + trans[1] * z - 1.0))
                numpyro.sample(f"x{t}", nd.Normal(z, 1.0), obs=x[:, t])

    def guide(x: Any) -> None:
        w = numpyro.param("w", jnp.array([0.1, 0.2, 0.3]))
        with numpyro.plate("batch", x.shape[0]):
            z = jnp.zeros(x.shape[0])
            for t in range(x.shape[1]):
                z = numpyro.sample(f"z{t}", nd.Bernoulli(
                    logits=w[0] + w[1] * x[:, t] + w[2] * z))
    return model, guide, 1e-2


NUMPYRO_LOSSES = {"trace": "NumPyro Trace_ELBO, jit(svi.update)",
                  "tracegraph": "NumPyro TraceGraph_ELBO, jit(svi.update)"}


def numpyro_runners(kind: str, x0: Tensor, losses: list[str],
                    cache: str | None = None) -> list[Runner]:
    """NumPyro's SVI ``update`` under ``jax.jit`` (not yet compiled: its first step
    compiles); empty if NumPyro is not installed."""
    try:
        jax = _jax(cache)
        import jax.numpy as jnp
        import numpyro
        from numpyro.infer import SVI as NSVI
        from numpyro.infer import Trace_ELBO as NTrace
        from numpyro.infer import TraceGraph_ELBO as NTraceGraph
    except ImportError:
        return []
    model, guide, lr = numpyro_program(kind)
    runners = []
    for name in losses:
        loss = NTrace() if name == "trace" else NTraceGraph()
        svi = NSVI(model, guide, numpyro.optim.Adam(lr), loss)
        holder = {"state": svi.init(jax.random.PRNGKey(1), jnp.asarray(x0.numpy())),
                  "update": jax.jit(svi.update)}

        def step(x: Any, holder: dict = holder) -> None:
            state, value = holder["update"](holder["state"], jnp.asarray(x.numpy()))
            value.block_until_ready()
            holder["state"] = state

        runners.append(Runner(NUMPYRO_LOSSES[name], step, jax=holder))
    return runners


def compile_in_child(kind: str, t: int, loss: str, budget: float, cache: str) -> float | None:
    """Seconds NumPyro's first jitted update takes in a child process (writing jax's
    compilation cache), or ``None`` if it did not finish within ``budget`` seconds of
    the child's start of it (the child is then killed)."""
    command = [sys.executable, __file__, "--compile-child", f"{kind}:{t}:{loss}",
               "--jax-cache", cache]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "READY":  # imports and NumPyro's init done
            raise RuntimeError(f"the compile child for {kind}:{t}:{loss} failed")
        try:
            child.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            return None
        for line in child.stdout.read().splitlines():
            if line.startswith("COMPILED "):
                seconds = float(line.split()[1])
                return seconds if seconds <= budget else None
    raise RuntimeError(f"the compile child for {kind}:{t}:{loss} failed")


def compile_child(spec: str, cache: str) -> None:
    kind, t, loss = spec.split(":")
    runner = numpyro_runners(kind, torch.randn(BATCH, int(t)), [loss], cache)[0]
    print("READY", flush=True)
    start = time.perf_counter()
    runner.step(torch.randn(BATCH, int(t)))
    print(f"COMPILED {time.perf_counter() - start:.3f}", flush=True)


# -- timing ----------------------------------------------------------------------------------
def measure(name: str, runners: list[Runner], batches: list[Any], rounds: int, steps: int,
            seed: int, lines: list[str], reference: str) -> None:
    for runner in runners:  # the first steps: recording / compilation
        start = time.perf_counter()
        for s in range(FIRST):
            runner.step(batches[s])
        runner.first = time.perf_counter() - start
    for runner in runners:  # ours jit: past the verified replays 1, 2, 4, ..., 32
        for s in range(WARM if runner.warm else 0):
            runner.step(batches[s])
    times = medians(interleaved_times(runners, Runner.step, batches.__getitem__,
                                      rounds, steps, shuffle_seed=seed))
    ref = next(t for r, t in zip(runners, times, strict=True) if r.label == reference)
    for r, t in sorted(zip(runners, times, strict=True), key=lambda rt: rt[1]):
        first = f"{r.first:.1f}" if r.child is None else f"{r.child:.1f} (child)"
        lines.append(f"| {name} | {r.label} | {1e3 * t:.2f} | {t / ref:.2f}× | {first} |")


# -- the profile -----------------------------------------------------------------------------
def _nodes(fn: Any) -> int:
    module = getattr(fn, "module", fn)  # a CompiledGraph: its recorded graph
    graph = getattr(module, "graph", None)
    return 0 if graph is None else sum(n.op == "call_function" for n in graph.nodes)


def profile_ours(runner: Runner, batches: list[Any], steps: int) -> str:
    """Seconds of the recorded forward+backward graph and update graph against the whole
    step, over ``steps`` steps (timers wrapped around the recorded graphs)."""
    graphs = [g for ts in runner.objective.compiled._training.values()
              for g in ts.graphs.values()]
    spent = {"forward": 0.0, "update": 0.0}
    saved = []
    for g in graphs:
        for attr in spent:
            fn = getattr(g, attr)
            saved.append((g, attr, fn))

            def timed(*a: Any, fn: Any = fn, attr: str = attr) -> Any:
                start = time.perf_counter()
                out = fn(*a)
                spent[attr] += time.perf_counter() - start
                return out
            setattr(g, attr, timed)
    start = time.perf_counter()
    for s in range(steps):
        runner.step(batches[s])
    total = (time.perf_counter() - start) / steps
    for g, attr, fn in saved:
        setattr(g, attr, fn)
    fwd, upd = spent["forward"] / steps, spent["update"] / steps
    nodes = [sum(_nodes(getattr(g, a)) for g in graphs) for a in spent]
    inductor = any(isinstance(g.forward, CompiledGraph) for g in graphs)
    ops = ("aten ops, fused by inductor" if inductor else
           f"aten ops, {1e6 * fwd / max(nodes[0], 1):.1f} µs per op")
    return (f"{1e3 * total:.2f} ms/step = forward+backward graph {1e3 * fwd:.2f} ms "
            f"({nodes[0]} {ops}) + optimizer-update graph {1e3 * upd:.2f} ms ({nodes[1]} "
            f"ops) + Python around them {1e3 * (total - fwd - upd):.2f} ms")


def profile_numpyro(runner: Runner, batches: list[Any], steps: int) -> str:
    """The jitted update against its compiled executable called directly."""
    import jax.numpy as jnp

    holder = runner.jax
    assert holder is not None
    xs = [jnp.asarray(b.numpy()) for b in batches[:steps]]
    executable = holder["update"].lower(holder["state"], xs[0]).compile()
    start = time.perf_counter()
    for s in range(steps):
        runner.step(batches[s])
    total = (time.perf_counter() - start) / steps
    state = holder["state"]
    start = time.perf_counter()
    for x in xs:
        state, value = executable(state, x)
        value.block_until_ready()
    bare = (time.perf_counter() - start) / steps
    holder["state"] = state
    return (f"{1e3 * total:.2f} ms/step = XLA executable {1e3 * bare:.2f} ms + jit dispatch "
            f"and the torch-to-jax batch {1e3 * (total - bare):.2f} ms")


def profile(name: str, runners: list[Runner], batches: list[Any], steps: int,
            labels: list[str], out: list[str]) -> None:
    for runner in runners:
        if runner.label not in labels:
            continue
        if runner.jax is not None:
            text = profile_numpyro(runner, batches, steps)
        elif runner.warm:
            text = profile_ours(runner, batches, steps)
        else:
            continue
        out.append(f"- {name}, {runner.label}: {text}.")


# -- memory ----------------------------------------------------------------------------------
#: key -> (model, contender label): each measured in a fresh child process
MEMORY = {
    "sbn-eager": ("sbn", "ours eager, pyro.infer.SVI"),
    "sbn-jit-svi": ("sbn", "ours jit, pyro.infer.SVI + pyro.optim.Adam"),
    "sbn-jit-module": ("sbn", "ours jit, training step (module.step / fit) + torch Adam"),
    "sbn-inductor": ("sbn", "ours jit + inductor, training step (module.step / fit) + torch Adam"),
    "sbn-hand": ("sbn", SBN_REF),
    "sbn-numpyro": ("sbn", NUMPYRO_LOSSES["tracegraph"]),
    "chain-eager": ("chain", "ours eager + moving average, SVI"),
    "chain-jit": ("chain", "ours jit + moving average, SVI + pyro.optim.Adam"),
    "chain-pyro": ("chain", CHAIN_REF),
    "chain-numpyro": ("chain", NUMPYRO_LOSSES["trace"]),
}
MEM_WARM, MEM_STEPS = 70, 50  # past verified replay 64; the window ends before 128


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _trim() -> float:
    """Frees what can be freed (Python's garbage, glibc's free lists); the RSS in MB."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status_mb("VmRSS")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)


def memory_child(key: str, args: Any) -> None:
    kind, label = MEMORY[key]
    if kind == "sbn":
        mnist = timing_setup(args)
        batches = [mnist[i] for i in torch.randint(len(mnist), (MEM_WARM + MEM_STEPS, 24))]
        runners = (numpyro_runners("sbn", batches[0], ["tracegraph"]) if "NumPyro" in label
                   else sbn_runners(SigmoidBeliefNet((784, 200)), batches[0], True))
    else:
        timing_setup(args)
        batches = [torch.randn(BATCH, 100) for _ in range(MEM_WARM + MEM_STEPS)]
        runners = (numpyro_runners("chain", batches[0], ["trace"]) if "NumPyro" in label
                   else chain_runners(False))
    runner = next(r for r in runners if r.label == label)
    del runners
    start = _trim()
    _reset_peak()
    for s in range(MEM_WARM):
        runner.step(batches[s])
        if s == FIRST - 1:
            first = _status_mb("VmHWM")
    warm = _status_mb("VmHWM")
    held = _trim()
    _reset_peak()
    for s in range(MEM_WARM, MEM_WARM + MEM_STEPS):
        runner.step(batches[s])
    print("MEMORY " + json.dumps({"start": start, "first": first, "warm": warm, "held": held,
                                   "peak": _status_mb("VmHWM")}), flush=True)


def memory_table(args: Any, keys: list[str]) -> list[str]:
    lines = [
        "| model | contender | start MB | first 4 steps, peak + MB | steps 1–70, peak + MB "
        "| held after step 70, + MB | steps 71–120, peak + MB | × ours eager "
        "| × ours eager, whole process |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    results = {}
    for key in keys:
        command = [sys.executable, __file__, "--memory-child", key, "--data", args.data,
                   "--threads", str(args.threads), "--seed", str(args.seed)]
        done = subprocess.run(command, capture_output=True, text=True)
        found = [ln for ln in done.stdout.splitlines() if ln.startswith("MEMORY ")]
        if not found:
            print(f"memory child {key} failed: {done.stderr[-2000:]}", file=sys.stderr)
            continue
        results[key] = json.loads(found[0][7:])
    for key, r in results.items():
        kind, label = MEMORY[key]
        eager = results.get(f"{kind}-eager")
        grow = r["peak"] - r["start"]
        ratio = f"{grow / (eager['peak'] - eager['start']):.2f}× | " \
            f"{r['peak'] / eager['peak']:.2f}×" if eager else "— | —"
        model = "SBN 784-200, batch 24" if kind == "sbn" else f"markov chain T=100, batch {BATCH}"
        lines.append(f"| {model} | {label} | {r['start']:.0f} | {r['first'] - r['start']:.1f} "
                     f"| {r['warm'] - r['start']:.1f} | {r['held'] - r['start']:.1f} "
                     f"| {grow:.1f} | {ratio} |")
    return lines


# -- the run ---------------------------------------------------------------------------------
def main() -> None:
    if "PYTHONHASHSEED" not in os.environ:
        # NumPyro orders some of its program by set iteration: with a fixed hash seed the
        # child that compiles and this process lower the same module (one cache key)
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = timing_parser(__doc__, "docs/benchmarks/jit.md", rounds=7, steps=20)
    parser.add_argument("--no-inductor", action="store_true")
    parser.add_argument("--chain", type=int, nargs="*", default=[10, 100, 1000])
    parser.add_argument("--models", nargs="*", default=["sbn", "vae", "chain"])
    parser.add_argument("--long-rounds", type=int, default=3,
                        help="rounds for chains of T > 100 (steps: --long-steps)")
    parser.add_argument("--long-steps", type=int, default=3)
    parser.add_argument("--budget", type=float, default=300.0,
                        help="seconds a compilation may take (NumPyro at T >= 1000 runs it "
                             "in a child process killed then; inductor is skipped where "
                             "its compile time at T=100, linear in T, predicts more)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory", nargs="*", default=list(MEMORY))
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile-steps", type=int, default=50)
    for hidden in ("--jax-cache", "--compile-child", "--memory-child"):  # internal
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_child:
        timing_setup(args)
        return compile_child(args.compile_child, args.jax_cache)
    if args.memory_child:
        return memory_child(args.memory_child, args)
    started = time.perf_counter()
    cache = args.jax_cache or tempfile.mkdtemp(prefix="jax-cache-")
    mnist = timing_setup(args)
    n = max(args.rounds * args.steps, WARM + args.profile_steps) + 8
    lines = [
        TITLE,
        "",
        f"Median milliseconds per training step over {args.rounds} interleaved rounds of "
        f"{args.steps} steps ({args.long_rounds} of {args.long_steps} for T > 100), after "
        f"the first steps (\"first s\": the seconds of the first {FIRST} steps, recording "
        f"and compilation included, before ours jit is warmed past its verified replays "
        f"1, 2, …, 32); {versions()}, torch on {args.threads} thread(s), jax on one, "
        f"{machine()}, a machine shared with other jobs (loaded): ratios are side by side "
        "in one run; absolute times drift between runs. \"×\": ratio to the reference "
        "row of the model (the hand-written step for the SBN and the VAE, Pyro's "
        "Trace_ELBO for the chain).",
        "",
        "| model | contender | ms / step | × | first s |",
        "|---|---|---:|---:|---:|",
    ]
    notes: list[str] = []
    profiles: list[str] = []
    inductor = not args.no_inductor
    steps = args.profile_steps
    if "sbn" in args.models:
        sbn = SigmoidBeliefNet((784, 200))
        batches = [mnist[i] for i in torch.randint(len(mnist), (n, 24))]
        runners = sbn_runners(sbn, batches[0], inductor)
        runners += numpyro_runners("sbn", batches[0], ["trace", "tracegraph"], cache)
        measure("SBN 784-200, batch 24", runners, batches, args.rounds, args.steps,
                args.seed, lines, SBN_REF)
        if not args.no_profile:
            profile("SBN", runners, batches, steps, [
                MEMORY["sbn-jit-module"][1], MEMORY["sbn-jit-svi"][1], MEMORY["sbn-inductor"][1],
                NUMPYRO_LOSSES["tracegraph"]], profiles)
    if "vae" in args.models:
        batches = [mnist[i] for i in torch.randint(len(mnist), (n, 24))]
        runners = vae_runners(batches[0], inductor)
        runners += numpyro_runners("vae", batches[0], ["tracegraph"], cache)
        measure(f"discrete VAE 784-{HIDDEN}-{LATENT}, batch 24", runners, batches,
                args.rounds, args.steps, args.seed, lines, VAE_REF)
    inductor_first: dict[int, float] = {}
    for t in args.chain if "chain" in args.models else []:
        long = t > 100
        chain_batches = [torch.randn(BATCH, t) for _ in range(n)]
        use_inductor = inductor
        if inductor and long:
            known = max(inductor_first.items(), default=None)
            predicted = None if known is None else known[1] * t / known[0]
            if predicted is None or predicted > args.budget:
                use_inductor = False
                notes.append(
                    f"- T={t}: ours jit + inductor not run: "
                    + (f"its first steps took {known[1]:.0f} s at T={known[0]}; linear in T "
                       f"that is ~{predicted:.0f} s here, over the budget of "
                       f"{args.budget:.0f} s." if known and predicted else
                       "no shorter chain measured its compile time."))
        runners = chain_runners(use_inductor)
        child = None
        if long:
            start = time.perf_counter()
            child = compile_in_child("chain", t, "trace", args.budget, cache)
            if child is None:
                notes.append(f"- T={t}: NumPyro Trace_ELBO, jit(svi.update) did not finish "
                             f"compiling in {args.budget:.0f} s (in a child process, "
                             f"stopped after {time.perf_counter() - start:.0f} s).")
        losses = ["trace"] + (["tracegraph"] if t <= 10 else [])
        nruns = numpyro_runners("chain", chain_batches[0], losses, cache) \
            if not long or child is not None else []
        for r in nruns:
            r.child = child
        rounds, steps_ = (args.long_rounds, args.long_steps) if long else (args.rounds,
                                                                          args.steps)
        name = f"markov chain T={t}, batch {BATCH}"
        measure(name, runners + nruns, chain_batches, rounds, steps_, args.seed, lines,
                CHAIN_REF)
        for r in runners + nruns:
            if "inductor" in r.label:
                inductor_first[t] = r.first
            if long and r.child is not None:
                notes.append(f"- T={t}: {r.label}: compiled in {r.child:.0f} s in a child "
                             f"process; this process's first steps, from jax's compilation "
                             f"cache: {r.first:.1f} s.")
        if long and not any(r.jax for r in nruns):
            lines.append(f"| {name} | {NUMPYRO_LOSSES['trace']} | — | — | did not finish in "
                         f"{args.budget:.0f} s |")
        if t == 100 and not args.no_profile:
            profile(f"chain T={t}", runners + nruns, chain_batches, steps,
                    [runners[0].label, NUMPYRO_LOSSES["trace"]], profiles)
    if not args.no_memory:
        lines += ["", "### Peak memory of a training process", "",
                  "Resident memory (Linux VmRSS / VmHWM, MB) of a fresh child process per "
                  "contender, with the peak reset (`/proc/self/clear_refs`) after "
                  "`gc.collect()` and glibc's `malloc_trim(0)`: \"start\", after imports, "
                  "data and the contender's construction; then the peak above it in the "
                  f"first {FIRST} steps (recording, compilation), in steps 1–{MEM_WARM} "
                  "(the verified replays 1, 2, …, 64 of ours jit run the eager step too), "
                  f"what stays after step {MEM_WARM}, and the peak in steps "
                  f"{MEM_WARM + 1}–{MEM_WARM + MEM_STEPS} (no verification). \"×\": the "
                  "last against ours eager of the model, and the whole process's peak "
                  "against its.", ""]
        lines += memory_table(args, args.memory)
    if profiles:
        lines += ["", "### Where a compiled step's time goes", "",
                  f"{steps} steps after the timing above, timers around the recorded "
                  "graphs (ours) or the compiled XLA executable called directly (NumPyro):", ""]
        lines += profiles
    if notes:
        lines += ["", "Recorded by the run:", "", *notes]
    print(f"(the run took {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    # a section of its own at the end of the page bench_jit.py writes (which rewrites the
    # whole page: run this script after it)
    out = repo_path(args.out)
    before = out.read_text() if out.exists() else ""
    before = before.split(TITLE)[0].rstrip("\n")
    write_table((before + "\n\n" if before else "") + "\n".join(lines), out)


if __name__ == "__main__":
    main()

"""Reproduce the published sigmoid-belief-net results on binarized MNIST, resumably.

Trains a named net (``linear-784-200``, ``linear-784-200-200``, ``nonlinear``) with a named
objective (``nvil``, ``rloo``, ``vimco``, ``disarm``) with the papers' settings by default
(RELAX paper, Grathwohl et al. 2018, Table 1: batch 24, 2,000,000 steps, Adam), through
:func:`pyro_wakesleep.fit` with a checkpoint every ``--checkpoint-every`` steps: a run
killed at any point continues exactly (bit for bit) from its last checkpoint when the
same command is run again. ``SIGTERM`` and ``Ctrl-C`` finish the current step and save.

Every ``--log-every`` steps a row is appended to ``OUT/<net>_<objective>.csv``: the step,
the wall time (cumulative over resumes), the training time (without these evaluations),
the training ELBO over a fixed subset of the training set (the first
``--train-eval-size`` images, one sample each), the validation ELBO, the validation
``--iw-samples``-sample importance-weighted bound (``VimcoELBO(K).loss``, the IWAE bound)
and the trace of the covariance of the guide gradient
(:func:`pyro_wakesleep.diagnostics.gradient_stats`, ``--grad-draws`` draws, at the first
24 training images). Every evaluation is seeded by the step and leaves the training
random state untouched, so the rows are part of the exact resume.

Run:       ``python benchmarks/reproduce_sbn.py --net linear-784-200 --objective nvil``
Plot:      ``python benchmarks/reproduce_sbn.py --plot``   (``OUT/curves.png``)
Table:     ``python benchmarks/reproduce_sbn.py --table``  (``docs/benchmarks/reproduction.md``)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import Adam  # type: ignore[attr-defined]  # made at import time
from pyro.util import get_rng_state, set_rng_state
from torch import Tensor

from pyro_wakesleep import (
    DisarmELBO,
    LeaveOneOutBaseline,
    NeuralBaseline,
    ScoreFunctionELBO,
    StepInfo,
    VimcoELBO,
    fit,
)
from pyro_wakesleep.checkpoints import load_checkpoint
from pyro_wakesleep.diagnostics import gradient_stats
from pyro_wakesleep.examples.datasets import load_binarized_mnist
from pyro_wakesleep.examples.models import SigmoidBeliefNet

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "binarized_mnist.npz"
DEFAULT_OUT = ROOT / "docs" / "benchmarks" / "reproduction"
DEFAULT_CHECKPOINTS = ROOT / "runs" / "reproduce"
DEFAULT_TABLE = ROOT / "docs" / "benchmarks" / "reproduction.md"
PAPER_STEPS = 2_000_000
BATCH = 24

#: net name -> (layer widths from the observation up, width of the tanh layers or None)
NETS: dict[str, tuple[tuple[int, ...], int | None]] = {
    "linear-784-200": ((784, 200), None),
    "linear-784-200-200": ((784, 200, 200), None),
    "nonlinear": ((784, 200), 200),
}
#: objective name -> default number of particles
OBJECTIVES: dict[str, int] = {"nvil": 1, "rloo": 2, "vimco": 2, "disarm": 1}
#: (objective, net) -> (published best training ELBO, source); RELAX paper, Table 1
PUBLISHED: dict[tuple[str, str], tuple[float, str]] = {
    ("nvil", "linear-784-200"): (-112.5, "NVIL, RELAX paper Table 1"),
    ("nvil", "linear-784-200-200"): (-99.6, "NVIL, RELAX paper Table 1"),
    ("nvil", "nonlinear"): (-101.5, "NVIL, RELAX paper Table 1"),
}
#: the line drawn for objectives without a figure of their own in Table 1 (same metric)
REFERENCE: dict[str, tuple[float, str]] = {
    net: (value, "no row in RELAX Table 1; NVIL's figure shown")
    for (_, net), (value, _) in PUBLISHED.items()
}
COLUMNS = ["step", "wall_s", "train_s", "train_elbo", "valid_elbo", "valid_iw_bound",
           "guide_grad_variance"]


# -- the run --------------------------------------------------------------------------------
def make_net(name: str) -> SigmoidBeliefNet:
    sizes, hidden = NETS[name]
    return SigmoidBeliefNet(sizes, hidden=hidden)


def make_objective(name: str, net: SigmoidBeliefNet, particles: int) -> Any:
    """The objective ``name`` with ``particles`` particles, for ``net``'s latent sites."""
    sites = [f"h{i}" for i in range(1, net.num_layers + 1)]
    if name == "nvil":  # NVIL's input-dependent baseline, a 784-100-1 tanh MLP per layer
        cvs = {s: NeuralBaseline(torch.nn.Sequential(
            torch.nn.Linear(784, 100), torch.nn.Tanh(), torch.nn.Linear(100, 1)))
            for s in sites}
        return ScoreFunctionELBO(particles, cvs, max_plate_nesting=1)
    if name == "rloo":
        return ScoreFunctionELBO(particles, LeaveOneOutBaseline(), max_plate_nesting=1)
    if name == "vimco":
        return VimcoELBO(particles, max_plate_nesting=1)
    if name == "disarm":
        return DisarmELBO(particles, max_plate_nesting=1)
    raise ValueError(f"unknown objective {name!r}; one of {sorted(OBJECTIVES)}")


class Batches:
    """Mini-batches of ``batch_size`` rows of ``x`` in a fresh random order each epoch
    (global torch RNG, as ``fit`` expects to replay an epoch on resume); the last
    incomplete batch is dropped."""

    def __init__(self, x: Tensor, batch_size: int) -> None:
        if len(x) < batch_size:
            raise ValueError(f"need at least batch_size={batch_size} images, got {len(x)}")
        self.x, self.batch_size = x, batch_size

    def __iter__(self) -> Iterator[Tensor]:
        order = torch.randperm(len(self.x))
        for i in range(len(self.x) // self.batch_size):
            yield self.x[order[i * self.batch_size:(i + 1) * self.batch_size]]


class Seeded:
    """Runs a computation under the seed ``(base, step)`` and restores the global random
    state afterwards: evaluations never change what training draws."""

    def __init__(self, base: int, step: int) -> None:
        self.seed = (base * 1_000_003 + step) % (2**31)

    def __enter__(self) -> None:
        self.saved = get_rng_state()
        pyro.set_rng_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        set_rng_state(self.saved)


def mean_bound(objective: Any, net: SigmoidBeliefNet, x: Tensor, chunk: int) -> float:
    """The objective's bound per image, averaged over ``x`` (evaluated in chunks)."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            total -= objective.loss(net.model, net.guide, x[i:i + chunk])
    return total / len(x)


class Logger:
    """The ``fit`` callback: every ``log_every`` steps evaluates and appends a CSV row;
    keeps the clock (wall and training time, cumulative over resumes)."""

    def __init__(self, args: argparse.Namespace, net: SigmoidBeliefNet, objective: Any,
                 data: dict[str, Tensor], csv_path: Path, clock_path: Path, start: int,
                 device: torch.device) -> None:
        self.args, self.net, self.objective, self.data = args, net, objective, data
        self.csv_path, self.clock_path = csv_path, clock_path
        self.elbo = ScoreFunctionELBO(1, max_plate_nesting=1)
        self.iw = VimcoELBO(args.iw_samples, max_plate_nesting=1)
        clocks = _read_clock(clock_path)
        # the clock of the checkpoint's step, or the latest before it (a hard kill between
        # the clock's write and the checkpoint's loses the time since)
        before = [c for c in clocks if c["step"] <= start]
        last = max(before, key=lambda c: c["step"]) if before else {"wall": 0.0, "train": 0.0}
        self.wall0, self.train0 = float(last["wall"]), float(last["train"])
        self.step, self.wall, self.train = start, self.wall0, self.train0
        self.clocks = [c for c in clocks if c["step"] <= start][-2:]
        self.t = time.perf_counter()
        self.device = device

    def tick(self, step: int) -> None:
        now = time.perf_counter()
        self.train += now - self.t
        self.wall += now - self.t
        self.step, self.t = step, now

    def __call__(self, info: StepInfo) -> None:
        self.tick(info.step)
        if info.step % self.args.log_every == 0:
            row = self.evaluate(info.step)
            with open(self.csv_path, "a", newline="") as f:
                csv.writer(f).writerow([row[c] for c in COLUMNS])
            if self.args.verbose:
                print(json.dumps(row), flush=True)
            self.wall += time.perf_counter() - self.t  # evaluations count in wall time only
            self.t = time.perf_counter()
        if info.step % self.args.checkpoint_every == 0:
            self.save_clock()

    def save_clock(self) -> None:
        self.clocks = [*self.clocks, {"step": self.step, "wall": self.wall,
                                      "train": self.train}][-3:]
        tmp = self.clock_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.clocks))
        os.replace(tmp, self.clock_path)

    def evaluate(self, step: int) -> dict[str, Any]:
        a, d = self.args, self.data
        with Seeded(a.seed, step):
            train = mean_bound(self.elbo, self.net, d["train_eval"], a.eval_chunk)
        with Seeded(a.seed + 1, step):
            valid = mean_bound(self.elbo, self.net, d["valid"], a.eval_chunk)
        with Seeded(a.seed + 2, step):
            chunk = max(1, a.eval_chunk * 10 // a.iw_samples)
            iw = mean_bound(self.iw, self.net, d["valid"][:a.iw_size], chunk)
        variance = math.nan
        if a.grad_draws >= 2:
            stats = gradient_stats(self.net.model, self.net.guide, self.objective,
                                   d["grad_batch"], num_draws=a.grad_draws,
                                   seed=(a.seed * 7919 + step) % (2**31), only=["guide"])
            variance = float(sum(r["variance"] for r in stats.rows("group")))
        return {"step": step, "wall_s": round(self.wall, 2), "train_s": round(self.train, 2),
                "train_elbo": f"{train:.4f}", "valid_elbo": f"{valid:.4f}",
                "valid_iw_bound": f"{iw:.4f}", "guide_grad_variance": f"{variance:.6g}"}


def _read_clock(path: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads(path.read_text()))
    except (OSError, ValueError):
        return []


def _truncate_csv(path: Path, step: int) -> None:
    """Keeps the header and the rows up to ``step`` (later ones are recomputed, exactly,
    by the resumed run); writes the header if the file is new."""
    rows: list[list[str]] = []
    if path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        if rows and rows[0] != COLUMNS:
            raise ValueError(f"{path} has columns {rows[0]}, expected {COLUMNS}")
        rows = rows[1:]
    rows = [r for r in rows if int(r[0]) <= step]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)


def run_name(args: argparse.Namespace) -> str:
    return f"{args.net}_{args.objective}"


def load_data(args: argparse.Namespace, device: torch.device) -> dict[str, Tensor]:
    train = load_binarized_mnist(args.data, "train")
    valid = load_binarized_mnist(args.data, "valid")
    if args.limit:
        train, valid = train[:args.limit], valid[:args.limit]
    if args.valid_size:
        valid = valid[:args.valid_size]
    train, valid = train.to(device), valid.to(device)
    return {"train": train, "train_eval": train[:args.train_eval_size], "valid": valid,
            "grad_batch": train[:BATCH]}


def train(args: argparse.Namespace, callbacks: Sequence[Callable[[StepInfo], Any]] = ()
          ) -> Path:
    """Trains (or resumes) the run of ``args``; returns the CSV's path."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    with torch.device(device):
        net = make_net(args.net)
    objective = make_objective(args.objective, net, args.particles)
    if device.type != "cpu":
        objective.control_variates.to(device)
    data = load_data(args, device)
    svi = SVI(net.model, net.guide, Adam({"lr": args.lr}), objective)

    name = run_name(args)
    out = Path(args.out)
    csv_path = out / f"{name}.csv"
    ckpt_dir = Path(args.checkpoint_dir) / name
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, clock = ckpt_dir / "checkpoint.pt", ckpt_dir / "clock.json"
    start = int(load_checkpoint(checkpoint)["step"]) if checkpoint.exists() else 0
    if start == 0:
        clock.unlink(missing_ok=True)
    if start:
        check_settings(args, out / f"{name}.json")
    _truncate_csv(csv_path, start)
    write_meta(args, out / f"{name}.json")
    logger = Logger(args, net, objective, data, csv_path, clock, start, device)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    if main_thread:  # SIGTERM: finish the step, save, stop (as Ctrl-C does)
        signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        fit(svi, Batches(data["train"], args.batch_size), args.steps,
            checkpoint=checkpoint, checkpoint_every=args.checkpoint_every,
            callbacks=[logger, *callbacks], progress=args.progress,
            description=name)
    except KeyboardInterrupt:
        logger.save_clock()
        print(f"stopped at step {logger.step}; run the same command to resume",
              file=sys.stderr)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    logger.save_clock()
    return csv_path


#: settings that may change when a run is resumed
RESUMABLE_CHANGES = ("steps", "device", "threads")


def check_settings(args: argparse.Namespace, path: Path) -> None:
    """Refuses to resume a checkpoint under other settings than those that wrote it
    (``--lr``, ``--log-every``, ... would silently make a different run)."""
    try:
        saved = json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError):
        return  # no record of the settings (e.g. another --out): nothing to compare
    now = settings_of(args)
    changed = {k: (saved.get(k), v) for k, v in now.items()
               if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if changed:
        raise SystemExit(f"the checkpoint of {run_name(args)} was written with other "
                         f"settings (saved, now): {changed}; use the same command, or "
                         f"another --checkpoint-dir to start over")


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items()
            if k not in ("plot", "table", "table_out", "progress", "verbose", "out",
                         "checkpoint_dir", "data")}


def write_meta(args: argparse.Namespace, path: Path) -> None:
    """The run's settings and machine, next to its CSV (read by ``--table``)."""
    meta = {"settings": settings_of(args), "machine": machine(args.device),
            "versions": f"torch {torch.__version__}, pyro {pyro.__version__}"}
    path.write_text(json.dumps(meta, indent=1) + "\n")


def machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, 1 thread" if device == "cpu" else cpu


# -- the curves and the table, from the committed CSVs --------------------------------------
def read_runs(out: Path) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(out.glob("*.csv")):
        meta_path = path.with_suffix(".json")
        if not meta_path.exists():
            continue
        meta = json.loads(meta_path.read_text())
        with open(path, newline="") as f:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        if rows:
            runs.append({"name": path.stem, "meta": meta, "rows": rows})
    return runs


def published(objective: str, net: str) -> tuple[float, str]:
    return PUBLISHED.get((objective, net)) or REFERENCE[net]


def plot(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = read_runs(out)
    if not runs:
        raise SystemExit(f"no runs (CSV + JSON) in {out}")
    fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(5.5 * max(1, len(runs)), 4),
                             squeeze=False)
    for ax, r in zip(axes[0], runs, strict=True):
        s = r["meta"]["settings"]
        steps = [row["step"] for row in r["rows"]]
        ax.plot(steps, [row["train_elbo"] for row in r["rows"]], label="training ELBO")
        ax.plot(steps, [row["valid_elbo"] for row in r["rows"]], label="validation ELBO")
        ax.plot(steps, [row["valid_iw_bound"] for row in r["rows"]],
                label=f"validation {s['iw_samples']}-sample bound")
        for line in ax.get_lines():
            line.set_marker(".")
        value, source = published(s["objective"], s["net"])
        ax.axhline(value, color="k", ls="--", lw=1,
                   label=f"published: {value} ({'NVIL' if 'NVIL' in source else source}, "
                         f"{PAPER_STEPS:.0e} steps)")
        ax.set_xscale("log")
        ax.set_xlim(min(steps) / 1.5, PAPER_STEPS * 1.2)
        ax.axvline(PAPER_STEPS, color="grey", ls=":", lw=1)
        ax.set_ylim(max(-250.0, min(row["train_elbo"] for row in r["rows"]) - 5), value + 15)
        ax.set_title(f"{s['objective']} K={s['particles']}, {s['net']}, lr {s['lr']:g}")
        ax.set_xlabel("step")
        ax.set_ylabel("nats per image")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=70)
    print(f"wrote {path}")
    return path


def table(out: Path, target: Path) -> str:
    """Writes the Markdown page of the runs in ``out`` to ``target``; returns it."""
    runs = read_runs(out)
    lines = [
        "# Reproducing the published sigmoid-belief-net results",
        "",
        "Written by `python benchmarks/reproduce_sbn.py --table` from the CSVs in",
        "`docs/benchmarks/reproduction/` (one row per logged step; the curves,",
        "`curves.png`, by `--plot`). Binarized MNIST (Larochelle & Murray split: 50,000",
        "train, 10,000 validation images), batch 24, Adam. *Train ELBO* is the one-sample",
        "ELBO averaged over the first 10,000 training images: the metric of the RELAX",
        "paper's Table 1 (Grathwohl et al. 2018: best training ELBO after 2,000,000 steps,",
        "learning rate searched over {5e-3 … 5e-5}). *Valid IW bound*: the",
        "importance-weighted (IWAE) bound on the validation images named. Steps/s counts",
        "training time only (evaluations excluded), averaged over the run on the machine",
        "named, under whatever else ran there (the CPU runs shared two cores with other",
        "jobs). **A run short of 2,000,000 steps is",
        "reported at the step it reached; nothing is extrapolated.**",
        "",
        "| objective | net | published (2e6 steps) | ours: train ELBO at step S | S | "
        "fraction of 2e6 | gap to published | valid ELBO | valid IW bound | steps/s | lr "
        "| machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s, last = r["meta"]["settings"], r["rows"][-1]
        value, source = published(s["objective"], s["net"])
        rate = last["step"] / last["train_s"] if last["train_s"] > 0 else math.nan
        images = s.get("iw_size") or s.get("valid_size") or 10000
        lines.append(
            f"| {s['objective']} (K={s['particles']}) | {s['net']} | {value} ({source}) | "
            f"{last['train_elbo']:.2f} | {int(last['step']):,} | "
            f"{last['step'] / PAPER_STEPS:.1%} | {last['train_elbo'] - value:+.2f} nats | "
            f"{last['valid_elbo']:.2f} | {last['valid_iw_bound']:.2f} (K={s['iw_samples']}, "
            f"{images:,} images) | {rate:.0f} | {s['lr']:g} | {r['meta']['machine']} |")
    if not runs:
        lines.append("| (no runs yet) | | | | | | | | | | | |")
    lines += [
        "",
        "The guide-gradient variance in the CSVs (trace of the covariance of the recognition",
        "network's gradient, 10 draws at the first 24 training images) is not comparable",
        "across objectives: NVIL divides its learning signal by the running standard",
        "deviation, which scales its gradient down.",
        "",
        "To continue a run from its last checkpoint, exactly (bit for bit, also after a hard",
        "kill), run the command that started it again (settings other than `--steps`,",
        "`--device`, `--threads` must stay the same; the script refuses otherwise):",
        "",
        "```bash",
    ]
    for r in runs:
        s = r["meta"]["settings"]
        lines.append(f".venv/bin/python benchmarks/reproduce_sbn.py --net {s['net']} "
                     f"--objective {s['objective']} --particles {s['particles']} "
                     f"--lr {s['lr']:g} --log-every {s['log_every']} "
                     f"--checkpoint-every {s['checkpoint_every']} --device {s['device']}"
                     + (f" --iw-size {s['iw_size']}" if s.get("iw_size") else ""))
    lines += ["```", "",
              "Checkpoints live in `runs/reproduce/<net>_<objective>/` (not committed).",
              "", "![curves](reproduction/curves.png)", ""]
    text = "\n".join(lines)
    target.write_text(text)
    print(text)
    return text


# -- command line -----------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", choices=sorted(NETS), default="linear-784-200")
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default="nvil")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="binarized_mnist.npz")
    p.add_argument("--steps", type=int, default=PAPER_STEPS)
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--particles", type=int, default=None,
                   help="default: 1 for nvil/disarm, 2 for rloo/vimco")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder of the CSVs and plot")
    p.add_argument("--checkpoint-dir", default=str(DEFAULT_CHECKPOINTS))
    p.add_argument("--checkpoint-every", type=int, default=5000)
    p.add_argument("--log-every", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--train-eval-size", type=int, default=10000)
    p.add_argument("--valid-size", type=int, default=None, help="default: all 10,000")
    p.add_argument("--iw-samples", type=int, default=100)
    p.add_argument("--iw-size", type=int, default=None,
                   help="validation images for the bound (default all; ~4 ms each on CPU)")
    p.add_argument("--grad-draws", type=int, default=10)
    p.add_argument("--eval-chunk", type=int, default=1000)
    p.add_argument("--progress", action="store_true", help="tqdm progress bar")
    p.add_argument("--verbose", action="store_true", help="print each CSV row")
    p.add_argument("--plot", action="store_true", help="only redraw OUT/curves.png")
    p.add_argument("--table", action="store_true", help="only rewrite the docs table")
    p.add_argument("--table-out", default=str(DEFAULT_TABLE))
    return p


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if args.particles is None:
        args.particles = OBJECTIVES[args.objective]
    for name in ("steps", "batch_size", "particles", "checkpoint_every", "log_every",
                 "threads", "train_eval_size", "iw_samples", "eval_chunk"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.plot or args.table:
        if args.plot:
            plot(Path(args.out))
        if args.table:
            table(Path(args.out), Path(args.table_out))
        return
    try:
        train(args)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()

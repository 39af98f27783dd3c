"""Data-parallel throughput: images/s of the linear SBN for 1 and 2 CPU processes at the
same global batch, DistributedDataParallel over gloo on 127.0.0.1.

Usage: ``python benchmarks/bench_distributed.py [--steps 200] [--batch 48] [--repeats 3]``;
writes ``docs/benchmarks/distributed.md``. Each configuration is measured ``--repeats``
times, interleaved (1, 2, 3, 1, 2, 3, ...) so that a burst of load from other jobs hits
every configuration alike; the table gives the median and the range.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time

import pyro
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import machine, nvil, repo_path, versions, write_table
from torch.nn.parallel import DistributedDataParallel

from pyro_wakesleep import ScoreFunctionELBO
from pyro_wakesleep.examples.datasets import load_binarized_mnist
from pyro_wakesleep.examples.models import SigmoidBeliefNet

MNIST = repo_path("../shared/data/binarized_mnist.npz")
OUT = repo_path("docs/benchmarks/distributed.md")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(rank: int, world: int, threads: int, port: int, args: argparse.Namespace,
         out: str) -> None:
    """One rank: ``args.steps`` timed steps (after 5 warm-up steps) on its shard."""
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )
    data = load_binarized_mnist(MNIST)[: 100 * args.batch]
    per_rank = args.batch // world
    pyro.clear_param_store()
    torch.manual_seed(0)
    pyro.set_rng_seed(rank)
    sbn = SigmoidBeliefNet((784, 200), name="sbn")
    module = ScoreFunctionELBO(args.particles, control_variate=nvil())(sbn.model, sbn.guide)
    module.initialize(data[:per_rank])
    step_module = DistributedDataParallel(module) if world > 1 else module
    optimizer = torch.optim.Adam(step_module.parameters(), lr=1e-4)

    def step(i: int) -> None:
        start = (i * args.batch) % (len(data) - args.batch) + rank * per_rank
        optimizer.zero_grad()
        step_module(data[start:start + per_rank]).backward()
        optimizer.step()

    for i in range(5):
        step(i)
    if world > 1:
        dist.barrier()
    begin = time.perf_counter()
    for i in range(args.steps):
        step(i)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    elapsed = time.perf_counter() - begin
    if rank == 0:
        numel = sum(p.numel() for p in module.parameters())
        with open(out, "w") as f:
            f.write(f"{elapsed} {numel}")


#: trainable parameters of the measured module (written by rank 0)
NUMEL: list[int] = []


def measure(world: int, threads: int, args: argparse.Namespace) -> float:
    """Images/s of the global batch for ``world`` processes of ``threads`` threads."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "elapsed")
        mp.spawn(_run, args=(world, threads, _port(), args, out), nprocs=world, join=True)
        with open(out) as f:
            elapsed, numel = f.read().split()
    NUMEL[:] = [int(numel)]
    return args.steps * args.batch / float(elapsed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, nargs="+", default=[48, 480],
                        help="global batch sizes")
    parser.add_argument("--particles", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    if not (dist.is_available() and dist.is_gloo_available()):
        sys.exit("torch.distributed with gloo is not available")
    rows = [(batch, world, threads) for batch in args.batch
            for world, threads in [(1, 1), (1, 2), (2, 1)]]
    load_before = os.getloadavg()[0]
    samples: dict[tuple[int, int, int], list[float]] = {row: [] for row in rows}
    for _ in range(args.repeats):
        for row in rows:
            batch, world, threads = row
            samples[row].append(measure(world, threads, argparse.Namespace(
                **{**vars(args), "batch": batch})))
    load_after = os.getloadavg()[0]
    rates = {row: statistics.median(v) for row, v in samples.items()}
    cores = os.cpu_count() or 1
    busy = max(load_before, load_after) > cores
    lines = [
        "# Data-parallel throughput (DDP, gloo, CPU)",
        "",
        f"Linear SBN 784-200, binarized MNIST, ScoreFunctionELBO with NVIL, "
        f"{args.particles} particles, global batch "
        f"{' or '.join(map(str, args.batch))} (split evenly over the processes), Adam; "
        f"{args.steps} timed steps after 5 warm-up steps, wall time of "
        f"rank 0 between barriers; median (and range) of {args.repeats} interleaved "
        f"repeats. {cores} cores; 1-minute load average {load_before:.1f} before and "
        f"{load_after:.1f} after the run; {versions()}, {machine()}. "
        "`python benchmarks/bench_distributed.py`.",
        "",
        "| global batch | processes | threads each | images/s | range | "
        "× 1 process, 1 thread |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        batch, world, threads = row
        rate, low, high = rates[row], min(samples[row]), max(samples[row])
        lines.append(f"| {batch} | {world} | {threads} | {rate:.0f} | {low:.0f}–{high:.0f} "
                     f"| {rate / rates[(batch, 1, 1)]:.2f} |")
    if busy:
        lines += ["", f"**These figures are unreliable**: the load average exceeded the "
                  f"{cores} cores during the run, i.e. other jobs on this shared machine "
                  "held cores that the processes measured here needed. The ratios, not "
                  "the absolute rates, are what carries over, and only roughly."]
    lines += [
        "",
        f"What bounds it: this machine has {cores} cores, so 2 processes can at best double "
        "one single-threaded process and only match one process using both cores; each "
        f"step adds DDP's all-reduce of the {NUMEL[0]:,} gradient floats "
        f"({4 * NUMEL[0] / 1e6:.2f} MB: the SBN's 314,784 and NVIL's baseline net's) and "
        "one 3-number all-reduce of NVIL's statistics over loopback, and each process pays "
        "Pyro's per-step tracing overhead on half the batch (fixed cost per step, not per "
        "image): the larger the per-rank batch, the more of the step is work that "
        "splits (2 processes against 1: "
        + ", ".join(f"{rates[(b, 2, 1)] / rates[(b, 1, 1)]:.2f}× at global batch {b}"
                    for b in args.batch) + "). "
        "A row with more threads in total than idle cores measures contention, not the "
        "method (a load average above the core count means other jobs held the cores). "
        "See the Scaling out page for what changes on GPUs.",
    ]
    write_table("\n".join(lines), args.out)


if __name__ == "__main__":
    main()

"""The ``pyro-wakesleep`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from pyro_wakesleep.examples import compare as experiment
from pyro_wakesleep.examples.contenders import (
    DEFAULT_OBJECTIVES,
    OBJECTIVES,
    data_parallel_objectives,
)
from pyro_wakesleep.examples.datasets import load_binarized_mnist, load_digits, load_mnist_subset
from pyro_wakesleep.examples.parallel import compare_data_parallel

__all__ = ["main"]

#: what ``--full`` changes: every objective, the budget of the docs' headline figures
FULL = {"objectives": list(OBJECTIVES), "seconds": 120.0}


def _parser(full: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-wakesleep",
        description="Inference objectives for Pyro models with discrete latents.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    cmp = commands.add_parser(
        "compare",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="train a sigmoid belief net with each objective and compare them",
        description=(
            "Train a sigmoid belief net (Helmholtz machine) with each objective for the same "
            "budget of training seconds, from the same initial weights and batches, the "
            "objectives interleaved in rounds so that the machine's load hits all alike. "
            "Prints a table and writes compare.md, compare.json (results and settings) and "
            "compare.png: the training bound against training seconds, the held-out "
            "importance-weighted bound and the guide gradient's variance (log scale). "
            "Bounds are in nats per image. Data: 8,000 training and 500 held-out images of "
            "binarized MNIST that ship inside the package (no download)."
        ),
    )
    cmp.add_argument("--data", default="mnist-subset", metavar="DATA",
                     help="'mnist-subset' (binarized MNIST shipped with the package), "
                          "'digits' (scikit-learn's 8x8 digits, binarized) or the path of "
                          "the whole binarized MNIST .npz (train/valid/test bit-packed)")
    cmp.add_argument("--seconds", type=float, default=20.0,
                     help="training seconds per objective (0: no limit)")
    cmp.add_argument("--steps", type=int, default=0,
                     help="most steps per objective (0: no limit); training stops at "
                          "whichever of --seconds and --steps comes first")
    cmp.add_argument("--full", action="store_true",
                     help=f"the full-length comparison: every objective, "
                          f"{FULL['seconds']:g} s each (explicit options still win)")
    cmp.add_argument("--objectives", nargs="+", default=list(DEFAULT_OBJECTIVES),
                     metavar="NAME", help=f"any of: {' '.join(OBJECTIVES)}")
    cmp.add_argument("--particles", type=int, default=4, help="particles per step")
    cmp.add_argument("--batch-size", type=int, default=24, help="images per step")
    cmp.add_argument("--latent", type=int, nargs="+", default=None,
                     help="latent layer widths (None: 200 for MNIST, 32 for digits)")
    cmp.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    cmp.add_argument("--seed", type=int, default=0,
                     help="initial weights, batches, draws (rank r: seed + r), measurements")
    cmp.add_argument("--rounds", type=int, default=20,
                     help="interleaved slices the budget is trained in")
    cmp.add_argument("--evaluations", type=int, default=5,
                     help="measurements (held-out bound, gradient variance and SNR) after "
                          "initialization")
    cmp.add_argument("--grad-draws", type=int, default=20,
                     help="guide-gradient draws per measurement (variance and SNR)")
    cmp.add_argument("--eval-particles", type=int, default=50,
                     help="importance samples per held-out image")
    cmp.add_argument("--heldout", type=int, default=500, help="held-out images (at most)")
    cmp.add_argument("--threads", type=int, default=1,
                     help="torch threads (1: on a loaded two-core machine, 2 threads made a step "
                          "2.4x slower at the median and 6x at the 90th percentile)")
    cmp.add_argument("--devices", type=int, default=1, metavar="N",
                     help="train data-parallel on N processes (N GPUs with nccl when CUDA "
                          "has them, else N CPU processes with gloo), the global batch "
                          "split evenly over them; objectives without a "
                          "differentiable_loss (pyro-tracegraph) are left out")
    cmp.add_argument("--jit", action="store_true",
                     help="compiled training steps (the objectives' jit=True; "
                          "pyro-tracegraph, rebar and relax run eagerly)")
    cmp.add_argument("--out", default="runs/compare", help="output folder")
    cmp.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    if full:
        cmp.set_defaults(**FULL)
    return parser


def _data(name: str, heldout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str, int]:
    """Train and held-out images, a description, the default latent width."""
    if name == "mnist-subset":
        train, test = load_mnist_subset()
        source = "binarized MNIST subset (shipped)"
        width = 200
    elif name == "digits":
        train, test = load_digits(seed=seed)
        source = "scikit-learn digits (8x8, binarized)"
        width = 32
    else:
        train = load_binarized_mnist(name, "train")
        test = load_binarized_mnist(name, "test")
        source = f"binarized MNIST ({name})"
        width = 200
    if heldout < 1:
        raise ValueError(f"--heldout must be at least 1, got {heldout}")
    return train, test[:heldout], source, width


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pyro-wakesleep``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(full="--full" in argv).parse_args(argv)
    start = time.perf_counter()
    try:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        train, test, source, width = _data(args.data, args.heldout, args.seed)
    except (ValueError, FileNotFoundError) as error:
        print(f"pyro-wakesleep compare: error: {error}", file=sys.stderr)
        return 2
    latent = args.latent or [width]
    objectives = list(args.objectives)
    chosen = objectives not in (list(DEFAULT_OBJECTIVES), FULL["objectives"])
    if args.particles < 2 and not chosen:
        objectives = [o for o in objectives if o != "sf-loo"]
    if args.devices > 1 and not chosen:
        left_out = [o for o in objectives if o not in data_parallel_objectives()]
        objectives = [o for o in objectives if o not in left_out]
        if left_out:
            print(f"left out (no differentiable_loss, cannot run data-parallel): "
                  f"{' '.join(left_out)}")
    parallel = (f"; data-parallel on {args.devices} processes, "
                f"{args.batch_size // max(args.devices, 1)} images each"
                if args.devices > 1 else "")
    budget = " or ".join(b for b in (f"{args.seconds:g} s" if args.seconds else "",
                                     f"{args.steps} steps" if args.steps else "") if b)
    print(f"data: {source}; train {tuple(train.shape)}, held-out {tuple(test.shape)}; "
          f"SBN {train.shape[1]}-{'-'.join(map(str, latent))}; {budget} per objective, "
          f"{args.particles} particles, batch {args.batch_size}, {args.threads} thread(s)"
          f"{parallel}{'; compiled steps (--jit)' if args.jit else ''}")
    options = dict(seconds=args.seconds, steps=args.steps, rounds=args.rounds,
                   evaluations=args.evaluations, num_particles=args.particles,
                   batch_size=args.batch_size, latent=latent, learning_rate=args.lr,
                   seed=args.seed, grad_draws=args.grad_draws,
                   eval_particles=args.eval_particles, jit=args.jit)
    settings = experiment.settings(
        data=source, train_images=len(train), heldout_images=len(test), objectives=objectives,
        devices=args.devices, seeds={
            "initial weights": args.seed, "batches": args.seed,
            "training draws": f"{args.seed} + rank" if args.devices > 1 else args.seed,
            "measurements": args.seed}, **options)
    try:
        if args.devices < 1:
            raise ValueError(f"--devices must be at least 1, got {args.devices}")
        if args.devices == 1:
            results = experiment.compare(train, test, objectives, progress=not args.no_progress,
                                         **options)
        else:
            results = compare_data_parallel(train, test, objectives, devices=args.devices,
                                            progress=not args.no_progress, **options)
    except ValueError as error:
        print(f"pyro-wakesleep compare: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # the processes could not start, or one failed
        print(f"pyro-wakesleep compare: error: {error}", file=sys.stderr)
        return 3
    settings["wall_seconds"] = round(time.perf_counter() - start, 1)
    print("Bounds in nats per image: the objective's own training bound (mean of its last "
          "tenth of steps) and the importance-weighted bound on the held-out images "
          f"(K={args.eval_particles}); guide-gradient variance (mean per parameter) "
          f"over {args.grad_draws} draws at the end; ms/step: median, the objectives timed "
          "interleaved.")
    print(experiment.format_table(results))
    paths = experiment.save(results, args.out, settings)
    print(f"wrote {paths['md']}, {paths['json']} and {paths['png']} "
          f"({settings['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

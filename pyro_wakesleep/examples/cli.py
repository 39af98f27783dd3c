"""The ``pyro-wakesleep`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from pyro_wakesleep.examples import compare as experiment
from pyro_wakesleep.examples.datasets import load_binarized_mnist, load_digits
from pyro_wakesleep.examples.parallel import compare_data_parallel, data_parallel_objectives

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-wakesleep",
        description="Inference objectives for Pyro models with discrete latents.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    cmp = commands.add_parser(
        "compare",
        help="train a sigmoid belief net with each objective and compare them",
        description=(
            "Train a sigmoid belief net (Helmholtz machine) with each objective for the same "
            "number of steps, from the same initial weights and batches, then print a table "
            "(held-out ELBO, guide-gradient variance, ms/step) and plot the training curves. "
            "Data: scikit-learn's 8x8 digits (binarized, shipped with the install) unless "
            "--data gives a binarized MNIST .npz."
        ),
    )
    cmp.add_argument("--steps", type=int, default=1000, help="steps per objective")
    cmp.add_argument("--particles", type=int, default=4, help="particles per step")
    cmp.add_argument("--batch-size", type=int, default=24)
    cmp.add_argument("--latent", type=int, nargs="+", default=None,
                     help="latent layer widths (default: 32 for digits, 200 for MNIST)")
    cmp.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--grad-draws", type=int, default=50,
                     help="gradient draws for the variance estimate")
    cmp.add_argument("--objectives", nargs="+", default=None, metavar="NAME",
                     help=f"subset of: {' '.join(experiment.OBJECTIVES)}")
    cmp.add_argument("--data", default=None, metavar="PATH",
                     help="binarized MNIST .npz (train/valid/test bit-packed arrays)")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pyro-wakesleep``; returns the process exit code."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    if args.data is None:
        train, test = load_digits(seed=args.seed)
        latent = args.latent or [32]
        source = "scikit-learn digits (8x8, binarized)"
    else:
        train = load_binarized_mnist(args.data, "train")
        test = load_binarized_mnist(args.data, "test")[:1000]
        latent = args.latent or [200]
        source = f"binarized MNIST ({args.data})"
    objectives = args.objectives or list(experiment.OBJECTIVES)
    if args.particles < 2:
        objectives = [o for o in objectives if o != "sf-loo"]
    if args.devices > 1 and not args.objectives:
        left_out = [o for o in objectives if o not in data_parallel_objectives()]
        objectives = [o for o in objectives if o not in left_out]
        if left_out:
            print(f"left out (no differentiable_loss, cannot run data-parallel): "
                  f"{' '.join(left_out)}")
    parallel = (f"; data-parallel on {args.devices} processes, "
                f"{args.batch_size // max(args.devices, 1)} images each"
                if args.devices > 1 else "")
    print(f"data: {source}; train {tuple(train.shape)}, test {tuple(test.shape)}; "
          f"SBN {train.shape[1]}-{'-'.join(map(str, latent))}; {args.steps} steps, "
          f"{args.particles} particles, batch {args.batch_size}{parallel}"
          f"{'; compiled steps (--jit)' if args.jit else ''}")
    options = dict(steps=args.steps, num_particles=args.particles,
                   batch_size=args.batch_size, latent=latent, learning_rate=args.lr,
                   seed=args.seed, grad_draws=args.grad_draws, progress=not args.no_progress,
                   jit=args.jit)
    try:
        if args.devices < 1:
            raise ValueError(f"--devices must be at least 1, got {args.devices}")
        if args.devices == 1:
            results = experiment.compare(train, test, objectives, **options)
        else:
            results = compare_data_parallel(
                train, test, objectives, devices=args.devices, **options)
    except ValueError as error:
        print(f"pyro-wakesleep compare: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # the processes could not start, or one failed
        print(f"pyro-wakesleep compare: error: {error}", file=sys.stderr)
        return 3
    print(experiment.format_table(results))
    paths = experiment.save(results, args.out)
    print(f"wrote {paths['md']}, {paths['json']} and {paths['png']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

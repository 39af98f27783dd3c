"""Benchmark: signal-to-noise ratio of the inference network's gradient against K, for the
importance-weighted bound (IWAE, ``VimcoELBO``) and reweighted wake-sleep's wake-phi
(``ReweightedWakeSleepELBO``), each with and without doubly reparameterized gradients
(``dreg=True``; Tucker et al., 2019).

The model and guide are those of Rainforth et al. (2018), section 4 ("Tighter variational
bounds are not necessarily better"): z ~ N(mu, I) and x | z ~ N(z, I) in D = 20
dimensions, N datapoints drawn from it with mu ~ N(0, I); the guide
q(z | x) = N(A x + b, (2/3) I) with A = I/2 and b = mu/2 (the optimum) perturbed by
N(0, 0.01^2) noise. The SNR is that of :func:`pyro_wakesleep.diagnostics.gradient_stats`
over D gradient draws at fixed parameters: per group ``||mean|| / sqrt(sum of variances)``
and the average elementwise ``|mean| / sd`` (Rainforth et al.'s measure). At K = 1 the
IWAE rows are the pathwise ELBO (``ScoreFunctionELBO``, i.e. ``Trace_ELBO``) and the DReG
rows its K = 1 case, sticking the landing (``stick_the_landing=True``).

Run: ``python benchmarks/bench_dreg.py`` (about six minutes on one CPU core).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from common import machine, repo_path, versions, write_table

from pyro_wakesleep.diagnostics import gradient_stats
from pyro_wakesleep.objectives import ReweightedWakeSleepELBO, ScoreFunctionELBO, VimcoELBO

DIM = 20


def make_problem(num_data: int, seed: int) -> tuple[Any, Any, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mu_true = torch.randn(DIM, generator=generator)
    z = mu_true + torch.randn(num_data, DIM, generator=generator)
    x = z + torch.randn(num_data, DIM, generator=generator)
    a0 = 0.5 * torch.eye(DIM) + 0.01 * torch.randn(DIM, DIM, generator=generator)
    b0 = 0.5 * mu_true + 0.01 * torch.randn(DIM, generator=generator)
    mu0 = mu_true + 0.01 * torch.randn(DIM, generator=generator)

    def model(x: torch.Tensor) -> None:
        mu = pyro.param("mu", mu0.clone())
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x: torch.Tensor) -> None:
        a = pyro.param("A", a0.clone())
        b = pyro.param("b", b0.clone())
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ a.T + b, math.sqrt(2.0 / 3.0)).to_event(1))

    return model, guide, x


def objective(family: str, dreg: bool, k: int) -> Any:
    if family == "IWAE":
        if k == 1:
            return ScoreFunctionELBO(1, stick_the_landing=dreg, max_plate_nesting=1)
        return VimcoELBO(k, dreg=dreg, max_plate_nesting=1)
    return ReweightedWakeSleepELBO(k, dreg=dreg, max_plate_nesting=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-data", type=int, default=1)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 10, 30, 100, 300, 1000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/benchmarks/dreg.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    rows = []
    start = time.perf_counter()
    for family in ("IWAE", "RWS wake-φ"):
        for k in args.ks:
            if family != "IWAE" and k == 1:
                continue
            cells = []
            methods = set()
            for dreg in (False, True):
                pyro.clear_param_store()
                model, guide, x = make_problem(args.num_data, args.seed)
                stats = gradient_stats(model, guide, objective(family, dreg, k), x,
                                       num_draws=args.draws, seed=args.seed)
                methods.add(stats.method)
                groups = {row["group"]: row for row in stats.rows(by="group")}
                cells.append(groups["guide"])
                if family == "IWAE" and not dreg:
                    model_row = groups["model"]
            guide_cells = " | ".join(f"{c['snr']:.3g} | {c['mean_snr']:.3g}" for c in cells)
            model_cell = f"{model_row['snr']:.3g}" if family == "IWAE" else "–"
            rows.append(f"| {family} | {k} | {guide_cells} | {model_cell} |")
    elapsed = time.perf_counter() - start
    header = (
        "# Doubly reparameterized gradients: SNR against K\n\n"
        f"Signal-to-noise ratio of the guide's gradient (parameters A, b of q(z | x) = "
        f"N(Ax + b, 2/3 I)) on the Gaussian model of Rainforth et al. (2018) in D = {DIM} "
        f"dimensions, {args.num_data} datapoint(s), near the optimum (perturbation 0.01); "
        f"{args.draws} gradient draws per cell with "
        "`pyro_wakesleep.diagnostics.gradient_stats` (method "
        f"{', '.join(sorted(methods))}). ‖ḡ‖/√Σs²: the norm of the mean gradient over the "
        "square root of its total variance; mean |ḡ|/s: the average elementwise SNR. IWAE "
        "rows are `VimcoELBO(K, dreg=...)` (at K = 1, `ScoreFunctionELBO(1)`: the pathwise "
        "ELBO, and `stick_the_landing=True`: DReG's K = 1 case); RWS rows are "
        "`ReweightedWakeSleepELBO(K, dreg=...)`'s wake-φ. The model column is the SNR of the "
        "model's gradient (μ) under IWAE, which `dreg` leaves unchanged. "
        f"Noise floor: a gradient of mean zero reads ‖ḡ‖/√Σs² ≈ 1/√draws = "
        f"{1 / math.sqrt(args.draws):.3f} and mean |ḡ|/s ≈ √(2/(π·draws)) = "
        f"{math.sqrt(2 / (math.pi * args.draws)):.3f}, so smaller true values read as "
        "these. "
        f"{versions()}, 1 thread, {machine()}; {elapsed:.0f} s in all.\n"
        "Command: `python benchmarks/bench_dreg.py`.\n\n"
        "| objective | K | standard ‖ḡ‖/√Σs² | standard mean \\|ḡ\\|/s | DReG ‖ḡ‖/√Σs² "
        "| DReG mean \\|ḡ\\|/s | model (μ) ‖ḡ‖/√Σs² |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    write_table(header + "\n".join(rows), repo_path(args.out))


if __name__ == "__main__":
    main()

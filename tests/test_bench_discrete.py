"""benchmarks/bench_discrete.py and bench_discrete_variance.py: the nonlinear SBN is the
papers' architecture, every estimator of the benchmark trains on it, and the variance
study holds the model at its point while only the control variates learn."""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import pyro
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_discrete
import bench_discrete_variance


@pytest.fixture
def data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(96, 784, generator=generator) < 0.2).float()


def args(**extra: float) -> argparse.Namespace:
    return argparse.Namespace(**{"lr": 1e-3, "seed": 0, "seconds": math.inf,
                                 "steps": 10**9, **extra})


def test_nonlinear_sbn_is_the_papers_architecture() -> None:
    torch.manual_seed(0)
    net = bench_discrete.make_sbn("nonlinear")
    assert net.sizes == (784, 200) and net.num_layers == 1
    for conditional, (d_in, d_out) in ((net.recognition[0], (784, 200)),
                                       (net.generative.layers[0], (200, 784))):
        kinds = [type(m) for m in conditional]
        assert kinds == [nn.Linear, nn.LeakyReLU, nn.Linear, nn.LeakyReLU, nn.Linear]
        assert conditional[0].in_features == d_in and conditional[4].out_features == d_out
        assert conditional[2].in_features == conditional[2].out_features == 200
        assert all(m.negative_slope == 0.3 for m in conditional if isinstance(m, nn.LeakyReLU))
    assert not any(isinstance(m, nn.Tanh) for m in net.modules())
    with pytest.raises(ValueError, match="unknown model"):
        bench_discrete.make_sbn("3")


@pytest.mark.parametrize("name", list(bench_discrete.ESTIMATORS))
def test_every_estimator_trains_on_the_nonlinear_sbn(name: str, data: torch.Tensor) -> None:
    torch.manual_seed(0)
    initial = bench_discrete.make_sbn("nonlinear")
    pyro.set_rng_seed(0)
    contender = bench_discrete.Contender(name, initial, args())
    before = copy.deepcopy(contender.net.recognition.state_dict())
    with contender.slot.active():
        losses = [contender.svi.step(contender.batch(data, step)) for step in range(2)]
    assert all(math.isfinite(loss) for loss in losses)
    after = contender.net.recognition.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    pyro.clear_param_store()


def test_variance_study_moves_only_the_control_variates(data: torch.Tensor) -> None:
    torch.manual_seed(0)
    initial = bench_discrete.make_sbn("1")
    weights = copy.deepcopy(initial.state_dict())
    study = args(adapt_steps=3, adapt_lr=1e-2, draws=6, groups=3)
    cells = bench_discrete_variance.measure_point(["RLOO", "RODEO"], initial, weights, data,
                                                  study)
    for cell in cells.values():
        assert len(cell.groups) == 3 and cell.mean > 0 and cell.se > 0
    assert cells["RODEO"].evaluations == cells["RLOO"].evaluations == 2
    pyro.clear_param_store()


def test_rodeo_adapts_at_a_fixed_point(data: torch.Tensor) -> None:
    torch.manual_seed(0)
    initial = bench_discrete.make_sbn("1")
    weights = copy.deepcopy(initial.state_dict())
    contender = bench_discrete.Contender("RODEO", initial, args(lr=1e-2))
    assert not bench_discrete_variance.learns(contender)
    with contender.slot.active():
        for step in range(3):
            contender.svi.step(contender.batch(data, step))
            contender.net.load_state_dict(weights)
    assert bench_discrete_variance.learns(contender)
    state = contender.objective.control_variates.state_dict()  # type: ignore[attr-defined]
    assert any(k.endswith("alpha") and v.abs().item() > 0 for k, v in state.items())
    assert all(torch.equal(v, weights[k]) for k, v in contender.net.state_dict().items())
    pyro.clear_param_store()


def test_standard_errors_and_ratios() -> None:
    a = bench_discrete_variance.Cell("a", 2, [1.0, 2.0, 3.0])
    b = bench_discrete_variance.Cell("b", 2, [4.0, 4.0, 4.0 + 1e-9])
    assert a.mean == 2.0 and a.se == pytest.approx(math.sqrt(1.0 / 3.0))
    r, se = bench_discrete_variance.ratio(a, b)
    assert r == pytest.approx(0.5) and se == pytest.approx(0.5 * math.sqrt(1 / 12), rel=1e-6)
    assert bench_discrete_variance.compare(a, b).startswith("lower")
    assert bench_discrete_variance.compare(b, a).startswith("higher")

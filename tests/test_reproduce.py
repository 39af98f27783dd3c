"""benchmarks/reproduce_sbn.py: a run stopped at any point and started again with the same
command gives the same CSV and parameters, bit for bit, as a run that never stopped."""

from __future__ import annotations

import csv
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reproduce_sbn


class Crash(Exception):
    """A hard kill: no checkpoint is written at the step it happens."""


@pytest.fixture
def mnist(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    bits = {s: (rng.random((n, 784)) < 0.2).astype(np.uint8) for s, n in
            (("train", 120), ("valid", 30), ("test", 10))}
    path = tmp_path / "mini.npz"
    np.savez(path, train=np.packbits(bits["train"], axis=1),
             valid=np.packbits(bits["valid"], axis=1), test=np.packbits(bits["test"], axis=1))
    return path


def argv(data: Path, root: Path, objective: str) -> list[str]:
    return ["--objective", objective, "--data", str(data), "--steps", "12",
            "--out", str(root / "out"), "--checkpoint-dir", str(root / "ck"),
            "--checkpoint-every", "5", "--log-every", "3", "--train-eval-size", "48",
            "--iw-samples", "4", "--grad-draws", "3", "--eval-chunk", "16",
            "--device", "cpu"]


def rows(csv_path: Path) -> list[list[str]]:
    with open(csv_path, newline="") as f:
        table = list(csv.reader(f))
    wall = {"wall_s", "train_s"}  # the clock is the only column that may differ
    keep = [i for i, c in enumerate(table[0]) if c not in wall]
    return [[r[i] for i in keep] for r in table]


def params() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


@pytest.mark.parametrize("objective", ["nvil", "rloo"])
def test_resume_is_exact(mnist: Path, tmp_path: Path, objective: str) -> None:
    straight = tmp_path / "straight"
    csv_path = reproduce_sbn.train(reproduce_sbn.parse(argv(mnist, straight, objective)))
    expected, expected_params = rows(csv_path), params()
    assert [r[0] for r in expected] == ["step", "3", "6", "9", "12"]
    assert all(np.isfinite(float(v)) for r in expected[1:] for v in r)

    def crash_at(step: int) -> Callable[[reproduce_sbn.StepInfo], None]:
        def callback(info: reproduce_sbn.StepInfo) -> None:
            if info.step == step:
                raise Crash
        return callback

    stopped = tmp_path / "stopped"
    args = reproduce_sbn.parse(argv(mnist, stopped, objective))
    # killed at step 7: the checkpoint is at 5, the CSV has a row for 6 that is redone
    with pytest.raises(Crash):
        reproduce_sbn.train(args, callbacks=[crash_at(7)])
    assert [r[0] for r in rows(stopped / "out" / csv_path.name)][-1] == "6"
    # killed again at step 11 after resuming (checkpoint at 10)
    with pytest.raises(Crash):
        reproduce_sbn.train(args, callbacks=[crash_at(11)])
    resumed_csv = reproduce_sbn.train(args)
    assert rows(resumed_csv) == expected
    got = params()
    assert got.keys() == expected_params.keys()
    for name, value in expected_params.items():
        assert torch.equal(got[name], value), name


def test_sigterm_saves_and_resumes(mnist: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    csv_path = reproduce_sbn.train(reproduce_sbn.parse(argv(mnist, straight, "nvil")))
    expected, expected_params = rows(csv_path), params()

    def term_at(info: reproduce_sbn.StepInfo) -> None:
        if info.step == 8:
            signal.raise_signal(signal.SIGTERM)  # finishes step 8, saves, stops

    args = reproduce_sbn.parse(argv(mnist, tmp_path / "stopped", "nvil"))
    with pytest.raises(KeyboardInterrupt):
        reproduce_sbn.train(args, callbacks=[term_at])
    saved = reproduce_sbn.load_checkpoint(tmp_path / "stopped" / "ck" / csv_path.stem
                                          / "checkpoint.pt")
    assert saved["step"] == 8
    assert rows(reproduce_sbn.train(args)) == expected
    for name, value in expected_params.items():
        assert torch.equal(params()[name], value), name


def test_table_and_plot(mnist: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    base = argv(mnist, tmp_path, "nvil")
    reproduce_sbn.train(reproduce_sbn.parse(base))
    target = tmp_path / "table.md"
    reproduce_sbn.main([*base, "--table", "--plot", "--table-out", str(target)])
    text = target.read_text()
    assert "-112.5" in text and "| 12 |" in text and "0.0%" in text
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0


def test_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        reproduce_sbn.parse(["--steps", "0"])
    with pytest.raises(SystemExit):
        reproduce_sbn.parse(["--net", "nope"])


def test_resume_with_other_settings_is_refused(mnist: Path, tmp_path: Path) -> None:
    base = argv(mnist, tmp_path, "nvil")
    reproduce_sbn.train(reproduce_sbn.parse(base))
    with pytest.raises(SystemExit, match="lr"):
        reproduce_sbn.train(reproduce_sbn.parse([*base, "--lr", "0.01"]))
    # more steps (and another device or thread count) continue the same run
    csv_path = reproduce_sbn.train(reproduce_sbn.parse([*base, "--steps", "15"]))
    assert [r[0] for r in rows(csv_path)][-1] == "15"

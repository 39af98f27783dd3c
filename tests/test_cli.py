"""The main job: ``pyro-wakesleep compare`` on real data that ships with the install."""

import json
import subprocess
import sys

import numpy as np
import pytest

from pyro_wakesleep.examples.cli import main
from pyro_wakesleep.examples.compare import OBJECTIVES, compare, format_table
from pyro_wakesleep.examples.datasets import load_binarized_mnist, load_digits


def test_compare_runs_every_objective_and_writes_table_json_and_plot(tmp_path, capsys):
    code = main(["compare", "--steps", "30", "--particles", "2", "--grad-draws", "3",
                 "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    for name in OBJECTIVES:
        assert f"| {name} |" in printed
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert [r["objective"] for r in rows] == list(OBJECTIVES)
    for r in rows:
        assert len(r["train_elbo"]) == 30
        assert np.isfinite(r["test_elbo"]) and r["test_elbo"] < 0
        assert r["grad_variance"] > 0 and r["ms_per_step"] > 0
    assert (tmp_path / "compare.png").stat().st_size > 1000
    assert (tmp_path / "compare.md").read_text().startswith("| objective |")


def test_compare_training_improves_the_elbo():
    train, test = load_digits()
    before = compare(train, test, ["sf-loo"], steps=1, latent=(16,), progress=False,
                     grad_draws=2)[0]
    after = compare(train, test, ["sf-loo"], steps=300, latent=(16,), progress=False,
                    learning_rate=3e-3, grad_draws=2)[0]
    assert after.test_elbo > before.test_elbo + 3.0
    assert "sf-loo" in format_table([after])


def test_compare_rejects_bad_input():
    train, test = load_digits()
    with pytest.raises(ValueError, match="unknown objective.*'nope'"):
        compare(train, test, ["nope"])
    with pytest.raises(ValueError, match="steps >= 1"):
        compare(train, test, ["sf"], steps=0)
    with pytest.raises(ValueError, match="images"):
        compare(train, test[:, :10], ["sf"])


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert main(["compare", "--objectives", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown objective" in capsys.readouterr().err


def test_entry_point_is_installed():
    out = subprocess.run([sys.executable, "-m", "pyro_wakesleep.examples.cli", "compare", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--data" in out and "--particles" in out


def test_digits_and_mnist_loaders(tmp_path):
    split = load_digits(test_fraction=0.25)
    assert split.train.shape[1] == 64 and len(split.train) + len(split.test) == 1797
    assert set(split.train.unique().tolist()) == {0.0, 1.0}
    images = (np.random.default_rng(0).random((5, 784)) < 0.2).astype(np.uint8)
    packed = np.packbits(images, axis=1)
    np.savez(tmp_path / "m.npz", train=packed, valid=packed, test=packed)
    loaded = load_binarized_mnist(tmp_path / "m.npz", "valid")
    assert loaded.shape == (5, 784) and np.array_equal(loaded.numpy(), images)
    with pytest.raises(ValueError, match="split"):
        load_binarized_mnist(tmp_path / "m.npz", "nope")
    with pytest.raises(FileNotFoundError):
        load_binarized_mnist(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.5)

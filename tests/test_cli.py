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


def _run_or_skip(argv, capsys):
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    code = main(argv)
    captured = capsys.readouterr()
    if code == 3 and "could not start" in captured.err:
        pytest.skip(f"torch.distributed cannot start here: {captured.err}")
    return code, captured


def test_compare_data_parallel_on_two_processes(tmp_path, capsys):
    code, captured = _run_or_skip(
        ["compare", "--devices", "2", "--steps", "4", "--particles", "2", "--grad-draws", "2",
         "--batch-size", "8", "--objectives", "sf-nvil", "vimco", "--no-progress",
         "--out", str(tmp_path)], capsys)
    assert code == 0, captured.err
    assert "data-parallel on 2 processes, 4 images each" in captured.out
    assert "| sf-nvil |" in captured.out and "| vimco |" in captured.out
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert [r["objective"] for r in rows] == ["sf-nvil", "vimco"]
    for r in rows:
        assert len(r["train_elbo"]) == 4 and np.isfinite(r["test_elbo"])


def test_compare_data_parallel_rejects_bad_input(tmp_path, capsys):
    from pyro_wakesleep.examples.parallel import compare_data_parallel, data_parallel_objectives

    assert "pyro-tracegraph" not in data_parallel_objectives()
    assert set(data_parallel_objectives()) == set(OBJECTIVES) - {"pyro-tracegraph"}
    base = ["compare", "--devices", "2", "--steps", "2", "--out", str(tmp_path)]
    assert main([*base, "--objectives", "pyro-tracegraph"]) == 2
    assert "no differentiable_loss" in capsys.readouterr().err
    assert main([*base, "--batch-size", "5", "--objectives", "sf"]) == 2
    assert "batch_size=5 must be a multiple of devices=2" in capsys.readouterr().err
    assert main([*base, "--devices", "0"]) == 2
    train, test = load_digits()
    with pytest.raises(ValueError, match="devices must be an int >= 2, got 1"):
        compare_data_parallel(train, test, ["sf"], devices=1)
    with pytest.raises(ValueError, match="backend must be"):
        compare_data_parallel(train, test, ["sf"], backend="mpi")
    with pytest.raises(TypeError):
        compare_data_parallel(train, test, ["sf"], no_such_option=1)


def test_compare_jit_trains_the_same_curves(tmp_path, capsys):
    train, test = load_digits()
    runs = [compare(train, test, ["sf-nvil", "vimco", "ws"], steps=20, latent=(16,),
                    progress=False, grad_draws=2, jit=jit) for jit in (False, True)]
    for eager, compiled in zip(*runs, strict=True):
        assert compiled.objective == eager.objective
        np.testing.assert_allclose(compiled.train_elbo, eager.train_elbo, rtol=1e-6)
        assert compiled.test_elbo == pytest.approx(eager.test_elbo, rel=1e-6)
    code = main(["compare", "--jit", "--steps", "5", "--objectives", "sf", "rebar",
                 "--grad-draws", "2", "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    assert "compiled steps (--jit)" in capsys.readouterr().out

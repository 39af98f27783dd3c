"""The main job: ``pyro-wakesleep compare`` on real data that ships with the install
(issue 23: interleaved timing, time budgets, settings in compare.json, defaults in --help)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pyro_wakesleep.examples.cli import FULL, _parser, main
from pyro_wakesleep.examples.compare import compare, format_table
from pyro_wakesleep.examples.contenders import (
    DEFAULT_OBJECTIVES,
    OBJECTIVES,
    data_parallel_objectives,
)
from pyro_wakesleep.examples.datasets import load_binarized_mnist, load_digits

QUICK = ["--seconds", "0", "--rounds", "2", "--evaluations", "1", "--particles", "2",
         "--grad-draws", "3", "--eval-particles", "3", "--heldout", "20", "--no-progress"]


def test_compare_runs_every_objective_and_writes_table_json_and_plot(tmp_path, capsys):
    code = main(["compare", "--steps", "6", *QUICK, "--objectives", *OBJECTIVES,
                 "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "binarized MNIST subset (shipped)" in printed
    for name in OBJECTIVES:
        assert f"| {name} |" in printed
    saved = json.loads((tmp_path / "compare.json").read_text())
    settings, rows = saved["settings"], saved["results"]
    assert [r["objective"] for r in rows] == list(OBJECTIVES)
    for key in ("data", "steps", "seconds", "learning_rate", "seed", "threads", "batch_size",
                "num_particles", "objectives", "wall_seconds"):
        assert key in settings, key
    assert settings["steps"] == 6 and settings["threads"] == 1
    assert settings["seeds"]["initial weights"] == settings["seed"] == 0
    assert set(settings["versions"]) == {"python", "torch", "pyro", "pyro_wakesleep"}
    assert {"processor", "cpu_count"} <= set(settings["machine"])
    for r in rows:
        assert r["steps"] == len(r["train_curve"]) == len(r["train_seconds"]) == 6
        assert r["train_seconds"] == sorted(r["train_seconds"])
        assert r["seconds"] == pytest.approx(r["train_seconds"][-1])
        assert np.isfinite(r["test_bound"]) and r["test_bound"] < 0
        assert r["grad_variance"] > 0 and r["ms_per_step"] > 0
        assert [m["step"] for m in r["checkpoints"]] == [0, 6]
        assert r["checkpoints"][-1]["test_bound"] == r["test_bound"]
    # every objective starts from the same weights: the same held-out bound at step 0
    assert len({r["checkpoints"][0]["test_bound"] for r in rows}) == 1
    assert (tmp_path / "compare.png").stat().st_size > 1000
    assert (tmp_path / "compare.md").read_text().startswith("| objective |")


def test_the_progress_bar_and_the_table_speak_nats_per_image(tmp_path, capsys):
    assert main(["compare", "--data", "digits", "--steps", "4",
                 *[a for a in QUICK if a != "--no-progress"], "--objectives", "sf", "vimco",
                 "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "train bound" in captured.err and "nats/image" in captured.err  # tqdm: stderr
    assert "nats per image" in captured.out
    row = json.loads((tmp_path / "compare.json").read_text())["results"][0]
    shown = float(captured.out.split("| sf | ")[1].split(" |")[0])
    assert shown == pytest.approx(row["train_bound"], abs=0.01)
    assert -200 < row["train_curve"][0] < 0  # per image on 64 pixels, not a batch sum


def test_compare_training_improves_the_bounds():
    train, test = load_digits()
    options = dict(latent=(16,), progress=False, grad_draws=2, eval_particles=5, seconds=0,
                   rounds=1, evaluations=1)
    before = compare(train, test, ["sf-loo"], steps=1, **options)[0]
    after = compare(train, test, ["sf-loo"], steps=300, learning_rate=3e-3, **options)[0]
    assert after.test_bound > before.test_bound + 3.0
    assert after.train_bound > before.train_bound + 3.0
    assert "sf-loo" in format_table([after])


def test_interleaved_objectives_keep_their_own_draws():
    """Interleaving changes no objective's batches or draws: a run alone and a run beside
    others (in another order) train the same curve."""
    train, test = load_digits()
    options = dict(latent=(8,), progress=False, grad_draws=2, eval_particles=2, seconds=0,
                   steps=12, rounds=3, evaluations=1)
    alone = compare(train, test, ["sf-loo"], **options)[0]
    beside = compare(train, test, ["vimco", "sf", "sf-loo"], **options)[2]
    assert beside.objective == "sf-loo"
    np.testing.assert_allclose(beside.train_curve, alone.train_curve, rtol=1e-6)


def test_a_time_budget_stops_training():
    train, test = load_digits()
    (result,) = compare(train, test, ["sf"], seconds=0.3, rounds=3, evaluations=1,
                        latent=(8,), progress=False, grad_draws=2, eval_particles=2)
    assert 0.3 <= result.seconds < 0.3 + 10 * max(result.ms_per_step / 1e3, 0.05)
    assert [m["seconds"] for m in result.checkpoints] == [0.0, result.seconds]


def test_compare_rejects_bad_input():
    train, test = load_digits()
    with pytest.raises(ValueError, match="unknown objective.*'nope'"):
        compare(train, test, ["nope"])
    with pytest.raises(ValueError, match="not both 0"):
        compare(train, test, ["sf"], steps=0, seconds=0)
    with pytest.raises(ValueError, match="evaluations <= rounds"):
        compare(train, test, ["sf"], rounds=2, evaluations=3)
    with pytest.raises(ValueError, match="images"):
        compare(train, test[:, :10], ["sf"])


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert main(["compare", "--objectives", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown objective" in capsys.readouterr().err


def test_cli_reports_bad_data_without_traceback(tmp_path, capsys):
    assert main(["compare", "--data", str(tmp_path / "missing.npz")]) == 2
    assert "not found" in capsys.readouterr().err


def test_entry_point_is_installed_and_help_shows_every_default():
    out = subprocess.run([sys.executable, "-m", "pyro_wakesleep.examples.cli", "compare", "--help"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "400"}).stdout  # no hyphen breaks
    assert "--data" in out and "--particles" in out
    flat = " ".join(out.split())
    for default in ("(default: mnist-subset)", "(default: 20.0)", "(default: 0)",
                    "(default: 0.001)", "(default: 24)", "(default: 4)", "(default: 1)",
                    "(default: runs/compare)", "(default: False)"):
        assert default in flat, default
    options = [w for w in flat.split() if w.startswith("--") and w != "--help"]
    assert flat.count("(default:") >= len(set(options)) - 1, flat  # each but --help


def test_full_is_one_flag_away_and_explicit_options_win():
    args = _parser(full=True).parse_args(["compare", "--full"])
    assert args.seconds == FULL["seconds"] == 120 and args.objectives == list(OBJECTIVES)
    args = _parser(full=True).parse_args(["compare", "--full", "--seconds", "3",
                                          "--objectives", "sf"])
    assert args.seconds == 3 and args.objectives == ["sf"]
    args = _parser().parse_args(["compare"])
    assert args.seconds == 20 and args.objectives == list(DEFAULT_OBJECTIVES)


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
        ["compare", "--devices", "2", "--steps", "4", *QUICK, "--batch-size", "8",
         "--latent", "16", "--objectives", "sf-nvil", "vimco", "--out", str(tmp_path)], capsys)
    assert code == 0, captured.err
    assert "data-parallel on 2 processes, 4 images each" in captured.out
    assert "| sf-nvil |" in captured.out and "| vimco |" in captured.out
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["settings"]["devices"] == 2
    rows = saved["results"]
    assert [r["objective"] for r in rows] == ["sf-nvil", "vimco"]
    for r in rows:
        assert len(r["train_curve"]) == 4 and np.isfinite(r["test_bound"])


def test_compare_data_parallel_rejects_bad_input(tmp_path, capsys):
    from pyro_wakesleep.examples.parallel import compare_data_parallel

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
    runs = [compare(train, test, ["sf-nvil", "vimco", "ws"], steps=20, seconds=0, rounds=2,
                    evaluations=1, latent=(16,), progress=False, grad_draws=2,
                    eval_particles=5, jit=jit) for jit in (False, True)]
    for eager, compiled in zip(*runs, strict=True):
        assert compiled.objective == eager.objective
        np.testing.assert_allclose(compiled.train_curve, eager.train_curve, rtol=1e-6)
        assert compiled.test_bound == pytest.approx(eager.test_bound, rel=1e-6)
    code = main(["compare", "--jit", "--steps", "5", *QUICK, "--data", "digits",
                 "--objectives", "sf", "rebar", "--out", str(tmp_path)])
    assert code == 0
    assert "compiled steps (--jit)" in capsys.readouterr().out

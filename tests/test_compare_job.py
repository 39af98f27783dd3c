"""The main job's parts (issue 23): the shipped MNIST subset (and that the wheel carries
it), the examples' import graph, the figure's styles, the held-out bound."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_wakesleep.examples.compare import heldout_bound
from pyro_wakesleep.examples.contenders import DEFAULT_OBJECTIVES, OBJECTIVES
from pyro_wakesleep.examples.datasets import (
    MNIST_SUBSET,
    load_binarized_mnist,
    load_mnist_subset,
    pack_mnist_subset,
)
from pyro_wakesleep.examples.figure import PALETTE, style
from pyro_wakesleep.examples.models import SigmoidBeliefNet
from pyro_wakesleep.objectives import ScoreFunctionELBO

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "pyro_wakesleep" / "examples"
FULL_MNIST = ROOT.parent / "shared" / "data" / "binarized_mnist.npz"


def test_the_shipped_subset_is_small_binary_mnist():
    path = EXAMPLES / "data" / MNIST_SUBSET
    assert path.stat().st_size < 1_000_000
    train, test = load_mnist_subset()
    assert train.shape == (8000, 784) and test.shape == (500, 784)
    assert train.dtype == torch.float32 and set(train.unique().tolist()) == {0.0, 1.0}
    assert 0.12 < train.mean().item() < 0.14  # MNIST's mean pixel, 0.131


@pytest.mark.skipif(not FULL_MNIST.exists(), reason="the full binarized MNIST is not here")
def test_the_shipped_subset_is_rows_of_the_standard_split(tmp_path):
    with np.load(EXAMPLES / "data" / MNIST_SUBSET) as archive:
        train_index, test_index = archive["train_index"], archive["test_index"]
    train, test = load_mnist_subset()
    assert torch.equal(train, load_binarized_mnist(FULL_MNIST, "train")[train_index])
    assert torch.equal(test, load_binarized_mnist(FULL_MNIST, "test")[test_index])
    pack_mnist_subset(FULL_MNIST, tmp_path / "again.npz")  # reproducible, same defaults
    with np.load(tmp_path / "again.npz") as a, np.load(EXAMPLES / "data" / MNIST_SUBSET) as b:
        for key in b.files:
            assert np.array_equal(a[key], b[key]), key


def test_pack_mnist_subset_checks_its_input(tmp_path):
    packed = np.packbits(np.zeros((5, 784), np.uint8), axis=1)
    np.savez(tmp_path / "m.npz", train=packed, test=packed)
    with pytest.raises(ValueError, match="num_train must lie in"):
        pack_mnist_subset(tmp_path / "m.npz", tmp_path / "out.npz", num_train=6)
    np.savez(tmp_path / "bad.npz", train=packed[:, :50], test=packed)
    with pytest.raises(ValueError, match=r"\(n, 98\)"):
        pack_mnist_subset(tmp_path / "bad.npz", tmp_path / "out.npz", num_train=2)


@pytest.mark.skipif(importlib.util.find_spec("hatchling") is None, reason="needs hatchling")
def test_the_wheel_carries_the_subset(tmp_path):
    subprocess.run([sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d",
                    str(tmp_path)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert f"pyro_wakesleep/examples/data/{MNIST_SUBSET}" in names
        data = archive.read(f"pyro_wakesleep/examples/data/{MNIST_SUBSET}")
    assert data == (EXAMPLES / "data" / MNIST_SUBSET).read_bytes()


def _imports(path: Path) -> set[str]:
    """The pyro_wakesleep.examples modules that ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "pyro_wakesleep.examples":
                found |= {f"{node.module}.{a.name}" for a in node.names}
            elif node.module.startswith("pyro_wakesleep.examples."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pyro_wakesleep.examples.")}
    return found


def test_the_examples_import_no_cycle():
    graph = {f"pyro_wakesleep.examples.{p.stem}": _imports(p) for p in EXAMPLES.glob("*.py")
             if p.stem != "__init__"}
    assert "pyro_wakesleep.examples.compare" in graph["pyro_wakesleep.examples.parallel"]
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*path, module])}")
        if state.get(module) == 2:
            return
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            visit(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])


def test_every_objective_has_its_own_look_in_a_colour_blind_safe_palette():
    looks = [style(name) for name in OBJECTIVES]
    assert len({(s["color"], s["linestyle"]) for s in looks}) == len(OBJECTIVES)
    assert len({style(name)["color"] for name in DEFAULT_OBJECTIVES}) >= 7
    assert all(s["color"] in PALETTE for s in looks)
    assert style("sf") == style("sf")  # the same in every run
    assert style("my-objective")["color"] in PALETTE


def test_heldout_bound_is_a_seeded_importance_weighted_bound():
    torch.manual_seed(0)
    net = SigmoidBeliefNet((12, 4))
    x = torch.bernoulli(torch.full((30, 12), 0.3))
    state = torch.get_rng_state()
    one = heldout_bound(net, x, num_particles=200, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream untouched
    assert one == heldout_bound(net, x, num_particles=200, seed=1)
    torch.manual_seed(2)
    elbo = -ScoreFunctionELBO(200, max_plate_nesting=1).loss(net.model, net.guide, x) / 30
    assert one > elbo  # tighter than the ELBO

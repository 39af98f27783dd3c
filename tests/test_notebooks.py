"""Executes every tutorial notebook top to bottom in smoke mode with a real Jupyter kernel.

Each notebook reads ``PYRO_WAKESLEEP_SMOKE``; with ``1`` it runs few steps and draws, so
this checks that the code runs, not the numbers. A cell that raises fails the test, with
the cell's traceback in the message.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))
CELL_TIMEOUT_S = 600
#: notebooks that start torch.distributed (gloo) processes: skipped where gloo cannot start
NEEDS_GLOO = {"06_data_parallel"}


@functools.cache
def _gloo_error() -> str | None:
    """Why a one-process gloo group cannot start here (``None`` if it can)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    probe = ("import torch.distributed as d; d.init_process_group('gloo', "
             f"init_method='tcp://127.0.0.1:{port}', rank=0, world_size=1); "
             "d.destroy_process_group()")
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return "a one-process gloo group did not start within 120 s"
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]


def test_tutorials_exist() -> None:
    assert NOTEBOOKS, f"no notebooks found in {ROOT / 'tutorials'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits this process's environment. jupyter_client starts the
    # "python3" kernel with this interpreter (sys.executable), so it sees this
    # environment's packages; the repository goes first on its path.
    if path.stem in NEEDS_GLOO and _gloo_error() is not None:
        pytest.skip(f"{path.name} needs torch.distributed (gloo): {_gloo_error()}")
    monkeypatch.setenv("PYRO_WAKESLEEP_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name} failed in smoke mode:\n{error}", pytrace=False)
    errors = [
        f"{output.get('ename')}: {output.get('evalue')}"
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, f"{path.name}: error outputs {errors}"
    print(f"{path.name}: {time.perf_counter() - start:.1f} s in smoke mode")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_executed(path: Path) -> None:
    """Notebooks are committed as run top to bottom (fully, not in smoke mode), so the
    rendered docs show real outputs."""
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code" and cell.source.strip()]
    counts = [cell.get("execution_count") for cell in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: execution counts {counts}; run it top to bottom in a fresh kernel "
        "and save it with its outputs"
    )
    for cell in code:
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", f"{path.name}: saved with an error"
            text = output.get("text", "") if output.get("output_type") == "stream" else ""
            assert "smoke mode: True" not in text, f"{path.name}: saved from a smoke run"

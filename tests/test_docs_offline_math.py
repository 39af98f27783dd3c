"""The docs render math offline: docs/conf.py loads MathJax from the build's own
_static/mathjax (sphinx-mathjax-offline), never from a CDN. Checked on a one-page build
with the math settings of docs/conf.py (the full build is tests/test_docs.py's)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _conf_values(*names: str) -> dict:
    tree = ast.parse((ROOT / "docs" / "conf.py").read_text())
    values = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id in names:
            values[target.id] = ast.literal_eval(node.value)
    return values


def test_math_is_rendered_from_a_local_mathjax(tmp_path: Path) -> None:
    pytest.importorskip("sphinx")
    conf = _conf_values("extensions", "mathjax_path")
    assert "sphinx-mathjax-offline" in conf["extensions"]
    assert "://" not in conf["mathjax_path"] and not conf["mathjax_path"].startswith("/")
    src = tmp_path / "src"
    src.mkdir()
    extensions = [e for e in conf["extensions"] if "mathjax" in e]
    (src / "conf.py").write_text(f"extensions = {extensions!r}\n"
                                 f"mathjax_path = {conf['mathjax_path']!r}\n")
    (src / "index.rst").write_text("Math\n====\n\n.. math::\n\n   e^{i\\pi} + 1 = 0\n")
    out = tmp_path / "html"
    result = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html",
                             str(src), str(out)], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    page = (out / "index.html").read_text()
    assert f'src="_static/{conf["mathjax_path"]}"' in page, page[:3000]
    assert "cdn.jsdelivr" not in page and "mathjax@" not in page.lower()
    script = out / "_static" / conf["mathjax_path"]
    assert script.stat().st_size > 100_000  # MathJax itself, not a stub

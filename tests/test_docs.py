"""The documentation builds with warnings as errors, and documents every public name.

The build is the one CI runs (``sphinx-build -W --keep-going -b html docs OUT``), into a
temporary folder. "Public" means every name in the ``__all__`` of ``pyro_wakesleep`` and
of each of its public submodules (no ``_``-prefixed path component); a name counts as
documented when the API reference (the pages under ``docs/api/``) has an entry for it
under any module that exports it, or under its defining module.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import pyro_wakesleep

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGE = "pyro_wakesleep"


class Build:
    def __init__(self, returncode: int, output: str, html: Path, seconds: float) -> None:
        self.returncode, self.output, self.html, self.seconds = returncode, output, html, seconds

    def problems(self) -> str:
        lines = [ln for ln in self.output.splitlines() if "WARNING" in ln or "ERROR" in ln]
        return "\n".join(lines) or self.output[-4000:]


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    out = tmp_path_factory.mktemp("docs")
    command = [
        sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
        "-d", str(out / "doctrees"), str(DOCS), str(out / "html"),
    ]
    start = time.perf_counter()
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    return Build(
        result.returncode, result.stdout + result.stderr, out / "html",
        time.perf_counter() - start,
    )


def test_docs_build_with_warnings_as_errors(build: Build) -> None:
    assert build.returncode == 0, f"sphinx-build -W failed:\n{build.problems()}"
    assert (build.html / "index.html").is_file()
    print(f"docs built in {build.seconds:.1f} s")


def test_every_tutorial_is_rendered(build: Build) -> None:
    for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
        page = build.html / "tutorials" / f"{notebook.stem}.html"
        assert page.is_file(), f"{notebook.name} has no page in the docs ({page})"


def read_inventory(path: Path) -> dict[str, str]:
    """Python-domain entries of a Sphinx ``objects.inv``: full name -> page URI."""
    with path.open("rb") as stream:
        for _ in range(4):  # "# Sphinx inventory version 2", project, version, zlib note
            stream.readline()
        body = zlib.decompress(stream.read()).decode("utf-8")
    entries = {}
    line_re = re.compile(r"(?x)(.+?)\s+(\S+?:\S+)\s+(-?\d+)\s+(\S*)\s+(.*)")
    for line in body.splitlines():
        match = line_re.match(line.rstrip())
        if match and match.group(2).startswith("py:"):
            name, uri = match.group(1), match.group(4)
            entries[name] = uri.replace("$", name)
    return entries


def public_modules() -> list[ModuleType]:
    names = [PACKAGE]
    for info in pkgutil.walk_packages(pyro_wakesleep.__path__, prefix=f"{PACKAGE}."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return [importlib.import_module(n) for n in sorted(names)]


def _shared(obj: Any) -> bool:
    """Whether re-exports of ``obj`` are the same object (classes, functions, modules)."""
    return inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj)


def exported_names() -> dict[str, set[str]]:
    """``"module.name"`` for every public name -> every full name it may be documented
    under (each module exporting the same object, and its defining module)."""
    modules = public_modules()
    aliases: dict[int, set[str]] = defaultdict(set)
    for module in modules:
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if _shared(obj):
                aliases[id(obj)].add(f"{module.__name__}.{name}")
                aliases[id(obj)].add(f"{obj.__module__}.{obj.__qualname__}")
    exported = {}
    for module in modules:
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            full = f"{module.__name__}.{name}"
            exported[full] = aliases[id(obj)] if _shared(obj) else {full}
    return exported


def test_every_public_name_is_in_the_api_reference(build: Build) -> None:
    inventory_path = build.html / "objects.inv"
    assert inventory_path.is_file(), f"no objects.inv:\n{build.problems()}"
    inventory = read_inventory(inventory_path)
    api = {name for name, uri in inventory.items() if uri.startswith("api/")}
    exported = exported_names()
    assert f"{PACKAGE}.ScoreFunctionELBO" in exported  # the walk found the package
    missing = sorted(full for full, names in exported.items() if not names & api)
    assert not missing, (
        "public names missing from the API reference (docs/api/): "
        + ", ".join(missing)
        + "\nadd the module to a page under docs/api/ (see docs/api/index.rst)"
    )


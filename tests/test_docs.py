"""The documentation builds with warnings as errors, and documents every public name once.

The build is the one CI runs (``sphinx-build -W --keep-going -b html docs OUT``), into a
temporary folder; it takes about 20 s on two CPU cores (notebooks are rendered, not
executed). "Public" means every name in the ``__all__`` of ``pyro_wakesleep`` and of each
of its public submodules (no ``_``-prefixed path component), found here by walking the
package, independently of ``docs/conf.py``. What the docs document is read from the built
``objects.inv``: a name is documented at a path when the inventory has an entry for that
path whose anchor is the path itself (entries for other paths of the same object, such as
the ``:canonical:`` aliases autodoc adds for classes, point at the documented one).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sphinx.util.inventory import InventoryFile

import pyro_wakesleep

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGE = "pyro_wakesleep"


@dataclass
class Build:
    returncode: int
    output: str
    html: Path
    seconds: float

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


# -- what the package exports, and what the built docs document ----------------------------
def public_modules() -> list[ModuleType]:
    names = [PACKAGE]
    for info in pkgutil.walk_packages(pyro_wakesleep.__path__, prefix=f"{PACKAGE}."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return [importlib.import_module(n) for n in sorted(names)]


def _shared(obj: Any) -> bool:
    """Whether re-exports of ``obj`` are the same object (classes, functions, modules)."""
    return inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj)


def exported_names(modules: list[ModuleType]) -> dict[str, set[str]]:
    """``"module.name"`` for every name in the modules' ``__all__`` -> every full name the
    object may be documented under (each public module exporting the same object)."""
    aliases: dict[int, set[str]] = defaultdict(set)
    for module in modules:
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if _shared(obj):
                aliases[id(obj)].add(f"{module.__name__}.{name}")
    exported = {}
    for module in modules:
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            full = f"{module.__name__}.{name}"
            exported[full] = aliases[id(obj)] if _shared(obj) else {full}
    return exported


def documented_paths(inventory: Path) -> set[str]:
    """Python objects that the API reference documents (each at its own anchor)."""
    data = InventoryFile.loads(inventory.read_bytes(), uri="").data
    return {
        name
        for kind, entries in data.items()
        if kind.startswith("py:")
        for name, item in entries.items()
        if item.uri.startswith("api/") and item.uri.endswith(f"#{name}")
    }


def coverage(exported: dict[str, set[str]], documented: set[str]) -> dict[str, list[str]]:
    """Public names documented nowhere (``missing``) and objects documented at more than
    one path (``duplicated``)."""
    missing = sorted(full for full, paths in exported.items() if not paths & documented)
    duplicated = sorted(
        {", ".join(sorted(paths & documented)) for paths in exported.values()
         if len(paths & documented) > 1}
    )
    return {"missing": missing, "duplicated": duplicated}


# -- tests ---------------------------------------------------------------------------------
def test_docs_build_with_warnings_as_errors(build: Build) -> None:
    assert build.returncode == 0, f"sphinx-build -W failed:\n{build.problems()}"
    assert (build.html / "index.html").is_file()
    print(f"docs built in {build.seconds:.1f} s")


def test_every_tutorial_is_rendered(build: Build) -> None:
    for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
        page = build.html / "tutorials" / f"{notebook.stem}.html"
        assert page.is_file(), f"{notebook.name} has no page in the docs ({page})"


def test_every_public_name_is_documented_once(build: Build) -> None:
    inventory = build.html / "objects.inv"
    assert inventory.is_file(), f"no objects.inv:\n{build.problems()}"
    exported = exported_names(public_modules())
    assert f"{PACKAGE}.ScoreFunctionELBO" in exported  # the walk found the package
    result = coverage(exported, documented_paths(inventory))
    assert not result["missing"], (
        "public names missing from the API reference: " + ", ".join(result["missing"])
    )
    assert not result["duplicated"], (
        "objects documented at several paths: " + "; ".join(result["duplicated"])
    )


def test_the_coverage_check_reports_what_is_absent_or_doubled(build: Build) -> None:
    """The check above can fail: against the real build, a name no page documents, a
    documented name taken out, and a second documented path are each reported."""
    documented = documented_paths(build.html / "objects.inv")
    extra = ModuleType(f"{PACKAGE}.not_in_the_docs")
    extra.__all__ = ["undocumented_function"]  # type: ignore[attr-defined]
    extra.undocumented_function = lambda: None  # type: ignore[attr-defined]
    exported = exported_names([*public_modules(), extra])
    result = coverage(exported, documented)
    assert result["missing"] == [f"{PACKAGE}.not_in_the_docs.undocumented_function"]

    (target,) = exported[f"{PACKAGE}.ScoreFunctionELBO"] & documented
    assert f"{PACKAGE}.ScoreFunctionELBO" in coverage(exported, documented - {target})[
        "missing"
    ]
    doubled = coverage(exported, documented | exported[f"{PACKAGE}.ScoreFunctionELBO"])
    assert doubled["duplicated"], "a second documented path went unreported"


def test_references_to_other_projects_link_offline(build: Build) -> None:
    """intersphinx falls back to the inventories shipped in docs/api/_inventories."""
    pages = "".join(p.read_text(encoding="utf-8") for p in (build.html / "api").rglob("*.html"))
    for url in (
        "https://docs.pytorch.org/docs/stable/tensors.html#torch.Tensor",
        "https://docs.python.org/3/library/functions.html#int",
    ):
        assert f'href="{url}"' in pages, f"no link to {url} in the API reference"

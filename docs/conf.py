"""Sphinx configuration for pyro_wakesleep.

Build (warnings are errors, as in CI's ``tests/test_docs.py``)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Three pieces of this file keep the documentation in step with the code without
hand-editing:

* **API fallback** (``.. pyro-wakesleep-api-fallback::`` at the end of
  ``api/index.rst``): every name in the ``__all__`` of every public module that no page
  under ``api/`` documents (by ``automodule``/``autoclass``/``autofunction``/``autodata``)
  is documented there, under its module. New modules therefore appear in the reference
  as soon as they exist; give a module a page of its own (``docs/api/<name>.rst``) to
  control its place and introduction, and the fallback drops it.
* **Optional pages** (:data:`OPTIONAL_PAGES`): narrative pages about a module that may not
  exist yet are left out of the build until it does.
* **Benchmark tables**: ``benchmarks.md`` pulls in every ``docs/benchmarks/*.md`` at the
  marker line, so the page never fails for a table that has not been written yet.

Notebooks in ``tutorials/`` (reached through the symlink ``docs/tutorials``) are
rendered by MyST-NB with the outputs they were committed with; they are never executed
here (``tests/test_notebooks.py`` executes them).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import posixpath
import re
import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import pyro_wakesleep  # noqa: E402

PACKAGE = "pyro_wakesleep"

# -- project -------------------------------------------------------------------------------
project = "pyro_wakesleep"
author = "pyro_wakesleep developers"
copyright = "pyro_wakesleep developers"
release = pyro_wakesleep.__version__
version = ".".join(release.split(".")[:2])

# -- general -------------------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = [
    "_build",
    "**.ipynb_checkpoints",
    "requirements.txt",
    # tables included into benchmarks.md, not pages of their own
    "benchmarks/**",
    # only the notebooks of tutorials/ are pages
    "tutorials/*.md",
    "tutorials/*.rst",
    "tutorials/*.txt",
    "tutorials/**/*.md",
]
pygments_style = "sphinx"
add_module_names = False

# -- autodoc -------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

# -- MyST / MyST-NB ------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # render the outputs committed with each notebook
nb_output_stderr = "show"

# -- HTML ----------------------------------------------------------------------------------
html_theme = "sphinx_rtd_theme"
html_title = f"pyro_wakesleep {release}"
html_show_sourcelink = True

# -- narrative pages about modules that may not exist yet ----------------------------------
#: page (docname) -> module it describes; the page is built only once the module exists.
#: Add an entry when writing a page ahead of its module.
OPTIONAL_PAGES: dict[str, str] = {
    "objectives/wake_sleep": "pyro_wakesleep.objectives.wake_sleep",
    "objectives/vimco": "pyro_wakesleep.objectives.vimco",
    "objectives/disarm": "pyro_wakesleep.objectives.disarm",
}


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


#: optional pages whose module does not exist (yet): excluded, and their toctree entries
#: removed (see :func:`_drop_missing_pages`)
MISSING_PAGES = sorted(
    page for page, module in OPTIONAL_PAGES.items() if not _module_exists(module)
)
exclude_patterns += [f"{page}.rst" for page in MISSING_PAGES]


def _drop_missing_pages(app: Sphinx, docname: str, source: list[str]) -> None:
    """Removes toctree entries (a line holding just the page name, relative or absolute)
    that point at a page of :data:`MISSING_PAGES`."""
    here = posixpath.dirname(docname)
    for page in MISSING_PAGES:
        names = {posixpath.relpath(page, here or "."), "/" + page}
        pattern = "|".join(re.escape(n) for n in names)
        source[0] = re.sub(rf"^[ \t]+(?:{pattern})[ \t]*\n", "", source[0], flags=re.MULTILINE)


# -- API coverage: public modules and what the api/ pages document -------------------------
def public_modules() -> list[str]:
    """Every importable module of the package with no ``_``-prefixed path component."""
    names = [PACKAGE]
    for info in pkgutil.walk_packages(pyro_wakesleep.__path__, prefix=PACKAGE + "."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def _key(module: str, name: str, obj: Any) -> Any:
    """Identity of an exported object: the object itself for classes, functions and
    modules (re-exports share it), the qualified name for plain values (whose identity
    may be shared by accident, as for small ints)."""
    if inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj):
        return ("object", id(obj))
    return ("name", f"{module}.{name}")


_DIRECTIVE = re.compile(
    r"^\s*\.\.\s+(automodule|autoclass|autofunction|autodata|autoexception)::\s*(\S+)",
    re.MULTILINE,
)


def _resolve(path: str) -> tuple[str, str, Any] | None:
    """``'a.b.C'`` -> ``('a.b', 'C', C)`` for the longest importable module prefix."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        if obj is not None:
            return module_name, ".".join(parts[cut:]), obj
    return None


def documented(api_dir: Path = DOCS / "api") -> dict[Any, str]:
    """Key (see :func:`_key`) -> documented dotted path, for every object that the
    hand-written ``api/*.rst`` pages document: ``automodule`` documents its module's
    ``__all__`` (use it without a member list), ``autoclass`` etc. their target."""
    found: dict[Any, str] = {}
    for page in sorted(api_dir.glob("*.rst")):
        for kind, target in _DIRECTIVE.findall(page.read_text(encoding="utf-8")):
            if kind == "automodule":
                module = importlib.import_module(target)
                for name in getattr(module, "__all__", ()):
                    found.setdefault(_key(target, name, getattr(module, name)),
                                     f"{target}.{name}")
            else:
                resolved = _resolve(target)
                if resolved is not None:
                    found.setdefault(_key(*resolved), target)
    return found


def undocumented(found: dict[Any, str] | None = None) -> dict[str, list[str]]:
    """Module -> names in its ``__all__`` that no ``api/`` page documents. Adds them
    to ``found`` (as documented by the fallback) when given."""
    found = documented() if found is None else found
    missing: dict[str, list[str]] = {}
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        names = []
        for n in getattr(module, "__all__", ()):
            key = _key(module_name, n, getattr(module, n))
            if key not in found:  # a name re-exported by several modules is listed once
                found[key] = f"{module_name}.{n}"
                names.append(n)
        if names:
            missing[module_name] = names
    return missing


def _note_api_pages(directive: SphinxDirective) -> None:
    for page in sorted((DOCS / "api").glob("*.rst")):
        directive.env.note_dependency(str(page))


class PackageExports(SphinxDirective):
    """A bullet list linking each name of the package's ``__all__`` to where it is
    documented."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        _note_api_pages(self)
        found = documented()
        undocumented(found)
        lines = []
        for name in pyro_wakesleep.__all__:
            key = _key(PACKAGE, name, getattr(pyro_wakesleep, name))
            lines.append(f"* :py:obj:`{PACKAGE}.{name} <{found[key]}>`")
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="<package-exports>"), 0, container)
        return container.children


def _directive_for(obj: Any) -> str:
    if inspect.isclass(obj):
        return "autoexception" if issubclass(obj, BaseException) else "autoclass"
    if inspect.isroutine(obj):
        return "autofunction"
    return "autodata"


class ApiFallback(SphinxDirective):
    """Documents, module by module, every public name no ``api/`` page covers."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        _note_api_pages(self)
        missing = undocumented()
        if not missing:
            return []
        lines = [
            "Other modules",
            "-------------",
            "",
            "Modules without a page of their own yet.",
            "",
        ]
        for module_name, names in missing.items():
            module = importlib.import_module(module_name)
            lines += [
                f"``{module_name}``",
                "~" * (len(module_name) + 4),
                "",
                f".. py:module:: {module_name}",
                "",
            ]
            for name in names:
                directive = _directive_for(getattr(module, name))
                lines += [f".. {directive}:: {module_name}.{name}", ""]
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source="<api-fallback>"),
                                 container)
        return container.children


# -- benchmark tables ----------------------------------------------------------------------
BENCHMARK_MARKER = "<!-- benchmark-tables -->"
_HEADING = re.compile(r"^(#{1,6})(\s)", re.MULTILINE)
_RELATIVE_LINK = re.compile(r"(!?\[[^\]]*\]\()(?![a-z][a-z0-9+.-]*:|/|#)([^)\s]+)")


def benchmark_tables(directory: Path = DOCS / "benchmarks") -> tuple[str, list[Path]]:
    """The Markdown of every ``*.md`` in ``directory`` (sorted by name), each under a
    level-2 heading (its own first heading, moved to level 2, or its file name), with
    relative links rewritten to stay valid from ``docs/``."""
    files = sorted(directory.glob("*.md"))
    if not files:
        return (
            "```{note}\nNo benchmark tables have been generated yet: the scripts in "
            "`benchmarks/` write them to `docs/benchmarks/`.\n```\n",
            [],
        )
    parts = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        fenced = re.split(r"(^```.*?^```)", text, flags=re.MULTILINE | re.DOTALL)
        levels = [
            len(m.group(1)) for chunk in fenced[::2] for m in _HEADING.finditer(chunk)
        ]
        shift = 2 - min(levels) if levels else 0
        for i in range(0, len(fenced), 2):
            chunk = fenced[i]
            if shift:
                chunk = _HEADING.sub(
                    lambda m: "#" * min(6, len(m.group(1)) + shift) + m.group(2), chunk
                )
            fenced[i] = _RELATIVE_LINK.sub(rf"\g<1>{directory.name}/\g<2>", chunk)
        body = "".join(fenced).strip()
        if not levels:
            title = path.stem.replace("_", " ").replace("-", " ").capitalize()
            body = f"## {title}\n\n{body}"
        parts.append(body + "\n")
    return "\n".join(parts), files


def _inject_benchmarks(app: Sphinx, docname: str, source: list[str]) -> None:
    if docname != "benchmarks" or BENCHMARK_MARKER not in source[0]:
        return
    text, files = benchmark_tables()
    for path in files:
        app.env.note_dependency(str(path))
    source[0] = source[0].replace(BENCHMARK_MARKER, text)


# -- autodoc tidying -----------------------------------------------------------------------
def _skip_member(
    app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any
) -> bool | None:
    """Leaves out NamedTuple fields (their docstring is "Alias for field number N"; their
    meaning is in the class docstring's ``:param`` list) and ``extra_repr`` of modules
    (:class:`torch.nn.Module` plumbing)."""
    doc = getattr(obj, "__doc__", None) or ""
    if isinstance(doc, str) and doc.startswith("Alias for field number"):
        return True
    if name == "extra_repr":
        return True
    return None


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("pyro-wakesleep-api-fallback", ApiFallback)
    app.add_directive("pyro-wakesleep-exports", PackageExports)
    app.connect("source-read", _drop_missing_pages)
    app.connect("source-read", _inject_benchmarks)
    app.connect("autodoc-skip-member", _skip_member)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

"""The package builds as an sdist and a wheel that installs into a clean environment.

``python -m build`` builds the sdist and then the wheel *from the sdist*, so a file
missing from the sdist breaks the wheel build. The wheel is installed with ``--no-deps``
into a fresh virtual environment that sees this environment's packages (torch, pyro) on
a plain path entry, so nothing is downloaded; the smoke test then runs from outside the
repository and checks that it imports the installed copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKE = textwrap.dedent(
    """
    import importlib, importlib.metadata, pkgutil, sys
    from pathlib import Path

    import pyro
    import pyro.distributions as dist
    import torch

    import pyro_wakesleep
    from pyro_wakesleep import ScoreFunctionELBO, LeaveOneOutBaseline

    where = Path(pyro_wakesleep.__file__).resolve()
    assert Path(sys.prefix).resolve() in where.parents, f"imported {where}, not the wheel"
    version = importlib.metadata.version("pyro-wakesleep")
    assert pyro_wakesleep.__version__ == version, (pyro_wakesleep.__version__, version)
    for info in pkgutil.walk_packages(pyro_wakesleep.__path__, "pyro_wakesleep."):
        importlib.import_module(info.name)
    for name in pyro_wakesleep.__all__:
        getattr(pyro_wakesleep, name)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(2.0 * z - 1.0, 1.0), obs=x)

    def guide(x):
        p = pyro.param("p", torch.full((len(x),), 0.5))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(p))

    pyro.set_rng_seed(0)
    elbo = ScoreFunctionELBO(num_particles=2, control_variate=LeaveOneOutBaseline())
    loss = elbo.differentiable_loss(model, guide, torch.tensor([-1.0, 1.0]))
    loss.backward()
    assert torch.isfinite(loss) and pyro.param("p").grad is not None
    print("smoke ok", version, where)
    """
)


CORE = ("torch", "pyro-ppl", "numpy", "tqdm")
EXAMPLES = ("__init__", "cli", "compare", "datasets", "mixture", "models")
EXTRA_ONLY = ("sklearn", "matplotlib")


def requirement_name(line: str) -> str:
    """``"Requires-Dist: scikit-learn>=1.2; extra == 'examples'"`` -> ``"scikit-learn"``."""
    return re.split(r"[\s<>=!~;\[(]", line.removeprefix("Requires-Dist:").strip(), maxsplit=1)[0]


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, **kwargs
    )
    assert result.returncode == 0, (
        f"{' '.join(command)} failed ({result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def test_sdist_and_wheel_build_install_and_import(tmp_path: Path) -> None:
    start = time.perf_counter()
    dist_dir = tmp_path / "dist"
    build = [sys.executable, "-m", "build", "--outdir", str(dist_dir)]
    if importlib.util.find_spec("hatchling") is not None:
        build.append("--no-isolation")  # offline and fast; else pip fetches the backend
    run([*build, str(ROOT)], cwd=tmp_path, env=clean_env())

    (sdist,) = dist_dir.glob("pyro_wakesleep-*.tar.gz")
    (wheel,) = dist_dir.glob("pyro_wakesleep-*.whl")
    with tarfile.open(sdist) as archive:
        members = {Path(*Path(m).parts[1:]).as_posix() for m in archive.getnames()}
    for required in ("pyproject.toml", "README.md", "LICENSE", "pyro_wakesleep/__init__.py"):
        assert required in members, f"{required} missing from {sdist.name}"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "pyro_wakesleep/__init__.py" in names
    assert "pyro_wakesleep/py.typed" in names, "py.typed missing: type checkers ignore us"
    assert "pyro_wakesleep/py.typed" in members, "py.typed missing from the sdist"
    for module in EXAMPLES:
        assert f"pyro_wakesleep/examples/{module}.py" in names, (module, names)
        if module != "__init__":
            assert f"pyro_wakesleep/{module}.py" not in names, f"{module}.py outside examples/"
    assert not any(n.startswith(("tests/", "docs/", "tutorials/")) for n in names), names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        lines = archive.read(metadata).decode().splitlines()
        scripts = archive.read(entry_points).decode()
    requires = [
        line for line in lines if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    for dependency in ("torch", "pyro-ppl"):
        assert any(dependency in line for line in requires), (dependency, requires)
    core = sorted(requirement_name(line) for line in requires)
    assert core == sorted(CORE), f"core dependencies {core}, expected {sorted(CORE)}"
    assert "Provides-Extra: examples" in lines, "no examples extra"
    examples = sorted(
        requirement_name(line) for line in lines
        if line.startswith("Requires-Dist:") and "extra == 'examples'" in line.replace('"', "'")
    )
    assert examples == ["matplotlib", "scikit-learn"], examples
    assert "pyro-wakesleep = pyro_wakesleep.examples.cli:main" in scripts, scripts
    urls = dict(line.removeprefix("Project-URL:").strip().split(", ", 1) for line in lines
                if line.startswith("Project-URL:"))
    assert {"Documentation", "Source", "Issues", "Changelog"} <= urls.keys(), urls
    assert all(url.startswith("https://") for url in urls.values()), urls
    assert "Classifier: Typing :: Typed" in lines

    # a fresh environment; this one's site-packages (dependencies only: its .pth files,
    # such as an editable install of this package, are not processed) on a plain path
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        .stdout.strip()
    )
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "parent_environment.pth").write_text("\n".join(sorted(here)) + "\n")
    run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)],
        env=clean_env(),
    )

    smoke = run([str(python), "-c", SMOKE], cwd=tmp_path, env=clean_env())
    assert "smoke ok" in smoke.stdout
    script = venv / ("Scripts/pyro-wakesleep.exe" if os.name == "nt" else "bin/pyro-wakesleep")
    assert script.exists(), "console script pyro-wakesleep not installed"
    cli = run([str(python), "-c", "import importlib.util as u; "
               "print(u.find_spec('pyro_wakesleep.examples.cli') is not None)"], cwd=tmp_path,
              env=clean_env())
    if cli.stdout.strip() == "True":
        run([str(script), "--help"], cwd=tmp_path, env=clean_env())
    print(f"build, install and smoke test in {time.perf_counter() - start:.1f} s")


def imported_extras(code: str) -> list[str]:
    """Which of :data:`EXTRA_ONLY` a fresh interpreter has imported after running ``code``."""
    report = (
        "\nimport json, sys\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(EXTRA_ONLY)!r})))"
    )
    out = run([sys.executable, "-c", code + report], cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_needs_no_examples_extra() -> None:
    assert imported_extras("import pyro_wakesleep") == []
    walk = textwrap.dedent(
        """
        import importlib, pkgutil, pyro_wakesleep
        for info in pkgutil.walk_packages(pyro_wakesleep.__path__, "pyro_wakesleep."):
            if info.name != "pyro_wakesleep.lightning":  # the lightning extra's module:
                importlib.import_module(info.name)  # lightning imports matplotlib if present
        """
    )
    assert imported_extras(walk) == [], "a module imports an examples-only package eagerly"
    # without lightning's own opportunistic imports, pyro_wakesleep.lightning adds none
    plain = textwrap.dedent(
        """
        import sys, lightning.pytorch
        before = set(sys.modules)
        import pyro_wakesleep.lightning
        new = {m.split(".")[0] for m in set(sys.modules) - before}
        assert not new & {"sklearn", "matplotlib"}, new
        """
    )
    if importlib.util.find_spec("lightning") is not None:
        run([sys.executable, "-c", plain], cwd=ROOT)


@pytest.mark.parametrize(("module", "name", "call"), [
    ("datasets", "load_digits", "load_digits()"),
    ("compare", "save", "save([], OUT)"),
])
def test_examples_name_the_extra_where_it_is_missing(
    module: str, name: str, call: str, tmp_path: Path
) -> None:
    probe = textwrap.dedent(
        f"""
        import sys
        sys.modules.update(sklearn=None, matplotlib=None)  # as if not installed
        from pyro_wakesleep.examples.{module} import {name}  # imports without them
        OUT = {str(tmp_path / "out")!r}
        try:
            {call}
        except ImportError as error:
            print("ImportError:", error)
        """
    )
    out = run([sys.executable, "-c", probe], cwd=ROOT).stdout
    assert "ImportError:" in out and "pip install pyro-wakesleep[examples]" in out, out


def test_dependency_floors_are_the_versions_ci_tests() -> None:
    """CI installs torch from constraints.txt and pyro-ppl's newest release (1.9.2 when
    the floors were set): the floors in pyproject.toml are those versions, since no CI job
    tests older ones; torch's is the pinned one, and nothing installed is older."""
    import importlib.metadata

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = dict(re.fullmatch(r"([\w-]+)>=([\d.]+)", d).groups()  # type: ignore[union-attr]
                  for d in project["dependencies"])
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split()
                if "==" in line)

    def release(version: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.match(r"[\d.]+", version).group().strip(".")
                     .split("."))  # type: ignore[union-attr]

    assert release(pins["torch"])[:2] == release(floors["torch"])[:2], (pins, floors)
    for name in ("torch", "pyro-ppl"):  # what runs the tests is not older than the floor
        assert release(importlib.metadata.version(name)) >= release(floors[name]), name
    assert "Typing :: Typed" in project["classifiers"]
    assert (ROOT / "pyro_wakesleep" / "py.typed").is_file()

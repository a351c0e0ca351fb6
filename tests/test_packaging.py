"""The built wheel: it holds every package, installs into a fresh virtual environment, and its
``graphsel`` command and pass registry work there (torch comes from this environment's
site-packages; the wheel is installed without dependencies, so nothing is downloaded)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE_PASSES = {"fuse_bn", "prune", "fold_masks", "materialize"}


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _packages_in_tree() -> set[str]:
    """Every package the source tree holds: graphsel/** and passes/** (shipped as graphsel.passes)."""
    found = set()
    for root, prefix in ((REPO / "graphsel", "graphsel"), (REPO / "passes", "graphsel.passes")):
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            if "__pycache__" not in rel:
                found.add(".".join((prefix,) + rel))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the sources (the build leaves nothing in the checkout)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("graphsel", "passes"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", work / "dist", src])
    (whl,) = (work / "dist").glob("graphsel-*.whl")
    return whl


@pytest.mark.slow
def test_the_wheel_holds_every_package_and_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    shipped = {os.path.dirname(n).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert shipped == _packages_in_tree(), "pyproject.toml [tool.setuptools] packages must list every package"
    assert "graphsel.passes" in shipped and not any(n.startswith("passes/") for n in names)
    assert "graphsel = graphsel.tools.cli:main" in entry_points


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_registers_the_passes(wheel, tmp_path):
    venv = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    _run([base_python, "-m", "venv", "--without-pip", venv])
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # torch & co. from this environment: a plain path entry, so this environment's .pth files
    # (among them the editable install of graphsel) are not processed in the new venv
    (site / "_graphsel_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])

    code = ("import graphsel, graphsel.passes, json; "
            "print(json.dumps({'file': graphsel.__file__, 'passes': sorted(graphsel.available_passes())}))")
    info = json.loads(_run([python, "-I", "-c", code], cwd=tmp_path).stdout)
    assert Path(info["file"]).resolve().is_relative_to(site.resolve()), info["file"]
    assert CORE_PASSES <= set(info["passes"])
    # the console script of the wheel
    out = _run([bindir / "graphsel", "passes", "--json"], cwd=tmp_path).stdout
    assert CORE_PASSES <= {row["name"] for row in json.loads(out)}

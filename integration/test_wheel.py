"""The wheel a user installs: one top-level name, and nothing a user's own modules shadow.

Built from this checkout with ``python -m build``, installed (not editable) into a fresh
virtual environment, and run from a folder that holds its own ``results.py`` and
``brokers/`` package, common names in an application that once broke QTasks (its
backends were installed as top-level ``brokers`` and ``results``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from integration.processes import ROOT

pytestmark = pytest.mark.timeout(600)

SEED = (ROOT / "examples" / "yield_task.py").read_text()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: setuptools keeps a build/ folder beside the sources, and a stale
    # module left there by an earlier build would be packaged as if it were current.
    source = tmp_path_factory.mktemp("source") / "qtasks"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out),
                           str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [built] = out.glob("qtasks-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment with the wheel installed as a user would: the core alone."""
    env = tmp_path_factory.mktemp("venv")
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return python


def test_the_wheel_holds_one_top_level_package_with_every_module(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"qtasks"}
    # Every module of the repository's three source folders is in it, under qtasks.
    expected = {f"qtasks/{p.relative_to(ROOT / 'qtasks').as_posix()}"
                for p in (ROOT / "qtasks").glob("*.py")}
    for folder in ("brokers", "results"):
        expected |= {f"qtasks/{p.relative_to(ROOT).as_posix()}"
                     for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert expected <= set(names), sorted(expected - set(names))
    # Typed everywhere: a py.typed marker in every shipped package.
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert {f"{p}/py.typed" for p in packages} <= set(names)
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata and "Classifier: Typing :: Typed" in metadata


def test_the_seed_runs_beside_a_users_own_results_and_brokers(
        installed: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "brokers").mkdir(parents=True)
    (project / "brokers" / "__init__.py").write_text("USERS_OWN = True\n")
    (project / "results.py").write_text("USERS_OWN = True\n")
    (project / "seed.py").write_text(SEED)
    done = subprocess.run([str(installed), "seed.py"], cwd=project, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["6", "7", "8", "9", "10", "[8,", "9,", "10,", "11,", "12]"]


def test_importing_qtasks_from_the_wheel_loads_no_broker_library(installed: Path) -> None:
    probe = ("import sys, qtasks, qtasks.brokers.memory, qtasks.results.memory\n"
             "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
             "{'aio_pika', 'aiormq', 'nats', 'tenacity', 'brokers', 'results'})\n"
             "print(loaded, qtasks.__file__)\n")
    done = subprocess.run([str(installed), "-c", probe], cwd=installed.parent,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("[] ") and "site-packages" in done.stdout


def test_the_dashboard_ships_its_page_script_and_style(wheel: Path) -> None:
    """``qtasks dashboard`` serves its files from the installed package: every file of
    qtasks/dashboard (modules, page, scripts, style) is in the wheel."""
    names = set(zipfile.ZipFile(wheel).namelist())
    folder = ROOT / "qtasks" / "dashboard"
    expected = {f"qtasks/dashboard/{p.relative_to(folder).as_posix()}"
                for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert {"qtasks/dashboard/static/index.html", "qtasks/dashboard/static/app.js",
            "qtasks/dashboard/static/style.css"} <= expected
    assert expected <= names, sorted(expected - names)

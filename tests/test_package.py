"""The installed package: a wheel built from the repository holds one top-level import package, ``geximpute``.

The repository keeps its folders (``engine/``, ``jobs/``); ``pyproject.toml`` maps them onto ``geximpute`` and
``geximpute.jobs``. The wheel is built here (setuptools, no build isolation: no network), its file list inspected,
and it is installed into a folder of its own, from which ``import geximpute`` must come (not from the repository).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy of what the wheel is made of, so that setuptools' build/ and egg-info stay out of the repository
    source = tmp_path_factory.mktemp("source")
    for name in ("engine", "jobs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "--wheel-dir", str(out),
         str(source)],
        check=True, capture_output=True, text=True, cwd=source,
    )
    (path,) = out.glob("geximpute-*.whl")
    return path


def test_the_wheel_installs_only_geximpute_at_the_top(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"geximpute"}, sorted(top)
    # every source file of the repository's two folders is in the wheel, under its import name
    expected = {f"geximpute/{p.relative_to(ROOT / 'engine').as_posix()}" for p in (ROOT / "engine").rglob("*.py")}
    expected |= {f"geximpute/jobs/{p.relative_to(ROOT / 'jobs').as_posix()}" for p in (ROOT / "jobs").rglob("*.py")}
    missing = sorted(expected - set(names))
    assert not missing, f"pyproject.toml's package list misses: {missing}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "geximpute = geximpute.apps.cli:run" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_wheel_imports_as_geximpute(wheel: Path, tmp_path: Path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, text=True)
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "geximpute"]
    code = ("import geximpute, geximpute.jobs.impute, geximpute.api as api; "
            "print(geximpute.__file__); print(geximpute.jobs.impute.__file__); print(callable(api.run))")
    # PYTHONPATH puts the target before the editable install of the repository, so the wheel's copy is imported
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(target)}).stdout.split()
    assert out[0] == str(target / "geximpute" / "__init__.py")
    assert out[1] == str(target / "geximpute" / "jobs" / "impute.py")
    assert out[2] == "True"
    # the old top-level names are gone
    gone = subprocess.run([sys.executable, "-c", "import engine"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(target)})
    assert gone.returncode != 0 and "No module named 'engine'" in gone.stderr

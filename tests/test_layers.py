"""The engine's layers import only downward: each module's imports (top-level and inside functions) are walked with
``ast`` and an import of a higher layer fails, naming the file, the line and the two layers.

Layer order (docs/architecture.md): base (``engine/__init__`` = ``geximpute``, ``errors``, ``config``,
``config_schema``,
``schema``) < ``io`` < ``science`` < ``model`` < ``runtime`` < ``fit`` < ``steps`` < ``apps`` (and ``geximpute.api``,
the notebooks' facade); ``jobs/`` may import anything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"
LAYERS = ("base", "io", "science", "model", "runtime", "fit", "steps", "apps")
BASE_MODULES = {"geximpute", "geximpute.errors", "geximpute.config", "geximpute.config_schema", "geximpute.schema",
                "geximpute.code_version"}
#: modules at the package's top that belong to a higher layer: ``geximpute.api`` is the notebooks' facade over the apps
TOP_LEVEL = {"geximpute.api": "apps"}
#: third-party packages a layer must not import, though a higher one may: science is numpy with the classical
#: libraries its baselines fit (scikit-learn, XGBoost's plain booster for chained_boosting) and never Ray or torch,
#: model is torch without Ray (model code knows nothing about Ray), io reads files without any model library
FORBIDDEN = {
    "base": {"ray", "torch", "xgboost", "sklearn", "matplotlib"},
    "io": {"ray", "torch", "xgboost", "sklearn", "matplotlib"},
    "science": {"ray", "torch", "matplotlib"},
    "model": {"ray", "xgboost", "matplotlib"},
}


def module_name(path: Path) -> str:
    parts = ["geximpute", *path.relative_to(ENGINE).with_suffix("").parts]  # engine/ installs as geximpute
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """The layer of an engine module name; raises for a module outside every layer."""
    if module in BASE_MODULES:
        return "base"
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS[1:]:
        return parts[1]
    raise ValueError(f"{module}: in no layer; put it in a subpackage ({', '.join(LAYERS[1:])}) or the base")


def imported_modules(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module name) of every import in ``tree``, at any depth; ``from geximpute import schema`` gives
    ``geximpute.schema``. A relative import gives ``.``: the engine spells its imports out."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, "."))
                continue
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                path = ENGINE / "/".join(candidate.split(".")[1:])
                is_module = path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()
                found.append((node.lineno, candidate if is_module else node.module))
    return found


ENGINE_FILES = sorted(ENGINE.rglob("*.py"))


def test_every_engine_module_has_a_layer():
    for path in ENGINE_FILES:
        layer_of(module_name(path))  # raises with the module's name


@pytest.mark.parametrize("path", ENGINE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_only_downward(path: Path):
    module = module_name(path)
    own = LAYERS.index(layer_of(module))
    tree = ast.parse(path.read_text(), filename=str(path))
    upward = []
    for line, target in imported_modules(tree):
        top = target.split(".")[0]
        if target == ".":
            upward.append(f"{path.relative_to(ROOT)}:{line}: a relative import; write it absolute")
        elif target.startswith("geximpute.jobs"):
            upward.append(f"{path.relative_to(ROOT)}:{line}: the engine imports {target}; only jobs/ runs steps")
        elif top == "geximpute":
            other = layer_of(target)
            if LAYERS.index(other) > own:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {LAYERS[own]} imports {target} ({other})")
        elif top in FORBIDDEN.get(LAYERS[own], ()):
            upward.append(f"{path.relative_to(ROOT)}:{line}: {LAYERS[own]} imports {top}")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_the_walker_sees_imports_inside_functions_and_from_package_imports():
    source = (
        "from geximpute import schema\n"
        "import geximpute.io.fasta\n"
        "def f():\n"
        "    from geximpute.steps.impute import impute\n"
        "    from geximpute.fit import bundle\n"
        "    import torch\n"
        "from . import x\n"
    )
    found = dict((m, line) for line, m in imported_modules(ast.parse(source)))
    assert found == {"geximpute.schema": 1, "geximpute.io.fasta": 2, "geximpute.steps.impute": 4,
                     "geximpute.fit.bundle": 5, "torch": 6, ".": 7}
    assert [layer_of(m) for m in ("geximpute", "geximpute.schema", "geximpute.io.fasta", "geximpute.steps.impute")] == [
        "base", "base", "io", "steps"]
    with pytest.raises(ValueError, match="in no layer"):
        layer_of("geximpute.utils")


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_the_cli_starts_without_the_heavy_libraries():
    # `geximpute --help` stays fast: each command imports its step module (numpy, pyarrow, torch, Ray) when it runs
    loaded = _modules_after_import("geximpute.apps.cli")
    assert not {"torch", "ray", "xgboost", "pyarrow", "numpy"} & loaded


def test_loading_a_bundle_does_not_import_the_training_code():
    loaded = _modules_after_import("geximpute.fit.bundle")
    assert "geximpute.fit.models" in loaded
    assert not {"geximpute.fit.train", "geximpute.fit.hybrid", "ray"} & loaded

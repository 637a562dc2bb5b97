"""Provenance carried by every output: the resolved config, package versions and input fingerprints."""

from __future__ import annotations

import functools
import json
import math
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from geximpute import __version__
from geximpute.config import Config
from geximpute.io.checks import sha256_file


def fingerprint(path: str | Path, version: str | None = None) -> dict[str, Any]:
    """Size and SHA-256 of a file (streamed in 1 MiB chunks); of an expression store, its description's SHA-256
    (which lists each partition's) and its partitions' bytes (:func:`geximpute.io.store.fingerprint`), of the
    version its link names now or of ``version``."""
    path = Path(path)
    if path.is_dir():
        from geximpute.io.store import fingerprint as store_fingerprint

        return store_fingerprint(path, version)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def input_fingerprints(config: Config, read: dict[str, str] | None = None) -> dict[str, Any]:
    """Fingerprints of every configured input file; ``read``: the version of a store input that the run read
    (:func:`read_versions`), fingerprinted instead of the version its link names by now."""
    inputs = config.inputs
    names = ("genes", "expression", "samples", "genome", "variants", "sample_map")
    read = read or {}
    return {n: fingerprint(getattr(inputs, n), read.get(n)) for n in names if getattr(inputs, n)}


def read_versions(dataset: Any) -> dict[str, str]:
    """``{input: version folder}`` of the store inputs a loaded dataset read (``expression`` where it is a store;
    :func:`input_fingerprints`' ``read``); empty for files."""
    expression = getattr(dataset, "expression", None)
    version = ((getattr(expression, "report", None) or {}).get("store") or {}).get("version")
    return {"expression": version} if version else {}


@functools.cache
def source_commit() -> str | None:
    """The git commit geximpute runs from (``+uncommitted`` when tracked files differ from it), or None when it is
    not run from a git checkout (an installed wheel) or git is not there: a figure can name the code that made it."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+uncommitted" if dirty else "") if head else None


def versions() -> dict[str, str]:
    """Versions of geximpute (and its git commit, when run from a checkout), Python and the libraries whose
    behaviour shapes the outputs: as this process first asked for them (the command line and ``api.run`` ask as a
    step starts), not as they are by the time its manifest is written (a checkout switched to another commit, or a
    library upgraded, during a run of hours named code that never ran)."""
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, str]:
    out = {"geximpute": __version__, "python": platform.python_version()}
    commit = source_commit()
    if commit:
        out["geximpute_commit"] = commit
    for dist in ("ray", "torch", "xgboost", "xgboost-cpu", "pyarrow", "numpy", "pandas", "pyfaidx", "cyvcf2"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def manifest(config: Config, *, inputs: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The manifest written beside an output: config, versions, input fingerprints and ``extra``. ``inputs``: the
    fingerprints the run took where it read its inputs (:func:`input_fingerprints` with :func:`read_versions`);
    default taken now (a store's version the run read may be pruned by the end of a long run: fingerprinted when
    the output is written, it failed the commit after all the work)."""
    return {"config": config.to_dict(), "versions": versions(),
            "inputs": inputs if inputs is not None else input_fingerprints(config), **extra}


def finite_json(data: Any) -> Any:
    """``data`` with every float that is not finite (a network's NaN validation loss without validation rows, its
    infinite best loss) as None: JSON has no NaN or Infinity, and strict readers refuse them."""
    if hasattr(data, "tolist") and not isinstance(data, (str, bytes)):  # numpy scalars and arrays (float32 too)
        data = data.tolist()
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(finite_json(data), indent=2, sort_keys=False, default=str) + "\n")

"""Shared fixtures: the real data folder beside the checkout, and small input files written on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real``; CI always has it beside the checkout, so its absence is a failure."""
    assert REAL.is_dir(), f"real data folder {REAL} not found: ../shared must sit beside the checkout"
    return REAL


@pytest.fixture
def write(tmp_path: Path):
    """Write ``text`` to ``tmp_path / name`` (gzip if the name ends in .gz) and return the path."""
    import gzip

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".gz"):
            with gzip.open(path, "wt") as fh:
                fh.write(text)
        else:
            path.write_text(text)
        return path

    return _write


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: 2 CPUs, small object store, no dashboard."""
    import ray

    ray.init(num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """A small synthetic dataset (with its config.yaml), written once per session."""
    from engine.apps.synth import SynthSpec, generate

    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, SynthSpec(seed=3, n_genes=120, n_donors=24, n_tissues=4))
    return out

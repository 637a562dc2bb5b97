"""Shared fixtures: the real data folder beside the checkout, and small input files written on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import helpers
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

    from geximpute import code_version
    from geximpute.runtime.raytools import local_train_polling

    local_train_polling()  # as the engine's own local Ray: Ray Train's controller polls every 0.25 s, not 2 s
    with code_version.exported_for_local_ray():  # as the engine's: each worker checks that it runs this code
        ray.init(num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """A small synthetic dataset (with its config.yaml), written once per session."""
    return helpers.synth_small(tmp_path_factory.mktemp("synth") / "data")


@pytest.fixture(scope="session")
def tiny_data(synth_small, tmp_path_factory) -> Path:
    """``synth_small`` with GTEx-style tissue names (spaces, dashes, brackets), the data of the tiny model."""
    return helpers.gtex_named_copy(synth_small, tmp_path_factory.mktemp("tiny-data")).parent


@pytest.fixture(scope="session")
def tiny_model(ray_local, tiny_data, tmp_path_factory) -> helpers.TinyModel:
    """The one trained model of the default suite: ``build_bundle`` with the TINY settings on ``tiny_data``.

    Tests read it and never write into its folders; one that needs a different model builds its own.
    """
    return helpers.build_tiny_model(tiny_data, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_imputation(tiny_model, tmp_path_factory):
    """(config, ImputeResult) of imputing every missing entry of ``tiny_data`` with the tiny model; the golden
    predictions are rows of it."""
    return helpers.impute_tiny(tiny_model, tmp_path_factory.mktemp("tiny-impute") / "predictions")

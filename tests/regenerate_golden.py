"""Regenerate ``tests/golden/tiny_predictions.csv`` (the golden predictions of ``tests/test_golden.py``).

Builds the session's tiny model exactly as the test suite does (:func:`helpers.synth_small`,
:func:`helpers.gtex_named_copy`, :func:`helpers.build_tiny_model`, :func:`helpers.impute_tiny`), on a local Ray
like the suite's ``ray_local`` fixture, and writes ``GOLDEN_ROWS`` rows of its imputation. Run it after a change
that moves the model's predictions on purpose, and commit the new file with that change::

    flock /tmp/geximpute-ray.lock .venv/bin/python tests/regenerate_golden.py

(the lock is this development machine's rule for anything that starts Ray; about 2 minutes on 2 cores).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers  # noqa: E402  (after the path above: tests/ is not a package)


def main() -> int:
    import ray

    ray.init(num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="geximpute-golden-") as tmp:
            tmp = Path(tmp)
            data = helpers.gtex_named_copy(helpers.synth_small(tmp / "synth" / "data"), tmp / "tiny-data").parent
            model = helpers.build_tiny_model(data, tmp / "tiny-model")
            _, result = helpers.impute_tiny(model, tmp / "tiny-impute" / "predictions")
            rows = helpers.golden_rows(helpers.read_output(result.out_dir))
    finally:
        ray.shutdown()
    helpers.GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(helpers.GOLDEN_FILE, index=False, float_format="%.6f")
    print(f"{len(rows)} golden rows of model {model.bundle.model_version} written to {helpers.GOLDEN_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU per row of the XGBoost head's two boosters: through a DMatrix (as before `efff601`) and in place
(``HeadModel.predict`` now), on the same rows of a real bundle, one thread, alternating, min of 6 passes.

    .venv/bin/python benchmarks/head_predict_cpu.py /tmp/b24/work/g1-d1/model

(a bundle written by ``geximpute benchmark --keep-work``, or any bundle folder). Also checks the outputs are equal.
"""

from __future__ import annotations

import sys
import time

import numpy as np


def main() -> None:
    from geximpute.fit.bundle import load_bundle
    from geximpute.fit.head import _matrices

    head = load_bundle(sys.argv[1]).models.head
    for booster in (head.point, head.interval):
        booster.set_param({"nthread": 1})
    rows = np.random.default_rng(0).normal(size=(16384, head.n_features)).astype(np.float32)
    rows[::7, 3] = np.nan

    def through_dmatrix() -> tuple[np.ndarray, np.ndarray]:
        margin = head.blend.margin(rows, ensemble=True) if head.blend is not None else None
        point, interval = _matrices(rows, None, margin, 2)
        return head.point.predict(point), head.interval.predict(interval)

    def in_place() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return head.predict(rows)

    old, new = through_dmatrix(), in_place()
    assert np.array_equal(old[0], new[0]), "the point estimates differ"
    us = {"DMatrix": [], "in place": []}
    for _ in range(6):
        for name, run in (("DMatrix", through_dmatrix), ("in place", in_place)):
            t = time.process_time()
            run()
            us[name].append((time.process_time() - t) / len(rows) * 1e6)
    print({name: round(min(v), 2) for name, v in us.items()}, "us CPU per row and pass (min of 6)")


if __name__ == "__main__":
    main()

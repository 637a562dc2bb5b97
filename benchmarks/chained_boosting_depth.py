"""``chained_boosting``'s tree depth on the tuning's validation split of the visible medians entries.

For each evaluation seed, the visible problem of task ``entries`` (the hidden entries removed before anything, as
``geximpute evaluate`` removes them), the validation split ``baselines.tune`` carves out of it
(:func:`geximpute.science.baselines.validation_mask`), and for each depth: ``chained_boosting`` and
``local_regression`` started from it, fitted on what is left visible and scored by RMSE on the split, with the
mean of the two. No hidden value is read. The other settings are those the tuning chose at every seed
(``ridge_alpha`` 1000, ``cb_rounds`` 2, ``lls_k`` 80, ``lls_alpha`` 10).

    .venv/bin/python benchmarks/chained_boosting_depth.py --seeds 0 1 2 --depths 6 8
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from geximpute.config import load_config
from geximpute.io.dataset import load_dataset
from geximpute.science.baselines import make_method, validation_mask
from geximpute.science.folds import fold_problem
from geximpute.science.problem import make_problem

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gtex-medians.yaml"


def rmse(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((estimate - truth) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 8])
    args = parser.parse_args()
    print("| seed | depth | chained_boosting | local_regression | mean of the two | seconds |")
    print("|---|---|---|---|---|---|")
    for seed in args.seeds:
        config = load_config(CONFIG, ["evaluation.task=entries", f"evaluation.seed={seed}", f"seed={seed}"])
        problem, _ = make_problem(load_dataset(config))  # the hidden entries are not in it
        split = validation_mask(problem, "entries", config.baselines.tune_fraction, config.seed)
        gi, si = np.nonzero(split)
        truth = problem.values[gi, si].astype(np.float64)
        for depth in args.depths:
            settings = dataclasses.replace(config.baselines, ridge_alpha=1000.0, cb_rounds=2, lls_k=80,
                                           lls_alpha=10.0, cb_max_depth=depth)
            visible = fold_problem(problem, split, "auto")  # a fresh problem: fills are cached per problem object
            t0 = time.perf_counter()
            estimates = {}
            for name in ("chained_boosting", "local_regression"):
                method = make_method(name, settings, seed=config.seed)
                method.fit(visible)
                estimates[name] = np.asarray(method.predict_entries(gi, si), np.float64)
            mean = (estimates["chained_boosting"] + estimates["local_regression"]) / 2
            print(f"| {seed} | {depth} | {rmse(estimates['chained_boosting'], truth):.4f} | "
                  f"{rmse(estimates['local_regression'], truth):.4f} | {rmse(mean, truth):.4f} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()

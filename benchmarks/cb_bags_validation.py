"""``chained_boosting``'s bags, measured on a validation split carved out of the *visible* medians ``entries``
(no hidden value is read): RMSE of the boosted fill with 1 to 4 bags, of ``local_regression`` started from it, and
of a least-squares stack of ``iterative_ridge``, the fill and LLS (fitted on a random half of the split, scored on
the other half). How ``baselines.cb_bags``' default was chosen.

    .venv/bin/python benchmarks/cb_bags_validation.py [--seed 0] [--bags 1 2 3 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="the evaluation seed whose visible data are split")
    parser.add_argument("--bags", type=int, nargs="+", default=[1, 2, 3, 4], help="bag counts to measure")
    args = parser.parse_args()

    from geximpute.config import load_config
    from geximpute.io.dataset import load_dataset
    from geximpute.science import baselines as B
    from geximpute.science.folds import fold_problem
    from geximpute.science.problem import make_problem

    config = load_config("configs/gtex-medians.yaml", ["evaluation.task=entries", f"seed={args.seed}",
                                                         f"evaluation.seed={args.seed}"])
    problem, _ = make_problem(load_dataset(config), genomes=False)  # the evaluation's hidden entries are not in it
    mask = B.validation_mask(problem, "entries", 0.1, args.seed)
    valid = fold_problem(problem, mask)
    gi, si = np.nonzero(mask)
    truth = problem.values[gi, si].astype(np.float64)
    half = np.random.default_rng(args.seed).random(len(gi)) < 0.5

    def rmse(pred: np.ndarray, target: np.ndarray = truth) -> float:
        return round(float(np.sqrt(np.mean((pred - target) ** 2))), 4)

    ridge = B.IterativeRidgeBaseline(1000.0, 5)
    ridge.fit(valid)
    ridge_est = ridge.predict_entries(gi, si)
    print(f"{len(gi):,} validation entries; iterative_ridge {rmse(ridge_est)}", flush=True)
    for bags in args.bags:
        t = time.perf_counter()
        boosting = B.ChainedBoostingBaseline(3, 200_000, 1000.0, 5, args.seed, bags)
        boosting.fit(valid)  # each count is fitted whole (a fill is shared per setting, not per bag)
        fill = boosting.predict_entries(gi, si)
        lls = B.LocalRegressionBaseline(80, 10.0, boosting, boosting.ridge)
        lls.fit(valid)
        lls_est = lls.predict_entries(gi, si)
        stack = np.column_stack([ridge_est, fill, lls_est, np.ones(len(gi))])
        weights = np.linalg.lstsq(stack[half], truth[half], rcond=None)[0]
        print(f"bags {bags}: chained_boosting {rmse(fill)}, local_regression from it {rmse(lls_est)}, stack "
              f"{rmse(stack[~half] @ weights, truth[~half])} ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

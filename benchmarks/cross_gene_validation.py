"""``cross_gene_regression`` measured on a validation split carved out of the *visible* GTEx v8 samples (no hidden
value is read): across-donor Pearson (the ``samples`` task's headline) of ``pairwise_regression`` and of
``cross_gene_regression`` at several weights of the other genes' lines and numbers of partner genes. How the
method and its defaults were chosen.

    .venv/bin/python benchmarks/cross_gene_validation.py [--seed 0] [--weights 0 0.02 0.05 0.1 0.2] [--genes 16 32 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="the evaluation seed whose visible data are split")
    parser.add_argument("--min-donors", type=int, default=40, help="fewest donors of a line (both methods)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--genes", type=int, nargs="+", default=[16, 32, 64], help="partner genes (xg_genes)")
    args = parser.parse_args()

    from geximpute.config import load_config
    from geximpute.io.dataset import load_dataset
    from geximpute.science import baselines as B
    from geximpute.science.comparisons import gene_stats, metric_from
    from geximpute.science.folds import fold_problem
    from geximpute.science.problem import make_problem

    config = load_config("configs/gtex-v8-samples.yaml", [f"seed={args.seed}", f"evaluation.seed={args.seed}"])
    problem, _ = make_problem(load_dataset(config), genomes=False)  # the evaluation's hidden samples are not in it
    mask = B.validation_mask(problem, "samples", 0.1, args.seed)
    valid = fold_problem(problem, mask)
    gi, si = np.nonzero(mask)
    truth = problem.values[gi, si].astype(np.float64)
    uniq, code = np.unique(gi, return_inverse=True)

    def score(pred: np.ndarray) -> float:
        stats = gene_stats("across_donors_pearson_mean", pred, truth, code, len(uniq), problem.tissue_index[si], 10)
        return round(float(metric_from("across_donors_pearson_mean", stats.sum(axis=0))), 4)

    own = B.PairwiseRegressionBaseline(args.min_donors, 0.0)
    own.fit(valid)
    print(f"{len(gi):,} validation entries of {problem.n_genes} genes; pairwise_regression "
          f"({args.min_donors} donors, no prior) {score(own.predict_entries(gi, si))}", flush=True)
    for genes in args.genes:
        for weight in args.weights:
            t = time.perf_counter()
            method = B.CrossGeneRegressionBaseline(args.min_donors, weight, genes)
            method.fit(valid)
            print(f"cross_gene_regression xg_genes {genes}, xg_weight {weight}: "
                  f"{score(method.predict_entries(gi, si))} ({time.perf_counter() - t:.1f} s)", flush=True)


if __name__ == "__main__":
    main()

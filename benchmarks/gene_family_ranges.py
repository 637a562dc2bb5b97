"""``gene_family`` on the hidden genes of the medians ``genes`` task when the baselines are fitted on gene ranges
(as at GTEx's sample count, where ``baselines.block_cells`` cuts 57-gene ranges): each range's own families against
the whole problem's families in every range (the engine since this script was added). In process, no Ray:

    .venv/bin/python benchmarks/gene_family_ranges.py [SEED ...]
"""

import dataclasses
import sys
import time

import numpy as np

from geximpute.config import load_config
from geximpute.io.dataset import load_dataset
from geximpute.science.baselines import baseline_estimates, fit_ranges, range_estimates
from geximpute.science.problem import gene_rows, make_problem

for seed in [int(a) for a in sys.argv[1:]] or [0]:
    config = load_config("configs/gtex-medians.yaml", ["evaluation.task=genes", f"evaluation.seed={seed}"])
    problem, truth = make_problem(load_dataset(config, with_variants=False), genomes=False)
    gi, si, y = truth.gene_index, truth.sample_index, truth.values.astype(np.float64)
    settings = dataclasses.replace(config.baselines, tune=False)
    rows = []
    for genes in (None, 2000, 500, 256):
        cells = settings.block_cells if genes is None else genes * problem.n_samples
        ranged = dataclasses.replace(settings, block_cells=cells)
        ranges = fit_ranges(problem, cells)
        t0 = time.perf_counter()
        whole = baseline_estimates(problem, gi, si, ("gene_family",), ranged)["gene_family"]
        own = np.full(len(gi), np.nan)
        for lo, hi in ranges:
            inside = (gi >= lo) & (gi < hi)
            own[inside] = range_estimates(gene_rows(problem, lo, hi), gi[inside] - lo, si[inside], ("gene_family",),
                                          ranged)["gene_family"]
        rows.append((len(ranges), np.corrcoef(own, y)[0, 1], np.corrcoef(whole, y)[0, 1], time.perf_counter() - t0))
    for n, a, b, t in rows:
        print(f"seed {seed}: {n:3d} range(s): Pearson on the hidden genes, each range's own families {a:.4f}, "
              f"the whole problem's {b:.4f} ({t:.1f} s)", flush=True)

"""fit-head's baseline stage alone, on a prepare output with training folds: the visible problem read again from
the config's inputs, the baselines' settings tuned (``baselines.tune``), then the out-of-fold estimates at the
training records' entries (:func:`geximpute.fit.hybrid.stacked_baselines` without the visible grids, as
``fit-head`` runs it), each stage timed, with the process's peak RSS.

    .venv/bin/geximpute prepare --config CONFIG --out OUT/records --training --targets none
    .venv/bin/python benchmarks/fit_head_baselines.py CONFIG OUT/records [--in-process]

Without ``--in-process`` a local Ray is started and each gene range is fitted in a Ray task (what ``fit-head`` does
since the ranges moved to tasks); with it Ray is not started and the ranges are fitted one after another here.
Run it alone: it is the only work on the machine that the figure should count.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import resource
import time
from pathlib import Path

from geximpute.config import load_config
from geximpute.fit.hybrid import gene_composition, stacked_baselines, tuned_baselines
from geximpute.runtime.raytools import ensure_ray
from geximpute.science.baselines import ENTRY_METHODS
from geximpute.steps.pipeline import read_visible_problem
from geximpute.steps.prepare import read_problem_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("records", type=Path)
    parser.add_argument("--in-process", action="store_true", help="fit the gene ranges here, without Ray")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = load_config(args.config, [f"output_dir={args.records.parent}"])
    if not args.in_process:
        ensure_ray(config.ray)
    t = time.perf_counter()
    gene_ids, _ = read_problem_index(args.records)
    problem = read_visible_problem(config, gene_ids, args.records)
    print(f"problem {problem.values.shape} read in {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    composition = gene_composition(args.records, problem.gene_ids, config.promoter.upstream)
    baselines, _ = tuned_baselines(config, problem, composition, ENTRY_METHODS)
    print(f"tuned in {time.perf_counter() - t:.1f} s", flush=True)
    config = dataclasses.replace(config, baselines=baselines)
    t = time.perf_counter()
    oof, _ = stacked_baselines(config, problem, args.records, visible_grids=False)
    print(f"out of fold ({', '.join(oof.names)}) in {time.perf_counter() - t:.1f} s; this process's peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()

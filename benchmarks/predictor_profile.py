"""Where a predictor actor's CPU goes, per entry: one block of context records through ``Bundle.predict`` in this
process (no Ray), under cProfile, on one thread as the actors run.

Reads a work folder kept by ``geximpute benchmark --keep-work`` (its ``data-g1-d1`` data and ``g1-d1/model`` bundle):

    .venv/bin/python benchmarks/predictor_profile.py /tmp/bench/work [--entries 16384]

Prints seconds per entry in all, and the cumulative time of the networks (``run_network``), of the XGBoost head's
boosters (``xgboost.core.Booster.predict``) and of featurising (``featurize``).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="a benchmark work folder (geximpute benchmark --keep-work)")
    parser.add_argument("--point", default="g1-d1", help="which point's data and bundle (default g1-d1)")
    parser.add_argument("--entries", type=int, default=16384, help="records profiled (default 16384)")
    args = parser.parse_args()

    from geximpute.config import load_config
    from geximpute.fit.bundle import load_bundle
    from geximpute.science.promoters import no_promoters, one_hot_promoters
    from geximpute.science.shards import shard_records
    from geximpute.steps.impute import donor_promoter_sequences, imputation_problem
    from geximpute.steps.prepare import context_shards, read_shard

    torch.set_num_threads(1)
    config = load_config(args.work / f"data-{args.point}" / "config.yaml", [f"output_dir={args.work / args.point}"])
    problem, targets, _ = imputation_problem(config)
    bundle = load_bundle(args.work / args.point / "model")
    grids = bundle.baseline_grids(problem, targets) if bundle.stacked else None
    folder = Path(tempfile.mkdtemp(prefix="geximpute-profile-"))
    try:
        shards, _ = context_shards(config, problem, targets, np.zeros_like(targets), folder / "shards")
        records = shard_records(read_shard(shards[0]), config.context.k_neighbours, config.context.max_distance)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    records = records.slice(0, args.entries)
    haplotypes = donor_promoter_sequences(problem)
    length = bundle.models.network.spec.promoter_length
    promoters, embeddings = None, None
    if haplotypes is not None and bundle.reads_promoters:
        embeddings = bundle.encode_promoters(one_hot_promoters(haplotypes[0], length))
        promoters = (no_promoters(length), haplotypes[1])
    predict = lambda: bundle.predict(records, problem.gene_ids, promoters, baselines=grids,  # noqa: E731
                                     embeddings=embeddings)
    predict()  # warm: the networks are built on first use
    profile = cProfile.Profile(time.process_time)  # CPU time: the machine may be busy
    wall, cpu = time.perf_counter(), time.process_time()
    profile.enable()
    predict()
    profile.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = records.num_rows
    stats = pstats.Stats(profile)
    parts = {"networks": "run_network", "head boosters": "predict", "featurise": "featurize"}
    print(f"{n:,} records: {wall:.2f} s wall, {cpu:.2f} s CPU, {cpu / n * 1e6:.1f} us CPU per entry")
    for label, func in parts.items():
        total = sum(v[3] for k, v in stats.stats.items()
                    if k[2] == func and ("xgboost" in k[0] if label == "head boosters" else "geximpute" in k[0]
                                         or "engine" in k[0]))
        print(f"  {label:<14} {total:6.2f} s  {total / n * 1e6:6.1f} us per entry")


if __name__ == "__main__":
    main()

"""Benchmark of ``geximpute impute``: entries per second end to end into Parquet, and peak memory.

Generates a synthetic dataset (``geximpute.apps.synth.generate``) and trains a bundle on it with minimal training
(neither
is timed: imputation throughput depends on the model's size, not on how well it was trained; the network has the
default size of ``model``), then runs ``impute`` on a local single-node Ray: every missing entry, whole missing
donor-tissue profiles included, from context records through the predictor actors into Parquet and the atomic
commit. Prints one JSON line: entries, seconds, entries per second, and the peak resident memory of the driver, of
the Ray worker processes (``ray::*``, summed) and of the driver plus every process it started (GCS, raylet, workers).

    .venv/bin/python benchmarks/bench_impute.py --genes 1000 --donors 200 --tissues 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import psutil


class PeakMemory:
    """Samples resident memory every 0.2 s: this process, the Ray workers among its descendants, and all of them."""

    def __init__(self) -> None:
        self.driver = self.workers = self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                own = me.memory_info().rss
                workers = others = 0
                for child in me.children(recursive=True):
                    try:
                        rss = child.memory_info().rss
                        if " ".join(child.cmdline()).startswith("ray::"):
                            workers += rss
                        else:
                            others += rss
                    except psutil.Error:
                        continue
                self.driver = max(self.driver, own)
                self.workers = max(self.workers, workers)
                self.total = max(self.total, own + workers + others)
            except psutil.Error:
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--donors", type=int, default=200)
    parser.add_argument("--tissues", type=int, default=10)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--predictors", type=int, default=2, help="predictor actors (impute.predictors)")
    parser.add_argument("--batch-size", type=int, default=16384, help="impute.batch_size")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one); reused if it holds "
                        "data/ and model/ already")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import pyarrow.dataset as pads
    import ray

    from geximpute.apps.synth import SynthSpec, generate
    from geximpute.config import load_config
    from geximpute.steps.impute import impute
    from geximpute.steps.pipeline import build_bundle

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-impute-"))
    data = work / "data"
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        if not (data / "config.yaml").is_file():
            spec = SynthSpec(seed=0, n_genes=args.genes, n_donors=args.donors, n_tissues=args.tissues,
                             chrom_length=max(400_000, args.genes * 3_400 // 2))
            generate(data, spec)
        training = ["train.epochs=1", "train.max_examples_per_epoch=4000", "train.cpus_per_worker=1.0",
                    "train.fold_fraction=0.05", "head.num_boost_round=50", "head.cpus_per_worker=1.0",
                    "evaluation.task=entries"]
        bundle = work / "model"
        if not (bundle / "manifest.json").is_file():  # prepare (training folds) -> train -> fit-head -> bundle
            build_bundle(load_config(data / "config.yaml", [f"output_dir={work}", *training]), out=bundle)
            # a fresh Ray for the measured imputation: the training's idle workers (reused by its tasks, or left
            # idle) counted in the workers' peak, which a rerun on the same --work (model reused) did not have
            ray.shutdown()
            ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        config = load_config(data / "config.yaml", [f"output_dir={work}", f"impute.predictors={args.predictors}",
                                                    f"impute.batch_size={args.batch_size}"])
        with PeakMemory() as memory:
            t0 = time.perf_counter()
            result = impute(config, model=bundle, out_dir=work / "predictions")
            seconds = time.perf_counter() - t0
        assert pads.dataset(result.out_dir, format="parquet", partitioning="hive").count_rows() == result.n_rows
        files = list(result.out_dir.rglob("*.parquet"))
        print(json.dumps({
            "genes": args.genes, "donors": args.donors, "tissues": args.tissues,
            "entries": result.n_rows, "missing_profiles": result.n_missing_profiles,
            "seconds": round(seconds, 1), "entries_per_second": round(result.n_rows / seconds),
            "parquet_files": len(files), "parquet_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
            "peak_rss_driver_mib": round(memory.driver / 2**20),
            "peak_rss_ray_workers_mib": round(memory.workers / 2**20),
            "peak_rss_total_mib": round(memory.total / 2**20),
            "predictors": args.predictors, "batch_size": args.batch_size, "num_cpus": args.num_cpus,
            "cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 1),
        }))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

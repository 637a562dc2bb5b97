"""Benchmark of ``geximpute prepare``: seconds per million context records and peak memory.

Generates a synthetic dataset at the requested scale (not timed), runs ``prepare`` on a local single-node Ray
(all measured entries get a record), and prints one JSON line per scale with the wall time, the time per million
records, and the peak resident memory of the driver and of the driver plus every Ray process it started
(:class:`geximpute.apps.benchmark.PeakRSS`; ``geximpute benchmark`` measures every stage the same way).

    .venv/bin/python benchmarks/bench_prepare.py --genes 1000 --donors 100 --tissues 10 --scales 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from geximpute.apps.benchmark import PeakRSS
from geximpute.apps.synth import SynthSpec, generate
from geximpute.config import load_config
from geximpute.steps.prepare import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--donors", type=int, default=100)
    parser.add_argument("--tissues", type=int, default=10)
    parser.add_argument("--scales", type=int, nargs="+", default=[1], help="multiply donors by each of these")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-prepare-"))
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        for scale in args.scales:
            spec = SynthSpec(seed=0, n_genes=args.genes, n_donors=args.donors * scale, n_tissues=args.tissues,
                             chrom_length=max(400_000, args.genes * 4_000))
            data = generate(work / f"data-x{scale}", spec, overwrite=True)
            config = load_config(data.config_path, [f"output_dir={work / f'out-x{scale}'}",
                                                    f"ray.num_cpus={args.num_cpus}"])
            with PeakRSS() as peak:
                t0 = time.perf_counter()
                result = prepare(config, work / f"records-x{scale}", targets="all")
                seconds = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in (work / f"records-x{scale}").rglob("*.parquet"))
            print(json.dumps({
                "scale": scale, "genes": args.genes, "donors": args.donors * scale, "tissues": args.tissues,
                "records": result.n_records, "seconds": round(seconds, 2),
                "seconds_per_million_records": round(seconds / result.n_records * 1e6, 2),
                "peak_rss_driver_mb": round(peak.driver / 2**20), "peak_rss_total_mb": round(peak.total / 2**20),
                "parquet_mb": round(size / 2**20, 1), "num_cpus": args.num_cpus,
            }), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

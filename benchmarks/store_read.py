"""Reading the expression from its source file against reading it from an expression store (`geximpute ingest`),
with the code checked out where this runs, each in a fresh process:

    .venv/bin/python benchmarks/store_read.py CONFIG STORE      # ingest once, then each read twice, alternating

``CONFIG`` names the expression file (e.g. ``benchmarks/driver_inputs.py make``'s 20,000 genes x 17,382 samples of
counts); ``STORE`` is where the store is written (replaced if it is an earlier store). Each read is what a run
does first (``read_expression`` into a matrix file beside the store, as ``impute`` and ``nightly`` keep it); it prints
the seconds, the process's peak resident memory (VmHWM) and checks that both reads give the same values.
"""

import json
import subprocess
import sys
import time
from pathlib import Path


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def read_one(config_path: str, store: str, which: str) -> None:
    import hashlib

    import numpy as np

    from geximpute.config import load_config
    from geximpute.io.expression import read_expression

    config = load_config(config_path)
    path = config.inputs.expression if which == "source" else store
    matrix = Path(store).parent / f".bench-{which}.f32"
    t0 = time.perf_counter()
    expr = read_expression(path, config.inputs.expression_format if which == "source" else "store",
                           config.inputs.scale, matrix=matrix)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256()
    for lo in range(0, expr.values.shape[0], 1000):
        digest.update(np.ascontiguousarray(expr.values[lo : lo + 1000]).tobytes())
    digest.update("\n".join(expr.gene_ids).encode())
    matrix.unlink()
    print(json.dumps({"read": which, "seconds": round(seconds, 1), "peak_mib": round(peak_mib()),
                      "shape": list(expr.values.shape), "sha256": digest.hexdigest()}))


def main() -> None:
    if sys.argv[1] == "--one":
        read_one(*sys.argv[2:5])
        return
    config, store = sys.argv[1], sys.argv[2]
    load = lambda: Path("/proc/loadavg").read_text().split()[:3]  # noqa: E731
    print("load average at the start", load())
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "geximpute.apps.cli", "ingest", "--config", config, "--out", store],
                   check=True)
    print(json.dumps({"ingest_seconds": round(time.perf_counter() - t0, 1)}))
    from geximpute.config import load_config

    source = Path(load_config(config).inputs.expression)
    sizes = sum(p.stat().st_size for p in Path(store).rglob("*.parquet"))
    print(json.dumps({"store_bytes": sizes, "source_bytes": source.stat().st_size}))
    results = []
    for which in ("source", "store", "source", "store"):
        out = subprocess.run([sys.executable, __file__, "--one", config, store, which], check=True,
                             capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(out.strip().splitlines()[-1], flush=True)
    assert len({r["sha256"] for r in results}) == 1, "the source and the store read differently"
    print("same values from both; load average at the end", load())


if __name__ == "__main__":
    main()

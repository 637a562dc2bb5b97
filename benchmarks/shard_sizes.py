"""Bytes of the context stage's shard files of an imputation (cut as ``impute`` cuts them, without the stacked
baselines' columns), with the code checked out where this runs; in process, no Ray:

    .venv/bin/python benchmarks/shard_sizes.py OUT     # OUT of benchmarks/genome_scale_run.py
"""

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from geximpute.config import load_config
from geximpute.steps.impute import BLOCK_ENTRIES, imputation_problem
from geximpute.steps.prepare import context_shards

out = Path(sys.argv[1])
config = load_config(out / "data-big" / "config.yaml", [f"output_dir={out}/big"])
t = time.time()
problem, targets, virtual = imputation_problem(config)
print("problem", round(time.time() - t, 1), "s", targets.sum(), "entries", flush=True)
folder = Path(tempfile.mkdtemp(prefix="shard-sizes-"))
try:
    t = time.time()
    shards, cut = context_shards(config, problem, targets, np.zeros_like(targets), folder / "s",
                                 block_entries=BLOCK_ENTRIES)
    sizes = [os.path.getsize(f) for f in shards]
    print(f"{len(shards)} shards, {sum(sizes)/2**30:.2f} GiB, largest {max(sizes)/2**20:.1f} MiB, mean "
          f"{np.mean(sizes)/2**20:.2f} MiB, {time.time()-t:.0f} s", flush=True)
finally:
    shutil.rmtree(folder, ignore_errors=True)

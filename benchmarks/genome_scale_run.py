"""Issue 15's large run: 20,000 genes x 200 donors x 20 tissues (synthetic, with a VCF) imputed end to end.

The bundle is trained on the same genes, genome and tissues with 6 donors (the gene set, tissues and genome must
match; donors need not: training at 200 donors would prepare 47 million records), then ``geximpute impute`` runs on
the 200-donor data in a driver process of its own with the peak RSS of each process kind sampled
(:func:`geximpute.apps.benchmark.impute_point`). Data and bundle already in OUT are reused (only the imputation
runs again).

    .venv/bin/python benchmarks/genome_scale_run.py OUT      # writes OUT/pred-<time>.json, OUT/big.log
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

GENES, DONORS, TISSUES = 20_000, 200, 20
TRAIN_DONORS = int(os.environ.get("TRAIN_DONORS", 6))


def main(out: Path) -> None:
    import ray

    from geximpute.apps.benchmark import TRAINING_OVERRIDES, BenchSpec, impute_point, measured, measured_bundle
    from geximpute.apps.synth import generate
    from geximpute.config import load_config
    from geximpute.runtime.raytools import ensure_ray

    out.mkdir(parents=True, exist_ok=True)
    spec = BenchSpec(genes=GENES, donors=DONORS, tissues=TISSUES, scales=(1,), gene_scales=(1,))
    log = (out / "big.log").open("a")

    def say(*parts: object) -> None:
        line = " ".join([time.strftime("%H:%M:%S"), *map(str, parts)])
        print(line, file=log, flush=True)
        print(line, flush=True)

    def overrides(folder: Path) -> list[str]:
        return [f"output_dir={folder}", f"train.epochs={spec.epochs}",
                f"train.max_examples_per_epoch={spec.max_examples}", *TRAINING_OVERRIDES]

    say("load average", os.getloadavg())
    stages: dict[str, dict] = {}
    big, small = out / "data-big", out / "data-small"
    with measured(stages, "synth"):
        if not (big / "config.yaml").exists():
            generate(big, spec.synth_spec(1, 1), overwrite=True)
        if not (small / "config.yaml").exists():
            generate(small, dataclasses.replace(spec.synth_spec(1, 1), n_donors=TRAIN_DONORS), overwrite=True)
    for name in ("genes.gtf", "genome.fa"):  # the bundle must fit the big data's genes and genome
        digests = {hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (big, small)}
        if len(digests) != 1:
            raise SystemExit(f"{name} differs between {big} and {small}")
    config = load_config(small / "config.yaml", overrides(out / "small"))
    started = ensure_ray(config.ray)
    try:
        address = ray.get_runtime_context().gcs_address
        if not (out / "small" / "model" / "manifest.json").exists():
            measured_bundle(config, out / "small", stages)
            say("bundle", {k: {kk: vv for kk, vv in v.items() if not isinstance(vv, dict)} for k, v in stages.items()})
        load = os.getloadavg()
        say("impute start, load average", load)
        # a folder of its own each time: an imputation already committed there would be found done and skipped
        pred = out / time.strftime("pred-%Y%m%dT%H%M%S")
        point = impute_point(big / "config.yaml", overrides(out / "big"), out / "small" / "model", pred, address)
        point.update(point=f"g{GENES}-d{DONORS}-t{TISSUES}", genes=GENES, donors=DONORS, tissues=TISSUES,
                     load=[load, os.getloadavg()])
        say("impute", json.dumps(point))
        (pred.parent / f"{pred.name}.json").write_text(json.dumps({"point": point, "stages": stages}, indent=1) + "\n")
    finally:
        if started:
            ray.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

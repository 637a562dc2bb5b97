"""Personal genomes against the planted truth: across-donor Pearson on held-out donors, per gene.

Generates a synthetic dataset with planted promoter eQTLs of known cis-heritability (``geximpute synth``), hides a
fraction of whole donors (``evaluation.task: samples`` with ``whole_donors``), and runs ``geximpute evaluate``
with the genotype-aware hybrid, the same hybrid on the reference genome only, the elastic-net baseline and the
tissue-donor baseline. Prints the per-gene means of the genotype table next to the ceiling ``sqrt(h2)``, split by
the kind of planted effect: additive promoter eQTLs, and, with ``--motif-eqtl-fraction``, motif-loss eQTLs (two
SNVs in one planted motif copy, either of which destroys it: an effect that is not additive in the dosages), with
the paired bootstrap intervals of the hybrid against the elastic net on each kind.

    .venv/bin/python benchmarks/bench_genotypes.py --genes 300 --donors 200 --tissues 5 --out /tmp/bench-genotypes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from geximpute.apps.cli import main as cli


def run(out: Path, genes: int, donors: int, tissues: int, epochs: int, seed: int,
        motif_eqtl_fraction: float = 0.0) -> dict:
    """Generate, evaluate and return ``metrics.json``'s genotype table and timings."""
    data = out / "data"
    made = {"genes": genes, "donors": donors, "tissues": tissues, "seed": seed,
            "motif_eqtl_fraction": motif_eqtl_fraction}
    recorded = data / "bench_genotypes.json"  # what the data in `out` were made with: a rerun reuses them
    if (data / "config.yaml").is_file():
        before = json.loads(recorded.read_text()) if recorded.is_file() else None
        if before != made:
            raise SystemExit(f"{data}: made with {before or 'settings not recorded'}, not {made}: give another "
                             "--out (the data are reused, not made again)")
    else:
        code = cli(["-q", "synth", "--out", str(data), "--genes", str(genes), "--donors", str(donors), "--tissues",
                    str(tissues), "--seed", str(seed), "--motif-eqtl-fraction", str(motif_eqtl_fraction)])
        if code:
            raise SystemExit(code)
        recorded.write_text(json.dumps(made) + "\n")
    config = yaml.safe_load((data / "config.yaml").read_text())
    config.update({
        "name": "synthetic-eqtl",
        "output_dir": str(out / "work"),
        "evaluation": {"task": "samples", "whole_donors": True, "fraction": 0.25, "min_donors": 10,
                       "methods": ["tissue_donor", "elastic_net", "hybrid", "hybrid_reference"], "ablations": False,
                       "heritability": str(data / "truth" / "genes.tsv")},
        "train": {"epochs": epochs, "folds": 2},
    })
    path = data / "eqtl.yaml"  # beside the data: its paths are relative to the config's folder
    path.write_text(yaml.safe_dump(config))
    t0 = time.perf_counter()
    code = cli(["-q", "evaluate", "--config", str(path), "--out", str(out / "eval")])
    if code:
        raise SystemExit(code)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    genetic = metrics["genetic"]
    return {
        **made, "epochs": epochs,
        "n_genes_scored": genetic["n_genes"], "n_heritable_genes": genetic.get("n_heritable_genes"),
        "mean_all": genetic["mean"], "mean_heritable": genetic.get("mean_heritable"),
        "by_effect": {key.removeprefix("mean_effect_"): {"n_genes": genetic["n_genes_effect_" + key.removeprefix(
            "mean_effect_")], **genetic[key]} for key in genetic if key.startswith("mean_effect_")},
        "hybrid_vs_elastic_net": {name.removeprefix("genetic_effect_"):
                                  comparison.get("comparisons", {}).get("elastic_net")
                                  for name, comparison in metrics.get("comparisons", {}).items()
                                  if name.startswith("genetic_effect_")},
        "hybrid_coverage_80": metrics["methods"]["hybrid"].get("coverage_80"),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--genes", type=int, default=300)
    parser.add_argument("--donors", type=int, default=200)
    parser.add_argument("--tissues", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--motif-eqtl-fraction", type=float, default=0.25,
                        help="share of genes with a planted motif-loss eQTL (non-additive; default 0.25)")
    args = parser.parse_args()
    print(json.dumps(run(args.out, args.genes, args.donors, args.tissues, args.epochs, args.seed,
                         args.motif_eqtl_fraction), indent=1))


if __name__ == "__main__":
    main()

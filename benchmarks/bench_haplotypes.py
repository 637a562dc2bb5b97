"""Benchmark of :func:`geximpute.science.haplotypes.build_haplotypes` on the real 1000 Genomes subset.

Reads the real hg38 pieces, the 1000 Genomes phase 3 chr17 subset (139 sites x 1,126 people) and the genes of an
annotation whose whole promoter window lies in the sequence, then builds every donor's two promoter haplotypes.
Prints one JSON line per annotation: genes, donors, haplotype slots, sequences built (distinct haplotypes per gene,
summed), unique sequences, their ratio and the wall time of the build (best and median of ``--repeats``; reading
the inputs is timed apart).

    .venv/bin/python benchmarks/bench_haplotypes.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from geximpute import schema as S
from geximpute.config import PromoterConfig
from geximpute.io.dataset import promoter_coverage
from geximpute.io.fasta import Genome
from geximpute.io.genes import read_genes
from geximpute.io.variants import read_variants
from geximpute.science.haplotypes import build_haplotypes

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
ANNOTATIONS = {
    "xpresso": "coordinates/xpresso_hg38_cage_corrected_tss.tsv",  # the configs' TSS table, genome-wide
    "gencode_chr17": "coordinates/gencode_v45_chr17_genes_hg38.tsv",  # every GENCODE v45 gene of chr17
}
VCF = "genotypes/1KG_phase3_subset_chr17p_0-7.84Mb_lifted_hg38.vcf.gz"
FASTA = "sequence/hg38_prefixes.fa.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REAL, help="the real data folder (default: ../shared/data/real)")
    parser.add_argument("--upstream", type=int, default=1000)
    parser.add_argument("--downstream", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    promoter = PromoterConfig(upstream=args.upstream, downstream=args.downstream)
    with Genome(args.data / FASTA) as genome:
        t0 = time.perf_counter()
        variants = read_variants(args.data / VCF, genome, genome_partial=True)
        read_vcf_s = time.perf_counter() - t0
        for name, path in ANNOTATIONS.items():
            genes = read_genes(args.data / path, genome=genome, genome_partial=True).table
            full = promoter_coverage(genes, genome, promoter.upstream, promoter.downstream)
            genes = genes.filter(full)
            seconds = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                haps = build_haplotypes(genome, genes, variants, promoter)
                seconds.append(time.perf_counter() - t0)
            r = haps.report
            personal = (haps.rows != haps.reference_row[:, None, None]).any(axis=(1, 2))
            chroms = sorted(set(genes[S.CHROM].to_pylist()))
            print(json.dumps({
                "annotation": name, "genes": r["n_genes"], "genes_with_window": r["n_genes_with_window"],
                "chroms": chroms, "window": f"{promoter.upstream}+{promoter.downstream}",
                "donors": r["n_donors"], "vcf_sites": variants.sites.num_rows,
                "sites_in_windows": r["n_sites_in_windows"], "haplotype_slots": r["n_haplotype_slots"],
                "distinct_built": r["n_distinct_per_gene_sum"], "unique_sequences": r["n_unique_sequences"],
                "unique_ratio": r["unique_ratio"], "indels_applied": r["n_indels_applied"],
                "genes_with_personal_haplotype": int(personal.sum()),
                "build_seconds_best": round(min(seconds), 4),
                "build_seconds_median": round(statistics.median(seconds), 4),
                "read_vcf_seconds": round(read_vcf_s, 3),
            }), flush=True)


if __name__ == "__main__":
    main()

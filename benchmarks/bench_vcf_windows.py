"""Memory of reading a whole-chromosome VCF of many donors in the model's windows only (issue 14).

Writes a synthetic bgzipped VCF (one chromosome, one SNP per ``--spacing`` bases, ``--donors`` unphased diploid
genomes), indexes it with htslib's own ``bcf_index_build`` (the htslib linked into cyvcf2; a ``.csi`` index, as
``bcftools index`` writes), then reads it with :func:`geximpute.io.variants.read_variants` in fresh processes:

- the windows of ``--genes`` genes (``+/- --window`` bases around evenly spaced TSSs) through the index,
- the same windows without an index (every record streamed, only those inside a window kept),
- the whole file.

and prints each read's sites, wall time and peak RSS (``ru_maxrss``) as JSON.

    .venv/bin/python benchmarks/bench_vcf_windows.py --out /tmp/bench-vcf --donors 1000 --length 50000000
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cyvcf2
import numpy as np
from Bio import bgzf


def write_vcf(path: Path, donors: int, length: int, spacing: int, seed: int) -> int:
    """A bgzipped VCF of one chromosome ``chr1``; returns the number of sites."""
    rng = np.random.default_rng(seed)
    positions = np.arange(spacing // 2, length, spacing) + rng.integers(0, spacing // 2, length // spacing)
    positions = np.unique(positions[positions < length])
    codes = np.array(["0/0", "0/1", "1/1", "./."])
    header = ["##fileformat=VCFv4.2", f"##contig=<ID=chr1,length={length}>",
              '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
              "\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT",
                         *(f"D{i:05d}" for i in range(donors))])]
    with bgzf.BgzfWriter(str(path), "wb") as out:
        out.write(("\n".join(header) + "\n").encode())
        for start in range(0, len(positions), 2000):
            block = positions[start:start + 2000]
            freq = rng.uniform(0.01, 0.5, len(block))
            gt = rng.binomial(2, freq[:, None], (len(block), donors))
            gt[rng.random(gt.shape) < 0.001] = 3  # a few missing calls
            lines = [f"chr1\t{p}\t.\tA\tG\t.\tPASS\t.\tGT\t" + "\t".join(codes[row])
                     for p, row in zip(block, gt, strict=True)]
            out.write(("\n".join(lines) + "\n").encode())
    return len(positions)


def index(path: Path) -> Path:
    """``path.csi`` built by htslib's ``bcf_index_build`` (VCF.gz or BCF), from the htslib inside cyvcf2."""
    lib = ctypes.CDLL(str(next(Path(cyvcf2.__file__).parent.glob("cyvcf2*.so"))))
    lib.bcf_index_build.argtypes = [ctypes.c_char_p, ctypes.c_int]
    code = lib.bcf_index_build(str(path).encode(), 14)
    if code != 0:
        raise SystemExit(f"{path}: bcf_index_build failed ({code})")
    return path.with_name(path.name + ".csi")


READ = """
import json, resource, sys, time
from geximpute.io.variants import read_variants
path, regions = sys.argv[1], json.loads(sys.argv[2])
t = time.perf_counter()
v = read_variants(path, regions=None if regions is None else [tuple(r) for r in regions])
print(json.dumps({"sites": v.sites.num_rows, "indexed": v.report["indexed"], "seconds": time.perf_counter() - t,
                  "genotype_mib": v.genotypes.nbytes / 2**20,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(path: Path, regions: list | None) -> dict:
    out = subprocess.run([sys.executable, "-c", READ, str(path), json.dumps(regions)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--donors", type=int, default=1000)
    parser.add_argument("--length", type=int, default=50_000_000)
    parser.add_argument("--spacing", type=int, default=1000)
    parser.add_argument("--genes", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--window", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    vcf = args.out / "chr1.vcf.gz"
    t = time.perf_counter()
    if not vcf.is_file():
        n_sites = write_vcf(vcf, args.donors, args.length, args.spacing, args.seed)
        index(vcf)
    else:
        n_sites = None
    plain = args.out / "noindex" / "chr1.vcf.gz"  # the same file with no index beside it
    plain.parent.mkdir(exist_ok=True)
    if not plain.is_file():
        shutil.copy(vcf, plain)
    results = {"file": {"path": str(vcf), "mib": vcf.stat().st_size / 2**20, "sites": n_sites,
                        "donors": args.donors, "length": args.length, "written_s": time.perf_counter() - t}}
    for n in args.genes:
        tss = np.linspace(args.window, args.length - args.window, n).astype(int)
        regions = [("chr1", max(1, int(x - args.window)), int(x + args.window)) for x in tss]
        results[f"{n}_genes_indexed"] = measure(vcf, regions)
        results[f"{n}_genes_streamed"] = measure(plain, regions)
    results["whole_file"] = measure(vcf, None)
    print(json.dumps(results, indent=1))
    (args.out / "bench.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

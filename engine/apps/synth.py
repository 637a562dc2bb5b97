"""Synthetic datasets with planted effects and their written-down truth, for tests, demos and benchmarks.

:func:`generate` writes a small genome (FASTA), a GENCODE-style annotation (GTF), an expression matrix with
missing samples and missing entries (GCT 1.2, TPM), a sample table, phased personal genomes (VCF) and a
``config.yaml`` that :func:`geximpute.config.load_config` reads as it is, plus the hidden truth under ``truth/``.
Every draw comes from ``numpy.random.default_rng(spec.seed)``, so one spec always gives byte-identical files.

The planted model, on the log1p(TPM) scale, for gene g, donor d and tissue t::

    y[g,d,t] = max(0, base[g] + motif[g]                          # gene level; motif read from the sequence
                    + mu[t] + L[g] . F[t] + lam[g] * m[k(g), t]    # tissue part: K latent factors + module
                    + u[d] + lam[g] * delta[d, k(g)]               # donor offset + donor x module
                    + sum_j beta[g,j] * (x[j,d] - mean_d x[j])     # promoter eQTLs; x = ALT dosage
                    + c[g] * (l[g,d] - mean_d l[g])               # motif-loss eQTLs (0 unless asked for)
                    + e[g,d,t])                                    # noise

``motif[g] = a * n_activator[g] - b * n_repressor[g]`` counts the planted 8-mers in g's strand-oriented
promoter window; ``k(g)`` is g's neighbourhood, a contiguous block of genes on one chromosome. The parameter
values are in :class:`_ModelParams` and are copied into ``truth/truth.json``.

The promoter eQTLs are additive in the ALT dosage by construction. With ``SynthSpec.motif_eqtl_fraction`` > 0
some genes get a planted effect that is not: two SNVs inside one planted motif copy, either of which destroys the
copy on its haplotype. ``l[g,d]`` counts donor d's haplotypes (0-2) that lost the copy, and ``c[g] = -a/2`` for an
activator copy (``+b/2`` for a repressor): exactly what the motif term above gives a diploid whose two haplotypes
carry ``n`` and ``n - 1`` copies. A haplotype with both ALT alleles loses the copy once, so the effect is an OR
on each haplotype (an interaction of the two sites' alleles in phase), not a sum of per-site dosage effects.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from geximpute import schema as S
from geximpute.config import load_config

_LETTERS = np.frombuffer(b"ACGT", dtype=np.uint8)
_LOWER = np.frombuffer(b"acgt", dtype=np.uint8)
_COMPLEMENT = str.maketrans("ACGT", "TGCA")
_TRANSITION = {"A": "G", "G": "A", "C": "T", "T": "C"}
_FASTA_WIDTH = 60

#: the files written at the top of the output folder and under ``truth/``
FILES = {
    "genome": "genome.fa",
    "genes": "genes.gtf",
    "expression": "expression.gct",
    "samples": "samples.tsv",
    "variants": "variants.vcf",
    "config": "config.yaml",
    "truth_genes": "truth/genes.tsv",
    "truth_eqtls": "truth/eqtls.tsv",
    "truth_tissue_correlation": "truth/tissue_correlation.tsv",
    "truth_expression": "truth/expression_full.parquet",
    "truth_summary": "truth/truth.json",
}


@dataclass(frozen=True)
class _ModelParams:
    """Fixed parameters of the planted model (recorded in ``truth.json``).

    Standard deviations are on the log1p(TPM) scale.
    """

    gc: float = 0.42  # genome-wide GC content of the random background
    soft_mask_fraction: float = 0.10  # target share of lower-case bases
    soft_mask_length: tuple[int, int] = (100, 800)  # range of one soft-masked stretch
    gene_length_median: float = 1500.0
    gene_length_range: tuple[int, int] = (400, 10_000)
    min_tss_gap: int = 100  # no two TSSs closer than this, so that every window is distinct
    divergent_pair_rate: float = 0.06  # share of adjacent pairs made head-to-head (bidirectional promoters)
    overlapping_pair_rate: float = 0.04  # share of adjacent pairs made convergent with overlapping bodies
    neighbourhood_size: tuple[int, int] = (2, 8)
    motif_length: int = 8
    max_motif_copies: int = 3
    activator_effect: float = 0.6  # a: added per activator copy
    repressor_effect: float = 0.5  # b: subtracted per repressor copy
    base_mean: float = 2.8
    base_sd: float = 0.8
    base_range: tuple[float, float] = (0.5, 5.5)
    tissue_mean_sd: float = 0.2  # mu[t]
    n_tissue_factors: int = 3  # K
    tissue_factor_shift: float = 1.0  # added to the first factor so that most tissue pairs correlate positively
    tissue_loading_sd: float = 0.4  # L[g, :]
    module_profile_sd: float = 0.4  # m[k, t]
    module_loading_range: tuple[float, float] = (0.5, 1.5)  # lam[g]
    donor_offset_sd: float = 0.15  # u[d]
    donor_module_sd: float = 0.2  # delta[d, k]
    noise_sd_range: tuple[float, float] = (0.2, 0.4)  # per gene
    h2_range: tuple[float, float] = (0.2, 0.7)
    second_eqtl_weight: tuple[float, float] = (0.2, 0.6)  # relative to the first, so the strongest is clear
    outside_variant_fraction: float = 0.1  # sites outside every promoter, relative to promoter sites
    deletion_rate: float = 0.02
    insertion_rate: float = 0.02
    multiallelic_rate: float = 0.02
    eqtl_af_range: tuple[float, float] = (0.05, 0.95)  # so that every planted effect is observable
    # each of a motif-loss copy's two SNVs: a haplotype keeps the copy with probability (1 - p1)(1 - p2)
    motif_loss_af_range: tuple[float, float] = (0.1, 0.35)
    other_af_range: tuple[float, float] = (0.01, 0.99)


_MODEL = _ModelParams()
# Lower bound on the average TSS spacing a spec must leave room for (checked in SynthSpec).
_MIN_MEAN_SPACING = 500


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. Checked on construction: a bad value raises ``ValueError`` naming the field.

    Attributes:
        seed: seed of ``numpy.random.default_rng``; the same spec always gives the same bytes.
        n_chroms: chromosomes ``chr1..chrN``.
        chrom_length: bases per chromosome.
        n_genes: genes, spread evenly over the chromosomes, on both strands, with a few head-to-head
            (divergent) pairs and a few convergent pairs whose bodies overlap.
        n_donors: donors (VCF samples).
        n_tissues: tissues.
        observed_cell_fraction: share of (donor, tissue) cells that have a sample. Every donor keeps at least
            one tissue and every tissue at least three donors, so the achieved share can be higher; it is in
            ``truth.json``.
        missing_entry_fraction: share of (gene, sample) values left blank within the present samples.
        eqtl_gene_fraction: share of genes with planted promoter eQTLs.
        motif_eqtl_fraction: share of genes with a planted motif-loss eQTL (two SNVs inside one planted motif
            copy, either of which destroys it: a non-additive effect), drawn among the genes with a planted copy
            and no additive eQTL. 0 (the default) draws nothing, so datasets of earlier versions stay byte-identical.
        variants_per_promoter: mean number of variant sites per promoter window (eQTL genes get at least 2).
        upstream: promoter window, bases 5' of the TSS (written to the config's ``promoter`` section).
        downstream: promoter window, bases 3' of the TSS, the TSS included.
    """

    seed: int = 0
    n_chroms: int = 2
    chrom_length: int = 400_000
    n_genes: int = 240
    n_donors: int = 40
    n_tissues: int = 6
    observed_cell_fraction: float = 0.6
    missing_entry_fraction: float = 0.02
    eqtl_gene_fraction: float = 0.5
    motif_eqtl_fraction: float = 0.0
    variants_per_promoter: int = 3
    upstream: int = 1000
    downstream: int = 500

    def __post_init__(self) -> None:
        _check_int(self, "seed", 0)
        _check_int(self, "n_chroms", 1)
        _check_int(self, "n_genes", self.n_chroms, "at least one gene per chromosome (n_chroms)")
        _check_int(self, "n_donors", 3, "at least 3, since every tissue keeps 3 donors")
        _check_int(self, "n_tissues", 1)
        _check_int(self, "variants_per_promoter", 0)
        _check_int(self, "upstream", 0)
        _check_int(self, "downstream", 1)
        _check_int(self, "chrom_length", 1)
        _check_fraction(self, "observed_cell_fraction", low_open=True)
        _check_fraction(self, "missing_entry_fraction", high=0.5)
        _check_fraction(self, "eqtl_gene_fraction")
        _check_fraction(self, "motif_eqtl_fraction")
        window = self.upstream + self.downstream
        room = _MODEL.max_motif_copies * 2 * _MODEL.motif_length * 4
        if window < room:
            raise ValueError(
                f"SynthSpec.upstream={self.upstream}, downstream={self.downstream}: expected a promoter "
                f"window of at least {room} bp in all, to leave room for the planted motifs"
            )
        per_chrom = math.ceil(self.n_genes / self.n_chroms)
        need = 2 * window + 1 + per_chrom * _MIN_MEAN_SPACING
        if self.chrom_length < need:
            raise ValueError(
                f"SynthSpec.chrom_length={self.chrom_length}: expected at least {need} to fit {per_chrom} "
                f"genes per chromosome ({_MIN_MEAN_SPACING} bp apart on average) with every TSS {window} bp "
                "from the ends"
            )


def _check_int(spec: SynthSpec, name: str, minimum: int, expected: str | None = None) -> None:
    value = getattr(spec, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"SynthSpec.{name}={value!r}: expected {expected or f'an integer >= {minimum}'}")


def _check_fraction(spec: SynthSpec, name: str, *, low_open: bool = False, high: float = 1.0) -> None:
    value = getattr(spec, name)
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and value <= high
    if not ok:
        low = "0 < x" if low_open else "0 <= x"
        raise ValueError(f"SynthSpec.{name}={value!r}: expected a number with {low} <= {high}")


@dataclass(frozen=True)
class SynthResult:
    """What :func:`generate` wrote.

    Attributes:
        out_dir: the dataset folder.
        config_path: ``out_dir / "config.yaml"``, ready for :func:`geximpute.config.load_config`.
        truth: the summary also written to ``truth/truth.json``.
    """

    out_dir: Path
    config_path: Path
    truth: dict


@dataclass
class _Dataset:
    """Everything drawn for one spec, held in memory until it is written."""

    spec: SynthSpec
    chroms: list[str]
    seqs: list[np.ndarray]  # per chromosome, base codes 0..3 (ACGT), upper-case, motifs planted
    masks: list[np.ndarray]  # per chromosome, True where soft-masked
    motifs: tuple[str, str]  # activator, repressor (5'->3' on the gene's strand)
    genes: pd.DataFrame  # one row per gene, sorted by chrom, start
    exons: list[list[tuple[int, int]]]  # per gene, in transcript order
    sites: pd.DataFrame  # one row per VCF record
    haplotypes: np.ndarray  # (n_sites, n_donors, 2) allele index, 0 = REF
    eqtls: pd.DataFrame  # one row per (site, gene) planted effect
    donors: list[str]
    tissues: list[str]
    present: np.ndarray  # (n_donors, n_tissues) bool
    samples: pd.DataFrame  # sample_id, donor_id, tissue (+ donor/tissue indices), present cells only
    y: np.ndarray  # (n_genes, n_donors, n_tissues) log1p TPM, the truth
    missing: np.ndarray  # (n_genes, n_samples) bool, entries left blank
    tissue_correlation: np.ndarray  # (n_tissues, n_tissues)
    summary: dict = dataclasses.field(default_factory=dict)


# Public entry point -----------------------------------------------------------------------------------------


def generate(out_dir: str | Path, spec: SynthSpec | None = None, *, overwrite: bool = False) -> SynthResult:
    """Draw a synthetic dataset for ``spec`` and write it, with its truth, into ``out_dir``.

    The files are written into a staging folder beside ``out_dir`` and renamed into place only once all of
    them are written and ``config.yaml`` loads; on any error the staging folder is removed, so ``out_dir`` is
    either absent, untouched or complete.

    Args:
        out_dir: the dataset folder to create.
        spec: what to generate (default: ``SynthSpec()``).
        overwrite: replace ``out_dir`` when it exists and is not empty.

    Returns:
        The folder, its config path and the truth summary.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty (or is a file) and ``overwrite`` is False.
    """
    spec = SynthSpec() if spec is None else spec
    out_dir = Path(out_dir).expanduser().absolute()
    _check_target(out_dir, overwrite)
    data = _simulate(spec)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        if staging.exists():
            shutil.rmtree(staging)  # left by an earlier crash of a process with our pid
        (staging / "truth").mkdir(parents=True)
        _write_fasta(staging / FILES["genome"], data)
        _write_gtf(staging / FILES["genes"], data)
        _write_gct(staging / FILES["expression"], data)
        _write_samples(staging / FILES["samples"], data)
        _write_vcf(staging / FILES["variants"], data)
        _write_truth(staging, data)
        _write_config(staging / FILES["config"], data)
        _validate_config(staging / FILES["config"], spec)
        _commit(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SynthResult(out_dir=out_dir, config_path=out_dir / FILES["config"], truth=data.summary)


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_file() or out_dir.is_symlink():
        raise FileExistsError(f"{out_dir}: exists and is not a folder; pass another path for the synthetic dataset")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir}: folder exists and is not empty; pass overwrite=True (`geximpute synth --overwrite`) to "
            "replace it, or choose another path"
        )


def _commit(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``, moving an existing ``out_dir`` aside first and deleting it after."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        out_dir.rename(old)
    try:
        staging.rename(out_dir)
    except BaseException:
        if old is not None:
            old.rename(out_dir)  # put the previous dataset back rather than leave nothing
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# Simulation -------------------------------------------------------------------------------------------------


def _simulate(spec: SynthSpec) -> _Dataset:
    """Draw every part of the dataset in memory, in a fixed order."""
    # One child stream per component, so that a change in how many draws one component makes leaves the
    # others' draws unchanged.
    names = (
        "motifs",
        "layout",
        "genome",
        "plant",
        "variants",
        "genotypes",
        "samples",
        "expression",
        "missing",
        "motif_eqtls",  # last: appending a stream leaves the others' draws as they were
    )
    rng = dict(zip(names, np.random.default_rng(spec.seed).spawn(len(names)), strict=True))
    chroms = [f"chr{i + 1}" for i in range(spec.n_chroms)]
    motifs = _draw_motifs(rng["motifs"])
    patterns = _patterns(motifs)
    genes, exons = _layout_genes(spec, chroms, rng["layout"])
    seqs, masks = _build_genome(spec, patterns, rng["genome"])
    motif_bases = _plant_motifs(spec, genes, seqs, masks, motifs, rng["plant"])
    n_act, n_rep = _count_motifs(spec, genes, seqs, motifs)
    genes["n_activator_motifs"] = n_act
    genes["n_repressor_motifs"] = n_rep
    genes["motif_effect"] = _MODEL.activator_effect * n_act - _MODEL.repressor_effect * n_rep
    sites, eqtls = _draw_variants(spec, chroms, genes, seqs, motif_bases, patterns, rng["variants"])
    if spec.motif_eqtl_fraction > 0:
        sites, eqtls = _draw_motif_loss(spec, chroms, genes, seqs, motifs, patterns, sites, eqtls, rng["motif_eqtls"])
    else:
        eqtls = eqtls.assign(kind="additive", group=-1)
    haplotypes = _draw_genotypes(sites, spec.n_donors, rng["genotypes"])
    donors = [f"SYN-D{i + 1:0{max(4, len(str(spec.n_donors)))}d}" for i in range(spec.n_donors)]
    width = max(2, len(str(spec.n_tissues)))
    tissues = [f"Tissue{t + 1:0{width}d}" for t in range(spec.n_tissues)]
    present = _draw_present_cells(spec, rng["samples"])
    samples = _sample_table(present, donors, tissues)
    y, eqtls, corr = _simulate_expression(spec, genes, sites, haplotypes, eqtls, rng["expression"])
    missing = _draw_missing(spec, len(genes), len(samples), rng["missing"])
    data = _Dataset(
        spec=spec,
        chroms=chroms,
        seqs=seqs,
        masks=masks,
        motifs=motifs,
        genes=genes,
        exons=exons,
        sites=sites,
        haplotypes=haplotypes,
        eqtls=eqtls,
        donors=donors,
        tissues=tissues,
        present=present,
        samples=samples,
        y=y,
        missing=missing,
        tissue_correlation=corr,
    )
    data.summary = _summarise(data)
    return data


def _revcomp(seq: str) -> str:
    return seq.translate(_COMPLEMENT)[::-1]


def _patterns(motifs: tuple[str, str]) -> tuple[str, ...]:
    """The motifs and their reverse complements: every string scrubbed from the background."""
    return tuple(p for m in motifs for p in (m, _revcomp(m)))


def _draw_motifs(rng: np.random.Generator) -> tuple[str, str]:
    """Draw an activator and a repressor 8-mer that can be counted unambiguously.

    No motif (or reverse complement) may overlap itself or another one by a proper prefix/suffix; then copies
    planted side by side into a background free of all four strings create no extra occurrences, and
    ``str.count`` on a window gives exactly the number planted there.
    """
    k = _MODEL.motif_length
    while True:
        act, rep = ("".join("ACGT"[i] for i in rng.integers(0, 4, k)) for _ in range(2))
        pats = _patterns((act, rep))
        if len(set(pats)) < 4 or any(not 3 <= sum(c in "GC" for c in p) <= 5 for p in (act, rep)):
            continue
        if any(re.search(r"(.)\1\1\1", p) for p in (act, rep)):
            continue
        if sum(a != b for a, b in zip(act, rep, strict=True)) < 4:
            continue
        if any(p[-j:] == q[:j] for p in pats for q in pats for j in range(1, k)):
            continue
        return act, rep


def _genes_per_chrom(spec: SynthSpec) -> np.ndarray:
    counts = np.full(spec.n_chroms, spec.n_genes // spec.n_chroms)
    counts[: spec.n_genes % spec.n_chroms] += 1
    return counts


def _layout_genes(
    spec: SynthSpec, chroms: list[str], rng: np.random.Generator
) -> tuple[pd.DataFrame, list[list[tuple[int, int]]]]:
    """Place genes: TSS, strand, body and exons, sorted by chrom and start, with ids and neighbourhoods."""
    margin = spec.upstream + spec.downstream
    frames, all_exons = [], []
    for ci, n in enumerate(_genes_per_chrom(spec)):
        tss, strand, length = _place_tss(spec, int(n), rng)
        start = np.where(strand == "+", tss, np.maximum(tss - length + 1, 1))
        end = np.where(strand == "+", np.minimum(tss + length - 1, spec.chrom_length), tss)
        order = np.lexsort((tss, start))
        frame = pd.DataFrame(
            {"chrom_index": ci, "chrom": chroms[ci], "start": start, "end": end, "tss": tss, "strand": strand}
        ).iloc[order]
        frames.append(frame)
        all_exons.extend(_draw_exons(int(s), int(e), rng) for s, e in zip(frame["start"], frame["end"], strict=True))
    genes = pd.concat(frames, ignore_index=True)
    assert (genes["tss"] > margin).all() and (genes["tss"] <= spec.chrom_length - margin).all()
    number = np.arange(1, len(genes) + 1)
    genes.insert(0, "gene_id", [f"SYNG{i:08d}" for i in number])
    genes.insert(1, "gene_id_version", genes["gene_id"] + ".1")
    genes.insert(2, "gene_name", [f"SYN{i}" for i in number])
    for i, exons in enumerate(all_exons):
        if genes.at[i, "strand"] == "-":
            exons.reverse()  # transcript order: exon 1 holds the TSS
    genes["neighbourhood_id"] = _draw_neighbourhoods(genes["chrom_index"].to_numpy(), rng)
    return genes, all_exons


def _place_tss(spec: SynthSpec, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TSS positions, strands and body lengths of ``n`` genes on one chromosome, in TSS order.

    Gaps are log-normal, so some genes sit close together and others far apart; a few adjacent pairs are made
    head-to-head (a few hundred bp apart, sharing a bidirectional promoter region) or convergent with
    overlapping bodies.
    """
    margin = spec.upstream + spec.downstream
    lo, hi = _MODEL.gene_length_range
    length = np.clip(rng.lognormal(np.log(_MODEL.gene_length_median), 0.6, n), lo, hi).astype(np.int64)
    strand = np.where(rng.random(n) < 0.5, "+", "-").astype(object)
    span = spec.chrom_length - 2 * margin - 1  # TSS in [margin + 1, chrom_length - margin]
    interior = np.full(max(n - 1, 0), np.nan)
    kind, size = rng.random(max(n - 1, 0)), rng.random(max(n - 1, 0))
    divergent, overlapping = _MODEL.divergent_pair_rate, _MODEL.overlapping_pair_rate
    i = 0
    while i < n - 1:
        if kind[i] < divergent:
            strand[i], strand[i + 1] = "-", "+"
            interior[i] = _MODEL.min_tss_gap + size[i] * 700
        elif kind[i] < divergent + overlapping:
            strand[i], strand[i + 1] = "+", "-"
            # TSSs closer than the two bodies are long, so the bodies overlap; capped so the pair stays small
            interior[i] = max(min((0.3 + 0.5 * size[i]) * (length[i] + length[i + 1]), span / (n + 1)), 200)
        else:
            i += 1
            continue
        i += 2  # pairs do not chain: a gene belongs to at most one forced pair
    slots = np.concatenate([[np.nan], interior, [np.nan]])
    weights = rng.lognormal(0.0, 0.9, n + 1)
    free = np.isnan(slots)
    free_interior = free.copy()
    free_interior[[0, -1]] = False
    room = span - np.nansum(slots) - free_interior.sum() * _MODEL.min_tss_gap
    slots[free] = weights[free] / weights[free].sum() * room
    slots[free_interior] += _MODEL.min_tss_gap
    tss = margin + 1 + np.floor(np.cumsum(slots)[:n]).astype(np.int64)
    return tss, strand.astype(str), length


def _draw_exons(start: int, end: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """1 to 4 exons covering ``start..end`` with the first and last exon on the gene's ends."""
    n_exons = int(min(rng.integers(1, 5), max(1, (end - start + 1) // 300)))
    if n_exons == 1:
        return [(start, end)]
    # cut points 10 bp apart at least, so that every intron is non-empty
    grid = np.arange(start + 50, end - 50, 10)
    cuts = np.sort(rng.choice(grid, 2 * (n_exons - 1), replace=False))
    bounds = [start, *cuts.tolist(), end]
    return [(int(bounds[2 * k]), int(bounds[2 * k + 1])) for k in range(n_exons)]


def _draw_neighbourhoods(chrom_index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contiguous blocks of genes along each chromosome; each block later shares one expression module."""
    ids = np.empty(len(chrom_index), dtype=object)
    next_id, i = 0, 0
    lo, hi = _MODEL.neighbourhood_size
    while i < len(chrom_index):
        size = int(rng.integers(lo, hi + 1))
        block = np.arange(i, min(i + size, len(chrom_index)))
        block = block[chrom_index[block] == chrom_index[i]]  # a block never spans two chromosomes
        next_id += 1
        ids[block] = f"NB{next_id:04d}"
        i = int(block[-1]) + 1
    return ids


def _build_genome(
    spec: SynthSpec, patterns: tuple[str, ...], rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random sequence at the target GC, soft-masked stretches, and no background copy of any motif."""
    at, gc = (1 - _MODEL.gc) / 2, _MODEL.gc / 2
    lo, hi = _MODEL.soft_mask_length
    seqs, masks = [], []
    for _ in range(spec.n_chroms):
        length = spec.chrom_length
        codes = rng.choice(4, size=length, p=[at, gc, gc, at]).astype(np.uint8)
        n_stretches = max(1, round(_MODEL.soft_mask_fraction * length / ((lo + hi) / 2)))
        starts = rng.integers(0, length, n_stretches)
        ends = np.minimum(starts + rng.integers(lo, hi + 1, n_stretches), length)
        depth = np.zeros(length + 1, dtype=np.int64)
        np.add.at(depth, starts, 1)
        np.add.at(depth, ends, -1)
        _scrub(codes, patterns, rng)
        seqs.append(codes)
        masks.append(np.cumsum(depth)[:length] > 0)
    return seqs, masks


def _scrub(codes: np.ndarray, patterns: tuple[str, ...], rng: np.random.Generator) -> None:
    """Mutate background copies of the motifs away, so that the only copies are the planted ones."""
    regex = re.compile("|".join(patterns).encode())
    while True:
        hits = [m.start() for m in regex.finditer(_LETTERS[codes].tobytes())]
        if not hits:
            return
        where = np.asarray(hits) + _MODEL.motif_length // 2
        codes[where] = (codes[where] + rng.integers(1, 4, len(where))) % 4


def _windows(spec: SynthSpec, genes: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Forward-strand bounds (1-based, inclusive) of each gene's promoter window, as Genome.window cuts it."""
    tss, plus = genes["tss"].to_numpy(), genes["strand"].to_numpy() == "+"
    start = np.where(plus, tss - spec.upstream, tss - spec.downstream + 1)
    end = np.where(plus, tss + spec.downstream - 1, tss + spec.upstream)
    return start, end


def _codes(seq: str) -> np.ndarray:
    return np.array(["ACGT".index(c) for c in seq], dtype=np.uint8)


def _plant_motifs(
    spec: SynthSpec,
    genes: pd.DataFrame,
    seqs: list[np.ndarray],
    masks: list[np.ndarray],
    motifs: tuple[str, str],
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Write 0..3 activator and 0..3 repressor copies into each promoter window, on the gene's strand.

    Copies go where no other copy is and outside soft-masked stretches (so ``soft_mask: n`` keeps them).

    Returns:
        Per chromosome, True on every base of a planted copy (variants keep off these).
    """
    k = _MODEL.motif_length
    motif_bases = [np.zeros(len(s), dtype=bool) for s in seqs]
    forward = {strand: [_codes(m if strand == "+" else _revcomp(m)) for m in motifs] for strand in "+-"}
    counts = rng.integers(0, _MODEL.max_motif_copies + 1, (len(genes), 2))
    w_start, w_end = _windows(spec, genes)
    for g, (ci, strand) in enumerate(zip(genes["chrom_index"], genes["strand"], strict=True)):
        blocked = masks[ci] | motif_bases[ci]
        lo, hi = w_start[g] - 1, w_end[g] - k  # 0-based first and last start of a copy inside the window
        for which in (0, 1):
            for _ in range(counts[g, which]):
                for _attempt in range(50):
                    p = int(rng.integers(lo, hi + 1))
                    if not blocked[p : p + k].any():
                        seqs[ci][p : p + k] = forward[strand][which]
                        motif_bases[ci][p : p + k] = True
                        blocked[p : p + k] = True
                        break
    return motif_bases


def _count_motifs(
    spec: SynthSpec, genes: pd.DataFrame, seqs: list[np.ndarray], motifs: tuple[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """Count the motifs in each final strand-oriented window: this, not the number attempted, is the truth.

    Windows of nearby genes overlap, so a copy planted for one gene can also count for its neighbour.
    """
    w_start, w_end = _windows(spec, genes)
    counts = np.zeros((len(genes), 2), dtype=np.int64)
    texts = [_LETTERS[s].tobytes().decode() for s in seqs]
    for g, (ci, strand) in enumerate(zip(genes["chrom_index"], genes["strand"], strict=True)):
        window = texts[ci][w_start[g] - 1 : w_end[g]]
        if strand == "-":
            window = _revcomp(window)
        counts[g] = [window.count(m) for m in motifs]
    return counts[:, 0], counts[:, 1]


def _draw_variants(
    spec: SynthSpec,
    chroms: list[str],
    genes: pd.DataFrame,
    seqs: list[np.ndarray],
    motif_bases: list[np.ndarray],
    patterns: tuple[str, ...],
    rng: np.random.Generator,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Variant sites (mostly in promoter windows) with their alleles, and the planted eQTLs.

    eQTL sites are biallelic SNVs in the gene's own window; the first one picked carries the largest weight.
    No site touches a planted motif and no ALT allele creates a new copy of one, so the motif counts hold for
    every donor's haplotypes as they do for the reference.

    Returns:
        ``sites`` (one row per VCF record, sorted) and ``eqtls`` (gene_index, site_index, weight, rank), with
        weights relative to a per-gene scale set later from the target heritability.
    """
    n_genes = len(genes)
    eqtl_gene = np.zeros(n_genes, dtype=bool)
    eqtl_gene[rng.choice(n_genes, round(spec.eqtl_gene_fraction * n_genes), replace=False)] = True
    w_start, w_end = _windows(spec, genes)
    chrom_index = genes["chrom_index"].to_numpy()
    rows, picks = [], []
    for ci in range(len(chroms)):
        on = np.flatnonzero(chrom_index == ci)
        ws, we = w_start[on], w_end[on]
        per_gene = rng.poisson(spec.variants_per_promoter, len(on))
        per_gene = np.where(eqtl_gene[on], np.maximum(per_gene, 2), per_gene)
        owner = np.repeat(np.arange(len(on)), per_gene)
        inside = ws[owner] + np.floor(rng.random(len(owner)) * (we - ws + 1)[owner]).astype(np.int64)
        depth = np.zeros(spec.chrom_length + 2, dtype=np.int64)
        np.add.at(depth, ws, 1)
        np.add.at(depth, we + 1, -1)
        in_window = np.cumsum(depth) > 0  # indexed by 1-based position
        n_out = max(1, round(_MODEL.outside_variant_fraction * len(inside)))
        outside = rng.integers(20, spec.chrom_length - 20, 4 * n_out + 20)
        outside = outside[~in_window[outside]][:n_out]
        pos = np.unique(np.concatenate([inside, outside]))
        pos = pos[~motif_bases[ci][pos - 1]]
        for j in np.flatnonzero(eqtl_gene[on]):
            candidates = pos[(pos >= ws[j]) & (pos <= we[j])]
            n_pick = min(int(rng.integers(1, 3)), len(candidates))
            chosen = rng.choice(candidates, n_pick, replace=False)
            weight = np.array([1.0, rng.uniform(*_MODEL.second_eqtl_weight)])[:n_pick]
            weight *= rng.choice([-1.0, 1.0], n_pick)
            for rank, (p, w) in enumerate(zip(chosen, weight, strict=True)):
                picks.append((int(on[j]), ci, int(p), float(w), rank))
        rows.append(pd.DataFrame({"chrom_index": ci, "pos": pos, "in_promoter": in_window[pos]}))
    sites = pd.concat(rows, ignore_index=True)
    key = {(ci, p): i for i, (ci, p) in enumerate(zip(sites["chrom_index"], sites["pos"], strict=True))}
    is_eqtl = np.zeros(len(sites), dtype=bool)
    is_eqtl[[key[(ci, p)] for _, ci, p, _, _ in picks]] = True
    sites["is_eqtl"] = is_eqtl
    sites = _assign_alleles(sites, chroms, seqs, motif_bases, patterns, rng)
    key = {(ci, p): i for i, (ci, p) in enumerate(zip(sites["chrom_index"], sites["pos"], strict=True))}
    eqtls = pd.DataFrame(
        [(g, key[(ci, p)], w, r) for g, ci, p, w, r in picks if (ci, p) in key],
        columns=["gene_index", "site_index", "weight", "rank"],
    )
    return sites, eqtls.astype({"gene_index": np.int64, "site_index": np.int64, "rank": np.int64})


def _assign_alleles(
    sites: pd.DataFrame,
    chroms: list[str],
    seqs: list[np.ndarray],
    motif_bases: list[np.ndarray],
    patterns: tuple[str, ...],
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Give each site a kind (SNV, insertion, deletion, multi-allelic SNV) and alleles from the sequence.

    eQTL sites stay biallelic SNVs. At least one site of each other kind is made when there is room, so that
    readers meet them. A site whose every allele would create a motif copy is dropped.
    """
    texts = [_LETTERS[s].tobytes().decode() for s in seqs]
    n = len(sites)
    chrom_index, pos, is_eqtl = (sites[c].to_numpy() for c in ("chrom_index", "pos", "is_eqtl"))
    # 0-based position of the next site on the same chromosome: a deletion must end before it
    next_i0 = np.where(np.r_[chrom_index[1:] == chrom_index[:-1], False], np.r_[pos[1:], 0] - 1, np.iinfo(int).max)
    rates = np.cumsum([_MODEL.deletion_rate, _MODEL.insertion_rate, _MODEL.multiallelic_rate])
    kinds = np.array(["del", "ins", "multi", "snv"], dtype=object)[np.searchsorted(rates, rng.random(n), "right")]
    kinds[is_eqtl] = "snv"
    alleles: list[tuple[str, list[str]] | None] = []
    for i in range(n):
        ci = int(chrom_index[i])
        made = _make_alleles(kinds[i], texts[ci], int(pos[i]) - 1, int(next_i0[i]), motif_bases[ci], patterns, rng)
        if made is None and kinds[i] != "snv":
            kinds[i] = "snv"
            made = _make_alleles("snv", texts[ci], int(pos[i]) - 1, int(next_i0[i]), motif_bases[ci], patterns, rng)
        alleles.append(made)
    for needed in ("multi", "ins", "del"):
        if (kinds == needed).any():
            continue
        for i in rng.permutation(np.flatnonzero((kinds == "snv") & ~is_eqtl)):
            ci = int(chrom_index[i])
            made = _make_alleles(needed, texts[ci], int(pos[i]) - 1, int(next_i0[i]), motif_bases[ci], patterns, rng)
            if made is not None:
                kinds[i], alleles[i] = needed, made
                break
    keep = np.array([a is not None for a in alleles], dtype=bool)
    sites = sites.assign(
        chrom=[chroms[c] for c in chrom_index],
        kind=kinds,
        ref=[a[0] if a else "" for a in alleles],
        alt=[tuple(a[1]) if a else () for a in alleles],
    )[keep].reset_index(drop=True)
    sites["variant_id"] = [
        f"{c}_{p}_{r}_{','.join(a)}"
        for c, p, r, a in zip(sites["chrom"], sites["pos"], sites["ref"], sites["alt"], strict=True)
    ]
    return sites


def _make_alleles(
    kind: str,
    text: str,
    i0: int,
    next_i0: int,
    motif_bases: np.ndarray,
    patterns: tuple[str, ...],
    rng: np.random.Generator,
) -> tuple[str, list[str]] | None:
    """REF and ALT alleles of one site (``i0`` 0-based), or None when this kind does not fit here."""
    base = text[i0]
    others = [b for b in "ACGT" if b != base]
    if kind == "del":
        k = int(rng.integers(1, 4))
        if i0 + k >= min(len(text), next_i0) or motif_bases[i0 + 1 : i0 + k + 1].any():
            return None
        ref, alts = text[i0 : i0 + k + 1], [base]
    elif kind == "ins":
        ref, alts = base, [base + "".join("ACGT"[j] for j in rng.integers(0, 4, int(rng.integers(1, 4))))]
    elif kind == "multi":
        ref, alts = base, [others[j] for j in rng.permutation(3)[:2]]
    else:
        # transitions first, about twice as often as transversions, as in real genomes
        transversions = [b for b in others if b != _TRANSITION[base]]
        order = [transversions[j] for j in rng.permutation(2)]
        order.insert(0 if rng.random() < 2 / 3 else 2, _TRANSITION[base])
        for alt in order:
            if not _creates_motif(text, i0, base, alt, patterns):
                return base, [alt]
        return None
    if any(_creates_motif(text, i0, ref, alt, patterns) for alt in alts):
        return None
    return ref, alts


def _creates_motif(text: str, i0: int, ref: str, alt: str, patterns: tuple[str, ...]) -> bool:
    # 7 flanking bases suffice: a new 8-mer copy must include at least one changed base
    k = _MODEL.motif_length - 1
    local = text[max(0, i0 - k) : i0] + alt + text[i0 + len(ref) : i0 + len(ref) + k]
    return any(p in local for p in patterns)


def _draw_motif_loss(
    spec: SynthSpec,
    chroms: list[str],
    genes: pd.DataFrame,
    seqs: list[np.ndarray],
    motifs: tuple[str, str],
    patterns: tuple[str, ...],
    sites: pd.DataFrame,
    eqtls: pd.DataFrame,
    rng: np.random.Generator,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Motif-loss eQTLs: two SNVs inside one planted motif copy of a gene's window, either of which destroys it.

    Genes are drawn among those with a planted copy and no additive eQTL (``motif_eqtl_fraction`` of all genes,
    fewer when not enough qualify); neither ALT allele, alone or with the other, makes a new copy of any motif. A
    lost copy acts on every gene whose strand-oriented window holds it as an activator or a repressor (a
    neighbour's window may overlap), which may add a motif-loss effect to a gene with additive eQTLs.

    Returns:
        ``sites`` with the new SNVs (``is_eqtl``), sorted again, and ``eqtls`` re-indexed with ``kind``
        (``additive`` or ``motif_loss``) and ``group`` (the lost copy, -1 for additive rows); a motif-loss row's
        ``weight`` is the change of the gene's level per copy lost from its haploid sequence (``-a`` or ``+b``).
    """
    k = _MODEL.motif_length
    texts = [_LETTERS[s].tobytes().decode() for s in seqs]
    w_start, w_end = _windows(spec, genes)
    strands, chrom_index = genes["strand"].to_numpy(), genes["chrom_index"].to_numpy()
    # forward-strand text of (activator, repressor) as a gene on each strand reads them
    oriented = {"+": motifs, "-": tuple(_revcomp(m) for m in motifs)}
    additive = set(eqtls["gene_index"].tolist())
    copies: dict[int, list[tuple[int, int]]] = {}
    for g in range(len(genes)):
        if g in additive:
            continue
        ci, lo = int(chrom_index[g]), int(w_start[g]) - 1
        window = texts[ci][lo : int(w_end[g])]
        for pattern in oriented[strands[g]]:
            at = window.find(pattern)
            while at >= 0:
                copies.setdefault(g, []).append((ci, lo + at))
                at = window.find(pattern, at + 1)
    eligible = np.array(sorted(copies), dtype=np.int64)
    n_pick = min(round(spec.motif_eqtl_fraction * len(genes)), len(eligible))
    chosen = np.sort(rng.choice(eligible, n_pick, replace=False)) if n_pick else eligible[:0]
    used: set[tuple[int, int]] = set()
    groups: list[tuple[int, int, list[tuple[int, str, str]]]] = []  # (chrom, 0-based copy start, [(pos, ref, alt)])
    for g in chosen:
        free = [c for c in copies[int(g)] if c not in used]
        if not free:
            continue
        ci, p0 = free[int(rng.integers(len(free)))]
        text = texts[ci]
        for _attempt in range(20):
            offsets = np.sort(rng.choice(k, 2, replace=False))
            alts = [[b for b in "ACGT" if b != text[p0 + o]][int(rng.integers(3))] for o in offsets]
            if not any(
                _makes_copy(text, p0, [(int(o), a) for o, a in chosen_alts], patterns)
                for chosen_alts in (
                    [(offsets[0], alts[0])],
                    [(offsets[1], alts[1])],
                    list(zip(offsets, alts, strict=True)),
                )
            ):
                used.add((ci, p0))
                groups.append(
                    (ci, p0, [(p0 + int(o) + 1, text[p0 + int(o)], a) for o, a in zip(offsets, alts, strict=True)])
                )
                break
    new = pd.DataFrame(
        [(ci, pos, True, True, chroms[ci], "snv", ref, (alt,)) for ci, _, snvs in groups for pos, ref, alt in snvs],
        columns=["chrom_index", "pos", "in_promoter", "is_eqtl", "chrom", "kind", "ref", "alt"],
    )
    new["variant_id"] = [
        f"{c}_{p}_{r}_{a[0]}" for c, p, r, a in zip(new["chrom"], new["pos"], new["ref"], new["alt"], strict=True)
    ]
    merged = pd.concat([sites.assign(motif_loss=False), new.assign(motif_loss=True)], ignore_index=True)
    order = np.lexsort((merged["pos"].to_numpy(), merged["chrom_index"].to_numpy()))
    where = np.empty(len(merged), dtype=np.int64)
    where[order] = np.arange(len(merged))  # old row -> sorted row
    merged = merged.iloc[order].reset_index(drop=True)
    rows = eqtls.assign(site_index=where[eqtls["site_index"].to_numpy()], kind="additive", group=-1)
    extra = []
    first = len(sites)  # the merged row (before sorting) of each group's first SNV
    for gid, (ci, p0, snvs) in enumerate(groups):
        forward = texts[ci][p0 : p0 + k]
        holds = np.flatnonzero((chrom_index == ci) & (w_start - 1 <= p0) & (w_end >= p0 + k))
        for h in holds:
            activator, repressor = oriented[strands[h]]
            weight = (
                -_MODEL.activator_effect
                if forward == activator
                else (_MODEL.repressor_effect if forward == repressor else None)
            )
            if weight is None:
                continue
            extra += [(int(h), int(where[first + j]), weight, j, "motif_loss", gid) for j in range(len(snvs))]
        first += len(snvs)
    extra_rows = pd.DataFrame(extra, columns=["gene_index", "site_index", "weight", "rank", "kind", "group"])
    out = pd.concat([rows, extra_rows], ignore_index=True)
    return merged, out.astype({"gene_index": np.int64, "site_index": np.int64, "rank": np.int64, "group": np.int64})


def _makes_copy(text: str, p0: int, changes: list[tuple[int, str]], patterns: tuple[str, ...]) -> bool:
    """True if the SNVs ``changes`` ((offset from ``p0``, ALT base)) inside the copy at ``p0`` make a copy of any
    pattern (every copy they could make overlaps the changed bases, so the copy and 7 bases on each side suffice)."""
    k = _MODEL.motif_length
    lo = max(0, p0 - (k - 1))
    local = list(text[lo : p0 + 2 * k - 1])
    for offset, alt in changes:
        local[p0 - lo + offset] = alt
    return any(p in "".join(local) for p in patterns)


def _draw_genotypes(sites: pd.DataFrame, n_donors: int, rng: np.random.Generator) -> np.ndarray:
    """Phased haplotypes, independent between sites (no LD), from a Beta(0.5, 0.5) allele frequency.

    Returns:
        ``(n_sites, n_donors, 2)`` int8 allele indices (0 = REF, 1 and 2 = ALT alleles).
    """
    n = len(sites)
    is_eqtl = sites["is_eqtl"].to_numpy()
    drawn = rng.beta(0.5, 0.5, n)
    freq = np.where(is_eqtl, np.clip(drawn, *_MODEL.eqtl_af_range), np.clip(drawn, *_MODEL.other_af_range))
    if "motif_loss" in sites:  # the same draw, mapped into the range where a copy's loss varies most
        lo, hi = _MODEL.motif_loss_af_range
        freq = np.where(sites["motif_loss"].to_numpy(dtype=bool), lo + (hi - lo) * drawn, freq)
    split = rng.uniform(0.3, 0.7, n)
    multi = sites["kind"].to_numpy() == "multi"
    p1 = np.where(multi, freq * split, freq)[:, None, None]
    p2 = np.where(multi, freq * (1 - split), 0.0)[:, None, None]
    u = rng.random((n, n_donors, 2))
    haps = (u < p1).astype(np.int8) + 2 * ((u >= p1) & (u < p1 + p2)).astype(np.int8)
    # an eQTL nobody varies at would have no effect to see: flip one haplotype of one donor
    dosage = (haps == 1).sum(axis=2)
    for i in np.flatnonzero(is_eqtl & (dosage.min(axis=1) == dosage.max(axis=1))):
        d = int(rng.integers(n_donors))
        haps[i, d, 0] = 1 - haps[i, d, 0]
    return haps


def _draw_present_cells(spec: SynthSpec, rng: np.random.Generator) -> np.ndarray:
    """Which (donor, tissue) cells have a sample: every donor >= 1 tissue, every tissue >= 3 donors.

    Beyond those, cells are drawn with donor and tissue propensities, so that some tissues and donors are
    sampled more than others, as in GTEx.
    """
    d, t = spec.n_donors, spec.n_tissues
    present = np.zeros((d, t), dtype=bool)
    present[np.arange(d), rng.integers(0, t, d)] = True
    for tissue in range(t):
        present[rng.choice(d, 3, replace=False), tissue] = True
    extra = round(spec.observed_cell_fraction * d * t) - int(present.sum())
    weight = np.outer(rng.uniform(0.5, 1.5, d), rng.uniform(0.3, 1.7, t))[~present]
    if extra > 0:
        free = np.flatnonzero(~present.ravel())
        present.ravel()[rng.choice(free, extra, replace=False, p=weight / weight.sum())] = True
    return present


def _sample_table(present: np.ndarray, donors: list[str], tissues: list[str]) -> pd.DataFrame:
    d_idx, t_idx = np.nonzero(present)  # row-major: sorted by donor, then tissue
    width = max(2, len(str(len(tissues))))
    return pd.DataFrame(
        {
            S.SAMPLE_ID: [f"{donors[d]}-T{t + 1:0{width}d}" for d, t in zip(d_idx, t_idx, strict=True)],
            S.DONOR_ID: [donors[d] for d in d_idx],
            S.TISSUE: [tissues[t] for t in t_idx],
            "donor_index": d_idx,
            "tissue_index": t_idx,
        }
    )


def _simulate_expression(
    spec: SynthSpec,
    genes: pd.DataFrame,
    sites: pd.DataFrame,
    haplotypes: np.ndarray,
    eqtls: pd.DataFrame,
    rng: np.random.Generator,
) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """The full expression array (see the module docstring for the equation).

    eQTL effects are scaled per gene so that the pooled within-tissue cis-heritability across donors,
    ``sum_t var_d(G) / sum_t var_d(G + donor + noise_t)``, equals the gene's target exactly on the latent
    scale (before the floor at 0). Adds ``base_level``, ``h2``, ``n_eqtls`` and ``noise_sd`` to ``genes``.

    Returns:
        ``y`` of shape ``(n_genes, n_donors, n_tissues)``, ``eqtls`` with an ``effect`` column (per ALT
        allele), and the planted tissue-tissue correlation of tissue effects.
    """
    m = _MODEL
    n_genes, n_donors, n_tissues = len(genes), spec.n_donors, spec.n_tissues
    hood_codes, hood = np.unique(genes["neighbourhood_id"].to_numpy().astype(str), return_inverse=True)
    base = np.clip(rng.normal(m.base_mean, m.base_sd, n_genes), *m.base_range)
    mu = rng.normal(0.0, m.tissue_mean_sd, n_tissues)
    factors = rng.normal(0.0, 1.0, (n_tissues, m.n_tissue_factors))
    factors[:, 0] += m.tissue_factor_shift
    loadings = rng.normal(0.0, m.tissue_loading_sd, (n_genes, m.n_tissue_factors))
    profile = rng.normal(0.0, m.module_profile_sd, (len(hood_codes), n_tissues))
    lam = rng.uniform(*m.module_loading_range, n_genes)
    offset = rng.normal(0.0, m.donor_offset_sd, n_donors)
    donor_module = rng.normal(0.0, m.donor_module_sd, (n_donors, len(hood_codes)))
    noise_sd = rng.uniform(*m.noise_sd_range, n_genes)
    noise = rng.normal(0.0, 1.0, (n_genes, n_donors, n_tissues)) * noise_sd[:, None, None]
    h2_target = rng.uniform(*m.h2_range, n_genes)

    tissue = mu[None, :] + loadings @ factors.T + lam[:, None] * profile[hood]  # (G, T)
    donor = offset[None, :] + lam[:, None] * donor_module[:, hood].T  # (G, D)
    additive = (eqtls["kind"] == "additive").to_numpy()
    added = eqtls[additive]
    dosage = (haplotypes[added["site_index"].to_numpy()] == 1).sum(axis=2).astype(float)  # (n_eqtls, D)
    # centred on the donors' mean, so that an eQTL moves donors around the gene's level rather than moving the
    # level itself (a common ALT allele with a large effect would otherwise push whole genes out of range)
    dosage -= dosage.mean(axis=1, keepdims=True)
    raw = np.zeros((n_genes, n_donors))
    np.add.at(raw, added["gene_index"].to_numpy(), added["weight"].to_numpy()[:, None] * dosage)
    scale, h2 = _heritability_scale(raw, donor[:, :, None] + noise, h2_target)
    weight, gene_index = eqtls["weight"].to_numpy(), eqtls["gene_index"].to_numpy()
    # per ALT allele for an additive eQTL; per haplotype that lost the copy for a motif-loss one
    eqtls = eqtls.assign(effect=np.where(additive, weight * scale[gene_index], weight / 2))
    genetic = scale[:, None] * raw
    kinds = np.full(n_genes, "none", dtype=object)
    kinds[np.unique(added["gene_index"])] = "additive"
    if not additive.all():
        lost = _motif_loss_value(haplotypes, eqtls[~additive], n_genes)
        genetic = genetic + lost
        has = np.zeros(n_genes, dtype=bool)
        has[eqtls.loc[~additive, "gene_index"].to_numpy()] = True
        kinds[has] = np.where(kinds[has] == "additive", "additive+motif_loss", "motif_loss")
        h2 = np.where(has, _realised_h2(genetic, donor[:, :, None] + noise), h2)
    genes["genetic_effect"] = kinds

    gene_level = base + genes["motif_effect"].to_numpy()
    latent = gene_level[:, None, None] + tissue[:, None, :] + (donor + genetic)[:, :, None] + noise
    y = np.maximum(latent, 0.0) + 0.0  # TPM >= 0; + 0.0 turns a -0.0 into 0.0, which would print as '-0'

    genes["base_level"] = base
    genes["h2"] = h2
    genes["n_eqtls"] = np.bincount(eqtls["gene_index"], minlength=n_genes)
    genes["noise_sd"] = noise_sd
    cov = m.tissue_loading_sd**2 * factors @ factors.T
    # lam ~ U(lo, hi): E[lam^2] = var + mean^2; module profiles are independent between tissues
    lo, hi = m.module_loading_range
    cov += ((hi - lo) ** 2 / 12 + ((hi + lo) / 2) ** 2) * m.module_profile_sd**2 * np.eye(n_tissues)
    sd = np.sqrt(np.diag(cov))
    return y, eqtls, cov / np.outer(sd, sd)


def _motif_loss_value(haplotypes: np.ndarray, rows: pd.DataFrame, n_genes: int) -> np.ndarray:
    """``(G, D)`` genetic value of the motif-loss eQTLs: per (gene, lost copy), ``weight / 2`` times the donor's
    haplotypes (0-2) with an ALT allele at either of the copy's SNVs, centred on the donors' mean."""
    value = np.zeros((n_genes, haplotypes.shape[1]))
    for (g, _), part in rows.groupby(["gene_index", "group"], sort=True):
        lost = (haplotypes[part["site_index"].to_numpy()] == 1).any(axis=0).sum(axis=1).astype(float)  # (D,)
        value[g] += part["weight"].iloc[0] / 2 * (lost - lost.mean())
    return value


def _realised_h2(genetic: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """Pooled within-tissue heritability across donors of ``genetic`` ``(G, D)`` beside ``rest`` ``(G, D, T)``."""
    g_c = genetic - genetic.mean(axis=1, keepdims=True)
    total = g_c[:, :, None] + rest - rest.mean(axis=1, keepdims=True)
    v_g = (g_c**2).mean(axis=1)
    return np.where(v_g > 0, v_g / np.maximum((total**2).mean(axis=(1, 2)), 1e-300), 0.0)


def _heritability_scale(raw: np.ndarray, rest: np.ndarray, h2_target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per gene, the factor ``c`` on the raw genetic value that gives the target pooled heritability.

    With ``vG = var(raw)``, ``C = mean_t cov(raw, rest_t)`` and ``R = mean_t var(rest_t)`` (over donors),
    solve ``c^2 vG / (c^2 vG + 2 c C + R) = h2`` for its positive root.

    Args:
        raw: ``(G, D)`` unscaled genetic value.
        rest: ``(G, D, T)`` donor and noise parts.
        h2_target: ``(G,)`` target heritability.

    Returns:
        ``c`` (0 for genes without genetic variance) and the realised heritability.
    """
    raw_c = raw - raw.mean(axis=1, keepdims=True)
    rest_c = rest - rest.mean(axis=1, keepdims=True)
    v_g = (raw_c**2).mean(axis=1)
    cov = np.einsum("gd,gdt->g", raw_c, rest_c) / (raw.shape[1] * rest.shape[2])
    v_r = (rest_c**2).mean(axis=(1, 2))
    has = v_g > 0
    a = np.where(has, (1 - h2_target) * v_g, 1.0)
    b = -2 * h2_target * cov
    c0 = -h2_target * v_r
    scale = np.where(has, (-b + np.sqrt(b**2 - 4 * a * c0)) / (2 * a), 0.0)
    total = scale[:, None, None] * raw_c[:, :, None] + rest_c
    realised = np.where(has, scale**2 * v_g / (total**2).mean(axis=(1, 2)), 0.0)
    return scale, realised


def _draw_missing(spec: SynthSpec, n_genes: int, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """(gene, sample) entries left blank within present samples, uniformly at random."""
    missing = np.zeros(n_genes * n_samples, dtype=bool)
    missing[rng.choice(missing.size, round(spec.missing_entry_fraction * missing.size), replace=False)] = True
    return missing.reshape(n_genes, n_samples)


def _summarise(data: _Dataset) -> dict[str, Any]:
    """The summary written to ``truth/truth.json`` and returned by :func:`generate`."""
    spec, genes, sites = data.spec, data.genes, data.sites
    strand = genes["strand"].to_numpy()
    same_chrom = genes["chrom_index"].to_numpy()[1:] == genes["chrom_index"].to_numpy()[:-1]
    by_tss = genes.sort_values(["chrom_index", "tss"])
    s, t, c = (by_tss[k].to_numpy() for k in ("strand", "tss", "chrom_index"))
    window = spec.upstream + spec.downstream
    divergent = (c[1:] == c[:-1]) & (s[:-1] == "-") & (s[1:] == "+") & (np.diff(t) < window)
    start, end = genes["start"].to_numpy(), genes["end"].to_numpy()
    overlapping = same_chrom & (start[1:] <= end[:-1]) & (strand[1:] != strand[:-1])
    n_cells = spec.n_donors * spec.n_tissues
    y = data.y
    return _rounded(
        {
            "generator": "geximpute.apps.synth",
            "seed": spec.seed,
            "spec": dataclasses.asdict(spec),
            "motifs": {
                "activator": data.motifs[0],
                "repressor": data.motifs[1],
                "activator_effect": _MODEL.activator_effect,
                "repressor_effect": _MODEL.repressor_effect,
                "strand": "counted 5'->3' on the gene's strand in the promoter window (Genome.window)",
            },
            "model": dataclasses.asdict(_MODEL),
            "tissues": data.tissues,
            "counts": {
                "n_genes": len(genes),
                "n_donors": spec.n_donors,
                "n_tissues": spec.n_tissues,
                "n_samples": len(data.samples),
                "n_cells": n_cells,
                "observed_cell_fraction": len(data.samples) / n_cells,
                "n_missing_entries": int(data.missing.sum()),
                "missing_entry_fraction": float(data.missing.mean()) if data.missing.size else 0.0,
                "n_variants": len(sites),
                "n_promoter_variants": int(sites["in_promoter"].sum()),
                "n_snvs": int((sites["kind"] == "snv").sum()),
                "n_insertions": int((sites["kind"] == "ins").sum()),
                "n_deletions": int((sites["kind"] == "del").sum()),
                "n_multiallelic": int((sites["kind"] == "multi").sum()),
                "n_eqtl_genes": int((genes["n_eqtls"] > 0).sum()),
                "n_eqtls": len(data.eqtls),
                "genetic_effects": {
                    str(k): int(v) for k, v in genes["genetic_effect"].value_counts().sort_index().items()
                },
                "n_divergent_pairs": int(divergent.sum()),
                "n_overlapping_pairs": int(overlapping.sum()),
                "n_activator_motifs": int(genes["n_activator_motifs"].sum()),
                "n_repressor_motifs": int(genes["n_repressor_motifs"].sum()),
                "fraction_floored_at_zero": float((y == 0).mean()),
                "log1p_range": [float(y.min()), float(y.max())],
            },
            "files": FILES,
        }
    )


def _rounded(obj: Any) -> Any:
    """Plain JSON types, floats to 6 significant digits (stable, readable)."""
    if isinstance(obj, dict):
        return {str(k): _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(f"{float(obj):.6g}")
    return obj


# Writers ----------------------------------------------------------------------------------------------------


def _write_fasta(path: Path, data: _Dataset) -> None:
    """Plain FASTA, 60 bases a line, soft-masked stretches in lower case (no .fai: pyfaidx builds it)."""
    with open(path, "wb") as fh:
        for chrom, codes, mask in zip(data.chroms, data.seqs, data.masks, strict=True):
            chars = np.where(mask, _LOWER[codes], _LETTERS[codes])
            full = len(chars) // _FASTA_WIDTH * _FASTA_WIDTH
            lines = chars[:full].reshape(-1, _FASTA_WIDTH)
            newline = np.full((len(lines), 1), ord("\n"), dtype=np.uint8)
            fh.write(f">{chrom}\n".encode())
            fh.write(np.concatenate([lines, newline], axis=1).tobytes())
            if full < len(chars):
                fh.write(chars[full:].tobytes() + b"\n")


def _write_gtf(path: Path, data: _Dataset) -> None:
    """GENCODE-style GTF: gene, transcript and exon records, versioned ids, sorted by chrom and start."""
    lines = ["##description: synthetic annotation (geximpute.apps.synth)", "##provider: geximpute", "##format: gtf"]
    exon_number = 0
    for i, gene in enumerate(data.genes.itertuples(index=False)):
        number = i + 1
        common = f'gene_id "{gene.gene_id_version}"; '
        named = f'gene_type "protein_coding"; gene_name "{gene.gene_name}";'
        transcript = (
            f'{common}transcript_id "SYNT{number:08d}.1"; {named} transcript_type "protein_coding"; '
            f'transcript_name "{gene.gene_name}-201";'
        )
        head = f"{gene.chrom}\tSYNTH"
        tail = f".\t{gene.strand}\t."
        lines.append(f"{head}\tgene\t{gene.start}\t{gene.end}\t{tail}\t{common}{named}")
        lines.append(f"{head}\ttranscript\t{gene.start}\t{gene.end}\t{tail}\t{transcript}")
        for k, (start, end) in enumerate(data.exons[i], start=1):
            exon_number += 1
            exon = f'exon_number {k}; exon_id "SYNE{exon_number:08d}.1";'
            lines.append(f"{head}\texon\t{start}\t{end}\t{tail}\t{transcript} {exon}")
    path.write_text("\n".join(lines) + "\n")


def _write_gct(path: Path, data: _Dataset) -> None:
    """GCT 1.2 on the TPM scale, 4 significant digits, one column per present sample, blanks for missing."""
    samples = data.samples
    tpm = np.expm1(data.y[:, samples["donor_index"].to_numpy(), samples["tissue_index"].to_numpy()])
    tpm[data.missing] = np.nan
    # one %-format per row formats every value in C; "nan" (never part of a number written with %g) -> blank
    template = "\t".join(["%.4g"] * tpm.shape[1])
    names = zip(data.genes["gene_id_version"], data.genes["gene_name"], strict=True)
    with open(path, "w", newline="") as fh:
        fh.write(f"#1.2\n{tpm.shape[0]}\t{tpm.shape[1]}\n")
        fh.write("\t".join(["Name", "Description", *samples[S.SAMPLE_ID]]) + "\n")
        for (name, description), row in zip(names, tpm, strict=True):
            fh.write(f"{name}\t{description}\t" + (template % tuple(row.tolist())).replace("nan", "") + "\n")


def _write_samples(path: Path, data: _Dataset) -> None:
    columns = [S.SAMPLE_ID, S.DONOR_ID, S.TISSUE]
    data.samples[columns].to_csv(path, sep="\t", index=False, lineterminator="\n")


def _write_vcf(path: Path, data: _Dataset) -> None:
    """VCFv4.2 with contigs, phased GT for every donor, and the ALT frequency among the donors in INFO."""
    sites, haps = data.sites, data.haplotypes
    header = [
        "##fileformat=VCFv4.2",
        "##source=geximpute.synth",
        f"##reference={FILES['genome']}",
        *(f"##contig=<ID={c},length={len(s)}>" for c, s in zip(data.chroms, data.seqs, strict=True)),
        '##INFO=<ID=AF,Number=A,Type=Float,Description="ALT allele frequency among the donors">',
        '##FORMAT=<ID=GT,Number=1,Type=String,Description="Phased genotype">',
        "\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT", *data.donors]),
    ]
    n_sites, n_donors = haps.shape[:2]
    # every genotype is 4 bytes "a|b\t" (alleles are single digits), so a whole row is one tobytes()
    gt = np.empty((n_sites, n_donors, 4), dtype=np.uint8)
    gt[..., 0] = ord("0") + haps[..., 0]
    gt[..., 1] = ord("|")
    gt[..., 2] = ord("0") + haps[..., 1]
    gt[..., 3] = ord("\t")
    gt[:, -1, 3] = ord("\n")
    with open(path, "wb") as fh:
        fh.write(("\n".join(header) + "\n").encode())
        for i, site in enumerate(sites.itertuples(index=False)):
            freq = ",".join(f"{(haps[i] == a + 1).sum() / (2 * n_donors):.4g}" for a in range(len(site.alt)))
            fixed = [
                site.chrom,
                str(site.pos),
                site.variant_id,
                site.ref,
                ",".join(site.alt),
                ".",
                "PASS",
                f"AF={freq}",
                "GT",
            ]
            fh.write(("\t".join(fixed) + "\t").encode())
            fh.write(gt[i].tobytes())


def _write_truth(folder: Path, data: _Dataset) -> None:
    """The hidden truth: per-gene parameters, eQTLs, tissue correlation, the full array and the summary."""
    genes = data.genes
    gene_columns = [
        "gene_id", "gene_name", "chrom", "start", "end", "tss", "strand", "base_level", "n_activator_motifs",
        "n_repressor_motifs", "motif_effect", "neighbourhood_id", "h2", "n_eqtls", "noise_sd", "genetic_effect",
    ]  # fmt: skip
    genes[gene_columns].to_csv(
        folder / FILES["truth_genes"], sep="\t", index=False, float_format="%.6g", lineterminator="\n"
    )

    sites = data.sites.iloc[data.eqtls["site_index"].to_numpy()].reset_index(drop=True)
    alt_freq = (data.haplotypes[data.eqtls["site_index"].to_numpy()] == 1).mean(axis=(1, 2))
    eqtls = pd.DataFrame(
        {
            S.VARIANT_ID: sites["variant_id"],
            S.CHROM: sites["chrom"],
            S.POS: sites["pos"],
            S.REF: sites["ref"],
            S.ALT: [a[0] for a in sites["alt"]],
            S.GENE_ID: genes["gene_id"].to_numpy()[data.eqtls["gene_index"].to_numpy()],
            "effect": data.eqtls["effect"].to_numpy(),
            "rank": data.eqtls["rank"].to_numpy(),
            "kind": data.eqtls["kind"].to_numpy(),
            "alt_frequency": alt_freq,
        }
    ).sort_values([S.CHROM, S.POS, S.GENE_ID], key=_natural_chrom)
    eqtls.to_csv(folder / FILES["truth_eqtls"], sep="\t", index=False, float_format="%.6g", lineterminator="\n")

    corr = pd.DataFrame(data.tissue_correlation, index=pd.Index(data.tissues, name=S.TISSUE), columns=data.tissues)
    corr.to_csv(folder / FILES["truth_tissue_correlation"], sep="\t", float_format="%.6g", lineterminator="\n")

    pq.write_table(_truth_long(data), folder / FILES["truth_expression"], compression="zstd")
    (folder / FILES["truth_summary"]).write_text(json.dumps(data.summary, indent=2, sort_keys=True) + "\n")


def _natural_chrom(column: pd.Series) -> pd.Series:
    # chr2 before chr10, as in the FASTA and VCF
    if column.name == S.CHROM:
        return column.str.removeprefix("chr").astype(int)
    return column


def _truth_long(data: _Dataset) -> pa.Table:
    """Every gene x donor x tissue value, its sample id (null: no sample) and whether the GCT shows it."""
    n_genes, n_donors, n_tissues = data.y.shape
    d_idx, t_idx = data.samples["donor_index"].to_numpy(), data.samples["tissue_index"].to_numpy()
    cell_sample = np.full((n_donors, n_tissues), -1, dtype=np.int64)  # row of the sample table, -1: none
    cell_sample[d_idx, t_idx] = np.arange(len(d_idx))
    observed = np.zeros(data.y.shape, dtype=bool)
    observed[:, d_idx, t_idx] = ~data.missing
    cells = n_donors * n_tissues

    def column(names: list[str], index: np.ndarray) -> pa.Array:
        # Arrow's take builds the string column in C; a null index gives a null string
        return pa.array(names, type=pa.string()).take(pa.array(index, mask=index < 0))

    gene = np.repeat(np.arange(n_genes), cells)
    cell = np.tile(np.arange(cells), n_genes)
    return pa.table(
        {
            S.GENE_ID: column(data.genes["gene_id"].tolist(), gene),
            S.DONOR_ID: column(data.donors, cell // n_tissues),
            S.TISSUE: column(data.tissues, cell % n_tissues),
            S.SAMPLE_ID: column(data.samples[S.SAMPLE_ID].tolist(), cell_sample.ravel()[cell]),
            "value_log1p": data.y.ravel(),
            "observed": observed.ravel(),
        }
    )


def _write_config(path: Path, data: _Dataset) -> None:
    """A config with paths relative to itself, so that the folder can be moved as a whole."""
    config = {
        "name": "synthetic",
        "seed": int(data.spec.seed),  # the spec accepts numpy integers; safe_dump does not
        "inputs": {
            "genome": FILES["genome"],
            "genes": FILES["genes"],
            "expression": FILES["expression"],
            "samples": FILES["samples"],
            "variants": FILES["variants"],
            "scale": "tpm",
        },
        "promoter": {"upstream": int(data.spec.upstream), "downstream": int(data.spec.downstream)},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _validate_config(path: Path, spec: SynthSpec) -> None:
    """Load the written config as a user would, and check that it points at the files written beside it."""
    config = load_config(path)
    for name in ("genome", "genes", "expression", "samples", "variants"):
        target = getattr(config.inputs, name)
        if target is None or not Path(target).is_file():
            raise RuntimeError(f"{path}: inputs.{name} = {target!r} is not a file written beside the config")
    if (config.promoter.upstream, config.promoter.downstream) != (spec.upstream, spec.downstream):
        raise RuntimeError(f"{path}: promoter window {config.promoter} does not match the spec")

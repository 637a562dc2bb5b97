"""Typed configuration: one YAML file parsed into frozen dataclasses, checked on construction.

YAML is only parsed (``yaml.safe_load``) and then mapped field by field onto the dataclasses below; an unknown key,
a value of the wrong type or an out-of-range value raises :class:`~geximpute.errors.ConfigError` naming the dotted
key and the value. Any value can be overridden with ``--set dotted.key=value`` (the value is read as YAML, so
``--set promoter.upstream=2000`` gives an int and ``--set inputs.samples=null`` clears a path).

Relative input paths are resolved against the directory of the config file, so a config travels with its data.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from geximpute.errors import ConfigError

#: an output's store, beside it: ``.<name>.geximpute`` holds its versions, and ``<name>`` links to the current one
#: (:mod:`geximpute.runtime.atomic`)
OUTPUT_STORE_SUFFIX = ".geximpute"

Scale = Literal["tpm", "counts", "log", "normalised"]
GenesFormat = Literal["auto", "gtf", "gff3", "bed", "tsv", "csv"]
ExpressionFormat = Literal["auto", "gct", "wide", "long", "bed", "store"]
SoftMask = Literal["upper", "n"]


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _require(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"config key {key!r} has value {value!r}; expected {expected}")


@dataclass(frozen=True)
class InputsConfig:
    """Input files. Only ``expression`` is always required; ``genes`` too unless the expression is a phenotype BED.

    Attributes:
        genes: gene annotation: GTF/GTF.gz, GFF3, BED6 or TSV/CSV with named columns. May be left out when
            ``expression`` is a QTLtools/FastQTL phenotype BED: the genes' TSS and strand are then read from it.
        expression: GCT 1.2, wide TSV/CSV/Parquet (genes x samples or genes x tissues), long TSV/CSV/Parquet
            (gene_id, sample_id, value) or a QTLtools/FastQTL phenotype BED (``#chr start end gene length
            strand`` then one column per person, format ``bed``).
        genome: FASTA (plain or bgzip) for promoter sequence; optional, but required with ``variants``.
        samples: sample table (sample_id -> donor_id, tissue); without it every expression column is one tissue
            of one reference genotype, as in a median-by-tissue table.
        variants: VCF/VCF.gz/BCF of personal genomes; optional (needs ``genome``: haplotypes are built on it).
        sample_map: two-column table linking VCF sample names to expression donor ids, when they differ.
        scale: what the expression values are: ``tpm`` (or another length-normalised abundance), raw
            ``counts`` (normalised per sample on reading), already ``log``-transformed, or ``normalised`` by an
            eQTL pipeline (e.g. rank-normalised; may be negative): ``log`` and ``normalised`` values are used as
            they are, with no transform.
        tissue: the one tissue of an expression file with one column per person and no sample table (a phenotype
            BED): each column is then a donor (named by the column) measured in this tissue.
        genes_format, expression_format: ``auto`` picks the format from the file name.
        gene_types: keep only these gene types from a GTF/GFF3/TSV that has them (empty: keep all).
        genome_partial: the FASTA deliberately covers only part of the genome (some chromosomes, or pieces of
            them): genes and variants outside it get no sequence and are reported, instead of being an error.
    """

    genes: str = ""
    expression: str = ""
    genome: str | None = None
    samples: str | None = None
    variants: str | None = None
    sample_map: str | None = None
    scale: Scale = "tpm"
    genes_format: GenesFormat = "auto"
    expression_format: ExpressionFormat = "auto"
    gene_types: tuple[str, ...] = ()
    genome_partial: bool = False
    tissue: str | None = None

    def __post_init__(self) -> None:
        _require(bool(self.expression), "inputs.expression", self.expression, "a path to an expression file")
        bed = self.expression_format == "bed" or self.expression.lower().removesuffix(".gz").removesuffix(
            ".bgz").endswith(".bed")
        _require(bool(self.genes) or bed, "inputs.genes", self.genes,
                 "a path to a gene annotation file (it may be left out only when inputs.expression is a "
                 "phenotype BED, whose rows give each gene's TSS and strand)")
        # personal genomes are built on the reference: without it the VCF was read and then every genetic score
        # was missing, and the bundle still claimed to read genomes
        _require(not self.variants or bool(self.genome), "inputs.genome", self.genome,
                 "a FASTA of the reference genome whenever inputs.variants is set (the donors' promoter haplotypes "
                 "and cis-genetic scores are built on it; it may cover part of the genome: inputs.genome_partial)")
        # the sample table names each column's tissue: the one tissue was dropped without a word
        _require(not (self.tissue and self.samples), "inputs.tissue", self.tissue,
                 "null when inputs.samples is set (the sample table gives each sample's tissue; inputs.tissue names "
                 "the one tissue of an expression file without a sample table)")

    def resolved(self, base: Path) -> InputsConfig:
        """Return a copy with every relative path made absolute against ``base``."""

        def fix(p: str | None) -> str | None:
            return _resolve_path(p, base)

        return dataclasses.replace(
            self,
            genes=fix(self.genes) if self.genes else "",
            expression=fix(self.expression),
            genome=fix(self.genome),
            samples=fix(self.samples),
            variants=fix(self.variants),
            sample_map=fix(self.sample_map),
        )


@dataclass(frozen=True)
class ExpressionConfig:
    """How expression values are turned into the modelling scale.

    Attributes:
        transform: ``log1p`` of TPM / normalised counts (ignored when ``inputs.scale`` is ``log``).
        counts_normalisation: per-sample normalisation of raw counts: ``cpm`` (counts per million of the genes
            in the file) or ``median_ratio`` (DESeq2-style size factors, robust when few genes are present).
    """

    transform: Literal["log1p", "none"] = "log1p"
    counts_normalisation: Literal["cpm", "median_ratio"] = "cpm"


@dataclass(frozen=True)
class PromoterConfig:
    """The promoter window around each TSS, strand-oriented (upstream is 5' of the TSS on the gene's strand).

    Attributes:
        upstream: bases 5' of the TSS.
        downstream: bases 3' of the TSS, the TSS base included.
        soft_mask: ``upper`` keeps soft-masked (lower-case) bases as ordinary bases; ``n`` turns them into N.
        max_unknown_fraction: a gene's window counts as known only when at most this fraction of its bases are
            unknown (``N`` in the FASTA, or off the record); other genes get the network's learned stand-in. A
            sparse genome marks unknown sequence with ``N``: with the default 0 a partly known window is unknown.
    """

    upstream: int = 1000
    downstream: int = 500
    soft_mask: SoftMask = "upper"
    max_unknown_fraction: float = 0.0

    def __post_init__(self) -> None:
        _require(self.upstream >= 0, "promoter.upstream", self.upstream, "an integer >= 0")
        _require(self.downstream >= 1, "promoter.downstream", self.downstream, "an integer >= 1 (the TSS base)")
        _require(
            self.upstream + self.downstream <= 1_000_000,
            "promoter.upstream",
            self.upstream,
            "a window of at most 1 Mb in all",
        )
        _require(0 <= self.max_unknown_fraction < 1, "promoter.max_unknown_fraction", self.max_unknown_fraction,
                 "a number in [0, 1)")

    @property
    def length(self) -> int:
        return self.upstream + self.downstream

    def known(self, unknown_bases: int) -> bool:
        """Whether a window with ``unknown_bases`` unknown bases counts as known sequence."""
        return unknown_bases <= self.max_unknown_fraction * self.length


@dataclass(frozen=True)
class SplitConfig:
    """Held-out chromosomes for model validation and test (names as in the genome or the annotation).

    Attributes:
        valid_chroms: genes on these chromosomes validate the network (early stopping, the CNN's pre-training);
            they are never trained on.
        test_chroms: genes on these chromosomes are marked ``test`` (the records' ``split`` column) and held out
            of learning: no training example, CNN pre-training level or baseline tuning split is cut from their
            values (they still appear as other genes' context, as any visible value does); ``evaluate`` scores
            the hidden entries on them apart (``test_chroms`` in ``metrics.json``).
    """

    valid_chroms: tuple[str, ...] = ()
    test_chroms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        both = set(self.valid_chroms) & set(self.test_chroms)
        _require(
            not both,
            "split.test_chroms",
            list(self.test_chroms),
            f"no chromosome also in valid_chroms {both}",
        )


#: the names ``evaluation.methods`` takes
EVALUATION_METHODS = frozenset({
    "distance", "row_tissue", "matrix_completion", "tissue_donor", "hybrid", "hybrid_reference", "elastic_net",
    "pairwise_regression", "cross_gene_regression", "iterative_ridge", "local_regression", "chained_boosting",
    "tensor_factorisation", "promoter_composition", "gene_family"})


@dataclass(frozen=True)
class EvaluationConfig:
    """Which values are hidden for evaluation, and how results are scored.

    Attributes:
        task: ``entries`` hides a random fraction of observed (gene, sample) values; ``genes`` hides whole genes
            in every sample; ``samples`` hides whole samples (a donor's entire tissue), or with ``whole_donors``
            every sample of a fraction of the donors (held-out individuals: only their genomes are known).
        seed: seed of the hidden set (independent of the global seed so that methods can vary while the hidden
            set stays fixed).
        fraction: fraction of entries, genes or samples hidden.
        methods: the methods scored, all on exactly the same hidden entries; ``hybrid`` trains the network and
            the head on training folds (see :mod:`geximpute.science.folds`).
        ablations: with ``hybrid``, also score ``cnn_only``, ``transformer_only`` and ``xgb_features_only``.
        min_donors: fewest hidden donors of a (gene, tissue) for its across-donor Pearson to count.
        whole_donors: with task ``samples``, hide whole donors (``fraction`` of the donors) instead of samples.
        heritability: optional table (TSV/CSV with ``gene_id`` and ``h2`` columns, e.g. the ``truth/genes.tsv``
            of ``geximpute synth``); the report then shows each gene's planted ceiling ``sqrt(h2)`` next to the
            across-donor Pearson of every method.
    """

    task: Literal["entries", "genes", "samples"] = "entries"
    seed: int = 0
    fraction: float = 0.1
    methods: tuple[str, ...] = field(
        default=("distance", "row_tissue", "matrix_completion", "tissue_donor", "pairwise_regression",
                 "cross_gene_regression", "iterative_ridge", "chained_boosting", "local_regression",
                 "tensor_factorisation", "promoter_composition", "gene_family", "hybrid"),
        # the schema an editor checks against: the names the loader takes, one at least
        metadata={"schema": {"anyOf": [{"type": "array", "items": {"enum": sorted(EVALUATION_METHODS)},
                                        "minItems": 1}, {"enum": sorted(EVALUATION_METHODS)}]}})
    ablations: bool = True
    min_donors: int = 10
    whole_donors: bool = False
    heritability: str | None = None

    def __post_init__(self) -> None:
        _require(0 < self.fraction < 1, "evaluation.fraction", self.fraction, "a number in (0, 1)")
        _require(self.seed >= 0, "evaluation.seed", self.seed, "an integer >= 0")
        _require(self.min_donors >= 3, "evaluation.min_donors", self.min_donors, "an integer >= 3")
        known = EVALUATION_METHODS
        bad = [m for m in self.methods if m not in known]
        _require(not self.whole_donors or self.task == "samples", "evaluation.whole_donors", self.whole_donors,
                 "false unless evaluation.task is 'samples'")
        _require(not bad, "evaluation.methods", list(self.methods), f"names among {sorted(known)}")
        _require(len(self.methods) > 0, "evaluation.methods", list(self.methods), "at least one method to score")


@dataclass(frozen=True)
class ContextConfig:
    """The context of each target entry.

    Attributes:
        k_neighbours: nearest genes on the same chromosome, with a visible value in the same sample.
        max_distance: neighbours farther than this (bp, TSS to TSS) are left out; ``None``: no limit.
        genetic_shrinkage: ridge penalty of the per-gene cis-genetic score on cis-variant dosages
            (:func:`geximpute.science.genomes.genetic_scores`); about the number of donors' worth of evidence an effect
            needs before it moves far from 0. ``null`` (default): chosen per gene by leave-one-donor-out error.
        family: whether each record carries its gene's family level (the other genes of its symbol's family in
            the sample, :class:`geximpute.science.baselines.FamilyLevels`, shrunk as ``context.family_shrinkage``
            says) for the networks to read: ``true`` whenever the genes have symbols, ``false`` never, ``null``
            (default) on the ``genes`` task when the genes' symbols form families (two genes or more share a stem
            such as ``SLC25``; a hidden gene has no value of its own, and its family is what the networks do not
            otherwise see). A model's networks read it when their training records had it, and ``impute`` then
            writes it into its records whatever this says.
        family_shrinkage: pseudo-genes of the family level's prior at each level (as ``baselines.fam_shrinkage``
            for the ``gene_family`` baseline, which tuning may change; the networks' input is fixed when their
            records are written, so it has a key of its own, recorded with the model and checked by ``impute``).
    """

    k_neighbours: int = 16
    max_distance: int | None = None
    genetic_shrinkage: float | None = None
    family: bool | None = None
    family_shrinkage: float = 3.0

    def __post_init__(self) -> None:
        _require(1 <= self.k_neighbours <= 256, "context.k_neighbours", self.k_neighbours, "an integer in 1..256")
        _require(
            self.max_distance is None or self.max_distance > 0,
            "context.max_distance",
            self.max_distance,
            "a positive number of bases or null",
        )
        _require(self.genetic_shrinkage is None or self.genetic_shrinkage > 0, "context.genetic_shrinkage",
                 self.genetic_shrinkage, "a number > 0 or null")
        _require(self.family_shrinkage > 0, "context.family_shrinkage", self.family_shrinkage, "a number > 0")


@dataclass(frozen=True)
class GenotypesConfig:
    """How personal genomes (``inputs.variants``) are read and used.

    Attributes:
        cis_window: bases on each side of the TSS whose variants feed the cis-genetic score
            (:func:`geximpute.science.genomes.genetic_scores`) and the ``elastic_net`` baseline, which always see the
            same window (PrediXcan uses 1 Mb; 100 kb keeps most of the signal at SNP-array density). ``null``:
            the promoter window only. The CNN reads the promoter haplotypes whatever this is.
        missing: a missing call (``./.``, or one missing allele) inside a window: ``mean`` reads the allele as
            REF in the promoter haplotypes and gives the site the mean dosage of the donors called there in the
            genetic score (it then adds nothing to the donor's score); ``reference`` reads it as REF in both;
            ``error`` refuses the VCF, naming the site and the donor.
        unphased: a donor whose two promoter haplotypes are ambiguous in a window: two or more heterozygous calls
            there, one of them unphased (``0/1``), or phased calls of two phase sets (FORMAT ``PS``, phased within
            their set only): ``as_written`` takes the alleles in the order the GT writes them (``0/1``: ALT on
            haplotype B); ``cis`` puts every unphased heterozygous ALT of the window on haplotype B whatever the
            GT's order (all on one chromosome); ``error`` refuses the VCF. Phased calls are never changed. The
            genetic score uses dosages, which phase does not affect.
        keep_filtered: read VCF records whose FILTER names a failed filter (``LowQual``, ``q10``) as well; by
            default only records that passed (``PASS``) or were not filtered (``.``) are read, and the others are
            counted in the report and logged.
    """

    cis_window: int | None = None
    missing: Literal["mean", "reference", "error"] = "mean"
    unphased: Literal["as_written", "cis", "error"] = "as_written"
    keep_filtered: bool = False

    def __post_init__(self) -> None:
        _require(self.cis_window is None or 0 <= self.cis_window <= 10_000_000, "genotypes.cis_window",
                 self.cis_window, "null or a number of bases in 0..10,000,000")


@dataclass(frozen=True)
class BaselinesConfig:
    """Settings of the classical baselines.

    Attributes:
        distance_k: neighbours averaged by the ``distance`` baseline (at most ``context.k_neighbours``).
        distance_offset: bases added to the TSS distance in the inverse-distance weight ``1 / (d + offset)``.
        mc_rank: rank of the soft-impute completion.
        mc_shrinkage: singular-value shrinkage, as a fraction of the largest singular value.
        mc_iterations: soft-impute iterations.
        donor_shrinkage: pseudo-count shrinking a donor's effect toward 0 when it has few other tissues.
        pr_min_donors: fewest donors with both tissues visible for a tissue pair's slope in
            ``pairwise_regression``.
        pr_prior: weight of the gene's tissue mean beside the pairwise estimates (in units of r^2/(1-r^2)).
        xg_min_donors: fewest donors with both cells visible for a line of ``cross_gene_regression``.
        xg_weight: weight of the lines from other genes beside the gene's own other tissues (x r^2/(1-r^2)) in
            ``cross_gene_regression``; 0 makes it ``pairwise_regression`` without a prior.
        xg_genes: other genes of its fit range each gene's lines are drawn from (those whose donor effects
            correlate most with its own); bounds the method's cost per gene.
        ridge_alpha: ridge penalty of each tissue's regression on the others in ``iterative_ridge``.
        ridge_iterations: rounds of ``iterative_ridge`` over all tissues.
        lls_k: nearest rows each row is regressed on in ``local_regression``.
        lls_alpha: ridge penalty of that regression.
        lls_start: the method whose filled rows ``local_regression`` starts from: ``iterative_ridge`` or
            ``chained_boosting`` (each with its own settings); with sample-level data (several donors), where
            ``chained_boosting`` does not apply, always ``iterative_ridge``.
        cb_rounds: rounds of ``chained_boosting``'s boosted regressions over all tissues (a gene x tissue table
            only; it starts from ``iterative_ridge``'s filled rows, with its two settings).
        cb_max_rows: most rows each of its regressions learns from (drawn at random where a tissue has more).
        cb_bags: independent runs of ``chained_boosting`` (each with its own seed for the rows drawn, the held-out
            tenth and the trees' row and column samples) whose fills are averaged. Measured on the validation split
            of the visible medians entries: 0.498 RMSE with one, 0.494 with two, 0.492 with three or four.
        cb_max_depth: depth of ``chained_boosting``'s trees. Measured on the tuning's validation splits of the
            visible medians entries (evaluation seeds 0-2, docs/benchmarks.md): depth 8 against 6 lowered its RMSE by
            0.0013 / 0.0014 / 0.0006 and that of the mean of it and ``local_regression`` started from it by 0.0008 /
            0.0015 / 0.0011 (at seed 1, depth 10 and 12 by 0.0010 and 0.0009).
        tf_rank: rank of the donor factors of ``tensor_factorisation``.
        tf_lambda: ridge penalty of its donor factors and loadings.
        tf_iterations: alternating least-squares rounds of ``tensor_factorisation``.
        comp_alpha: ridge penalty of ``promoter_composition`` (on standardised features).
        fam_shrinkage: pseudo-genes of ``gene_family``'s prior at each level (the fine family's mean is shrunk
            towards the coarse family's, that towards the sample's mean over all genes).
        tune: choose every tunable setting above from a small grid on a validation split carved out of the
            visible data (never the hidden entries); the choice is written into ``metrics.json``. ``false``: use
            the values as configured.
        tune_fraction: fraction of the visible units (genes, samples or entries, as the task hides) in the
            validation split.
        block_cells: the entry baselines (the stacked head's inputs) are fitted on consecutive ranges of genes, one
            at a time, each holding about this many gene x cell values (a cell: a sample or a donor-tissue pair,
            whichever the data have more of; at least 256 genes a range), so that a fit's memory does not grow
            with the genome or the cohort; data that fit in one range are fitted as a whole (every real dataset
            shipped here: 522,000 values in the medians, 59 genes of v8, 608 of Geuvadis). ``impute`` and
            ``nightly`` fit each range in a Ray task of its own.
        tune_ranges: the tuning (``tune``) fits each candidate setting on at most this many of those gene ranges,
            drawn with the evaluation seed and fitted together, and scores it on the validation entries of their
            genes: its cost and memory do not grow with the genome (data within this many ranges, every real
            dataset shipped here, are tuned as a whole).
    """

    distance_k: int = 10
    distance_offset: float = 1000.0
    mc_rank: int = 3
    mc_shrinkage: float = 0.01
    mc_iterations: int = 50
    donor_shrinkage: float = 1.0
    pr_min_donors: int = 10
    pr_prior: float = 0.0
    xg_min_donors: int = 40
    xg_weight: float = 0.05
    xg_genes: int = 64
    ridge_alpha: float = 10.0
    ridge_iterations: int = 5
    lls_k: int = 20
    lls_alpha: float = 10.0
    lls_start: Literal["iterative_ridge", "chained_boosting"] = "chained_boosting"
    cb_rounds: int = 2
    cb_max_rows: int = 200_000
    cb_bags: int = 3
    cb_max_depth: int = 8
    tf_rank: int = 4
    tf_lambda: float = 10.0
    tf_iterations: int = 20
    comp_alpha: float = 1.0
    fam_shrinkage: float = 3.0
    tune: bool = True
    tune_fraction: float = 0.1
    block_cells: int = 1_000_000
    tune_ranges: int = 2

    def __post_init__(self) -> None:
        _require(self.block_cells >= 1, "baselines.block_cells", self.block_cells, "an integer >= 1")
        _require(self.tune_ranges >= 1, "baselines.tune_ranges", self.tune_ranges, "an integer >= 1")
        _require(self.fam_shrinkage > 0, "baselines.fam_shrinkage", self.fam_shrinkage, "a number > 0")
        _require(self.distance_k >= 1, "baselines.distance_k", self.distance_k, "an integer >= 1")
        _require(self.distance_offset > 0, "baselines.distance_offset", self.distance_offset, "a number > 0")
        _require(self.mc_rank >= 1, "baselines.mc_rank", self.mc_rank, "an integer >= 1")
        _require(0 <= self.mc_shrinkage < 1, "baselines.mc_shrinkage", self.mc_shrinkage, "a number in [0, 1)")
        _require(self.mc_iterations >= 1, "baselines.mc_iterations", self.mc_iterations, "an integer >= 1")
        _require(self.donor_shrinkage >= 0, "baselines.donor_shrinkage", self.donor_shrinkage, "a number >= 0")
        _require(self.pr_min_donors >= 3, "baselines.pr_min_donors", self.pr_min_donors, "an integer >= 3")
        _require(self.pr_prior >= 0, "baselines.pr_prior", self.pr_prior, "a number >= 0")
        _require(self.xg_min_donors >= 3, "baselines.xg_min_donors", self.xg_min_donors, "an integer >= 3")
        _require(self.xg_weight >= 0, "baselines.xg_weight", self.xg_weight, "a number >= 0")
        _require(self.xg_genes >= 0, "baselines.xg_genes", self.xg_genes, "an integer >= 0")
        _require(self.ridge_alpha >= 0, "baselines.ridge_alpha", self.ridge_alpha, "a number >= 0")
        _require(self.ridge_iterations >= 1, "baselines.ridge_iterations", self.ridge_iterations, "an integer >= 1")
        _require(self.lls_k >= 1, "baselines.lls_k", self.lls_k, "an integer >= 1")
        _require(self.lls_alpha > 0, "baselines.lls_alpha", self.lls_alpha, "a number > 0")
        _require(self.cb_rounds >= 1, "baselines.cb_rounds", self.cb_rounds, "an integer >= 1")
        _require(self.cb_max_rows >= 100, "baselines.cb_max_rows", self.cb_max_rows, "an integer >= 100")
        _require(self.cb_bags >= 1, "baselines.cb_bags", self.cb_bags, "an integer >= 1")
        _require(self.cb_max_depth >= 1, "baselines.cb_max_depth", self.cb_max_depth, "an integer >= 1")
        _require(self.tf_rank >= 1, "baselines.tf_rank", self.tf_rank, "an integer >= 1")
        _require(self.tf_lambda > 0, "baselines.tf_lambda", self.tf_lambda, "a number > 0")
        _require(self.tf_iterations >= 1, "baselines.tf_iterations", self.tf_iterations, "an integer >= 1")
        _require(self.comp_alpha >= 0, "baselines.comp_alpha", self.comp_alpha, "a number >= 0")
        _require(0 < self.tune_fraction < 0.5, "baselines.tune_fraction", self.tune_fraction, "a number in (0, 0.5)")


@dataclass(frozen=True)
class ModelConfig:
    """Size of the CNN-transformer network, checked once here; :class:`geximpute.model.network.NetworkSpec` extends it.

    Attributes:
        d_model: width of tokens, the promoter embedding and the returned embedding.
        n_heads: attention heads; divides ``d_model``. 2 heads of width 16, not 4 of 8: CPU attention kernels cost
            per head at these sizes (4 heads measured about 1.5x slower per training step for the same flops).
        n_layers: transformer layers.
        cnn_channels: channels of every conv block.
        cnn_kernel: conv kernel width (bp at the first block); odd, so a conv keeps a sequence centred.
        cnn_layers: conv blocks; each but the last is followed by a 4x max-pool. One block of 64 channels (a motif
            scanner with global max and mean pooling) by measurement (docs/benchmarks.md, issue 13): on planted
            synthetic motifs it reaches Pearson 0.52 on held-out genes where 3 blocks of 32 reach 0.07, and on the
            real medians promoters it matches 3 blocks (0.396 against 0.393) at about half the multiply-adds.
        cnn_bins: stretches of the promoter window the CNN also pools on their own, besides the whole window (its
            output then knows where along the promoter a motif sits); 0: the whole window only. Measured with 6 on
            the medians ``genes`` task (docs/benchmarks.md): the CNN alone gains (``cnn_only`` +0.016, +0.04 on
            held-out genes' levels outside Ray), the hybrid does not (-0.0015), and on planted motifs both lose
            (``hybrid`` -0.08 over three seeds), so the default stays 0.
        dropout: dropout on the transformer's residual branches (not on its attention weights), in the
            ``cnn_only`` MLP and in the head.
    """

    d_model: int = 32
    n_heads: int = 2
    n_layers: int = 2
    cnn_channels: int = 64
    cnn_kernel: int = 15
    cnn_layers: int = 1
    cnn_bins: int = 0
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name, low in (("d_model", 4), ("n_heads", 1), ("n_layers", 1), ("cnn_channels", 1), ("cnn_kernel", 1),
                          ("cnn_layers", 1), ("cnn_bins", 0)):
            value = getattr(self, name)
            _require(_is_int(value) and value >= low, f"model.{name}", value, f"an integer >= {low}")
        _require(self.d_model % self.n_heads == 0, "model.n_heads", self.n_heads, "a divisor of model.d_model")
        _require(self.cnn_kernel % 2 == 1, "model.cnn_kernel", self.cnn_kernel, "an odd integer")
        _require(0 <= self.dropout < 1, "model.dropout", self.dropout, "a number in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Training of the network with Ray Train (TorchTrainer, DDP).

    Attributes:
        num_workers: Ray Train workers (one process each; DDP over gloo on CPU, NCCL on GPU).
        use_gpu: one GPU per worker; bf16 autocast is used on GPU.
        cpus_per_worker: CPUs each worker asks for (fractional on small machines so Ray Data still runs).
        batch_size: examples per worker and step.
        epochs: most epochs; training stops earlier when the validation loss stops improving.
        patience: epochs without improvement before stopping.
        lr, weight_decay: AdamW settings.
        folds, fold_fraction: inner folds of re-hidden visible entries that make the training examples
            (see :mod:`geximpute.science.folds`); each fold hides ``fold_fraction`` of the visible units. ``null``
            (the default): on the ``entries`` task the evaluation's ``fraction`` (a training record's context then
            misses about as much as a hidden entry's: the head's held-out rows calibrate an interval for the
            context it is used with; medians ``entries`` over seeds 0-2: RMSE 0.4681 against 0.4697 with 0.25,
            coverage 0.821 against 0.828, each evaluation 875-973 s against 967-1,114; docs/benchmarks.md), on
            ``genes`` and ``samples`` 0.25 (a fold's hidden units are what its network learns from: more of them
            teach more).
        drop_neighbours, drop_tissues, drop_gene: denoising: per example, the chance that the whole neighbour
            group, tissue group or gene-level means are hidden from the network.
        drop_promoter: per example, the chance that the network sees the learned stand-in instead of the gene's
            promoter, so that it cannot lean on recognising a training gene's promoter (0: never).
        max_failures: worker failures survived by resuming from the last checkpoint.
        max_examples_per_epoch: cap on examples per epoch (``None``: all).
        max_fold_records: most labelled records a training fold writes (``None``: one per entry it hides). A fold
            hides ``fold_fraction`` of the visible units; where they hold more entries than this, the records go to
            a seeded random set of the fold's (gene, tissue) groups (:func:`geximpute.science.folds.fold_targets`;
            the whole fold stays hidden, so each record's context is unchanged). Bounds prepare's training records,
            the epochs and the head at genome scale (20,000 genes x 2,400 samples: 11 million entries in a fold of
            a quarter); the real configs' folds hold 40,000-231,000 and are untouched.
        pretrain_epochs: gene-level pre-training of the promoter CNN before the network trains: most epochs of
            fitting the CNN to each visible gene's mean level from its reference promoter, keeping the epoch best
            on the validation genes and stopping after 3 without a better one once 8 have run (0: none; networks
            without the CNN skip it). Without validation chromosomes the units the head holds out are left out of
            it (:func:`geximpute.fit.hybrid.pretrain_levels`).
        freeze_cnn: after pre-training, keep the CNN as it is while the rest of the network trains (its output
            for every promoter is computed once per run); ``false``: train it further with the rest. Measured
            (docs/benchmarks.md): frozen, the networks keep what pre-training found (medians ``genes``:
            ``hybrid_network`` 0.356 against 0.321, ``cnn_only`` 0.237 against 0.184) and evaluations run 2-4x
            faster; on the medians ``entries`` task the hybrid's RMSE is 0.004 higher frozen.
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    batch_size: int = 512
    epochs: int = 8
    patience: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-4
    folds: int = 2
    fold_fraction: float | None = None
    drop_neighbours: float = 0.1
    drop_tissues: float = 0.1
    drop_gene: float = 0.1
    drop_promoter: float = 0.0
    max_failures: int = 2
    max_examples_per_epoch: int | None = None
    max_fold_records: int | None = 1_000_000
    pretrain_epochs: int = 20
    freeze_cnn: bool = True

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, "train.num_workers", self.num_workers, "an integer >= 1")
        _require(self.cpus_per_worker > 0, "train.cpus_per_worker", self.cpus_per_worker, "a number > 0")
        _require(self.batch_size >= 2, "train.batch_size", self.batch_size, "an integer >= 2")
        _require(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _require(self.patience >= 1, "train.patience", self.patience, "an integer >= 1")
        _require(self.lr > 0, "train.lr", self.lr, "a number > 0")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        _require(self.max_examples_per_epoch is None or self.max_examples_per_epoch >= self.num_workers,
                 "train.max_examples_per_epoch", self.max_examples_per_epoch,
                 f"null (every example) or an integer >= train.num_workers ({self.num_workers})")
        _require(self.folds >= 1, "train.folds", self.folds, "an integer >= 1")
        _require(
            self.fold_fraction is None or 0 < self.fold_fraction and self.folds * self.fold_fraction <= 1,
            "train.fold_fraction",
            self.fold_fraction,
            f"null (by task) or a number in (0, 1/train.folds] = (0, {1 / self.folds:.3g}]",
        )
        for name in ("drop_neighbours", "drop_tissues", "drop_gene", "drop_promoter"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"train.{name}", value, "a probability in [0, 1)")
        _require(self.max_failures >= 0, "train.max_failures", self.max_failures, "an integer >= 0")
        _require(self.max_fold_records is None or self.max_fold_records >= 1, "train.max_fold_records",
                 self.max_fold_records, "an integer >= 1, or null for every entry of a fold")
        _require(self.pretrain_epochs >= 0, "train.pretrain_epochs", self.pretrain_epochs, "an integer >= 0")


@dataclass(frozen=True)
class HeadConfig:
    """The XGBoost head, fitted with Ray Train's XGBoostTrainer.

    Attributes:
        num_workers, cpus_per_worker: Ray Train workers of the XGBoost fit.
        ray_min_rows: a head table of fewer rows than this is boosted in the driver process, with the same
            settings and code, without starting an XGBoostTrainer (whose start costs more than such a fit: 10-25 s
            on a 2-core machine); 0: always through Ray Train.
        num_boost_round, max_depth, eta, subsample, colsample_bytree, min_child_weight: XGBoost settings.
        quantiles: lower and upper quantiles of the interval given with every estimate (0.1, 0.9: 80%).
        cv_folds: on the ``genes`` task, whose held-out units are whole genes (about a hundred on a small
            dataset, a noisy basis for a choice), the head's number of trees is chosen on its training rows as well,
            each estimated by trees boosted on the other ``cv_folds`` folds of genes; 0 (or 1): on the held-out
            rows alone. Costs ``cv_folds`` more boosters per head.
        conformal_bins: the interval's conformal step is calibrated in this many bins of equal size of the held-out
            rows' estimates, each with its own amount (Mondrian conformal prediction), so that the interval covers
            its span within each range of the estimate, not only over all rows; 1: one amount for every row. Bins
            of fewer than 100 held-out rows fall back to one amount.
    """

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    ray_min_rows: int = 20_000
    num_boost_round: int = 400
    max_depth: int = 6
    eta: float = 0.05
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    min_child_weight: float = 5.0
    quantiles: tuple[float, ...] = (0.1, 0.9)
    cv_folds: int = 4
    conformal_bins: int = 4

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, "head.num_workers", self.num_workers, "an integer >= 1")
        _require(self.cv_folds >= 0, "head.cv_folds", self.cv_folds, "an integer >= 0 (0: no cross-validation)")
        _require(self.conformal_bins >= 1, "head.conformal_bins", self.conformal_bins,
                 "an integer >= 1 (1: one conformal amount for every row)")
        _require(self.ray_min_rows >= 0, "head.ray_min_rows", self.ray_min_rows, "an integer >= 0")
        _require(self.num_boost_round >= 1, "head.num_boost_round", self.num_boost_round, "an integer >= 1")
        _require(0 < self.eta <= 1, "head.eta", self.eta, "a number in (0, 1]")
        _require(self.cpus_per_worker > 0, "head.cpus_per_worker", self.cpus_per_worker, "a number > 0")
        _require(self.max_depth >= 1, "head.max_depth", self.max_depth, "an integer >= 1")
        _require(0 < self.subsample <= 1, "head.subsample", self.subsample, "a fraction in (0, 1]")
        _require(0 < self.colsample_bytree <= 1, "head.colsample_bytree", self.colsample_bytree,
                 "a fraction in (0, 1]")
        _require(self.min_child_weight >= 0, "head.min_child_weight", self.min_child_weight, "a number >= 0")
        _require(
            len(self.quantiles) == 2 and 0 < self.quantiles[0] < self.quantiles[1] < 1,
            "head.quantiles",
            list(self.quantiles),
            "two increasing probabilities in (0, 1)",
        )

    @property
    def interval_level(self) -> float:
        """The share of values the interval aims to hold: the span of ``quantiles`` (0.8 for 0.1 to 0.9)."""
        return round(self.quantiles[1] - self.quantiles[0], 6)


@dataclass(frozen=True)
class RayConfig:
    """Where and how to run Ray.

    Attributes:
        address: ``None`` starts a local single-node Ray in this process; ``auto`` or ``ray://...`` joins a cluster.
        num_cpus: CPUs for a local Ray (``None``: all of this machine's).
        object_store_mb: object store size for a local Ray (``None``: Ray's default).
        data_object_store_mb: the object store memory each Ray Data execution of this process may hold at once
            (blocks built and not yet consumed; Ray Data's ``resource_limits``). Every object-store page a worker
            writes a block into counts in its resident memory for as long as the page stays mapped, so a budget
            that grows with the store (Ray Data's default, ``None``: a share of the whole object store) lets the
            context actors run ahead of the predictors and grow with the entries of a run (measured at 4x donors,
            context actor RSS: 1.82x uncapped, 1.07-1.24x at 128 MiB, 1.01-1.12x at 64 MiB on 10 tissues, which
            cost 13-27% of the wall time on 2 cores). Off by default: on the real v8 data (54 tissues, blocks of
            records near 64 MiB) 64 MiB made ``impute`` 1.7x slower (``docs/benchmarks.md``). Set it (a few
            blocks' worth) where a worker's memory must not grow with the run.
        cpus_per_task: CPUs each Ray Data task or actor asks for; fractional so that read tasks still get
            scheduled on a 2-core machine.
        concurrency: Ray Data actors building records in ``prepare`` and ``evaluate``, and the most Ray tasks run
            at once where a step fits the stacked baselines per gene range or cuts each chromosome's shards
            (``impute`` and ``nightly`` build their records with one context actor).
    """

    address: str | None = None
    num_cpus: int | None = None
    object_store_mb: int | None = None
    data_object_store_mb: int | None = None
    cpus_per_task: float = 0.5
    concurrency: int = 2

    def __post_init__(self) -> None:
        _require(0 < self.cpus_per_task <= 64, "ray.cpus_per_task", self.cpus_per_task, "a number in (0, 64]")
        _require(self.concurrency >= 1, "ray.concurrency", self.concurrency, "an integer >= 1")
        _require(self.num_cpus is None or self.num_cpus >= 1, "ray.num_cpus", self.num_cpus, "an integer >= 1")
        _require(
            self.object_store_mb is None or self.object_store_mb >= 64,
            "ray.object_store_mb",
            self.object_store_mb,
            "at least 64",
        )
        _require(
            self.data_object_store_mb is None or self.data_object_store_mb >= 16,
            "ray.data_object_store_mb",
            self.data_object_store_mb,
            "at least 16",
        )


def _resolve_path(path: str | None, base: Path) -> str | None:
    """``path`` made absolute against ``base`` (``~`` expanded); None or an empty text: None (``Path("")`` would be
    ``base`` itself: an empty ``nightly.inbox`` read the config's own folder as the inbox). Links are followed but a
    committed output's own (``<name>`` -> ``.<name>.geximpute/v-*``): given the version folder it named when the
    config was read, a run wrote a new store inside the old version (each rerun of ``fit-head`` with
    ``impute.model_dir: model`` one level deeper)."""
    if path is None or not str(path).strip():
        return None
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    p = base / p
    parent = Path(os.path.realpath(p.parent))
    if p.is_symlink() and Path(os.path.realpath(p)).parent == parent / f".{p.name}{OUTPUT_STORE_SUFFIX}":
        return str(parent / p.name)  # a committed output: the link, which every commit moves to its new version
    return str(p.resolve())  # any other link followed (a user's folder elsewhere: a nightly root on a big disk)


@dataclass(frozen=True)
class ImputeConfig:
    """Batch imputation (``geximpute impute``, see :mod:`geximpute.steps.impute`).

    Attributes:
        donors: donors whose missing entries are imputed (empty: every donor of the data).
        tissues: tissues imputed (empty: every tissue of the data, which is the model's tissue vocabulary).
        include_observed: also write the measured entries, each with its prediction (made without its own
            value) and the measured value in ``observed``.
        missing_profiles: give every (donor, tissue) pair without any sample a profile of its own (a sample with
            nothing measured, predicted from the donor's other tissues); ``false`` fills only the missing genes
            of measured samples.
        batch_size: context records per prediction batch (and about the rows per Parquet file).
        predictors: predictor actors on CPU (each ``ray.cpus_per_task`` CPUs); with GPUs, one actor per GPU.
        blocks_in_flight: blocks of context records the imputation stream holds at once. The context stage
            hands each block to the predictors as a file in the run's staging folder (``_records/``, read and
            deleted by a predictor), and waits while this many are unread; the object store, which then carries
            the predictions, gets a budget of as many blocks (the run's largest block times an estimate of a
            record's bytes from the tokens its records carry, ``geximpute.steps.impute.record_bytes``), when
            ``ray.data_object_store_mb`` sets no cap; never more than Ray Data's own budget. Records that passed
            through the object store stayed mapped in the context actor and the predictors, whose resident
            memory then grew with the blocks in flight (``docs/benchmarks.md``). ``null``: no files, the records
            through the object store with Ray Data's own budget (the context actor's memory then grows with the
            run).
        use_gpu: ``true``/``false`` forces GPU predictor actors on or off; ``null`` uses GPUs when the Ray
            cluster has any (or ``train.use_gpu`` is set).
        gpus: GPU predictor actors (one GPU each) when GPUs are used; ``null``: one per GPU the cluster has when
            the run starts. On an autoscaling cluster whose GPU nodes start at zero, set it with
            ``gpu_wait_seconds``: the run asks the autoscaler for that many GPUs and waits for them.
        gpu_wait_seconds: how long a run that uses GPUs waits for the autoscaler to add the GPUs it asks for
            (``gpus``, at least one) when the cluster has fewer; 0: none are asked for, the GPUs already there are
            used (a run that wants GPUs on a cluster without any stops at once, naming the setting).
        model_dir: the model bundle (default ``<output_dir>/model``): where ``geximpute fit-head`` writes it and
            ``impute``, ``nightly`` and ``variant-effects`` read it.
        out_dir: the Parquet output (default ``<output_dir>/predictions``); replaced as a whole by each run.
    """

    donors: tuple[str, ...] = ()
    tissues: tuple[str, ...] = ()
    include_observed: bool = False
    missing_profiles: bool = True
    batch_size: int = 16384
    predictors: int = 2
    blocks_in_flight: int | None = 16
    use_gpu: bool | None = None
    gpus: int | None = None
    gpu_wait_seconds: float = 0.0
    model_dir: str | None = None
    out_dir: str | None = None

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "impute.batch_size", self.batch_size, "an integer >= 1")
        _require(self.gpus is None or self.gpus >= 1, "impute.gpus", self.gpus, "an integer >= 1 or null")
        _require(self.gpu_wait_seconds >= 0, "impute.gpu_wait_seconds", self.gpu_wait_seconds, "seconds >= 0")
        _require(self.predictors >= 1, "impute.predictors", self.predictors, "an integer >= 1")
        _require(self.blocks_in_flight is None or self.blocks_in_flight >= 1, "impute.blocks_in_flight",
                 self.blocks_in_flight, "an integer >= 1 or null")

    def resolved(self, base: Path) -> ImputeConfig:
        """Return a copy with relative folders made absolute against ``base``."""
        return dataclasses.replace(self, model_dir=_resolve_path(self.model_dir, base),
                                   out_dir=_resolve_path(self.out_dir, base))


@dataclass(frozen=True)
class NightlyConfig:
    """Nightly imputation of new genomes (``geximpute nightly``, see :mod:`geximpute.steps.nightly`).

    Attributes:
        inbox: folder of new genomes: one ``<donor>.vcf``/``.vcf.gz``/``.bcf`` per donor, optionally with
            ``<donor>.expression.tsv`` (genes x tissues, wide, on ``inputs.scale``) of the donor's measured tissues.
        output: root of the nightly Parquet dataset, ``run_date=YYYY-MM-DD/tissue=.../`` (default
            ``<output_dir>/nightly``).
        ledger: JSON record of the donors done (default ``<output>.ledger.json`` beside the output).
        quarantine: where malformed inputs are moved, each with its error beside it (default ``<inbox>/quarantine``).
        donors_per_commit: donors imputed and committed together; an interrupted run keeps the commits it made.
        lease_seconds: time to live of the run's lease (``<output>.lock``), renewed every third of it while the run
            works; a run killed on any host blocks the next one at most this long.
        redelivered: a done donor whose genome file changed (a new checksum), or whose expression file is new or
            changed: ``reimpute`` imputes it again into the
            run date of the run that sees it (the next one if it was imputed the same day); ``ignore`` only warns.
        run_date: the partition a run writes, ``YYYY-MM-DD`` (null: today); ``geximpute nightly --run-date`` sets
            it too. A config key so that a back-fill reaches a run on a cluster (``--set nightly.run_date=...``
            through ``geximpute submit`` or a job's entry point).
    """

    inbox: str | None = None
    output: str | None = None
    ledger: str | None = None
    quarantine: str | None = None
    donors_per_commit: int = 50
    lease_seconds: float = 600.0
    redelivered: Literal["reimpute", "ignore"] = "reimpute"
    run_date: str | None = None

    def __post_init__(self) -> None:
        _require(self.run_date is None or bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(self.run_date))),
                 "nightly.run_date", self.run_date, "null or a date written YYYY-MM-DD")
        _require(self.donors_per_commit >= 1, "nightly.donors_per_commit", self.donors_per_commit, "an integer >= 1")
        _require(5 <= self.lease_seconds < math.inf, "nightly.lease_seconds", self.lease_seconds,
                 "a finite number of seconds >= 5 (a lease that never expires would hold every later run back "
                 "after a crash)")

    def resolved(self, base: Path) -> NightlyConfig:
        """Return a copy with relative paths made absolute against ``base``."""
        return dataclasses.replace(self, inbox=_resolve_path(self.inbox, base), output=_resolve_path(self.output, base),
                                   ledger=_resolve_path(self.ledger, base),
                                   quarantine=_resolve_path(self.quarantine, base))


@dataclass(frozen=True)
class Config:
    """The whole configuration tree.

    Attributes:
        name: the dataset's name, written into every output's manifest.
        seed: seeds every random choice of a run (hidden entries, folds, networks, heads).
        output_dir: the folder every step writes into by default (relative paths: to the config file's folder).
    """

    inputs: InputsConfig
    name: str = "geximpute"
    seed: int = 0
    output_dir: str = "geximpute-out"
    expression: ExpressionConfig = field(default_factory=ExpressionConfig)
    promoter: PromoterConfig = field(default_factory=PromoterConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    genotypes: GenotypesConfig = field(default_factory=GenotypesConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    impute: ImputeConfig = field(default_factory=ImputeConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)

    def __post_init__(self) -> None:
        _require(bool(self.name), "name", self.name, "a non-empty dataset name")
        _require(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _require(
            self.baselines.distance_k <= self.context.k_neighbours,
            "baselines.distance_k",
            self.baselines.distance_k,
            f"at most context.k_neighbours ({self.context.k_neighbours})",
        )

    @property
    def fold_fraction(self) -> float:
        """The share of the visible units each training fold hides: ``train.fold_fraction``, or where it is null
        (the default) :func:`default_fold_fraction` of this config's task; resolved where it is read, so a config
        whose task or fraction is replaced (or set again on a saved copy) never keeps another task's number."""
        if self.train.fold_fraction is not None:
            return self.train.fold_fraction
        return default_fold_fraction(self.evaluation.task, self.evaluation.fraction, self.train.folds)

    @property
    def model_dir(self) -> Path:
        """The model bundle's folder: ``impute.model_dir``, or ``<output_dir>/model``; where ``fit-head`` writes it
        and ``impute``, ``nightly`` and ``variant-effects`` read it, unless told another."""
        return Path(self.impute.model_dir or Path(self.output_dir) / "model")

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (for manifests and bundles)."""
        return _to_plain(dataclasses.asdict(self))


#: ``train.fold_fraction`` on the ``genes`` and ``samples`` tasks unless set
UNIT_FOLD_FRACTION = 0.25


def default_fold_fraction(task: str, fraction: float, folds: int) -> float:
    """``train.fold_fraction`` where the config leaves it null: on task ``entries`` the evaluation's ``fraction``,
    on ``genes`` and ``samples`` :data:`UNIT_FOLD_FRACTION`; at most ``1 / folds`` (folds never overlap)."""
    wanted = fraction if task == "entries" else UNIT_FOLD_FRACTION
    return min(wanted, 1 / folds)


def fold_fraction_of(config: Mapping[str, Any]) -> float:
    """:attr:`Config.fold_fraction` of a config's plain data (a manifest's ``config``: :meth:`Config.to_dict`),
    missing keys read as their defaults: what a run with it cut its training folds by."""
    train, evaluation = config.get("train") or {}, config.get("evaluation") or {}
    if train.get("fold_fraction") is not None:
        return float(train["fold_fraction"])
    return default_fold_fraction(evaluation.get("task", EvaluationConfig.task),
                                 evaluation.get("fraction", EvaluationConfig.fraction),
                                 train.get("folds", TrainConfig.folds))


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


# Parsing -------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _NotFinite(ConfigError):
    """A setting's number is infinite or NaN: no setting takes one."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:  # a section whose keys are all commented out: YAML reads it as null, meaning its defaults
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} has value {value!r}; expected a mapping of {tp.__name__} keys")
        return _build(tp, value, key)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except _NotFinite:
                raise
            except ConfigError:
                continue
    elif origin is tuple:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # one item given alone (a numeric donor id too)
        if isinstance(value, (list, tuple)):
            (item_tp, *_rest) = typing.get_args(tp)
            return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
            return int(value.strip().replace("_", ""))  # 1_000_000, 017: text to the loader (ids stay text)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            number = float(value.strip().replace("_", ""))  # 1e-3, 1_000.5 as YAML 1.1 wrote them
        if number is not None:
            if not math.isfinite(number):  # `.inf` passed every `> 0` check (a learning rate, a wait for GPUs)
                raise _NotFinite(f"config key {key!r} has value {value!r}; expected a finite number")
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, dt.date):  # YAML reads an unquoted 2026-12-01 as a date: the text was meant
            return value.isoformat()
    raise ConfigError(f"config key {key!r} has value {value!r}; expected {_type_name(tp)}")


#: a number written as YAML 1.2 reads it and YAML 1.1 (PyYAML) does not: ``1e-3``, ``5E4``
class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's numbers: ids are text unless they are plain decimal numbers. YAML 1.1
    reads ``0012`` as octal (10), ``1:30`` as base 60 (90) and ``1_0`` as 10, so a zero-padded or clock-like donor,
    sample or tissue id given unquoted became another id."""


def _unique_keys(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are each given once: YAML keeps the last of two, so ``scale: counts`` below
    ``scale: tpm`` (or a second ``promoter:`` section) replaced the first without a word."""
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys, which explicit ones override
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # an unhashable key: SafeLoader's own refusal below
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                        lambda loader, node: _unique_keys(loader, node, deep=True))

_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|(?:0|[1-9][0-9]*)(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
               r"|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))


def _yaml(text: str) -> Any:
    """``text`` parsed as YAML (:class:`_Loader`: safe, YAML 1.2's numbers)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


_FLOAT_TEXT = re.compile(r"[-+]?(\d+(_\d+)*\.?\d*|\.\d+)([eE][-+]?\d+)?")
#: a whole number as YAML 1.1 also wrote it (digit groups, leading zeros), for a setting that is a number
_INT_TEXT = re.compile(r"[-+]?\d+(_\d+)*")


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        close = difflib.get_close_matches(unknown[0], sorted(names), n=1, cutoff=0.6)
        raise ConfigError(f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                          + f"; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is absent
        raise ConfigError(f"config section {prefix or '<top>'!r}: {exc}") from exc


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` applied (value parsed as YAML)."""
    out = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        dotted, raw = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = _yaml(raw) if raw.strip() else ""
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: a value YAML cannot build (2026-02-30)
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from exc
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _has_path(data: Mapping[str, Any], dotted: str) -> bool:
    """Whether the plain ``data`` holds the dotted key."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def config_from_dict(data: Mapping[str, Any], base_dir: str | Path = ".", overrides: Iterable[str] = ()) -> Config:
    """Build a :class:`Config` from plain data; relative input paths resolve against ``base_dir``."""
    overrides = list(overrides)
    merged = apply_overrides(dict(data), overrides)
    if "inputs" not in merged:
        raise ConfigError("config has no 'inputs' section; it must name at least inputs.genes and inputs.expression")
    try:
        config = _build(Config, merged)
    except ConfigError as exc:
        # a key only a --set names is the command line's, not the file's; so is a bad value a --set gave (it wins
        # over the file's): the value quoted was not in the file
        given = [item.split("=", 1)[0].strip() for item in overrides if "=" in item]
        bad = re.search(r"(unknown )?config key '([^']+)'", str(exc))
        mine = [g for g in given if bad and (g == bad.group(2) or g.startswith(bad.group(2) + "."))]
        if mine and (not bad.group(1) or not _has_path(data, bad.group(2))):
            raise ConfigError(f"--set {mine[0]}: {exc}") from exc
        raise
    base = Path(base_dir).resolve()
    _require(bool(str(config.output_dir).strip()), "output_dir", config.output_dir, "a folder path")
    config = dataclasses.replace(config, evaluation=dataclasses.replace(
        config.evaluation, heritability=_resolve_path(config.evaluation.heritability, base)))
    return dataclasses.replace(
        config,
        inputs=config.inputs.resolved(base),
        output_dir=_resolve_path(config.output_dir, base),
        impute=config.impute.resolved(base),
        nightly=config.nightly.resolved(base),
    )


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config file and apply ``--set`` overrides.

    Raises:
        ConfigError: the file is missing, is not YAML, or holds an unknown key or a bad value.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config file (give the YAML file, e.g. {path / 'config.yaml'})")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file as UTF-8 text ({exc})") from exc
    try:
        data = _yaml(text) or {}
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a value YAML cannot build (a date 2026-02-30)
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top, got {type(data).__name__}")
    try:
        return config_from_dict(data, base_dir=path.parent, overrides=overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper that also quotes the strings :class:`_Loader` reads as numbers (``1e3``: a number to
    YAML 1.2, text to YAML 1.1), so that a config written out reads back the same under either."""


_Dumper.yaml_implicit_resolvers = {first: list(resolvers) for first, resolvers in
                                   yaml.SafeDumper.yaml_implicit_resolvers.items()}
for _first, _resolvers in _Loader.yaml_implicit_resolvers.items():
    for _tag, _regexp in _resolvers:
        if _tag in _NUMBER_TAGS:
            _Dumper.yaml_implicit_resolvers.setdefault(_first, []).append((_tag, _regexp))


def dump_config(config: Config) -> str:
    """The resolved config as YAML text (read back the same by :func:`load_config` and by ``yaml.safe_load``)."""
    return yaml.dump(config.to_dict(), Dumper=_Dumper, sort_keys=False)

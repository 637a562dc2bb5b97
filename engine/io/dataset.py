"""Load every input a config names, validate each and their joins, and summarise them (``geximpute inspect``)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from geximpute import schema as S
from geximpute.config import Config
from geximpute.errors import InputError
from geximpute.io.expression import Expression, read_expression
from geximpute.io.fasta import Genome
from geximpute.io.genes import GeneTable, phenotype_bed_genes, read_genes, shared_families
from geximpute.io.samples import check_column_names, person_samples, read_samples, reference_samples
from geximpute.io.variants import read_sample_map, read_variants

if TYPE_CHECKING:
    from geximpute.io.variants import Variants

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    """All inputs of one config, validated and joined.

    Attributes:
        config: the resolved config.
        genes: the annotation (all genes of the file).
        expression: the expression matrix, genes x samples on the input scale.
        samples: sample table rows for the expression's samples, in its column order (:data:`schema.SAMPLES`).
        genome: the FASTA, when configured.
        variants: the personal genomes, when configured.
        report: per-input reports and join counts.
    """

    config: Config
    genes: GeneTable
    expression: Expression
    samples: pa.Table
    genome: Genome | None = None
    variants: Variants | None = None
    report: dict = field(default_factory=dict)


def load_dataset(config: Config, *, with_variants: bool = True, matrix: str | Path | None = None) -> Dataset:
    """Read and validate every configured input; with ``matrix`` the expression values are kept in that file
    (:func:`geximpute.io.expression.read_expression`'s ``matrix``), not in memory.

    Raises:
        InputError: any input is bad, or the expression names samples the sample table lacks.
    """
    inputs = config.inputs
    genome = None
    if inputs.genome:
        log.info("reading genome %s", inputs.genome)
        genome = Genome(inputs.genome)
    log.info("reading expression %s", inputs.expression)
    expression = read_expression(inputs.expression, inputs.expression_format, inputs.scale, matrix=matrix)
    if inputs.genes:
        log.info("reading genes %s", inputs.genes)
        genes = read_genes(
            inputs.genes,
            inputs.genes_format,
            gene_types=inputs.gene_types,
            genome=genome,
            genome_partial=inputs.genome_partial,
        )
    elif expression.genes is not None:
        log.info("genes: TSS and strand from the phenotype BED %s", inputs.expression)
        genes = phenotype_bed_genes(expression.genes, expression.path, genome=genome,
                                    genome_partial=inputs.genome_partial)
    else:
        raise InputError(expression.path, "no gene annotation: inputs.genes is not set and the expression file "
                         "does not give the genes' coordinates", expected="inputs.genes, or a phenotype BED")
    if inputs.samples:
        log.info("reading sample table %s", inputs.samples)
        samples = _join_samples(read_samples(inputs.samples), expression, inputs.samples)
    elif expression.genes is not None or inputs.tissue:
        # one column per person, all of one tissue (a phenotype BED): each column is a donor
        check_column_names(expression.path, "donor", expression.sample_ids)
        samples = person_samples(expression.sample_ids, inputs.tissue or "tissue")
    else:
        check_column_names(expression.path, "tissue", expression.sample_ids)  # Liver, liver and 'Lung ': 3 tissues
        samples = reference_samples(expression.sample_ids)
    variants = None
    if inputs.variants and with_variants:
        regions = variant_regions(genes, expression.gene_ids, config)
        log.info("reading variants %s in %d windows around %d genes", inputs.variants, len(regions),
                 len(expression.gene_ids))
        variants = read_variants(
            inputs.variants,
            genome,
            sample_map=read_sample_map(inputs.sample_map) if inputs.sample_map else None,
            regions=regions,
            genome_partial=inputs.genome_partial,
            keep_filtered=config.genotypes.keep_filtered,
        )
    dataset = Dataset(config, genes, expression, samples, genome, variants)
    dataset.report = summarise(dataset)
    _check_joins(dataset)
    return dataset


def _check_joins(dataset: Dataset) -> None:
    """Refuse inputs that each read well but do not name the same things: no expressed gene in the annotation
    (symbols against Ensembl ids), or a VCF none of whose genomes is a donor of the expression (its sample names
    against the sample table's donors, without ``inputs.sample_map``)."""
    inputs = dataset.config.inputs
    if dataset.report["genes"]["expression_with_annotation"] == 0:
        annotated = dataset.genes.table[S.GENE_ID].to_pylist()[:3]
        raise InputError(dataset.expression.path, f"none of its {len(dataset.expression.gene_ids):,} genes is in the "
                         f"gene annotation {inputs.genes or dataset.expression.path} (e.g. "
                         f"{', '.join(dataset.expression.gene_ids[:3])} here; {', '.join(map(str, annotated))} there)",
                         expected="the same gene ids in both (an Ensembl id's version, such as .5, is ignored)",
                         hint="gene symbols against Ensembl ids? use an annotation with the expression's ids")
    variants = dataset.variants
    if variants is not None and len(variants.samples) and dataset.report["variants"]["genomes_with_expression"] == 0:
        donors = sorted(set(dataset.samples[S.DONOR_ID].to_pylist()))
        raise InputError(variants.path, f"none of its {len(variants.samples):,} genomes is a donor of the expression "
                         f"(e.g. {', '.join(variants.samples[:3])} here; donors {', '.join(donors[:3])})",
                         expected="VCF samples named as the donors of the sample table",
                         hint="map the VCF's sample names to donors with inputs.sample_map")


def variant_regions(genes: GeneTable, gene_ids: list[str], config: Config) -> list[tuple[str, int, int]]:
    """The genomic windows whose variants the model reads: around each expressed gene's TSS, its promoter window
    and its cis window (``genotypes.cis_window``), widened by one promoter length so that a deletion starting just
    outside a promoter window and reaching into it is read too. 1-based inclusive; overlapping ones are merged by
    :func:`geximpute.io.variants.read_variants`, which reads them through the VCF's index when it has one, so that
    memory grows with the windows and not with the file."""
    table = genes.table
    keep = np.isin(np.asarray(table[S.GENE_ID].to_pylist(), dtype=object), np.asarray(gene_ids, dtype=object))
    chroms = np.asarray(table[S.CHROM].to_pylist(), dtype=object)[keep]
    return window_regions(chroms, table[S.TSS].to_numpy()[keep], config)


def window_regions(chroms: np.ndarray, tss: np.ndarray, config: Config) -> list[tuple[str, int, int]]:
    """:func:`variant_regions` of genes given by their chromosomes and TSSs."""
    p = config.promoter
    half = max(p.upstream, p.downstream, config.genotypes.cis_window or 0) + p.length
    tss = np.asarray(tss, dtype=np.int64)
    return [(str(c), int(max(t - half, 1)), int(t + half)) for c, t in zip(chroms, tss, strict=True)]


def _join_samples(table: pa.Table, expression: Expression, samples_path: str) -> pa.Table:
    index = {s: i for i, s in enumerate(table[S.SAMPLE_ID].to_pylist())}
    absent = [s for s in expression.sample_ids if s not in index]
    if absent:
        raise InputError(
            expression.path,
            f"{len(absent)} of {len(expression.sample_ids)} expression samples are absent from the sample table "
            f"{samples_path}, e.g. {', '.join(absent[:3])}",
            record=f"sample column {absent[0]!r}",
            expected="every expression sample listed in inputs.samples",
            hint="Use the sample table that belongs to this expression file",
        )
    rows = pa.array([index[s] for s in expression.sample_ids], pa.int64())
    return table.take(rows)


def promoter_coverage(genes: pa.Table, genome: Genome, upstream: int, downstream: int) -> np.ndarray:
    """Boolean per gene: its whole promoter window lies inside a FASTA record."""
    tss = genes[S.TSS].to_numpy()
    plus = np.asarray(genes[S.STRAND].to_pylist(), dtype=object) == "+"
    start = np.where(plus, tss - upstream, tss - downstream + 1)
    end = np.where(plus, tss + downstream - 1, tss + upstream)
    length = np.array([genome.lengths.get(c, 0) for c in genes[S.CHROM].to_pylist()])
    return (start >= 1) & (end <= length)


def gene_symbols(dataset: Dataset, gene_ids) -> np.ndarray:
    """(N,) object array of the symbol of each of ``gene_ids``: the annotation's ``gene_name`` where it has one,
    else the expression file's symbol column (:attr:`geximpute.io.expression.Expression.gene_names`); None where
    neither names the gene. What ``gene_family`` reads (:attr:`geximpute.science.problem.VisibleProblem.gene_names`)
    and ``inspect`` counts."""
    named: dict = {}
    if dataset.expression is not None and dataset.expression.gene_names is not None:
        named.update((g, n) for g, n in zip(dataset.expression.gene_ids, dataset.expression.gene_names, strict=True)
                     if n)
    table = dataset.genes.table
    named.update((g, n) for g, n in zip(table[S.GENE_ID].to_pylist(), table[S.GENE_NAME].to_pylist(), strict=True)
                 if n)
    return np.array([named.get(g) for g in gene_ids], dtype=object)


def summarise(dataset: Dataset) -> dict:
    """Counts and join rates of a dataset, as plain data."""
    expr, genes = dataset.expression, dataset.genes
    annotated = set(genes.table[S.GENE_ID].to_pylist())
    joined = [g for g in expr.gene_ids if g in annotated]
    donors = dataset.samples[S.DONOR_ID].to_pylist()
    tissues = dataset.samples[S.TISSUE].to_pylist()
    cells = set(zip(donors, tissues, strict=True))
    n_donors, n_tissues = len(set(donors)), len(set(tissues))
    # families of two genes or more among the joined genes' symbols: what gene_family and the networks' family
    # level read
    symbols = gene_symbols(dataset, joined)
    in_family, n_families = shared_families(symbols)
    report: dict = {
        "name": dataset.config.name,
        "genes": {
            "annotation": len(genes),
            "expression": len(expr.gene_ids),
            "expression_with_annotation": len(joined),
            "join_rate_expression_to_annotation": len(joined) / max(len(expr.gene_ids), 1),
            "renamed_chroms": genes.report.get("renamed_chroms", {}),
            "joined_with_symbol": int(sum(n is not None for n in symbols)),
            "joined_in_shared_family": in_family,
            "shared_families": n_families,
        },
        "samples": {
            "samples": len(expr.sample_ids),
            "donors": n_donors,
            "tissues": n_tissues,
            "observed_donor_tissue_cells": len(cells),
            "observed_cell_fraction": len(cells) / max(n_donors * n_tissues, 1),
            "samples_per_cell_max": max(Counter(zip(donors, tissues, strict=True)).values(), default=0),
            "has_sample_table": bool(dataset.config.inputs.samples),
        },
        "expression": {
            "format": expr.report.get("format"),
            "scale": expr.scale,
            "measured_entries": expr.report.get("n_measured"),
            "measured_entry_fraction": expr.report.get("measured_fraction"),
        },
    }
    if "gct_declared_shape" in expr.report:
        report["expression"]["gct_declared_shape"] = list(expr.report["gct_declared_shape"])
        report["expression"]["gct_dimension_line_matches"] = expr.report["gct_dimension_line_matches"]
    if dataset.genome is not None:
        genome = dataset.genome
        table = genes.table
        in_expr = np.isin(np.asarray(table[S.GENE_ID].to_pylist(), dtype=object), np.asarray(joined, dtype=object))
        on_chrom = np.array([c in genome for c in table[S.CHROM].to_pylist()])
        p = dataset.config.promoter
        full = promoter_coverage(table, genome, p.upstream, p.downstream)
        report["genome"] = {
            "path": str(genome.path),
            "records": {k: v for k, v in genome.lengths.items()},
            "expressed_genes_on_genome_chroms": int((in_expr & on_chrom).sum()),
            "promoter_window": f"{p.upstream} bp upstream + {p.downstream} bp downstream",
            "expressed_genes_with_full_promoter": int((in_expr & full).sum()),
            "promoter_join_rate": float((in_expr & full).sum() / max(len(joined), 1)),
        }
    if dataset.variants is not None:
        v = dataset.variants
        expr_donors = set(donors)
        report["variants"] = {
            "path": str(v.path),
            "sites": v.sites.num_rows,
            "genomes": len(v.samples),
            "genomes_with_expression": len(expr_donors & set(v.samples)),
            **{
                k: v.report[k]
                for k in ("n_multiallelic", "n_missing_calls", "n_unphased_calls", "ref_mismatch_fraction",
                          "n_filtered")
                if k in v.report
            },
        }
    return report


def format_summary(report: dict) -> str:
    """Human-readable summary of :func:`summarise`'s output."""
    g, s, e = report["genes"], report["samples"], report["expression"]
    lines = [
        f"dataset {report['name']}",
        f"  genes       {g['expression']:,} in expression, {g['annotation']:,} annotated, "
        f"{g['expression_with_annotation']:,} joined ({g['join_rate_expression_to_annotation']:.1%})",
    ]
    if g["renamed_chroms"]:
        lines.append(f"              chromosomes renamed: {g['renamed_chroms']}")
    lines.append(f"              {g['joined_with_symbol']:,} of them with a symbol (what gene_family and, on the genes "
                 f"task, the networks' family level read); {g['joined_in_shared_family']:,} share a fine family "
                 f"(SLC25, RPL10) with another gene, in {g['shared_families']:,} families")
    lines += [
        f"  samples     {s['samples']:,} samples, {s['donors']:,} donor(s), {s['tissues']:,} tissues"
        + ("" if s["has_sample_table"] or s["donors"] > 1
           else " (no sample table: one reference genotype, one column per tissue)"),
        f"  cells       {s['observed_donor_tissue_cells']:,} of {s['donors'] * s['tissues']:,} donor-tissue cells "
        f"observed ({s['observed_cell_fraction']:.1%})",
        f"  expression  {e['format']} on scale {e['scale']}; {e['measured_entries']:,} entries measured "
        f"({e['measured_entry_fraction']:.1%} of gene x sample)",
    ]
    if "gct_declared_shape" in e and not e["gct_dimension_line_matches"]:
        lines.append(
            f"              note: the GCT dimension line says {e['gct_declared_shape'][0]:,} x "
            f"{e['gct_declared_shape'][1]:,}; the file holds {g['expression']:,} x {s['samples']:,} (read as is)"
        )
    if "genome" in report:
        m = report["genome"]
        lines += [
            f"  genome      {len(m['records'])} records ({sum(m['records'].values()):,} bp): {m['path']}",
            f"  promoters   {m['expressed_genes_with_full_promoter']:,} expressed genes have a full "
            f"{m['promoter_window']} window inside the genome's records ({m['promoter_join_rate']:.1%}; "
            "known bases or N, see `sequence`); "
            f"{m['expressed_genes_on_genome_chroms']:,} lie on its chromosomes",
        ]
    if "variants" in report:
        v = report["variants"]
        lines.append(
            f"  variants    {v['sites']:,} sites x {v['genomes']:,} genomes, {v['genomes_with_expression']:,} "
            f"with expression; REF mismatch {v.get('ref_mismatch_fraction', 0):.2%}"
        )
    return "\n".join(lines)

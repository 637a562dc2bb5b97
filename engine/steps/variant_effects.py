"""``geximpute variant-effects``: the predicted expression change of every cis variant, per tissue.

For each variant site in a gene's cis window (``genotypes.cis_window``; the promoter window when that is null) and
each of its ALT alleles, the model bundle predicts the gene in every tissue twice, for a donor homozygous for the
reference promoter and for one homozygous for the promoter that carries only that ALT allele
(:func:`geximpute.science.haplotypes.edit_window`), with no other context than the gene's levels across donors. Both
branches see the difference: the CNN reads the two promoters, and the cis-genetic score
(:func:`geximpute.science.genomes.genetic_scores`, fitted on the visible expression of the config's donors) moves by
twice
the site's fitted effect; a site outside the promoter window, or of a gene whose window is unknown (a gap or
N-masked sequence: the network reads its stand-in for both), moves the score only. ``effect`` is half the
difference, the change per ALT allele, on the modelling scale.

Output (atomic folder): ``variant_effects.parquet`` (:data:`geximpute.schema.VARIANT_EFFECTS`) and ``_manifest.json``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geximpute import schema as S
from geximpute.config import Config
from geximpute.errors import ConfigError, GeximputeError
from geximpute.fit.bundle import check_compatible, compatibility, load_bundle
from geximpute.io.dataset import load_dataset
from geximpute.runtime.atomic import check_replaceable, staged_output, store_of
from geximpute.runtime.provenance import manifest, write_json
from geximpute.science.context import ContextIndex
from geximpute.science.genomes import genetic_scores, window_bounds
from geximpute.science.haplotypes import edit_window, is_sequence_allele
from geximpute.science.problem import make_problem
from geximpute.science.promoters import PromoterLookup, one_hot_promoters

log = logging.getLogger(__name__)


def _population_records(index, gene: np.ndarray, tissue: np.ndarray, genetic: np.ndarray) -> pa.Table:
    """Context records of (gene, tissue) pairs for a donor known only by its genome: no neighbour, no other tissue,
    the gene's visible levels across donors (from ``index``, a :class:`geximpute.science.context.ContextIndex`), and
    the given cis-genetic score."""
    problem = index.problem
    n = len(gene)
    with np.errstate(invalid="ignore", divide="ignore"):
        tissue_mean = np.where(index.tissue_n[gene, tissue] > 0,
                               index.tissue_sum[gene, tissue] / np.maximum(index.tissue_n[gene, tissue], 1), np.nan)
        gene_mean = np.where(index.gene_n[gene] > 0, index.gene_sum[gene] / np.maximum(index.gene_n[gene], 1), np.nan)
    empty_offsets = pa.array(np.zeros(n + 1, dtype=np.int32))

    def empty(tp: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(empty_offsets, pa.array([], type=tp))

    columns = {
        S.GENE_ID: pa.array(problem.gene_ids[gene], pa.string()),
        S.SAMPLE_ID: pa.array([""] * n, pa.string()),
        S.DONOR_ID: pa.array([""] * n, pa.string()),
        S.TISSUE: pa.array(np.asarray(problem.tissues, dtype=object)[tissue], pa.string()),
        S.CHROM: pa.array(problem.chroms[gene], pa.string()),
        "gene_index": pa.array(gene.astype(np.int32)),
        "sample_index": pa.array(np.arange(n, dtype=np.int32)),
        "tissue_index": pa.array(tissue.astype(np.int16)),
        "split": pa.array(["train"] * n, pa.string()),
        "hidden": pa.array(np.zeros(n, dtype=bool)),
        "target": pa.nulls(n, pa.float32()),
        "nb_value": empty(pa.float32()),
        "nb_logdist": empty(pa.float32()),
        "nb_orient": empty(pa.int8()),
        "nb_overlap": empty(pa.bool_()),
        "nb_gene_mean": empty(pa.float32()),
        "tis_value": empty(pa.float32()),
        "tis_index": empty(pa.int16()),
        "tis_corr": empty(pa.float32()),
        "tis_mean": empty(pa.float32()),
        "tissue_mean": pa.array(tissue_mean, pa.float32(), from_pandas=True),
        "gene_mean": pa.array(gene_mean, pa.float32(), from_pandas=True),
        "tissue_offset": pa.array(index.tissue_offset[tissue], pa.float32()),
        "genetic_score": pa.array(genetic, pa.float32(), from_pandas=True),
    }
    return pa.table(columns, schema=S.CONTEXT)


def variant_effects(config: Config, out_dir: str | Path, model_dir: str | Path | None = None, *,
                    force: bool = False) -> pa.Table:
    """Score every promoter variant of ``config.inputs.variants`` with the bundle in ``model_dir`` and write them.

    Args:
        config: the resolved config; needs ``inputs.variants`` and ``inputs.genome``.
        out_dir: output folder (replaced atomically).
        model_dir: model bundle (default ``impute.model_dir``, else ``<output_dir>/model``).
        force: replace ``out_dir`` even when it is not an earlier variant-effects output.

    Returns:
        the table written.

    Raises:
        ConfigError: no variants or no genome configured.
    """
    t0 = time.perf_counter()
    if not config.inputs.variants or not config.inputs.genome:
        raise ConfigError("geximpute variant-effects needs inputs.variants (a VCF) and inputs.genome (the FASTA)")
    # refused before the inputs are read and every site scored, and again where the output is committed
    check_replaceable(Path(out_dir), "variant-effects", store_of(Path(out_dir).absolute()), force)
    bundle_dir = Path(model_dir or config.model_dir)
    try:
        bundle = load_bundle(bundle_dir)
    except FileNotFoundError as exc:  # no model there: one line naming it, as impute says it
        raise GeximputeError(str(exc)) from exc
    dataset = load_dataset(config)
    problem, _ = make_problem(dataset, hidden_mask=False)
    check_compatible(bundle.compatibility, compatibility(config, problem.gene_ids, problem.tissues), bundle_dir,
                     f"the config ({config.inputs.expression})")
    genomes = problem.genomes
    assert genomes is not None  # variants configured
    scores, effects = genetic_scores(genomes, problem.values, problem.tissue_index, problem.donor_index,
                                     len(problem.tissues), config.context.genetic_shrinkage)
    index = ContextIndex(problem, genetic=scores)  # the gene's levels across donors, scores fitted once
    sites = dataset.variants.sites
    p = config.promoter
    genome = dataset.genome
    strand_sym = np.where(problem.strand > 0, "+", "-")
    win_start, win_end = window_bounds(problem.tss, problem.strand, p.upstream, p.downstream)

    # one (gene, site, allele) per row; the reference and the ALT promoter of each
    rows: dict[str, list] = {k: [] for k in ("gene", "site", "allele", "ref_seq", "alt_seq", "beta", "mean")}
    no_window = 0
    for g in np.flatnonzero(np.diff(genomes.site_ptr) > 0):
        # a gene without a known promoter window (a gap or N-masked sequence) is read through the network's
        # stand-in for both alleles: its sites move the cis-genetic score only (they were left out, unsaid: 510 of
        # 608 genes with cis sites on the Geuvadis config)
        window = genomes.reference_row[g] >= 0
        no_window += not window
        chrom, tss = problem.chroms[g], int(problem.tss[g])
        for j, pos_in in enumerate(range(genomes.site_ptr[g], genomes.site_ptr[g + 1])):
            s, k = int(genomes.site_index[pos_in]), genomes.link_allele(pos_in)
            pos, ref = int(sites["pos"][s].as_py()), sites["ref"][s].as_py()
            alt = (sites["alt"][s].as_py() or [])[k - 1]
            if not is_sequence_allele(alt):
                continue
            ref_seq = genomes.sequences[genomes.reference_row[g]] if window else None
            # a site of the cis window wholly outside the promoter window leaves the promoter as it is (the window
            # is anchored on the TSS): only its genetic-score effect counts, and no 100-kb region is edited for it
            outside = not window or pos + len(ref) - 1 < win_start[g] or pos > win_end[g]
            lo = min(pos, tss - max(p.upstream, p.downstream)) - len(ref) - p.length
            hi = max(pos + len(ref), tss + max(p.upstream, p.downstream)) + p.length
            region = None if outside else genome.fetch(chrom, lo, hi)
            dosage = genomes.link_dosage(pos_in, pos_in + 1)[0]  # this ALT allele's copies
            mean = float(np.nanmean(dosage)) if np.isfinite(dosage).any() else 0.0
            # a REF spelled with an IUPAC code cannot be edited: the promoter stays the reference's there too
            edited = None
            if not outside and is_sequence_allele(ref):
                edited = edit_window(region, lo, tss, strand_sym[g], p.upstream, p.downstream, [(pos, ref, alt)],
                                     p.soft_mask)
            rows["gene"].append(g)
            rows["site"].append(s)
            rows["allele"].append(k)
            rows["ref_seq"].append(ref_seq)
            rows["alt_seq"].append(ref_seq if edited is None else edited.sequence)
            # the score is additive in the copies of each ALT allele (geximpute.science.genomes.allele_links)
            rows["beta"].append(float(effects[g][j]) if len(effects[g]) else 0.0)
            rows["mean"].append(mean)
    n_pairs = len(rows["gene"])
    log.info("variant-effects: %d (variant allele, gene) pairs x %d tissues; %d genes without a known promoter "
             "window scored through the genetic score alone", n_pairs, len(problem.tissues), no_window)

    sequences = sorted((set(rows["ref_seq"]) | set(rows["alt_seq"])) - {None})
    row_of = {seq: i for i, seq in enumerate(sequences)}
    table = one_hot_promoters(sequences, p.length)
    n_t = len(problem.tissues)
    gene = np.repeat(np.asarray(rows["gene"], dtype=np.int64), n_t)
    tissue = np.tile(np.arange(n_t), n_pairs)
    beta = np.repeat(np.asarray(rows["beta"]), n_t)
    mean = np.repeat(np.asarray(rows["mean"]), n_t)
    predicted = {}
    for allele, seqs, score in (("ref", rows["ref_seq"], -beta * mean), ("alt", rows["alt_seq"], beta * (2 - mean))):
        hap = np.repeat(np.array([row_of.get(q, -1) for q in seqs], dtype=np.int64), n_t)  # -1: the stand-in
        n = len(gene)
        # every record is its own donor, homozygous for its promoter
        lookup = PromoterLookup(np.full(problem.n_genes, -1, np.int64), np.arange(n, dtype=np.int64),
                                gene * n + np.arange(n), np.stack([hap, hap], axis=1), n)
        if not bundle.reads_genomes:  # a model trained without genomes never learned from a genetic score
            score = np.full(len(score), np.nan)
        records = _population_records(index, gene, tissue, score)
        if bundle.reads_family:  # a donor known only by its genome has no sample, so no family level in it
            records = records.append_column(S.FAMILY_LEVEL, pa.nulls(records.num_rows, pa.float32()))
        predicted[allele], _, _ = bundle.predict(records, problem.gene_ids, promoters=(table, lookup),
                                                 baselines=bundle.no_baseline_estimates())

    site = np.repeat(np.asarray(rows["site"], dtype=np.int64), n_t)
    allele = np.repeat(np.asarray(rows["allele"], dtype=np.int64), n_t)
    alt_names = [sites["alt"][int(s)].as_py()[int(a) - 1] for s, a in zip(site, allele, strict=True)]
    offset = (sites["pos"].to_numpy()[site] - problem.tss[gene]) * problem.strand[gene]
    out = pa.table({
        "variant_id": sites["variant_id"].take(pa.array(site)),
        S.CHROM: pa.array(problem.chroms[gene], pa.string()),
        "pos": sites["pos"].take(pa.array(site)),
        "ref": sites["ref"].take(pa.array(site)),
        "alt": pa.array(alt_names, pa.string()),
        S.GENE_ID: pa.array(problem.gene_ids[gene], pa.string()),
        "tss_offset": pa.array(offset.astype(np.int64)),
        S.TISSUE: pa.array(np.asarray(problem.tissues, dtype=object)[tissue], pa.string()),
        "predicted_ref": pa.array(predicted["ref"], pa.float32()),
        "predicted_alt": pa.array(predicted["alt"], pa.float32()),
        "effect": pa.array((predicted["alt"] - predicted["ref"]) / 2, pa.float32()),
        "genetic_effect": pa.array(beta if bundle.reads_genomes else np.full(len(beta), np.nan), pa.float32(),
                                   from_pandas=True),
        "model_version": pa.array([bundle.model_version] * len(gene), pa.string()),
    }, schema=S.VARIANT_EFFECTS)
    with staged_output(out_dir, step="variant-effects", force=force) as staging:
        pq.write_table(out, staging / "variant_effects.parquet")
        write_json(staging / "_manifest.json", manifest(
            config, step="variant-effects", model_version=bundle.model_version,
            rows={"variant_effects": out.num_rows, "variant_gene_pairs": n_pairs,
                  "genes_without_promoter_window": no_window},
            seconds=round(time.perf_counter() - t0, 2)))
    log.info("variant-effects: %d rows in %.1f s", out.num_rows, time.perf_counter() - t0)
    return out

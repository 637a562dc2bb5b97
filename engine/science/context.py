"""Context of target entries, built from the visible problem only, vectorised per sample.

For a target (gene g, sample s) the context is: the K nearest other genes on g's chromosome with a visible value
in s (value, signed log distance, relative orientation, overlap); g's visible values in the donor's other samples
with each tissue's correlation to s's tissue; g's mean in s's tissue over other donors; g's mean over every other
visible sample; with personal genomes, the donor's cis-genetic score for g
(:func:`geximpute.science.genomes.genetic_scores`, fitted on the visible values of the problem). No value of the target
entry itself enters its own context.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from geximpute import schema as S
from geximpute.science.genomes import genetic_scores
from geximpute.science.groups import group_sums
from geximpute.science.problem import SPLITS, VisibleProblem
from geximpute.science.shards import GeneStats, donor_sample_lists, gene_stats


class ContextIndex:
    """Per-problem lookup arrays shared by every block (built once per worker).

    Args:
        problem: the visible problem.
        genetic_shrinkage: ridge penalty of the cis-genetic scores (``context.genetic_shrinkage``).
        genetic: (G, D) cis-genetic scores of ``problem`` already fitted
            (:func:`geximpute.science.genomes.genetic_scores`); fitted here from ``problem`` when it has genomes and
            this is None.
        stats: the problem's per-gene statistics (:func:`geximpute.science.shards.gene_stats`), when ``problem`` is
            one shard of a larger problem whose statistics they are; default: computed from ``problem``.
    """

    def __init__(self, problem: VisibleProblem, genetic_shrinkage: float | None = None,
                 genetic: np.ndarray | None = None, stats: GeneStats | None = None) -> None:
        self.problem = problem
        self.genetic = genetic
        if genetic is None and problem.genomes is not None:
            self.genetic, _ = genetic_scores(problem.genomes, problem.values, problem.tissue_index,
                                             problem.donor_index, len(problem.tissues), genetic_shrinkage)
        _, chrom_code = np.unique(problem.chroms, return_inverse=True)
        self.chrom_code = chrom_code.astype(np.int64)
        # one sorted coordinate along the genome: genes are sorted by (chrom, tss)
        self.gpos = self.chrom_code * (1 << 40) + problem.tss
        order = np.argsort(self.gpos, kind="stable")
        if not np.array_equal(order, np.arange(len(order))):
            raise ValueError("problem genes must be sorted by chromosome and TSS")
        stats = stats if stats is not None else gene_stats(problem)
        if len(stats.gene_n) != problem.n_genes:
            raise ValueError(f"gene statistics of {len(stats.gene_n)} genes for a problem of {problem.n_genes}")
        self.tissue_sum, self.tissue_n = stats.tissue_sum, stats.tissue_n
        self.gene_sum, self.gene_n = stats.gene_sum, stats.gene_n
        self.tissue_offset = stats.tissue_offset
        self.donor_samples = donor_sample_lists(problem)


def _flatten(rows: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length lists from a padded (n, m) array and its mask: (flat values, lengths)."""
    return rows[mask], mask.sum(axis=1)


def _lists(parts: list[np.ndarray], lengths: np.ndarray, tp: pa.DataType) -> pa.ListArray:
    flat = np.concatenate(parts) if parts else np.zeros(0)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=tp))


def build_context(
    index: ContextIndex,
    gene_index: np.ndarray,
    sample_index: np.ndarray,
    hidden: np.ndarray,
    k: int,
    max_distance: int | None = None,
) -> pa.Table:
    """Context records of the target entries (``gene_index[i]``, ``sample_index[i]``).

    Args:
        index: lookup arrays of the problem.
        gene_index, sample_index: (N,) target entries.
        hidden: (N,) bool, whether each target is a hidden evaluation entry (its label is then left null; the
            problem holds no value for it anyway).
        k: neighbours per target.
        max_distance: neighbours farther than this (bp) are left out.

    Returns:
        :data:`geximpute.schema.CONTEXT` table, targets grouped by sample.
    """
    p = index.problem
    order = np.lexsort((gene_index, sample_index))
    gene_index, sample_index, hidden = gene_index[order], sample_index[order], hidden[order]
    samples, starts = np.unique(sample_index, return_index=True)
    ends = np.append(starts[1:], len(sample_index))
    window = np.arange(-k - 1, k + 1)

    nb_parts: dict[str, list[np.ndarray]] = {"value": [], "logdist": [], "orient": [], "overlap": [], "mean": []}
    with np.errstate(invalid="ignore", divide="ignore"):
        all_gene_mean = np.where(index.gene_n > 0, index.gene_sum / np.maximum(index.gene_n, 1), np.nan)
    nb_len, tis_len = [], []
    tis_parts: dict[str, list[np.ndarray]] = {"value": [], "index": [], "corr": [], "mean": []}
    target = np.full(len(gene_index), np.nan, dtype=np.float32)
    tissue_mean = np.full(len(gene_index), np.nan, dtype=np.float32)
    gene_mean = np.full(len(gene_index), np.nan, dtype=np.float32)

    for s, lo, hi in zip(samples, starts, ends, strict=True):
        tg = gene_index[lo:hi]
        col = p.values[:, s]
        vis_idx = np.flatnonzero(~np.isnan(col))
        own = col[tg]
        target[lo:hi] = np.where(hidden[lo:hi], np.nan, own)

        # neighbours: the K nearest visible genes lie within K places on either side in genome order
        if len(vis_idx):
            ins = np.searchsorted(index.gpos[vis_idx], index.gpos[tg])
            cand = ins[:, None] + window[None, :]
            ok = (cand >= 0) & (cand < len(vis_idx))
            cand_g = vis_idx[np.clip(cand, 0, len(vis_idx) - 1)]
            ok &= index.chrom_code[cand_g] == index.chrom_code[tg][:, None]
            ok &= cand_g != tg[:, None]
            dist = np.abs(p.tss[cand_g] - p.tss[tg][:, None]).astype(np.float64)
            if max_distance is not None:
                ok &= dist <= max_distance
            dist[~ok] = np.inf
            pick = np.argsort(dist, axis=1, kind="stable")[:, :k]
            nb = np.take_along_axis(cand_g, pick, axis=1)
            nb_ok = np.take_along_axis(ok, pick, axis=1)
        else:
            nb = np.zeros((len(tg), 0), dtype=np.int64)
            nb_ok = np.zeros((len(tg), 0), dtype=bool)
        signed = (p.tss[nb] - p.tss[tg][:, None]) * p.strand[tg][:, None]
        logdist = np.sign(signed) * np.log10(1.0 + np.abs(signed))
        same = p.strand[nb] == p.strand[tg][:, None]
        # opposite strands sharing a TSS are a bidirectional promoter: head to head, divergent
        orient = np.where(same, S.ORIENT_SAME, np.where(signed <= 0, S.ORIENT_DIVERGENT, S.ORIENT_CONVERGENT))
        overlap = (p.start[nb] <= p.end[tg][:, None]) & (p.start[tg][:, None] <= p.end[nb])
        nb_columns = (("value", col[nb]), ("logdist", logdist), ("orient", orient), ("overlap", overlap),
                      ("mean", all_gene_mean[nb]))
        for name, arr in nb_columns:
            flat, lengths = _flatten(arr, nb_ok)
            nb_parts[name].append(flat)
        nb_len.append(lengths)

        # the same gene in the donor's other samples, with the gene's mean in each tissue over other donors
        d, t = p.donor_index[s], p.tissue_index[s]
        mine = index.donor_samples[d]
        others = mine[mine != s]
        vals = p.values[np.ix_(tg, others)]
        ok = ~np.isnan(vals)
        tis = np.broadcast_to(p.tissue_index[others][None, :], vals.shape)
        corr = p.tissue_corr[t][tis]
        mine_vals = p.values[np.ix_(tg, mine)]
        donor_sum, donor_n = group_sums(mine_vals, p.tissue_index[mine], index.tissue_sum.shape[1])
        with np.errstate(invalid="ignore", divide="ignore"):
            other_n = index.tissue_n[tg] - donor_n
            other_mean = np.where(other_n > 0, (index.tissue_sum[tg] - donor_sum) / other_n, np.nan)
        tis_mean = np.take_along_axis(other_mean, tis, axis=1) if tis.size else np.zeros(tis.shape)
        for name, arr in (("value", vals), ("index", tis), ("corr", corr), ("mean", tis_mean)):
            flat, lengths = _flatten(arr, ok)
            tis_parts[name].append(flat)
        tis_len.append(lengths)

        # the gene in this tissue over other donors, and over every other sample
        same_tissue = mine[p.tissue_index[mine] == t]
        own_vals = p.values[np.ix_(tg, same_tissue)]
        own_sum = np.nansum(own_vals, axis=1)
        own_n = (~np.isnan(own_vals)).sum(axis=1)
        n_other = index.tissue_n[tg, t] - own_n
        with np.errstate(invalid="ignore", divide="ignore"):
            tissue_mean[lo:hi] = np.where(n_other > 0, (index.tissue_sum[tg, t] - own_sum) / n_other, np.nan)
            own_visible = ~np.isnan(own)
            g_n = index.gene_n[tg] - own_visible
            g_sum = index.gene_sum[tg] - np.where(own_visible, own, 0.0)
            gene_mean[lo:hi] = np.where(g_n > 0, g_sum / g_n, np.nan)

    nb_lengths = np.concatenate(nb_len) if nb_len else np.zeros(0, dtype=np.int64)
    tis_lengths = np.concatenate(tis_len) if tis_len else np.zeros(0, dtype=np.int64)
    split_names = np.asarray(SPLITS, dtype=object)
    columns = {
        S.GENE_ID: pa.array(p.gene_ids[gene_index], pa.string()),
        S.SAMPLE_ID: pa.array(p.sample_ids[sample_index], pa.string()),
        S.DONOR_ID: pa.array(np.asarray(p.donors, dtype=object)[p.donor_index[sample_index]], pa.string()),
        S.TISSUE: pa.array(np.asarray(p.tissues, dtype=object)[p.tissue_index[sample_index]], pa.string()),
        S.CHROM: pa.array(p.chroms[gene_index], pa.string()),
        "gene_index": pa.array(gene_index.astype(np.int32)),
        "sample_index": pa.array(sample_index.astype(np.int32)),
        "tissue_index": pa.array(p.tissue_index[sample_index].astype(np.int16)),
        "split": pa.array(split_names[p.split[gene_index]], pa.string()),
        "hidden": pa.array(hidden.astype(bool)),
        "target": pa.array(target, pa.float32(), from_pandas=True),
        "nb_value": _lists(nb_parts["value"], nb_lengths, pa.float32()),
        "nb_logdist": _lists(nb_parts["logdist"], nb_lengths, pa.float32()),
        "nb_orient": _lists(nb_parts["orient"], nb_lengths, pa.int8()),
        "nb_overlap": _lists(nb_parts["overlap"], nb_lengths, pa.bool_()),
        "nb_gene_mean": _lists(nb_parts["mean"], nb_lengths, pa.float32()),
        "tis_value": _lists(tis_parts["value"], tis_lengths, pa.float32()),
        "tis_index": _lists(tis_parts["index"], tis_lengths, pa.int16()),
        "tis_corr": _lists(tis_parts["corr"], tis_lengths, pa.float32()),
        "tis_mean": _lists(tis_parts["mean"], tis_lengths, pa.float32()),
        "tissue_mean": pa.array(tissue_mean, pa.float32(), from_pandas=True),
        "gene_mean": pa.array(gene_mean, pa.float32(), from_pandas=True),
        "tissue_offset": pa.array(index.tissue_offset[p.tissue_index[sample_index]], pa.float32()),
        "genetic_score": pa.array(
            index.genetic[gene_index, p.donor_index[sample_index]] if index.genetic is not None
            else np.full(len(gene_index), np.nan, np.float32), pa.float32(), from_pandas=True),
    }
    return pa.table(columns, schema=S.CONTEXT)

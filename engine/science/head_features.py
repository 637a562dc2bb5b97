"""Engineered features of context records for the XGBoost head: the baselines' own estimates and summaries.

Every feature is computed from a record alone, and a record's context never contains its own value, so the same
function serves training folds and hidden entries without leaking a label into its features. Missing values are
NaN (XGBoost learns a direction for them).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

FEATURE_NAMES = (
    "est_distance",
    "nb_nearest_value",
    "nb_nearest_logdist",
    "nb_mean",
    "nb_std",
    "nb_count",
    "nb_gene_mean_idw",
    "nb_deviation_idw",
    "tis_count",
    "tis_mean_value",
    "tis_corr_weighted",
    "tis_best_value",
    "tis_best_corr",
    "tis_resid_mean",
    "tissue_mean",
    "gene_mean",
    "est_row_tissue",
    "est_tissue_donor",
    "tissue_index",
    "genetic_score",
    "est_tissue_genetic",
)


def list_parts(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat float64 values, row of each value, offsets) of a list column."""
    arr = column.combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    flat = arr.values.slice(0, offsets[-1]).to_numpy(zero_copy_only=False).astype(np.float64)
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    return flat, rows, offsets


def idw_estimate(records: pa.Table, k: int, offset: float) -> np.ndarray:
    """Inverse-distance-weighted mean of each record's ``k`` nearest neighbours, weight ``1 / (d + offset)``.

    This is the ``distance`` baseline's estimate and the head's ``est_distance`` feature.

    Returns:
        (N,) float64, NaN for records without a neighbour.
    """
    value, rows, offsets = list_parts(records["nb_value"])
    logdist, _, _ = list_parts(records["nb_logdist"])
    n = records.num_rows
    keep = (np.arange(len(rows)) - offsets[rows]) < k if len(rows) else np.zeros(0, dtype=bool)
    dist = np.expm1(np.abs(logdist) * np.log(10.0))
    w = np.where(keep, 1.0 / (dist + offset), 0.0)
    num, den = _row_sum(w * value, rows, n), _row_sum(w, rows, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _row_sum(values: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(rows, weights=values, minlength=n)


def _nan_column(column: pa.ChunkedArray) -> np.ndarray:
    return column.to_numpy(zero_copy_only=False).astype(np.float64)


def engineered_features(
    records: pa.Table, *, distance_k: int = 10, distance_offset: float = 1000.0, donor_shrinkage: float = 1.0
) -> np.ndarray:
    """Features of each record, columns in :data:`FEATURE_NAMES` order.

    Args:
        records: context records (:data:`geximpute.schema.CONTEXT`).
        distance_k, distance_offset: of the inverse-distance estimate (as the ``distance`` baseline).
        donor_shrinkage: pseudo-count of the donor effect (as the ``tissue_donor`` baseline).

    Returns:
        (N, len(FEATURE_NAMES)) float32.
    """
    n = records.num_rows
    out = np.full((n, len(FEATURE_NAMES)), np.nan)
    col = {name: i for i, name in enumerate(FEATURE_NAMES)}

    value, rows, offsets = list_parts(records["nb_value"])
    logdist, _, _ = list_parts(records["nb_logdist"])
    count = np.diff(offsets)
    dist = np.expm1(np.abs(logdist) * np.log(10.0))
    has = count > 0
    out[:, col["est_distance"]] = idw_estimate(records, distance_k, distance_offset)
    with np.errstate(invalid="ignore", divide="ignore"):
        first = offsets[:-1][has]
        out[has, col["nb_nearest_value"]] = value[first]
        out[has, col["nb_nearest_logdist"]] = logdist[first]
        mean = _row_sum(value, rows, n) / np.maximum(count, 1)
        out[has, col["nb_mean"]] = mean[has]
        var = _row_sum(value**2, rows, n) / np.maximum(count, 1) - mean**2
        out[has, col["nb_std"]] = np.sqrt(np.maximum(var[has], 0))
    out[:, col["nb_count"]] = count
    # the neighbours' own levels, and how far this tissue sits from them: the region's tissue signal
    nb_level, _, _ = list_parts(records["nb_gene_mean"])
    w_all = 1.0 / (dist + distance_offset)
    with np.errstate(invalid="ignore", divide="ignore"):
        den_all = _row_sum(w_all, rows, n)
        out[has, col["nb_gene_mean_idw"]] = (_row_sum(w_all * nb_level, rows, n) / den_all)[has]
        out[has, col["nb_deviation_idw"]] = (_row_sum(w_all * (value - nb_level), rows, n) / den_all)[has]

    tval, trows, toffs = list_parts(records["tis_value"])
    tcorr, _, _ = list_parts(records["tis_corr"])
    tmean, _, _ = list_parts(records["tis_mean"])
    tcount = np.diff(toffs)
    thas = tcount > 0
    out[:, col["tis_count"]] = tcount
    with np.errstate(invalid="ignore", divide="ignore"):
        out[thas, col["tis_mean_value"]] = (_row_sum(tval, trows, n) / np.maximum(tcount, 1))[thas]
        cw = np.maximum(tcorr, 0.0) ** 2 + 1e-3
        out[thas, col["tis_corr_weighted"]] = (_row_sum(cw * tval, trows, n) / _row_sum(cw, trows, n))[thas]
        if len(trows):
            # the most correlated tissue of each row: sort by (row, -corr) and take each row's first
            order = np.lexsort((-tcorr, trows))
            firsts = order[toffs[:-1][thas]]
            out[thas, col["tis_best_value"]] = tval[firsts]
            out[thas, col["tis_best_corr"]] = tcorr[firsts]
        resid = tval - tmean
        ok = ~np.isnan(resid)
        r_sum = _row_sum(np.where(ok, resid, 0.0), trows, n)
        r_n = np.bincount(trows[ok], minlength=n).astype(float)
        out[r_n > 0, col["tis_resid_mean"]] = (r_sum / np.maximum(r_n, 1))[r_n > 0]

    tissue_mean = _nan_column(records["tissue_mean"])
    gene_mean = _nan_column(records["gene_mean"])
    out[:, col["tissue_mean"]] = tissue_mean
    out[:, col["gene_mean"]] = gene_mean
    out[:, col["est_row_tissue"]] = gene_mean + _nan_column(records["tissue_offset"])
    # a record without another visible tissue of its donor adds no deviation (also with shrinkage 0), as the
    # ``tissue_donor`` baseline
    out[:, col["est_tissue_donor"]] = tissue_mean + np.where(
        r_n > 0, r_sum / np.maximum(r_n + donor_shrinkage, 1e-12), 0.0)
    out[:, col["tissue_index"]] = records["tissue_index"].to_numpy()
    # the donor's cis-genetic score (NaN without personal genomes), and the gene's level in the tissue moved by it
    genetic = (_nan_column(records["genetic_score"]) if "genetic_score" in records.column_names
               else np.full(n, np.nan))
    out[:, col["genetic_score"]] = genetic
    out[:, col["est_tissue_genetic"]] = tissue_mean + genetic
    return out.astype(np.float32)

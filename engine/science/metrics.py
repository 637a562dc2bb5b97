"""Scores of predictions against hidden values, in the shape of ``metrics.json`` (see DESIGN.md)."""

from __future__ import annotations

import numpy as np
from scipy import stats

#: the definitions of metrics.json's figures: 2 since a pair whose prediction is constant across donors counts as 0
#: in ``across_donors_pearson_mean`` (left out before); seeds summaries refuse to mix versions
METRICS_VERSION = 2


def _constant(x: np.ndarray) -> bool:
    # exact ties can still give a tiny non-zero std through rounding in the mean
    return bool(np.ptp(x) <= 1e-9 * max(1.0, float(np.abs(x).max())))


def across_donor_pairs(predicted: np.ndarray, observed: np.ndarray, gene: np.ndarray, tissue: np.ndarray,
                       min_donors: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (gene, tissue) pairs that the across-donor Pearson scores, and their scores: the one definition of
    ``score``'s ``across_donors_pearson_mean``, the paired bootstrap's per-gene statistics
    (:func:`geximpute.science.comparisons.gene_stats`) and the report's box plots.

    A pair counts when it has at least ``max(min_donors, 3)`` entries and its observed values are not all the same
    (nothing to tell apart); a prediction the same for every donor of the pair tells no donor apart and scores 0.
    Which pairs count depends on ``observed`` alone, so every method is scored on the same pairs, in the same order.

    Returns:
        (gene of each pair, its Pearson across the pair's donors, whether the prediction varied in it), each (P,).
    """
    key = gene.astype(np.int64) * (int(tissue.max()) + 1 if len(tissue) else 1) + tissue
    order = np.argsort(key, kind="stable")
    bounds = np.flatnonzero(np.r_[True, key[order][1:] != key[order][:-1], True]) if len(key) else np.array([0])
    genes, scores, varied = [], [], []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        idx = order[lo:hi]
        y = observed[idx]
        if hi - lo < max(min_donors, 3) or _constant(y):
            continue
        x = predicted[idx]
        moves = not _constant(x)
        genes.append(gene[idx[0]])
        scores.append(float(np.corrcoef(x, y)[0, 1]) if moves else 0.0)
        varied.append(moves)
    return np.asarray(genes, np.int64), np.asarray(scores, np.float64), np.asarray(varied, bool)


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation, or None when it is undefined (fewer than 3 values, or either side constant)."""
    if len(x) < 3 or _constant(x) or _constant(y):
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 3 or _constant(x) or _constant(y):
        return None
    return float(stats.spearmanr(x, y).statistic)


def score(
    predicted: np.ndarray,
    observed: np.ndarray,
    *,
    gene: np.ndarray,
    tissue: np.ndarray,
    donor: np.ndarray,
    tissue_names: list[str],
    min_donors: int = 10,
) -> dict:
    """Pearson, Spearman, RMSE and R2 overall; per tissue; across donors; on low-expressed genes.

    Args:
        predicted, observed: (N,) values on the modelling scale.
        gene, tissue, donor: (N,) integer ids of each entry.
        tissue_names: names indexed by ``tissue``.
        min_donors: fewest entries of a (gene, tissue) for its across-donor Pearson to count.

    Returns:
        ``{"pearson", "spearman", "rmse", "r2", "per_tissue", "across_donors_pearson_mean",
        "low_expressed_pearson", "n"}``. ``across_donors_pearson_mean`` is the mean over (gene, tissue) pairs
        with at least ``min_donors`` hidden donors whose values differ of the Pearson across those donors, a
        prediction that is the same for every donor of a pair counting as 0 (null without such pairs, or for a
        method that predicts no pair's donors apart).
        ``low_expressed_pearson`` is the Pearson over entries of the quartile of genes with the lowest mean
        observed value.
    """
    if np.isnan(predicted).any():
        raise ValueError(f"{int(np.isnan(predicted).sum())} predictions are NaN")
    resid = predicted - observed
    sst = float(((observed - observed.mean()) ** 2).sum())
    out: dict = {
        "n": int(len(observed)),
        "pearson": _pearson(predicted, observed),
        "spearman": _spearman(predicted, observed),
        "rmse": float(np.sqrt(np.mean(resid**2))),
        "r2": float(1 - (resid**2).sum() / sst) if sst > 0 else None,
    }
    per_tissue = {}
    for t in np.unique(tissue):
        m = tissue == t
        per_tissue[tissue_names[t]] = {"pearson": _pearson(predicted[m], observed[m]), "n": int(m.sum())}
    out["per_tissue"] = per_tissue

    # a pair whose prediction is the same for every donor tells no donor apart: it counts as 0, as in the paired
    # bootstrap (geximpute.science.comparisons.gene_stats), so that a method is not scored on the pairs it varies
    # in alone (the Geuvadis hybrid, constant where a gene has no genetic score: 0.138 over those pairs, 0.096 over
    # all); a method constant in every pair has no across-donor figure
    across = np.zeros(0)
    if len(np.unique(donor)) > 1:
        _, across, varied = across_donor_pairs(predicted, observed, gene, tissue, min_donors)
        across = across if varied.any() else np.zeros(0)
    out["across_donors_pearson_mean"] = float(np.mean(across)) if len(across) else None
    out["across_donors_pairs"] = len(across)

    genes = np.unique(gene)
    means = (
        np.array([observed[gene == g].mean() for g in genes])
        if len(genes) < 5000
        else np.bincount(gene, weights=observed)[genes] / np.bincount(gene)[genes]
    )
    low = genes[means <= np.quantile(means, 0.25)]
    m = np.isin(gene, low)
    out["low_expressed_pearson"] = _pearson(predicted[m], observed[m])
    return out

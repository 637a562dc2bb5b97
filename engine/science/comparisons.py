"""Honest comparisons of methods scored on the same hidden entries: paired bootstrap intervals over genes, the
coverage of prediction intervals by tissue and expression quartile, and summaries over evaluation seeds.

Numpy only. The hidden values are used here for scoring only, as in :mod:`geximpute.science.metrics`.
"""

from __future__ import annotations

import numpy as np

from geximpute.science.metrics import across_donor_pairs

#: the headline metric of each task, and whether higher is better
TASK_METRIC = {
    "samples": ("across_donors_pearson_mean", True),
    "entries": ("rmse", False),
    "genes": ("pearson", True),
}

#: methods that are the hybrid itself or its parts (its network, and the network's ablations, which
#: ``evaluation.ablations`` scores), never "another method" for the hybrid's comparison; ``xgb_features_only`` (the
#: head without a network) stays a candidate: a comparator issue 13 names, as strong as the engineered features make it
HYBRID_FAMILY = ("hybrid", "hybrid_network", "hybrid_reference", "cnn_only", "transformer_only", "gene_only")

#: comparators named by issue 13, compared with the hybrid whenever they were scored
NAMED_COMPARATORS = ("pairwise_regression", "cross_gene_regression", "iterative_ridge", "chained_boosting",
                     "local_regression", "tensor_factorisation", "distance", "xgb_features_only",
                     "promoter_composition", "gene_family")


def gene_stats(metric: str, pred: np.ndarray, observed: np.ndarray, gene_code: np.ndarray, n_genes: int,
                tissue: np.ndarray, min_donors: int) -> np.ndarray:
    """Per-gene sufficient statistics of ``metric``: (n_genes, k), summed over genes (weighted) to give the metric."""
    def sums(x: np.ndarray) -> np.ndarray:
        return np.bincount(gene_code, weights=x, minlength=n_genes)

    if metric == "rmse":
        return np.column_stack([sums((pred - observed) ** 2), sums(np.ones_like(pred))])
    if metric == "pearson":
        return np.column_stack([sums(np.ones_like(pred)), sums(pred), sums(observed), sums(pred * pred),
                                sums(observed * observed), sums(pred * observed)])
    # across-donor Pearson: the pairs metrics.score counts, their Pearsons summed per gene with their count, and
    # (a third column the metric does not read) how many of them the prediction varied in
    pair_gene, r, varied = across_donor_pairs(pred, observed, gene_code, tissue, min_donors)
    return np.column_stack([np.bincount(pair_gene, weights=r, minlength=n_genes),
                            np.bincount(pair_gene, minlength=n_genes).astype(np.float64),
                            np.bincount(pair_gene, weights=varied.astype(np.float64), minlength=n_genes)])


def metric_from(metric: str, totals: np.ndarray) -> np.ndarray:
    """The metric from summed statistics; ``totals`` is (..., k)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "rmse":
            return np.sqrt(totals[..., 0] / totals[..., 1])
        if metric == "pearson":
            n, sx, sy, sxx, syy, sxy = (totals[..., i] for i in range(6))
            cov = sxy - sx * sy / n
            return cov / np.sqrt((sxx - sx**2 / n) * (syy - sy**2 / n))
        return totals[..., 0] / totals[..., 1]


def paired_bootstrap(predictions: dict[str, np.ndarray], observed: np.ndarray, gene: np.ndarray,
                     tissue: np.ndarray, task: str, *, reference: str = "hybrid", against: list[str] | None = None,
                     mask: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0,
                     min_donors: int = 10) -> dict:
    """Paired bootstrap over genes of the difference ``reference - other`` in the task's headline metric.

    Genes are resampled with replacement (all hidden entries of a gene move together, the same genes for both
    methods), and the metric of each method is recomputed on the resample; the 95% interval is the 2.5 and 97.5
    percentiles of the difference. ``best other`` is the other method with the best point estimate, outside the
    hybrid's own family (:data:`HYBRID_FAMILY`).

    Args:
        predictions: ``{method: (N,) predictions}`` on the hidden entries.
        observed, gene, tissue: (N,) hidden values and their gene and tissue indices.
        task: ``samples`` (across-donor Pearson), ``entries`` (RMSE) or ``genes`` (Pearson).
        reference: the method compared with the others.
        against: the others (default: the best other and every one of :data:`NAMED_COMPARATORS` scored).
        mask: (N,) bool, a subset of the entries (e.g. genes with a promoter sequence).

    Returns:
        ``{"metric", "higher_is_better", "n_genes", "n_boot", "best_other", "comparisons": {other: {"reference",
        "other", "difference", "ci95": [lo, hi], "reference_better": bool}}}``; the interval is "better" only when
        it excludes 0 on the reference's side. Empty dict without the reference.
    """
    if reference not in predictions:
        return {}
    metric, higher = TASK_METRIC[task]
    if mask is not None:
        predictions = {k: v[mask] for k, v in predictions.items()}
        observed, gene, tissue = observed[mask], gene[mask], tissue[mask]
    uniq, code = np.unique(gene, return_inverse=True)
    n_genes = len(uniq)
    if n_genes < 3:
        return {}
    stats = {name: gene_stats(metric, np.asarray(p, np.float64), observed, code, n_genes, tissue, min_donors)
             for name, p in predictions.items()}
    if metric == "across_donors_pearson_mean":
        # the genes with a (gene, tissue) pair to score (the same for every method) are the units resampled: a
        # gene without one only thinned a resample out, and a resample of none of them was dropped
        informative = stats[reference][:, 1] > 0
        if informative.sum() < 3 or not stats[reference][:, 2].any():
            # nor is the reference, where it tells no donor apart (score's null: compared as 0.0, its
            # differences entered the seeds' summary)
            return {}
        # a method the same for every donor of every pair tells no donor apart: no figure (as in metrics.score, a
        # null), never the best other, not compared (a 0.0 here beside score's null read as a real comparator)
        stats = {name: s[informative] for name, s in stats.items() if name == reference or s[:, 2].any()}
        n_genes = int(informative.sum())
    point = {name: float(metric_from(metric, s.sum(axis=0))) for name, s in stats.items()}
    candidates = [n for n in stats if n not in HYBRID_FAMILY and np.isfinite(point[n])]
    best = (max if higher else min)(candidates, key=lambda n: point[n]) if candidates else None
    if against is None:
        against = ([best] if best else []) + [n for n in NAMED_COMPARATORS if n in stats and n != best]
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_genes, np.full(n_genes, 1.0 / n_genes), size=n_boot).astype(np.float64)
    ref_boot = metric_from(metric, weights @ stats[reference])
    out = {"metric": metric, "higher_is_better": higher, "n_genes": n_genes, "n_boot": n_boot, "best_other": best,
           "comparisons": {}}
    for other in against:
        if other == reference or other not in stats:
            continue
        diff = ref_boot - metric_from(metric, weights @ stats[other])
        diff = diff[np.isfinite(diff)]  # every resample of informative genes is finite but for a degenerate one
        lo, hi = (float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))) if len(diff) else (None, None)
        out["comparisons"][other] = {
            "reference": point[reference],
            "other": point[other],
            "difference": point[reference] - point[other],
            "ci95": [lo, hi],
            "reference_better": lo is not None and (lo > 0 if higher else hi < 0),
        }
    return out


def coverage_breakdown(observed: np.ndarray, lower: np.ndarray, upper: np.ndarray, tissue: np.ndarray,
                       tissue_names: list[str], estimate: np.ndarray | None = None) -> dict:
    """Coverage of a prediction interval by tissue, by quartile of the observed (hidden) value and, with
    ``estimate``, by quartile of the estimate.

    The two quartile views answer different questions. By the estimate: of the entries a user sees estimated in a
    range, how many truths fall inside their intervals (what an interval calibrated given its inputs can hold at
    80% everywhere). By the observed value: how the interval does on the entries that really are low or high; an
    estimate that explains little of the variance is pulled towards the mean, so the truly extreme entries lie
    far from it, and an interval of calibrated width misses more of them and fewer in the middle (docs/benchmarks.md,
    "The interval by quartile").

    Returns:
        ``{"overall", "by_tissue": {name: {"coverage", "n"}}, "by_quartile": [{"quartile", "low", "high",
        "coverage", "n"}], "by_estimate_quartile": [the same]}`` (quartile 1 = the least expressed entries;
        ``by_estimate_quartile`` only with ``estimate``).
    """
    inside = (observed >= lower) & (observed <= upper)
    by_tissue = {}
    for t in np.unique(tissue):
        m = tissue == t
        by_tissue[tissue_names[t]] = {"coverage": float(inside[m].mean()), "n": int(m.sum())}
    out = {"overall": float(inside.mean()), "by_tissue": by_tissue, "by_quartile": quartile_coverage(inside, observed)}
    if estimate is not None:
        out["by_estimate_quartile"] = quartile_coverage(inside, np.asarray(estimate, np.float64))
    return out


def quartile_coverage(inside: np.ndarray, value: np.ndarray) -> list[dict]:
    """Coverage of ``inside`` within each quartile of ``value``: four bins of equal size by rank (ties broken by
    position), so that many equal values (zeros) do not empty one quartile into the next; ``low``/``high`` are each
    bin's smallest and largest value."""
    n = len(value)
    q = np.empty(n, np.int64)
    q[np.argsort(value, kind="stable")] = np.arange(n) * 4 // max(n, 1)
    return [{"quartile": i + 1,
             "low": float(value[q == i].min()) if (q == i).any() else None,
             "high": float(value[q == i].max()) if (q == i).any() else None,
             "coverage": float(inside[q == i].mean()) if (q == i).any() else None, "n": int((q == i).sum())}
            for i in range(4)]


#: the per-method figures summarised over seeds
SEED_METRICS = ("pearson", "spearman", "rmse", "r2", "across_donors_pearson_mean", "low_expressed_pearson",
                "coverage_80")


def summarise_seeds(runs: list[dict]) -> dict:
    """Mean, standard deviation and per-seed values of every method's figures over evaluations with different
    ``evaluation.seed`` (each a ``metrics.json`` dictionary), with the with/without-sequence subsets, the test
    chromosomes' subset and the paired comparisons of each run."""
    def stat(values: list) -> dict:
        # n: the seeds with a figure (a method not run, or without a figure, at some seed is summarised over fewer)
        vals = [v for v in values if v is not None]
        return {"mean": float(np.mean(vals)) if vals else None,
                "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None, "n": len(vals), "values": values}

    versions = {r.get("metrics_version", 1) for r in runs}
    kinds = {(r["task"], r["dataset"]) for r in runs}
    if len(versions) > 1 or len(kinds) > 1:
        raise ValueError(f"summarise_seeds: the runs mix metric definitions {sorted(versions)} or (task, dataset) "
                         f"{sorted(kinds)}; summarise runs of one evaluation, written by one metrics version")
    # evaluate --seeds s draws the model with the config's seed + s (since f181b64), before with the one seed: a
    # summary of replicates drawn both ways would mix two kinds of spread
    nominal = {m.get("coverage_nominal") for r in runs for m in r["methods"].values()} - {None}
    if len(nominal) > 1:
        raise ValueError(f"summarise_seeds: the runs' intervals aim at different coverages {sorted(nominal)} "
                         "(head.quantiles); summarise runs of one evaluation")
    offsets = {r["model_seed"] - r["seed"] for r in runs if r.get("model_seed") is not None}
    if len(offsets) > 1 or (offsets and any(r.get("model_seed") is None for r in runs)):
        raise ValueError("summarise_seeds: the runs' model seeds are drawn two ways (seed + s in some, not in "
                         "others, or from different base seeds): evaluate them again with evaluate --seeds")
    methods = sorted({m for r in runs for m in r["methods"]})
    out: dict = {"seeds": [r["seed"] for r in runs], "task": runs[0]["task"], "dataset": runs[0]["dataset"],
                 "metrics_version": versions.pop(), "methods": {}}
    for name in methods:
        entry = {}
        for key in SEED_METRICS:
            vals = [r["methods"].get(name, {}).get(key) for r in runs]
            if any(v is not None for v in vals):
                entry[key] = stat(vals)
        for label in ("with_promoter", "without_promoter"):
            vals = [r["methods"].get(name, {}).get("subsets", {}).get(label, {}).get("pearson") for r in runs]
            if any(v is not None for v in vals):
                entry[f"{label}_pearson"] = stat(vals)
        vals = [r["methods"].get(name, {}).get("test_chroms", {}).get("pearson") for r in runs]
        if any(v is not None for v in vals):  # genes on split.test_chroms
            entry["test_chroms_pearson"] = stat(vals)
        out["methods"][name] = entry
    comparisons: dict = {}
    metric = TASK_METRIC[runs[0]["task"]][0]
    for r in runs:
        for scope, comp in r.get("comparisons", {}).items():
            for other, c in comp.get("comparisons", {}).items():
                if other in r["methods"] and r["methods"][other].get(metric) is None:
                    # no figure of its own in this run (across donors: the same for every donor of every pair);
                    # runs before paired_bootstrap skipped such a method compared it as 0.0
                    continue
                row = comparisons.setdefault(scope, {}).setdefault(other, {"seeds": [], "difference": [],
                                                                           "ci95": [], "reference_better": []})
                row["seeds"].append(r["seed"])  # a comparator not compared at every seed has fewer rows
                row["difference"].append(c["difference"])
                row["ci95"].append(c["ci95"])
                row["reference_better"].append(c["reference_better"])
    for scope in comparisons.values():
        for row in scope.values():
            # a difference read back from metrics.json is null where it was not finite
            finite = [d for d in row["difference"] if d is not None and np.isfinite(d)]
            row["difference_mean"] = float(np.mean(finite)) if finite else None
    out["comparisons"] = comparisons
    out["seconds_total"] = [r.get("seconds", {}).get("total") for r in runs]
    return out


def seeds_report(summary: dict) -> str:
    """Markdown table of :func:`summarise_seeds`: mean +/- sd over seeds per method."""
    def cell(entry: dict, key: str) -> str:
        s = entry.get(key)
        if not s or s["mean"] is None:
            return "n/a"
        n = s.get("n", len(s["values"]))
        return (f"{s['mean']:.4f}" + (f" ± {s['sd']:.4f}" if s["sd"] is not None else "")
                + (f" ({n} of {len(s['values'])} seeds)" if n < len(s["values"]) else ""))

    keys = ("pearson", "rmse", "across_donors_pearson_mean", "coverage_80", "with_promoter_pearson")
    lines = [f"# {summary['dataset']}, task `{summary['task']}`: mean ± sd over seeds {summary['seeds']}", "",
             "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    metric, higher = TASK_METRIC[summary["task"]]
    ranked = sorted(summary["methods"].items(),
                    key=lambda kv: (kv[1].get(metric) or {}).get("mean") or (-1e9 if higher else 1e9),
                    reverse=higher)
    for name, entry in ranked:
        lines.append(f"| {name} | " + " | ".join(cell(entry, k) for k in keys) + " |")
    for scope, rows in summary.get("comparisons", {}).items():
        lines += ["", f"Paired bootstrap over genes, hybrid minus other ({scope}; {metric}), per seed:", "",
                  "| other | mean difference | 95% intervals | hybrid better in |", "|---|---|---|---|"]
        for other, row in rows.items():
            # a summary written before rows named their seeds lists its intervals unlabelled
            every = row.get("seeds") is None or list(row["seeds"]) == list(summary["seeds"])
            cis = "; ".join(("" if every else f"seed {seed} ")
                            + ("n/a" if c[0] is None else f"[{c[0]:+.4f}, {c[1]:+.4f}]")
                            for seed, c in zip(row.get("seeds") or [None] * len(row["ci95"]), row["ci95"],
                                               strict=True))
            mean = "n/a" if row["difference_mean"] is None else f"{row['difference_mean']:+.4f}"
            lines.append(f"| {other} | {mean} | {cis} | "
                         f"{sum(row['reference_better'])}/{len(row['reference_better'])} seeds |")
    return "\n".join(lines) + "\n"

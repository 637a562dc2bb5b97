"""What an 80% interval can cover by quartile of the observed value, at a given accuracy of the estimate.

A model of the `genes` task's hidden entries: the value and its estimate jointly Gaussian with Pearson ``r``, the
estimate the conditional mean (calibrated), the interval ``estimate +/- z * sd(residual)`` of exactly 80% given the
estimate (the best an interval that is valid given its inputs can do). Written per quartile of the observed value,
and beside it the label-conditional (Mondrian) alternative: the interval's width calibrated separately on each
quartile of the observed value of a calibration half (the convex hull of the per-quartile sets), which holds 80%
in every observed quartile at the price of the overall coverage. Then, from finished ``evaluate`` runs, the
hybrid's measured coverage by observed quartile beside the model's at the hybrid's own Pearson.

    .venv/bin/python benchmarks/interval_quartiles.py [EVALUATE_OUT ...]

Seeded; no Ray. Prints a Markdown table per part.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import norm

from geximpute.science.comparisons import quartile_coverage

N = 400_000


def _quartile_coverage(inside: np.ndarray, value: np.ndarray) -> list[float]:
    return [q["coverage"] for q in quartile_coverage(inside, value)]


def model(r: float, seed: int = 0, nominal: float = 0.8) -> dict:
    """Coverage overall and by observed quartile of a ``nominal`` interval: the calibrated interval and the
    label-conditional one."""
    rng = np.random.default_rng(seed)
    estimate = rng.normal(size=N) * r
    value = estimate + rng.normal(size=N) * np.sqrt(1 - r * r)
    half = float(norm.ppf(0.5 + nominal / 2)) * np.sqrt(1 - r * r)
    inside = np.abs(value - estimate) <= half
    calibrated = {"overall": float(inside.mean()), "by_quartile": _quartile_coverage(inside, value),
                  "width": 2 * half}

    cal = rng.random(N) < 0.5
    test = ~cal
    cuts = np.quantile(value[cal], [0.25, 0.5, 0.75])
    edges = np.concatenate([[-np.inf], cuts, [np.inf]])
    score = np.abs(value - estimate)
    bins = np.searchsorted(cuts, value, side="right")
    widths = [float(np.quantile(score[cal & (bins == k)], nominal)) for k in range(4)]
    lower, upper = np.full(test.sum(), np.inf), np.full(test.sum(), -np.inf)
    for k in range(4):
        lo = np.maximum(estimate[test] - widths[k], edges[k])
        hi = np.minimum(estimate[test] + widths[k], edges[k + 1])
        ok = lo <= hi
        lower, upper = np.where(ok, np.minimum(lower, lo), lower), np.where(ok, np.maximum(upper, hi), upper)
    inside = (value[test] >= lower) & (value[test] <= upper)
    mondrian = {"overall": float(inside.mean()), "by_quartile": _quartile_coverage(inside, value[test]),
                "width": float(np.mean(upper - lower))}
    return {"r": r, "calibrated": calibrated, "label_conditional": mondrian}


def _row(label: str, part: dict) -> str:
    return (f"| {label} | {part['overall']:.3f} | " + " | ".join(f"{c:.3f}" for c in part["by_quartile"])
            + f" | {part['width']:.2f} |")


def main() -> None:
    print("| Pearson, interval | overall | Q1 | Q2 | Q3 | Q4 | mean width (sd of the value = 1) |")
    print("|---|---|---|---|---|---|---|")
    for r in (0.3, 0.4, 0.45, 0.6, 0.8, 0.9):
        out = model(r)
        print(_row(f"{r}, calibrated given the estimate", out["calibrated"]))
        print(_row(f"{r}, calibrated per observed quartile", out["label_conditional"]))
    runs = [Path(a) for a in sys.argv[1:]]
    if not runs:
        return
    print()
    print("| run | Pearson | measured overall | measured Q1-Q4 | model at that Pearson: Q1-Q4 |")
    print("|---|---|---|---|---|")
    for run in runs:
        # an `evaluate --seeds` folder, or a single evaluation's
        files = sorted(run.glob("seed_*/metrics.json")) or sorted(run.glob("metrics.json"))
        if not files:
            raise SystemExit(f"{run}: no metrics.json in it or its seed_* folders")
        for metrics_file in files:
            hybrid = json.loads(metrics_file.read_text())["methods"]["hybrid"]
            breakdown = hybrid["coverage_80_breakdown"]
            measured = " / ".join(f"{q['coverage']:.3f}" for q in breakdown["by_quartile"])
            nominal = hybrid.get("coverage_nominal") or 0.8
            expected = " / ".join(f"{c:.3f}" for c in
                                  model(hybrid["pearson"], nominal=nominal)["calibrated"]["by_quartile"])
            print(f"| {metrics_file.parent} | {hybrid['pearson']:.4f} | {breakdown['overall']:.3f} | {measured} "
                  f"| {expected} |")


if __name__ == "__main__":
    main()

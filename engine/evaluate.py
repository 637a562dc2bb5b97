"""``geximpute evaluate``: hide, prepare, fit every method on visible data, predict the hidden entries, score.

Writes ``metrics.json`` (the stable shape of DESIGN.md), ``report.md`` and PNG plots into the output folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from engine import schema as S
from engine.baselines import make_methods
from engine.config import Config
from engine.dataset import load_dataset
from engine.metrics import score
from engine.prepare import Prepared, prepare
from engine.provenance import manifest, staged_dir, write_json

log = logging.getLogger(__name__)


def read_records(prepared: Prepared, *, hidden: bool | None = None) -> pa.Table:
    """Context records of a prepare output, sorted by (gene_index, sample_index); optionally only hidden ones."""
    dataset = pads.dataset(prepared.out_dir / "context", format="parquet", partitioning="hive")
    flt = None if hidden is None else (pads.field("hidden") == hidden)
    table = dataset.to_table(filter=flt)
    return table.sort_by([("gene_index", "ascending"), ("sample_index", "ascending")])


def hidden_values(prepared: Prepared, records: pa.Table) -> np.ndarray:
    """The true value of each hidden record, looked up from the hidden truth (never from the records)."""
    truth = prepared.truth
    n_samples = prepared.problem.n_samples
    key = truth.gene_index * n_samples + truth.sample_index
    order = np.argsort(key)
    want = records["gene_index"].to_numpy().astype(np.int64) * n_samples + records["sample_index"].to_numpy()
    pos = np.searchsorted(key[order], want)
    if len(want) != len(truth) or not np.array_equal(key[order][pos], want):
        raise RuntimeError("the hidden records do not match the hidden entries one to one")
    return truth.values[order][pos]


def evaluate(config: Config, out_dir: str | Path) -> dict:
    """Run the evaluation protocol of ``config.evaluation`` and write its outputs to ``out_dir``.

    Returns:
        the metrics dictionary written to ``metrics.json``.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    dataset = load_dataset(config)
    with staged_dir(out_dir) as staging:
        with_hybrid = "hybrid" in config.evaluation.methods
        prepared = prepare(config, staging / "records", dataset=dataset, targets="hidden", training=with_hybrid)
        records = read_records(prepared, hidden=True)
        observed = hidden_values(prepared, records)
        problem = prepared.problem
        methods, skipped = make_methods(config.evaluation.methods, config.baselines, len(problem.donors))
        gene = records["gene_index"].to_numpy()
        sample = records["sample_index"].to_numpy()
        tissue = problem.tissue_index[sample]
        donor = problem.donor_index[sample]
        results, predictions, timings = {}, {}, {}
        for method in methods:
            t = time.perf_counter()
            method.fit(problem)
            pred = np.asarray(method.predict(records), dtype=np.float64)
            timings[method.name] = round(time.perf_counter() - t, 2)
            predictions[method.name] = pred
            results[method.name] = score(
                pred,
                observed,
                gene=gene,
                tissue=tissue,
                donor=donor,
                tissue_names=problem.tissues,
                min_donors=config.evaluation.min_donors,
            )
            log.info(
                "evaluate: %-18s pearson %.4f  rmse %.4f  (%.1f s)",
                method.name,
                results[method.name]["pearson"] or float("nan"),
                results[method.name]["rmse"],
                timings[method.name],
            )
        if with_hybrid:
            from engine.hybrid import fit_hybrid

            t = time.perf_counter()
            models = fit_hybrid(config, staging / "records", problem.gene_ids, len(problem.tissues),
                                staging / "runs", ablations=config.evaluation.ablations)
            for name, (pred, lower, upper) in models.predict(records).items():
                pred = np.asarray(pred, dtype=np.float64)
                predictions[name] = pred
                results[name] = score(
                    pred, observed, gene=gene, tissue=tissue, donor=donor, tissue_names=problem.tissues,
                    min_donors=config.evaluation.min_donors,
                )
                if lower is not None:
                    inside = (observed >= lower) & (observed <= upper)
                    results[name]["coverage_80"] = float(inside.mean())
                    results[name]["interval_width_mean"] = float(np.mean(upper - lower))
                log.info("evaluate: %-18s pearson %.4f  rmse %.4f", name, results[name]["pearson"] or float("nan"),
                         results[name]["rmse"])
            timings["hybrid"] = round(time.perf_counter() - t, 1)
            timings.update(models.seconds)
        metrics = {
            "dataset": config.name,
            "task": config.evaluation.task,
            "seed": config.evaluation.seed,
            "fraction": config.evaluation.fraction,
            "n_hidden": int(len(observed)),
            "n_genes": problem.n_genes,
            "n_samples": problem.n_samples,
            "methods": results,
            "skipped": skipped,
            "seconds": {
                "prepare": round(prepared.seconds, 2),
                **timings,
                "total": round(time.perf_counter() - t0, 2),
            },
        }
        write_json(staging / "metrics.json", metrics)
        write_json(staging / "_manifest.json", manifest(config, step="evaluate"))
        _add_promoter_subsets(results, predictions, observed, gene, prepared)
        _write_predictions(staging, records, observed, predictions)
        _plots(staging, observed, predictions, results)
        (staging / "report.md").write_text(report(metrics))
    log.info("evaluate: wrote %s in %.1f s", out_dir, time.perf_counter() - t0)
    return metrics


def _add_promoter_subsets(results: dict, predictions: dict, observed: np.ndarray, gene: np.ndarray,
                          prepared: Prepared) -> None:
    """Scores on the hidden entries of genes with and without a promoter sequence in the genome, per method.

    Only a few hundred genes of the real data have sequence; these subsets show what the sequence branch adds where
    it can act.
    """
    import pyarrow.parquet as pq

    with_seq = set(pq.read_table(prepared.out_dir / "gene_promoters.parquet")[S.GENE_ID].to_pylist())
    has = np.isin(prepared.problem.gene_ids[gene], np.asarray(sorted(with_seq), dtype=object))
    if not has.any() or has.all():
        return
    for name, pred in predictions.items():
        subsets = {}
        for label, mask in (("with_promoter", has), ("without_promoter", ~has)):
            x, y = pred[mask], observed[mask]
            subsets[label] = {
                "n": int(mask.sum()),
                "genes": int(len(np.unique(gene[mask]))),
                "pearson": float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 and np.ptp(x) > 0 else None,
                "rmse": float(np.sqrt(np.mean((x - y) ** 2))),
            }
        results[name]["subsets"] = subsets


def _write_predictions(out: Path, records: pa.Table, observed: np.ndarray, predictions: dict) -> None:
    import pyarrow.parquet as pq

    cols = {name: records[name] for name in (S.GENE_ID, S.SAMPLE_ID, S.DONOR_ID, S.TISSUE, S.CHROM)}
    cols["observed"] = pa.array(observed, pa.float32())
    for name, pred in predictions.items():
        cols[name] = pa.array(pred, pa.float32())
    pq.write_table(pa.table(cols), out / "predictions.parquet")


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def report(metrics: dict) -> str:
    """Markdown report of a metrics dictionary."""
    lines = [
        f"# Evaluation: {metrics['dataset']}, task `{metrics['task']}`",
        "",
        f"Hidden entries: {metrics['n_hidden']:,} (fraction {metrics['fraction']}, seed {metrics['seed']}); "
        f"{metrics['n_genes']:,} genes x {metrics['n_samples']:,} samples. All methods are scored on exactly these "
        "entries, on the modelling scale (log1p).",
        "",
        "| method | Pearson | Spearman | RMSE | R2 | across-donor Pearson | low-expressed Pearson | 80% coverage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ranked = sorted(metrics["methods"].items(), key=lambda kv: -(kv[1]["pearson"] or -1))
    for name, m in ranked:
        lines.append(
            f"| {name} | {_fmt(m['pearson'])} | {_fmt(m['spearman'])} | {_fmt(m['rmse'])} | {_fmt(m['r2'])} | "
            f"{_fmt(m['across_donors_pearson_mean'])} | {_fmt(m['low_expressed_pearson'])} | "
            f"{_fmt(m.get('coverage_80'), 3)} |"
        )
    if "distance" in metrics["methods"] and metrics["methods"]["distance"]["pearson"]:
        base = metrics["methods"]["distance"]["pearson"]
        lines += [
            "",
            "Pearson relative to `distance`: "
            + ", ".join(f"{n} {m['pearson'] / base:.2f}x" for n, m in ranked if m["pearson"] is not None),
        ]
    subsets = {n: m["subsets"] for n, m in ranked if "subsets" in m}
    if subsets:
        first = next(iter(subsets.values()))
        lines += [
            "",
            f"Genes with a promoter sequence in the genome: {first['with_promoter']['genes']} of the hidden genes "
            f"({first['with_promoter']['n']:,} entries); without: {first['without_promoter']['genes']}.",
            "",
            "| method | Pearson with promoter | RMSE with promoter | Pearson without | RMSE without |",
            "|---|---|---|---|---|",
        ]
        for name, sub in subsets.items():
            w, wo = sub["with_promoter"], sub["without_promoter"]
            lines.append(f"| {name} | {_fmt(w['pearson'])} | {_fmt(w['rmse'])} | {_fmt(wo['pearson'])} | "
                         f"{_fmt(wo['rmse'])} |")
    for name, why in metrics.get("skipped", {}).items():
        lines.append(f"\n`{name}` skipped: {why}.")
    lines += ["", "![predicted vs observed](pred_vs_obs.png)", "", "![per tissue](per_tissue.png)", ""]
    return "\n".join(lines)


def _plots(out: Path, observed: np.ndarray, predictions: dict, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(predictions)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False)
    lo, hi = float(np.min(observed)), float(np.max(observed))
    for ax, name in zip(axes[0], names, strict=True):
        ax.hexbin(observed, predictions[name], gridsize=60, bins="log", cmap="viridis", extent=(lo, hi, lo, hi))
        ax.plot([lo, hi], [lo, hi], color="white", lw=0.8)
        ax.set_title(f"{name}\nr = {_fmt(results[name]['pearson'], 3)}")
        ax.set_xlabel("observed (log1p)")
        ax.set_ylabel("predicted (log1p)")
    fig.tight_layout()
    fig.savefig(out / "pred_vs_obs.png", dpi=110)
    plt.close(fig)

    tissues = sorted({t for r in results.values() for t in r["per_tissue"]})
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(tissues) * len(names) / 2), 4))
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(tissues))
    for i, name in enumerate(names):
        vals = [results[name]["per_tissue"].get(t, {}).get("pearson") or 0.0 for t in tissues]
        ax.bar(x + i * width, vals, width, label=name)
    ax.set_xticks(x + 0.4 - width / 2, tissues, rotation=90, fontsize=6)
    ax.set_ylabel("Pearson")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "per_tissue.png", dpi=110)
    plt.close(fig)

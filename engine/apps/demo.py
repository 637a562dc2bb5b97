"""``geximpute demo``: the main job end to end on the real GTEx data in ``../shared/data/real``, small settings.

Two real datasets, each trained, bundled and imputed on a local single-node Ray:

- ``gtex-v8``: GTEx v8 sample-level reads of 59 genes in 17,382 samples (948 donors x 54 tissues, 34% of the
  donor-tissue pairs sampled). The model is trained on the visible samples; then every donor-tissue profile that was
  never sampled is imputed, with its 80% interval, into ``gtex-v8/predictions`` (hive-partitioned Parquet).
- ``gtex-medians``: GTEx median TPM of ~18k genes in 29 tissues, evaluation task ``genes``: 10% of the genes are
  hidden before anything runs, the model never sees them, and ``impute`` fills them in
  (``gtex-medians/predictions``); their accuracy against the held-out truth is reported next to the inverse-distance
  and gene-family baselines on exactly the same entries.

Then ``report.html`` (one self-contained page: plots, tables, configs, input fingerprints), ``summary.md`` and
``summary.png`` at the top of the output folder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

from geximpute.config import Config, load_config
from geximpute.errors import GeximputeError
from geximpute.io.dataset import load_dataset
from geximpute.runtime.provenance import manifest, write_json
from geximpute.runtime.raytools import ensure_ray
from geximpute.science.baselines import make_methods
from geximpute.science.metrics import score
from geximpute.steps.evaluate import hidden_values, read_records
from geximpute.steps.html_report import (
    METRICS_HEADER,
    Section,
    coverage_plot,
    figure_html,
    metrics_rows,
    observed_vs_predicted,
    per_tissue_bars,
    provenance_section,
    pyplot,
    table_html,
    write_report,
)
from geximpute.steps.impute import impute
from geximpute.steps.pipeline import Progress, build_bundle

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"

#: small settings that keep the whole demo within minutes on 2 cores
DEMO_SETTINGS = (
    # one attention layer of width 16: about 4x faster to train and to run than the default network
    "model.d_model=16",
    "model.n_layers=1",
    "train.epochs=2",
    "train.patience=2",
    "train.max_examples_per_epoch=20000",
    "train.fold_fraction=0.1",
    "train.cpus_per_worker=1.0",
    "head.num_boost_round=100",
    "head.cpus_per_worker=1.0",
)

#: the DuckDB query README shows over the demo's Parquet (also run by the demo and tested on a small output)
README_QUERY = """SELECT tissue, count(*) AS entries, count(DISTINCT donor_id) AS donors,
       round(avg(predicted_upper - predicted_lower), 3) AS mean_interval_width
FROM read_parquet('{path}/**/*.parquet', hive_partitioning = true)
WHERE sample_id IS NULL           -- donor-tissue profiles that were never sampled
GROUP BY tissue ORDER BY entries DESC LIMIT 5"""


@dataclass
class DemoPart:
    """What the demo did with one dataset."""

    name: str
    config: Config
    seconds: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)


def _train_bundle(config: Config, part: DemoPart, dataset) -> tuple[Path, object]:
    """:func:`geximpute.steps.pipeline.build_bundle` on the hidden entries, its stages timed into ``part.seconds``;
    returns (the bundle folder, prepare's output)."""
    progress = Progress()
    bundle = build_bundle(config, dataset=dataset, targets="hidden", progress=progress)
    part.seconds.update({name: figures["seconds"] for name, figures in progress.stages.items()})
    part.facts["model_version"] = bundle.model_version
    part.facts["network_val_loss"] = progress.stages["train"]["val_loss"]
    return bundle.folder, progress.results["prepare"]


def _medians(out: Path, seed: int) -> tuple[DemoPart, dict]:
    """Hidden genes of the medians: train without them, impute them, score them."""
    config = load_config(CONFIGS / "gtex-medians.yaml", [*DEMO_SETTINGS, f"output_dir={out / 'gtex-medians'}",
                                                         "evaluation.task=genes", f"seed={seed}"])
    part = DemoPart("gtex-medians", config)
    t = time.perf_counter()
    dataset = load_dataset(config)
    part.seconds["load"] = round(time.perf_counter() - t, 1)
    bundle, prepared = _train_bundle(config, part, dataset)
    problem, truth = prepared.problem, prepared.truth
    t = time.perf_counter()
    # the visible problem: the hidden genes are missing in it, like any unmeasured entry
    result = impute(config, model=bundle, out_dir=Path(config.output_dir) / "predictions", problem=problem)
    part.seconds["impute"] = round(time.perf_counter() - t, 1)

    predictions = pads.dataset(result.out_dir, format="parquet", partitioning="hive").to_table().to_pandas()
    gene_of = {g: i for i, g in enumerate(problem.gene_ids)}
    tissue_of = {s: i for i, s in enumerate(problem.sample_ids)}  # one sample per tissue in a medians table
    key = truth.gene_index * problem.n_samples + truth.sample_index
    got = np.array([gene_of[g] for g in predictions["gene_id"]]) * problem.n_samples + np.array(
        [tissue_of[str(t)] for t in predictions["tissue"]])
    order = np.argsort(got)
    pos = np.searchsorted(got[order], key)
    if len(got) < len(key) or not np.array_equal(got[order][np.clip(pos, 0, len(got) - 1)], key):
        raise GeximputeError(f"{result.out_dir}: the imputed entries do not cover the hidden genes")
    rows = predictions.iloc[order[pos]]
    observed = truth.values.astype(np.float64)
    gene, tissue = truth.gene_index, problem.tissue_index[truth.sample_index]
    donor = problem.donor_index[truth.sample_index]
    args = {"gene": gene, "tissue": tissue, "donor": donor, "tissue_names": problem.tissues}
    hybrid = score(rows["predicted"].to_numpy(np.float64), observed, **args)
    hybrid["coverage_80"] = float(np.mean((observed >= rows["predicted_lower"].to_numpy()) &
                                          (observed <= rows["predicted_upper"].to_numpy())))
    scores = {"hybrid": hybrid}
    records = read_records(prepared, hidden=True)
    # two classical comparators on the same entries: the neighbours' levels and the gene's family's
    methods, _ = make_methods(("distance", "gene_family"), config.baselines, len(problem.donors), task="genes",
                              gene_names=problem.gene_names is not None)
    for method in methods:
        method.fit(problem)
        scores[method.name] = score(np.asarray(method.predict(records), np.float64), hidden_values(prepared, records),
                                    gene=records["gene_index"].to_numpy(), donor=np.zeros(records.num_rows, int),
                                    tissue=problem.tissue_index[records["sample_index"].to_numpy()],
                                    tissue_names=problem.tissues)
    part.facts.update(hidden_genes=int(len(np.unique(truth.gene_index))), hidden_entries=int(len(truth)),
                      rows=result.n_rows, run_id=result.run_id, scores=scores)
    plot = {"observed": observed, "predicted": rows["predicted"].to_numpy()}
    return part, plot


def _v8(out: Path, seed: int) -> tuple[DemoPart, dict]:
    """Missing donor-tissue profiles of the v8 sample-level data."""
    config = load_config(CONFIGS / "gtex-v8-samples.yaml", [*DEMO_SETTINGS, f"output_dir={out / 'gtex-v8'}",
                                                            f"seed={seed}"])
    part = DemoPart("gtex-v8", config)
    t = time.perf_counter()
    dataset = load_dataset(config)
    part.seconds["load"] = round(time.perf_counter() - t, 1)
    bundle, _ = _train_bundle(config, part, dataset)
    t = time.perf_counter()
    result = impute(config, model=bundle, out_dir=Path(config.output_dir) / "predictions", dataset=dataset)
    part.seconds["impute"] = round(time.perf_counter() - t, 1)
    report = dataset.report["samples"]
    part.facts.update(genes=dataset.report["genes"]["expression_with_annotation"],
                      donors=report["donors"], tissues=report["tissues"], samples=report["samples"],
                      sampled_pairs=report["observed_donor_tissue_cells"], missing_profiles=result.n_missing_profiles,
                      rows=result.n_rows, rows_per_tissue=result.rows, run_id=result.run_id,
                      entries_per_second=round(result.n_rows / max(result.seconds, 1e-9)))
    table = pads.dataset(result.out_dir, format="parquet", partitioning="hive").to_table(
        columns=["gene_id", "predicted", "predicted_lower", "predicted_upper"])
    width = (table["predicted_upper"].to_numpy() - table["predicted_lower"].to_numpy())
    part.facts["mean_interval_width"] = float(width.mean())
    return part, {"rows_per_tissue": result.rows, "genes": part.facts["genes"],
                  "gene_id": np.asarray(table["gene_id"].to_pylist(), dtype=object),
                  "predicted": table["predicted"].to_numpy(), "width": width}


def _duckdb_rows(path: Path) -> list[tuple] | None:
    try:
        import duckdb
    except ImportError:  # duckdb comes with the test extra
        return None
    return duckdb.sql(README_QUERY.format(path=path)).fetchall()


def _duckdb(path: Path) -> str | None:
    rows = _duckdb_rows(path)
    if rows is None:
        return None
    lines = ["| tissue | entries | donors | mean interval width |", "|---|---|---|---|"]
    lines += [f"| {t} | {n:,} | {d:,} | {w} |" for t, n, d, w in rows]
    return "\n".join(lines)


def _plot(out: Path, medians: dict, v8: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    obs, pred = medians["observed"], medians["predicted"]
    lo, hi = float(min(obs.min(), pred.min())), float(max(obs.max(), pred.max()))
    a.hexbin(obs, pred, gridsize=50, bins="log", cmap="viridis", extent=(lo, hi, lo, hi))
    a.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, ls="--")
    a.set_xlabel("held-out median log1p(TPM)")
    a.set_ylabel("imputed log1p(TPM)")
    a.set_title(f"GTEx medians: hidden genes (r = {np.corrcoef(obs, pred)[0, 1]:.3f})")
    rows = sorted(v8["rows_per_tissue"].items(), key=lambda kv: -kv[1])
    b.barh([t for t, _ in rows][::-1], [n / v8["genes"] for _, n in rows][::-1], color="tab:orange")
    b.tick_params(axis="y", labelsize=5)
    b.set_xlabel("donors with an imputed profile (never sampled)")
    b.set_title("GTEx v8: missing donor-tissue profiles imputed")
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=120)
    plt.close(fig)


def _across_donors_plot(v8: dict) -> str:
    """Distribution across donors of each gene's imputed values (the 20 genes that vary most), as box plots."""
    plt = pyplot()
    genes, pred = v8["gene_id"], v8["predicted"]
    names = np.unique(genes)
    spread = {g: float(np.std(pred[genes == g])) for g in names}
    top = sorted(names, key=lambda g: -spread[g])[:20]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    ax.boxplot([pred[genes == g] for g in top], showfliers=False)
    ax.set_xticks(np.arange(1, len(top) + 1), [str(g).split(".")[0] for g in top], rotation=60, ha="right",
                  fontsize=7)
    ax.set_ylabel("imputed log1p(expression)")
    fig.tight_layout()
    return figure_html(fig, "imputed values across donors per gene")


def _v8_tissues_plot(v8: dict) -> str:
    plt = pyplot()
    rows = sorted(v8["rows_per_tissue"].items(), key=lambda kv: -kv[1])
    fig, ax = plt.subplots(figsize=(10, max(4, 0.16 * len(rows))))
    ax.barh([t for t, _ in rows][::-1], [n / v8["genes"] for _, n in rows][::-1], color="tab:orange")
    ax.tick_params(axis="y", labelsize=6)
    ax.set_xlabel("donors with an imputed profile (never sampled)")
    fig.tight_layout()
    return figure_html(fig, "imputed donor-tissue profiles per tissue")


def write_html(out: Path, medians: DemoPart, v8: DemoPart, medians_plot: dict, v8_plot: dict, total: float,
               query_rows: list[tuple] | None) -> Path:
    """``report.html``: the demo's numbers, plots, tables, configs and input fingerprints in one page."""
    m, v = medians.facts, v8.facts
    scores = m["scores"]
    sections = [
        Section("GTEx medians: hidden genes", table_html(METRICS_HEADER, metrics_rows(scores))
                + observed_vs_predicted(medians_plot["observed"], {"hybrid": medians_plot["predicted"]},
                                        {"hybrid": scores["hybrid"].get("pearson")})
                + per_tissue_bars(scores) + (coverage_plot(scores) or ""),
                f"{m['hidden_genes']:,} genes ({m['hidden_entries']:,} entries) were hidden before training "
                f"(task genes, seed {medians.config.evaluation.seed}); the model never saw them and impute filled "
                "them in. Accuracy against the held-out truth, log1p(TPM), next to the inverse-distance and "
                "gene-family baselines on the same entries; then each tissue's Pearson and the 80% interval's "
                "coverage."),
        Section("GTEx v8: missing donor-tissue profiles", _v8_tissues_plot(v8_plot) + _across_donors_plot(v8_plot),
                f"{v['donors']:,} donors x {v['tissues']} tissues, {v['sampled_pairs']:,} donor-tissue pairs "
                f"sampled; the {v['missing_profiles']:,} pairs never sampled were imputed ({v['rows']:,} entries, "
                f"{v['entries_per_second']:,} entries/s into Parquet, mean 80% interval width "
                f"{v['mean_interval_width']:.3f}). Below: how many donors got each tissue imputed, and how the "
                "imputed values spread across donors for the 20 genes that vary most."),
        Section("Seconds per step", table_html(("dataset", *v8.seconds),
                                               [(p.name, *(p.seconds.get(k) for k in v8.seconds))
                                                for p in (v8, medians)]),
                f"Wall time {total:.0f} s on a local single-node Ray, settings {', '.join(DEMO_SETTINGS)}."),
    ]
    if query_rows is not None:
        sections.append(Section("The README's DuckDB query", "<pre>" + README_QUERY.format(
            path=out / "gtex-v8" / "predictions").replace("<", "&lt;") + "</pre>"
            + table_html(("tissue", "entries", "donors", "mean interval width"), query_rows)))
    sections.append(provenance_section({part.name: manifest(part.config, step="demo") for part in (v8, medians)}))
    return write_report(out / "report.html", "geximpute demo", "real GTEx data, trained, imputed and scored",
                        sections)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _summary(out: Path, medians: DemoPart, v8: DemoPart, total: float, query_table: str | None) -> str:
    m, v = medians.facts, v8.facts
    lines = [
        "# geximpute demo",
        "",
        f"Real GTEx data from `../shared/data/real`, local single-node Ray, small settings "
        f"({', '.join(DEMO_SETTINGS)}). Wall time {total:.0f} s.",
        "",
        "## GTEx v8 sample level: missing donor-tissue profiles",
        "",
        f"{v['donors']:,} donors x {v['tissues']} tissues; {v['sampled_pairs']:,} donor-tissue pairs were sampled "
        f"({v['samples']:,} samples). The model (version `{v['model_version']}`) was trained on the visible samples; "
        f"the {v['missing_profiles']:,} pairs never sampled were imputed from each donor's other tissues: "
        f"{v['rows']:,} entries ({v['genes']} genes each) in `gtex-v8/predictions/`, run `{v['run_id']}`, "
        f"{v['entries_per_second']:,} entries/s end to end into Parquet. Mean width of the 80% interval: "
        f"{v['mean_interval_width']:.3f} log1p units.",
        "",
        "## GTEx medians: hidden genes",
        "",
        f"{m['hidden_genes']:,} genes ({m['hidden_entries']:,} entries in 29 tissues) were hidden before training "
        f"(evaluation task `genes`, seed {medians.config.evaluation.seed}); the model never saw them, and `impute` "
        f"filled them in (`gtex-medians/predictions/`). Accuracy against the held-out truth, log1p(TPM):",
        "",
        "| method | Pearson | Spearman | RMSE | R2 | 80% coverage |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in m["scores"].items():
        lines.append(f"| {name} | {_fmt(s['pearson'])} | {_fmt(s['spearman'])} | {_fmt(s['rmse'])} | {_fmt(s['r2'])} "
                     f"| {_fmt(s.get('coverage_80'))} |")
    lines += ["", "![summary](summary.png)", "", "## Seconds per step", "", "| dataset | " +
              " | ".join(v8.seconds) + " |", "|---|" + "---|" * len(v8.seconds)]
    for part in (v8, medians):
        lines.append(f"| {part.name} | " + " | ".join(str(part.seconds.get(k, "")) for k in v8.seconds) + " |")
    if query_table:
        lines += ["", "## The README's DuckDB query on `gtex-v8/predictions`", "", "```sql",
                  README_QUERY.format(path=out / "gtex-v8" / "predictions"), "```", "", query_table]
    return "\n".join(lines) + "\n"


#: the file that marks a folder as a demo's output, which a later demo may replace
DEMO_MARKER = ".geximpute-demo"


def _check_demo_folder(out: Path) -> None:
    """Refuse a folder that holds something other than a demo's output: the demo writes its summary, report and
    plots at its top, over files of those names."""
    if not out.exists():
        return
    if not out.is_dir():
        raise GeximputeError(f"demo --out {out}: not a folder; choose a new folder for the demo's output")
    earlier = (out / DEMO_MARKER).is_file() or ((out / "summary.json").is_file() and (out / "gtex-v8").is_dir())
    if any(not p.name.startswith("_geximpute") for p in out.iterdir()) and not earlier:  # its logs aside
        raise GeximputeError(f"demo --out {out}: the folder holds files that are not a demo's output (the demo "
                             "writes summary.md, summary.json, summary.png and report.html there); choose a new or "
                             "empty folder")


def run_demo(out: str | Path, *, seed: int = 0) -> Path:
    """Run the demo into ``out`` and return the path of ``summary.md``.

    Raises:
        GeximputeError: the real data is not beside the checkout, or a step fails.
    """
    t0 = time.perf_counter()
    out = Path(out).resolve()
    _check_demo_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("geximpute demo output: `geximpute demo --out` may replace what is here\n")
    first = load_config(CONFIGS / "gtex-v8-samples.yaml")
    started = ensure_ray(first.ray)
    try:
        v8, v8_plot = _v8(out, seed)
        medians, medians_plot = _medians(out, seed)
    finally:
        if started:
            import ray

            ray.shutdown()
    total = time.perf_counter() - t0
    _plot(out, medians_plot, v8_plot)
    text = _summary(out, medians, v8, total, _duckdb(out / "gtex-v8" / "predictions"))
    (out / "summary.md").write_text(text)
    write_html(out, medians, v8, medians_plot, v8_plot, total, _duckdb_rows(out / "gtex-v8" / "predictions"))
    write_json(out / "summary.json", {"seconds": total, "gtex-v8": {**v8.facts, "seconds": v8.seconds},
                                      "gtex-medians": {**medians.facts, "seconds": medians.seconds}})
    log.info("demo: done in %.0f s; summary in %s", total, out / "summary.md")
    return out / "summary.md"

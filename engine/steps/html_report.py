"""One self-contained ``report.html``: plots embedded as base64 PNG, tables, the config and the input fingerprints.

In the spirit of MultiQC's reports: one file to open or mail, no network access, no scripts. ``evaluate`` and
``demo`` write one; :func:`evaluation_sections` builds the evaluation's plots (observed vs predicted per method,
per-tissue Pearson, interval coverage, with and without promoter sequence, across-individual distributions).
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geximpute import __version__
from geximpute.science.metrics import across_donor_pairs

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f3b57;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85;font-size:13px}
nav{padding:8px 32px;background:#e8eef4;font-size:13px}nav a{margin-right:14px;color:#1f3b57}
main{padding:8px 32px 40px;max-width:1400px}section{background:#fff;border:1px solid #dde3e9;border-radius:6px;
padding:12px 20px;margin:16px 0}h2{font-size:17px;margin:4px 0 10px;color:#1f3b57}
p.note{font-size:13px;color:#555;margin:4px 0 10px}img.plot{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;font-size:13px;margin:6px 0}th,td{border:1px solid #dde3e9;padding:3px 8px;
text-align:left}th{background:#f0f4f8}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f8fa;border:1px solid #dde3e9;padding:10px;font-size:12px;overflow:auto;max-height:420px}
footer{font-size:12px;color:#777;padding:0 32px 24px}
"""


@dataclass
class Section:
    """One block of the report: a title, a short note and its HTML body."""

    title: str
    body: str
    note: str = ""

    @property
    def anchor(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.title.lower()).strip("-")


def figure_html(fig, alt: str) -> str:
    """A matplotlib figure as an ``<img>`` with the PNG inline (base64); the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table_html(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table; floats get 4 decimals, None shows as n/a."""

    def cell(x: object) -> str:
        if x is None:
            return "n/a"
        if isinstance(x, float):
            return f"{x:.4f}"
        if isinstance(x, int):
            return f"{x:,}"
        return html.escape(str(x))

    def td(x: object) -> str:
        numeric = isinstance(x, (int, float)) and not isinstance(x, bool) or x is None
        return f'<td class="n">{cell(x)}</td>' if numeric else f"<td>{cell(x)}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(td(x) for x in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def provenance_section(manifests: dict[str, dict]) -> Section:
    """The resolved configs, input fingerprints and package versions of one or more manifests."""
    parts = []
    for label, m in manifests.items():
        rows = [(name, f.get("path", ""), f.get("bytes"), f.get("sha256", "")[:16]) for name, f in
                m.get("inputs", {}).items()]
        parts.append(f"<h3>{html.escape(label)}</h3>")
        parts.append(table_html(("input", "path", "bytes", "sha256 (first 16)"), rows))
        versions = m.get("versions", {})
        parts.append(table_html(("package", "version"), sorted(versions.items())))
        parts.append("<details><summary>resolved config</summary><pre>"
                     + html.escape(json.dumps(m.get("config", {}), indent=2, default=str)) + "</pre></details>")
    return Section("Config and data fingerprints", "".join(parts),
                   "Everything needed to rerun: the resolved configuration, the SHA-256 of every input file and the "
                   "versions of the libraries that shaped the numbers.")


def write_report(path: str | Path, title: str, subtitle: str, sections: Sequence[Section]) -> Path:
    """Write ``sections`` into one self-contained HTML file at ``path`` and return it."""
    path = Path(path)
    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    blocks = "".join(
        f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>'
        + (f'<p class="note">{html.escape(s.note)}</p>' if s.note else "")
        + s.body + "</section>"
        for s in sections
    )
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header><nav>{nav}</nav>"
        f"<main>{blocks}</main><footer>geximpute {__version__}, written {stamp}</footer></body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def observed_vs_predicted(observed: np.ndarray, predictions: dict[str, np.ndarray], pearson: dict,
                          scale: str = "log1p") -> str:
    """Hexbin of predicted against observed, one panel per method, on a common scale."""
    plt = pyplot()
    names = list(predictions)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.3 * rows), squeeze=False)
    lo, hi = float(np.min(observed)), float(np.max(observed))
    for ax, name in zip(axes.flat, names, strict=False):
        ax.hexbin(observed, predictions[name], gridsize=50, bins="log", cmap="viridis", extent=(lo, hi, lo, hi),
                  mincnt=1)
        ax.plot([lo, hi], [lo, hi], color="0.3", lw=0.8, ls="--")
        ax.set_title(f"{name}  r = {_fmt(pearson.get(name))}", fontsize=9)
        ax.set_xlabel(f"observed ({scale})", fontsize=8)
        ax.set_ylabel(f"predicted ({scale})", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return figure_html(fig, "observed vs predicted per method")


def per_tissue_bars(results: dict) -> str:
    """Pearson per tissue, grouped bars per method."""
    plt = pyplot()
    names = list(results)
    tissues = sorted({t for r in results.values() for t in r.get("per_tissue", {})})
    fig, ax = plt.subplots(figsize=(min(18, max(6, 0.22 * len(tissues) * max(len(names), 1) / 2 + 3)), 4))
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(tissues))
    for i, name in enumerate(names):
        vals = [(results[name].get("per_tissue", {}).get(t) or {}).get("pearson") or 0.0 for t in tissues]
        ax.bar(x + i * width, vals, width, label=name)
    ax.set_xticks(x + 0.4 - width / 2, tissues, rotation=90, fontsize=6)
    ax.set_ylabel("Pearson")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside the bars, never over them
    fig.tight_layout()
    return figure_html(fig, "Pearson per tissue")


def coverage_plot(results: dict, nominal: float = 0.8, scale: str = "log1p") -> str | None:
    """Empirical coverage of each method's interval against the nominal level, and the mean interval width."""
    have = {n: r for n, r in results.items() if r.get("coverage_80") is not None}
    if not have:
        return None
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    names = list(have)
    a.bar(names, [have[n]["coverage_80"] for n in names], color="tab:blue")
    a.axhline(nominal, color="tab:red", ls="--", lw=1, label=f"nominal {nominal:.0%}")
    a.set_ylim(0, 1)
    a.set_ylabel("share of hidden entries inside")
    a.legend(fontsize=8)
    b.bar(names, [have[n].get("interval_width_mean") or 0.0 for n in names], color="tab:orange")
    b.set_ylabel(f"mean interval width ({scale})")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return figure_html(fig, "interval coverage")


def promoter_subsets_plot(results: dict) -> str | None:
    """Pearson on genes with and without a promoter sequence, per method."""
    have = {n: r["subsets"] for n, r in results.items() if "subsets" in r}
    if not have:
        return None
    plt = pyplot()
    names = list(have)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names)), 3.4))
    for i, (label, key) in enumerate((("with promoter sequence", "with_promoter"),
                                      ("without", "without_promoter"))):
        ax.bar(x + i * 0.4, [have[n][key].get("pearson") or 0.0 for n in names], 0.4, label=label)
    ax.set_xticks(x + 0.2, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Pearson")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_html(fig, "with and without promoter sequence")


def across_individual_correlations(predictions: dict[str, np.ndarray], observed: np.ndarray, gene: np.ndarray,
                                   tissue: np.ndarray, min_donors: int) -> dict[str, np.ndarray]:
    """Per method, the Pearson across individuals of each (gene, tissue) with ``min_donors`` hidden entries or more.

    A (gene, tissue) whose observed values are constant is left out; a constant prediction counts as 0
    (:func:`geximpute.science.metrics.across_donor_pairs`, as ``metrics.json`` and the bootstrap count them).
    """
    return {name: across_donor_pairs(pred, observed, gene, tissue, min_donors)[1]
            for name, pred in predictions.items()}


def across_individual_plot(correlations: dict[str, np.ndarray]) -> str | None:
    """Box plots of the across-individual Pearson of each method."""
    have = {n: v for n, v in correlations.items() if len(v)}
    if not have:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(have)), 3.6))
    ax.boxplot(list(have.values()), showfliers=False)
    ax.set_xticks(np.arange(1, len(have) + 1), list(have), rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_ylabel("Pearson across individuals")
    fig.tight_layout()
    return figure_html(fig, "across-individual correlations")


def metrics_rows(results: dict) -> list[tuple]:
    """Rows of the metrics table, best Pearson first."""
    ranked = sorted(results.items(), key=lambda kv: -(kv[1].get("pearson") or -1))
    return [(name, m.get("pearson"), m.get("spearman"), m.get("rmse"), m.get("r2"),
             m.get("across_donors_pearson_mean"), m.get("low_expressed_pearson"), m.get("coverage_80"))
            for name, m in ranked]


METRICS_HEADER = ("method", "Pearson", "Spearman", "RMSE", "R2", "across-donor Pearson", "low-expressed Pearson",
                  "80% coverage")


def nominal_coverage(methods: dict) -> float:
    """The level the methods' intervals aim at (``head.quantiles``' span, recorded as ``coverage_nominal`` since
    0c3aaba; 80%, the default, before)."""
    return next((m["coverage_nominal"] for m in methods.values() if m.get("coverage_nominal")), 0.8)


def evaluation_sections(metrics: dict, observed: np.ndarray, predictions: dict[str, np.ndarray], gene: np.ndarray,
                        tissue: np.ndarray, min_donors: int, manifest: dict) -> list[Section]:
    """The sections of ``geximpute evaluate``'s report."""
    results = metrics["methods"]
    scale = metrics.get("scale", "log1p")  # the modelling scale (recorded since session 41)
    # the level the intervals were made for (head.quantiles), as report.md reads it
    nominal = nominal_coverage(results)
    header = (*METRICS_HEADER[:-1], f"{nominal:.0%} coverage")
    sections = [
        Section("Metrics", table_html(header, metrics_rows(results)),
                f"{metrics['n_hidden']:,} hidden entries (task {metrics['task']}, fraction {metrics['fraction']}, "
                f"seed {metrics['seed']}); {metrics['n_genes']:,} genes x {metrics['n_samples']:,} samples. Every "
                f"method is scored on exactly these entries, on the modelling scale ({scale})."),
        Section("Observed vs predicted", observed_vs_predicted(
            observed, {n: predictions[n] for n in results if n in predictions},
            {n: r.get("pearson") for n, r in results.items()}, scale), "Counts per hexagon on a log colour scale."),
        Section("Per tissue", per_tissue_bars(results), "Pearson over the hidden entries of each tissue."),
    ]
    coverage = coverage_plot(results, nominal, scale)
    if coverage:
        sections.append(Section("Interval coverage", coverage,
                                f"Share of hidden entries inside each method's {nominal:.0%} interval (the red line "
                                "is the nominal level), and how wide the intervals are."))
    subsets = promoter_subsets_plot(results)
    if subsets:
        sections.append(Section("With and without promoter sequence", subsets,
                                "Genes whose promoter window is known in the genome against the rest: what the "
                                "sequence branch adds where it can act."))
    across = across_individual_plot(across_individual_correlations(predictions, observed, gene, tissue, min_donors))
    if across:
        sections.append(Section("Across individuals", across,
                                f"Pearson across the individuals of each (gene, tissue) with at least {min_donors} "
                                "hidden entries whose values differ (a method the same for all of them counts 0): "
                                "can a method tell people apart, beyond the gene's level?"))
    else:
        sections.append(Section("Across individuals", "<p>No (gene, tissue) has enough hidden individuals for a "
                                "correlation across them (one sample per tissue, or too few hidden donors).</p>"))
    seconds = metrics.get("seconds", {})
    sections.append(Section("Seconds", table_html(("part", "seconds"), list(seconds.items()))))
    skipped = metrics.get("skipped", {})
    if skipped:
        sections.append(Section("Skipped methods", table_html(("method", "why"), list(skipped.items()))))
    sections.append(provenance_section({"evaluate": manifest}))
    return sections

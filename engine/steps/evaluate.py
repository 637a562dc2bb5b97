"""``geximpute evaluate``: hide, prepare, fit every method on visible data, predict the hidden entries, score.

Writes ``metrics.json`` (the stable shape of DESIGN.md), ``report.html`` (one self-contained page with every plot,
:mod:`geximpute.steps.html_report`), ``report.md`` and PNG plots into the output folder.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from geximpute import schema as S
from geximpute.config import Config
from geximpute.errors import ConfigError, InputError
from geximpute.fit.hybrid import fit_hybrid, head_tuned_methods, tuned_baselines
from geximpute.io.checks import check_readable
from geximpute.io.dataset import load_dataset
from geximpute.io.expression import model_scale
from geximpute.io.tables import read_table
from geximpute.runtime.atomic import check_replaceable, staged_output, store_of
from geximpute.runtime.console import stage
from geximpute.runtime.provenance import input_fingerprints, manifest, read_versions, write_json
from geximpute.science.baselines import composition_of, make_methods
from geximpute.science.comparisons import coverage_breakdown, paired_bootstrap, seeds_report, summarise_seeds
from geximpute.science.genomes import gene_variant_flags
from geximpute.science.metrics import METRICS_VERSION, _pearson, across_donor_pairs, score
from geximpute.science.problem import SPLITS, annotated_rows, evaluation_hidden
from geximpute.steps.html_report import evaluation_sections, nominal_coverage, write_report
from geximpute.steps.prepare import Prepared, prepare, promoter_tables

log = logging.getLogger(__name__)


def read_records(prepared: Prepared, *, hidden: bool | None = None) -> pa.Table:
    """Context records of a prepare output, sorted by (gene_index, sample_index); optionally only hidden ones."""
    dataset = pads.dataset(prepared.out_dir / "context", format="parquet",
                           partitioning=S.record_partitioning())
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
    pos = np.minimum(np.searchsorted(key[order], want), max(len(key) - 1, 0))  # a key past the last: no match
    if len(want) != len(truth) or not np.array_equal(key[order][pos], want):
        raise RuntimeError("the hidden records do not match the hidden entries one to one")
    return truth.values[order][pos]


def evaluate(config: Config, out_dir: str | Path, *, force: bool = False) -> dict:
    """Run the evaluation protocol of ``config.evaluation`` and write its outputs to ``out_dir``.

    ``out_dir`` is replaced atomically (:mod:`geximpute.runtime.atomic`); a folder that is not an earlier evaluate
    output is refused unless ``force``.

    Returns:
        the metrics dictionary written to ``metrics.json``.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    # refused before the inputs are read (minutes at GTEx's size), and again where the output is committed
    check_replaceable(out_dir, "evaluate", store_of(out_dir.absolute()), force)
    if config.evaluation.heritability:  # read only at the end: a wrong path would fail after the whole run
        check_readable(config.evaluation.heritability, "evaluation.heritability table")
    with stage("load inputs", unit="steps"):
        dataset = load_dataset(config)
    # fingerprinted as read (an `ingest` may commit another store version meanwhile, and prune this one)
    inputs = input_fingerprints(config, read_versions(dataset))
    with staged_output(out_dir, step="evaluate", force=force) as staging:
        with_hybrid = "hybrid" in config.evaluation.methods
        prepared = prepare(config, staging / "records", dataset=dataset, targets="hidden", training=with_hybrid)
        records = read_records(prepared, hidden=True)
        observed = hidden_values(prepared, records)
        problem = prepared.problem
        composition = promoter_composition_of(prepared, config)
        t = time.perf_counter()
        # with the hybrid, every setting it reads is tuned too, as fit-head tunes them: the hybrid scored here is
        # the one a bundle of these data would serve, whichever comparators evaluation.methods lists
        tuned = head_tuned_methods(config.evaluation.methods) if with_hybrid else config.evaluation.methods
        baselines, tuning = tuned_baselines(config, problem, composition, tuned)
        tuning_seconds = round(time.perf_counter() - t, 2)
        methods, skipped = make_methods(config.evaluation.methods, baselines, len(problem.donors),
                                        has_genomes=problem.genomes is not None, seed=config.seed,
                                        composition=composition, task=config.evaluation.task,
                                        gene_names=problem.gene_names is not None)
        if "hybrid_reference" in config.evaluation.methods and problem.genomes is None:
            skipped["hybrid_reference"] = "the same as hybrid without personal genomes (inputs.variants)"
        if not methods and not with_hybrid and not (
                "hybrid_reference" in config.evaluation.methods and problem.genomes is not None):
            raise ConfigError(
                f"evaluation.methods: none of {list(config.evaluation.methods)} applies to these data ("
                + "; ".join(f"{name}: {why}" for name, why in skipped.items())
                + "): list a method that does, e.g. distance or row_tissue")
        gene = records["gene_index"].to_numpy()
        sample = records["sample_index"].to_numpy()
        tissue = problem.tissue_index[sample]
        donor = problem.donor_index[sample]
        results, predictions, timings = {}, {}, {}
        progress = stage("baselines", total=len(methods), unit="methods")
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
            log.debug(  # the terminal gets the results table at the end; the log file gets each line
                "evaluate: %-18s pearson %.4f  rmse %.4f  (%.1f s)",
                method.name,
                results[method.name]["pearson"] or float("nan"),
                results[method.name]["rmse"],
                timings[method.name],
            )
            progress.advance()
        progress.close()
        if with_hybrid:
            t = time.perf_counter()
            # the head's baseline features use the settings tuned on the visible validation split
            models = fit_hybrid(dataclasses.replace(config, baselines=baselines), staging / "records",
                                problem.gene_ids, len(problem.tissues), staging / "runs",
                                ablations=config.evaluation.ablations, problem=problem)
            with stage("hybrid: predict the hidden entries", total=1, unit="passes") as progress:
                hybrid_predictions = models.predict(records)
                progress.advance()
            for name, (pred, lower, upper) in hybrid_predictions.items():
                pred = np.asarray(pred, dtype=np.float64)
                predictions[name] = pred
                results[name] = score(
                    pred, observed, gene=gene, tissue=tissue, donor=donor, tissue_names=problem.tissues,
                    min_donors=config.evaluation.min_donors,
                )
                if lower is not None:
                    inside = (observed >= lower) & (observed <= upper)
                    # the key keeps its name whatever head.quantiles; coverage_nominal is what the interval aims at
                    results[name]["coverage_80"] = float(inside.mean())
                    results[name]["coverage_nominal"] = config.head.interval_level
                    results[name]["interval_width_mean"] = float(np.mean(upper - lower))
                    results[name]["coverage_80_breakdown"] = coverage_breakdown(observed, lower, upper, tissue,
                                                                                problem.tissues, pred)
                log.debug("evaluate: %-18s pearson %.4f  rmse %.4f", name, results[name]["pearson"] or float("nan"),
                         results[name]["rmse"])
            timings["hybrid"] = round(time.perf_counter() - t, 1)
            timings.update(models.seconds)
        if "hybrid_reference" in config.evaluation.methods and problem.genomes is not None:
            t = time.perf_counter()
            # with the hybrid's tuned settings: the two differ in the genomes alone (the defaults, before)
            pred = _reference_hybrid(dataclasses.replace(config, baselines=baselines), dataset, staging,
                                     records)
            predictions["hybrid_reference"] = pred
            results["hybrid_reference"] = score(
                pred, observed, gene=gene, tissue=tissue, donor=donor, tissue_names=problem.tissues,
                min_donors=config.evaluation.min_donors,
            )
            timings["hybrid_reference"] = round(time.perf_counter() - t, 1)
        with_sequence = promoter_mask(prepared, gene)
        _add_promoter_subsets(results, predictions, observed, gene, with_sequence)
        # the hidden entries of genes on split.test_chroms: no training example, pre-training level or tuning
        # split was cut from those genes (geximpute.science.folds.training_folds)
        on_test = problem.split[gene] == SPLITS.index("test")
        _add_test_subset(results, predictions, observed, gene, on_test)
        comparisons = {"all": paired_bootstrap(predictions, observed, gene, tissue, config.evaluation.task,
                                               min_donors=config.evaluation.min_donors, seed=config.seed)}
        if with_sequence.any() and not with_sequence.all():
            comparisons["with_promoter"] = paired_bootstrap(predictions, observed, gene, tissue,
                                                            config.evaluation.task, mask=with_sequence,
                                                            min_donors=config.evaluation.min_donors,
                                                            seed=config.seed)
        if on_test.any():
            comparisons["test_chroms"] = paired_bootstrap(predictions, observed, gene, tissue, config.evaluation.task,
                                                          mask=on_test, min_donors=config.evaluation.min_donors,
                                                          seed=config.seed)
        flags = None
        if problem.genomes is not None:
            flags = gene_variant_flags(problem.genomes, dataset.variants.sites[S.POS].to_numpy(), problem.tss,
                                       problem.strand, config.promoter.upstream, config.promoter.downstream)
            comparisons.update(genetic_comparisons(config, predictions, observed, gene, tissue, flags,
                                                   gene_ids=problem.gene_ids))
        comparisons = {k: v for k, v in comparisons.items() if v}
        metrics = {
            "dataset": config.name,
            "metrics_version": METRICS_VERSION,
            # what every figure is computed on (RMSE, intervals' widths): the modelling scale
            "scale": model_scale(config.inputs.scale, config.expression),
            "task": config.evaluation.task,
            "seed": config.evaluation.seed,
            "model_seed": config.seed,  # evaluate --seeds s runs with the config's seed + s (seeded_config)
            "fraction": config.evaluation.fraction,
            "n_hidden": int(len(observed)),
            "n_genes": problem.n_genes,
            "n_samples": problem.n_samples,
            "methods": results,
            "skipped": skipped,
            "sequence": sequence_counts(prepared, gene),
            "baselines": {"tuned": config.baselines.tune, "settings": dataclasses.asdict(baselines),
                          "tuning": tuning},
            **({"comparisons": comparisons} if comparisons else {}),
            **({"genetic": genetic_table(config, predictions, observed, gene, tissue, problem.gene_ids, flags)}
               if problem.genomes is not None else {}),
            "seconds": {
                "prepare": round(prepared.seconds, 2),
                "tuning": tuning_seconds,
                **timings,
                "total": round(time.perf_counter() - t0, 2),
            },
        }
        write_json(staging / "metrics.json", metrics)
        made = manifest(config, inputs=inputs, step="evaluate")
        write_json(staging / "_manifest.json", made)
        _write_predictions(staging, records, observed, predictions)
        _plots(staging, observed, predictions, results, metrics["scale"])
        (staging / "report.md").write_text(report(metrics))
        write_report(staging / "report.html", f"geximpute evaluate: {config.name}",
                     f"task {config.evaluation.task}, {metrics['n_hidden']:,} hidden entries",
                     evaluation_sections(metrics, observed, predictions, gene, tissue, config.evaluation.min_donors,
                                         made))
    log.info("evaluate: wrote %s in %.1f s", out_dir, time.perf_counter() - t0)
    return metrics


def seeded_config(config: Config, seed: int) -> Config:
    """``config`` for replicate ``seed`` of :func:`evaluate_seeds`: everything drawn anew, the hidden entries
    (``evaluation.seed`` = ``seed``) and the model's own draws (``seed`` = the config's + ``seed``: the networks'
    start, the training folds, the validation units, the seeded baselines); seed 0 is ``config`` with
    ``evaluation.seed`` 0."""
    return dataclasses.replace(config, seed=config.seed + seed,
                               evaluation=dataclasses.replace(config.evaluation, seed=seed))


def evaluate_seeds(config: Config, out_dir: str | Path, seeds: list[int], *, force: bool = False) -> dict:
    """:func:`evaluate` once per replicate in ``seeds`` (:func:`seeded_config`; each into ``out_dir/seed_<s>``),
    then the mean and spread of every method's figures and the paired comparisons of each seed in
    ``out_dir/summary.json`` and ``summary.md`` (:func:`geximpute.science.comparisons.summarise_seeds`).

    ``out_dir`` is written as one output (:mod:`geximpute.runtime.atomic`, step ``evaluate-seeds``): refused when
    it is not absent, empty or an earlier one of these unless ``force``, committed whole when the last seed is
    done (a failure leaves an earlier output as it was).

    Returns:
        the summary dictionary.

    Raises:
        ConfigError: a seed given twice (its run would count twice in the spread) or below 0.
    """
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated or any(s < 0 for s in seeds) or not seeds:
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: expected distinct integers >= 0"
                          + (f" ({', '.join(map(str, repeated))} given twice)" if repeated else ""))
    out_dir = Path(out_dir)
    force = force or _earlier_seeds_folder(out_dir)
    check_replaceable(out_dir, "evaluate-seeds", store_of(out_dir.absolute()), force)
    with staged_output(out_dir, step="evaluate-seeds", force=force) as staging:
        runs = []
        for seed in seeds:
            runs.append(evaluate(seeded_config(config, seed), staging / f"seed_{seed}"))
        summary = summarise_seeds(runs)
        write_json(staging / "summary.json", summary)
        (staging / "summary.md").write_text(seeds_report(summary))
    return summary


#: what an `evaluate --seeds` folder held before it was one output (a plain folder of the seeds' outputs)
_SEEDS_LAYOUT = re.compile(r"(seed_\d+|\.seed_\d+\.geximpute|summary\.(json|md)|_geximpute\.log)")


def _earlier_seeds_folder(folder: Path) -> bool:
    """``folder`` is a plain folder an earlier `evaluate --seeds` wrote (before its output carried a marker): every
    entry one of its seeds' outputs, their stores, the summary or the log, and at least one seed."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    names = [p.name for p in folder.iterdir()]
    return (any(n.startswith("seed_") for n in names) and all(_SEEDS_LAYOUT.fullmatch(n) for n in names))


def _reference_hybrid(config: Config, dataset, staging: Path, records: pa.Table) -> np.ndarray:
    """The hybrid trained and applied with the reference genome only (personal genomes dropped), on ``records``."""

    reference = dataclasses.replace(dataset, variants=None)
    folder = staging / "records_reference"
    prepared = prepare(config, folder, dataset=reference, targets="hidden", training=True)
    ref_records = read_records(prepared, hidden=True)
    keys = ("gene_index", "sample_index")
    if not all(np.array_equal(ref_records[k].to_numpy(), records[k].to_numpy()) for k in keys):
        raise RuntimeError("the reference-genome records do not match the hidden entries one to one")
    models = fit_hybrid(config, folder, prepared.problem.gene_ids, len(prepared.problem.tissues),
                        staging / "runs_reference", ablations=False, problem=prepared.problem)
    return np.asarray(models.predict(ref_records)["hybrid"][0], dtype=np.float64)


#: the methods of the genotype table of ``metrics.json``, in report order
GENETIC_METHODS = ("hybrid", "hybrid_reference", "elastic_net")


def genetic_comparisons(config: Config, predictions: dict, observed: np.ndarray, gene: np.ndarray,
                        tissue: np.ndarray, flags: tuple[np.ndarray, np.ndarray],
                        gene_ids: np.ndarray | None = None) -> dict:
    """Paired bootstrap over genes of the hybrid against ``elastic_net`` and ``hybrid_reference`` (in the task's
    headline metric: across-donor Pearson for held-out donors), on the genes with a cis variant, split by whether
    one lies in the promoter, and, where the planted truth names each gene's kind of genetic effect
    (``evaluation.heritability`` with a ``genetic_effect`` column, and ``gene_ids`` given), on the genes of each
    kind (``genetic_effect_<kind>``)."""
    n_cis, promoter_variant = flags
    against = [m for m in ("elastic_net", "hybrid_reference") if m in predictions]
    if "hybrid" not in predictions or not against:
        return {}
    subsets = {"genetic_cis_variant": n_cis[gene] > 0,
               "genetic_promoter_variant": promoter_variant[gene],
               "genetic_no_promoter_variant": (n_cis[gene] > 0) & ~promoter_variant[gene]}
    truth = _planted_truth(config.evaluation.heritability)
    if truth is not None and truth[1] and gene_ids is not None:
        kinds = np.array([truth[1].get(str(g), "") for g in gene_ids], dtype=object)
        for kind in sorted(set(kinds.tolist()) - {"", "none"}):
            subsets[f"genetic_effect_{effect_key(kind)}"] = kinds[gene] == kind
    return {name: paired_bootstrap(predictions, observed, gene, tissue, config.evaluation.task, against=against,
                                   mask=mask, min_donors=config.evaluation.min_donors, seed=config.seed)
            for name, mask in subsets.items() if mask.any()}


def genetic_table(config: Config, predictions: dict, observed: np.ndarray, gene: np.ndarray, tissue: np.ndarray,
                  gene_ids: np.ndarray, flags: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Per gene, the Pearson across held-out donors of each genotype method, next to the planted ceiling.

    For each (gene, tissue) pair that ``score``'s across-donor Pearson counts
    (:func:`geximpute.science.metrics.across_donor_pairs`: at least ``max(evaluation.min_donors, 3)`` hidden donors
    whose values differ), the Pearson across those donors; a constant prediction (a model that cannot tell donors
    apart) counts as 0. A gene's figure is the mean over its tissues. With ``evaluation.heritability``, each gene
    also gets ``ceiling = sqrt(h2)`` and the means are given over the genes with ``h2 > 0`` as well; where that
    table has a ``genetic_effect`` column (the kind of planted effect: ``additive``, ``motif_loss``, ...), each gene
    gets it as ``effect`` and the means are given per kind (``mean_effect_<kind>``, ``n_genes_effect_<kind>``). With
    ``flags`` ((G,) cis-site counts, (G,) promoter variant, :func:`geximpute.science.genomes.gene_variant_flags`),
    each gene gets them and the means are given over the genes with a cis variant, with a promoter variant and with
    cis variants but none in the promoter.
    """
    names = [m for m in GENETIC_METHODS if m in predictions]
    per_gene: dict[int, dict[str, list[float]]] = {}
    for m in names:  # the pairs depend on ``observed`` alone: the same pairs, in the same order, for every method
        pair_gene, scores, _ = across_donor_pairs(predictions[m], observed, gene, tissue,
                                                  config.evaluation.min_donors)
        for g, r in zip(pair_gene.tolist(), scores.tolist(), strict=True):
            per_gene.setdefault(int(g), {n: [] for n in names})[m].append(r)
    truth = _planted_truth(config.evaluation.heritability)
    h2, effects = truth if truth is not None else (None, {})
    rows = []
    for g, vals in sorted(per_gene.items()):
        entry = {"gene_id": str(gene_ids[g]), "n_tissues": len(vals[names[0]]) if names else 0}
        if flags is not None:
            entry["n_cis_sites"] = int(flags[0][g])
            entry["promoter_variant"] = bool(flags[1][g])
        entry.update({m: float(np.mean(v)) for m, v in vals.items()})
        if h2 is not None and str(gene_ids[g]) in h2:
            entry["h2"] = h2[str(gene_ids[g])]
            entry["ceiling"] = float(np.sqrt(max(entry["h2"], 0.0)))
        if str(gene_ids[g]) in effects:
            entry["effect"] = effects[str(gene_ids[g])]
        rows.append(entry)

    def means(subset: list[dict]) -> dict:
        out = {m: float(np.mean([r[m] for r in subset])) if subset else None for m in names}
        if subset and all("ceiling" in r for r in subset):
            out["ceiling"] = float(np.mean([r["ceiling"] for r in subset]))
        return out

    table = {"n_genes": len(rows), "mean": means(rows), "per_gene": rows}
    if flags is not None:
        for label, keep in (("cis_variant", lambda r: r["n_cis_sites"] > 0),
                            ("promoter_variant", lambda r: r["promoter_variant"]),
                            ("no_promoter_variant", lambda r: r["n_cis_sites"] > 0 and not r["promoter_variant"])):
            subset = [r for r in rows if keep(r)]
            table[f"n_genes_{label}"] = len(subset)
            table[f"mean_{label}"] = means(subset)
    if h2 is not None:
        heritable = [r for r in rows if r.get("h2", 0.0) > 0]
        table["n_heritable_genes"] = len(heritable)
        table["mean_heritable"] = means(heritable)
    for kind in sorted({r["effect"] for r in rows if "effect" in r} - {"none"}):
        subset = [r for r in rows if r.get("effect") == kind]
        table[f"n_genes_effect_{effect_key(kind)}"] = len(subset)
        table[f"mean_effect_{effect_key(kind)}"] = means(subset)
    return table


def effect_key(kind: str) -> str:
    """A planted effect kind as a key of ``metrics.json`` (``additive+motif_loss`` -> ``additive_and_motif_loss``)."""
    return kind.replace("+", "_and_")


def _planted_truth(path: str | None) -> tuple[dict[str, float], dict[str, str]] | None:
    """``(gene_id -> h2, gene_id -> kind of planted genetic effect)`` of the configured heritability table (the
    second empty without a ``genetic_effect`` column), or None without a table."""
    if path is None:
        return None

    table = read_table(path, "heritability table")
    missing = [c for c in ("gene_id", "h2") if c not in table.column_names]
    if missing:
        raise InputError(path, f"no column {missing[0]!r}", expected="a table with gene_id and h2 columns")
    ids = [str(g) for g in table["gene_id"].to_pylist()]
    h2 = dict(zip(ids, (float(x) for x in table["h2"].to_pylist()), strict=True))
    effects = {}
    if "genetic_effect" in table.column_names:
        effects = dict(zip(ids, (str(k) for k in table["genetic_effect"].to_pylist()), strict=True))
    return h2, effects


def promoter_composition_of(prepared: Prepared, config: Config) -> np.ndarray:
    """(G, F) promoter composition of the problem's genes from the prepare output (NaN rows: no known promoter)."""
    return composition_of(prepared.problem.gene_ids, pq.read_table(prepared.out_dir / "gene_promoters.parquet"),
                          pq.read_table(prepared.out_dir / "promoters.parquet"), config.promoter.upstream)


def promoter_mask(prepared: Prepared, gene: np.ndarray) -> np.ndarray:
    """(N,) bool: the entry's gene has a promoter sequence (a row of the prepare output's gene_promoters)."""
    with_seq = pq.read_table(prepared.out_dir / "gene_promoters.parquet")[S.GENE_ID].to_pylist()
    return np.isin(prepared.problem.gene_ids[gene], np.asarray(sorted(set(with_seq)), dtype=object))


def sequence_summary(dataset) -> dict:
    """For ``inspect``: genes with a known promoter window (the rule of ``prepare``:
    ``promoter.max_unknown_fraction``), of all the annotated expression genes and of the genes with entries in the
    hidden set of ``config.evaluation``. Empty without a genome."""
    if dataset.genome is None:
        return {}
    _, ann_rows = annotated_rows(dataset)
    gene_ids = np.asarray(dataset.genes.table[S.GENE_ID].take(ann_rows).to_pylist(), dtype=object)
    try:  # the hidden set alone: no scaled copy of the values, no tissue correlations
        per_gene = evaluation_hidden(dataset).sum(axis=1)
    except ConfigError:  # a task that does not apply to this dataset: count over all genes only
        per_gene = np.zeros(len(gene_ids), np.int64)
    _, gene_promoters = promoter_tables(dataset, gene_ids)
    has = np.isin(gene_ids, np.asarray(gene_promoters[S.GENE_ID].to_pylist(), dtype=object))
    hidden_genes = np.flatnonzero(per_gene)
    return {"genes": len(gene_ids), "genes_with_sequence": int(has.sum()),
            "task": dataset.config.evaluation.task, "hidden_genes": int(len(hidden_genes)),
            "hidden_genes_with_sequence": int(has[hidden_genes].sum()),
            "hidden_entries_with_sequence": int(per_gene[has].sum()), "hidden_entries": int(per_gene.sum())}


def sequence_counts(prepared: Prepared, gene: np.ndarray) -> dict:
    """How many genes have a promoter sequence: of all the problem's genes, and of the genes with hidden entries."""
    has_gene = promoter_mask(prepared, np.arange(prepared.problem.n_genes))
    hidden_genes = np.unique(gene)
    return {"genes": int(prepared.problem.n_genes), "genes_with_sequence": int(has_gene.sum()),
            "hidden_genes": int(len(hidden_genes)), "hidden_genes_with_sequence": int(has_gene[hidden_genes].sum()),
            "hidden_entries_with_sequence": int(has_gene[gene].sum())}


def _add_promoter_subsets(results: dict, predictions: dict, observed: np.ndarray, gene: np.ndarray,
                          has: np.ndarray) -> None:
    """Scores on the hidden entries of genes with and without a promoter sequence in the genome, per method.

    These subsets show what the sequence branch adds where it can act.
    """
    if not has.any() or has.all():
        return
    for name, pred in predictions.items():
        results[name]["subsets"] = {label: _subset_scores(pred, observed, gene, mask)
                                    for label, mask in (("with_promoter", has), ("without_promoter", ~has))}


def _subset_scores(pred: np.ndarray, observed: np.ndarray, gene: np.ndarray, mask: np.ndarray) -> dict:
    """Entries, genes, Pearson and RMSE of ``pred`` on the ``mask`` hidden entries."""
    x, y = pred[mask], observed[mask]
    return {"n": int(mask.sum()), "genes": int(len(np.unique(gene[mask]))), "pearson": _pearson(x, y),
            "rmse": float(np.sqrt(np.mean((x - y) ** 2)))}


def _add_test_subset(results: dict, predictions: dict, observed: np.ndarray, gene: np.ndarray,
                     on_test: np.ndarray) -> None:
    """Scores on the hidden entries of genes on ``split.test_chroms`` (``results[method]["test_chroms"]``), when
    there are any: genes whose values no network, head or tuning learned from."""
    if not on_test.any():
        return
    for name, pred in predictions.items():
        results[name]["test_chroms"] = _subset_scores(pred, observed, gene, on_test)


def _write_predictions(out: Path, records: pa.Table, observed: np.ndarray, predictions: dict) -> None:
    cols = {name: records[name] for name in (S.GENE_ID, S.SAMPLE_ID, S.DONOR_ID, S.TISSUE, S.CHROM)}
    cols["observed"] = pa.array(observed, pa.float32())
    for name, pred in predictions.items():
        cols[name] = pa.array(pred, pa.float32())
    pq.write_table(pa.table(cols), out / "predictions.parquet")


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def report(metrics: dict) -> str:
    """Markdown report of a metrics dictionary."""
    # the span of head.quantiles the intervals aim at (recorded since 0c3aaba; 80% before, the default)
    nominal = nominal_coverage(metrics["methods"])
    lines = [
        f"# Evaluation: {metrics['dataset']}, task `{metrics['task']}`",
        "",
        f"Hidden entries: {metrics['n_hidden']:,} (fraction {metrics['fraction']}, seed {metrics['seed']}); "
        f"{metrics['n_genes']:,} genes x {metrics['n_samples']:,} samples. All methods are scored on exactly these "
        f"entries, on the modelling scale ({metrics.get('scale', 'log1p')}).",
        "",
        "| method | Pearson | Spearman | RMSE | R2 | across-donor Pearson | low-expressed Pearson | "
        f"{nominal:.0%} coverage |",
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
    tested = {n: m["test_chroms"] for n, m in ranked if "test_chroms" in m}
    if tested:
        first = next(iter(tested.values()))
        lines += [
            "",
            f"On the test chromosomes (`split.test_chroms`; no training example, pre-training level or tuning split "
            f"came from their genes): {first['genes']} hidden genes, {first['n']:,} entries.",
            "",
            "| method | Pearson on test chromosomes | RMSE on test chromosomes |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {_fmt(t['pearson'])} | {_fmt(t['rmse'])} |" for name, t in tested.items()]
    genetic = metrics.get("genetic")
    if genetic and genetic["n_genes"]:
        names = [m for m in GENETIC_METHODS if m in genetic["mean"]]
        lines += [
            "",
            f"## Across held-out donors, per gene ({genetic['n_genes']} genes)",
            "",
            "Pearson across the hidden donors of each (gene, tissue), averaged over the gene's tissues, then over "
            "the genes (each gene weighs the same; the methods table and the paired intervals weigh each (gene, "
            "tissue) pair the same, which differs where genes have different numbers of tissues); a model that "
            "predicts every donor alike scores 0.",
            "",
            "| genes | " + " | ".join(names) + (" | ceiling sqrt(h2) |" if "ceiling" in genetic["mean"] else " |"),
            "|---|" + "---|" * (len(names) + ("ceiling" in genetic["mean"])),
        ]
        planted = [(f"planted effect: {key.removeprefix('mean_effect_').replace('_and_', ' + ')}", key)
                   for key in sorted(genetic) if key.startswith("mean_effect_")]
        for label, key in (("all", "mean"), ("h2 > 0", "mean_heritable"), ("a cis variant", "mean_cis_variant"),
                           ("a promoter variant", "mean_promoter_variant"),
                           ("cis variants, none in the promoter", "mean_no_promoter_variant"), *planted):
            if key in genetic and genetic[key].get(names[0] if names else "") is not None:
                row = genetic[key]
                cells = [_fmt(row.get(m)) for m in names] + ([_fmt(row.get("ceiling"))] if "ceiling" in row else [])
                n = {"mean": genetic["n_genes"], "mean_heritable": genetic.get("n_heritable_genes")}.get(
                    key, genetic.get("n_genes_" + key.removeprefix("mean_")))
                lines.append(f"| {label} ({n}) | " + " | ".join(cells) + " |")
    lines += _honest_sections(metrics)
    for name, why in metrics.get("skipped", {}).items():
        lines.append(f"\n`{name}` skipped: {why}.")
    lines += ["", "![predicted vs observed](pred_vs_obs.png)", "", "![per tissue](per_tissue.png)", ""]
    return "\n".join(lines)


def _honest_sections(metrics: dict) -> list[str]:
    """Report lines: sequence counts, the baselines' tuned settings, paired bootstrap intervals, interval coverage."""
    lines = []
    seq = metrics.get("sequence")
    if seq:
        lines += ["", f"Genes with a promoter sequence: {seq['genes_with_sequence']:,} of {seq['genes']:,}; among the "
                  f"hidden genes {seq['hidden_genes_with_sequence']:,} of {seq['hidden_genes']:,} "
                  f"({seq['hidden_entries_with_sequence']:,} hidden entries)."]
    tuning = metrics.get("baselines", {}).get("tuning")
    if tuning:
        lines += ["", "Baseline settings chosen on a validation split of the visible data (never the hidden entries):",
                  ""]
        for name, row in tuning.items():
            chosen = ", ".join(f"{k} {v}" for k, v in row["chosen"].items())
            lines.append(f"- `{name}`: {chosen} (best validation {row['metric']} {row['score']:.4f}, RMSE "
                         f"{row['rmse']:.4f}; {row['n_validation']:,} entries, {len(row['grid'])} candidates)")
    for scope, comp in metrics.get("comparisons", {}).items():
        lines += ["", f"Paired bootstrap over {comp['n_genes']:,} genes ({scope} hidden entries, {comp['n_boot']} "
                  f"resamples): hybrid minus other in {comp['metric']} "
                  f"({'higher' if comp['higher_is_better'] else 'lower'} is better); best other: "
                  f"`{comp['best_other']}`.", "",
                  "| other | hybrid | other | difference | 95% interval | hybrid better |", "|---|---|---|---|---|---|"]
        for other, c in comp["comparisons"].items():
            ci = "n/a" if c["ci95"][0] is None else f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
            lines.append(f"| {other} | {_fmt(c['reference'])} | {_fmt(c['other'])} | {c['difference']:+.4f} | {ci} "
                         f"| {'yes' if c['reference_better'] else 'no'} |")
    for name, m in metrics["methods"].items():
        cov = m.get("coverage_80_breakdown")
        if not cov:
            continue
        quart, by_estimate = (", ".join(f"Q{q['quartile']} {_fmt(q['coverage'], 3)}" for q in cov.get(key, []))
                              for key in ("by_quartile", "by_estimate_quartile"))
        tissues = [v["coverage"] for v in cov["by_tissue"].values()]
        nominal = m.get("coverage_nominal") or 0.8
        lines += ["", f"`{name}` {nominal:.0%} interval coverage {cov['overall']:.3f}; by quartile of the hidden "
                  f"value: {quart}; "
                  + (f"by quartile of the estimate: {by_estimate}; " if by_estimate else "")
                  + f"by tissue {min(tissues):.3f} to {max(tissues):.3f} over {len(tissues)} tissues."]
    return lines


def _plots(out: Path, observed: np.ndarray, predictions: dict, results: dict, scale: str = "log1p") -> None:
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
        ax.set_xlabel(f"observed ({scale})")
        ax.set_ylabel(f"predicted ({scale})")
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

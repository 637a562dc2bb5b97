"""The evaluation protocol: hidden sets, records through Ray Data, baselines, metrics, and no leakage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from helpers import TINY

from geximpute.config import load_config
from geximpute.io.dataset import load_dataset, summarise
from geximpute.science.baselines import make_methods
from geximpute.science.context import ContextIndex, build_context
from geximpute.science.problem import make_problem
from geximpute.steps.evaluate import evaluate
from geximpute.steps.prepare import prepare, target_masks

TASKS = ("entries", "genes", "samples")


BASELINES = "evaluation.methods=[distance, row_tissue, matrix_completion, tissue_donor]"


def config_for(synth_small, tmp_path, *overrides):
    return load_config(synth_small / "config.yaml", [f"output_dir={tmp_path}", BASELINES, *overrides])


@pytest.mark.parametrize("task", TASKS)
def test_hidden_sets_follow_the_task(synth_small, task):
    config = load_config(synth_small / "config.yaml", [f"evaluation.task={task}", "evaluation.fraction=0.2"])
    dataset = load_dataset(config)
    problem, truth = make_problem(dataset)
    hidden = np.zeros(problem.values.shape, dtype=bool)
    hidden[truth.gene_index, truth.sample_index] = True
    assert len(truth) > 0
    assert np.isnan(problem.values[hidden]).all()  # hidden values are gone from what methods see
    assert not np.isnan(truth.values).any()  # only measured entries are hidden
    if task == "genes":
        rows = np.unique(truth.gene_index)
        assert np.isnan(problem.values[rows]).all()
        assert len(rows) == round(0.2 * problem.n_genes)
    if task == "samples":
        cols = np.unique(truth.sample_index)
        assert np.isnan(problem.values[:, cols]).all()
        assert len(cols) == round(0.2 * problem.n_samples)


def test_gene_symbols_come_from_the_annotation_else_the_expression_file(synth_small):
    import dataclasses

    dataset = load_dataset(load_config(synth_small / "config.yaml"))
    problem, _ = make_problem(dataset, hidden_mask=False, genomes=False)
    assert problem.gene_names is not None and all(str(n).startswith("SYN") for n in problem.gene_names)
    assert summarise(dataset)["genes"]["joined_with_symbol"] == problem.n_genes  # what `inspect` shows
    # a genes table without symbols: the expression file's symbol column fills them, row for row
    genes = dataset.genes.table
    unnamed = genes.set_column(genes.schema.get_field_index("gene_name"), "gene_name",
                               pa.nulls(genes.num_rows, pa.string()))
    expression = dataclasses.replace(dataset.expression,
                                     gene_names=[f"X{g}" for g in dataset.expression.gene_ids])
    other = dataclasses.replace(dataset, genes=dataclasses.replace(dataset.genes, table=unnamed),
                                expression=expression)
    problem, _ = make_problem(other, hidden_mask=False, genomes=False)
    assert list(problem.gene_names) == [f"X{g}" for g in problem.gene_ids]
    assert summarise(other)["genes"]["joined_with_symbol"] == problem.n_genes
    # SYN1, SYN2, ... share no family; X followed by a gene id shares its letters and number with no other gene
    assert summarise(dataset)["genes"]["shared_families"] == summarise(other)["genes"]["shared_families"] == 0
    paired = dataclasses.replace(expression, gene_names=[f"KRT{i // 2}A" for i in range(len(expression.gene_ids))])
    report = summarise(dataclasses.replace(other, expression=paired))["genes"]
    assert report["shared_families"] == problem.n_genes // 2 and report["joined_in_shared_family"] == problem.n_genes
    # neither: no symbols at all
    bare = dataclasses.replace(other, expression=dataclasses.replace(expression, gene_names=None))
    assert make_problem(bare, hidden_mask=False, genomes=False)[0].gene_names is None
    assert summarise(bare)["genes"]["joined_with_symbol"] == 0


def test_records_carry_the_family_level_where_symbols_form_families_on_the_genes_task(synth_small):
    import dataclasses

    from geximpute.steps.prepare import family_input

    problem, _ = make_problem(load_dataset(load_config(synth_small / "config.yaml")), hidden_mask=False,
                              genomes=False)
    families = dataclasses.replace(problem, gene_names=np.array([f"RPL{i % 7}A{i}" for i in range(problem.n_genes)],
                                                                dtype=object))
    unnamed = dataclasses.replace(problem, gene_names=None)

    def carried(mode, task, p):
        return family_input(load_config(synth_small / "config.yaml", [f"context.family={mode}",
                                                                      f"evaluation.task={task}"]), p)

    assert carried("null", "genes", families)
    assert not carried("null", "genes", problem)  # SYN1, SYN2, ...: no two genes share a family
    assert not carried("null", "entries", families)
    assert carried("true", "entries", problem) and carried("true", "samples", families)
    assert not carried("true", "genes", unnamed) and not carried("false", "genes", families)


@pytest.mark.parametrize("task", TASKS)
def test_genes_of_the_test_chromosomes_never_label_a_training_example(synth_small, task):
    from geximpute.fit.hybrid import pretrain_levels
    from geximpute.io.matrixfile import measured
    from geximpute.science.folds import trainable, training_folds
    from geximpute.science.problem import SPLITS

    config = load_config(synth_small / "config.yaml", [f"evaluation.task={task}", "split.test_chroms=[chr2]"])
    problem, _ = make_problem(load_dataset(config), genomes=False)
    test_gene = problem.split == SPLITS.index("test")
    assert 0 < test_gene.sum() < problem.n_genes and set(problem.chroms[test_gene]) == {"chr2"}
    folds = training_folds(problem, task, 2, 0.25, seed=0)
    assert all(trainable(problem, mask).any() and not trainable(problem, mask)[test_gene].any() for mask in folds)
    if task == "samples":
        # a held-out sample is hidden whole, as the evaluation hides it: its test genes too (left visible they gave
        # its other genes same-sample context a hidden sample never has)
        for mask in folds:
            held = mask.any(axis=0)
            assert np.array_equal(mask[:, held], measured(problem.values)[:, held])
    else:
        assert not any(mask[test_gene].any() for mask in folds)
    level, _ = pretrain_levels(config, problem, [0])
    assert np.isnan(level[test_gene]).all() and np.isfinite(level[~test_gene]).any()
    # without test chromosomes the folds are cut as before: the exclusion changes nothing else
    plain = load_config(synth_small / "config.yaml", [f"evaluation.task={task}"])
    unmarked, _ = make_problem(load_dataset(plain), genomes=False)
    again = training_folds(unmarked, task, 2, 0.25, seed=0)
    assert any(mask[test_gene].any() for mask in again)


def test_a_held_out_chromosome_without_genes_is_named(synth_small, tmp_path):
    """``split.test_chroms`` or ``valid_chroms`` naming no chromosome of the problem (a typo, or ``chr1,chr2`` read
    as one name) trained on everything and dropped the held-out scores, unsaid: prepare (the folds and the
    evaluation) refuses it before anything runs; imputation, which only carries the split, runs on."""
    from geximpute.errors import ConfigError
    from geximpute.steps.prepare import prepare

    for override, needle in (("split.test_chroms=[chr9]", r"split.test_chroms.*'chr9'"),
                             ("split.valid_chroms=chr1,chr2", r"split.valid_chroms.*'chr1,chr2'.*as a list")):
        config = load_config(synth_small / "config.yaml", [override, f"output_dir={tmp_path}"])
        with pytest.raises(ConfigError, match=needle):
            prepare(config, tmp_path / "records", training=True)
        assert not (tmp_path / "records").exists()
        problem, _ = make_problem(load_dataset(config), hidden_mask=False, genomes=False)
        assert not problem.split.any()


def features_and_predictions(dataset):
    problem, truth = make_problem(dataset)
    targets, hidden = target_masks(problem, truth, "all")
    gi, si = np.nonzero(targets)
    records = build_context(ContextIndex(problem), gi, si, hidden[gi, si], 8)
    hidden_records = records.filter(records["hidden"])
    methods, _ = make_methods(dataset.config.evaluation.methods, dataset.config.baselines, len(problem.donors))
    from geximpute.science.baselines import family_levels
    from geximpute.science.folds import fold_problem, training_folds

    # the hybrid's training examples: folds re-hidden from the visible problem, labelled with visible values; and
    # each record's family level, as prepare's records carry it for the networks (the whole problem's for its
    # targets, each training fold's from the fold problem)
    family = [family_levels(problem).level(gi, si, 3.0)]
    for inner in training_folds(problem, dataset.config.evaluation.task, 2, 0.25, seed=0):
        fi, fs = np.nonzero(inner)
        fold = build_context(ContextIndex(fold_problem(problem, inner)), fi, fs, np.ones(len(fi), bool), 8)
        records = pa.concat_tables([records, fold])
        family.append(family_levels(fold_problem(problem, inner)).level(fi, fs, 3.0))
    preds = {"family_level": np.concatenate(family)}
    for m in methods:
        m.fit(problem)
        preds[m.name] = m.predict(hidden_records)
    # the strong baselines, their out-of-fold estimates for training units and their tuning
    from geximpute.science.baselines import ENTRY_METHODS, out_of_fold_estimates, tune_settings

    strong = ("pairwise_regression", "iterative_ridge", "tensor_factorisation", "matrix_completion", "gene_family")
    tuned, choice = tune_settings(problem, strong, dataset.config.baselines, dataset.config.evaluation.task, seed=0)
    strong_methods, _ = make_methods(strong, tuned, len(problem.donors), gene_names=problem.gene_names is not None)
    assert "gene_family" in {m.name for m in strong_methods}  # the synthetic genes have symbols
    for m in strong_methods:
        m.fit(problem)
        preds[m.name] = m.predict(hidden_records)
    folds = training_folds(problem, dataset.config.evaluation.task, 2, 0.25, seed=0)
    for name, grid in out_of_fold_estimates(problem, folds, ENTRY_METHODS, tuned).items():
        preds[f"oof_{name}"] = grid
    preds["visible_values"] = problem.values
    preds["tuning"] = np.array([v["rmse"] for v in choice.values()])
    return records, preds, truth


SCALES = {
    "tpm": [],
    "counts_cpm": ["inputs.scale=counts", "expression.counts_normalisation=cpm"],
    "counts_median_ratio": ["inputs.scale=counts", "expression.counts_normalisation=median_ratio"],
}


@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("task", TASKS)
def test_no_hidden_value_reaches_any_feature_or_prediction(synth_small, task, scale):
    """Change every hidden value of the raw input; no feature, visible value, tuning score or prediction of any
    method may move. On counts, this holds only if normalisation is computed after hiding, from visible counts."""
    config = load_config(synth_small / "config.yaml",
                         [f"evaluation.task={task}", "evaluation.fraction=0.2", BASELINES, *SCALES[scale]])
    dataset = load_dataset(config)
    records, preds, truth = features_and_predictions(dataset)

    # change every hidden value (in the raw input matrix) and build everything again
    from geximpute.science.problem import model_matrix

    _, rows = model_matrix(dataset)
    expr_row = {g: i for i, g in enumerate(dataset.expression.gene_ids)}
    ann_ids = dataset.genes.table["gene_id"].to_pylist()
    raw = dataset.expression.values
    rng = np.random.default_rng(99)
    for g, s in zip(truth.gene_index, truth.sample_index, strict=True):
        raw[expr_row[ann_ids[rows[g]]], s] = rng.uniform(0, 5000)
    records2, preds2, truth2 = features_and_predictions(dataset)

    assert not np.allclose(truth.values, truth2.values)  # the hidden values really changed
    assert records.equals(records2)
    assert preds.keys() == preds2.keys() and len(preds) >= 3
    for name in preds:
        np.testing.assert_array_equal(preds[name], preds2[name], err_msg=name)
    assert len([n for n in preds if n.startswith("oof_")]) >= 4


@pytest.mark.parametrize("scale", ["counts_cpm", "counts_median_ratio"])
@pytest.mark.parametrize("task", TASKS)
def test_a_training_folds_counts_move_nothing_its_records_read(synth_small, task, scale):
    """A training fold is normalised again without its own entries: change every count of fold 0 in the raw input
    and the fold problem's values (what its records, out-of-fold estimates and tuning read) do not move; before,
    count normalisation was computed once with the fold's counts in it, so they shifted their samples' other values.
    A fold's scale is the whole problem's where the fold removes nothing of a sample."""
    from geximpute.science.folds import fold_problem, training_folds
    from geximpute.science.problem import model_matrix

    config = load_config(synth_small / "config.yaml", [f"evaluation.task={task}", "evaluation.fraction=0.2",
                                                       *SCALES[scale]])
    dataset = load_dataset(config)

    def fold_values(ds):
        problem, _ = make_problem(ds)
        masks = training_folds(problem, task, 2, 0.25, seed=0)
        return problem, masks[0], fold_problem(problem, masks[0]).values

    problem, mask, before = fold_values(dataset)
    assert problem.scaling is not None and problem.scaling.method == scale.removeprefix("counts_")
    _, rows = model_matrix(dataset)
    expr_row = {g: i for i, g in enumerate(dataset.expression.gene_ids)}
    ann_ids = dataset.genes.table["gene_id"].to_pylist()
    raw = dataset.expression.values
    rng = np.random.default_rng(5)
    gi, si = np.nonzero(mask)
    raw[[expr_row[ann_ids[rows[g]]] for g in gi], si] = rng.uniform(0, 50_000, len(gi))
    problem2, mask2, after = fold_values(dataset)
    np.testing.assert_array_equal(mask, mask2)
    assert not np.allclose(problem.values, problem2.values, equal_nan=True)  # the outer problem did move
    # the same values but for the float32 round trip of counts (fold counts of 50,000 against samples' totals of a
    # few thousand in this test; before, they moved by up to several units of log1p)
    np.testing.assert_allclose(after, before, rtol=1e-3, atol=1e-4, equal_nan=True)
    # a fold that hides nothing changes no value
    np.testing.assert_allclose(fold_problem(problem, np.zeros_like(mask)).values, problem.values, rtol=1e-6,
                               atol=1e-6, equal_nan=True)
    # the fold's labels share its features' scale: outside the fold they are the fold problem's values (the outer
    # values, labels before, sat on the scale that counted the fold's own counts)
    from geximpute.science.folds import fold_labels

    fold = fold_problem(problem2, mask2)
    labels = fold_labels(problem2, fold)
    np.testing.assert_allclose(np.where(mask2, np.nan, labels), fold.values, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert np.isfinite(labels[mask2]).all()
    # ... and at the fold's entries they are the raw counts normalised from the visible entries outside the fold, as
    # the evaluation normalises its hidden entries (checked from the raw input, independently of the engine's path)
    from geximpute.io.expression import size_factors
    from geximpute.science.problem import annotated_rows

    rows, _ = annotated_rows(dataset)
    counts = dataset.expression.values.astype(np.float64)
    outside = ~np.isnan(counts)
    outside[rows] &= ~np.isnan(problem2.values) & ~mask2  # the evaluation's hidden entries and the fold's out
    method = problem2.scaling.method
    expected = size_factors(counts, method, outside)
    if method == "cpm":  # a sample with nothing left outside the fold keeps its factor (its own total)
        left = (~np.isnan(problem2.values) & ~mask2).any(axis=0)
        expected = np.where(left, expected, problem2.scaling.factors)
    truth = np.log1p(counts[rows] / expected[None, :])
    np.testing.assert_allclose(labels[mask2], truth[mask2], rtol=1e-4, atol=1e-4)


def test_a_folds_factors_are_computed_once_per_fold_content(synth_small, monkeypatch):
    """prepare and the out-of-fold baselines fold the same problem with equal masks (different arrays): the fold's
    factors are computed once; another fold, or another problem, is computed anew; callers get copies."""
    from geximpute.io import expression as ex
    from geximpute.science.folds import training_folds

    config = load_config(synth_small / "config.yaml", ["evaluation.task=entries", "inputs.scale=counts",
                                                       "expression.counts_normalisation=median_ratio"])
    problem, _ = make_problem(load_dataset(config, with_variants=False))
    masks = training_folds(problem, "entries", 2, 0.25, seed=0)
    computed = []
    real = ex._fold_factors
    monkeypatch.setattr(ex, "_fold_factors", lambda *a: computed.append(1) or real(*a))
    first = ex.fold_factors(problem.scaling, problem.values, masks[0])
    first[:] = -1.0  # a caller's copy: the cache is not written through
    again = ex.fold_factors(problem.scaling, problem.values, masks[0].copy())
    assert len(computed) == 1 and (again > 0).all()
    np.testing.assert_array_equal(again, real(problem.scaling, problem.values, masks[0]))
    other = ex.fold_factors(problem.scaling, problem.values, masks[1])
    assert len(computed) == 2 and not np.allclose(other, again)
    ex.fold_factors(problem.scaling, problem.values.copy(), masks[0])  # another matrix, equal values
    assert len(computed) == 3


def test_a_training_folds_records_are_labelled_on_the_folds_scale(synth_small, tmp_path, monkeypatch):
    """prepare hands the shards of a training fold its labels on the fold's scale (counts: its own factors), not the
    outer values (the shards are captured before any Ray work)."""
    import geximpute.steps.prepare as prep
    from geximpute.science.folds import fold_labels, fold_problem, training_folds

    config = load_config(synth_small / "config.yaml", ["evaluation.task=entries", "inputs.scale=counts",
                                                       "expression.counts_normalisation=median_ratio"])
    problem, _ = make_problem(load_dataset(config, with_variants=False))
    mask = training_folds(problem, "entries", 2, 0.25, seed=0)[0]
    seen = {}

    class Captured(Exception):
        pass

    def capture(config, fold, targets, hidden, folder, labels, family=None):
        seen["labels"] = labels
        raise Captured

    monkeypatch.setattr(prep, "context_shards", capture)
    for given in (problem.values, None):  # the problem's own values, given or by default
        part = prep.RecordPart(problem, mask, mask, tmp_path / "train" / "fold=0", labels=given, fold=mask)
        with pytest.raises(Captured):
            prep.write_record_parts(config, [part])
        expected = fold_labels(problem, fold_problem(problem, mask))
        np.testing.assert_allclose(seen["labels"][mask], expected[mask], rtol=1e-6, atol=1e-6)
        assert not np.allclose(seen["labels"][mask], problem.values[mask], atol=1e-3)  # not the outer scale


def test_a_sample_hidden_whole_is_scaled_by_its_own_counts_whatever_the_annotation(synth_small, tmp_path):
    """The evaluation's whole samples (task samples) are normalised by their own counts, every row's: with genes of
    the input missing from the annotation, their unannotated rows alone were "visible", and set the hidden truth's
    scale (1.2 log1p above its own-total CPM on average in a review's check)."""
    import shutil

    from geximpute.io.expression import size_factors
    from geximpute.science.problem import annotated_rows

    data = tmp_path / "data"
    shutil.copytree(synth_small, data)
    gtf = (data / "genes.gtf").read_text().splitlines()
    genes = sorted({line.split('gene_id "')[1].split('"')[0] for line in gtf if 'gene_id "' in line})
    dropped = set(genes[::3])
    (data / "genes.gtf").write_text("\n".join(line for line in gtf if not any(f'gene_id "{g}"' in line
                                                                            for g in dropped)) + "\n")
    config = load_config(data / "config.yaml", ["evaluation.task=samples", "evaluation.fraction=0.2",
                                                "inputs.scale=counts", "expression.counts_normalisation=cpm"])
    dataset = load_dataset(config, with_variants=False)
    counts = dataset.expression.values.astype(np.float64)
    rows, _ = annotated_rows(dataset)
    assert len(rows) < counts.shape[0]  # some input genes are not annotated
    _, truth = make_problem(dataset, genomes=False)
    own = np.log1p(counts[rows] / size_factors(counts, "cpm")[None, :])  # each sample by its own total
    np.testing.assert_allclose(truth.values, own[truth.gene_index, truth.sample_index], rtol=1e-5, atol=1e-5)


def test_prepare_writes_records_partitioned_by_chromosome(ray_local, synth_small, tmp_path):
    config = config_for(synth_small, tmp_path, "evaluation.task=entries")
    result = prepare(config, tmp_path / "records")
    parts = sorted(p.name for p in (tmp_path / "records" / "context").iterdir())
    assert parts == ["chrom=chr1", "chrom=chr2"]
    table = pads.dataset(tmp_path / "records" / "context", partitioning="hive").to_table()
    assert table.num_rows == result.n_records
    # prepare read the inputs itself: its matrix was kept in a file of its own, gone now; the records are those
    # of the in-memory problem's entries
    assert result.problem is None and not list(tmp_path.glob(".records.matrix-*"))
    problem, truth = make_problem(load_dataset(config))
    targets, _ = target_masks(problem, truth, "all")
    assert result.n_records == int(targets.sum())
    np.testing.assert_array_equal(result.truth.values, truth.values)
    keys = table["gene_index"].to_numpy().astype(np.int64) * 10_000 + table["sample_index"].to_numpy()
    assert len(np.unique(keys)) == len(keys)  # every entry exactly once
    assert int(table["hidden"].to_numpy().sum()) == len(result.truth)
    assert table.filter(table["hidden"])["target"].null_count == len(result.truth)
    manifest = json.loads((tmp_path / "records" / "_manifest.json").read_text())
    assert manifest["rows"]["context"] == result.n_records
    assert manifest["config"]["evaluation"]["task"] == "entries"
    # one promoter row per unique sequence
    import pyarrow.parquet as pq

    promoters = pq.read_table(tmp_path / "records" / "promoters.parquet")
    assert len(set(promoters["sequence"].to_pylist())) == promoters.num_rows > 0
    assert not list(tmp_path.glob(".records.staging-*"))


def test_evaluate_writes_metrics_report_and_plots(ray_local, synth_small, tmp_path):
    config = config_for(
        synth_small,
        tmp_path,
        "evaluation.task=samples",
        "evaluation.fraction=0.25",
        "evaluation.min_donors=3",
        "split.test_chroms=[chr2]",
    )
    metrics = evaluate(config, tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["methods"].keys() == metrics["methods"].keys()
    assert set(saved) >= {"dataset", "task", "seed", "n_hidden", "methods"}
    assert set(saved["methods"]) == {"distance", "row_tissue", "matrix_completion", "tissue_donor"}
    for name, m in saved["methods"].items():
        assert m["n"] == saved["n_hidden"], name
        assert set(m) >= {
            "pearson",
            "spearman",
            "rmse",
            "r2",
            "per_tissue",
            "across_donors_pearson_mean",
            "low_expressed_pearson",
        }
        assert sum(t["n"] for t in m["per_tissue"].values()) == saved["n_hidden"]
    # every tunable setting was chosen on a validation split of the visible data and written down
    assert set(saved["baselines"]["tuning"]) == {"distance", "matrix_completion", "tissue_donor"}
    for row in saved["baselines"]["tuning"].values():
        assert row["chosen"].items() <= saved["baselines"]["settings"].items()
    assert saved["sequence"]["genes_with_sequence"] == saved["sequence"]["genes"]  # synthetic: every gene has one
    # the planted donor effects make the donor's other tissues informative
    td, rt = saved["methods"]["tissue_donor"], saved["methods"]["row_tissue"]
    assert td["rmse"] < rt["rmse"]
    assert td["across_donors_pearson_mean"] > 0.1
    # the hidden entries of the test chromosome's genes, scored apart
    on_test = saved["methods"]["row_tissue"]["test_chroms"]
    assert 0 < on_test["n"] < saved["n_hidden"] and on_test["genes"] > 0
    assert all(m["test_chroms"]["n"] == on_test["n"] for m in saved["methods"].values())
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| tissue_donor |" in report and "samples" in report
    assert "On the test chromosomes" in report
    for png in ("pred_vs_obs.png", "per_tissue.png"):
        assert (tmp_path / "eval" / png).read_bytes()[:4] == b"\x89PNG"


def test_same_seed_same_results_other_seed_other_results(ray_local, synth_small, tmp_path):
    a = evaluate(config_for(synth_small, tmp_path, "evaluation.seed=1"), tmp_path / "a")
    b = evaluate(config_for(synth_small, tmp_path, "evaluation.seed=1"), tmp_path / "b")
    c = evaluate(config_for(synth_small, tmp_path, "evaluation.seed=2"), tmp_path / "c")
    assert a["methods"] == b["methods"]
    assert a["methods"]["distance"]["pearson"] != c["methods"]["distance"]["pearson"]


#: the hybrid evaluations' settings: the tiny network on held-out samples of the planted synthetic data
HYBRID_SAMPLES = [*TINY, "evaluation.task=samples", "evaluation.fraction=0.25", "evaluation.min_donors=3"]


def test_evaluate_with_the_cross_fitted_hybrid(ray_local, synth_small, tmp_path):
    """The default suite's hybrid evaluation: two fold networks (one epoch each) and the stacked head, no ablations
    (those train two more networks and a head: the slow test below); the records carry the family level
    (``context.family=true``: the synthetic symbols form no family, where the default would skip it) and the
    networks read it."""
    config = load_config(
        synth_small / "config.yaml",
        [f"output_dir={tmp_path}", *HYBRID_SAMPLES, "evaluation.ablations=false", "train.epochs=1",
         "context.family=true", "evaluation.methods=[row_tissue, tissue_donor, pairwise_regression, hybrid]"],
    )
    metrics = evaluate(config, tmp_path / "eval")
    methods = metrics["methods"]
    assert {"hybrid", "hybrid_network", "tissue_donor", "row_tissue"} <= set(methods)
    # the settings the hybrid reads are tuned as fit-head tunes them, whichever comparators are listed: those of
    # its engineered features (distance) and of its stacked baselines (iterative_ridge), scored or not
    assert "distance" not in methods
    assert {"distance", "tissue_donor", "iterative_ridge", "pairwise_regression"} <= set(metrics["baselines"]["tuning"])
    assert not {"cnn_only", "transformer_only", "xgb_features_only"} & set(methods)
    assert methods["hybrid"]["n"] == metrics["n_hidden"]
    # hidden samples: the donor's other tissues (planted donor effects) beat the gene's mean in the tissue, and the
    # hybrid's head sees them through the baselines' out-of-fold estimates
    assert methods["hybrid"]["rmse"] < methods["row_tissue"]["rmse"], methods
    assert methods["hybrid"]["pearson"] > 0.5
    assert 0.5 < methods["hybrid"]["coverage_80"] <= 1.0
    # Ray Train runs and checkpoints are kept with the evaluation: the fold networks'; the head's table is under
    # head.ray_min_rows, so it was boosted in the driver without an XGBoostTrainer run
    runs = {p.name for p in (tmp_path / "eval" / "runs").iterdir()}
    assert "hybrid_folds" in runs and "head_hybrid" not in runs, runs
    assert "| hybrid |" in (tmp_path / "eval" / "report.md").read_text()
    # the training and hidden records carry the family level, and each fold network's query reads it
    import torch

    from geximpute import schema as S
    from geximpute.model.network import FAMILY_SCALARS, GENE_SCALARS

    for part in ("train", "context"):
        table = pads.dataset(tmp_path / "eval" / "records" / part, format="parquet", partitioning="hive").to_table()
        assert table[S.FAMILY_LEVEL].null_count < table.num_rows, part
    # a samples fold's records have no neighbour: the fold networks learned nothing of them, and hide them at
    # prediction (FeatureSpec.absent)
    from geximpute.fit.train import absent_groups

    assert absent_groups([tmp_path / "eval" / "records" / "train" / "fold=0"]) == ("neighbours",)
    state = torch.load(sorted((tmp_path / "eval" / "runs" / "hybrid_folds").glob("checkpoint_*/state.pt"))[-1],
                       weights_only=False)
    assert len(state["networks"]) == 2
    for network in state["networks"].values():
        assert network["model"]["gene_proj.weight"].shape[1] == len(GENE_SCALARS) + len(FAMILY_SCALARS)


@pytest.mark.slow
def test_evaluate_with_the_hybrid_and_its_ablations(ray_local, synth_small, tmp_path):
    config = load_config(
        synth_small / "config.yaml",
        [f"output_dir={tmp_path}", *HYBRID_SAMPLES],
    )
    metrics = evaluate(config, tmp_path / "eval")
    methods = metrics["methods"]
    assert {"hybrid", "cnn_only", "transformer_only", "xgb_features_only", "tissue_donor", "row_tissue"} <= set(methods)
    for name in ("hybrid", "cnn_only", "transformer_only", "xgb_features_only"):
        assert methods[name]["n"] == metrics["n_hidden"]
    # hidden samples: the donor's other tissues (planted donor effects) beat the gene's mean in the tissue, and the
    # hybrid's head sees them; the networks alone, two tiny epochs, must at least follow the genes' levels
    rmse = {name: m["rmse"] for name, m in methods.items()}
    assert rmse["hybrid"] < rmse["row_tissue"], rmse
    assert rmse["xgb_features_only"] < rmse["row_tissue"], rmse
    for name in ("hybrid", "cnn_only", "transformer_only", "xgb_features_only"):
        assert methods[name]["pearson"] > 0.5, (name, methods[name]["pearson"])
    assert 0.5 < methods["hybrid"]["coverage_80"] <= 1.0
    assert methods["hybrid"]["coverage_nominal"] == pytest.approx(0.8)  # head.quantiles (0.1, 0.9)
    assert "coverage_80" not in methods["cnn_only"]
    assert (tmp_path / "eval" / "runs").is_dir()  # Ray Train runs and checkpoints are kept with the evaluation
    assert "| hybrid |" in (tmp_path / "eval" / "report.md").read_text()


STRONG = ("evaluation.methods=[row_tissue, tissue_donor, pairwise_regression, iterative_ridge, "
          "tensor_factorisation, promoter_composition]")


def test_each_seed_of_evaluate_seeds_replicates_every_draw(synth_small, tmp_path, monkeypatch):
    """``evaluate --seeds``: seed s runs with ``evaluation.seed`` s (other hidden entries) and ``seed`` the
    config's + s (every draw of the model reads it), nothing else changed; before, every seed trained on the same
    validation units. (The draws themselves are checked by the slow multi-seed evaluation.)"""
    import dataclasses

    from geximpute.steps import evaluate as module

    config = load_config(synth_small / "config.yaml", [f"output_dir={tmp_path}", "seed=5"])
    seen = []
    monkeypatch.setattr(module, "evaluate", lambda c, out, force=False: seen.append(c) or {"seed": c.evaluation.seed})
    monkeypatch.setattr(module, "summarise_seeds", lambda runs: {"seeds": [r["seed"] for r in runs]})
    monkeypatch.setattr(module, "seeds_report", lambda summary: "")
    module.evaluate_seeds(config, tmp_path / "eval", [0, 1, 2])
    assert [(c.evaluation.seed, c.seed) for c in seen] == [(0, 5), (1, 6), (2, 7)]
    assert all(dataclasses.replace(c, seed=5, evaluation=config.evaluation) == config for c in seen)


def test_evaluate_seeds_refuses_repeated_seeds_and_a_folder_not_its_own(synth_small, tmp_path, monkeypatch):
    """A seed given twice counted twice in the spread, a negative one failed after the seeds before it had run, and
    the summary was written into any ``--out`` (a user's folder, or an earlier single evaluation's version)."""
    from geximpute.errors import ConfigError
    from geximpute.runtime.atomic import OutputRefused
    from geximpute.steps import evaluate as module

    config = load_config(synth_small / "config.yaml", [f"output_dir={tmp_path}"])
    ran = []
    monkeypatch.setattr(module, "evaluate", lambda c, out, force=False: ran.append(out) or {"seed": 0})
    monkeypatch.setattr(module, "summarise_seeds", lambda runs: {"seeds": len(runs)})
    monkeypatch.setattr(module, "seeds_report", lambda summary: "report")
    for seeds in ([0, 0], [1, -1], []):
        with pytest.raises(ConfigError, match="expected distinct integers >= 0"):
            module.evaluate_seeds(config, tmp_path / "eval", seeds)
    assert ran == []
    user = tmp_path / "user"
    user.mkdir()
    (user / "summary.json").write_text("the user's own")
    with pytest.raises(OutputRefused, match="not a geximpute output"):
        module.evaluate_seeds(config, user, [0])
    assert (user / "summary.json").read_text() == "the user's own" and ran == []
    # committed whole; a second run replaces it (an output of this step)
    module.evaluate_seeds(config, tmp_path / "eval", [0, 1])
    assert json.loads((tmp_path / "eval" / "summary.json").read_text()) == {"seeds": 2}
    module.evaluate_seeds(config, tmp_path / "eval", [2])
    assert json.loads((tmp_path / "eval" / "summary.json").read_text()) == {"seeds": 1}
    assert (tmp_path / "eval" / "summary.md").read_text() == "report"
    # a plain folder an earlier version wrote (its seeds' outputs and the summary, no marker) is ours to replace
    old = tmp_path / "old"
    (old / ".seed_0.geximpute" / "v-1").mkdir(parents=True)
    (old / "seed_0").symlink_to(".seed_0.geximpute/v-1")
    (old / "summary.json").write_text("{}")
    module.evaluate_seeds(config, old, [0])
    assert json.loads((old / "summary.json").read_text()) == {"seeds": 1} and old.is_symlink()


@pytest.mark.slow
def test_evaluate_seeds_tunes_the_strong_baselines_and_summarises(ray_local, synth_small, tmp_path):
    from geximpute.steps.evaluate import evaluate_seeds

    config = load_config(synth_small / "config.yaml", [f"output_dir={tmp_path}", STRONG, "evaluation.task=samples",
                                                       "evaluation.fraction=0.25", "evaluation.min_donors=3"])
    summary = evaluate_seeds(config, tmp_path / "eval", [0, 1])
    assert summary["seeds"] == [0, 1]
    saved = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert saved["methods"].keys() == summary["methods"].keys()
    for seed in (0, 1):
        metrics = json.loads((tmp_path / "eval" / f"seed_{seed}" / "metrics.json").read_text())
        assert metrics["seed"] == seed
        assert set(metrics["methods"]) == {"row_tissue", "tissue_donor", "pairwise_regression", "iterative_ridge",
                                           "tensor_factorisation", "promoter_composition"}
        # every tunable setting chosen on visible data, and written down
        tuning = metrics["baselines"]["tuning"]
        assert set(tuning) == {"tissue_donor", "pairwise_regression", "iterative_ridge", "tensor_factorisation",
                               "promoter_composition"}
        for name, row in tuning.items():
            scores = [r["score"] for r in row["grid"]]
            best = min(r["rmse"] for r in row["grid"]) if row["metric"] == "rmse" else max(scores)
            assert row["score"] == best, name
            for key, value in row["chosen"].items():
                assert metrics["baselines"]["settings"][key] == value
        seq = metrics["sequence"]
        assert 0 < seq["genes_with_sequence"] <= seq["genes"] and seq["hidden_genes"] == seq["genes"]
        # the planted donor effects: reading the donor's other tissues beats the gene's tissue mean
        m = metrics["methods"]
        assert m["pairwise_regression"]["rmse"] < m["row_tissue"]["rmse"]
        assert m["tensor_factorisation"]["rmse"] < m["row_tissue"]["rmse"]
    row = summary["methods"]["pairwise_regression"]["rmse"]
    assert len(row["values"]) == 2 and row["sd"] is not None and min(row["values"]) <= row["mean"]
    assert "mean ± sd over seeds [0, 1]" in (tmp_path / "eval" / "summary.md").read_text()


def test_the_html_report_judges_intervals_at_their_own_level():
    """``head.quantiles`` [0.05, 0.95] makes 90% intervals: report.html's table, plot and note say 90%, as
    report.md does, not a fixed 80%."""
    from geximpute.steps.html_report import evaluation_sections

    rng = np.random.default_rng(0)
    observed = rng.normal(size=60)
    gene, tissue = np.repeat(np.arange(20), 3), np.tile(np.arange(3), 20)
    results = {"hybrid": {"pearson": 0.5, "coverage_80": 0.91, "coverage_nominal": 0.9, "interval_width_mean": 1.0,
                          "per_tissue": {"t0": {"pearson": 0.5, "n": 20}}}}
    metrics = {"methods": results, "n_hidden": 60, "task": "entries", "fraction": 0.1, "seed": 0, "n_genes": 20,
               "n_samples": 3, "scale": "normalised, as given"}
    sections = evaluation_sections(metrics, observed, {"hybrid": observed + 0.1}, gene, tissue, 10,
                                   {"config": {}, "inputs": {}, "versions": {}})
    text = "".join(s.body + s.note for s in sections)
    assert "90% coverage" in text and "90% interval" in text and "80%" not in text
    # and on the data's own scale (Geuvadis: normalised values, no log1p)
    assert "modelling scale (normalised, as given)" in text and "log1p" not in text


def test_the_genetic_table_scores_the_pairs_the_across_donor_pearson_scores():
    """A (gene, tissue) pair of two donors has no Pearson: the per-gene table leaves it out as ``score`` does, so a
    method is not given 0.0 there (it lowered every method's mean toward 0 where ``min_donors`` allowed it)."""
    from types import SimpleNamespace

    from geximpute.science.metrics import across_donor_pairs
    from geximpute.steps.evaluate import genetic_table

    config = SimpleNamespace(evaluation=SimpleNamespace(min_donors=2, heritability=None))
    # gene 0: tissue 0 has four donors, tissue 1 only two; gene 1: tissue 0 has three donors
    gene = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
    tissue = np.array([0, 0, 0, 0, 1, 1, 0, 0, 0])
    observed = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 2.0, 0.0, 1.0])
    predictions = {"hybrid": observed + np.array([0.0, 0.5, -0.5, 0.0, 0.0, 0.0, 0.3, 0.0, -0.3]),
                   "hybrid_reference": np.zeros(len(gene))}
    table = genetic_table(config, predictions, observed, gene, tissue, np.array(["G0", "G1"]))
    pair_gene, scores, _ = across_donor_pairs(predictions["hybrid"], observed, gene, tissue, 2)
    assert pair_gene.tolist() == [0, 1]
    rows = {r["gene_id"]: r for r in table["per_gene"]}
    assert rows["G0"]["n_tissues"] == 1 and rows["G0"]["hybrid"] == pytest.approx(scores[0])
    assert rows["G1"]["hybrid"] == pytest.approx(scores[1])
    assert rows["G0"]["hybrid_reference"] == 0.0
    assert table["mean"]["hybrid"] == pytest.approx(scores.mean())


def test_an_evaluation_with_no_method_that_applies_is_refused_naming_why(ray_local, synth_small, tmp_path):
    """Every listed method skipped (a genetic method without personal genomes): refused with the reasons, where it
    was a traceback from the plots after prepare and the tuning had run; nothing is committed."""
    from geximpute.errors import ConfigError

    config = config_for(synth_small, tmp_path, "evaluation.methods=[elastic_net, hybrid_reference]",
                        "inputs.variants=null", "evaluation.task=samples", "evaluation.min_donors=3")
    with pytest.raises(ConfigError, match=r"evaluation.methods: none of \['elastic_net', 'hybrid_reference'\] "
                                          r"applies.*elastic_net: .*hybrid_reference: the same as hybrid"):
        evaluate(config, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_prepare_without_targets_or_training_is_refused_before_anything_is_read(synth_small, tmp_path):
    """``--targets none`` without ``--training`` committed an output with an empty context/ and no folds."""
    from geximpute.apps.cli import main
    from geximpute.errors import ConfigError

    config = config_for(synth_small, tmp_path)
    with pytest.raises(ConfigError, match=r"--targets none writes no context record, so it needs --training"):
        prepare(config, tmp_path / "records", targets="none")
    assert not (tmp_path / "records").exists()
    assert main(["-q", "prepare", "--config", str(synth_small / "config.yaml"), "--targets", "none",
                 "--out", str(tmp_path / "cli")]) == 2
    assert not (tmp_path / "cli").exists()

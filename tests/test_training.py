"""Pure-numpy checks of how training epochs sample records (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from geximpute.fit.train import epoch_rows


def test_epoch_rows_sample_the_whole_file_afresh_each_epoch():
    # 10 chromosomes of 1,000 records each, stored one after the other (as prepare writes them)
    chrom = np.repeat(np.arange(10), 1000)
    first = epoch_rows(len(chrom), 500, seed=0, epoch=0, rank=0)
    second = epoch_rows(len(chrom), 500, seed=0, epoch=1, rank=0)
    assert len(first) == 500 and len(np.unique(first)) == 500
    # a twentieth of the records still reaches every chromosome, roughly in proportion
    counts = np.bincount(chrom[first], minlength=10)
    assert counts.min() > 20, counts
    # a new epoch draws a new sample; the same (seed, epoch, rank) draws the same one
    assert len(np.intersect1d(first, second)) < 100
    np.testing.assert_array_equal(first, epoch_rows(len(chrom), 500, seed=0, epoch=0, rank=0))
    assert not np.array_equal(first, epoch_rows(len(chrom), 500, seed=0, epoch=0, rank=1))
    # without a cap an epoch visits every record once
    everything = epoch_rows(len(chrom), None, seed=0, epoch=2, rank=0)
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(chrom)))


def test_head_baseline_features_are_out_of_fold(tmp_path):
    """The head's baseline features of a training-fold entry never see that entry's value; the grids of hidden
    entries see every visible value and nothing else."""
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import donor_data, problem_of

    from geximpute import schema as S
    from geximpute.config import config_from_dict
    from geximpute.fit.hybrid import stacked_baselines
    from geximpute.fit.models import baseline_columns
    from geximpute.science.folds import training_folds

    values, donor, tissue = donor_data(seed=1, n_genes=20, n_donors=60, n_tissues=4)
    problem = problem_of(values, donor, tissue)
    pq.write_table(S.PROMOTERS.empty_table(), tmp_path / "promoters.parquet")
    pq.write_table(S.GENE_PROMOTERS.empty_table(), tmp_path / "gene_promoters.parquet")
    config = config_from_dict({"inputs": {"genes": "g.tsv", "expression": "e.tsv"},
                               "evaluation": {"task": "entries"}, "train": {"folds": 2, "fold_fraction": 0.25},
                               "baselines": {"tune": False}})
    masks = training_folds(problem, "entries", 2, 0.25, config.seed)
    fold = masks[0]
    records = tmp_path / "records"

    def write_fold_records(entries: list[np.ndarray]) -> None:
        for k, mask in enumerate(entries):  # the folds' records: only their (gene, sample) are read here
            gi, si = np.nonzero(mask)
            (records / "train" / f"fold={k}").mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"gene_index": gi.astype(np.int32), "sample_index": si.astype(np.int32)}),
                           records / "train" / f"fold={k}" / "part-0.parquet")  # replaces the one before
        for name in ("promoters.parquet", "gene_promoters.parquet"):
            (records / name).write_bytes((tmp_path / name).read_bytes())

    def table(mask: np.ndarray) -> pa.Table:
        gi, si = np.nonzero(mask)
        return pa.table({"gene_index": gi.astype(np.int32), "sample_index": si.astype(np.int32)})

    write_fold_records(masks)
    oof, full = stacked_baselines(config, problem, records)
    assert {"row_tissue", "iterative_ridge", "pairwise_regression"} <= set(oof.names) and oof.names == list(full)
    # every record of a fold has an out-of-fold estimate of every method, found by its (gene, sample) in any order
    first = [oof.columns(k, table(masks[k])) for k in range(2)]
    for k in range(2):
        assert first[k].shape == (int(masks[k].sum()), len(oof.names)) and not np.isnan(first[k]).any()
        backwards = table(masks[k]).take(np.arange(int(masks[k].sum()))[::-1])
        np.testing.assert_array_equal(oof.columns(k, backwards), first[k][::-1])
    # a fold whose records cover part of it (train.max_fold_records): estimates there alone, the same values
    part = [m & (np.arange(m.shape[1])[None, :] % 3 == 0) for m in masks]
    write_fold_records(part)
    some, none = stacked_baselines(config, problem, records, visible_grids=False)
    assert some.names == list(none) == oof.names and all(v is None for v in none.values())
    for k in range(2):
        np.testing.assert_array_equal(some.columns(k, table(part[k])), oof.columns(k, table(part[k])))
        outside = some.columns(k, table(masks[k] & ~part[k]))
        assert outside.shape[0] > 0 and np.isnan(outside).all()
    write_fold_records(masks)
    # change the values of fold 0's entries: its estimates do not move, the all-visible ones do
    changed = dataclasses.replace(problem, values=np.where(fold, problem.values + 3.0, problem.values))
    oof2, full2 = stacked_baselines(config, changed, records)
    np.testing.assert_allclose(oof2.columns(0, table(fold)), first[0], rtol=1e-5, atol=1e-5)
    for name in oof.names:
        assert not np.allclose(full2[name][fold], full[name][fold]), name
    # the head reads a record's estimate at its (gene, sample); a sample outside the grids reads NaN
    records = pa.table({"gene_index": [0, 3, 1], "sample_index": [2, 5, problem.n_samples + 4]})
    cols = baseline_columns(full, records)
    assert cols.shape == (3, len(full))
    first = next(iter(full.values()))
    assert cols[0, 0] == first[0, 2] and cols[1, 0] == first[3, 5] and np.isnan(cols[2]).all()


def test_out_of_fold_estimates_in_ray_tasks_are_the_in_process_ones(ray_local):
    """fit-head's out-of-fold fits with each gene range in a Ray task give the in-process values, bit for bit,
    ``gene_family`` reading the whole fold's families in every range."""
    import dataclasses
    import functools

    from helpers import donor_data, problem_of

    from geximpute.config import config_from_dict
    from geximpute.fit.hybrid import estimates_in_tasks
    from geximpute.science.baselines import ENTRY_METHODS, fit_ranges, out_of_fold_entries
    from geximpute.science.folds import training_folds

    values, donor, tissue = donor_data(seed=4, n_genes=600, n_donors=20, n_tissues=3)
    problem = problem_of(values, donor, tissue)
    problem = dataclasses.replace(problem, gene_names=np.array([f"SLC{i % 40}A{i % 3}" for i in range(600)],
                                                               dtype=object))
    config = config_from_dict({"inputs": {"genes": "g.tsv", "expression": "e.tsv"},
                               "baselines": {"tune": False, "block_cells": 10_000},
                               "ray": {"concurrency": 2, "cpus_per_task": 0.5}})
    assert len(fit_ranges(problem, config.baselines.block_cells)) == 3
    for task in ("entries", "genes"):  # gene_family on the genes task
        masks = training_folds(problem, task, 2, 0.25, 0)
        entries = [(gi[::2], si[::2]) for gi, si in (np.nonzero(m) for m in masks)]
        here = out_of_fold_entries(problem, masks, ENTRY_METHODS, config.baselines, task=task, entries=entries)
        calls: list[int] = []
        tasks = out_of_fold_entries(problem, masks, ENTRY_METHODS, config.baselines, task=task, entries=entries,
                                    estimate=estimates_in_tasks(config), progress=functools.partial(calls.append, 1))
        assert len(calls) == len(tasks) == len(here) == 2
        for k in range(2):
            assert list(tasks[k]) == list(here[k])
            assert ("gene_family" in here[k]) == (task == "genes") and "promoter_composition" not in here[k]
            for name in here[k]:
                assert len(here[k][name]) == len(entries[k][0])
                np.testing.assert_array_equal(tasks[k][name], here[k][name], err_msg=f"{task}: {name}")
    # measured entries estimated without their own values: the tasks pass the flag on (they dropped it)
    from geximpute.science.baselines import baseline_estimates

    gi, si = (part[::40] for part in np.nonzero(~np.isnan(problem.values)))
    names = ("row_tissue", "iterative_ridge")
    here = baseline_estimates(problem, gi, si, names, config.baselines, own_value_free=True)
    tasks = estimates_in_tasks(config)(problem, gi, si, names, config.baselines, own_value_free=True)
    for name in names:
        np.testing.assert_array_equal(tasks[name], here[name], err_msg=name)
    assert np.abs(tasks["iterative_ridge"] - problem.values[gi, si]).mean() > 0.1  # not the entries' own values


def test_fold_targets_draw_whole_gene_tissue_groups_up_to_the_limit():
    from geximpute.science.folds import fold_targets

    rng = np.random.default_rng(0)
    tissue = np.repeat(np.arange(5), 12)  # 5 tissues of 12 samples
    inner = rng.random((40, len(tissue))) < 0.3
    total = int(inner.sum())
    # within the limit, or without one: every entry of the fold
    assert fold_targets(inner, tissue, None, 0) is inner
    assert fold_targets(inner, tissue, total, 0) is inner
    limit = total // 4
    drawn = fold_targets(inner, tissue, limit, 0)
    assert not (drawn & ~inner).any()  # inside the fold
    assert 0.5 * limit < drawn.sum() <= limit
    for t in range(5):  # each (gene, tissue) group: all of its fold entries or none
        block, kept = inner[:, tissue == t], drawn[:, tissue == t]
        whole = (kept == block).all(axis=1)
        empty = ~kept.any(axis=1)
        assert (whole | empty).all()
    assert drawn.any(axis=1).sum() > 20  # groups of many genes, not a few genes' every tissue
    np.testing.assert_array_equal(drawn, fold_targets(inner, tissue, limit, 0))  # seeded
    assert not np.array_equal(drawn, fold_targets(inner, tissue, limit, 1))
    # replicate 0's fold 1 and replicate 1's fold 0 draw apart (seed + fold made them one draw)
    assert not np.array_equal(fold_targets(inner, tissue, limit, 0, fold=1), fold_targets(inner, tissue, limit, 1))
    # a limit below the smallest group still labels one group
    assert fold_targets(inner, tissue, 1, 0).any()


def test_training_folds_capped_are_the_uncapped_records_of_fewer_entries(tiny_model, tmp_path):
    """``train.max_fold_records`` labels fewer entries of each fold, with the same context: every capped record is
    the uncapped build's record of the same entry, column for column (the whole fold stays hidden); ``--targets
    none`` writes no context record and holds no evaluation entry out."""
    import dataclasses

    import pyarrow.dataset as pads

    from geximpute.steps.prepare import prepare

    built = dataclasses.replace(tiny_model.config, output_dir=str(tmp_path))
    # `--targets none` (a model for imputation): the training folds are cut from every visible entry, the
    # evaluation's included (the tiny model's build held them out)
    uncapped = prepare(built, tmp_path / "uncapped", targets="none", training=True)
    assert uncapped.n_train > tiny_model.progress.results["prepare"].n_train and len(uncapped.truth) == 0
    assert json.loads((tmp_path / "uncapped" / "_manifest.json").read_text())["evaluation_hidden"] is False
    # train and fit-head, run on their own, make the problem again as prepare made it: folds cut from the same
    from geximpute.io.dataset import load_dataset
    from geximpute.io.matrixfile import measured
    from geximpute.science.problem import make_problem
    from geximpute.steps.pipeline import read_visible_problem
    from geximpute.steps.prepare import read_problem_index

    again = read_visible_problem(built, read_problem_index(tmp_path / "uncapped")[0], tmp_path / "uncapped")
    everything, _ = make_problem(load_dataset(built), hidden_mask=False)
    assert np.array_equal(measured(again.values), measured(everything.values))
    full = tmp_path / "uncapped" / "train"
    n_full = [pads.dataset(full / f"fold={k}", partitioning="hive").count_rows() for k in range(2)]
    limit = min(n_full) // 3
    config = dataclasses.replace(built, train=dataclasses.replace(built.train, max_fold_records=limit))
    out = prepare(config, tmp_path / "records", targets="none", training=True)
    assert out.n_records == 0 and not any((tmp_path / "records" / "context").rglob("*.parquet"))
    keys = ["gene_index", "sample_index"]
    for k in range(2):
        capped = pads.dataset(tmp_path / "records" / "train" / f"fold={k}", partitioning="hive").to_table()
        whole = pads.dataset(full / f"fold={k}", partitioning="hive").to_table()
        assert 0 < capped.num_rows <= limit < whole.num_rows
        capped = capped.sort_by([(c, "ascending") for c in keys])
        at = {(g, s): i for i, (g, s) in enumerate(zip(*(whole[c].to_pylist() for c in keys), strict=True))}
        same = whole.take([at[(g, s)] for g, s in zip(*(capped[c].to_pylist() for c in keys), strict=True)])
        for name in capped.column_names:
            assert capped[name].equals(same[name].cast(capped[name].type)), name


def _planted(n: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random one-hot promoters carrying 0-3 copies of one 8-mer; the level is the copy count plus noise."""
    from geximpute.science.promoters import one_hot_promoters

    motif = "GATTACCA"
    seqs, level = [], np.zeros(n)
    for i in range(n):
        seq = list(rng.choice(list("ACGT"), size=length))
        copies = int(rng.integers(0, 4))
        for start in rng.choice(np.arange(0, length - 8, 12), size=copies, replace=False):
            seq[start : start + 8] = motif
        seqs.append("".join(seq))
        level[i] = copies + rng.normal(0, 0.3)
    return one_hot_promoters(seqs, length), level


def test_gene_level_pretraining_finds_a_planted_motif():
    import torch

    from geximpute.fit.pretrain import gene_levels, pretrain_cnn, record_levels
    from geximpute.model.network import PromoterCNN

    rng = np.random.default_rng(0)
    onehot, level = _planted(360, 200, rng)
    # two records per gene; gene g reads promoter row g, the last 60 genes validate, gene 5 has no promoter
    gene_index = np.repeat(np.arange(360), 2)
    target = np.repeat(level, 2) * 2.0 + 1.0
    valid = gene_index >= 300
    gene_row = np.arange(360)
    gene_row[5] = -1
    levels = gene_levels(*record_levels(gene_index, target, valid, 360), gene_row, seed=0)
    assert len(levels.train_rows) == 299 and set(levels.valid_rows) == set(range(300, 360))
    # standardised by the training genes' own mean and spread
    expected = level[levels.train_rows]
    np.testing.assert_allclose(levels.train_y, (expected - expected.mean()) / expected.std(), rtol=1e-4, atol=1e-5)

    def readout_r(cnn) -> float:
        """Validation Pearson of a least-squares read-out of the CNN's embedding fitted on the training genes."""
        with torch.no_grad():
            design = np.c_[cnn(promoters.float()).numpy(), np.ones(len(promoters))]
        coef, *_ = np.linalg.lstsq(design[levels.train_rows], levels.train_y, rcond=None)
        return float(np.corrcoef(design[levels.valid_rows] @ coef, levels.valid_y)[0, 1])

    torch.manual_seed(0)
    cnn = PromoterCNN(16, channels=16, kernel=9, layers=1)
    promoters = torch.as_tensor(onehot)
    before = readout_r(cnn)
    history = pretrain_cnn(cnn, 16, promoters, levels, epochs=40, lr=5e-3, weight_decay=1e-4, seed=0)
    assert max(history) > 0.7, history  # an untrained CNN reads about 0 (below)
    # the CNN keeps what it learned: its embedding now carries the motif count, which it did not before
    after = readout_r(cnn)
    assert after > 0.6 and after > before + 0.3, (before, after)

    # without validation genes a seeded share of the training genes chooses the epoch; none is in both
    carved = gene_levels(*record_levels(gene_index, target, np.zeros_like(valid), 360), gene_row, seed=0)
    assert len(carved.valid_rows) > 20 and not set(carved.valid_rows) & set(carved.train_rows)
    assert pretrain_cnn(cnn, 16, promoters, carved, epochs=0, lr=5e-3, weight_decay=1e-4, seed=0) == []


def test_pretraining_outlasts_a_stalled_start(monkeypatch):
    """A motif is often found only after a few epochs of a validation Pearson near 0: pre-training runs
    ``MIN_EPOCHS`` before its patience may stop it (the best epoch is kept, as before). (A run stopped at epoch 4
    at 0.04 with the patience counted from the first epoch, on planted motifs where other runs reached 0.4-0.5.)"""
    import torch

    from geximpute.fit import pretrain as pretrain_module
    from geximpute.model.network import PromoterCNN

    curve = iter([0.04, 0.01, 0.02, 0.02, 0.1, 0.3, 0.5, 0.45, 0.4, 0.35, 0.3, 0.2, 0.1])
    monkeypatch.setattr(pretrain_module, "_pearson", lambda a, b: next(curve))
    rng = np.random.default_rng(1)
    onehot, level = _planted(60, 50, rng)
    levels = pretrain_module.gene_levels(level, np.arange(60) >= 48, np.arange(60), seed=0)
    torch.manual_seed(0)
    cnn = PromoterCNN(8, channels=4, kernel=5, layers=1)

    history = pretrain_module.pretrain_cnn(cnn, 8, torch.as_tensor(onehot), levels, epochs=20, lr=1e-3,
                                           weight_decay=0.0, seed=0)
    # the old rule (patience 3 from the first epoch) stopped after [0.04, 0.01, 0.02, 0.02]
    assert pretrain_module.MIN_EPOCHS >= 8
    assert history == [0.04, 0.01, 0.02, 0.02, 0.1, 0.3, 0.5, 0.45, 0.4, 0.35], history  # best at 7, then 3 worse
    # and a short run still stops at its own number of epochs
    curve = iter([0.3, 0.2, 0.1, 0.0, 0.0])
    monkeypatch.setattr(pretrain_module, "_pearson", lambda a, b: next(curve))
    assert len(pretrain_module.pretrain_cnn(cnn, 8, torch.as_tensor(onehot), levels, epochs=5, lr=1e-3,
                                            weight_decay=0.0, seed=0)) == 5


def test_pretraining_levels_never_read_the_fold_a_network_predicts():
    """Fold network k's CNN pre-trains on each gene's mean over the visible entries outside fold k: changing fold
    k's values moves none of its levels, and hidden (NaN) entries are never read."""
    import dataclasses

    from helpers import donor_data, problem_of

    from geximpute.config import config_from_dict
    from geximpute.fit.hybrid import pretrain_levels
    from geximpute.fit.train import holdout_grid
    from geximpute.science.folds import training_folds

    values, donor, tissue = donor_data(seed=2, n_genes=40, n_donors=30, n_tissues=3)
    problem = problem_of(values, donor, tissue)
    config = config_from_dict({"inputs": {"genes": "g.tsv", "expression": "e.tsv"},
                               "evaluation": {"task": "genes"}, "train": {"folds": 2, "fold_fraction": 0.25}})
    masks = training_folds(problem, "genes", 2, 0.25, config.seed)
    level, valid_gene = pretrain_levels(config, problem, [0])
    fold0_genes = masks[0].any(axis=1)
    held = holdout_grid("genes", problem.n_genes, problem.n_samples, config.seed).any(axis=1)  # no valid chroms
    assert fold0_genes.any() and np.isnan(level[fold0_genes]).all()  # whole genes of fold 0: no level at all
    kept = ~fold0_genes & ~held
    np.testing.assert_allclose(level[kept], np.nanmean(problem.values[kept], axis=1), rtol=1e-5)
    assert valid_gene.dtype == bool and len(valid_gene) == problem.n_genes
    changed = dataclasses.replace(problem, values=np.where(masks[0], problem.values + 5.0, problem.values))
    np.testing.assert_array_equal(pretrain_levels(config, changed, [0])[0], level)
    assert not np.array_equal(pretrain_levels(config, changed, [1])[0], pretrain_levels(config, problem, [1])[0],
                              equal_nan=True)


@pytest.mark.parametrize("task", ["genes", "samples", "entries", "donors"])
def test_pretraining_levels_never_read_the_units_the_head_holds_out(task):
    """Without validation chromosomes the head stops its trees and calibrates its interval on a seeded share of the
    task's units that no network trains on: no network's CNN pre-training may read them either. Changing every
    held-out entry moves no level; the held-out units are those :func:`holdout` picks from the records. With whole
    donors hidden (``donors``) the unit is the donor: every sample of a held-out donor is held out, so the head's
    validation donors are new to what it learned from (it held out samples, whose donors trained it)."""
    import dataclasses

    import pyarrow as pa
    from helpers import donor_data, problem_of

    from geximpute.config import config_from_dict
    from geximpute.fit.hybrid import pretrain_levels
    from geximpute.fit.train import holdout, holdout_grid, holdout_task
    from geximpute.science.problem import SPLITS

    values, donor, tissue = donor_data(seed=3, n_genes=60, n_donors=30, n_tissues=3)
    problem = problem_of(values, donor, tissue)
    evaluation = {"task": "samples", "whole_donors": True} if task == "donors" else {"task": task}
    config = config_from_dict({"inputs": {"genes": "g.tsv", "expression": "e.tsv"}, "seed": 4,
                               "evaluation": evaluation, "train": {"folds": 2, "fold_fraction": 0.25}})
    assert holdout_task(config) == task
    sample_donors = np.asarray(problem.donors, dtype=object)[problem.donor_index]
    held = holdout_grid(task, problem.n_genes, problem.n_samples, config.seed, sample_donors=sample_donors)
    gene, sample = np.nonzero(np.ones_like(held))
    records = pa.table({"gene_index": gene.astype(np.int32), "sample_index": sample.astype(np.int32),
                        "donor_id": pa.array(sample_donors[sample].astype(str))})
    np.testing.assert_array_equal(holdout(records, task, False, config.seed), held[gene, sample])
    assert 0.05 < held.mean() < 0.3
    if task == "donors":  # a donor is held out in every sample or in none
        by_donor = [np.unique(held[:, problem.donor_index == d]) for d in range(len(problem.donors))]
        assert all(len(u) == 1 for u in by_donor) and any(u[0] for u in by_donor)
    level, _ = pretrain_levels(config, problem, [])
    changed = dataclasses.replace(problem, values=np.where(held, problem.values + 5.0, problem.values))
    np.testing.assert_array_equal(pretrain_levels(config, changed, [])[0], level)
    if task == "genes":
        assert np.isnan(level[held.any(axis=1)]).all()
    # with validation chromosomes the networks and the head hold those out instead: every visible entry counts
    split = np.zeros(problem.n_genes, problem.split.dtype)
    split[: problem.n_genes // 4] = SPLITS.index("valid")
    with_chroms = dataclasses.replace(problem, split=split)
    np.testing.assert_allclose(pretrain_levels(config, with_chroms, [])[0], np.nanmean(problem.values, axis=1),
                               rtol=1e-5)
    # ... unless every validation gene is hidden (no record lies there, so the head holds out hashed units): then
    # pre-training leaves those units out as well
    none_visible = dataclasses.replace(with_chroms, values=np.where((split == SPLITS.index("valid"))[:, None], np.nan,
                                                                    problem.values))
    level = pretrain_levels(config, none_visible, [])[0]
    moved = dataclasses.replace(none_visible, values=np.where(held, none_visible.values + 5.0, none_visible.values))
    np.testing.assert_array_equal(pretrain_levels(config, moved, [])[0], level)


@pytest.mark.parametrize("task", ["entries", "genes", "samples"])
def test_a_problem_kept_in_a_matrix_file_is_the_in_memory_problem(synth_small, tmp_path, task):
    """`prepare` reading the inputs itself keeps the matrix in a file: counts normalised from the visible entries,
    the evaluation's entries hidden a pass of rows at a time there; the same problem, truth and training folds as
    in memory, to the bit."""
    from geximpute.config import load_config
    from geximpute.io.dataset import load_dataset
    from geximpute.io.matrixfile import MatrixFile
    from geximpute.science.folds import training_folds
    from geximpute.science.problem import make_problem

    config = load_config(synth_small / "config.yaml", [f"evaluation.task={task}", "inputs.scale=counts",
                                                       "expression.counts_normalisation=median_ratio"])
    memory, truth = make_problem(load_dataset(config, with_variants=False))
    on_disk, disk_truth = make_problem(load_dataset(config, with_variants=False, matrix=tmp_path / "m.f32"),
                                       consume=True)
    assert isinstance(on_disk.values, MatrixFile) and len(truth) > 0
    np.testing.assert_array_equal(on_disk.values.read(), memory.values)
    for field in ("gene_index", "sample_index", "values"):
        np.testing.assert_array_equal(getattr(disk_truth, field), getattr(truth, field))
    np.testing.assert_array_equal(on_disk.tissue_corr, memory.tissue_corr)
    for a, b in zip(training_folds(memory, task, 2, 0.25, 0), training_folds(on_disk, task, 2, 0.25, 0),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    # a training fold of each: hidden and normalised again without its entries, the file's view as it reads (a
    # window too, as a task reads it), the same values as in memory
    from geximpute.science.folds import fold_problem, forget_fold

    mask = training_folds(memory, task, 2, 0.25, 0)[0]
    fold_memory, fold_disk = fold_problem(memory, mask), fold_problem(on_disk, mask)
    assert fold_disk.values.rescale is not None
    np.testing.assert_allclose(fold_disk.values.read(), fold_memory.values, rtol=1e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(fold_disk.values.window(3, 9)[:, 2:7], fold_memory.values[3:9, 2:7], rtol=1e-6,
                               atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(fold_disk.values[:, 1:4], fold_memory.values[:, 1:4], rtol=1e-6, atol=1e-6,
                               equal_nan=True)
    np.testing.assert_array_equal(fold_disk.scaling.factors, fold_memory.scaling.factors)
    from geximpute.science.folds import fold_labels

    labels_disk = fold_labels(on_disk, fold_disk)
    assert isinstance(labels_disk, MatrixFile) and labels_disk.hidden is None
    np.testing.assert_allclose(labels_disk.read(), fold_labels(memory, fold_memory), rtol=1e-6, atol=1e-6,
                               equal_nan=True)
    forget_fold(fold_disk)


def test_entry_folds_found_by_rank_are_the_draw_over_the_cells_positions(synth_small, monkeypatch):
    """The `entries` task's training folds permute the visible cells' ranks and find each fold's cells a pass at a
    time (no int64 index of every visible cell): the folds that permuting the cells' positions gave, cell for
    cell."""
    from geximpute.config import load_config
    from geximpute.io.dataset import load_dataset
    from geximpute.science import problem as problem_module
    from geximpute.science.folds import training_folds
    from geximpute.science.problem import SPLITS, make_problem

    config = load_config(synth_small / "config.yaml", ["evaluation.task=entries"])
    problem, _ = make_problem(load_dataset(config, with_variants=False))
    visible = ~np.isnan(problem.values) & (problem.split != SPLITS.index("test"))[:, None]
    units = np.random.default_rng(3).permutation(np.flatnonzero(visible.ravel()))
    per_fold = int(round(0.3 * len(units)))
    monkeypatch.setattr(problem_module, "HIDE_CELLS", 1000)  # passes of 1,000 cells
    folds = training_folds(problem, "entries", 3, 0.3, 3)
    for f, mask in enumerate(folds):
        expected = np.zeros(visible.shape, bool)
        expected.ravel()[units[f * per_fold : (f + 1) * per_fold]] = True
        np.testing.assert_array_equal(mask, expected)
        assert mask.sum() == per_fold


def test_pretraining_levels_read_in_passes_are_the_whole_matrix_levels(tmp_path):
    """`visible_levels` reads the values a pass of rows at a time (a matrix file's too: `geximpute train` keeps the
    problem in one): the levels of the whole-matrix formula, to the bit, with nothing, a broadcast or a mask hidden."""
    from geximpute.fit.pretrain import visible_levels
    from geximpute.io.matrixfile import MatrixFile

    rng = np.random.default_rng(8)
    values = rng.normal(size=(300, 2000)).astype(np.float32)  # 600,000 cells: three passes
    values[rng.random(values.shape) < 0.4] = np.nan
    values[7] = np.nan  # a gene with nothing visible
    valid = rng.random(300) < 0.2
    on_disk = MatrixFile.from_array(tmp_path / "values.f32", values)
    test_gene = rng.random(300) < 0.1
    for hide in (None, np.broadcast_to(test_gene[:, None], values.shape), rng.random(values.shape) < 0.3):
        kept = values if hide is None else np.where(hide, np.nan, values)
        seen = np.isfinite(kept)
        counts = seen.sum(axis=1)
        whole = np.where(seen, kept, 0.0).sum(axis=1, dtype=np.float64) / np.maximum(counts, 1)
        whole = np.where(counts > 0, whole, np.nan)
        for given in (values, on_disk):
            level, valid_gene = visible_levels(given, hide, valid)
            np.testing.assert_array_equal(level, whole)
            np.testing.assert_array_equal(valid_gene, valid)


def test_a_networks_pretraining_levels_from_a_matrix_file_are_the_in_memory_ones(synth_small, tmp_path):
    """`geximpute train` run on its own makes the problem again with its matrix in a file: each fold network's
    pre-training levels (its folds found and left out, the test chromosomes' genes too) are the in-memory ones."""
    from geximpute.config import load_config
    from geximpute.fit.hybrid import fold_masks, pretrain_levels
    from geximpute.io.dataset import load_dataset
    from geximpute.io.matrixfile import MatrixFile
    from geximpute.science.problem import make_problem

    config = load_config(synth_small / "config.yaml", ["evaluation.task=genes", "split.test_chroms=[chr2]"])
    memory, _ = make_problem(load_dataset(config, with_variants=False))
    on_disk, _ = make_problem(load_dataset(config, with_variants=False, matrix=tmp_path / "m.f32"), consume=True)
    assert isinstance(on_disk.values, MatrixFile)
    masks = fold_masks(config, memory)
    for a, b in zip(masks, fold_masks(config, on_disk), strict=True):
        np.testing.assert_array_equal(a, b)
    for k in range(config.train.folds):
        level, valid = pretrain_levels(config, memory, [k], masks)
        disk_level, disk_valid = pretrain_levels(config, on_disk, [k])
        np.testing.assert_array_equal(disk_level, level)
        np.testing.assert_array_equal(disk_valid, valid)
        assert np.isnan(level[memory.chroms == "chr2"]).all() and np.isfinite(level).any()


def test_ctrl_c_stops_a_command_after_ray_train_ran(tiny_model):
    """Ray Train's fit installs a Ctrl-C handler of its own and left it installed: an evaluation interrupted in
    its baselines after the networks trained ran on (the handler aborted a finished run), and a third Ctrl-C ended
    the command with status 0. ``tiny_model`` trained networks and a head through Ray Train in this process."""
    import signal

    from geximpute.runtime.raytools import fit_trainer

    assert tiny_model.progress.results["train"] is not None
    handler = signal.getsignal(signal.SIGINT)  # the process's own (ignored where pytest runs in the background)
    assert not getattr(handler, "__module__", "").startswith("ray"), handler

    class Trainer:  # installs a handler as Ray Train's fit does
        def fit(self):
            signal.signal(signal.SIGINT, lambda *_: None)
            return "result"

    assert fit_trainer(Trainer()) == "result" and signal.getsignal(signal.SIGINT) is handler

    class Interrupted:  # Ray Train's handler ends a run stopped by Ctrl-C with sys.exit(0)
        def fit(self):
            signal.signal(signal.SIGINT, lambda *_: None)
            raise SystemExit(0)

    # an interruption (the command's status 130), not a success: `train && fit-head` went on after a Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        fit_trainer(Interrupted())
    assert signal.getsignal(signal.SIGINT) is handler


def test_train_on_its_own_removes_its_matrix_before_the_networks_train(tiny_model, tmp_path, monkeypatch):
    """`geximpute train` run on its own reads the problem into a matrix file for the CNNs' pre-training levels and
    removes it before Ray Train starts (the file is not read after the levels: it would hold the disk for the whole
    training); the runs it hands over carry each fold network's levels, those of the in-memory problem."""
    from geximpute.fit.hybrid import fold_network_runs
    from geximpute.steps import pipeline

    class Stop(Exception):
        pass

    seen = {}

    def observe(config, records, gene_ids, n_tissues, storage, problem=None, *, runs=None):
        seen["scratch"] = sorted(p.name for p in tmp_path.iterdir() if ".matrix-" in p.name)
        seen["problem"], seen["runs"] = problem, runs
        raise Stop  # what was handed to training is all this test reads

    monkeypatch.setattr(pipeline, "train_fold_networks", observe)
    with pytest.raises(Stop):
        pipeline.train_and_save(tiny_model.config, tiny_model.records, tmp_path / "network")
    assert seen["scratch"] == [] and seen["problem"] is None
    expected = fold_network_runs(tiny_model.config, tiny_model.records, tiny_model.progress.results["prepare"].problem)
    assert [r.name for r in seen["runs"]] == [r.name for r in expected]
    assert len(expected) == tiny_model.config.train.folds >= 2
    for got, want in zip(seen["runs"], expected, strict=True):
        assert got.train_dirs == want.train_dirs
        for a, b in zip(got.levels, want.levels, strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_run_of_the_same_name_resumes_only_what_it_trains(tmp_path, caplog):
    """A second `train` or `build` into the same network folder (new records, another seed) starts afresh: its
    Ray Train run of the same name held the earlier run's checkpoints, and their finished networks came back as
    the new run's. A rerun of the same records and settings (after a crash) resumes; so does one with other
    workers or CPUs."""
    import dataclasses

    from geximpute.config import config_from_dict
    from geximpute.fit.train import NetworkRun, _run_fingerprint, _start_or_resume

    records = tmp_path / "records"
    (records / "train" / "fold=0").mkdir(parents=True)
    (records / "_manifest.json").write_text('{"run": 1}')
    config = config_from_dict({"inputs": {"genes": "g.tsv", "expression": "e.tsv"}})
    runs = [NetworkRun("fold0", [records / "train" / "fold=0"])]
    first = _run_fingerprint(config, runs, records)
    run_dir = tmp_path / "runs" / "hybrid_folds"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint_000001").mkdir()
    _start_or_resume(run_dir, first)  # no fingerprint yet: a run of unknown origin is not resumed
    assert not run_dir.exists()
    run_dir.mkdir()
    (run_dir / "checkpoint_000001").mkdir()
    more_workers = dataclasses.replace(config, train=dataclasses.replace(config.train, num_workers=2))
    assert _run_fingerprint(more_workers, runs, records) == first
    with caplog.at_level("INFO", logger="geximpute.fit.train"):
        _start_or_resume(run_dir, first)  # the same: resumed
    assert (run_dir / "checkpoint_000001").is_dir() and "resuming the run" in caplog.text
    other_seed = dataclasses.replace(config, seed=1)
    assert _run_fingerprint(other_seed, runs, records) != first
    (records / "_manifest.json").write_text('{"run": 2}')  # prepare ran again
    second = _run_fingerprint(config, runs, records)
    assert second != first
    _start_or_resume(run_dir, second)
    assert not run_dir.exists()
    assert json.loads((run_dir.parent / ".hybrid_folds.fingerprint.json").read_text()) == second


def test_a_network_without_training_rows_is_refused_and_one_without_validation_rows_warns(tiny_model, tmp_path,
                                                                                          caplog):
    """Records all held out leave nothing to train: refused, naming the network, its records and what to change.
    Records none of which the holdout draws (few units) train every epoch and keep the last, and say so: before,
    every epoch's validation loss read 0 and the first epoch's weights were kept."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from geximpute.errors import GeximputeError
    from geximpute.fit.train import NetworkRun, _network_settings, fold_dirs, holdout
    from geximpute.science.promoters import promoter_inputs
    from geximpute.steps.prepare import read_problem_index

    config = tiny_model.config
    records = tiny_model.records
    gene_ids, tissues = read_problem_index(records)
    _, lookup = promoter_inputs(records, gene_ids, config.promoter.length)
    table = pads.dataset(fold_dirs(records, [0])[0], format="parquet", partitioning="hive").to_table()
    held = holdout(table, "entries", False, config.seed)
    assert 0 < held.sum() < len(held)

    def run_of(rows, name):
        folder = tmp_path / name / "fold=0"
        folder.mkdir(parents=True)
        pq.write_to_dataset(table.filter(pa.array(rows)), folder, partition_cols=["chrom"])  # as prepare writes
        return NetworkRun(f"tiny_{name}", [folder])

    with caplog.at_level("WARNING", logger="geximpute.fit.train"):
        settings = _network_settings(config, run_of(~held, "kept"), gene_ids, len(tissues), lookup)
    assert settings["n_train_genes"] > 0
    assert "tiny_kept: the holdout of the entries task leaves none of its" in caplog.text
    assert "keeps the last" in caplog.text
    with pytest.raises(GeximputeError, match=r"train tiny_held: every one of the \d+ training records in .*held.* "
                                             r"is held out for validation.*nothing is left to train on"):
        _network_settings(config, run_of(held, "held"), gene_ids, len(tissues), lookup)


def test_fit_head_refuses_networks_that_chose_their_epochs_on_another_holdout(tiny_model, caplog):
    """Each trained network records the holdout it chose its epochs on (task, seed, validation chromosomes); a
    head fitted over it with another holdout would be calibrated on rows the network trained on, and is refused,
    naming the setting. The config it was trained with passes."""
    import dataclasses

    from geximpute.errors import ConfigError
    from geximpute.fit.bundle import load_networks
    from geximpute.fit.train import check_holdout

    config = tiny_model.config
    folder = Path(config.output_dir) / "network"
    networks = load_networks(folder)
    assert len(networks) == 2
    assert all(n.metrics["holdout"] == {"task": "entries", "seed": config.seed, "valid_chroms": [], "hash": "mix64"}
               for n in networks)
    # no NaN or Infinity in network.json: strict JSON readers refuse them
    text = (folder / "fold0" / "network.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    check_holdout(networks, config, folder)
    with pytest.raises(ConfigError, match=r"network 0 chose its epochs on the validation units of seed 3, this "
                                          r"config holds out those of 4 \(seed\)"):
        check_holdout(networks, dataclasses.replace(config, seed=config.seed + 1), folder)
    samples = dataclasses.replace(config, evaluation=dataclasses.replace(config.evaluation, task="samples"))
    with pytest.raises(ConfigError, match=r"task 'entries'.*'samples'"):
        check_holdout(networks, samples, folder)
    # trained before the holdout was recorded (and drawn by the old hash): passed, with a warning
    with caplog.at_level("WARNING", logger="geximpute.fit.train"):
        check_holdout([dataclasses.replace(n, metrics={}) for n in networks], samples, folder)
    assert "network 0 records no holdout" in caplog.text and "train it again" in caplog.text


def test_json_written_has_no_nan_or_infinity(tmp_path):
    """A network without validation rows has a NaN loss and an infinite best: written as null."""
    import math

    from geximpute.runtime.provenance import finite_json, write_json

    data = {"val_loss": float("nan"), "best_val": math.inf, "epochs": [1.0, -math.inf, np.float64("nan")],
            "nested": {"x": (2.5, None)}, "name": "n", "f32": np.float32("nan"), "array": np.array([np.nan, 1.0]),
            "count": np.int64(3)}
    assert finite_json(data) == {"val_loss": None, "best_val": None, "epochs": [1.0, None, None],
                                 "nested": {"x": [2.5, None]}, "name": "n", "f32": None, "array": [None, 1.0],
                                 "count": 3}
    write_json(tmp_path / "m.json", data)
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(c))["best_val"] is None


def test_record_folders_read_the_chromosome_as_text(tmp_path):
    """Ensembl's chromosome names (``1``, ``X``) as hive folders: the chromosome stays text, so a fold with a
    record on X and one without concatenate (inferred, ``1`` was read as an integer and ``X`` as text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from geximpute.fit.hybrid import read_training

    for fold, chroms in ((0, ["1"]), (1, ["1", "X"])):
        for chrom in chroms:
            part = tmp_path / f"fold={fold}" / f"chrom={chrom}"
            part.mkdir(parents=True)
            pq.write_table(pa.table({"gene_index": [1], "target": [0.5]}), part / "part-0.parquet")
    table = read_training([tmp_path / "fold=0", tmp_path / "fold=1"])
    assert table.schema.field("chrom").type == pa.string() and sorted(table["chrom"].to_pylist()) == ["1", "1", "X"]


def test_the_head_reads_a_fold_s_records_in_one_order_whatever_the_file_names(tmp_path):
    """prepare's files are named in the order its Ray Data workers finished: the head read its rows in that order,
    and its boosters sample rows by position (the same data and seed gave another head, another model version)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from geximpute.fit.hybrid import read_training

    a = pa.table({"gene_index": [3, 1], "sample_index": [0, 2], "target": [0.3, 0.1]})
    b = pa.table({"gene_index": [2, 1], "sample_index": [5, 0], "target": [0.2, 0.0]})
    tables = []
    for run, (first, second) in enumerate(((a, b), (b, a))):
        part = tmp_path / f"run{run}" / "fold=0" / "chrom=chr1"
        part.mkdir(parents=True)
        pq.write_table(first, part / "part-000000.parquet")
        pq.write_table(second, part / "part-000001.parquet")
        tables.append(read_training([tmp_path / f"run{run}" / "fold=0"]))
    assert tables[0].equals(tables[1])
    entries = zip(tables[0]["gene_index"].to_pylist(), tables[0]["sample_index"].to_pylist(), strict=True)
    assert list(entries) == [(1, 0), (1, 2), (2, 5), (3, 0)]

"""Shards of a problem: the records one shard gives are the whole problem's records, value for value."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from geximpute import schema as S
from geximpute.science.context import ContextIndex, build_context
from geximpute.science.problem import VisibleProblem
from geximpute.science.shards import (
    Block,
    blocks,
    chromosome_spans,
    donor_sample_lists,
    entry_offsets,
    gene_stats,
    halo,
    make_shard,
    shard_records,
)


def random_problem(seed: int = 0, n_genes: int = 300, n_donors: int = 13, n_tissues: int = 4) -> VisibleProblem:
    """Genes on three chromosomes (some sharing a TSS), donors sampled in some tissues only, one donor-tissue
    sample with nothing measured (like an imputed missing profile), and sparse columns, where a gene's K nearest
    visible neighbours lie far away."""
    rng = np.random.default_rng(seed)
    chroms = np.sort(rng.choice(["chr1", "chr2", "chr3"], n_genes, p=[0.6, 0.3, 0.1]))
    tss = np.zeros(n_genes, np.int64)
    for c in np.unique(chroms):
        at = np.flatnonzero(chroms == c)
        tss[at] = np.sort(rng.integers(1_000, 2_000_000, len(at)))
        tss[at[5]] = tss[at[4]]  # two genes sharing a TSS
    strand = rng.choice(np.array([-1, 1], np.int8), n_genes)
    start = tss - rng.integers(0, 5_000, n_genes)
    end = tss + rng.integers(0, 5_000, n_genes)
    pairs = [(d, t) for d in range(n_donors) for t in range(n_tissues) if rng.random() < 0.7]
    donor_index = np.array([d for d, _ in pairs], np.int32)
    tissue_index = np.array([t for _, t in pairs], np.int32)
    order = np.lexsort((donor_index, tissue_index))  # samples ordered by tissue, as impute orders them
    donor_index, tissue_index = donor_index[order], tissue_index[order]
    values = rng.normal(size=(n_genes, len(pairs))).astype(np.float32)
    values[rng.random(values.shape) < 0.3] = np.nan
    values[:, 3] = np.nan  # a sample with nothing measured
    values[rng.random(n_genes) < 0.2, 5] = np.nan
    values[: n_genes - 10, 7] = np.nan  # a sample with ten visible genes
    corr = rng.uniform(0.1, 0.9, (n_tissues, n_tissues)).astype(np.float32)
    return VisibleProblem(
        gene_ids=np.array([f"g{i}" for i in range(n_genes)], dtype=object),
        chroms=chroms.astype(object), tss=tss, start=start, end=end, strand=strand,
        split=rng.integers(0, 3, n_genes).astype(np.int8),
        sample_ids=np.array([f"s{i}" for i in range(len(pairs))], dtype=object),
        donor_index=donor_index, tissue_index=tissue_index,
        donors=[f"D{d}" for d in range(n_donors)], tissues=[f"T{t}" for t in range(n_tissues)],
        values=values, tissue_corr=(corr + corr.T) / 2,
    )


def sorted_table(table: pa.Table) -> pa.Table:
    return table.sort_by([("gene_index", "ascending"), ("sample_index", "ascending")])


@pytest.mark.parametrize(("genes_per_block", "block_entries", "max_distance"),
                         [(40, 150, None), (1024, 400, None), (17, 60, 300_000)])
def test_shard_records_are_the_whole_problems_records(genes_per_block, block_entries, max_distance):
    problem = random_problem()
    rng = np.random.default_rng(1)
    k = 4
    targets = np.isnan(problem.values) | (rng.random(problem.values.shape) < 0.1)
    hidden = targets & (rng.random(targets.shape) < 0.5)
    genetic = rng.normal(size=(problem.n_genes, len(problem.donors))).astype(np.float32)
    labels = rng.normal(size=problem.values.shape).astype(np.float32)
    grid = rng.normal(size=problem.values.shape).astype(np.float32)

    gi, si = np.nonzero(targets)
    whole = build_context(ContextIndex(problem, genetic=genetic), gi, si, hidden[gi, si], k, max_distance)
    g, s = whole["gene_index"].to_numpy(), whole["sample_index"].to_numpy()  # records come ordered by sample
    whole = whole.set_column(whole.schema.get_field_index("target"), "target", pa.array(labels[g, s]))
    whole = sorted_table(whole.append_column("extra", pa.array(grid[g, s])))

    stats = gene_stats(problem, rows=64)  # several passes: the statistics do not depend on them
    spans = chromosome_spans(problem.chroms)
    donor_samples = donor_sample_lists(problem)
    cut = blocks(problem, targets, block_entries, genes_per_block)
    offsets = entry_offsets(targets)
    assert sum(b.entries for b in cut) == int(targets.sum())
    assert all(b.hi - b.lo <= genes_per_block for b in cut)
    assert all(problem.chroms[b.lo] == problem.chroms[b.hi - 1] for b in cut)
    parts = []
    for block in cut:
        span = next(s for s in spans if s[0] <= block.lo < s[1])
        shard = make_shard(problem, block, span, donor_samples, stats, targets, hidden, k, genetic=genetic,
                           labels=labels, columns={"extra": grid[gi, si]}, entry_offsets=offsets)
        assert shard.problem.n_samples < problem.n_samples  # a shard holds only its donors' samples
        parts.append(shard_records(shard, k, max_distance))
    sharded = sorted_table(pa.concat_tables(parts))
    assert sharded.num_rows == whole.num_rows
    for name in whole.column_names:
        assert sharded[name].equals(whole[name]), name


def test_gene_stats_do_not_depend_on_the_pass_size():
    problem = random_problem(seed=3)
    one, many = gene_stats(problem), gene_stats(problem, rows=7)
    np.testing.assert_array_equal(one.tissue_sum, many.tissue_sum)
    np.testing.assert_array_equal(one.gene_n, many.gene_n)
    np.testing.assert_allclose(one.tissue_offset, many.tissue_offset, rtol=1e-6)


def test_halo_reaches_k_plus_one_visible_genes_on_each_side():
    problem = random_problem(seed=2)
    first, end = chromosome_spans(problem.chroms)[0]
    k = 3
    block = Block(first + 50, first + 75, 0, len(problem.donors), 0)
    samples = np.arange(problem.n_samples)
    lo, hi = halo(problem, block, samples, first, end, k)
    assert first <= lo <= block.lo and block.hi <= hi <= end
    for s in samples:
        visible = ~np.isnan(problem.values[:, s])
        before = visible[first : block.lo].sum()
        after = visible[block.hi : end].sum()
        # every sample keeps k + 2 visible genes on a side, or all the chromosome has there
        assert visible[lo : block.lo].sum() >= min(before, k + 2)
        assert visible[block.hi : hi].sum() >= min(after, k + 2)
    # a sample with nothing measured (a profile imputed whole) needs no neighbour rows at all
    assert halo(problem, block, np.array([3]), first, end, k) == (block.lo, block.hi)
    # and no further than the sample that needs the most
    assert lo == first or any(
        (~np.isnan(problem.values[lo + 1 : block.lo, s])).sum() < k + 2 for s in samples)


def test_shard_records_carry_the_whole_problems_family_level():
    """A gene's family reads genes on other chromosomes: the shards carry each target's level computed from the
    whole problem, the same value the whole problem gives it, null for a gene without a family."""
    from geximpute.science.baselines import FamilyLevels

    problem = random_problem(seed=2)
    stems = np.array(["RPL10", "RPL11", "SLC25A", "OR2A", None], dtype=object)
    names = np.array([None if stems[i % 5] is None else f"{stems[i % 5]}{i}" for i in range(problem.n_genes)],
                     dtype=object)
    problem = dataclasses.replace(problem, gene_names=names)
    rng = np.random.default_rng(3)
    targets = np.isnan(problem.values) | (rng.random(problem.values.shape) < 0.1)
    levels = FamilyLevels(problem.values, names, problem.tissue_index, len(problem.tissues))
    level = functools.partial(levels.level, shrinkage=3.0)
    stats, spans, donor_samples = gene_stats(problem), chromosome_spans(problem.chroms), donor_sample_lists(problem)
    parts = []
    for block in blocks(problem, targets, 200, 50):
        span = next(s for s in spans if s[0] <= block.lo < s[1])
        shard = make_shard(problem, block, span, donor_samples, stats, targets, np.zeros_like(targets), 4,
                           family=level)
        parts.append(shard_records(shard, 4, None))
    records = pa.concat_tables(parts)
    g, s = records["gene_index"].to_numpy(), records["sample_index"].to_numpy()
    assert records.num_rows == int(targets.sum())
    got = records[S.FAMILY_LEVEL].to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(got, level(g, s).astype(np.float32), equal_nan=True)
    assert np.isnan(got[names[g] == None]).all() and np.isfinite(got[names[g] != None]).all()  # noqa: E711
    assert len(np.unique(problem.chroms[g])) == 3  # blocks of every chromosome, each level from all of them


def test_context_shards_write_the_family_level_when_asked_and_unknown_without_symbols(tmp_path):
    """What `prepare` and `impute` cut: with ``family`` every record carries the column, the whole problem's level
    where the genes have symbols and null throughout where they have none (a model that reads the family, imputing
    data without symbols); without it, no column."""
    from geximpute.config import config_from_dict
    from geximpute.science.baselines import family_levels
    from geximpute.steps.prepare import context_shards, read_shard

    config = config_from_dict({"inputs": {"genes": "g.tsv", "expression": "e.tsv"}}, base_dir=tmp_path)
    problem = random_problem(seed=4)
    named = dataclasses.replace(problem, gene_names=np.array([f"KRT{i % 9}" for i in range(problem.n_genes)],
                                                             dtype=object))
    targets = np.isnan(problem.values)

    def records(p, family, name):
        paths, _ = context_shards(config, p, targets, targets, tmp_path / name, family=family)
        return pa.concat_tables([shard_records(read_shard(path), 4, None) for path in paths])

    with_names = records(named, True, "named")
    g, s = with_names["gene_index"].to_numpy(), with_names["sample_index"].to_numpy()
    expected = family_levels(named).level(g, s, config.context.family_shrinkage).astype(np.float32)
    np.testing.assert_allclose(with_names[S.FAMILY_LEVEL].to_numpy(zero_copy_only=False), expected)
    unnamed = records(problem, True, "unnamed")
    assert unnamed.num_rows == int(targets.sum()) and unnamed[S.FAMILY_LEVEL].null_count == unnamed.num_rows
    assert S.FAMILY_LEVEL not in records(named, False, "off").column_names


@pytest.mark.parametrize("remote", [False, True])
def test_context_shards_cut_per_chromosome_are_the_whole_problems(tmp_path, request, remote):
    """Each chromosome's shards are cut from its rows alone (in Ray tasks or in process): the shards of a cut of
    the whole problem, array for array, with per-entry columns from arrays and from range files whose ranges
    straddle the chromosomes, labels and the family level."""
    from geximpute.config import config_from_dict
    from geximpute.io.matrixfile import MatrixFile
    from geximpute.science.baselines import family_levels
    from geximpute.science.shards import RangeFileColumns
    from geximpute.steps.prepare import context_shards, read_shard

    if remote:
        request.getfixturevalue("ray_local")
    config = config_from_dict({"inputs": {"genes": "g.tsv", "expression": "e.tsv"}}, base_dir=tmp_path)
    k = config.context.k_neighbours
    problem = random_problem(seed=6)
    problem = dataclasses.replace(problem, gene_names=np.array([f"KRT{i % 7}" for i in range(problem.n_genes)],
                                                               dtype=object))
    rng = np.random.default_rng(2)
    targets = np.isnan(problem.values) | (rng.random(problem.values.shape) < 0.1)
    hidden = targets & (rng.random(targets.shape) < 0.5)
    labels = rng.normal(size=problem.values.shape).astype(np.float32)
    n = int(targets.sum())
    arrays = {"baseline_a": rng.normal(size=n).astype(np.float32)}
    starts = np.array([0, n // 3, n // 3 + 5, n])  # three ranges, none on a chromosome's edge
    files = []
    for r in range(3):
        files.append(str(tmp_path / f"range-{r}.npz"))
        np.savez(files[-1], baseline_a=arrays["baseline_a"][starts[r] : starts[r + 1]])
    in_files = RangeFileColumns(["baseline_a"], files, starts)

    # the cut before chromosomes were cut apart: every block's shard from the whole problem
    stats, spans, donor_samples = gene_stats(problem), chromosome_spans(problem.chroms), donor_sample_lists(problem)
    level = functools.partial(family_levels(problem).level, shrinkage=config.context.family_shrinkage)
    offsets = entry_offsets(targets)
    expected = []
    for block in blocks(problem, targets, 120):
        span = next(sp for sp in spans if sp[0] <= block.lo < sp[1])
        expected.append(make_shard(problem, block, span, donor_samples, stats, targets, hidden, k, labels=labels,
                                   columns=arrays, entry_offsets=offsets, family=level))
    assert len({problem.chroms[sh.gene_offset] for sh in expected}) == 3
    # the problem's matrix in a file (impute's): each chromosome's task reads its rows from it
    on_disk = dataclasses.replace(problem, values=MatrixFile.from_array(tmp_path / "matrix.f32", problem.values))
    targets_file = MatrixFile.from_array(tmp_path / "targets.bool", targets)
    for name, columns, given, mask in (("arrays", arrays, problem, targets), ("files", in_files, problem, targets),
                                       ("matrix", arrays, on_disk, targets_file)):
        paths, cut = context_shards(config, given, mask, hidden, tmp_path / name, labels=labels,
                                    columns=columns, block_entries=120, family=True, remote=remote)
        assert len(paths) == len(cut) == len(expected)
        assert sorted(str(f) for f in (tmp_path / name).iterdir()) == sorted(paths)  # no chromosome file left
        for path, want in zip(paths, expected, strict=True):
            got = read_shard(path)
            assert got.gene_offset == want.gene_offset
            np.testing.assert_array_equal(got.samples, want.samples)
            for field in ("values", "gene_ids", "tss", "donor_index", "tissue_index"):
                np.testing.assert_array_equal(getattr(got.problem, field), getattr(want.problem, field))
            for field in ("targets", "hidden", "labels"):
                np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
            for field in ("gene_sum", "gene_n", "tissue_sum", "tissue_n", "tissue_offset"):
                np.testing.assert_array_equal(getattr(got.stats, field), getattr(want.stats, field))
            assert sorted(got.columns) == sorted(want.columns) == ["baseline_a", S.FAMILY_LEVEL]
            for column, values in want.columns.items():
                np.testing.assert_array_equal(got.columns[column], values)


def test_a_folds_shards_from_a_matrix_file_are_its_in_memory_shards(tmp_path):
    """A training fold of a problem kept in a matrix file (`prepare`'s, since the matrix left its driver) is a view
    of the same file that hides the fold's entries as it reads; its shards, cut from the chromosomes' windows with the
    labels read from the unhidden file, are those of the in-memory fold, array for array; the values' file is not
    changed, and the fold's mask file goes when it is forgotten. (A window of such a view read after pickling, as a
    Ray task reads it: `tests/test_readers.py`; chromosome windows cut in Ray tasks: the test above.)"""
    from geximpute.config import config_from_dict
    from geximpute.io.matrixfile import MatrixFile
    from geximpute.science.folds import fold_problem, forget_fold
    from geximpute.steps.prepare import context_shards, read_shard

    config = config_from_dict({"inputs": {"genes": "g.tsv", "expression": "e.tsv"}}, base_dir=tmp_path)
    problem = random_problem(seed=7)
    rng = np.random.default_rng(5)
    fold = ~np.isnan(problem.values) & (rng.random(problem.values.shape) < 0.3)
    targets = fold & (rng.random(fold.shape) < 0.7)
    memory = fold_problem(problem, fold)
    expected, _ = context_shards(config, memory, targets, fold, tmp_path / "memory", labels=problem.values,
                                 block_entries=120, remote=False)
    on_disk = dataclasses.replace(problem, values=MatrixFile.from_array(tmp_path / "matrix.f32", problem.values))
    disk_fold = fold_problem(on_disk, fold)
    assert isinstance(disk_fold.values, MatrixFile) and disk_fold.values.hidden is not None
    np.testing.assert_array_equal(disk_fold.values.read(), memory.values)
    np.testing.assert_array_equal(disk_fold.tissue_corr, memory.tissue_corr)
    paths, _ = context_shards(config, disk_fold, targets, fold, tmp_path / "disk", labels=on_disk.values,
                              block_entries=120, remote=False)
    assert len(paths) == len(expected) > 3
    for path, want_path in zip(paths, expected, strict=True):
        got, want = read_shard(path), read_shard(want_path)
        assert got.gene_offset == want.gene_offset
        np.testing.assert_array_equal(got.problem.values, want.problem.values)
        np.testing.assert_array_equal(got.problem.tissue_corr, want.problem.tissue_corr)
        for field in ("targets", "hidden", "labels", "samples"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
        for field in ("gene_sum", "gene_n", "tissue_sum", "tissue_n", "tissue_offset"):
            np.testing.assert_array_equal(getattr(got.stats, field), getattr(want.stats, field))
    np.testing.assert_array_equal(on_disk.values.read(), problem.values)  # the values' file as it was
    mask = disk_fold.values.hidden.path
    forget_fold(disk_fold)
    assert not Path(mask).exists() and Path(on_disk.values.path).exists()


def test_the_halo_scan_in_steps_takes_the_rows_the_whole_count_took():
    """`_reach` scans a side's rows a step at a time, nearest first, and stops where every sample has its K + 2
    visible values: the rows a cumulative count over the whole side gave, for samples with many, few, one and no
    visible values, on either side, whatever the step."""
    from geximpute.science.shards import _reach

    def whole(values: np.ndarray, need: int) -> int:  # the count over every row at once (before the steps)
        if not len(values):
            return 0  # (never asked: a side without rows is not scanned)
        counts = np.cumsum(~np.isnan(values), axis=0)
        wanted = np.minimum(counts[-1], need)
        has = wanted > 0
        return int(np.argmax(counts[:, has] >= wanted[has], axis=0).max()) + 1 if has.any() else 0

    rng = np.random.default_rng(11)
    for trial in range(60):
        n_rows, n_samples = int(rng.integers(1, 40)), int(rng.integers(1, 9))
        values = rng.normal(size=(n_rows, n_samples + 3))
        density = rng.choice([0.05, 0.3, 0.9], size=n_samples + 3)
        values[rng.random(values.shape) > density] = np.nan
        values[:, 0] = np.nan  # a sample with nothing visible (a profile imputed whole)
        samples = np.sort(rng.choice(n_samples + 3, size=n_samples, replace=False))
        lo, hi = sorted(int(x) for x in rng.integers(0, n_rows + 1, size=2))
        need = int(rng.integers(1, 6))
        for cells in (1, 7, 1 << 22):
            assert _reach(values, lo, hi, samples, need, backwards=True, cells=cells) == whole(
                values[lo:hi, samples][::-1], need), (trial, cells)
            assert _reach(values, lo, hi, samples, need, backwards=False, cells=cells) == whole(
                values[lo:hi, samples], need), (trial, cells)

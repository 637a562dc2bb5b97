"""Self-contained shards of a problem: what one context task reads to build the records of one block of entries.

A block is a run of at most :data:`GENES_PER_BLOCK` consecutive genes of one chromosome by a range of donors (all
their samples). Its records need, and its :class:`Shard` holds, only:

- the values of the block's genes in the donors' samples (a gene's context in a sample is its own values in the
  donor's other samples, :func:`geximpute.science.context.build_context`);
- around the block, the genes of the same chromosome whose values can be a target's neighbours: the K + 1 visible
  genes on either side of the block in each target sample (neighbour context never crosses a chromosome), found
  from the visible values (the *halo*, :func:`halo`);
- the per-gene statistics over every sample (:class:`GeneStats`: a gene's sum and count in each tissue), computed
  once for the problem and sliced, since a gene's mean in a tissue over the other donors reads donors outside the
  block;
- the donors' cis-genetic scores of those genes, the target / hidden masks, the labels and extra per-entry columns
  (a stacked model's baseline estimates; the family level of each target, which reads genes of other
  chromosomes and is therefore computed by whoever cuts the shards) of the block.

So a shard's size depends on the block's entries, not on the genome or the cohort: a context task that fetches one
shard at a time holds about the same memory at 1,000 genes x 100 donors as at 20,000 x 1,000, and no process but the
one that cuts the shards maps the whole matrix. The records a shard gives are the whole problem's records, value
for value (``tests/test_shards.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pyarrow as pa

from geximpute import schema as S
from geximpute.io.matrixfile import MatrixFile, row_sums
from geximpute.science.groups import group_sums
from geximpute.science.problem import VisibleProblem, gene_rows, pass_rows

if TYPE_CHECKING:
    from geximpute.science.genomes import OwnValueScores

#: genes of one block at most (a chromosome with more is cut into several blocks, each with its halo)
GENES_PER_BLOCK = 1024
#: gene rows per pass of :func:`gene_stats` at most (a pass is also bounded in cells:
#: :data:`geximpute.science.problem.STATS_CELLS`)
STATS_ROWS = 4096


@dataclass
class GeneStats:
    """Per-gene sums over every visible sample of a problem, which a gene's context reads across donors.

    Attributes:
        gene_sum, gene_n: (G,) sum and count of each gene's visible values.
        tissue_sum, tissue_n: (G, T) the same per tissue.
        tissue_offset: (T,) float32 mean residual (value minus the gene's mean) of each tissue over every visible
            entry.
    """

    gene_sum: np.ndarray
    gene_n: np.ndarray
    tissue_sum: np.ndarray
    tissue_n: np.ndarray
    tissue_offset: np.ndarray

    def rows(self, lo: int, hi: int) -> GeneStats:
        """The statistics of genes ``lo:hi`` (copies: a shard must not pin the whole problem's arrays)."""
        return GeneStats(self.gene_sum[lo:hi].copy(), self.gene_n[lo:hi].copy(), self.tissue_sum[lo:hi].copy(),
                         self.tissue_n[lo:hi].copy(), self.tissue_offset)


def gene_stats(problem: VisibleProblem, rows: int = STATS_ROWS) -> GeneStats:
    """:class:`GeneStats` of ``problem``, at most ``rows`` genes and
    :data:`~geximpute.science.problem.STATS_CELLS` cells at a time (float64 temporaries of that size only). Each
    gene's sums are its own row's, whatever the passes; the tissue offsets sum the passes' parts."""
    n_genes, n_tissues = problem.n_genes, len(problem.tissues)
    rows = pass_rows(problem.n_samples, rows)
    tissue_sum = np.zeros((n_genes, n_tissues))
    tissue_n = np.zeros((n_genes, n_tissues))
    gene_sum = np.zeros(n_genes, np.float32)
    gene_n = np.zeros(n_genes)
    r_sum = np.zeros(n_tissues)
    r_n = np.zeros(n_tissues)
    for lo in range(0, n_genes, rows):
        values = problem.values[lo : lo + rows]
        visible = ~np.isnan(values)
        filled = np.where(visible, values, 0.0)
        tissue_sum[lo : lo + rows], tissue_n[lo : lo + rows] = group_sums(values, problem.tissue_index, n_tissues)
        gene_sum[lo : lo + rows] = filled.sum(axis=1)
        gene_n[lo : lo + rows] = visible.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(gene_n[lo : lo + rows] > 0, gene_sum[lo : lo + rows] / gene_n[lo : lo + rows], np.nan)
            resid = np.where(visible, values - mean[:, None], 0.0)
        np.add.at(r_sum, problem.tissue_index, resid.sum(axis=0))
        np.add.at(r_n, problem.tissue_index, visible.sum(axis=0))
    offset = np.where(r_n > 0, r_sum / np.maximum(r_n, 1), 0.0).astype(np.float32)
    return GeneStats(gene_sum, gene_n, tissue_sum, tissue_n, offset)


@dataclass(frozen=True)
class Block:
    """Genes ``lo:hi`` (one chromosome) x donors ``donor_lo:donor_hi``; ``entries`` target entries."""

    lo: int
    hi: int
    donor_lo: int
    donor_hi: int
    entries: int


def chromosome_spans(chroms: np.ndarray) -> list[tuple[int, int]]:
    """(first, end) gene rows of each chromosome of a problem sorted by chromosome."""
    if len(chroms) == 0:
        return []
    cuts = np.flatnonzero(chroms[1:] != chroms[:-1]) + 1
    bounds = np.concatenate([[0], cuts, [len(chroms)]])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def blocks(problem: VisibleProblem, targets: np.ndarray, block_entries: int,
           genes_per_block: int = GENES_PER_BLOCK) -> list[Block]:
    """The blocks of ``targets`` ((G, S) bool): runs of at most ``genes_per_block`` genes of one chromosome, each
    cut into ranges of consecutive donors holding about ``block_entries`` target entries (at least one donor per
    block). Blocks without a target are left out."""
    n_donors = len(problem.donors)
    out = []
    for first, end in chromosome_spans(problem.chroms):
        n_runs = -(-(end - first) // genes_per_block)
        cuts = np.linspace(first, end, n_runs + 1).round().astype(int)
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            per_donor = np.bincount(problem.donor_index, weights=targets[lo:hi].sum(axis=0),
                                    minlength=n_donors).astype(np.int64)
            start, acc = 0, 0
            for d in range(n_donors):
                acc += int(per_donor[d])
                if acc >= block_entries or d == n_donors - 1:
                    if acc:
                        out.append(Block(lo, hi, start, d + 1, acc))
                    start, acc = d + 1, 0
    return out


def halo(problem: VisibleProblem, block: Block, samples: np.ndarray, first: int, end: int, k: int) -> tuple[int, int]:
    """Gene rows ``(lo, hi)`` around ``block`` (within the chromosome's rows ``first:end``) that hold every possible
    neighbour of the block's targets in ``samples``: in each sample, K + 1 visible genes before the block (before
    the first gene sharing the block's first TSS) and K + 1 at or after its last gene, plus one on either side; in a
    sample with fewer visible genes on a side, all it has there (none for a profile imputed whole: without that
    bound such a sample would stretch every block of its donor over its whole chromosome)."""
    need = k + 2
    tss = problem.tss
    left_of = block.lo
    while left_of > first and tss[left_of - 1] == tss[block.lo]:
        left_of -= 1
    lo, hi = block.lo, block.hi
    if len(samples) == 0:
        return left_of, hi
    if left_of > first:
        lo = left_of - _reach(problem.values, first, left_of, samples, need, backwards=True)  # nearest first
    lo = min(lo, left_of)
    if hi < end:
        hi = block.hi + _reach(problem.values, hi, end, samples, need, backwards=False)
    return lo, hi


#: cells of ``values`` per step of :func:`_reach`'s scan
REACH_CELLS = 1 << 22


def _reach(values: np.ndarray, lo: int, hi: int, samples: np.ndarray, need: int, *, backwards: bool,
           cells: int | None = None) -> int:
    """Rows of ``values[lo:hi]`` to take, nearest first (from ``hi - 1`` down when ``backwards``, else from ``lo``
    up), so that every sample (the columns ``samples``) has ``need`` visible values among them, or all it has.

    The rows are scanned a step of at most ``cells`` cells (:data:`REACH_CELLS`) at a time, nearest first, and the
    scan stops where every sample has what it needs: a block's halo reads the rows it reaches, not its chromosome's
    every row at once (at 17,382 samples a cumulative count of a 10,000-gene chromosome's rows was 2.8 GB).
    """
    n, n_samples = hi - lo, len(samples)
    if n <= 0 or n_samples == 0:
        return 0
    step = max(1, (cells or REACH_CELLS) // n_samples)
    counts = np.zeros(n_samples, np.int64)  # visible values so far, per sample
    reached = np.full(n_samples, -1, np.int64)  # the row (nearest first) where the sample had ``need``
    last = np.full(n_samples, -1, np.int64)  # the row of the sample's farthest visible value so far
    for r0 in range(0, n, step):
        m = min(step, n - r0)
        chunk = values[hi - r0 - m : hi - r0][::-1] if backwards else values[lo + r0 : lo + r0 + m]
        visible = ~np.isnan(chunk[:, samples])
        running = np.cumsum(visible, axis=0, dtype=np.int64)
        running += counts
        open_ = reached < 0
        hit = open_ & (running[-1] >= need)
        reached[hit] = r0 + np.argmax(running[:, hit] >= need, axis=0)
        any_visible = visible.any(axis=0)
        last[any_visible] = r0 + m - 1 - np.argmax(visible[::-1, any_visible], axis=0)
        counts = running[-1]
        if (reached >= 0).all():
            break
    rows = np.where(reached >= 0, reached, last)  # fewer than ``need``: all it has, to its farthest one
    return int(rows.max()) + 1 if (rows >= 0).any() else 0


@dataclass
class Shard:
    """What one block's records are built from (:func:`make_shard`); ``problem`` is the block's own small problem
    (its rows: the block's genes and their halo; its samples: the block's donors' samples, in the whole problem's
    order; its donors: those donors)."""

    problem: VisibleProblem
    stats: GeneStats
    genetic: np.ndarray | None  # (G_local, D_local) cis-genetic scores or None
    targets: np.ndarray  # (G_local, S_local) bool: the block's target entries (none in the halo rows)
    hidden: np.ndarray  # (G_local, S_local) bool
    gene_offset: int  # the whole problem's index of local gene 0
    samples: np.ndarray  # (S_local,) the whole problem's sample indices
    labels: np.ndarray | None = None  # (G_local, S_local) float32: each record's ``target`` instead of its value
    #: name -> (N,) float32, one value per target entry in ``np.nonzero(targets)`` order (not a (G_local, S_local) grid:
    #: a block's targets are a few percent of its rows' cells where most are measured)
    columns: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    #: (N,) float32 in the same order: a measured target's cis-genetic score fitted without its own value (NaN for
    #: the others), which its record reads in place of ``genetic``'s; None without ``include_observed``
    own_genetic: np.ndarray | None = None


def donor_sample_lists(problem: VisibleProblem) -> list[np.ndarray]:
    """The sample indices of each donor, in increasing order."""
    order = np.argsort(problem.donor_index, kind="stable")
    bounds = np.searchsorted(problem.donor_index[order], np.arange(len(problem.donors) + 1))
    return [order[bounds[d] : bounds[d + 1]] for d in range(len(problem.donors))]


def make_shard(
    problem: VisibleProblem,
    block: Block,
    span: tuple[int, int],
    donor_samples: list[np.ndarray],
    stats: GeneStats,
    targets: np.ndarray,
    hidden: np.ndarray,
    k: int,
    genetic: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    columns: EntryColumns | dict[str, np.ndarray] | None = None,
    entry_offsets: np.ndarray | None = None,
    family: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    own_genetic: OwnValueScores | None = None,
) -> Shard:
    """Cut the :class:`Shard` of ``block`` out of the whole problem (the arrays it holds are copies).

    Args:
        problem: the whole visible problem (its ``genomes`` are not carried: the cis-genetic scores are).
        block: the block; ``span``: its chromosome's gene rows (:func:`chromosome_spans`).
        donor_samples: :func:`donor_sample_lists` of ``problem``.
        stats: :func:`gene_stats` of ``problem``.
        targets, hidden: (G, S) bool masks of the whole problem.
        k: neighbours per target (the halo's width in visible genes).
        genetic: (G, D) cis-genetic scores, or None.
        labels: (G, S) values each record carries as its ``target``, or None.
        columns: ``{name: (N,) float32}`` or :class:`EntryColumns`, one value per target entry in
            ``np.nonzero(targets)`` order, each record's in its column ``name`` (the whole problem never needs a
            (G, S) grid of them).
        entry_offsets: (G + 1,) :func:`entry_offsets` of ``targets``; required with ``columns``.
        family: the family level of entries given by their whole-problem (gene, sample) indices
            (:meth:`geximpute.science.baselines.FamilyLevels.level`), each record's in the column
            :data:`geximpute.schema.FAMILY_LEVEL`; None: no such column.
        own_genetic: the cis-genetic scores of the target entries measured in ``problem`` fitted without their own
            values (:func:`geximpute.science.genomes.own_value_free_scores`, on ``problem``'s gene rows): those
            records read them instead of ``genetic``'s (:func:`shard_records`).
    """
    samples = np.concatenate(donor_samples[block.donor_lo : block.donor_hi]) if block.donor_hi > block.donor_lo \
        else np.zeros(0, np.int64)
    samples = np.sort(samples)
    block_targets = targets[block.lo : block.hi][:, samples]
    target_samples = samples[block_targets.any(axis=0)]
    lo, hi = halo(problem, block, target_samples, span[0], span[1], k)
    rows = slice(lo, hi)
    local_targets = np.zeros((hi - lo, len(samples)), bool)
    local_targets[block.lo - lo : block.hi - lo] = block_targets
    donors = np.arange(block.donor_lo, block.donor_hi)
    block_columns = _block_columns(columns or {}, entry_offsets, targets, block, samples)
    if family is not None:  # in np.nonzero order of the block's targets, as the columns above
        gi, si = np.nonzero(block_targets)
        block_columns[S.FAMILY_LEVEL] = np.asarray(family(gi + block.lo, samples[si]), np.float32)
    own = None
    if own_genetic is not None:  # in np.nonzero order of the block's targets, as the columns above
        gi, si = np.nonzero(block_targets)
        at_gene, at_sample = gi + block.lo, samples[si]
        measured = ~np.isnan(problem.values[at_gene, at_sample])
        if measured.any():
            own = np.full(len(gi), np.nan, np.float32)
            at_gene, at_sample = at_gene[measured], at_sample[measured]
            own[measured] = own_genetic.at(at_gene, at_sample, problem.donor_index[at_sample])
    local = dataclasses.replace(
        gene_rows(problem, lo, hi),
        sample_ids=problem.sample_ids[samples],
        donor_index=(problem.donor_index[samples] - block.donor_lo).astype(problem.donor_index.dtype),
        tissue_index=problem.tissue_index[samples],
        donors=[problem.donors[d] for d in donors],
        values=np.ascontiguousarray(problem.values[rows][:, samples]),
    )
    return Shard(
        problem=local,
        stats=stats.rows(lo, hi),
        genetic=None if genetic is None else np.ascontiguousarray(genetic[rows][:, donors]),
        targets=local_targets,
        hidden=np.ascontiguousarray(hidden[rows][:, samples]) & local_targets,
        gene_offset=lo,
        samples=samples,
        labels=None if labels is None else np.ascontiguousarray(labels[rows][:, samples]),
        columns=block_columns,
        own_genetic=own,
    )


def entry_offsets(targets: np.ndarray | MatrixFile) -> np.ndarray:
    """(G + 1,) the position in ``np.nonzero(targets)`` order of each gene's first target entry (and their count);
    a mask in a file is summed a pass of rows at a time."""
    offsets = np.zeros(len(targets) + 1, np.int64)
    np.cumsum(row_sums(targets), out=offsets[1:])
    return offsets


class EntryColumns(Protocol):
    """Columns of one value per target entry of a problem, in ``np.nonzero(targets)`` order, that a shard takes
    its block's values from: :class:`ArrayColumns` (in memory) or :class:`RangeFileColumns` (in files)."""

    @property
    def names(self) -> list[str]: ...

    def take(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """``{name: values at positions}``."""
        ...

    def window(self, lo: int, hi: int) -> EntryColumns:
        """The columns of entries ``lo:hi`` alone, their positions counted from ``lo``."""
        ...


class ArrayColumns:
    """:class:`EntryColumns` of arrays in memory."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    @property
    def names(self) -> list[str]:
        return list(self.arrays)

    def take(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        return {name: values[positions] for name, values in self.arrays.items()}

    def window(self, lo: int, hi: int) -> ArrayColumns:
        return ArrayColumns({name: values[lo:hi] for name, values in self.arrays.items()})


class RangeFileColumns:
    """:class:`EntryColumns` kept in files, one per consecutive range of target entries (a ``.npz`` of one array
    per column, written by whoever computed that range, e.g. the stacked baselines of a gene range in
    :func:`geximpute.steps.impute.baseline_columns`). One range's file is held in memory at a time: shards come in
    gene order, so each file is read about once.

    Args:
        names: the columns, in order.
        files: the file of each range.
        starts: (R + 1,) the position of each range's first entry, then the number of entries.
    """

    def __init__(self, names: list[str], files: list[str], starts: np.ndarray) -> None:
        self._names, self.files, self.starts = list(names), list(files), np.asarray(starts, np.int64)
        self._loaded: tuple[int, dict[str, np.ndarray]] | None = None

    @property
    def names(self) -> list[str]:
        return self._names

    def _range(self, r: int) -> dict[str, np.ndarray]:
        if self._loaded is None or self._loaded[0] != r:
            self._loaded = None  # the previous range goes before the next is read
            with np.load(self.files[r]) as data:
                self._loaded = (r, {name: data[name] for name in self._names})
        return self._loaded[1]

    def window(self, lo: int, hi: int) -> RangeFileColumns:
        """The ranges that hold entries ``lo:hi``, their starts counted from ``lo`` (none of their files read)."""
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        last = max(first + 1, int(np.searchsorted(self.starts, hi, side="left")))
        return RangeFileColumns(self._names, self.files[first:last],
                                np.append(self.starts[first:last], hi) - lo)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaded": None}  # a copy (a task's argument) reads its own ranges

    def take(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        positions = np.asarray(positions, np.int64)
        out = {name: np.full(len(positions), np.nan, np.float32) for name in self._names}
        which = np.searchsorted(self.starts, positions, side="right") - 1
        for r in np.unique(which):
            at = which == r
            values = self._range(int(r))
            for name in self._names:
                out[name][at] = values[name][positions[at] - self.starts[r]]
        return out


def _block_columns(columns: EntryColumns | dict[str, np.ndarray], offsets: np.ndarray | None, targets: np.ndarray,
                   block: Block, samples: np.ndarray) -> dict[str, np.ndarray]:
    """``columns`` (one value per target entry of the whole problem) at the block's target entries, in the
    ``np.nonzero`` order of the block's shard targets (its halo rows have none)."""
    if isinstance(columns, dict):
        columns = ArrayColumns(columns)
    if not columns.names:
        return {}
    if offsets is None:
        raise ValueError("columns per target entry need the entry_offsets of the targets")
    rows = targets[block.lo : block.hi]
    rank = np.cumsum(rows, axis=1) - 1  # each target's place among its gene's targets
    position = (offsets[block.lo : block.hi, None] + rank)[:, samples]
    return {name: np.asarray(values, np.float32) for name, values in columns.take(position[rows[:, samples]]).items()}


def shard_records(shard: Shard, k: int, max_distance: int | None) -> pa.Table:
    """The context records of a shard's targets, indexed in the whole problem (``gene_index``, ``sample_index``),
    with its labels as ``target`` and its extra columns appended."""
    from geximpute.science.context import ContextIndex, build_context

    gi, si = np.nonzero(shard.targets)
    index = ContextIndex(shard.problem, genetic=shard.genetic, stats=shard.stats)
    table = build_context(index, gi, si, shard.hidden[gi, si], k, max_distance)
    g = table["gene_index"].to_numpy().astype(np.int64)
    s = table["sample_index"].to_numpy().astype(np.int64)
    if shard.labels is not None:
        # training folds: the label of a re-hidden entry is its visible value in the outer problem
        label = pa.array(shard.labels[g, s], pa.float32(), from_pandas=True)
        table = table.set_column(table.schema.get_field_index("target"), "target", label)
    if shard.columns or shard.own_genetic is not None:  # each record's place among the targets, np.nonzero order
        width = shard.targets.shape[1]  # gi, si above are in that order: their flat indices are sorted
        place = np.searchsorted(gi.astype(np.int64) * width + si, g * width + s)
        for name, values in shard.columns.items():
            table = table.append_column(name, pa.array(values[place], pa.float32(), from_pandas=True))
        if shard.own_genetic is not None:  # a measured target's score without its own value, in place of the score
            own = shard.own_genetic[place]
            score = table["genetic_score"].to_numpy(zero_copy_only=False).astype(np.float32)
            table = table.set_column(table.schema.get_field_index("genetic_score"), "genetic_score",
                                     pa.array(np.where(np.isnan(own), score, own), pa.float32(), from_pandas=True))
    table = table.set_column(table.schema.get_field_index("gene_index"), "gene_index",
                             pa.array((g + shard.gene_offset).astype(np.int32)))
    return table.set_column(table.schema.get_field_index("sample_index"), "sample_index",
                            pa.array(shard.samples[s].astype(np.int32)))

"""The imputation problem: the expression matrix on the modelling scale, split into what is visible and what is
hidden for evaluation.

:func:`make_problem` is the only place where hidden values are separated from visible ones. Everything that builds
features or fits a method receives a :class:`VisibleProblem`, which holds no hidden value at all (hidden entries
are NaN in it, exactly like entries that were never measured); the hidden values travel separately in
:class:`HiddenTruth` and are used for scoring only.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from geximpute import schema as S
from geximpute.config import Config, EvaluationConfig
from geximpute.errors import ConfigError
from geximpute.io.chroms import chrom_key
from geximpute.io.dataset import Dataset, gene_symbols
from geximpute.io.expression import CountScaling, to_model_scale
from geximpute.io.matrixfile import MatrixFile, count_measured, measured, row_range, take_and_hide
from geximpute.science.genomes import donor_genomes
from geximpute.science.groups import group_sums

if TYPE_CHECKING:
    from geximpute.science.genomes import DonorGenomes

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
#: gene x sample cells per pass of :func:`tissue_correlation` and :func:`geximpute.science.shards.gene_stats` at
#: most, so that their float64 temporaries (a few of that many cells) do not grow with the genes or the samples:
#: at 4,000 genes they were the largest thing the driver of an imputation allocated (docs/benchmarks.md)
STATS_CELLS = 1 << 18
#: cells per pass of :func:`hide` when it finds the drawn measured cells of the ``entries`` task
HIDE_CELLS = 1 << 24


def pass_rows(n_samples: int, rows: int, cells: int = STATS_CELLS) -> int:
    """Gene rows per pass over a (G, ``n_samples``) matrix: at most ``rows`` and at most ``cells`` cells (at least
    one row)."""
    return max(1, min(rows, cells // max(1, n_samples)))


@dataclass
class VisibleProblem:
    """Everything a method may see. Genes are the annotated expression genes, sorted by chromosome and TSS.

    Attributes:
        gene_ids, chroms: (G,) gene ids and chromosome names.
        tss, start, end: (G,) int64 1-based coordinates (start/end = TSS where the annotation has no body).
        strand: (G,) int8, +1 or -1.
        split: (G,) int8 index into :data:`SPLITS` by held-out chromosome.
        sample_ids: (S,) sample ids; donor_index, tissue_index: (S,) int32 into ``donors`` and ``tissues``.
        values: (G, S) float32 on the modelling scale; NaN where not measured *or hidden*. Where `geximpute impute`
            or `nightly` read the inputs themselves, a :class:`~geximpute.io.matrixfile.MatrixFile` in a folder of
            the run's own beside the output, read in passes of rows (:func:`in_memory` reads a gene range's).
        tissue_corr: (T, T) float32 tissue-tissue correlation computed from visible values only.
        genomes: the donors' promoter haplotypes and variant dosages (:mod:`geximpute.science.genomes`), None without
            personal genomes. Genotypes are never hidden: a held-out donor's genome is what predicts it.
        gene_names: (G,) gene symbols (None where unknown), from the annotation's ``gene_name`` or else the
            expression file's symbol column (:func:`geximpute.io.dataset.gene_symbols`); None when neither has
            any. Known for hidden genes too: a gene's name is annotation, not a measurement (``gene_family``
            reads it).
        scaling: how counts were normalised onto ``values`` (:class:`~geximpute.io.expression.CountScaling`, the
            per-sample factors from the visible entries); None for data that are not counts. A training fold
            normalises again without its own entries from it (:func:`geximpute.science.folds.fold_problem`).
    """

    gene_ids: np.ndarray
    chroms: np.ndarray
    tss: np.ndarray
    start: np.ndarray
    end: np.ndarray
    strand: np.ndarray
    split: np.ndarray
    sample_ids: np.ndarray
    donor_index: np.ndarray
    tissue_index: np.ndarray
    donors: list[str]
    tissues: list[str]
    values: np.ndarray | MatrixFile
    tissue_corr: np.ndarray
    genomes: DonorGenomes | None = None
    gene_names: np.ndarray | None = None
    scaling: CountScaling | None = None

    @property
    def n_genes(self) -> int:
        return len(self.gene_ids)

    @property
    def n_samples(self) -> int:
        return len(self.sample_ids)


def gene_rows(problem: VisibleProblem, lo: int, hi: int) -> VisibleProblem:
    """The problem of genes ``lo:hi`` alone (every sample; views of the gene arrays, no genomes: a part of a
    problem that methods fit on one gene range at a time). A problem kept in a matrix file gives a window of it
    (nothing read: :func:`in_memory` reads it where it is used)."""
    return _genes(problem, slice(lo, hi))


def gene_subset(problem: VisibleProblem, rows: np.ndarray) -> VisibleProblem:
    """The problem of the genes ``rows`` alone (increasing indices, so that the genes stay sorted; every sample;
    copies of the gene arrays, no genomes)."""
    return _genes(problem, np.asarray(rows, np.int64))


def _genes(problem: VisibleProblem, rows: slice | np.ndarray) -> VisibleProblem:
    if isinstance(rows, slice):  # a view, or a window of a matrix file: nothing read
        values = row_range(problem.values, rows.start or 0, problem.n_genes if rows.stop is None else rows.stop)
    else:
        values = problem.values[rows]
    return dataclasses.replace(
        problem, gene_ids=problem.gene_ids[rows], chroms=problem.chroms[rows], tss=problem.tss[rows],
        start=problem.start[rows], end=problem.end[rows], strand=problem.strand[rows], split=problem.split[rows],
        values=values, genomes=None,
        gene_names=None if problem.gene_names is None else problem.gene_names[rows])


def in_memory(problem: VisibleProblem) -> VisibleProblem:
    """``problem`` with its values in memory: a matrix file (a gene range's window of it, :func:`gene_rows` of a
    problem kept on disk) read, where a task or a range's fit needs the array; a problem in memory as it is."""
    if not isinstance(problem.values, MatrixFile):
        return problem
    return dataclasses.replace(problem, values=problem.values.read())


@dataclass
class HiddenTruth:
    """The hidden entries (gene index, sample index) and their true values. Used for scoring only."""

    gene_index: np.ndarray
    sample_index: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.values)


def annotated_rows(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(expression row of each annotated expression gene, its row in the annotation table), in the annotation's
    (chrom, TSS) order; expression genes without annotation are left out."""
    row_of = {g: i for i, g in enumerate(dataset.expression.gene_ids)}
    ann_ids = dataset.genes.table[S.GENE_ID].to_pylist()
    keep = [i for i, g in enumerate(ann_ids) if g in row_of]
    rows = [row_of[ann_ids[i]] for i in keep]
    return np.asarray(rows, dtype=np.int64), np.asarray(keep, dtype=np.int64)


def model_matrix(dataset: Dataset, hidden: np.ndarray | None = None, *, consume: bool = False,
                 scaling_out: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(values on the modelling scale for annotated genes, row indices into the annotation table).

    Rows follow the annotation's (chrom, TSS) order; expression genes without annotation are dropped.

    Args:
        dataset: the loaded inputs.
        hidden: (G, S) bool over the returned rows: entries hidden for evaluation. Count normalisation (CPM,
            median-of-ratios) is then computed from the other entries only, so a hidden count moves no visible
            value (:func:`geximpute.io.expression.size_factors`).
        consume: scale the dataset's matrix in place and return it (``dataset.expression.values`` is None
            afterwards; :func:`~geximpute.io.expression.to_model_scale`'s ``in_place``): one matrix, not two.
    """
    config = dataset.config
    rows, keep = annotated_rows(dataset)
    visible = None
    if hidden is not None and hidden.any():
        visible = measured(dataset.expression.values)
        visible[rows] &= ~hidden
        # a sample hidden whole (the samples task) is scaled by its own entries, every row's: its unannotated rows
        # alone (still "visible", no model row holds them) gave its truth another scale
        whole = hidden.any(axis=0) & ~visible[rows].any(axis=0)
        visible[:, whole] = False
    if len(rows) == dataset.expression.values.shape[0] and np.array_equal(rows, np.arange(len(rows))):
        rows = None  # every expression gene annotated, in order
    return to_model_scale(dataset.expression, config.expression, visible, rows, in_place=consume,
                          scaling_out=scaling_out), keep


def hide(observed: np.ndarray, task: EvaluationConfig, *, donor_index: np.ndarray | None = None) -> np.ndarray:
    """The hidden mask for ``task``, seeded by ``task.seed``; only observed entries are ever hidden.

    Args:
        observed: (G, S) bool, measured entries.
        task: the evaluation settings.
        donor_index: (S,) donor of each sample; needed with ``task.whole_donors``.

    Returns:
        (G, S) bool mask of hidden entries.
    """
    rng = np.random.default_rng(task.seed)
    n_genes, n_samples = observed.shape
    hidden = np.zeros(observed.shape, bool)
    if task.task == "entries":
        flat = np.ravel(observed)
        n_observed = int(np.count_nonzero(flat))
        n = max(1, int(round(task.fraction * n_observed)))
        # the same draws as choosing among the measured cells' positions (numpy draws by rank), the ranks found
        # a pass of cells at a time: no int64 index of every measured cell beside the one numpy's draw keeps
        mark_ranks(flat, np.sort(rng.choice(n_observed, size=n, replace=False)), hidden.reshape(-1))
    elif task.task == "genes":
        candidates = np.flatnonzero(observed.any(axis=1))
        n = max(1, int(round(task.fraction * len(candidates))))
        hidden[rng.choice(candidates, size=n, replace=False)] = True
    elif task.whole_donors:
        if donor_index is None:
            raise ValueError("hide: evaluation.whole_donors needs the donor of each sample")
        candidates = np.unique(donor_index[observed.any(axis=0)])
        n = max(1, int(round(task.fraction * len(candidates))))
        hidden[:, np.isin(donor_index, rng.choice(candidates, size=n, replace=False))] = True
    else:
        candidates = np.flatnonzero(observed.any(axis=0))
        n = max(1, int(round(task.fraction * len(candidates))))
        hidden[:, rng.choice(candidates, size=n, replace=False)] = True
    return hidden & observed


def tissue_correlation(values: np.ndarray, tissue_index: np.ndarray, n_tissues: int) -> np.ndarray:
    """Tissue-tissue Pearson correlation of gene-centred values, from visible values only.

    Each gene's values are centred on its mean over all visible samples, then averaged per (gene, tissue) over
    donors, and tissues are correlated over genes. Pairs sharing fewer than 3 genes get 0. The (gene, tissue) means
    are computed :data:`STATS_CELLS` cells at a time (:func:`pass_rows`): each is its own row's, and
    the float64 temporaries do not grow with the matrix.

    Returns:
        (T, T) float32 with ones on the diagonal.
    """
    means = np.empty((values.shape[0], n_tissues))
    step = pass_rows(values.shape[1], len(values))
    for lo in range(0, values.shape[0], step):
        means[lo : lo + step] = _tissue_means(values[lo : lo + step], tissue_index, n_tissues)
    corr = np.zeros((n_tissues, n_tissues), dtype=np.float32)
    ok = ~np.isnan(means)
    for a in range(n_tissues):
        for b in range(a, n_tissues):
            both = ok[:, a] & ok[:, b]
            if both.sum() >= 3:
                x, y = means[both, a], means[both, b]
                if x.std() > 0 and y.std() > 0:
                    corr[a, b] = corr[b, a] = np.corrcoef(x, y)[0, 1]
    np.fill_diagonal(corr, 1.0)
    return corr


def _tissue_means(values: np.ndarray, tissue_index: np.ndarray, n_tissues: int) -> np.ndarray:
    """(rows, T) mean of each gene's centred visible values in each tissue (NaN where it has none)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        # a gene hidden in every sample (task genes) has no mean: its row stays NaN, without nanmean's warning
        n = (~np.isnan(values)).sum(axis=1, keepdims=True)
        centred = values - np.where(n > 0, np.nansum(values, axis=1, keepdims=True) / np.maximum(n, 1), np.nan)
        sums, counts = group_sums(centred, tissue_index, n_tissues)
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def check_split(chroms: np.ndarray, config: Config) -> None:
    """Refuse a chromosome of ``split.valid_chroms`` or ``split.test_chroms`` that holds no gene of ``chroms`` (a
    typo, or ``chr21,chr22`` read as one name: training went on with no held-out chromosome and the evaluation
    dropped its held-out scores, unsaid). Run where the split is used (prepare: the training folds and the
    evaluation); imputation and nightly, which only carry it, run on.

    Raises:
        ConfigError: naming the key and the chromosomes.
    """
    present = {chrom_key(str(c)) for c in chroms}
    for key in ("valid_chroms", "test_chroms"):
        absent = [c for c in getattr(config.split, key) if chrom_key(c) not in present]
        if absent:
            listed = any("," in c or " " in c.strip() for c in absent)
            names = sorted({str(c) for c in chroms})
            raise ConfigError(
                f"config key 'split.{key}' names {', '.join(repr(c) for c in absent)}, a chromosome with no gene of "
                f"the problem (its genes are on {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"
                + ("; give several as a list: [chr21, chr22]" if listed else ""))


def split_of(chroms: np.ndarray, config: Config) -> np.ndarray:
    """Split index per gene from the held-out chromosomes (names compared without the ``chr`` prefix); a name that
    holds no gene marks none (:func:`check_split` refuses it where the split is used: prepare)."""
    valid = {chrom_key(c) for c in config.split.valid_chroms}
    test = {chrom_key(c) for c in config.split.test_chroms}
    keys = np.array([chrom_key(c) for c in chroms], dtype=object)
    out = np.zeros(len(chroms), dtype=np.int8)
    out[np.isin(keys, list(valid))] = 1
    out[np.isin(keys, list(test))] = 2
    return out


def mark_ranks(cells: np.ndarray, ranks: np.ndarray, out: np.ndarray) -> None:
    """Set ``out`` (flat bool) True at the cells of ``cells`` (flat bool) whose rank among its True cells, in order,
    is in ``ranks`` (sorted): ``out[np.flatnonzero(cells)[ranks]] = True``, without the int64 index of every True
    cell (the ranks found a pass of :data:`HIDE_CELLS` cells at a time)."""
    seen, k = 0, 0
    for lo in range(0, cells.size, HIDE_CELLS):
        part = cells[lo : lo + HIDE_CELLS]
        count = int(np.count_nonzero(part))
        end = int(np.searchsorted(ranks, seen + count))
        if end > k:
            out[lo + np.flatnonzero(part)[ranks[k:end] - seen]] = True
        seen, k = seen + count, end


def evaluation_hidden(dataset: Dataset) -> np.ndarray:
    """(G, S) bool: the entries :func:`make_problem` hides for ``config.evaluation``, over the annotated expression
    genes in the annotation's order (:func:`annotated_rows`); no value is scaled or copied for it.

    Raises:
        ConfigError: the task needs a sample table (``samples``) and the dataset has one donor.
    """
    config = dataset.config
    expr_rows, _ = annotated_rows(dataset)
    donors, donor_index = np.unique(np.asarray(dataset.samples[S.DONOR_ID].to_pylist(), dtype=object),
                                    return_inverse=True)
    if config.evaluation.task == "samples" and len(donors) < 2:
        raise ConfigError(
            "config key 'evaluation.task' has value 'samples'; expected a dataset with a sample table and "
            "several donors (hiding a whole column of a median-by-tissue table leaves nothing to learn from)"
        )
    observed = measured(dataset.expression.values)[expr_rows]  # bool rows: no float copy of the matrix
    return hide(observed, config.evaluation, donor_index=donor_index)


def make_problem(dataset: Dataset, *, hidden_mask: bool = True, genomes: bool = True, consume: bool = False
                 ) -> tuple[VisibleProblem, HiddenTruth]:
    """Split a dataset into the visible problem and the hidden truth of ``config.evaluation``.

    Args:
        dataset: the loaded inputs.
        hidden_mask: ``False`` hides nothing (imputation of what is missing, no evaluation).
        genomes: build the donors' genomes (:func:`geximpute.science.genomes.donor_genomes`) when the dataset has
            variants; False leaves ``problem.genomes`` None for the caller to build (imputation builds them later,
            handing the promoter sequences to its encode tasks as they are made).
        consume: the problem's values are the dataset's matrix, scaled in place (``dataset.expression.values`` is
            None afterwards): for a caller that reads the inputs only to make the problem (:func:`model_matrix`).

    Raises:
        ConfigError: the task needs a sample table (``samples``) and the dataset has one donor.
    """
    config = dataset.config
    _, ann_rows = annotated_rows(dataset)
    genes = dataset.genes.table.take(ann_rows)
    samples = dataset.samples
    donors, donor_index = np.unique(np.asarray(samples[S.DONOR_ID].to_pylist(), dtype=object), return_inverse=True)
    tissues, tissue_index = np.unique(np.asarray(samples[S.TISSUE].to_pylist(), dtype=object), return_inverse=True)
    hidden = evaluation_hidden(dataset) if hidden_mask else None
    # normalised after hiding: the hidden entries take no part in any count normalisation
    scaling: list = []
    values, _ = model_matrix(dataset, hidden, consume=consume, scaling_out=scaling)
    gi, si = np.nonzero(hidden) if hidden is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    # the truth is a copy; the values are hidden where they are (a matrix file's a pass of rows at a time): one
    # matrix, not two
    hidden_values = take_and_hide(values, hidden) if hidden is not None else np.zeros(0, np.float32)
    truth = HiddenTruth(gene_index=gi.astype(np.int64), sample_index=si.astype(np.int64), values=hidden_values)
    visible = values
    del values, hidden  # nothing below may see a hidden value

    tss = genes[S.TSS].to_numpy()
    start = genes[S.START].fill_null(0).to_numpy()
    end = genes[S.END].fill_null(0).to_numpy()
    start = np.where(start > 0, start, tss)
    end = np.where(end > 0, end, tss)
    chroms = np.asarray(genes[S.CHROM].to_pylist(), dtype=object)
    symbols = gene_symbols(dataset, genes[S.GENE_ID].to_pylist())
    problem = VisibleProblem(
        gene_ids=np.asarray(genes[S.GENE_ID].to_pylist(), dtype=object),
        chroms=chroms,
        tss=tss.astype(np.int64),
        start=start.astype(np.int64),
        end=end.astype(np.int64),
        strand=np.where(np.asarray(genes[S.STRAND].to_pylist(), dtype=object) == "-", -1, 1).astype(np.int8),
        split=split_of(chroms, config),
        sample_ids=np.asarray(samples[S.SAMPLE_ID].to_pylist(), dtype=object),
        donor_index=donor_index.astype(np.int32),
        tissue_index=tissue_index.astype(np.int32),
        donors=list(donors),
        tissues=list(tissues),
        values=visible,
        tissue_corr=tissue_correlation(visible, tissue_index, len(tissues)),
        gene_names=None if all(n is None for n in symbols) else symbols,
        scaling=scaling[0] if scaling else None,
    )
    if dataset.variants is not None and genomes:
        problem.genomes = donor_genomes(dataset, problem)
    log.info(
        "problem: %d genes x %d samples (%d donors, %d tissues); %d visible, %d hidden (%s task)",
        problem.n_genes,
        problem.n_samples,
        len(donors),
        len(tissues),
        count_measured(visible),
        len(truth),
        config.evaluation.task,
    )
    return problem, truth

"""``geximpute impute``: every missing (donor, tissue, gene) entry predicted by a model bundle, written as Parquet.

One streaming Ray Data job::

    shards of entries -> map_batches(ContextBuilder)  context records of the target entries (geximpute.steps.prepare)
                      -> map_batches(Predictor)       the bundle, loaded once per actor (GPU actors when GPUs exist)
                      -> write_parquet(partition_cols=[tissue])

Output (DESIGN.md, "Prediction output")::

    <out>/tissue=<name>/part-<uuid>_<task>-<i>.parquet  schema.PREDICTIONS (the tissue is in the folder name,
                                                        URI-encoded)
    <out>/_manifest.json                                config, input fingerprints, model_version, run_id, rows per
                                                        tissue, the columns' scale and units, versions

A (donor, tissue) pair without any sample (most of GTEx: 34% of the pairs were sampled) is a missing profile: the
problem gets a virtual sample for it, with nothing measured, so that its context is the donor's other tissues, the
gene's means and its neighbours' means, exactly as for a hidden sample in evaluation. Its ``sample_id`` is null.

A run is atomic and idempotent: it holds the output's lease, writes into a staging folder of its own and commits it
by one atomic pointer switch (:func:`geximpute.runtime.atomic.staged_output`), so a reader sees the previous run or
this one, never a mix, and a run that fails or is killed leaves the previous output as it was. A second run on the
same output at the same time is refused; an ``--out`` that is not an earlier impute output is refused unless
``force``. ``run_id`` is a hash of the model version, the input fingerprints and the selection, and each run
replaces the output as a whole: the same inputs and model give the same rows, not twice as many.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geximpute import schema as S
from geximpute.config import BaselinesConfig, Config, ExpressionConfig
from geximpute.errors import ConfigError, GeximputeError
from geximpute.fit.bundle import check_compatible, compatibility, head_estimates, load_bundle
from geximpute.fit.models import baseline_column
from geximpute.io.dataset import load_dataset
from geximpute.io.expression import from_model_scale
from geximpute.io.matrixfile import PASS_CELLS, MatrixFile, column_sums, materialise, row_range, row_sums
from geximpute.model.inference import inference_device
from geximpute.runtime.atomic import check_replaceable, scratch_folder, staged_output, store_of
from geximpute.runtime.console import stage
from geximpute.runtime.memory import release_unused_memory
from geximpute.runtime.provenance import input_fingerprints, manifest, read_versions, write_json
from geximpute.runtime.raytools import ensure_ray, execution_budget
from geximpute.science.baselines import (
    FAMILY_CHUNK,
    FamilyLevels,
    family_levels,
    family_rows,
    fit_ranges,
    range_estimates,
    range_families,
)
from geximpute.science.genomes import donor_genomes
from geximpute.science.problem import VisibleProblem, gene_rows, in_memory, make_problem, pass_rows
from geximpute.science.promoters import (
    PromoterLookup,
    RowSubset,
    genome_promoter_inputs,
    genome_promoter_lookup,
    no_promoters,
    one_hot_codes,
    promoter_codes,
)
from geximpute.science.shards import STATS_ROWS, RangeFileColumns, chromosome_spans, entry_offsets
from geximpute.science.shards import blocks as entry_blocks
from geximpute.steps.prepare import CUT_TASK_CELLS, SPILLED_PATH, SpilledBlocks, context_records, context_shards

log = logging.getLogger(__name__)

#: target entries per shard sent to a context actor (a run of genes of one chromosome x a range of donors)
BLOCK_ENTRIES = 50_000
#: promoter haplotypes per encoding task at most (:func:`encoded_haplotypes`, :func:`personal_haplotypes`), so that a
#: task's memory does not grow with the genome: more genes or donors make more tasks, not larger ones. Each task
#: loads the bundle (~1 s here), against ~1.5 CPU s of encoding per 1,024 haplotypes with the default model; a task
#: reads its base codes (49 MB at most) a slice at a time and holds their embeddings (256 bytes a haplotype).
ENCODE_TASK_ROWS = 32_768
#: promoter haplotypes the driver builds before it writes them to a file for their encode task and forgets them
#: (:func:`personal_haplotypes`): about 1.6 KB each as Python strings, so ~13 MB at a time
ENCODE_CHUNK_ROWS = 8192
#: haplotypes one-hot encoded at a time inside an encoding task (the (n, 4, L) table of one slice)
ENCODE_SLICE_ROWS = 1024
#: parts of the run's haplotype embeddings a predictor keeps between blocks (:class:`PartEmbeddings`)
PARTS_KEPT = 4
#: bytes of one context record in Arrow, about (:func:`record_bytes`; measured on synthetic and GTEx v8 records,
#: docs/benchmarks.md): the ids, scalars and list offsets; each neighbour token (five lists); each tissue token (four)
RECORD_FIXED_BYTES, NEIGHBOUR_TOKEN_BYTES, TISSUE_TOKEN_BYTES = 160, 13, 14
#: errors of the output folder that mean "cannot write here", reported as :class:`OutputError`
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}
VIRTUAL_PREFIX = "virtual:"
#: cells per pass of :func:`add_missing_profiles`' copy into the wider matrix (what it holds beyond the two matrices'
#: rows at the time: one pass) and of :func:`target_mask`
WIDEN_CELLS = 1 << 22
#: the folder of the context shards inside a run's staging folder (removed before the commit)
SHARDS_FOLDER = "_shards"
#: the folder of the stacked baselines' estimates per gene range inside a run's staging folder (removed likewise)
BASELINES_FOLDER = "_baselines"
#: the folder of the promoter haplotypes' base codes, one file per chunk, inside a run's staging folder (likewise)
HAPLOTYPES_FOLDER = "_haplotypes"
#: the folder of the blocks of context records handed from the context stage to the predictors (likewise)
RECORDS_FOLDER = "_records"
#: what the folder of the expression matrix is named after, where `impute` reads the inputs itself: beside the
#: output, ``.<output>.matrix-<host>-<pid>-<random>`` (:func:`geximpute.runtime.atomic.scratch_folder`), made
#: before the output's lease is taken and removed when the run ends (:class:`~geximpute.io.matrixfile.MatrixFile`:
#: the reader writes it, every stage reads and rewrites it in passes of rows, each chromosome's and gene range's task
#: reads its own rows)
MATRIX_FOLDER = "matrix"


class OutputError(GeximputeError):
    """The output folder cannot be written (disk full, permission denied, read-only file system)."""


@dataclass
class ImputeResult:
    """What one ``impute`` run wrote.

    Attributes:
        out_dir: the committed output folder.
        run_id: the run's id (also in every row).
        model_version: the bundle's version (also in every row).
        rows: rows written per tissue.
        n_rows: rows written in all.
        n_missing_profiles: (donor, tissue) pairs without a sample that got a profile.
        seconds: wall time of the run.
    """

    out_dir: Path
    run_id: str
    model_version: str
    rows: dict[str, int]
    n_rows: int
    n_missing_profiles: int
    seconds: float


def model_dir(config: Config) -> Path:
    """The bundle folder of ``config``: ``impute.model_dir`` or ``<output_dir>/model`` (:attr:`Config.model_dir`)."""
    return config.model_dir


def output_dir(config: Config) -> Path:
    """The prediction folder of ``config``: ``impute.out_dir`` or ``<output_dir>/predictions``."""
    return Path(config.impute.out_dir or Path(config.output_dir) / "predictions")


# The problem: selection and missing profiles -------------------------------------------------------------------


def _indices(names: list[str], wanted: Iterable[str], key: str) -> np.ndarray:
    """Indices of ``wanted`` in ``names`` (all when ``wanted`` is empty); unknown names raise ConfigError."""
    wanted = list(wanted)
    if not wanted:
        return np.arange(len(names))
    position = {n: i for i, n in enumerate(names)}
    unknown = [w for w in wanted if w not in position]
    if unknown:
        raise ConfigError(f"config key {key!r} names {unknown[:5]} which the data does not have; expected names among "
                          f"{names[:5]}{' ...' if len(names) > 5 else ''} ({len(names)} in all)")
    return np.array(sorted({position[w] for w in wanted}), dtype=np.int64)


def add_missing_profiles(
    problem: VisibleProblem, donors: Iterable[str] = (), tissues: Iterable[str] = (), *, in_place: bool = False
) -> tuple[VisibleProblem, np.ndarray]:
    """Add a virtual sample (nothing measured) for every selected (donor, tissue) pair that has no sample.

    Samples are then ordered by (tissue, donor), so that a block of consecutive samples covers few tissues and the
    output has few files per tissue. The visible values, the tissue correlations and the donors are unchanged: a
    virtual sample only adds a column of NaN, which no context feature of another entry can see.

    Args:
        problem: the visible problem.
        donors, tissues: the selection (empty: all).
        in_place: take ``problem.values`` over (it is None afterwards): the wider matrix is filled from its last
            rows up while the given one shrinks behind them, so that the two are never held whole at once.

    Returns:
        (the problem with the virtual samples, (S,) bool flag of the virtual samples).
    """
    d_sel = _indices(problem.donors, donors, "impute.donors")
    t_sel = _indices(problem.tissues, tissues, "impute.tissues")
    have = np.zeros((len(problem.donors), len(problem.tissues)), dtype=bool)
    have[problem.donor_index, problem.tissue_index] = True
    dd, tt = np.nonzero(~have[np.ix_(d_sel, t_sel)])
    new_donor, new_tissue = d_sel[dd].astype(np.int32), t_sel[tt].astype(np.int32)
    names_d = np.asarray(problem.donors, dtype=object)
    names_t = np.asarray(problem.tissues, dtype=object)
    new_ids = np.array([f"{VIRTUAL_PREFIX}{d}:{t}" for d, t in zip(names_d[new_donor], names_t[new_tissue],
                                                                      strict=True)], dtype=object)
    donor_index = np.concatenate([problem.donor_index, new_donor]).astype(np.int32)
    tissue_index = np.concatenate([problem.tissue_index, new_tissue]).astype(np.int32)
    virtual = np.concatenate([np.zeros(problem.n_samples, bool), np.ones(len(new_donor), bool)])
    order = np.lexsort((virtual, donor_index, tissue_index))
    if in_place and np.array_equal(order, np.arange(len(order))):
        values, problem.values = problem.values, None  # no sample added nor moved: the matrix as it is
    else:
        values = _widened(problem, order, take=in_place)
    out = dataclasses.replace(
        problem,
        sample_ids=np.concatenate([problem.sample_ids, new_ids])[order],
        donor_index=donor_index[order],
        tissue_index=tissue_index[order],
        values=values,
        # the added samples measure nothing: no factor of their own (1)
        scaling=None if problem.scaling is None else dataclasses.replace(
            problem.scaling, factors=np.concatenate([problem.scaling.factors, np.ones(len(new_donor))])[order]),
    )
    return out, virtual[order]


def _widened(problem: VisibleProblem, order: np.ndarray, *, take: bool) -> np.ndarray | MatrixFile:
    """(G, len(order)) float32: ``problem.values``' columns in the places ``order`` puts them, NaN in the others,
    filled a pass of rows at a time from the last rows up. With ``take`` the problem's matrix is taken over
    (``problem.values`` is None afterwards) and shrinks behind each pass, its rows freed as they are copied. A
    matrix file gives a matrix file beside it (``<name>.wide``; the given file truncated behind each pass, so that
    the disk holds about one matrix, and removed at the end)."""
    measured = problem.values
    if take:
        problem.values = None  # this frame holds the only reference: the matrix can shrink where it is
    shrink = take
    place = np.empty(len(order), np.int64)
    place[order] = np.arange(len(order))
    place = place[: measured.shape[1]]
    n_genes = measured.shape[0]
    step = pass_rows(len(order), n_genes, WIDEN_CELLS)
    on_disk = isinstance(measured, MatrixFile)
    if on_disk:
        wide_bytes = n_genes * len(order) * 4
        # where the given file shrinks behind each pass, the disk holds one matrix and a pass more
        shrinks = take and not measured.view
        values = MatrixFile.create(f"{measured.path}.wide", (n_genes, len(order)),
                                   need=wide_bytes - measured.nbytes + step * len(order) * 4 if shrinks else wide_bytes)
    else:
        values = np.empty((n_genes, len(order)), np.float32)  # its pages are taken as the passes write them
    for hi in range(n_genes, 0, -step):
        lo = max(0, hi - step)
        part = np.full((hi - lo, len(order)), np.nan, np.float32)
        part[:, place] = measured[lo:hi]
        values[lo:hi] = part
        if shrink:
            try:
                measured.resize((lo, measured.shape[1]))  # in place: its rows from lo on are freed
            except ValueError:  # a view (of an array or a file), or held elsewhere: copied whole, kept by its holder
                log.debug("add_missing_profiles: the measured matrix is referenced elsewhere; it is copied whole")
                shrink = False
    if on_disk and shrink:
        measured.unlink()
    return values


def target_mask(
    problem: VisibleProblem, donors: Iterable[str] = (), tissues: Iterable[str] = (), include_observed: bool = False
) -> np.ndarray:
    """(G, S) bool: the entries to predict: unmeasured entries of the selected samples, and with
    ``include_observed`` their measured entries too. Of a problem kept in a file, a mask in a file beside it
    (``<values>.targets``)."""
    d_sel = _indices(problem.donors, donors, "impute.donors")
    t_sel = _indices(problem.tissues, tissues, "impute.tissues")
    chosen = np.isin(problem.donor_index, d_sel) & np.isin(problem.tissue_index, t_sel)
    if isinstance(problem.values, MatrixFile):  # beside the values' file, written a pass at a time
        targets = MatrixFile.create(f"{problem.values.path}.targets", problem.values.shape, bool)
    else:
        targets = np.empty(problem.values.shape, bool)
    step = pass_rows(problem.n_samples, problem.n_genes, WIDEN_CELLS)  # one mask, no (G, S) temporaries beside it
    for lo in range(0, problem.n_genes, step):
        part = np.empty((min(step, problem.n_genes - lo), problem.n_samples), bool)
        if include_observed:
            part[:] = True
        else:
            np.isnan(problem.values[lo : lo + step], out=part)
        part &= chosen
        targets[lo : lo + step] = part
    return targets


# The stacked baselines, per gene range --------------------------------------------------------------------------


@dataclass
class StackedBaselines:
    """What fitting a stacked bundle's baselines on the data being imputed takes besides the values
    (:meth:`geximpute.fit.bundle.Bundle.baseline_inputs`).

    Attributes:
        head_names: the baselines the head reads, in its order (a record's ``baseline_<name>`` columns).
        names: those that apply to the data (the others are NaN: the head's trees take their missing branch).
        settings, seed: the bundle's tuned settings and seed.
        composition: (G, F) promoter composition of the data's genes.
    """

    head_names: tuple[str, ...]
    names: tuple[str, ...]
    settings: BaselinesConfig
    seed: int
    composition: np.ndarray


def head_baselines(bundle: Any, problem: VisibleProblem) -> StackedBaselines | None:
    """The :class:`StackedBaselines` of a stacked bundle on ``problem``, or None for a bundle without them."""
    if not getattr(bundle, "stacked", False):
        return None
    names, settings, seed, composition = bundle.baseline_inputs(problem)
    return StackedBaselines(tuple(bundle.baseline_names), names, settings, seed, composition)


def baseline_range(problem: VisibleProblem, targets: np.ndarray, baselines: StackedBaselines, path: str,
                   family: FamilyLevels | None = None, genes: tuple[int, int] = (0, 0)) -> int:
    """Ray task: the stacked baselines fitted on one gene range (``problem``: its genes and every sample) and
    evaluated at its ``targets``, written to ``path`` (``.npz``, ``baseline_<name>`` -> (N,) float32 in
    ``np.nonzero(targets)`` order); returns N. ``family``: the whole problem's family levels
    (:func:`~geximpute.science.baselines.range_families`, one object for every task), of which the range's
    ``genes`` (lo, hi) are read by ``gene_family``."""
    problem = in_memory(problem)  # the range's window of a matrix file: its rows read here, not in the driver
    gi, si = np.nonzero(materialise(targets))
    estimates = range_estimates(problem, gi, si, baselines.names, baselines.settings, seed=baselines.seed,
                                composition=baselines.composition,
                                family=None if family is None else family.part(slice(*genes)), own_value_free=True)
    columns = {baseline_column(name): values
               for name, values in head_estimates(estimates, baselines.head_names, len(gi)).items()}
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **columns)
    Path(tmp).rename(path)
    return len(gi)


def baseline_columns(baselines: StackedBaselines, problem: VisibleProblem, targets: np.ndarray, folder: Path,
                     cpus: float, concurrency: int, levels: FamilyLevels | None = None) -> RangeFileColumns:
    """The stacked baselines' estimates at every target entry, fitted per gene range
    (:func:`geximpute.science.baselines.fit_ranges`, ``baselines.block_cells``) in Ray tasks of their own
    (:func:`baseline_range`, at most ``concurrency`` at once), each written to a file under ``folder`` (created
    here, inside the run's staging folder): the driver never fits them nor holds their estimates. The estimates are
    :meth:`geximpute.fit.bundle.Bundle.baseline_entries`' value for value.

    ``levels``: the problem's family levels where the caller built them already (``gene_family`` reads them).

    Returns:
        the files as the :class:`~geximpute.science.shards.EntryColumns` the context shards take their columns from.
    """
    import ray

    t0 = time.perf_counter()
    ranges = fit_ranges(problem, baselines.settings.block_cells)
    offsets = entry_offsets(targets)
    folder.mkdir(parents=True)
    task = ray.remote(baseline_range).options(num_cpus=cpus)
    # gene_family reads the whole problem's families in every range: put once, shared by every task
    family = range_families(problem, baselines.names, ranges, levels)
    family_ref = ray.put(family) if family is not None else None
    del family
    files, pending = [], []
    with stage("baselines: estimates for the stacked head", total=len(ranges), unit="gene ranges") as progress:
        for i, (lo, hi) in enumerate(ranges):
            while len(pending) >= concurrency:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
                progress.advance()
            path = str((folder / f"range-{i:05d}.npz").absolute())
            part = dataclasses.replace(baselines, composition=baselines.composition[lo:hi])
            pending.append(task.remote(gene_rows(problem, lo, hi), row_range(targets, lo, hi), part, path, family_ref,
                                       (lo, hi)))
            files.append(path)
        for ref in pending:
            ray.get(ref)
            progress.advance()
    log.info("impute: estimates of %s at %d entries, %d gene range(s), in %.1f s", ", ".join(baselines.names),
             int(offsets[-1]), len(ranges), time.perf_counter() - t0)
    starts = np.array([offsets[lo] for lo, _ in ranges] + [offsets[-1]], np.int64)
    return RangeFileColumns([baseline_column(n) for n in baselines.head_names], files, starts)


# The predictor actor ------------------------------------------------------------------------------------------


def load_bundle_from(folder: str) -> Any:
    """The default bundle loader of :class:`Predictor` (a module function, so that Ray pickles it by name)."""
    return load_bundle(folder)


def donor_promoter_sequences(problem: VisibleProblem) -> tuple[list[str], PromoterLookup] | None:
    """The problem's donors' own promoter haplotypes as imputation ships them, or None without personal genomes.

    Returns:
        (every reference window and donor haplotype as a sequence, the
        :class:`~geximpute.science.promoters.PromoterLookup` of the problem's samples): :func:`run_pipeline` encodes
        the sequences once per run.
    """
    if problem.genomes is None:
        return None
    return list(problem.genomes.sequences), genome_promoter_lookup(problem.genomes, problem.donor_index)


def donor_promoter_inputs(problem: VisibleProblem, length: int) -> tuple[np.ndarray, PromoterLookup] | None:
    """The promoter inputs of the problem's donors' own haplotypes, or None without personal genomes.

    Returns:
        (one-hot table (P, 4, L) of every reference window and donor haplotype, the
        :class:`~geximpute.science.promoters.PromoterLookup` of the problem's samples), as ``Bundle.predict`` takes
        them.
    """
    if problem.genomes is None:
        return None
    return genome_promoter_inputs(problem.genomes, problem.donor_index, length)


@dataclass
class EncodedHaplotypes:
    """The donors' promoter haplotypes as an imputation run ships them to its predictor actors: the lookup of each
    record's rows and the refs of the embeddings of consecutive rows (encoded once per run by
    :func:`encode_haplotypes` tasks) instead of the (P, 4, L) one-hot table. A predictor fetches only the parts its
    records read (:class:`PartEmbeddings`)."""

    lookup: PromoterLookup
    parts: list  # object refs of encode_haplotypes' results: each network's embeddings of rows starts[i]:starts[i + 1]
    starts: np.ndarray  # (len(parts) + 1,) int64: the first row of each part, then the row count


class PartEmbeddings:
    """What a predictor holds of a run's haplotype embeddings: the parts that the records it is given read, the
    ``keep`` most recently used at a time (a block of records is genes of one chromosome, so its rows lie in one
    part or two), never the whole run's."""

    def __init__(self, encoded: EncodedHaplotypes, keep: int = PARTS_KEPT) -> None:
        self.encoded, self.keep = encoded, keep
        self.held: dict[int, list[np.ndarray]] = {}  # part -> each network's embeddings, least recently used first
        self.fetched = 0  # parts fetched from the object store so far
        self.empty: list[np.ndarray] | None = None

    def _part(self, i: int) -> list[np.ndarray]:
        import ray

        part = self.held.pop(i, None)
        if part is None:
            part = ray.get(self.encoded.parts[i])
            self.fetched += 1
        self.held[i] = part
        while len(self.held) > self.keep:
            del self.held[next(iter(self.held))]
        return part

    def inputs(self, records: pa.Table) -> tuple[RowSubset, list[np.ndarray] | None]:
        """(the records' lookup into the rows gathered for them, each network's embeddings of those rows; None
        where the run has no haplotype at all)."""
        if not self.encoded.parts:  # no gene has a window: every record reads the networks' stand-in
            return RowSubset(self.encoded.lookup, np.zeros(0, np.int64)), None
        a, b = self.encoded.lookup.for_records(records)
        rows = np.unique(np.concatenate([a, b]))
        rows = rows[rows >= 0]
        starts = self.encoded.starts
        owner = np.searchsorted(starts, rows, side="right") - 1
        if self.empty is None:  # each network's (0, D): the widths, for records that read no row
            self.empty = [np.zeros((0, e.shape[1]), e.dtype) for e in self._part(0)]
        gathered = [self.empty]
        for i in np.unique(owner):  # rows sorted, so the parts' rows come out in the order of ``rows``
            part, local = self._part(int(i)), rows[owner == i] - starts[i]
            gathered.append([embedding[local] for embedding in part])
        embeddings = [np.concatenate([g[k] for g in gathered]) for k in range(len(gathered[0]))]
        return RowSubset(self.encoded.lookup, rows), embeddings


def encode_haplotypes(loader: Callable[[str], Any], bundle_dir: str, paths: list[str], use_gpu: bool,
                      slice_rows: int = ENCODE_SLICE_ROWS) -> list[np.ndarray]:
    """Ray task: each network's embeddings (``Bundle.encode_promoters``) of the sequences of one part of the run's
    haplotypes (their (n, L) base codes in the ``.npy`` files ``paths``, in row order,
    :func:`geximpute.science.promoters.promoter_codes`), one-hot encoded here ``slice_rows`` at a time, on the
    task's GPU when it holds one."""
    bundle = loader(bundle_dir)
    bundle.models.device = str(inference_device(use_gpu))
    slices = []
    for path in paths:
        codes = np.load(path, mmap_mode="r")
        slices += [bundle.encode_promoters(one_hot_codes(codes[lo : lo + slice_rows]))
                   for lo in range(0, len(codes), slice_rows)]
    return [np.concatenate([part[k] for part in slices]) for k in range(len(slices[0]))]


class PartEncoder:
    """A sink of promoter sequences in chunks of consecutive rows (:func:`geximpute.science.genomes.donor_genomes`,
    :func:`encoded_haplotypes`) that writes them to files for their encode tasks as they come.

    Each chunk's base codes (``length`` of them a sequence) are written at once to a file of their own under
    ``folder`` (created here; inside the run's staging folder, readable by every node, as the context shards are),
    so that the caller holds one chunk at a time and the sequences never pass through the object store (where the
    driver's writes would count in its memory). Consecutive chunks make one part, one :func:`encode_haplotypes`
    task, of at most :data:`ENCODE_TASK_ROWS` rows, or fewer where a part reaches the end of one of ``shares``
    equal runs of the ``n_genes`` genes (so that a small run still makes one task per predictor actor). The tasks
    start together in :meth:`encoded` (the imputation calls it where its stream starts, so that the encoding runs
    beside the stream's first blocks rather than beside the stacked baselines the driver waits for), each with
    ``resources`` (a GPU when predictors get one).
    """

    def __init__(self, loader: Callable[[str], Any], bundle_dir: Path, resources: dict[str, Any], folder: Path,
                 length: int, n_genes: int = 0, shares: int = 1) -> None:
        import ray

        # workers are reused (a worker of its own per part, max_calls=1, costs a process start per task: 4% more wall
        # time in the benchmark and 44 s more in the default suite), so a worker that encoded may later fit
        # baselines or write Parquet with what encoding left in it
        self.task = ray.remote(encode_haplotypes).options(**resources)
        self.loader, self.bundle_dir, self.use_gpu = loader, str(bundle_dir), "num_gpus" in resources
        self.folder, self.length = folder, length
        self.folder.mkdir(parents=True)
        self.share_genes = -(-n_genes // max(1, shares)) if n_genes else 0
        self.share_end = self.share_genes
        self.chunks = 0
        self.pending: list[str] = []  # the files of the part being gathered
        self.pending_rows = 0
        self.parts: list[list[str]] = []  # the files of each part
        self.starts = [0]

    def __call__(self, sequences: list[str], next_gene: int | None = None) -> None:
        """Take the sequences of the next rows (of the genes before ``next_gene``, when known)."""
        path = self.folder / f"chunk-{self.chunks:06d}.npy"
        np.save(path, promoter_codes(sequences, self.length))
        self.chunks += 1
        self.pending.append(str(path.absolute()))
        self.pending_rows += len(sequences)
        share_done = bool(self.share_genes) and next_gene is not None and next_gene >= self.share_end
        if share_done:
            self.share_end = (next_gene // self.share_genes + 1) * self.share_genes
        if share_done or self.pending_rows >= ENCODE_TASK_ROWS:
            self.cut()

    def cut(self) -> None:
        """End the part being gathered (if it has rows): the next chunk starts a new one."""
        if not self.pending:
            return
        self.parts.append(self.pending)
        self.starts.append(self.starts[-1] + self.pending_rows)
        self.pending, self.pending_rows = [], 0

    def encoded(self, lookup: PromoterLookup) -> EncodedHaplotypes:
        """Start every part's task; the :class:`EncodedHaplotypes` of every chunk handed over, read through
        ``lookup``."""
        self.cut()
        refs = [self.task.remote(self.loader, self.bundle_dir, files, self.use_gpu, ENCODE_SLICE_ROWS)
                for files in self.parts]
        log.info("impute: %d promoter haplotypes encoded once for the run, in %d task(s)", self.starts[-1],
                 len(refs))
        return EncodedHaplotypes(lookup, refs, np.asarray(self.starts, np.int64))


@dataclass
class WrittenHaplotypes:
    """The donors' promoter haplotypes written to part files (:func:`personal_haplotypes`), their encode tasks not
    started yet: :meth:`start` starts them."""

    encoder: PartEncoder
    lookup: PromoterLookup

    def start(self) -> EncodedHaplotypes:
        return self.encoder.encoded(self.lookup)


def encoded_haplotypes(haplotypes: tuple[list[str], PromoterLookup], loader: Callable[[str], Any],
                       bundle_dir: Path, parts: int, resources: dict[str, Any], folder: Path,
                       length: int) -> EncodedHaplotypes:
    """Start the encoding of every haplotype sequence once for the run, in Ray tasks of consecutive rows
    (:class:`PartEncoder`, their files under ``folder``): at least ``parts`` (one per predictor actor), and more
    when a part would exceed :data:`ENCODE_TASK_ROWS`. Returns at once with their refs. Neither the driver nor a
    predictor holds the (P, 4, L) one-hot table, and no task holds more than its part's sequences and
    embeddings."""
    sequences, lookup = haplotypes
    encoder = PartEncoder(loader, bundle_dir, resources, folder, length)
    n_parts = min(len(sequences), max(parts, -(-len(sequences) // ENCODE_TASK_ROWS)))
    bounds = np.linspace(0, len(sequences), n_parts + 1).round().astype(np.int64)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        encoder(sequences[lo:hi])
        encoder.cut()
    return encoder.encoded(lookup)


def personal_haplotypes(config: Config, dataset: Any, problem: VisibleProblem, n_parts: int, bundle: Any,
                        bundle_dir: Path, resources: dict[str, Any], folder: Path,
                        loader: Callable[[str], Any] = load_bundle_from,
                        ) -> WrittenHaplotypes | tuple[np.ndarray, PromoterLookup]:
    """Build ``problem.genomes`` from the dataset's genome and variants, handing the promoter sequences over in
    chunks of about :data:`ENCODE_CHUNK_ROWS` as they are made to part files for their encode tasks
    (:class:`PartEncoder`, at least ``n_parts`` parts, under ``folder``): the driver never holds more than one
    chunk of sequences. Returns the haplotypes as :func:`run_pipeline` takes them (an empty table and the lookup
    where the bundle's networks read no promoter)."""
    encoder = None
    if bundle.reads_promoters:
        encoder = PartEncoder(loader, bundle_dir, resources, folder, bundle.models.network.spec.promoter_length,
                              n_genes=problem.n_genes, shares=n_parts)
    problem.genomes = donor_genomes(dataset, problem, sink=encoder or _forget, part_rows=ENCODE_CHUNK_ROWS)
    lookup = genome_promoter_lookup(problem.genomes, problem.donor_index)
    if encoder is None:
        return no_promoters(config.promoter.length), lookup
    return WrittenHaplotypes(encoder, lookup)


def _forget(sequences: list[str], next_gene: int) -> None:
    """The sink of the sequences of a bundle whose networks read no promoter."""


class Predictor:
    """Ray Data actor: context records in, :data:`geximpute.schema.PREDICTIONS` rows out.

    The bundle is loaded once per actor through ``loader`` (a dependency, not a global: tests may pass another).
    This class is the one caller of ``Bundle.predict`` in the engine's imputation path.

    Args:
        loader: ``loader(bundle_dir)`` returns an object with ``predict(records, gene_ids, promoters, baselines=,
            embeddings=)`` and ``model_version`` (a :class:`~geximpute.fit.bundle.Bundle`).
        bundle_dir: the bundle folder.
        refs: object references of ((G,) gene ids, (S,) virtual-sample flags, per-donor haplotypes (the promoter
            inputs, or their :class:`EncodedHaplotypes`) or None, the (G, S) grids of a stacked bundle's baselines
            (:meth:`geximpute.fit.bundle.Bundle.baseline_grids`) or None: :func:`run_pipeline` passes None, its
            records carry their estimates).
        run_id: written in every row.
        scale: ``inputs.scale`` of the data, for ``predicted_tpm``.
        expression: the expression settings, for ``predicted_tpm``.
        use_gpu: the actor holds a GPU: the networks run on it, under bf16 autocast
            (:func:`geximpute.model.inference.inference_device`).
    """

    def __init__(self, loader: Callable[[str], Any], bundle_dir: str, refs: tuple, run_id: str, scale: str,
                 expression: ExpressionConfig, use_gpu: bool = False) -> None:
        import ray

        self.bundle = loader(bundle_dir)
        genes_ref, virtual_ref, haplotypes_ref, baselines_ref = refs
        self.gene_ids = ray.get(genes_ref)
        self.virtual = ray.get(virtual_ref)
        self.haplotypes = ray.get(haplotypes_ref) if haplotypes_ref is not None else None
        self.embedded = None
        if isinstance(self.haplotypes, EncodedHaplotypes):  # encoded once for the run: no table, no CNN here
            self.embedded = PartEmbeddings(self.haplotypes)
            self.haplotypes = None
        self.baselines = ray.get(baselines_ref) if baselines_ref is not None else None
        self.run_id, self.scale, self.expression, self.use_gpu = run_id, scale, expression, use_gpu
        self.spilled = SpilledBlocks()  # the blocks of records the context stage spilled to files
        if hasattr(self.bundle, "models"):
            self.bundle.models.device = str(inference_device(use_gpu))

    def predict(self, records: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(estimate, lower, upper) of ``records``: the single call of ``Bundle.predict``."""
        if self.embedded is not None:  # the embeddings of the rows these records read, no one-hot table
            lookup, embeddings = self.embedded.inputs(records)
            length = self.bundle.models.network.spec.promoter_length
            return self.bundle.predict(records, self.gene_ids, (no_promoters(length), lookup),
                                       baselines=self.baselines, embeddings=embeddings)
        # haplotypes None: the bundle's reference windows; else the one-hot table, each network encoding what it meets
        return self.bundle.predict(records, self.gene_ids, self.haplotypes, baselines=self.baselines)

    def __call__(self, records: pa.Table) -> pa.Table:
        if SPILLED_PATH in records.column_names:  # rows naming blocks of records in files (SpilledBlocks)
            out = [self.rows(part) for path in records[SPILLED_PATH].to_pylist() for part in self.spilled.read(path)]
            return pa.concat_tables(out) if out else S.PREDICTIONS.empty_table()
        return self.rows(records)

    def rows(self, records: pa.Table) -> pa.Table:
        """The :data:`geximpute.schema.PREDICTIONS` rows of ``records``."""
        estimate, lower, upper = (np.asarray(a, dtype=np.float32) for a in self.predict(records))
        n = records.num_rows
        virtual = self.virtual[records["sample_index"].to_numpy()]
        sample_ids = np.asarray(records[S.SAMPLE_ID].to_pylist(), dtype=object)
        sample_ids[virtual] = None
        table = pa.table({
            S.GENE_ID: records[S.GENE_ID],
            S.DONOR_ID: records[S.DONOR_ID],
            S.TISSUE: records[S.TISSUE],
            S.SAMPLE_ID: pa.array(sample_ids, pa.string()),
            "predicted": pa.array(estimate),
            "predicted_lower": pa.array(lower),
            "predicted_upper": pa.array(upper),
            # back on the input's linear scale (null where there is none: log or normalised input)
            "predicted_tpm": _linear(from_model_scale(estimate, self.scale, self.expression), n),
            # the measured value where the entry was measured (only targets with --include-observed); null where
            # imputed: the context records carry it as their label
            "observed": pa.array(records["target"].to_numpy(zero_copy_only=False), pa.float32(), from_pandas=True),
            "model_version": pa.array([self.bundle.model_version] * n, pa.string()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
        })
        return S.check_table(table, S.PREDICTIONS, "predictions")


# The pipeline -------------------------------------------------------------------------------------------------


def _linear(values: np.ndarray | None, n: int) -> pa.Array:
    """The ``predicted_tpm`` column: float32 values, or ``n`` nulls where the input has no linear scale."""
    return pa.nulls(n, pa.float32()) if values is None else pa.array(values.astype(np.float32))


def prediction_columns(config: Config) -> dict:
    """What the prediction columns hold, for the output's ``_manifest.json``: the scale of ``predicted`` and
    ``observed``, the unit of ``predicted_tpm`` (null: not written) and the level of the interval. ``config``: the
    model bundle's (its head's quantiles made the intervals; its scale is the imputation's, as impute checks)."""
    from geximpute.io.expression import linear_unit

    unit = linear_unit(config.inputs.scale, config.expression)
    return {"predicted": "the values as given" if unit is None else f"log1p of {unit}", "predicted_tpm": unit,
            "interval_level": config.head.interval_level, "interval_quantiles": list(config.head.quantiles)}


def write_predictions(dataset: Any, folder: Path, num_cpus: float) -> None:
    """Write the prediction stream as Parquet partitioned by tissue, files named ``part-<write>_<task>-<i>.parquet``
    as the design's contract reads them (``tissue=.../part-*.parquet``; the seam through which tests inject write
    faults such as a full disk)."""
    dataset.write_parquet(str(folder), partition_cols=list(S.PREDICTION_PARTITIONS),
                          filename_provider=_part_names(), ray_remote_args={"num_cpus": num_cpus})


def _part_names() -> Any:
    """A Ray Data filename provider of ``part-`` names (Ray's own are the write's id alone)."""
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{write_uuid}_{task_index:06}"

    return PartNames()


def gpus_to_use(config: Config) -> int:
    """GPU predictor actors: none unless GPUs are wanted (``impute.use_gpu``; when null, if the cluster has any or
    ``train.use_gpu`` is set); then ``impute.gpus`` (else one per GPU of the cluster), asking Ray's autoscaler for
    them and waiting up to ``impute.gpu_wait_seconds`` where the cluster has fewer (GPU nodes that start at zero);
    never more than the cluster has.

    Raises:
        ConfigError: GPUs are wanted and the cluster has none (after the wait, where there is one).
    """
    import ray

    settings = config.impute
    n = int(ray.cluster_resources().get("GPU", 0))
    wanted = settings.use_gpu
    if wanted is None:
        wanted = n > 0 or config.train.use_gpu
    if not wanted:
        return 0
    target = settings.gpus or max(n, 1)
    if n < target and settings.gpu_wait_seconds > 0:
        n = _wait_for_gpus(target, settings.gpu_wait_seconds)
    if n == 0:
        raise ConfigError("config key 'impute.use_gpu' (or 'train.use_gpu') asks for GPUs, but the Ray cluster has "
                          "none" + (f" (none came in impute.gpu_wait_seconds={settings.gpu_wait_seconds:g})"
                                    if settings.gpu_wait_seconds > 0 else
                                    "; on an autoscaling cluster set impute.gpus and impute.gpu_wait_seconds to ask "
                                    "for them") + "; or set impute.use_gpu: false")
    if n < target:
        log.warning("impute: %d GPU(s) of the %d asked for (impute.gpus) are there; using %d", n, target, n)
    return min(n, target)


def _wait_for_gpus(target: int, wait_s: float, poll_s: float = 5.0) -> int:
    """Ask the autoscaler for ``target`` GPUs (one bundle each) and wait up to ``wait_s`` for them; returns the
    GPUs the cluster has then. The request is withdrawn before returning (a standing request would keep GPU nodes
    after the run); the pool is sized once per run (:func:`predictor_pool`, passed on to :func:`run_pipeline`).
    Nodes that an autoscaler's idle timeout removes before the actors start (while the genomes and the baselines
    are built) come back for the actors' own GPU demand, which the autoscaler serves as it served this request."""
    import ray
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}] * target)
    log.info("impute: asked the autoscaler for %d GPU(s); waiting up to %.0f s", target, wait_s)
    deadline = time.monotonic() + wait_s
    try:
        while (n := int(ray.cluster_resources().get("GPU", 0))) < target and time.monotonic() < deadline:
            time.sleep(poll_s)
    finally:
        request_resources(bundles=[])
    log.info("impute: %d GPU(s) in the cluster", n)
    return n


def predictor_pool(config: Config, targets: np.ndarray) -> tuple[int, dict[str, Any]]:
    """(predictor actors, each one's resources) of an imputation of ``targets``: one per GPU of the cluster when
    they are used (:func:`gpus_to_use`), else one per :data:`BLOCK_ENTRIES` entries up to ``impute.predictors``
    (a small run's several chromosomes make several small shards, not work for several actors that each load the
    bundle)."""
    n_gpus = gpus_to_use(config)
    n_actors = n_gpus or min(config.impute.predictors, max(1, -(-int(row_sums(targets).sum()) // BLOCK_ENTRIES)))
    cpus = config.ray.cpus_per_task
    return n_actors, ({"num_cpus": cpus, "num_gpus": 1} if n_gpus else {"num_cpus": cpus})


def record_bytes(config: Config, problem: VisibleProblem, targets: np.ndarray, extra_columns: int = 0) -> int:
    """About the bytes of one context record of the ``targets`` entries in Arrow, from the tokens they carry on
    average: neighbours (at most K, and no more than the genes measured in the target's sample) and tissues (the
    donor's other measured samples), plus ``extra_columns`` float32 columns (the stacked baselines', the family
    level). An upper bound of the tokens: a neighbour or tissue token also needs the gene's own neighbour or value
    measured there."""
    per_sample = column_sums(targets).astype(np.float64)
    n = per_sample.sum()
    if n == 0:
        return RECORD_FIXED_BYTES
    genes_seen = np.zeros(problem.n_samples, np.int64)
    step = pass_rows(problem.n_samples, STATS_ROWS)  # a bool temporary of that many genes at a time
    for lo in range(0, problem.n_genes, step):
        genes_seen += (~np.isnan(problem.values[lo : lo + step])).sum(axis=0)
    measured = (genes_seen > 0).astype(np.float64)
    others = np.bincount(problem.donor_index, weights=measured, minlength=len(problem.donors))[problem.donor_index]
    neighbours = (per_sample * np.minimum(config.context.k_neighbours, genes_seen)).sum() / n
    tissues = (per_sample * (others - measured)).sum() / n
    return int(RECORD_FIXED_BYTES + NEIGHBOUR_TOKEN_BYTES * neighbours + TISSUE_TOKEN_BYTES * tissues
               + 4 * extra_columns)


def stream_budget(config: Config, cut: list, per_record: int) -> int | None:
    """The object-store budget of the imputation stream: ``impute.blocks_in_flight`` blocks of the run's largest
    block of context records of ``per_record`` bytes (:func:`record_bytes`); None: Ray Data's own."""
    if config.impute.blocks_in_flight is None or not cut:
        return None
    return config.impute.blocks_in_flight * max(b.entries for b in cut) * per_record


def run_pipeline(
    config: Config,
    problem: VisibleProblem,
    targets: np.ndarray,
    virtual: np.ndarray,
    bundle_dir: Path,
    out: Path,
    run_id: str,
    *,
    loader: Callable[[str], Any] = load_bundle_from,
    haplotypes: Any = None,
    baselines: StackedBaselines | None = None,
    encode_once: bool = True,
    reads_family: bool = False,
    release_values: bool = False,
    own_value_free: bool = False,
    pool: tuple[int, dict[str, Any]] | None = None,
) -> int:
    """Context records -> predictions -> Parquet under ``out`` (partitioned by tissue), one streaming Ray Data job;
    returns the number of predictor actors it ran.

    Args:
        config: ray, context, impute and expression settings.
        problem: the problem whose ``targets`` entries are predicted (with its virtual samples).
        targets: (G, S) bool, the entries to predict.
        virtual: (S,) bool, the virtual samples (their ``sample_id`` is written as null).
        bundle_dir: the model bundle.
        out: the folder written (a staging folder: it is not committed here).
        run_id: the run's id.
        loader: how a predictor actor loads the bundle.
        haplotypes: the donors' promoter haplotypes (:func:`donor_promoter_sequences`), or their part files
            written while the genomes were built (:func:`personal_haplotypes`); None: the bundle's reference
            windows. With ``encode_once`` every
            haplotype is encoded once for the run (:func:`encoded_haplotypes`, as many tasks as predictor actors)
            and the predictors get the embeddings.
        baselines: what fitting a stacked bundle's baselines takes (:func:`head_baselines`); their estimates
            (:func:`baseline_columns`, Ray tasks per gene range) travel with each shard's records.
        encode_once: encode the haplotypes once for the run; False for a bundle whose networks have no promoter
            branch (``Bundle.reads_promoters``).
        reads_family: the networks read each record's family level (``Bundle.reads_family``): the records carry it
            (null throughout, with a warning, where the genes have no symbols).
        own_value_free: a target measured in ``problem`` (``include_observed``) reads a cis-genetic score fitted
            without its own value (:func:`~geximpute.steps.prepare.context_shards`).
        release_values: let ``problem``'s matrix go once the shards are cut (``problem.values`` is None
            afterwards): the driver holds no (G, S) values while the stream runs.
        pool: the predictor pool (:func:`predictor_pool`) where the caller sized it already (GPUs asked for and
            waited for once, not again after the baselines); None: sized here.
    """
    import ray

    cpus = config.ray.cpus_per_task
    if reads_family and problem.gene_names is None:
        log.warning("impute: the model's networks read each gene's family level and these genes have no symbols "
                    "(inputs.genes' gene_name or the expression file's symbol column): every record's is unknown, "
                    "which the networks saw only for genes without a family")
    try:
        # the stacked head's baseline estimates, fitted per gene range in Ray tasks, travel with each block's
        # records: no predictor maps (G, S) grids, and the driver holds none of them
        # the family levels, built once where the networks read them (a pass over the matrix): gene_family's
        # ranges read the same
        levels = family_levels(problem) if reads_family and problem.gene_names is not None else None
        columns = None
        if baselines is not None:
            columns = baseline_columns(baselines, problem, targets, out / BASELINES_FOLDER, cpus,
                                       config.ray.concurrency, levels)
        n_actors, resources = pool or predictor_pool(config, targets)
        # the haplotypes' encode tasks start once the baselines are done: they run while the driver cuts the shards
        # and beside the stream's first blocks, not beside the baselines the driver waits for
        if isinstance(haplotypes, WrittenHaplotypes):  # written while the genomes were built
            haplotypes = haplotypes.start()
        elif haplotypes is not None:
            if encode_once:
                haplotypes = encoded_haplotypes(haplotypes, loader, bundle_dir, n_actors, resources,
                                                out / HAPLOTYPES_FOLDER, config.promoter.length)
            else:  # networks without a promoter branch read no table
                haplotypes = (no_promoters(config.promoter.length), haplotypes[1])
        shards, cut = context_shards(config, problem, targets, None, out / SHARDS_FOLDER,
                                     columns=columns, block_entries=BLOCK_ENTRIES, family=reads_family,
                                     levels=levels, own_value_free=own_value_free)
        per_record = record_bytes(config, problem, targets,
                                  (len(baselines.head_names) if baselines else 0) + int(reads_family))
        if release_values:  # everything the stream reads is in the shards now
            for done in (problem.values, targets):
                if isinstance(done, MatrixFile):
                    done.unlink()
            problem.values = None
            release_unused_memory()
        # blocks of entries whose records are built; the stream predicts and writes each soon after
        progress = stage("impute: records -> predictions -> Parquet", total=len(shards), unit="blocks")
        n_gpus = resources.get("num_gpus", 0)
        log.info("impute: %d blocks of entries (genes of one chromosome x donors), %d predictor actor(s)%s", len(cut),
                 n_actors, " on GPU" if n_gpus else "")
        predictor_refs = (ray.put(problem.gene_ids), ray.put(virtual),
                          ray.put(haplotypes) if haplotypes is not None else None, None)
        # with a budget in blocks the records pass through files (at most that many unread), not the object store
        spill = out / RECORDS_FOLDER if config.impute.blocks_in_flight is not None else None
        with execution_budget(config.ray, stream_budget(config, cut, per_record)):
            stream = (
                context_records(shards, config, 1, progress.counter(), spill=spill,
                                max_spilled=config.impute.blocks_in_flight or 0)
                .map_batches(
                    Predictor,
                    fn_constructor_kwargs={"loader": loader, "bundle_dir": str(bundle_dir), "refs": predictor_refs,
                                           "run_id": run_id, "scale": config.inputs.scale,
                                           "expression": config.expression, "use_gpu": bool(n_gpus)},
                    batch_size=1 if spill is not None else config.impute.batch_size,
                    batch_format="pyarrow",
                    # a fixed pool: an autoscaling one does not grow while the context stage holds CPUs
                    compute=ray.data.ActorPoolStrategy(size=n_actors),
                    **resources,
                )
            )
            with progress:
                write_predictions(stream, out, cpus)
    finally:  # ours, inside the staging folder: never committed
        shutil.rmtree(out / SHARDS_FOLDER, ignore_errors=True)
        shutil.rmtree(out / BASELINES_FOLDER, ignore_errors=True)
        shutil.rmtree(out / HAPLOTYPES_FOLDER, ignore_errors=True)
        shutil.rmtree(out / RECORDS_FOLDER, ignore_errors=True)
    return n_actors


def partition_rows(folder: Path, key: str = S.TISSUE) -> dict[str, int]:
    """Rows per ``key=...`` partition of a Parquet folder, from the files' footers (no data read)."""
    rows: dict[str, int] = {}
    for part in sorted(folder.glob(f"{key}=*")):
        name = urllib.parse.unquote(part.name.split("=", 1)[1])
        rows[name] = sum(pq.ParquetFile(f).metadata.num_rows for f in part.glob("*.parquet"))
    return rows


def selection_key(names: list[str], chosen: Iterable[str]) -> list[str]:
    """A selection of ``names`` as the run id hashes it: what it selects, not how it was written (sorted, each
    once; every name or none both mean all: [])."""
    chosen = sorted(set(chosen))
    return [] if set(chosen) == set(names) else chosen


def make_run_id(**parts: Any) -> str:
    """A run id that depends on nothing but ``parts`` (model version, input fingerprints, selection)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Atomic output ------------------------------------------------------------------------------------------------


def output_os_error(exc: BaseException) -> OSError | None:
    """The OSError of the output (disk full, permission, read-only) behind ``exc``, also through Ray's wrappers."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in OUTPUT_ERRNOS:
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


def output_error(out: Path, err: OSError) -> OutputError:
    """The :class:`OutputError` a user can act on, naming the output folder and the file that failed."""
    name = errno.errorcode.get(err.errno or 0, "error")
    where = f" ({err.filename})" if err.filename else ""
    return OutputError(
        f"{out}: cannot write the predictions: {err.strerror or err} [{name}]{where}. Nothing was committed: the "
        f"previous output, if any, is unchanged and the staging folder was removed. Free space on the file system or "
        f"make {out.parent} writable, then run again"
    )


@contextlib.contextmanager
def matrix_errors(out: Path, matrix: str | Path | None) -> Iterator[None]:
    """Turn an output error (full disk, quota, permissions) while the run writes its matrix file ``matrix`` into an
    :class:`OutputError` that names the folder and what to do (other errors pass as they are)."""
    try:
        yield
    except OSError as exc:
        err = output_os_error(exc)
        folder = None if matrix is None else Path(matrix).parent
        if folder is None or err is None or (err.filename and not str(err.filename).startswith(str(folder))):
            raise  # not the matrix's (an input's, say)
        raise OutputError(
            f"{folder}: cannot keep this run's expression matrix beside the output {out}: {err.strerror or err} "
            f"[{errno.errorcode.get(err.errno or 0, 'error')}] ({err.filename or matrix}). Nothing was committed and "
            f"the folder was removed. Free space on that file system (the matrix takes genes x samples x 4 bytes, "
            f"the targets mask a quarter of that) or write the output to another one"
        ) from exc


# The command --------------------------------------------------------------------------------------------------


def check_bundle(bundle: Any, folder: Path, problem: VisibleProblem, config: Config) -> None:
    """Refuse data the bundle was not trained for: tissue names and order, scale, transform, context settings, gene
    set and genome build (:func:`geximpute.fit.bundle.check_compatible`), and in any case the number of tissues."""
    check_compatible(bundle.compatibility, compatibility(config, problem.gene_ids, problem.tissues), folder,
                     f"the config ({config.inputs.expression})")
    n_tissues = bundle.models.network.features.n_tissues
    if n_tissues != len(problem.tissues):
        raise GeximputeError(
            f"{folder}: the model was trained on {n_tissues} tissues but the data of the config "
            f"({config.inputs.expression}) has {len(problem.tissues)}; expected the inputs the bundle was trained on "
            f"(its config.yaml names them)"
        )


def impute(
    config: Config,
    *,
    model: str | Path | None = None,
    out_dir: str | Path | None = None,
    include_observed: bool | None = None,
    problem: VisibleProblem | None = None,
    dataset: Any = None,
    force: bool = False,
) -> ImputeResult:
    """Predict every missing entry of the configured donors and tissues and commit the Parquet output atomically.

    Args:
        config: the resolved config (``impute`` section: selection, batch size, predictors).
        model: the bundle folder (default :func:`model_dir`).
        out_dir: the output folder (default :func:`output_dir`); replaced as a whole.
        include_observed: also write measured entries (default ``impute.include_observed``).
        problem: the visible problem to impute (default: all inputs, nothing hidden); the demo passes one with
            hidden genes to score them.
        dataset: the loaded inputs (default: load them from ``config``).
        force: replace ``out_dir`` even when it is not an earlier impute output.

    Raises:
        GeximputeError: the bundle is missing or does not fit the data; :class:`OutputError` when the output cannot
            be written (nothing is committed then).
    """
    t0 = time.perf_counter()
    settings = config.impute
    bundle_dir = Path(model or model_dir(config))
    out = Path(out_dir or output_dir(config))
    include_observed = settings.include_observed if include_observed is None else include_observed
    check_replaceable(out, "impute", store_of(out.absolute()), force)  # before any work: refuse early
    try:
        bundle = load_bundle(bundle_dir)
    except FileNotFoundError as exc:
        raise GeximputeError(str(exc)) from exc
    config, dataset = genomes_the_model_reads(config, bundle, dataset, "impute")
    with contextlib.ExitStack() as scratch:
        # every actor and task loads the version loaded here (bundle.folder), whatever a build commits meanwhile
        return _impute(config, bundle, bundle.folder, out, include_observed, problem, dataset, force, scratch, t0,
                       bundle_dir)


def genomes_the_model_reads(config: Config, bundle: Any, dataset: Any, step: str) -> tuple[Config, Any]:
    """(config, dataset) as a model trained without personal genomes reads them: without ``inputs.variants``
    (every donor predicted from the reference genome, as the model learned), with a warning when the config
    names a VCF; unchanged for a model trained with genomes. Fed the donors' cis-genetic scores, such a model
    would read inputs it never learned from (their weights untrained) and add the score to its estimates."""
    if bundle.reads_genomes or not config.inputs.variants:
        return config, dataset
    log.warning("%s: the model in %s was trained without personal genomes (inputs.variants): every donor is predicted "
                "from the reference genome, and %s is not read", step, bundle.folder, config.inputs.variants)
    config = dataclasses.replace(config, inputs=dataclasses.replace(config.inputs, variants=None))
    if dataset is not None and getattr(dataset, "variants", None) is not None:
        dataset = dataclasses.replace(dataset, variants=None)
    return config, dataset


def _impute(config: Config, bundle: Any, bundle_dir: Path, out: Path, include_observed: bool,
            problem: VisibleProblem | None, dataset: Any, force: bool, scratch: contextlib.ExitStack, t0: float,
            config_model_path: Path | None = None) -> ImputeResult:
    """:func:`impute` once its bundle is loaded from ``bundle_dir`` (the version folder; ``config_model_path``: the
    path the user named, recorded); ``scratch`` holds the folder of the matrix where one is made."""
    config_model_path = config_model_path or bundle_dir
    import ray

    settings = config.impute
    genome_inputs = None  # the inputs of the donors' genomes, built once Ray is up (see below)
    owned = problem is None  # a problem made here: kept in a matrix file, widened in place (a caller's is copied)
    read = read_versions(dataset)  # the store versions read (an `ingest` may commit another meanwhile)
    if problem is None:
        # the inputs loaded here are not kept: the reader writes the matrix to a file of this run's beside the
        # output (where the caller loaded the dataset, its matrix in memory is copied), which becomes the problem's,
        # scaled and widened in place; every later stage reads it a pass of rows at a time
        matrix = None
        if dataset is None:
            try:
                matrix = scratch.enter_context(scratch_folder(out, MATRIX_FOLDER)) / "expression.f32"
            except OSError as exc:  # beside the output: where it cannot be written, nothing can
                err = output_os_error(exc)
                if err is None:
                    raise
                raise output_error(out, err) from exc
        consume = dataset is None
        with matrix_errors(out, matrix):
            dataset = dataset or load_dataset(config, matrix=matrix)
            problem, _ = make_problem(dataset, hidden_mask=False, genomes=False, consume=consume)
        read = read_versions(dataset)
        if dataset.variants is not None:
            genome_inputs = dataclasses.replace(dataset, expression=None)
        dataset = None
        release_unused_memory()  # what reading the inputs freed, back to the system (Arrow's pool, the C heap)
    # fingerprinted as read (an `ingest` may commit another store version meanwhile, and prune this one)
    fingerprints = input_fingerprints(config, read)
    check_bundle(bundle, bundle_dir, problem, config)
    n_virtual = 0
    virtual = np.zeros(problem.n_samples, bool)
    with matrix_errors(out, getattr(problem.values, "path", None)):
        if settings.missing_profiles:
            problem, virtual = add_missing_profiles(problem, settings.donors, settings.tissues, in_place=owned)
            n_virtual = int(virtual.sum())
        targets = target_mask(problem, settings.donors, settings.tissues, include_observed)
    n_targets = int(row_sums(targets).sum())
    task = bundle.models.config.evaluation.task
    if n_virtual and task != "samples" and "neighbours" not in bundle.models.networks()[0].features.absent:
        log.warning("impute: %d of the problem's %d samples are missing profiles, whose records have no neighbour; "
                    "this model learned from records that had them (evaluation.task %s: the network met records "
                    "without them only in training's denoising, train.drop_neighbours, and its head never): a "
                    "model built with evaluation.task: samples learns from records like them",
                    n_virtual, problem.n_samples, task)
    run_id = make_run_id(model_version=bundle.model_version, inputs={k: v["sha256"] for k, v in fingerprints.items()},
                         donors=selection_key(problem.donors, settings.donors),
                         tissues=selection_key(problem.tissues, settings.tissues),
                         include_observed=include_observed, missing_profiles=settings.missing_profiles,
                         # the measured entries' own-value-free genetic scores draw their folds with the seed
                         **({"seed": config.seed} if include_observed else {}))
    log.info("impute: %d entries (%d missing profiles) of %d donors x %d tissues with model %s -> %s (run %s)",
             n_targets, n_virtual, len(problem.donors), len(problem.tissues), bundle.model_version, out, run_id)

    ensure_ray(config.ray)
    try:
        with staged_output(out, step="impute", force=force) as staging:
            pool = None
            if genome_inputs is not None:
                # the promoter haplotypes go to encode tasks part by part as they are built (through files in the
                # staging folder): the driver never holds them all
                pool = n_actors, resources = predictor_pool(config, targets)
                haplotypes = personal_haplotypes(config, genome_inputs, problem, n_actors, bundle, bundle_dir,
                                                 resources, staging / HAPLOTYPES_FOLDER)
                genome_inputs = None
                release_unused_memory()  # the promoter sequences it built and handed over, a chunk at a time
            else:  # a problem given with its genomes (or none)
                haplotypes = donor_promoter_sequences(problem)
            baselines = head_baselines(bundle, problem)
            predictors = run_pipeline(config, problem, targets, virtual, bundle_dir, staging, run_id,
                                      haplotypes=haplotypes, baselines=baselines,
                                      encode_once=bundle.reads_promoters, reads_family=bundle.reads_family,
                                      release_values=owned, own_value_free=include_observed, pool=pool)
            rows = partition_rows(staging)
            n_rows = sum(rows.values())
            if n_rows != n_targets:
                raise GeximputeError(f"{out}: {n_rows} rows written for {n_targets} target entries; nothing committed")
            seconds = time.perf_counter() - t0
            write_json(staging / "_manifest.json", manifest(
                config, inputs=fingerprints, step="impute", run_id=run_id, model_version=bundle.model_version,
                model={"path": str(config_model_path), "version_folder": str(bundle_dir),
                       "model_version": bundle.model_version},
                columns=prediction_columns(bundle.models.config),  # the model's intervals (its head.quantiles)
                include_observed=include_observed, missing_profiles=n_virtual, n_rows=n_rows, rows=rows,
                seconds=round(seconds, 2), entries_per_second=round(n_rows / max(seconds, 1e-9), 1),
                ray={"gpus": ray.cluster_resources().get("GPU", 0), "predictors": predictors},
            ))
    except GeximputeError:
        raise
    except Exception as exc:
        err = output_os_error(exc)
        if err is None:
            raise
        raise output_error(out, err) from exc
    seconds = time.perf_counter() - t0
    log.info("impute: %d rows in %d tissues committed to %s in %.1f s (%.0f entries/s)", n_rows, len(rows), out,
             seconds, n_rows / max(seconds, 1e-9))
    return ImputeResult(out, run_id, bundle.model_version, rows, n_rows, n_virtual, seconds)


# A plan before a long run ---------------------------------------------------------------------------------------

#: resident memory of each kind of process at the smallest point `geximpute benchmark` measured (1,000 genes x 100
#: donors x 10 tissues, default model, 44afd6e: context 356, predictor 701, writer 591 MiB peak; the driver measured
#: as itself at ba33a7d, 605 MiB: the 1,876 recorded at 44afd6e was the benchmark process; docs/benchmarks.md
#: "Genome scale"), rounded: where the data are that small, what the process holds besides them
PROCESS_BASE_MB = {"driver": 650, "context": 350, "predictor": 650, "writer": 550, "baselines": 350,
                   "cut": 350}  # a chromosome's cutting task: taken as a baseline task's (not measured at that size)
#: float64 copies of a gene range's (genes x cells) values that fitting the stacked baselines holds at once, about
#: (the cube, its deviations, masks, iterative_ridge's and chained_boosting's fills, kept for the range's other
#: methods (shared_fill), chained_boosting's next round, float32 features and the fills of its other bags
#: (cb_bags, 3), local_regression's refilled rows; not measured array by array)
BASELINE_COPIES = 12


def imputation_problem(config: Config, dataset: Any = None, matrix: str | Path | None = None, *,
                       genomes: bool = True) -> tuple[VisibleProblem, np.ndarray, np.ndarray]:
    """(problem with its missing profiles, (G, S) target entries, (S,) virtual flags) of the config's inputs, as
    :func:`impute` builds them with its default settings; with ``matrix`` (inputs read here) the values and the
    targets are kept in files there (:class:`~geximpute.io.matrixfile.MatrixFile`), as :func:`impute` keeps them.
    ``genomes`` False: the donors' promoter haplotypes are not built (``impute`` streams them to its encode tasks
    instead of holding them in the driver)."""
    settings = config.impute
    owned = dataset is None  # inputs read here: one matrix throughout (scaled and widened in place)
    problem, _ = make_problem(dataset or load_dataset(config, matrix=matrix), hidden_mask=False, genomes=genomes,
                              consume=owned)
    virtual = np.zeros(problem.n_samples, bool)
    if settings.missing_profiles:
        problem, virtual = add_missing_profiles(problem, settings.donors, settings.tissues, in_place=owned)
    targets = target_mask(problem, settings.donors, settings.tissues, settings.include_observed)
    return problem, targets, virtual


def impute_plan(config: Config, model: str | Path | None = None, out_dir: str | Path | None = None,
                workers: int | None = None, dataset: Any = None) -> dict[str, Any]:
    """What ``impute`` would do, without running it (``geximpute impute --plan``): its shards (a run of genes of one
    chromosome x a range of donors, the unit of work of a context task), the entries of each, the gene ranges the
    stacked baselines are fitted on (one task each), the expected peak memory of each kind of process and, from the
    rate measured by the last run into the same output folder, the projected wall time for ``workers`` predictor
    actors.

    Memory is estimated from the sizes involved (passes over the problem's (G, S) matrix and targets mask, which
    the run keeps in files, one gene range's baseline estimates and, for networks that read the family level, the
    family sums in the driver; the largest chromosome's rows in the task that cuts its shards; the largest
    gene range's values in a baseline task, the largest shard and its block of context records, the bundle's
    files) over
    :data:`PROCESS_BASE_MB`: an estimate to size a cluster's nodes, not a measurement (``geximpute benchmark``
    measures).
    """
    if dataset is not None:  # the dataset given, in memory
        return _plan(config, model, out_dir, workers, dataset, None)
    out = Path(out_dir or output_dir(config)).absolute()
    with contextlib.ExitStack() as stack:
        # the matrix on disk where `impute` keeps it: beside the output, on its file system (at GTEx's layout
        # 1.4 GB, more than a node's /tmp may hold); in $TMPDIR only while the output's folder does not exist yet
        # (a plan makes no folder)
        if out.parent.is_dir():
            scratch = stack.enter_context(scratch_folder(out, MATRIX_FOLDER))
        else:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="geximpute-plan-")))
        return _plan(config, model, out_dir, workers, dataset, scratch / "expression.f32")


def _plan(config: Config, model: str | Path | None, out_dir: str | Path | None, workers: int | None, dataset: Any,
          matrix: Path | None) -> dict[str, Any]:
    """:func:`impute_plan` with the inputs' matrix kept in ``matrix`` (None: the dataset given, in memory)."""
    bundle_dir = Path(model or model_dir(config))
    out = Path(out_dir or output_dir(config))
    # the model first, as impute reads it: a missing or incompatible one is refused before the inputs are read,
    # and a model trained without genomes reads no VCF
    try:
        bundle = load_bundle(bundle_dir)
    except FileNotFoundError as exc:
        raise GeximputeError(str(exc)) from exc
    config, dataset = genomes_the_model_reads(config, bundle, dataset, "impute --plan")
    settings = config.impute
    # the problem as impute makes it: its promoter haplotypes are never built in the driver (impute streams them)
    problem, targets, virtual = imputation_problem(config, dataset, matrix, genomes=False)
    check_bundle(bundle, bundle_dir, problem, config)
    n_virtual = int(virtual.sum())
    cut = entry_blocks(problem, targets, BLOCK_ENTRIES)
    shards = [{"genes": [int(b.lo), int(b.hi)], "chrom": str(problem.chroms[b.lo]),
               "donors": [int(b.donor_lo), int(b.donor_hi)], "entries": int(b.entries)} for b in cut]
    n_entries = int(row_sums(targets).sum())
    n_genes, n_samples = problem.values.shape
    mib = 1 / 2**20
    bundle_mb = sum(f.stat().st_size for f in bundle_dir.rglob("*") if f.is_file()) * mib
    # the stacked baselines: fitted per gene range in tasks; the driver reads one range's estimates at a time
    offsets = entry_offsets(targets)
    ranges = fit_ranges(problem, bundle.models.config.baselines.block_cells) if bundle.stacked else []
    per_gene = max(n_samples, len(problem.donors) * len(problem.tissues))
    range_genes = max((hi - lo for lo, hi in ranges), default=0)
    range_entries = max((int(offsets[hi] - offsets[lo]) for lo, hi in ranges), default=0)
    estimates = range_entries * 4 * mib * len(bundle.baseline_names)
    per_record = record_bytes(config, problem, targets,
                              (len(bundle.baseline_names) if bundle.stacked else 0) + int(bundle.reads_family))
    budget = stream_budget(config, cut, per_record) if config.ray.data_object_store_mb is None else \
        config.ray.data_object_store_mb * 2**20
    block_records = max((sh["entries"] for sh in shards), default=0) * per_record
    batch_records = settings.batch_size * per_record
    # a shard: its genes (the halo is not counted: a few genes) x its donors' samples, float32 values, two masks,
    # the stacked baselines' estimates
    samples_of = np.bincount(problem.donor_index, minlength=len(problem.donors))
    per_entry = (4 + 2 + (4 * len(bundle.baseline_names) if bundle.stacked else 0)
                 + 4 * int(config.impute.include_observed and config.inputs.variants is not None))  # own-value-free
    shard_mb = max(((b.hi - b.lo) * int(samples_of[b.donor_lo : b.donor_hi].sum()) * per_entry for b in cut),
                   default=0) * mib
    family = 0.0
    ranged_family = bundle.stacked and "gene_family" in bundle.baseline_names and len(ranges) > 1
    if (bundle.reads_family or ranged_family) and problem.gene_names is not None:
        # FamilyLevels where the shards are cut, or for gene_family's ranges (one at a time)
        family = (family_rows(problem.gene_names) * n_samples * 12
                  + n_genes * min(n_samples, FAMILY_CHUNK) * 8 * 2) * mib
    # the largest chromosome's rows of the values and the two masks: what its cutting task reads (the driver
    # itself, for a problem under CUT_TASK_CELLS)
    chromosome = max((end - first for first, end in chromosome_spans(problem.chroms)), default=0)
    # (with include_observed, a bool mask more while each fold's own-value-free genetic scores are fitted)
    cut_mb = chromosome * n_samples * (4 + 1 + 1 + int(config.impute.include_observed)) * mib
    in_driver = n_genes * n_samples < CUT_TASK_CELLS
    peak = {
        # the matrix and the targets mask in files beside the output, read and written a pass of rows at a time
        # (a float32 pass and its conversions; measured: 1,193 MiB in all at 20,000 genes x 17,382 samples of
        # counts, docs/benchmarks.md "The matrix on disk"); one gene range's baseline estimates; the family sums
        # when the networks read the family level; a chromosome's rows where the driver cuts the shards itself
        "driver": (PROCESS_BASE_MB["driver"] + 3 * PASS_CELLS * 4 * mib + estimates + family
                   + (cut_mb if in_driver else 0.0)),
        # one shard at a time (geximpute.science.shards) and its block of records
        "context": PROCESS_BASE_MB["context"] + shard_mb + block_records * mib,
        # the bundle in memory (about its files), one batch through the network (activations about 50x the
        # records' bytes); the baselines' estimates come with the records
        "predictor": PROCESS_BASE_MB["predictor"] + 2 * bundle_mb + 50 * batch_records * mib,
        "writer": PROCESS_BASE_MB["writer"] + 2 * batch_records * mib,
    }
    if not in_driver:  # a chromosome's cutting task: its rows, its genes' statistics, one shard at a time
        peak["cut"] = PROCESS_BASE_MB["cut"] + cut_mb + shard_mb + (family if bundle.reads_family else 0.0)
    if ranges:  # a baseline task: one gene range's values in float64 copies (and the families' sums it reads)
        peak["baselines"] = (PROCESS_BASE_MB["baselines"] + BASELINE_COPIES * range_genes * per_gene * 8 * mib
                             + (family if ranged_family else 0.0))
    measured = _measured_rate(out)
    # the pool impute starts on CPUs: one actor per BLOCK_ENTRIES entries, up to impute.predictors
    n_workers = workers or min(settings.predictors, max(1, -(-n_entries // BLOCK_ENTRIES)))
    projected = None
    if measured is not None:
        projected = round(n_entries / (measured["rate_per_predictor"] * n_workers), 1)
    return {
        "genes": n_genes, "samples": n_samples, "donors": len(problem.donors), "tissues": len(problem.tissues),
        "missing_profiles": n_virtual, "entries": n_entries, "shards": shards,
        "baseline_ranges": [list(r) for r in ranges],
        "stream_budget_mb": None if budget is None else round(budget * mib),
        "peak_memory_mb": {k: round(v) for k, v in peak.items()},
        "bundle": {"path": str(bundle_dir), "model_version": bundle.model_version, "stacked": bundle.stacked,
                   "baselines": list(bundle.baseline_names) if bundle.stacked else [], "size_mb": round(bundle_mb, 1)},
        "predictors": n_workers, "measured": measured, "projected_seconds": projected,
    }


def _measured_rate(out: Path) -> dict[str, Any] | None:
    """The rate of the last committed run into ``out`` (its manifest), per predictor actor; None without one."""
    path = out / "_manifest.json"
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    rate, predictors = recorded.get("entries_per_second"), (recorded.get("ray") or {}).get("predictors")
    if not isinstance(rate, (int, float)) or not isinstance(predictors, int) or rate <= 0 or predictors <= 0:
        return None
    # the projection divides by the exact rate; the figure shown is rounded (a slow run's 0.04 is not 0)
    return {"from": str(path), "entries": recorded.get("n_rows"), "seconds": recorded.get("seconds"),
            "predictors": predictors, "entries_per_second_per_predictor": round(rate / predictors, 1),
            "rate_per_predictor": rate / predictors}


def format_plan(plan: dict[str, Any], max_shards: int = 8) -> str:
    """The plan as a person reads it on a terminal."""
    lines = [f"impute plan: {plan['entries']:,} entries ({plan['missing_profiles']:,} missing donor-tissue profiles) "
             f"of {plan['genes']:,} genes x {plan['donors']:,} donors x {plan['tissues']} tissues",
             f"model {plan['bundle']['model_version']} ({plan['bundle']['size_mb']} MB"
             f"{', stacked' if plan['bundle']['stacked'] else ''}) from {plan['bundle']['path']}",
             f"{len(plan['shards'])} shards (genes of one chromosome x donors, one context task each):"]
    for shard in plan["shards"][:max_shards]:
        (lo, hi), (d_lo, d_hi) = shard["genes"], shard["donors"]
        lines.append(f"  {shard['chrom']} genes {lo}-{hi - 1} x donors {d_lo}-{d_hi - 1}: {shard['entries']:,} entries")
    if len(plan["shards"]) > max_shards:
        lines.append(f"  ... {len(plan['shards']) - max_shards} more")
    if plan["stream_budget_mb"] is not None:
        lines.append(f"object store of the stream: at most {plan['stream_budget_mb']:,} MB at once")
    if plan["baseline_ranges"]:
        lines.append(f"stacked baselines fitted on {len(plan['baseline_ranges'])} gene range(s), one Ray task each")
    lines.append("expected peak memory per process (estimate, MB): "
                 + ", ".join(f"{k} {v:,}" for k, v in plan["peak_memory_mb"].items()))
    measured = plan["measured"]
    if measured is None:
        lines.append("projected wall time: no measured rate yet (none recorded in the output folder's manifest); "
                     "run impute once, or geximpute benchmark")
    else:
        lines.append(f"projected wall time with {plan['predictors']} predictor actors: {plan['projected_seconds']:,} s "
                     f"(at {measured['entries_per_second_per_predictor']:,} entries/s per predictor, measured by "
                     f"{measured['from']})")
    return "\n".join(lines)

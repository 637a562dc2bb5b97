"""``geximpute prepare``: promoter and context records, built with Ray Data and written as Parquet.

Layout of the output folder::

    promoters.parquet          one row per unique promoter sequence (schema.PROMOTERS): reference windows and,
                               with personal genomes, every donor haplotype
    gene_promoters.parquet     gene -> promoter_id of its reference window (schema.GENE_PROMOTERS)
    donor_promoters.parquet    (gene, donor) -> the donor's two haplotypes, where they differ from the reference
                               (schema.DONOR_PROMOTERS; empty without personal genomes)
    context/chrom=<c>/*.parquet one row per target entry with its context (schema.CONTEXT)
    train/fold=<i>/chrom=<c>/  with --training, the labelled records of training fold i (schema.CONTEXT: the fold's
                               entries hidden, each labelled with its own visible value in ``target``)
    genes.parquet              gene_index -> gene id, chromosome, TSS, strand
    samples.parquet            sample_index -> sample, donor, tissue
    _manifest.json             config, versions, input fingerprints, row counts, evaluation_hidden

Context records are built by Ray Data actors, one block of entries (a run of genes of one chromosome x a range of
donors) at a time, each from its own shard of the visible problem (:mod:`geximpute.science.shards`, written as a
file in the staging folder and removed before the commit), and streamed to Parquet: the driver never holds the
records and no actor holds the whole problem.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import pickle
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geximpute import schema as S
from geximpute.config import Config
from geximpute.errors import ConfigError, GeximputeError
from geximpute.io.dataset import Dataset, load_dataset
from geximpute.io.matrixfile import MatrixFile, materialise, measured, row_range
from geximpute.runtime.atomic import check_replaceable, scratch_folder, staged_output, store_of
from geximpute.runtime.console import stage
from geximpute.runtime.provenance import input_fingerprints, manifest, read_versions, write_json
from geximpute.runtime.raytools import ensure_ray
from geximpute.science.baselines import OWN_VALUE_FOLDS, FamilyLevels, family_levels, forms_families
from geximpute.science.folds import fold_labels, fold_problem, fold_targets, forget_fold, trainable, training_folds
from geximpute.science.genomes import DonorGenomes, genetic_scores, own_value_free_scores
from geximpute.science.problem import HiddenTruth, VisibleProblem, check_split, gene_rows, in_memory, make_problem
from geximpute.science.shards import (
    ArrayColumns,
    Block,
    EntryColumns,
    GeneStats,
    Shard,
    blocks,
    chromosome_spans,
    donor_sample_lists,
    entry_offsets,
    gene_stats,
    make_shard,
    shard_records,
)

log = logging.getLogger(__name__)

#: target entries per block of records (one block = a run of genes of one chromosome x a range of donors)
BLOCK_ENTRIES = 100_000
#: the run's own folder beside the output that holds the expression matrix file (``matrix_file``), as `impute`'s
MATRIX_FOLDER = "matrix"
#: the column (and partition folder) that tells :func:`write_record_parts`'s parts apart while they are written
PART = "record_part"
#: gene x sample cells of a problem from which :func:`context_shards` cuts each chromosome in a Ray task of its own;
#: below, the driver cuts them itself: a smaller problem's cut takes the driver a few seconds, about what handing
#: each chromosome to a task costs (on a 1,000-gene x 1,000-sample point the tasks added 2.5 s, 4%, to an
#: imputation; docs/benchmarks.md)
CUT_TASK_CELLS = 1 << 24


@dataclass
class Prepared:
    """What ``prepare`` produced."""

    out_dir: Path
    problem: VisibleProblem | None  # None where its matrix was kept in a file of the run (removed at its end)
    truth: HiddenTruth
    n_records: int
    n_train: int
    n_promoters: int
    seconds: float


def promoter_tables(dataset: Dataset, gene_ids: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """Reference promoter windows of ``gene_ids``, one copy per unique sequence.

    Genes whose window has more unknown bases (``N`` or off the record) than ``promoter.max_unknown_fraction``
    allows get no row (the network's learned stand-in); windows that pass keep their few ``N`` bases.
    """
    genome = dataset.genome
    if genome is None:
        return S.PROMOTERS.empty_table(), S.GENE_PROMOTERS.empty_table()
    p = dataset.config.promoter
    table = dataset.genes.table
    wanted = set(gene_ids.tolist())
    seqs: dict[str, tuple[str, int]] = {}
    rows: dict[str, list] = {S.GENE_ID: [], S.CHROM: [], "promoter_id": [], "soft_masked": []}
    for gene, chrom, tss, strand in zip(
        table[S.GENE_ID].to_pylist(),
        table[S.CHROM].to_pylist(),
        table[S.TSS].to_pylist(),
        table[S.STRAND].to_pylist(),
        strict=True,
    ):
        if gene not in wanted or chrom not in genome:
            continue
        window = genome.window(chrom, tss, strand, p.upstream, p.downstream, p.soft_mask)
        if window.padded >= p.length or not p.known(window.unknown):
            continue
        pid = hashlib.sha1(window.sequence.encode()).hexdigest()[:16]
        seqs.setdefault(pid, (window.sequence, window.padded))
        rows[S.GENE_ID].append(gene)
        rows[S.CHROM].append(chrom)
        rows["promoter_id"].append(pid)
        rows["soft_masked"].append(window.soft_masked)
    promoters = pa.table(
        {
            "promoter_id": list(seqs),
            "sequence": [s for s, _ in seqs.values()],
            "padded": [n for _, n in seqs.values()],
        },
        schema=S.PROMOTERS,
    )
    return promoters, pa.table(rows, schema=S.GENE_PROMOTERS)


def personal_promoter_tables(problem: VisibleProblem, promoters: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(promoters with every donor haplotype added, donor_promoters) of a problem with personal genomes."""
    genomes = problem.genomes
    if genomes is None:
        return promoters, S.DONOR_PROMOTERS.empty_table()
    known = set(promoters["promoter_id"].to_pylist())
    extra = [(pid, seq) for pid, seq in zip(genomes.promoter_ids, genomes.sequences, strict=True) if pid not in known]
    if extra:
        added = pa.table({"promoter_id": [p for p, _ in extra], "sequence": [q for _, q in extra],
                          "padded": [q.count("N") for _, q in extra]}, schema=S.PROMOTERS)
        promoters = pa.concat_tables([promoters, added])
    ids = np.asarray(genomes.promoter_ids, dtype=object)
    g, d = genomes.personal_pairs()
    donor_promoters = pa.table({
        S.GENE_ID: pa.array(problem.gene_ids[g], pa.string()),
        S.DONOR_ID: pa.array(np.asarray(problem.donors, dtype=object)[d], pa.string()),
        "promoter_a": pa.array(ids[genomes.rows[g, d, 0]], pa.string()),
        "promoter_b": pa.array(ids[genomes.rows[g, d, 1]], pa.string()),
    }, schema=S.DONOR_PROMOTERS)
    return promoters, donor_promoters


def sample_blocks(targets: np.ndarray, block_entries: int = BLOCK_ENTRIES) -> list[dict]:
    """Consecutive sample ranges holding about ``block_entries`` target entries each."""
    per_sample = targets.sum(axis=0)
    blocks, lo, acc = [], 0, 0
    for s, n in enumerate(per_sample):
        acc += int(n)
        if acc >= block_entries:
            blocks.append({"lo": lo, "hi": s + 1})
            lo, acc = s + 1, 0
    if lo < len(per_sample):
        blocks.append({"lo": lo, "hi": len(per_sample)})
    return blocks


class ContextBuilder:
    """Ray Data actor: builds the context records of one block of entries at a time from its shard file.

    Each input row names a shard (:func:`context_shards`: the block's genes and their halo x the block's donors'
    samples, with the per-gene statistics, cis-genetic scores, masks and extra columns it needs); the actor reads
    that file alone, builds its records (:func:`geximpute.science.shards.shard_records`) and lets it go, so its
    memory follows one shard, not the problem (a shard read from Ray's object store would stay mapped in the
    actor, and the pages of every shard it read would count in its resident memory).

    With ``spill`` (a folder) the records do not enter the object store either: each call writes its block's
    records to an Arrow IPC file there (:func:`spill_records`, record batches of ``spill_rows``) and returns one
    row naming it (``records_path``), which the imputation's predictors take, read and delete (:class:`SpilledBlocks`);
    the actor waits while ``max_spilled`` such files are not yet read. Object-store pages that the actor wrote would
    stay mapped in it and count in its resident memory, which then grew with the blocks in flight (docs/benchmarks.md).
    """

    def __init__(self, shards: list[str], k: int, max_distance: int | None, progress=None,
                 parts: list[int] | None = None, spill: str | None = None, max_spilled: int = 16,
                 spill_rows: int = 16384) -> None:
        self.shards = shards  # shard files, read one at a time
        self.parts = parts  # the part of each shard (write_record_parts), written as each record's PART column
        self.k, self.max_distance = k, max_distance
        self.progress = progress  # a progress counter actor (geximpute.runtime.raytools.progress_counter) or None
        self.spill, self.max_spilled, self.spill_rows = spill, max_spilled, spill_rows

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        tables = []
        for i in batch["shard"]:
            records = shard_records(read_shard(self.shards[int(i)]), self.k, self.max_distance)
            if self.parts is not None:
                records = records.append_column(PART, pa.array(np.full(records.num_rows, self.parts[int(i)],
                                                                       dtype=np.int32)))
            tables.append(records)
        records = pa.concat_tables(tables)
        if self.spill is not None:
            name = f"block-{int(batch['shard'][0]):06d}"
            path = spill_records(records, Path(self.spill), name, self.max_spilled, self.spill_rows)
            records = pa.table({SPILLED_PATH: pa.array([path], pa.string())})
        if self.progress is not None:
            self.progress.add.remote(len(batch["shard"]))
        return records


#: the column of a row that names a block of records spilled to a file (:class:`ContextBuilder` with ``spill``)
SPILLED_PATH = "records_path"
#: the suffix of a spilled block's file
SPILL_SUFFIX = ".arrow"


def spill_records(records: pa.Table, folder: Path, name: str, max_spilled: int, batch_rows: int,
                  poll: float = 0.02) -> str:
    """Write ``records`` to ``folder/<name>.arrow`` (Arrow IPC, record batches of at most ``batch_rows``; written
    under a temporary name and renamed, so a reader sees whole files only), once fewer than ``max_spilled`` such
    files wait in ``folder`` (a reader takes each away, :class:`SpilledBlocks`); returns the file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    while sum(1 for _ in folder.glob(f"*{SPILL_SUFFIX}")) >= max_spilled:
        time.sleep(poll)
    path = folder / f"{name}{SPILL_SUFFIX}"
    tmp = folder / f"{name}.tmp"
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, records.schema) as writer:
        writer.write_table(records, max_chunksize=max(1, batch_rows))
    tmp.rename(path)
    return str(path.absolute())


def read_spilled(path: str) -> Iterator[pa.Table]:
    """The record batches of a file written by :func:`spill_records`, one table at a time."""
    with pa.OSFile(path, "rb") as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield pa.Table.from_batches([reader.get_batch(i)])


#: the suffix a spilled block's file takes once a reader has it (:class:`SpilledBlocks`)
READ_SUFFIX = ".read"


class SpilledBlocks:
    """What a predictor reads the spilled blocks of records with (:func:`spill_records`).

    A block taken is first renamed (``<name>.arrow.read``), which frees its place for the context stage, and its file
    is deleted when the reader takes its next block, once the predictions of the one before have left the actor; a
    batch retried because its reader died in between finds the block under its new name. The run's staging folder,
    and with it any block left, is removed at the end of the run.
    """

    def __init__(self) -> None:
        self.done: list[Path] = []

    def read(self, path: str) -> Iterator[pa.Table]:
        """The record batches of the block spilled to ``path``, one table at a time."""
        for old in self.done:
            old.unlink(missing_ok=True)
        self.done = []
        spilled = Path(path)
        taken = spilled.with_name(spilled.name + READ_SUFFIX)
        if spilled.exists():
            spilled.rename(taken)
        yield from read_spilled(str(taken))
        self.done.append(taken)


def read_shard(path: str) -> Shard:
    """A shard file written by :func:`context_shards` (a pickle this run wrote itself, in its own staging folder)."""
    with open(path, "rb") as f:
        return pickle.load(f)


def context_shards(
    config: Config,
    problem: VisibleProblem,
    targets: np.ndarray | MatrixFile,
    hidden: np.ndarray | None,
    folder: Path,
    labels: np.ndarray | None = None,
    columns: dict[str, np.ndarray] | EntryColumns | None = None,
    block_entries: int = BLOCK_ENTRIES,
    family: bool = False,
    remote: bool | None = None,
    levels: FamilyLevels | None = None,
    own_value_free: bool = False,
) -> tuple[list[str], list[Block]]:
    """Cut the records of the ``targets`` entries of ``problem`` into blocks and write each block's
    :class:`~geximpute.science.shards.Shard` as a file under ``folder`` (created here; it must not exist).

    The problem's per-gene statistics and family levels are computed here, once; the shards of each chromosome
    are then cut by a task of their own (:func:`cut_chromosome`, which also fits the chromosome's genes' cis-genetic
    scores, a gene's from its own row and genome alone: Ray tasks, at most
    ``ray.concurrency`` at once, where Ray is running and the problem has :data:`CUT_TASK_CELLS` cells or more, or
    with ``remote``; else in this process, one after another) that
    gets only that chromosome's rows of the values, the masks, ``labels`` ((G, S)) and ``columns``
    (``{name: (N,)}`` or :class:`~geximpute.science.shards.EntryColumns`, one value per target entry in
    ``np.nonzero(targets)`` order, each record's in its column ``name``). ``folder`` must be readable by every node
    that runs a context actor or a cutting task, as the output folder already is (the writers write there):
    callers put it inside their staging folder and remove it before they commit. ``levels``: the problem's
    :class:`~geximpute.science.baselines.FamilyLevels` where the caller built them already. A problem and a ``targets``
    mask kept in files (:class:`~geximpute.io.matrixfile.MatrixFile`, `impute`'s) hand each chromosome's task a
    window of each, which it reads itself. ``hidden``: None where nothing is hidden. ``own_value_free`` (impute's
    ``include_observed``): a target measured in ``problem`` reads a cis-genetic score fitted without its own value
    (:func:`~geximpute.science.genomes.own_value_free_scores`, four more fits per chromosome), as a training record
    did; otherwise the score fitted on every visible value.

    Returns:
        (the shard files, their blocks), in the same order: the constructor argument ``shards`` of
        :class:`ContextBuilder` and, one row per shard, what to feed it.
    """
    import ray

    stats = gene_stats(problem)
    given, levels = levels, None
    if family:
        if problem.gene_names is not None:
            levels = functools.partial((given or family_levels(problem)).level,
                                       shrinkage=config.context.family_shrinkage)
        else:
            levels = no_family_level
    cut = blocks(problem, targets, block_entries)
    if isinstance(columns, dict):
        columns = ArrayColumns(columns)
    offsets = entry_offsets(targets) if columns is not None and columns.names else None
    folder.mkdir(parents=True)
    donor_samples = donor_sample_lists(problem)
    if remote is None:
        remote = ray.is_initialized() and problem.values.size >= CUT_TASK_CELLS
    if remote:  # one copy of each object every task reads, in the object store
        task = ray.remote(cut_chromosome).options(num_cpus=config.ray.cpus_per_task)
        donor_samples = ray.put(donor_samples)
        levels = ray.put(levels) if levels is not None else None
    written: dict[int, list[str]] = {}  # the files of each chromosome's blocks, by its first block
    pending: dict = {}
    first_block = 0
    for first, end in chromosome_spans(problem.chroms):
        n_blocks = 0  # the chromosome's blocks follow each other in `cut`
        while first_block + n_blocks < len(cut) and cut[first_block + n_blocks].lo < end:
            n_blocks += 1
        if n_blocks:
            part = ChromosomeCut(
                problem=gene_rows(problem, first, end), first=first,
                blocks=[dataclasses.replace(b, lo=b.lo - first, hi=b.hi - first)
                        for b in cut[first_block : first_block + n_blocks]],
                first_block=first_block, targets=row_range(targets, first, end),
                hidden=np.zeros((end - first, problem.n_samples), bool) if hidden is None else hidden[first:end],
                stats=stats.rows(first, end),
                genomes=None if problem.genomes is None else problem.genomes.gene_range(first, end),
                genetic_shrinkage=config.context.genetic_shrinkage,
                labels=None if labels is None else row_range(labels, first, end),
                columns=None if offsets is None else columns.window(int(offsets[first]), int(offsets[end])),
                offsets=None if offsets is None else offsets[first : end + 1] - offsets[first],
                k=config.context.k_neighbours, own_value_seed=config.seed if own_value_free else None)
            if remote:
                while len(pending) >= config.ray.concurrency:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    written[pending.pop(done[0])] = ray.get(done[0])
                # through a file beside the shards, which its task reads and deletes: neither the driver nor the
                # object store holds a copy of the chromosome's rows
                path = folder / f"chromosome-{first_block:06d}.pkl"
                with open(path, "wb") as f:
                    pickle.dump(part, f, protocol=pickle.HIGHEST_PROTOCOL)
                pending[task.remote(str(path.absolute()), donor_samples, levels, str(folder))] = first_block
            else:
                written[first_block] = cut_chromosome(part, donor_samples, levels, str(folder))
        first_block += n_blocks
    for ref, at in pending.items():
        written[at] = ray.get(ref)
    paths = [path for at in sorted(written) for path in written[at]]  # in block order, whatever order tasks ended
    log.debug("%d shards of %d target entries written to %s", len(paths), sum(b.entries for b in cut), folder)
    return paths, cut



@dataclass
class ChromosomeCut:
    """What the shards of one chromosome's blocks are cut from (:func:`cut_chromosome`): the chromosome's rows of
    the problem (every sample) and of each per-gene array, its blocks with their rows counted from its first gene
    (``first`` in the whole problem), the index of its first block among the whole problem's, its genes' genomes
    (:meth:`~geximpute.science.genomes.DonorGenomes.gene_range`, None without personal genomes), and its columns
    (:meth:`~geximpute.science.shards.ArrayColumns.window`) with their ``offsets`` counted from its first target
    entry."""

    problem: VisibleProblem
    first: int
    blocks: list[Block]
    first_block: int
    targets: np.ndarray
    hidden: np.ndarray
    stats: GeneStats
    genomes: DonorGenomes | None
    genetic_shrinkage: float | None
    labels: np.ndarray | None
    columns: EntryColumns | None
    offsets: np.ndarray | None
    k: int
    #: not None (the fold seed): measured targets read cis-genetic scores fitted without their own values
    own_value_seed: int | None = None


def cut_chromosome(part: ChromosomeCut | str, donor_samples: list[np.ndarray],
                   family: Callable[[np.ndarray, np.ndarray], np.ndarray] | None, folder: str) -> list[str]:
    """Ray task (or a call): write the shard of each of a chromosome's blocks (:func:`make_shard` on the
    chromosome's rows alone; neighbour context never crosses a chromosome) as ``shard-<block>.pkl`` under
    ``folder``; returns the files. ``part``: the chromosome's :class:`ChromosomeCut`, or the file that
    :func:`context_shards` wrote it to (read, then deleted). ``family``: the family level of entries given by
    their whole-problem gene and sample indices, or None. The shards are those of the whole problem's blocks, array
    for array."""
    if isinstance(part, str):
        with open(part, "rb") as f:
            loaded = pickle.load(f)
        Path(part).unlink()
        part = loaded
    part.problem = in_memory(part.problem)  # a window of the driver's matrix file: this chromosome's rows read here
    part.targets = materialise(part.targets)
    part.labels = materialise(part.labels)
    first, problem = part.first, part.problem
    level = None if family is None else functools.partial(_level_at, family, first)
    genetic = own_genetic = None
    if part.genomes is not None:
        genetic, _ = genetic_scores(part.genomes, problem.values, problem.tissue_index, problem.donor_index,
                                    len(problem.tissues), part.genetic_shrinkage)
        # impute's include_observed: the measured targets' scores fitted without their own values
        if part.own_value_seed is not None and (part.targets & ~np.isnan(problem.values)).any():
            own_genetic = own_value_free_scores(part.genomes, problem.values, problem.tissue_index,
                                                problem.donor_index, len(problem.tissues), part.genetic_shrinkage,
                                                part.targets, OWN_VALUE_FOLDS, part.own_value_seed, first)
    span = (0, part.problem.n_genes)
    paths = []
    for i, block in enumerate(part.blocks):
        shard = make_shard(part.problem, block, span, donor_samples, part.stats, part.targets, part.hidden, part.k,
                           genetic=genetic, labels=part.labels, columns=part.columns,
                           entry_offsets=part.offsets, family=level, own_genetic=own_genetic)
        shard.gene_offset += first
        path = Path(folder) / f"shard-{part.first_block + i:06d}.pkl"
        with open(path, "wb") as f:
            pickle.dump(shard, f, protocol=pickle.HIGHEST_PROTOCOL)
        paths.append(str(path.absolute()))
    return paths


def _level_at(family: Callable[[np.ndarray, np.ndarray], np.ndarray], first: int, gene_index: np.ndarray,
              sample_index: np.ndarray) -> np.ndarray:
    """``family`` at genes counted from a chromosome's first gene (``first`` in the whole problem)."""
    return family(gene_index + first, sample_index)


def no_family_level(gene_index: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
    """The family level of entries whose genes have no symbols: unknown (NaN) for each."""
    return np.full(len(gene_index), np.nan, np.float32)


def family_input(config: Config, problem: VisibleProblem) -> bool:
    """Whether the records of a model trained on ``problem`` carry the family level (``context.family``; by
    default on the ``genes`` task where the symbols form families:
    :func:`geximpute.science.baselines.forms_families`)."""
    wanted = config.context.family
    if wanted is False or problem.gene_names is None:
        return False
    return wanted is True or (config.evaluation.task == "genes" and forms_families(problem.gene_names))


def context_records(shards: list[str], config: Config, concurrency: int, progress=None,
                    parts: list[int] | None = None, spill: Path | None = None, max_spilled: int = 16):
    """The Ray Data stream of context records of the shard files ``shards`` (:func:`context_shards`), built by
    ``concurrency`` :class:`ContextBuilder` actors, one shard per task; with ``parts`` (one per shard) each
    record carries its shard's in a column ``PART``; with ``spill`` each block's records go to a file in that
    folder (at most ``max_spilled`` unread at once) and the stream carries one row naming it
    (:func:`spill_records`)."""
    import ray

    return ray.data.from_items([{"shard": i} for i in range(len(shards))],
                               override_num_blocks=max(1, len(shards))).map_batches(
        ContextBuilder,
        fn_constructor_kwargs={"shards": shards, "k": config.context.k_neighbours,
                               "max_distance": config.context.max_distance, "progress": progress,
                               "parts": parts, "spill": None if spill is None else str(spill.absolute()),
                               "max_spilled": max_spilled, "spill_rows": config.impute.batch_size},
        batch_size=1,
        batch_format="numpy",
        num_cpus=config.ray.cpus_per_task,
        compute=ray.data.ActorPoolStrategy(size=max(1, min(concurrency, len(shards)))),
    )


@dataclass
class RecordPart:
    """One set of records that :func:`write_record_parts` writes: those of the ``targets`` entries of ``problem``
    into the Parquet folder ``out``, each record's ``target`` from ``labels`` ((G, S); default the problem's own
    values). ``fold``: entries hidden from ``problem`` as well (a training fold's,
    :func:`~geximpute.science.folds.fold_problem`), when this part's shards are cut: one fold's copy of the values
    at a time, not one per fold for the whole of prepare."""

    problem: VisibleProblem
    targets: np.ndarray
    hidden: np.ndarray
    out: Path
    labels: np.ndarray | None = None
    fold: np.ndarray | None = None


def write_record_parts(config: Config, parts: list[RecordPart], name: str = "prepare: context records") -> list[int]:
    """Build the context records of every part in one Ray Data execution (one pool of :class:`ContextBuilder`
    actors for all of them) and write each part's under its ``out``, partitioned by chromosome.

    Returns:
        the number of records written for each part.
    """
    staging = parts[0].out.parent / ".records"  # beside the outputs, inside the caller's staging folder
    shards: list[str] = []
    part_of: list[int] = []
    # one decision for every part (they share their genes and symbols): the records of one model
    family = family_input(config, parts[0].problem)
    try:
        for i, part in enumerate(parts):
            problem = part.problem if part.fold is None else fold_problem(part.problem, part.fold)
            labels = part.labels
            # a fold's own values (the default, or given as the problem's) on the fold's scale (counts: its factors)
            if part.fold is not None and (labels is None or labels is part.problem.values):
                labels = fold_labels(part.problem, problem)
            try:
                paths, _ = context_shards(config, problem, part.targets, part.hidden, staging / f"shards-{i}",
                                          labels, family=family)
            finally:
                forget_fold(problem)  # a fold's mask file, where the values are a file's
            del problem, labels  # a fold's copies: the shards hold what its records need
            shards += paths
            part_of += [i] * len(paths)
        written = staging / "records"
        with stage(name, total=len(shards), unit="blocks") as progress:
            records = context_records(shards, config, config.ray.concurrency, progress.counter(), parts=part_of)
            records.write_parquet(str(written), partition_cols=[PART, S.CHROM])
        counts = []
        for i, part in enumerate(parts):
            part.out.parent.mkdir(parents=True, exist_ok=True)
            written_part = written / f"{PART}={i}"
            if written_part.is_dir():
                written_part.rename(part.out)
                counts.append(pq.ParquetDataset(part.out).read(columns=["gene_index"]).num_rows)
            else:  # no records: an empty folder all the same, as readers expect one per part
                part.out.mkdir()
                counts.append(0)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def write_problem_index(problem: VisibleProblem, folder: Path) -> None:
    """``genes.parquet`` and ``samples.parquet``: what ``gene_index`` and ``sample_index`` of the records mean."""
    pq.write_table(
        pa.table({S.GENE_ID: pa.array(problem.gene_ids, pa.string()), S.CHROM: pa.array(problem.chroms, pa.string()),
                  S.TSS: problem.tss, S.STRAND: problem.strand}),
        folder / "genes.parquet",
    )
    pq.write_table(
        pa.table({
            S.SAMPLE_ID: pa.array(problem.sample_ids, pa.string()),
            S.DONOR_ID: pa.array(np.asarray(problem.donors, dtype=object)[problem.donor_index], pa.string()),
            S.TISSUE: pa.array(np.asarray(problem.tissues, dtype=object)[problem.tissue_index], pa.string()),
            "tissue_index": problem.tissue_index,
        }),
        folder / "samples.parquet",
    )


def read_problem_index(folder: Path) -> tuple[np.ndarray, list[str]]:
    """(gene ids in ``gene_index`` order, tissue names in ``tissue_index`` order) of a prepare output."""
    if not (folder / "genes.parquet").is_file():
        raise GeximputeError(f"{folder}: not a prepare output (no genes.parquet); run `geximpute prepare` first")
    genes = pq.read_table(folder / "genes.parquet")[S.GENE_ID].to_pylist()
    samples = pq.read_table(folder / "samples.parquet")
    order = np.argsort(samples["tissue_index"].to_numpy(), kind="stable")
    names = np.asarray(samples[S.TISSUE].to_pylist(), dtype=object)[order]
    index = samples["tissue_index"].to_numpy()[order]
    tissues = [names[np.flatnonzero(index == t)[0]] for t in range(int(index.max()) + 1)] if len(index) else []
    return np.asarray(genes, dtype=object), tissues


def target_masks(problem: VisibleProblem, truth: HiddenTruth, which: str) -> tuple[np.ndarray, np.ndarray]:
    """(targets, hidden) boolean (G, S) masks: ``all`` = visible + hidden, ``hidden`` or ``visible`` only (``none``
    builds no context part: :func:`prepare` does not ask)."""
    if which not in ("all", "hidden", "visible"):
        raise ValueError(f"target_masks: which is {which!r}; expected all, hidden or visible")
    hidden = np.zeros(problem.values.shape, dtype=bool)
    hidden[truth.gene_index, truth.sample_index] = True
    if which == "hidden":
        return hidden, hidden
    visible = measured(problem.values)
    return (visible | hidden if which == "all" else visible), hidden


def prepare(
    config: Config,
    out_dir: str | Path | None = None,
    *,
    dataset: Dataset | None = None,
    targets: str = "all",
    training: bool = False,
    force: bool = False,
    matrix_file: bool | None = None,
) -> Prepared:
    """Build and write the records of ``config``.

    Args:
        config: the resolved config; ``config.evaluation`` decides what is hidden.
        out_dir: output folder (default ``<output_dir>/records``); replaced atomically.
        dataset: an already loaded dataset (default: load the config's inputs).
        targets: which entries get a context record: ``all``, ``hidden``, ``visible`` or ``none`` (no context
            records: what training reads is the training folds).
        training: also write the labelled training folds (``train/fold=<i>/``, see :mod:`geximpute.science.folds`).
        force: replace ``out_dir`` even when it is not an earlier prepare output (:mod:`geximpute.runtime.atomic`).
        matrix_file: keep the expression matrix in a file of the run's own beside ``out_dir`` (as `impute` does,
            :class:`~geximpute.io.matrixfile.MatrixFile`), not in memory: the problem's values are scaled and
            hidden there a pass of rows at a time, each training fold is a view of the same file that hides the
            fold's entries (:func:`~geximpute.science.folds.fold_problem`), and each chromosome's task reads its
            own rows; the driver holds the (genes x samples) masks (a byte a cell), not the values. Default: when
            ``dataset`` is None (prepare reads the inputs itself). The result's ``problem`` is then None (its file
            is removed when prepare ends).

    Raises:
        ConfigError: ``targets`` ``none`` without ``training`` (nothing to write).
    """
    if targets == "none" and not training:
        raise ConfigError("prepare: --targets none writes no context record, so it needs --training (the folds "
                          "train and fit-head read); without it the output would hold nothing")
    if matrix_file is None:
        matrix_file = dataset is None
    if matrix_file and dataset is not None:
        raise ValueError("prepare: matrix_file reads the inputs into a file; it cannot take a loaded dataset")
    out_dir = Path(out_dir or Path(config.output_dir) / "records")
    with contextlib.ExitStack() as scratch:
        matrix = None
        if matrix_file:
            matrix = scratch.enter_context(scratch_folder(out_dir, MATRIX_FOLDER)) / "expression.f32"
        result = _prepare(config, out_dir, dataset, matrix, targets, training, force)
    if matrix_file:
        result.problem = None
    return result


def _prepare(config: Config, out_dir: Path, dataset: Dataset | None, matrix: Path | None, targets: str,
             training: bool, force: bool) -> Prepared:
    t0 = time.perf_counter()
    if dataset is None:  # refused before the inputs are read, and again where the records are committed
        check_replaceable(out_dir, "prepare", store_of(Path(out_dir).absolute()), force)
    # read here, the dataset's matrix becomes the problem's (scaled in place), not a second copy beside it
    consume = dataset is None
    dataset = dataset or load_dataset(config, matrix=matrix)
    # fingerprinted as read (an `ingest` may commit another store version meanwhile, and prune this one)
    inputs = input_fingerprints(config, read_versions(dataset))
    context = targets != "none"  # `none`: no context part at all, not a (genes x samples) mask of nothing
    # the evaluation's entries are hidden where there is something to score them with (context records); the
    # training folds alone (`--targets none`: a model for imputation, as the cluster jobs build it) are cut from
    # every visible entry, where a tenth of the data was held out for a score nobody computed
    problem, truth = make_problem(dataset, consume=consume, hidden_mask=context)
    check_split(problem.chroms, config)  # the folds and the evaluation read the split: a name that holds no gene
    if context:
        target_mask, hidden = target_masks(problem, truth, targets)
        log.info("prepare: %d target entries -> %s", int(target_mask.sum()), out_dir)
    else:
        log.info("prepare: no context records (targets none) -> %s", out_dir)

    ensure_ray(config.ray)
    with staged_output(out_dir, step="prepare", force=force) as staging:
        promoters, gene_promoters = promoter_tables(dataset, problem.gene_ids)
        promoters, donor_promoters = personal_promoter_tables(problem, promoters)
        pq.write_table(promoters, staging / "promoters.parquet")
        pq.write_table(gene_promoters, staging / "gene_promoters.parquet")
        pq.write_table(donor_promoters, staging / "donor_promoters.parquet")
        log.info(
            "prepare: %d genes with a promoter, %d unique sequences",
            gene_promoters.num_rows,
            promoters.num_rows,
        )
        write_problem_index(problem, staging)
        parts = [RecordPart(problem, target_mask, hidden, staging / "context")] if context else []
        if training:
            t = config.train
            for f, inner in enumerate(training_folds(problem, config.evaluation.task, t.folds, config.fold_fraction,
                                                     config.seed, whole_donors=config.evaluation.whole_donors)):
                labelled = fold_targets(trainable(problem, inner), problem.tissue_index, t.max_fold_records,
                                        config.seed, f)
                n_inner, n_labelled = int(inner.sum()), int(labelled.sum())
                if n_labelled < n_inner:
                    log.info("prepare: training fold %d hides %d entries; %d of them get a record (a random set of "
                             "its (gene, tissue) groups: train.max_fold_records %d)", f, n_inner, n_labelled,
                             t.max_fold_records)
                parts.append(RecordPart(problem, labelled, inner, staging / "train" / f"fold={f}",
                                        labels=problem.values, fold=inner))
        # the context records and every training fold's in one Ray Data execution
        what = ", ".join((["context records"] if context else [])
                         + ([f"{len(parts) - context} training folds"] if training else []))
        counts = write_record_parts(config, parts, f"prepare: {what}") if parts else []
        if not context:  # an empty folder all the same, as readers expect one
            (staging / "context").mkdir()
            counts = [0, *counts]
        n_records, n_train = counts[0], sum(counts[1:])
        seconds = time.perf_counter() - t0
        write_json(
            staging / "_manifest.json",
            manifest(
                config,
                inputs=inputs,
                step="prepare",
                targets=targets,
                rows={
                    "context": n_records,
                    "train": n_train,
                    "promoters": promoters.num_rows,
                    "gene_promoters": gene_promoters.num_rows,
                    "donor_promoters": donor_promoters.num_rows,
                },
                genomes=problem.genomes.report if problem.genomes is not None else None,
                hidden_entries=len(truth),
                evaluation_hidden=context,
                seconds=round(seconds, 2),
            ),
        )
    log.info("prepare: %d records in %.1f s", n_records, seconds)
    return Prepared(out_dir, problem, truth, n_records, n_train, promoters.num_rows, seconds)

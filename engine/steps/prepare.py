"""``geximpute prepare``: promoter and context records, built with Ray Data and written as Parquet.

Layout of the output folder::

    promoters.parquet          one row per unique promoter sequence (schema.PROMOTERS): reference windows and,
                               with personal genomes, every donor haplotype
    gene_promoters.parquet     gene -> promoter_id of its reference window (schema.GENE_PROMOTERS)
    donor_promoters.parquet    (gene, donor) -> the donor's two haplotypes, where they differ from the reference
                               (schema.DONOR_PROMOTERS; empty without personal genomes)
    context/chrom=<c>/*.parquet one row per target entry with its context (schema.CONTEXT)
    _manifest.json             config, versions, input fingerprints, row counts

Context records are built by Ray Data actors, one block of samples at a time, from the visible problem held once
in Ray's object store, and streamed to Parquet: the driver never holds the records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geximpute import schema as S
from geximpute.config import Config
from geximpute.io.dataset import Dataset, load_dataset
from geximpute.runtime.atomic import staged_output
from geximpute.runtime.console import stage
from geximpute.runtime.provenance import manifest, write_json
from geximpute.runtime.raytools import ensure_ray
from geximpute.science.context import ContextIndex, build_context
from geximpute.science.folds import fold_problem, training_folds
from geximpute.science.genomes import genetic_scores
from geximpute.science.problem import HiddenTruth, VisibleProblem, make_problem

log = logging.getLogger(__name__)

#: target entries per Ray Data block (one block = a set of whole samples)
BLOCK_ENTRIES = 100_000


@dataclass
class Prepared:
    """What ``prepare`` produced."""

    out_dir: Path
    problem: VisibleProblem
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
    """Ray Data actor: builds the context records of a block of samples.

    The problem, the target masks and the cis-genetic scores arrive as object references and are fetched once per
    actor (numpy arrays in the object store are read without a copy); :func:`context_builder_kwargs` makes them.
    """

    def __init__(self, refs: tuple, k: int, max_distance: int | None, progress=None) -> None:
        import ray

        problem_ref, masks_ref, labels_ref, genetic_ref = refs
        genetic = ray.get(genetic_ref) if genetic_ref is not None else None
        self.index = ContextIndex(ray.get(problem_ref), genetic=genetic)
        self.targets, self.hidden = ray.get(masks_ref)
        self.labels = ray.get(labels_ref) if labels_ref is not None else None
        self.k, self.max_distance = k, max_distance
        self.progress = progress  # a progress counter actor (geximpute.runtime.raytools.progress_counter) or None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        tables = []
        for lo, hi in zip(batch["lo"], batch["hi"], strict=True):
            gi, si = np.nonzero(self.targets[:, lo:hi])
            si = si + lo
            table = build_context(self.index, gi, si, self.hidden[gi, si], self.k, self.max_distance)
            if self.labels is not None:
                # training folds: the label of a re-hidden entry is its visible value in the outer problem
                g = table["gene_index"].to_numpy()
                s = table["sample_index"].to_numpy()
                label = pa.array(self.labels[g, s], pa.float32(), from_pandas=True)
                table = table.set_column(table.schema.get_field_index("target"), "target", label)
            tables.append(table)
        if self.progress is not None:
            self.progress.add.remote(len(batch["lo"]))
        return pa.concat_tables(tables)


def context_builder_kwargs(
    config: Config,
    problem: VisibleProblem,
    targets: np.ndarray,
    hidden: np.ndarray,
    labels: np.ndarray | None = None,
) -> dict:
    """The constructor arguments of :class:`ContextBuilder` for the ``targets`` entries of ``problem``.

    The problem's cis-genetic scores are fitted here, once, rather than in every actor that builds records. The
    references travel inside a tuple so that the actors fetch them themselves, once each.
    """
    import ray

    genetic = None
    if problem.genomes is not None:
        genetic, _ = genetic_scores(problem.genomes, problem.values, problem.tissue_index, problem.donor_index,
                                    len(problem.tissues), config.context.genetic_shrinkage)
        # the scores are all a context actor needs of the genomes: not their sequences (Python strings, which each
        # actor would otherwise unpickle whole: about 1.6 kB per unique haplotype)
        problem = dataclasses.replace(problem, genomes=None)
    refs = (ray.put(problem), ray.put((targets, hidden)), None if labels is None else ray.put(labels),
            None if genetic is None else ray.put(genetic))
    return {"refs": refs, "k": config.context.k_neighbours, "max_distance": config.context.max_distance}


def write_records(
    config: Config,
    problem: VisibleProblem,
    targets: np.ndarray,
    hidden: np.ndarray,
    out: Path,
    labels: np.ndarray | None = None,
    name: str = "prepare: context records",
) -> int:
    """Build the context records of the ``targets`` entries with Ray Data and write them under ``out``.

    Args:
        config: ray and context settings.
        problem: what the records may see.
        targets, hidden: (G, S) masks of the entries that get a record and of those flagged hidden.
        out: folder of the Parquet dataset, partitioned by chromosome.
        labels: (G, S) values to use as each record's ``target`` instead of the problem's own.
        name: the progress display's name.

    Returns:
        the number of records written.
    """
    import ray

    blocks = sample_blocks(targets)
    with stage(name, total=len(blocks), unit="blocks") as progress:
        kwargs = context_builder_kwargs(config, problem, targets, hidden, labels)
        records = ray.data.from_items(blocks, override_num_blocks=max(1, len(blocks))).map_batches(
            ContextBuilder,
            fn_constructor_kwargs={**kwargs, "progress": progress.counter()},
            batch_size=1,
            batch_format="numpy",
            num_cpus=config.ray.cpus_per_task,
            compute=ray.data.ActorPoolStrategy(size=max(1, min(config.ray.concurrency, len(blocks)))),
        )
        records.write_parquet(str(out), partition_cols=[S.CHROM])
    return pq.ParquetDataset(out).read(columns=["gene_index"]).num_rows


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
        raise FileNotFoundError(f"{folder}: not a prepare output (no genes.parquet); run `geximpute prepare` first")
    genes = pq.read_table(folder / "genes.parquet")[S.GENE_ID].to_pylist()
    samples = pq.read_table(folder / "samples.parquet")
    order = np.argsort(samples["tissue_index"].to_numpy(), kind="stable")
    names = np.asarray(samples[S.TISSUE].to_pylist(), dtype=object)[order]
    index = samples["tissue_index"].to_numpy()[order]
    tissues = [names[np.flatnonzero(index == t)[0]] for t in range(int(index.max()) + 1)] if len(index) else []
    return np.asarray(genes, dtype=object), tissues


def target_masks(problem: VisibleProblem, truth: HiddenTruth, which: str) -> tuple[np.ndarray, np.ndarray]:
    """(targets, hidden) boolean (G, S) masks: ``all`` = visible + hidden, ``hidden`` or ``visible`` only."""
    hidden = np.zeros(problem.values.shape, dtype=bool)
    hidden[truth.gene_index, truth.sample_index] = True
    visible = ~np.isnan(problem.values)
    targets = {"all": visible | hidden, "hidden": hidden, "visible": visible}[which]
    return targets, hidden


def prepare(
    config: Config,
    out_dir: str | Path | None = None,
    *,
    dataset: Dataset | None = None,
    targets: str = "all",
    training: bool = False,
    force: bool = False,
) -> Prepared:
    """Build and write the records of ``config``.

    Args:
        config: the resolved config; ``config.evaluation`` decides what is hidden.
        out_dir: output folder (default ``<output_dir>/records``); replaced atomically.
        dataset: an already loaded dataset (default: load the config's inputs).
        targets: which entries get a context record: ``all``, ``hidden`` or ``visible``.
        training: also write the labelled training folds (``train/fold=<i>/``, see :mod:`geximpute.science.folds`).
        force: replace ``out_dir`` even when it is not an earlier prepare output (:mod:`geximpute.runtime.atomic`).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir or Path(config.output_dir) / "records")
    dataset = dataset or load_dataset(config)
    problem, truth = make_problem(dataset)
    target_mask, hidden = target_masks(problem, truth, targets)
    log.info("prepare: %d target entries -> %s", int(target_mask.sum()), out_dir)

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
        n_records = write_records(config, problem, target_mask, hidden, staging / "context")
        n_train = 0
        if training:
            t = config.train
            for f, inner in enumerate(training_folds(problem, config.evaluation.task, t.folds, t.fold_fraction,
                                                     config.seed, whole_donors=config.evaluation.whole_donors)):
                log.debug("prepare: training fold %d: %d re-hidden entries", f, int(inner.sum()))
                n_train += write_records(config, fold_problem(problem, inner), inner, inner,
                                         staging / "train" / f"fold={f}", labels=problem.values,
                                         name=f"prepare: training fold {f}")
        seconds = time.perf_counter() - t0
        write_json(
            staging / "_manifest.json",
            manifest(
                config,
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
                seconds=round(seconds, 2),
            ),
        )
    log.info("prepare: %d records in %.1f s", n_records, seconds)
    return Prepared(out_dir, problem, truth, n_records, n_train, promoters.num_rows, seconds)

"""`geximpute ingest`: the configured expression file read once into an expression store (:mod:`geximpute.io.store`).

A genomics group's expression matrix changes rarely and is read by every run (each nightly run, each `impute`,
`prepare` and `evaluate`): parsing a GCT of 17,382 samples is a minute or more of one process every time. Ingested,
it is read from Parquet partitions, one per chromosome, that the annotation gives; the run reads exactly the values
the source gives (tested). The store is written like every output of the engine (:mod:`geximpute.runtime.atomic`:
staged, committed by one switch, never over a folder that is not an earlier store). A GCT or wide table's matrix
passes through a file beside it, not memory (:class:`~geximpute.io.matrixfile.MatrixFile`), so ingesting one bigger
than memory works; a long table is gathered in memory first (its rows come in any order), then copied there.
The source is fingerprinted before it is read and checked after: a file that changed meanwhile is refused.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geximpute import schema as S
from geximpute.config import Config
from geximpute.errors import ConfigError, InputError
from geximpute.io.checks import check_readable, file_state
from geximpute.io.expression import detect_format, read_expression
from geximpute.io.genes import read_genes
from geximpute.io.store import is_store, write_store
from geximpute.runtime.atomic import check_replaceable, scratch_folder, staged_output, store_of
from geximpute.runtime.console import stage
from geximpute.runtime.provenance import fingerprint

log = logging.getLogger(__name__)

#: the folder of an ingest output under the config's ``output_dir`` when no ``out`` is given
DEFAULT_FOLDER = "expression"


@dataclass
class Ingested:
    """What :func:`ingest` wrote."""

    out_dir: Path
    n_genes: int
    n_samples: int
    partitions: int
    unannotated: int
    seconds: float


def ingest(config: Config, out_dir: str | Path | None = None, *, force: bool = False) -> Ingested:
    """Read ``config``'s expression file (``inputs.expression``, on ``inputs.scale``) and write it as an expression
    store in ``out_dir`` (default ``<output_dir>/expression``), partitioned by the chromosome ``inputs.genes`` puts
    each gene on (genes it lacks in a partition of their own).

    Raises:
        ConfigError: the expression is a store already, or a phenotype BED (whose rows carry their own
            coordinates; read it directly), or there is no gene annotation.
        InputError: a bad expression or annotation file (as any run reports it).
        OutputRefused: ``out_dir`` exists and is not an earlier store (unless ``force``).
    """
    t0 = time.perf_counter()
    inputs = config.inputs
    source = Path(inputs.expression)
    if is_store(source) or inputs.expression_format == "store":
        raise ConfigError(f"inputs.expression ({source}) is an expression store already; ingest reads an "
                          "expression file (GCT, wide or long table)")
    fmt = inputs.expression_format if inputs.expression_format != "auto" else (
        detect_format(source) if source.is_file() else "auto")
    if fmt == "bed":
        raise ConfigError(f"inputs.expression ({source}) is a phenotype BED, which carries each gene's coordinates "
                          "itself; runs read it directly (ingest takes GCT, wide or long tables)")
    if not inputs.genes:
        raise ConfigError("ingest partitions the genes by chromosome: set inputs.genes to the gene annotation")
    # both inputs checked before anything is read (minutes for GTEx's expression): named as every run names them
    check_readable(source, "expression file")
    check_readable(inputs.genes, "gene annotation")
    out = Path(out_dir or Path(config.output_dir) / DEFAULT_FOLDER)
    # refused before the source is read (minutes for GTEx's), and again where the store is committed
    check_replaceable(out, "ingest", store_of(out.absolute()), force)
    # the source as it was before reading: the store records it, and a file rewritten while it was read (minutes
    # for GTEx's) would give values of neither version under the new one's fingerprint
    state = file_state(source)
    before = {**fingerprint(source), "mtime_ns": state[1]}
    with scratch_folder(out, "ingest") as scratch:
        log.info("ingest: reading expression %s", source)
        expr = read_expression(source, inputs.expression_format, inputs.scale, matrix=scratch / "expression.f32")
        if file_state(source) != state:
            raise InputError(source, "the file changed while it was being ingested; nothing was written",
                             hint="ingest again once the file is complete")
        log.info("ingest: reading genes %s", inputs.genes)
        # every gene of the annotation, whatever its type: the partitions are where genes live, and
        # inputs.gene_types chooses among them when a run reads the store (as it does for the source)
        genes = read_genes(inputs.genes, inputs.genes_format)
        chrom_of = dict(zip(genes.table[S.GENE_ID].to_pylist(), genes.table[S.CHROM].to_pylist(), strict=True))
        chroms = np.asarray([chrom_of.get(g) for g in expr.gene_ids], dtype=object)
        annotation_order = list(dict.fromkeys(genes.table[S.CHROM].to_pylist()))
        unannotated = int(sum(c is None for c in chroms))
        n_parts = len({c for c in chroms if c is not None}) + (unannotated > 0)
        with staged_output(out, step="ingest", force=force) as staging, \
                stage("ingest: chromosome partitions", total=n_parts, unit="partitions") as progress:
            meta = write_store(
                expr.values, expr.gene_ids, expr.sample_ids, expr.gene_names, chroms, annotation_order, staging,
                scale=inputs.scale, source={**before, "format": expr.report.get("format")},
                annotation=fingerprint(inputs.genes), progress=lambda chrom, n: progress.advance())
    seconds = time.perf_counter() - t0
    if unannotated:
        log.info("ingest: %d of %d genes are not in the annotation %s: kept in the partition chrom=%s",
                 unannotated, len(expr.gene_ids), inputs.genes, "__HIVE_DEFAULT_PARTITION__")
    log.info("ingest: %d genes x %d samples in %d partitions -> %s (%.1f s)", meta["n_genes"], meta["n_samples"],
             len(meta["partitions"]), out, seconds)
    return Ingested(out, meta["n_genes"], meta["n_samples"], len(meta["partitions"]), unannotated, seconds)

"""An expression store: an expression matrix ingested once into Parquet, one partition per chromosome.

`geximpute ingest` reads the configured expression file (any layout :func:`~geximpute.io.expression.read_expression`
reads, validated as every run validates it) and writes it as a folder that every later run reads instead of the
text file (set ``inputs.expression`` to the folder; docs/benchmarks.md "Ingested once"):

```
STORE/
  _store.json                        what the store holds (below); written last
  chrom=chr1/part-0.parquet          the genes the annotation puts on chr1, in the source file's row order
  chrom=chr2/part-0.parquet
  ...
  chrom=__HIVE_DEFAULT_PARTITION__/part-0.parquet   the genes the annotation lacks (kept: nothing is dropped)
```

Each partition has one row per gene: ``row`` (int64: its row in the source file), ``gene_id`` (without version),
``gene_name`` (the symbol, where the source had a symbol column) and ``values`` (``fixed_size_list<float32>`` of
one value per sample in ``_store.json``'s ``sample_ids`` order; NaN where nothing was measured), on the scale the
source was given on (``_store.json``'s ``scale``; normalisation happens later, after any hiding, as for the source
file). Row groups hold at most :data:`GROUP_CELLS` values, so neither writing nor reading holds more than one group
beside the matrix it fills. Any Parquet reader sees the partitions as a hive-partitioned dataset with a ``chrom``
column (null for the unannotated genes).

Reading a store gives the :class:`~geximpute.io.expression.Expression` reading the source gives, value for value and
in the same row order (tested), without parsing text: a chromosome's partition is read by row groups and written
to the rows it names (into a :class:`~geximpute.io.matrixfile.MatrixFile` where the caller keeps the matrix on
disk). ``_store.json`` lists each partition's size and SHA-256, both checked as each partition is read (so its
own fingerprint, what a run's manifest records for the store, :func:`geximpute.runtime.provenance.fingerprint`,
stands for the values read); a missing, truncated or changed partition, a damaged description, a row named twice
or never, or values of another width are refused, naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geximpute.errors import InputError
from geximpute.io.checks import sha256_file
from geximpute.io.matrixfile import MatrixFile

log = logging.getLogger(__name__)

STORE_FILE = "_store.json"
FORMAT = "geximpute-expression-store"
VERSION = 1
#: the partition value of genes the annotation lacks (what Parquet readers read as a null ``chrom``)
UNANNOTATED = "__HIVE_DEFAULT_PARTITION__"
#: values per row group at most (16 MiB of float32)
GROUP_CELLS = 1 << 22


def is_store(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding an expression store (its ``_store.json``)."""
    path = Path(path)
    return path.is_dir() and (path / STORE_FILE).is_file()


def store_schema(n_samples: int, names: bool) -> pa.Schema:
    """The schema of each partition's file."""
    fields = [pa.field("row", pa.int64(), nullable=False), pa.field("gene_id", pa.string(), nullable=False)]
    if names:
        fields.append(pa.field("gene_name", pa.string()))
    fields.append(pa.field("values", pa.list_(pa.float32(), n_samples), nullable=False))
    return pa.schema(fields)


def partition_order(chroms: np.ndarray, annotation_order: list[str]) -> list[str | None]:
    """The partitions' chromosomes in the annotation's order, then None (unannotated) where some gene has none."""
    present = {c for c in chroms if c is not None}
    order: list[str | None] = [c for c in dict.fromkeys(annotation_order) if c in present]
    if any(c is None for c in chroms):
        order.append(None)
    return order


def write_store(values: np.ndarray | MatrixFile, gene_ids: list[str], sample_ids: list[str],
                gene_names: list[str | None] | None, chroms: np.ndarray, annotation_order: list[str],
                folder: Path, *, scale: str, source: dict[str, Any], annotation: dict[str, Any] | None = None,
                progress=None) -> dict[str, Any]:
    """Write the store of a (genes x samples) matrix into the empty folder ``folder``; returns its ``_store.json``.

    Args:
        values: the matrix (rows of ``gene_ids``, columns of ``sample_ids``), read a row group at a time.
        chroms: (G,) each row's chromosome, None where the annotation lacks the gene.
        annotation_order: the annotation's chromosomes in its order (the partitions' order).
        scale: the values' scale (``inputs.scale``).
        source, annotation: what was read (fingerprints), recorded in ``_store.json``.
        progress: called with each partition written (chromosome, genes), if given.
    """
    n_genes, n_samples = len(gene_ids), len(sample_ids)
    schema = store_schema(n_samples, gene_names is not None)
    group = max(1, GROUP_CELLS // max(n_samples, 1))
    ids = np.asarray(gene_ids, dtype=object)
    names = None if gene_names is None else np.asarray(gene_names, dtype=object)
    partitions = []
    for chrom in partition_order(chroms, annotation_order):
        rows = np.flatnonzero(np.asarray([c is None for c in chroms]) if chrom is None else chroms == chrom)
        name = UNANNOTATED if chrom is None else urllib.parse.quote(chrom, safe="")
        relative = f"chrom={name}/part-0.parquet"
        path = folder / relative
        path.parent.mkdir(parents=True)
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            for lo in range(0, len(rows), group):
                take = rows[lo : lo + group]
                block = np.ascontiguousarray(values[take], dtype=np.float32)
                columns = {"row": pa.array(take, pa.int64()), "gene_id": pa.array(ids[take], pa.string())}
                if names is not None:
                    columns["gene_name"] = pa.array(names[take], pa.string())
                columns["values"] = pa.FixedSizeListArray.from_arrays(pa.array(block.ravel(), pa.float32()),
                                                                      n_samples)
                writer.write_table(pa.table(columns, schema=schema), row_group_size=len(take))
        partitions.append({"chrom": chrom, "path": relative, "genes": int(len(rows)),
                           "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        if progress is not None:
            progress(chrom, len(rows))
    meta = {
        "format": FORMAT, "version": VERSION, "scale": scale, "n_genes": n_genes, "n_samples": n_samples,
        "gene_names": gene_names is not None, "sample_ids": list(sample_ids), "source": source,
        "annotation": annotation, "partitions": partitions,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / STORE_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``_store.json`` of the store ``path``, checked.

    Raises:
        InputError: no ``_store.json``, not JSON, another format or version, or fields missing.
    """
    path = Path(path)
    meta_path = path / STORE_FILE
    if not path.is_dir():
        raise InputError(path, "not a folder; an expression store is the folder that `geximpute ingest` wrote",
                         expected="inputs.expression_format: auto (or the format of this file)")
    if not meta_path.is_file():
        raise InputError(path, f"is a folder: not a regular file, nor an expression store (no {STORE_FILE})",
                         expected="an expression file, or a folder that `geximpute ingest` wrote")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(meta_path, f"expression store description unreadable ({exc})",
                         expected="the JSON that `geximpute ingest` writes",
                         hint="ingest the expression file again") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(meta_path, "not an expression store description", expected=f'"format": "{FORMAT}"')
    if meta.get("version") != VERSION:
        raise InputError(meta_path, f"expression store version {meta.get('version')!r}, which this geximpute does "
                         "not read", expected=f"version {VERSION}", hint="ingest the expression file again")
    missing = [k for k in ("scale", "n_genes", "n_samples", "sample_ids", "partitions", "gene_names")
               if k not in meta]
    if missing:
        raise InputError(meta_path, f"expression store description lacks {', '.join(missing)}",
                         hint="ingest the expression file again")
    for key in ("n_genes", "n_samples"):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 0:
            raise InputError(meta_path, f"expression store description: {key} {meta[key]!r} is not a count",
                             expected="an integer >= 0", hint="ingest the expression file again")
    if not isinstance(meta["sample_ids"], list) or not all(isinstance(x, str) for x in meta["sample_ids"]):
        raise InputError(meta_path, "expression store description: sample_ids is not a list of names",
                         expected='"sample_ids": ["S1", "S2", ...]', hint="ingest the expression file again")
    if len(meta["sample_ids"]) != meta["n_samples"]:
        raise InputError(meta_path, f"{len(meta['sample_ids'])} sample ids for n_samples {meta['n_samples']}",
                         hint="ingest the expression file again")
    if not isinstance(meta["partitions"], list):
        raise InputError(meta_path, "expression store description: partitions is not a list",
                         hint="ingest the expression file again")
    for i, part in enumerate(meta["partitions"]):
        problem = _partition_entry_problem(part)
        if problem:
            raise InputError(meta_path, f"expression store description: {problem}", record=f"partition {i + 1}",
                             expected='{"chrom", "path" (inside the store), "genes", "bytes", "sha256"}',
                             hint="ingest the expression file again")
    return meta


def _partition_entry_problem(part: Any) -> str | None:
    """What is wrong with one entry of ``_store.json``'s ``partitions`` (None: nothing)."""
    if not isinstance(part, dict):
        return f"{part!r} is not an object"
    missing = [k for k in ("chrom", "path", "genes", "bytes", "sha256") if k not in part]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not (part["chrom"] is None or isinstance(part["chrom"], str)):
        return f"chrom {part['chrom']!r} is not a name"
    relative = part["path"]
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
        return f"path {relative!r} is not a file inside the store"
    for key in ("genes", "bytes"):
        if not isinstance(part[key], int) or isinstance(part[key], bool) or part[key] < 0:
            return f"{key} {part[key]!r} is not a count"
    digest = part["sha256"]
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        return f"sha256 {digest!r} is not a SHA-256 digest"
    return None


def _write_rows(values: np.ndarray | MatrixFile, rows: np.ndarray, block: np.ndarray) -> None:
    """``values[rows] = block``, a file's rows one run of consecutive rows at a time."""
    if not isinstance(values, MatrixFile):
        values[rows] = block
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run in np.split(np.arange(len(rows)), breaks):
        lo = int(rows[run[0]])
        values[lo : lo + len(run)] = block[run[0] : run[-1] + 1]


@dataclass
class StoreRead:
    """What :func:`read_store` read: gene ids and names in row order, sample ids, the values, measured count."""

    gene_ids: list[str]
    gene_names: list[str | None] | None
    sample_ids: list[str]
    values: np.ndarray | MatrixFile
    n_measured: int
    meta: dict[str, Any]
    version: str = ""  # the version folder read (the store's link resolved once, at the start)


def read_store(path: str | Path, scale: str, *, matrix: str | Path | None = None) -> StoreRead:
    """Read the store ``path`` (into the file ``matrix`` when given, else memory).

    Raises:
        InputError: the store's scale is not ``scale``; a partition missing, of another size or SHA-256 than
            listed, unreadable, or of another schema; a row out of range, named twice or by no partition; a value that
            its scale cannot have (infinite; negative TPM or counts).
    """
    # the version folder the store's link names now, read through to the end: an `ingest` that commits a new
    # version meanwhile (the old one is kept for keep_seconds) would otherwise switch the link between the
    # description and the partitions, and the run would read chromosomes of both without an error
    path = Path(os.path.realpath(path))
    meta = read_meta(path)
    meta_path = path / STORE_FILE
    if meta["scale"] != scale:
        raise InputError(meta_path, f"the store holds values on the {meta['scale']!r} scale; the config says "
                         f"inputs.scale: {scale}", expected=f"inputs.scale: {meta['scale']}",
                         hint="set inputs.scale to the store's scale, or ingest the source with the scale wanted")
    n_genes, n_samples = int(meta["n_genes"]), int(meta["n_samples"])
    sample_ids = [str(s) for s in meta["sample_ids"]]
    values = (MatrixFile.create(matrix, (n_genes, n_samples)) if matrix is not None
              else np.empty((n_genes, n_samples), np.float32))
    gene_ids: list[Any] = [None] * n_genes
    names: list[Any] | None = [None] * n_genes if meta["gene_names"] else None
    seen = np.zeros(n_genes, dtype=bool)
    schema = store_schema(n_samples, bool(meta["gene_names"]))
    n_measured = 0
    for part in meta["partitions"]:
        n_measured += _read_partition(path, part, values, gene_ids, names, seen, schema, sample_ids, scale)
        log.debug("%s: %d genes of chromosome %s", path / part["path"], part["genes"], part["chrom"])
    if not seen.all():
        raise InputError(meta_path, f"{int((~seen).sum())} of {n_genes} rows in no partition",
                         record=f"row {int(np.flatnonzero(~seen)[0])}", hint="ingest the expression file again")
    return StoreRead(gene_ids, names, sample_ids, values, n_measured, meta, str(path))


def _read_partition(path: Path, part: dict[str, Any], values: np.ndarray | MatrixFile, gene_ids: list[Any],
                    names: list[Any] | None, seen: np.ndarray, schema: pa.Schema, sample_ids: list[str],
                    scale: str) -> int:
    """Read one partition of :func:`read_store` into ``values`` (its rows' ids and names into ``gene_ids`` and
    ``names``, marked in ``seen``); returns its measured values' count."""
    file = path / part["path"]
    if not file.is_file():
        raise InputError(file, "expression store partition missing",
                         expected=f"the {part['genes']} genes of chromosome {part['chrom']} that {STORE_FILE} "
                         "lists", hint="ingest the expression file again")
    if file.stat().st_size != part["bytes"]:
        raise InputError(file, f"expression store partition of {file.stat().st_size} bytes; {STORE_FILE} "
                         f"lists {part['bytes']} (changed or truncated since it was written)",
                         hint="ingest the expression file again")
    # the content too, not only the size: a partition rewritten to the same size (genes swapped, values edited)
    # would otherwise be read under the description, by which the run's manifest fingerprints the store
    if sha256_file(file) != part["sha256"]:
        raise InputError(file, f"expression store partition changed since it was written: its SHA-256 is not the "
                         f"one {STORE_FILE} lists", hint="ingest the expression file again")
    try:
        with pq.ParquetFile(file) as parquet:  # closed however the reading ends
            return _read_groups(file, parquet, part, values, gene_ids, names, seen, schema, sample_ids, scale)
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(values, MatrixFile) and getattr(exc, "filename", None) == values.path:
            raise  # writing the run's matrix file failed (a full disk): the store is fine
        raise InputError(file, f"expression store partition unreadable ({exc})",
                         hint="ingest the expression file again") from exc


def _read_groups(file: Path, parquet: pq.ParquetFile, part: dict[str, Any], values: np.ndarray | MatrixFile,
                 gene_ids: list[Any], names: list[Any] | None, seen: np.ndarray, schema: pa.Schema,
                 sample_ids: list[str], scale: str) -> int:
    """The row groups of one open partition file (see :func:`_read_partition`)."""
    from geximpute.io.expression import check_values

    n_genes, n_samples = len(gene_ids), len(sample_ids)
    if not parquet.schema_arrow.equals(schema):
        raise InputError(file, f"expression store partition of schema {parquet.schema_arrow}",
                         expected=f"{schema} ({n_samples} samples)")
    if parquet.metadata.num_rows != part["genes"]:
        raise InputError(file, f"{parquet.metadata.num_rows} genes; {STORE_FILE} lists {part['genes']}")
    n_measured = 0
    for g in range(parquet.num_row_groups):
        table = parquet.read_row_group(g)
        rows = table["row"].to_numpy()
        ids = table["gene_id"].to_pylist()
        bad = np.flatnonzero((rows < 0) | (rows >= n_genes))
        if len(bad):
            raise InputError(file, f"row {int(rows[bad[0]])} out of range", record=f"gene {ids[bad[0]]}",
                             expected=f"rows 0..{n_genes - 1}")
        ordered = np.sort(rows)
        again = np.concatenate([rows[seen[rows]], ordered[1:][ordered[1:] == ordered[:-1]]])
        if len(again):
            first = int(np.flatnonzero(rows == again[0])[0])
            raise InputError(file, f"row {int(again[0])} named twice", record=f"gene {ids[first]}",
                             hint="ingest the expression file again")
        seen[rows] = True
        flat = table["values"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        block = flat.reshape(len(rows), n_samples)
        n_measured += check_values(file, block, ids, sample_ids, scale, None)
        _write_rows(values, rows, block)
        for r, gene in zip(rows.tolist(), ids, strict=True):
            gene_ids[r] = gene
        if names is not None:
            for r, name in zip(rows.tolist(), table["gene_name"].to_pylist(), strict=True):
                names[r] = name
    return n_measured


def fingerprint(path: str | Path, version: str | Path | None = None) -> dict[str, Any]:
    """A store's fingerprint: its ``_store.json``'s SHA-256 (which lists each partition's) and the bytes of every
    partition; of the version the link names now, or of ``version``, the one a run read (:attr:`StoreRead.version`:
    an `ingest` may have committed another since)."""
    # one version of the store throughout, as read_store reads it
    version = Path(version) if version is not None else Path(os.path.realpath(path))
    meta_path = version / STORE_FILE
    meta = read_meta(version)
    return {"path": str(path), "bytes": int(sum(p["bytes"] for p in meta["partitions"])),
            "sha256": sha256_file(meta_path), "store": True, "version": str(version)}

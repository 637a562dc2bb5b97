"""Expression: GCT 1.2, wide TSV/CSV/Parquet (genes x samples or genes x tissues), long TSV/CSV/Parquet, or a
QTLtools/FastQTL phenotype BED (``#chr start end gene [gid|length strand]`` then one column per person). Every layout
is read a block of lines or record batches at a time (docs/benchmarks.md "Reading the expression and the annotation
a block at a time").

Every layout is read into one in-memory form, :class:`Expression`: a genes x samples float32 matrix with NaN for
entries that were not measured, plus the gene and sample ids. Values are kept on the scale they were given on;
:func:`to_model_scale` turns them into the modelling scale (log1p of TPM or of normalised counts).
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geximpute import schema as S
from geximpute.config import ExpressionConfig
from geximpute.errors import InputError
from geximpute.io.checks import check_readable, format_name, open_text, strip_version
from geximpute.io.matrixfile import MatrixFile, rescale_columns, update_rows
from geximpute.io.tables import (
    NULL_VALUES,
    check_header,
    csv_batches,
    delimiter_for,
    is_parquet,
    read_table,
    require_columns,
)

log = logging.getLogger(__name__)

#: wide-table columns that describe genes rather than hold values
ANNOTATION_COLUMNS = {"description", "gene_name", "name", "symbol", "gene_symbol", "gene.name", "gene_type"}
GENE_ID_COLUMNS = ["gene_id", "Name", "gene", "geneid", "ensembl_gene_id", "id"]
#: the column of a DataFrame's unnamed index in a Parquet file pandas wrote
PANDAS_INDEX = "__index_level_0__"
#: annotation columns that carry gene symbols, in order of preference (a GCT's ``Description`` holds them)
NAME_COLUMNS = ["gene_name", "symbol", "gene_symbol", "gene.name", "description"]
#: gene x sample cells per pass of :func:`size_factors` at most: its temporaries (masks, logs, float64 ratios) are a
#: few times that many cells, not a few copies of the matrix
FACTOR_CELLS = 1 << 22


@dataclass
class Expression:
    """A genes x samples expression matrix.

    Attributes:
        path: the file read.
        gene_ids: gene ids without version suffix, one per row.
        sample_ids: sample (or tissue) ids, one per column.
        values: float32 array of shape (n_genes, n_samples); NaN where nothing was measured.
        scale: ``tpm``, ``counts``, ``log`` or ``normalised``, as configured.
        report: counts for ``inspect``.
        genes: for a phenotype BED, its rows' coordinates as a table of ``gene_id`` (as written), ``chrom``,
            ``start0``, ``end`` and ``strand`` (see :func:`geximpute.io.genes.phenotype_bed_genes`); None otherwise.
        gene_names: the gene symbol of each row (None where blank) when the file has a symbol column
            (:data:`NAME_COLUMNS`: a GCT's ``Description``, a ``gene_name`` column); None otherwise.
    """

    path: Path
    gene_ids: list[str]
    sample_ids: list[str]
    values: np.ndarray
    scale: str
    report: dict = field(default_factory=dict)
    genes: pa.Table | None = None
    gene_names: list[str | None] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    def to_long(self) -> pa.Table:
        """The measured entries as a long table (:data:`geximpute.schema.EXPRESSION_LONG`)."""
        gi, si = np.nonzero(~np.isnan(self.values))
        return pa.table(
            {
                S.GENE_ID: pa.array(np.asarray(self.gene_ids, dtype=object)[gi], pa.string()),
                S.SAMPLE_ID: pa.array(np.asarray(self.sample_ids, dtype=object)[si], pa.string()),
                S.VALUE: pa.array(self.values[gi, si].astype(np.float64)),
            },
            schema=S.EXPRESSION_LONG,
        )


def detect_format(path: Path) -> str:
    """``gct``, ``bed``, ``long`` or ``wide`` from the file name and, for text tables, the header."""
    name = format_name(path)
    if name.endswith(".gct"):
        return "gct"
    if name.endswith(".bed"):
        return "bed"
    if is_parquet(path):
        try:
            names = {n.lower() for n in pq.ParquetFile(path).schema_arrow.names}
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(path, f"expression table is not a readable Parquet file ({exc})") from exc
        # one row per gene and sample (a sample column), else one column per sample
        return "long" if names & {S.SAMPLE_ID, *LONG_COLUMNS[S.SAMPLE_ID]} else "wide"
    with open_text(path) as fh:
        header = fh.readline().strip().lower()
    sep = delimiter_for(path)
    columns = {c.strip().strip('"') for c in header.split(sep)}
    # the column names a long table is read by (its reader's aliases too: `sample`, `tpm`, `count`, `expression`)
    names = {k: {k, *(a.lower() for a in LONG_COLUMNS[k])} for k in (S.SAMPLE_ID, S.VALUE)}
    return "long" if columns & names[S.SAMPLE_ID] and columns & names[S.VALUE] else "wide"


def read_expression(path: str | Path, fmt: str = "auto", scale: str = "tpm", *, matrix: str | Path | None = None
                    ) -> Expression:
    """Read and validate an expression file.

    Args:
        path: GCT 1.2, wide TSV/CSV/Parquet, long TSV/CSV/Parquet (a Parquet file with a ``sample_id`` or
            ``sample`` column is long, else wide), phenotype BED (text plain, gzip or bgzip), or the folder of an
            expression store (:mod:`geximpute.io.store`, written by `geximpute ingest`).
        fmt: ``auto``, ``gct``, ``wide``, ``long``, ``bed`` or ``store`` (``auto``: a folder is a store).
        scale: ``tpm`` and ``counts`` must be non-negative; ``log`` and ``normalised`` may be negative.
        matrix: a file to keep the values in (:class:`~geximpute.io.matrixfile.MatrixFile`; ``Expression.values``
            is then that file): the wide layouts write each block of rows there as it is converted, so that the
            matrix is never held in memory; a long table (whose values arrive in any order) and a table read whole
            to name a bad record are read into memory first and then written there.

    Raises:
        InputError: missing/empty/truncated file, a bad GCT header, missing columns, non-numeric or negative
            values, duplicate gene ids or sample columns.
    """
    if fmt == "store" or (fmt == "auto" and Path(path).is_dir()):
        fmt, path = "store", Path(path)
        expr = _read_store(path, scale, matrix)
    else:
        path = check_readable(path, "expression file")
        try:
            fmt = detect_format(path) if fmt == "auto" else fmt
            if fmt == "gct":
                expr = _read_gct(path, scale, matrix)
            elif fmt == "long":
                expr = _read_long(path, scale)
            elif fmt == "bed":
                expr = _read_phenotype_bed(path, scale, matrix)
            elif is_parquet(path):
                expr = _read_wide_parquet(path, scale, matrix)
            else:
                expr, _ = _stream_wide(path, scale, "expression table", skip_rows=0, first_data_line=2,
                                       matrix=matrix)
        except UnicodeDecodeError as exc:
            raise InputError(path, f"is not UTF-8 text (byte {exc.start} is "
                             f"{exc.object[exc.start:exc.start + 1]!r})",
                             expected="a UTF-8 (or ASCII) text table, plain or gzip") from exc
    if expr.values.size == 0:
        raise InputError(path, f"expression {'store' if fmt == 'store' else 'table'} holds no values",
                         expected="at least one gene and one sample")
    if "n_measured" not in expr.report:  # read whole (a long table): its values are checked here
        expr.report["n_measured"] = check_values(path, expr.values, expr.gene_ids, expr.sample_ids, scale,
                                                 expr.report.get("first_data_line"))
    n_measured = expr.report.pop("n_measured")
    expr.report.update(
        format=fmt,
        n_genes=len(expr.gene_ids),
        n_samples=len(expr.sample_ids),
        n_measured=n_measured,
        measured_fraction=n_measured / expr.values.size,
    )
    if matrix is not None and not isinstance(expr.values, MatrixFile):  # read in memory: kept in the file now
        values, expr.values = expr.values, None
        expr.values = MatrixFile.from_array(matrix, values.astype(np.float32, copy=False))
    return expr


def _read_store(path: Path, scale: str, matrix: str | Path | None) -> Expression:
    """An expression store (:mod:`geximpute.io.store`, `geximpute ingest`'s output) as the source read it (its
    values checked as they are read: the report's ``n_measured`` is set)."""
    from geximpute.io.store import read_store

    if not path.exists():
        check_readable(path, "expression store")  # says plainly that it is not there
    read = read_store(path, scale, matrix=matrix)
    source = read.meta.get("source") or {}
    _warn_if_stale(path, source)
    report = {"n_measured": read.n_measured,
              "store": {"partitions": len(read.meta["partitions"]), "source": source.get("path"),
                        "source_format": source.get("format"), "created": read.meta.get("created"),
                        "version": read.version}}
    return Expression(path, read.gene_ids, read.sample_ids, read.values, scale, report, gene_names=read.gene_names)


def _warn_if_stale(store: Path, source: dict) -> None:
    """Log a warning where the file a store was ingested from is still there and has changed since (its size or
    modification time; the store keeps serving what was ingested)."""
    try:
        now = Path(source["path"]).stat()
    except (KeyError, TypeError, OSError):
        return  # moved or removed since: the store is the data now
    if now.st_size != source.get("bytes") or ("mtime_ns" in source and now.st_mtime_ns != source["mtime_ns"]):
        log.warning("%s: its source %s changed since it was ingested (%s); this run reads the store as ingested: "
                    "run `geximpute ingest` again to take the new values", store, source["path"],
                    source.get("sha256", "")[:12])


def check_values(path: Path, values: np.ndarray, gene_ids: list[str], sample_ids: list[str], scale: str,
                 first_line: int | None) -> int:
    """Refuse an infinite value, or a negative one on a scale that has none; return how many are measured (not NaN).

    Args:
        values: (rows, samples) of the file, ``gene_ids`` their rows' ids and ``sample_ids`` their columns'.
        first_line: the file's line of the first row (None: rows are not lines, as in a long table).

    Raises:
        InputError: naming the gene, the sample and the line. An empty cell, NA or NaN is an unmeasured entry
            (imputed); an infinite value is an error.
    """
    def where(g: int, s: int) -> str:
        return (f"gene {gene_ids[g]}, sample {sample_ids[s]}"
                + (f" (line {g + first_line})" if first_line is not None else ""))

    infinite = np.isinf(values)
    if infinite.any():
        g, s = (int(x[0]) for x in np.nonzero(infinite))
        # values are kept as float32: one beyond its range (about 3.4e38, such as 1e39) is infinite there too
        raise InputError(path, f"infinite expression value {values[g, s]:g} (or one beyond float32's range, "
                         "about 3.4e38)", record=where(g, s),
                         expected="a finite number, or an empty cell / NA for an unmeasured value")
    del infinite
    if scale not in ("log", "normalised"):
        neg = values < 0
        if neg.any():
            g, s = (int(x[0]) for x in np.nonzero(neg))
            raise InputError(
                path,
                f"negative expression value {values[g, s]:g} for scale {scale!r}",
                record=where(g, s),
                expected="values >= 0 (set inputs.scale: log for log-scale values, or normalised for values an "
                "eQTL pipeline has normalised)",
            )
    return int(values.size - np.count_nonzero(np.isnan(values)))


def _read_gct(path: Path, scale: str, matrix: str | Path | None = None) -> Expression:
    with open_text(path) as fh:
        version = fh.readline().strip()
        dims = fh.readline().strip().split("\t")
    if version != "#1.2":
        raise InputError(path, f"first line is {version[:40]!r}", record="line 1", expected="'#1.2' (GCT 1.2)")
    # The dimension line is not trusted (a cut file keeps the uncut file's counts); it is only compared.
    try:
        declared = (int(dims[0]), int(dims[1]))
    except (ValueError, IndexError) as exc:
        raise InputError(
            path,
            f"dimension line is {' '.join(dims)[:40]!r}",
            record="line 2",
            expected="'<rows>\\t<columns>'",
        ) from exc
    expr, _ = _stream_wide(path, scale, "GCT expression file", skip_rows=2, first_data_line=4, delimiter="\t",
                           first_column="Name", matrix=matrix)
    expr.report["gct_declared_shape"] = declared
    expr.report["gct_dimension_line_matches"] = declared == expr.values.shape
    return expr


#: the coordinate columns of a phenotype BED: QTLtools writes six (the fifth is a group id, or a length), FastQTL four
BED_COORDINATES = ("#chr", "start", "end")


def _read_phenotype_bed(path: Path, scale: str, matrix: str | Path | None = None) -> Expression:
    """A QTLtools (``#chr start end pid gid strand``) or FastQTL (``#Chr start end ID``) phenotype BED."""
    expr, coords = _stream_wide(path, scale, "phenotype BED", skip_rows=0, first_data_line=2, delimiter="\t",
                                quoting=False, layout=_bed_layout, whole=_read_phenotype_bed_whole, matrix=matrix)
    if coords is not None:  # read a block at a time: the kept columns are the coordinates
        expr.genes = _bed_genes(coords)
    return expr


def _bed_columns(path: Path, names: list[str]) -> int:
    """The number of coordinate columns of a phenotype BED header (6 with a strand, else 4)."""
    lower = [n.lower() for n in names]
    if len(names) < 5 or tuple(lower[:3]) != BED_COORDINATES:
        raise InputError(path, f"header starts with {names[:6]}", record="line 1",
                         expected="a phenotype BED header '#chr start end <id> [<gid or length> strand]' followed "
                         "by one column per person (QTLtools/FastQTL layout)")
    return 6 if len(names) > 6 and lower[5] == "strand" else 4


def _bed_layout(path: Path, schema: pa.Schema) -> _Layout:
    names = schema.names
    n_coord = _bed_columns(path, names)
    types = {name: pa.string() for name in names[:n_coord]}
    types.update({names[1]: pa.int64(), names[2]: pa.int64()})
    types.update({name: pa.float64() for name in names[n_coord:]})
    return _Layout(id_col=3, value_cols=list(range(n_coord, len(names))), kept=list(range(n_coord)), types=types)


def _bed_genes(coords: pa.Table) -> pa.Table:
    strand = coords.column(5).cast(pa.string()) if coords.num_columns == 6 else pa.nulls(coords.num_rows, pa.string())
    return pa.table({
        "gene_id": coords.column(3).cast(pa.string()),
        "chrom": coords.column(0).cast(pa.string()),
        "start0": coords.column(1),
        "end": coords.column(2),
        "strand": strand,
    })


def _read_phenotype_bed_whole(path: Path, scale: str) -> Expression:
    """The BED read whole (the fallback that names the record of a value that does not convert)."""
    table = read_table(path, "phenotype BED", delimiter="\t", quoting=False,
                       column_types={"#chr": pa.string(), "#Chr": pa.string()})
    names = table.column_names
    n_coord = _bed_columns(path, names)
    for i in (1, 2):  # start and end: whole positions (a guessed type let 99.5 or 'abc' through to a traceback)
        try:
            table = table.set_column(i, names[i], table[names[i]].cast(pa.int64()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            values = table[names[i]].cast(pa.string()).to_pylist()
            row = next((r for r, v in enumerate(values) if v is None or not v.strip().lstrip("-").isdigit()), 0)
            raise InputError(path, f"{names[i]} {values[row]!r} is not a position", record=f"line {row + 2} (gene "
                             f"{table[names[3]][row].as_py()})", expected="a whole number (BED: 0-based start, "
                             "end)") from None
    values = table.select([names[3], *names[n_coord:]])
    expr = _read_wide(path, scale, values.rename_columns(["gene_id", *names[n_coord:]]), first_data_line=2)
    expr.genes = _bed_genes(table.select(names[:n_coord]))
    return expr


@dataclass
class _Layout:
    """Which columns of a wide table (by position) are what, and the types they are read with."""

    id_col: int
    value_cols: list[int]
    #: columns returned whole beside the values (a symbol column, a BED's coordinates)
    kept: list[int]
    types: dict[str, pa.DataType]
    #: the column of gene symbols, when it is kept
    name_col: int | None = None


def _wide_layout(path: Path, schema: pa.Schema, first_data_line: int, first_column: str | None = None) -> _Layout:
    """A GCT's or wide table's columns: the gene id (the first of :data:`GENE_ID_COLUMNS`, else the first column),
    text columns named as annotations (:data:`ANNOTATION_COLUMNS`), the rest values, one per sample."""
    names = schema.names
    # GenePattern and GSEA write the GCT's first column as `NAME`
    if first_column is not None and (not names or names[0].lower() != first_column.lower()):
        raise InputError(path, f"header starts with {names[:2]}", record=f"line {first_data_line - 1}",
                         expected=f"{first_column!r}, 'Description', then one column per sample")
    lower = {n.lower(): n for n in names}
    # a wide Parquet written by pandas keeps an unnamed index (the gene ids) as its last column
    id_col = names.index(next((lower[c.lower()] for c in (*GENE_ID_COLUMNS, PANDAS_INDEX) if c.lower() in lower),
                              names[0]))

    def annotation(i: int) -> bool:
        # by name, whatever its values look like (a GCT's Description of Entrez ids reads as numbers), and a GCT's
        # second column by position (the format's Description, however it is headed): never a sample's values
        return names[i].lower() in ANNOTATION_COLUMNS or (first_column is not None and i == 1)

    value_cols = [i for i in range(len(names)) if i != id_col and not annotation(i)]
    if not value_cols:
        raise InputError(path, "no value columns", record="the header", expected="one column per sample or tissue")
    for i in value_cols:
        if names[i].strip() == "":
            raise InputError(path, f"column {i + 1} of the header has no name (a trailing tab or separator, or a "
                             "table written with its row index?)", record=f"the header, line {first_data_line - 1}",
                             expected="a sample or tissue name over every value column",
                             hint="pandas writes its index as an unnamed first column: write with index=False")
        if re.fullmatch(r"Unnamed: \d+", names[i]):
            raise InputError(path, f"column {i + 1} is named {names[i]!r}: pandas' name for a column without one "
                             "(a row index written and read back)", record=f"the header, line {first_data_line - 1}",
                             expected="a sample or tissue name over every value column",
                             hint="write the table with index=False, or drop that column")
    name_col = next((names.index(lower[c]) for c in NAME_COLUMNS
                     if c in lower and names.index(lower[c]) != id_col and annotation(names.index(lower[c]))), None)
    types = {names[i]: pa.string() for i in range(len(names)) if i == id_col or annotation(i)}
    types.update({names[i]: pa.float64() for i in value_cols})
    return _Layout(id_col, value_cols, [] if name_col is None else [name_col], types, name_col)


def _stream_wide(path: Path, scale: str, what: str, *, skip_rows: int, first_data_line: int,
                 delimiter: str | None = None, quoting: bool = True, first_column: str | None = None,
                 layout: Callable[[Path, pa.Schema], _Layout] | None = None,
                 whole: Callable[[Path, str], Expression] | None = None, matrix: str | Path | None = None
                 ) -> tuple[Expression, pa.Table | None]:
    """A genes x samples text table read a block at a time into one float32 matrix, each block's values checked
    (:func:`check_values`) as it is read: the reader's peak is about the matrix itself, where reading the table
    whole held Arrow's float64 table and the matrix at once (docs/benchmarks.md "Reading the expression and the
    annotation a block at a time"). The matrix is allocated once for the file's line count; pages are touched as
    rows are filled.

    Args:
        skip_rows: lines before the header; ``first_data_line``: the file's line of the first row (for messages).
        layout: which columns are what (default :func:`_wide_layout`).
        whole: how to read the file whole (default: :func:`read_table` and :func:`_read_wide`), used only when a
            block does not convert, to name the record.
        matrix: the file the rows are written to (:class:`~geximpute.io.matrixfile.MatrixFile`); None: memory.

    Returns:
        the expression, and the layout's kept columns (None when the file was read whole).
    """
    if layout is None:
        def layout(path: Path, schema: pa.Schema) -> _Layout:
            return _wide_layout(path, schema, first_data_line, first_column)
    found: list[_Layout] = []

    def types(schema: pa.Schema) -> dict[str, pa.DataType]:
        found.append(layout(path, schema))
        return found[0].types

    schema, lines, batches = csv_batches(path, what, types, skip_rows=skip_rows, delimiter=delimiter, quoting=quoting)
    try:
        # the matrix for every line below the header: rows at most (Arrow skips blank lines)
        return _fill_wide(path, scale, found[0], schema, batches, lines - skip_rows - 1, first_data_line, matrix)
    except pa.ArrowInvalid:
        # a row that does not parse or a value that does not convert: read whole, which names the record
        return (whole or _whole_wide(what, skip_rows, delimiter, first_data_line, first_column))(path, scale), None


def _fill_wide(path: Path, scale: str, lay: _Layout, schema: pa.Schema, batches: Iterable[pa.RecordBatch],
               rows_hint: int, first_data_line: int | None, matrix: str | Path | None = None
               ) -> tuple[Expression, pa.Table]:
    """The record batches of a wide table into one float32 matrix allocated for ``rows_hint`` rows (untouched pages
    cost nothing; grown if there are more), each batch's values checked and counted as they are copied;
    ``first_data_line``: the file's line of the first row, for messages (None: rows are not lines). With
    ``matrix`` the matrix is that file (:class:`~geximpute.io.matrixfile.MatrixFile`): each batch is converted
    and checked in memory and written there."""
    names = schema.names
    sample_ids = [names[i] for i in lay.value_cols]
    if matrix is not None:
        values = MatrixFile.create(matrix, (max(rows_hint, 0), len(sample_ids)))
    else:
        values = np.empty((max(rows_hint, 0), len(sample_ids)), np.float32)
    gene_ids: list[str] = []
    kept: list[pa.RecordBatch] = []
    row = measured = 0
    for batch in batches:
        n = batch.num_rows
        if row + n > len(values):  # more rows than the hint: grow
            if isinstance(values, MatrixFile):
                values.resize((max(2 * len(values), row + n), len(sample_ids)))
            else:
                grown = np.empty((max(2 * len(values), row + n), len(sample_ids)), np.float32)
                grown[:row] = values[:row]
                values = grown
        raw = batch.column(lay.id_col).cast(pa.string()).to_pylist()
        if None in raw:
            where = row + raw.index(None)
            raise InputError(path, "empty gene id", expected="a gene id", record=f"line {where + first_data_line}"
                             if first_data_line is not None else f"row {where + 1}")
        ids = [strip_version(g) for g in raw]
        block = values[row : row + n] if not isinstance(values, MatrixFile) else np.empty((n, len(sample_ids)),
                                                                                            np.float32)
        # one conversion of the batch's value columns (row-major, null as NaN), cast to float32 as it is copied
        numbers = pa.RecordBatch.from_arrays([batch.column(c).cast(pa.float64()) for c in lay.value_cols],
                                             names=sample_ids)
        block[:] = numbers.to_tensor(null_to_nan=True, row_major=True).to_numpy()
        measured += check_values(path, block, ids, sample_ids, scale,
                                 None if first_data_line is None else row + first_data_line)
        if isinstance(values, MatrixFile):
            values[row : row + n] = block
        gene_ids.extend(ids)
        if lay.kept:
            kept.append(batch.select(lay.kept))
        row += n
    _check_gene_ids(path, gene_ids, first_data_line)
    kept_table = (pa.Table.from_batches(kept) if kept else
                  pa.schema([(names[i], lay.types[names[i]]) for i in lay.kept]).empty_table())
    gene_names = None
    if lay.name_col is not None:
        gene_names = [n.strip() or None if n is not None else None
                      for n in kept_table.column(0).cast(pa.string()).to_pylist()]
    report: dict = {"n_measured": measured}
    if first_data_line is not None:
        report["first_data_line"] = first_data_line
    block = grown = None  # views of the matrix, released: it is returned as itself (shrunk), not a view of it
    if row < len(values):
        try:
            values.resize((row, len(sample_ids)))  # in place: a caller can take the matrix over and resize it again
        except ValueError:  # referenced elsewhere (not expected): a view of its rows
            values = values[:row]
    expr = Expression(path=path, gene_ids=gene_ids, sample_ids=sample_ids, values=values, scale=scale,
                      report=report, gene_names=gene_names)
    return expr, kept_table


def _read_wide_parquet(path: Path, scale: str, matrix: str | Path | None = None) -> Expression:
    """A wide Parquet table (a gene id column, text annotation columns, one numeric column per sample), read a
    row group's batches at a time into the matrix."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(path, f"expression table is not a readable Parquet file ({exc})") from exc
    schema = parquet.schema_arrow
    check_header(path, "expression table", schema.names, None)  # a sample named twice, as the text reader refuses it
    lay = _wide_layout(path, schema, 2)
    for c in lay.value_cols:
        kind = schema.field(c).type
        if not (_numeric(kind) or pa.types.is_null(kind)):
            raise InputError(path, f"column {schema.names[c]!r} holds {kind} values", record="the schema",
                             expected="a numeric column per sample (text columns only for the gene id and "
                             f"annotations named {', '.join(sorted(ANNOTATION_COLUMNS))})")
    batches = _ParquetBatches(path, None)
    expr, _ = _fill_wide(path, scale, lay, schema, batches, parquet.metadata.num_rows, None, matrix)
    return expr


def _whole_wide(what: str, skip_rows: int, delimiter: str | None, first_data_line: int,
                first_column: str | None = None) -> Callable[[Path, str], Expression]:
    def read(path: Path, scale: str) -> Expression:
        return _read_wide(path, scale, read_table(path, what, skip_rows=skip_rows, delimiter=delimiter),
                          first_data_line, first_column)
    return read


def _read_wide(path: Path, scale: str, table: pa.Table, first_data_line: int,
               first_column: str | None = None) -> Expression:
    """A wide table read whole (the fallback of :func:`_stream_wide` that names the record of a value that does
    not convert), its columns classified as a block-at-a-time read classifies them (:func:`_wide_layout`, a GCT's
    second column its Description whatever its heading: ``first_column``)."""
    lay = _wide_layout(path, table.schema, first_data_line, first_column)
    names = table.column_names
    values = np.empty((table.num_rows, len(lay.value_cols)), np.float32)
    for j, c in enumerate(lay.value_cols):
        col = table.column(c)
        if not (_numeric(col.type) or pa.types.is_null(col.type)):
            _raise_non_numeric(path, table, names[lay.id_col], names[c], first_data_line)
        values[:, j] = col.cast(pa.float32()).to_numpy(zero_copy_only=False)
    gene_names = None
    if lay.name_col is not None:
        gene_names = [n.strip() or None if n is not None else None
                      for n in table.column(lay.name_col).cast(pa.string()).to_pylist()]
    return Expression(
        path=path,
        gene_ids=_gene_ids(path, table.column(lay.id_col), first_data_line),
        sample_ids=[names[c] for c in lay.value_cols],
        values=values,
        scale=scale,
        report={"first_data_line": first_data_line},
        gene_names=gene_names,
    )


def _raise_non_numeric(path: Path, table: pa.Table, id_col: str, column: str, first_data_line: int) -> None:
    raw = table[column].cast(pa.string()).to_pandas()
    parsed = pd.to_numeric(raw, errors="coerce")
    bad = np.flatnonzero(parsed.isna().to_numpy() & raw.notna().to_numpy())
    i = int(bad[0]) if len(bad) else 0
    raise InputError(
        path,
        f"non-numeric expression value {raw.iloc[i]!r} in column {column!r}",
        record=f"line {i + first_data_line} (gene {table[id_col][i].as_py()})",
        expected="a number, or an empty cell / NA for a missing value",
    )


def _gene_ids(path: Path, column: pa.ChunkedArray, first_data_line: int) -> list[str]:
    raw = column.cast(pa.string()).to_pylist()
    if None in raw:
        i = raw.index(None)
        raise InputError(path, "empty gene id", record=f"line {i + first_data_line}", expected="a gene id")
    ids = [strip_version(g) for g in raw]
    _check_gene_ids(path, ids, first_data_line)
    return ids


def _check_gene_ids(path: Path, ids: list[str], first_data_line: int | None) -> None:
    """Refuse a gene id on two rows (version suffixes already stripped); ``first_data_line``: the file's line of
    the first row (None: rows are not lines, as in a Parquet table: they are named by row)."""
    arr = np.asarray(ids, dtype=object)
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        first, unit = (first_data_line, "lines") if first_data_line is not None else (1, "rows")
        lines = ", ".join(str(i + first) for i in np.flatnonzero(arr == dup)[:3])
        raise InputError(
            path,
            f"{int((counts > 1).sum())} duplicate gene id(s), e.g. {dup!r}",
            record=f"{unit} {lines}",
            expected="one row per gene (version suffixes are ignored when comparing)",
        )


#: the long table's columns and the other names each is found by
LONG_COLUMNS = {S.GENE_ID: ["gene", "Name"], S.SAMPLE_ID: ["sample"], S.VALUE: ["tpm", "count", "expression"]}
#: rows of a long Parquet table read at a time, and lines of a long text table
LONG_BATCH_ROWS = 1 << 20
LONG_BLOCK_LINES = 1 << 16


def _read_long(path: Path, scale: str) -> Expression:
    """A long table (one row per gene and sample; TSV/CSV or Parquet) read in two passes of record batches: the
    gene and sample ids, then the values into one float32 matrix. Neither the table nor a string per row is ever
    held; a value that does not convert, an empty id or a cell given twice sends the reader to the whole-table path
    (:func:`_read_long_whole`), which names the row."""
    what = "expression table (long)"
    if is_parquet(path):
        try:
            schema = pq.ParquetFile(path).schema_arrow
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(path, f"{what} is not a readable Parquet file ({exc})") from exc
        names = _long_names(path, schema)
        if not _numeric(schema.field(names[S.VALUE]).type):
            return _read_long_whole(path, scale)
        batches: Iterable[pa.RecordBatch] = _ParquetBatches(path, [names[c] for c in LONG_COLUMNS])
    else:
        found: dict[str, str] = {}

        def types(schema: pa.Schema) -> dict[str, pa.DataType]:
            found.update(_long_names(path, schema))
            # the columns it does not read as text: one empty in the first block and filled later (a note) no
            # longer fails a later block's conversion and sends a valid table to the whole-table read
            return {**dict.fromkeys(schema.names, pa.string()),
                    found[S.GENE_ID]: pa.string(), found[S.SAMPLE_ID]: pa.string(), found[S.VALUE]: pa.float64()}

        _, _, batches = csv_batches(path, what, types, block_rows=LONG_BLOCK_LINES)
        names = found
    gene, sample, value = (names[c] for c in LONG_COLUMNS)
    try:
        gene_set: set[str] = set()
        sample_set: set[str] = set()
        for batch in batches:  # the ids
            for column, ids, clean in ((gene, gene_set, strip_version), (sample, sample_set, str)):
                col = batch.column(column).cast(pa.string())
                if col.null_count:
                    return _read_long_whole(path, scale)
                ids.update(map(clean, pc.unique(col).to_pylist()))
        gene_ids, sample_ids = sorted(gene_set), sorted(sample_set)
        row_of = {g: i for i, g in enumerate(gene_ids)}
        column_of = {s: i for i, s in enumerate(sample_ids)}
        values = np.full((len(gene_ids), len(sample_ids)), np.nan, dtype=np.float32)
        seen = np.zeros(values.shape, bool)
        for batch in batches:  # the values
            gi = _positions(batch.column(gene), lambda g: row_of[strip_version(g)])
            si = _positions(batch.column(sample), column_of.__getitem__)
            key = gi * len(sample_ids) + si
            if seen[gi, si].any() or len(np.unique(key)) < len(key):  # a cell given twice
                return _read_long_whole(path, scale)
            seen[gi, si] = True
            values[gi, si] = batch.column(value).cast(pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        return _read_long_whole(path, scale)
    return Expression(path=path, gene_ids=gene_ids, sample_ids=sample_ids, values=values, scale=scale)


class _ParquetBatches:
    """A Parquet file's record batches of ``columns`` (None: all), read afresh each time they are iterated over."""

    def __init__(self, path: Path, columns: list[str] | None) -> None:
        self.path, self.columns = path, columns

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        yield from pq.ParquetFile(self.path).iter_batches(batch_size=LONG_BATCH_ROWS, columns=self.columns)


def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _long_names(path: Path, schema: pa.Schema) -> dict[str, str]:
    """The long table's column of each of :data:`LONG_COLUMNS` (the first name found), or the error that lists
    the names accepted."""
    renamed = require_columns(schema.empty_table(), path, "expression table (long)", LONG_COLUMNS)
    return {new: old for old, new in zip(schema.names, renamed.column_names, strict=True) if new in LONG_COLUMNS}


def _positions(column: pa.Array | pa.ChunkedArray, index: Callable[[str], int]) -> np.ndarray:
    """(N,) int64: ``index`` of each row's string, computed once per distinct string of the batch."""
    encoded = column.cast(pa.string()).dictionary_encode()
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    lookup = np.array([index(v) for v in encoded.dictionary.to_pylist()], np.int64)
    return lookup[encoded.indices.to_numpy(zero_copy_only=False)]


def _read_long_whole(path: Path, scale: str) -> Expression:
    """The long table read whole (the fallback that names the row of an empty id, a non-numeric value or a cell
    given twice)."""
    table = read_table(path, "expression table (long)",
                       text_columns={S.GENE_ID: LONG_COLUMNS[S.GENE_ID], S.SAMPLE_ID: LONG_COLUMNS[S.SAMPLE_ID]})
    table = require_columns(table, path, "expression table (long)", LONG_COLUMNS)
    value = table[S.VALUE]
    if not _numeric(value.type):
        if is_parquet(path):
            # numbers stored as text (a Parquet file has no line to name, and the text reader would read them): read
            # as numbers, with the text tables' missing-value spellings, or refused at the schema
            text = value.cast(pa.string())
            missing = pc.or_(pc.is_null(text), pc.is_in(pc.utf8_trim_whitespace(text), pa.array(NULL_VALUES)))
            try:
                value = pc.if_else(missing, None, text).cast(pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise InputError(path, f"column {S.VALUE!r} holds {table[S.VALUE].type} values that are not all "
                                 f"numbers ({exc})", record="the schema",
                                 expected="a numeric value column (or text that reads as numbers)") from exc
        else:
            _raise_non_numeric(path, table, S.GENE_ID, S.VALUE, 2)
    gene_raw = table[S.GENE_ID].cast(pa.string())
    sample = table[S.SAMPLE_ID].cast(pa.string())
    for name, col in ((S.GENE_ID, gene_raw), (S.SAMPLE_ID, sample)):
        if col.null_count:
            i = pc.index(pc.is_null(col), True).as_py()
            raise InputError(path, f"empty {name}", record=f"row {i + 1}", expected=f"a {name} on every row")
    genes = np.asarray([strip_version(g) for g in gene_raw.to_pylist()], dtype=object)
    samples = np.asarray(sample.to_pylist(), dtype=object)
    gene_ids, gi = np.unique(genes, return_inverse=True)
    sample_ids, si = np.unique(samples, return_inverse=True)
    key = gi.astype(np.int64) * len(sample_ids) + si
    uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
    if (counts > 1).any():
        rows = np.flatnonzero(key == uniq[counts > 1][0])[:2]
        raise InputError(
            path,
            f"gene {genes[rows[0]]} in sample {samples[rows[0]]} appears more than once",
            record=f"rows {', '.join(str(r + 1) for r in rows)}",
            expected="one value per (gene_id, sample_id)",
        )
    values = np.full((len(gene_ids), len(sample_ids)), np.nan, dtype=np.float32)
    values[gi, si] = value.cast(pa.float32()).to_numpy(zero_copy_only=False)
    return Expression(path=path, gene_ids=list(gene_ids), sample_ids=list(sample_ids), values=values, scale=scale)


def size_factors(counts: np.ndarray, method: str, visible: np.ndarray | None = None) -> np.ndarray:
    """Per-sample scaling of raw counts (genes x samples, NaN allowed) to counts per million.

    ``cpm`` divides by each sample's total over the genes present; ``median_ratio`` uses DESeq2's
    median-of-ratios to a pseudo-reference (geometric mean per gene over samples where it is > 0), which does not
    let a few highly expressed genes dominate when the file holds few genes.

    Args:
        counts: (G, S) raw counts.
        method: ``cpm`` or ``median_ratio``.
        visible: (G, S) bool, the entries the factors may be computed from (the values left visible after hiding
            the evaluation's entries); None: every measured entry. A hidden value then never moves a visible one:
            totals, the pseudo-reference and the per-million rescaling use visible entries only. A sample with
            no visible entry at all (a hidden sample) is scaled by its own entries: only its hidden truth, used for
            scoring, is on that scale.

    Returns:
        an array of shape (n_samples,) such that ``counts / factor`` is on a per-million scale.
    """
    n_genes, n_samples = counts.shape
    step = max(1, FACTOR_CELLS // max(n_genes, 1))  # samples per pass: each sample's factor is its own column's

    def usable_of(lo: int, hi: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """(values, visible and measured) of rows (axis 0) or columns (axis 1) lo:hi."""
        part = counts[lo:hi] if axis == 0 else counts[:, lo:hi]
        seen = ~np.isnan(part)
        if visible is not None:
            seen &= visible[lo:hi] if axis == 0 else visible[:, lo:hi]
        return part, seen

    with np.errstate(divide="ignore", invalid="ignore"):
        ref = None
        if method != "cpm":
            # the pseudo-reference comes from visible entries only, a pass of rows at a time
            ref = np.empty((n_genes, 1))
            rows = max(1, FACTOR_CELLS // max(n_samples, 1))
            for lo in range(0, n_genes, rows):
                part, seen = usable_of(lo, lo + rows, 0)
                usable = seen & (part > 0)
                n_ref = usable.sum(axis=1, keepdims=True)
                log_ref = np.where(usable, np.log(np.where(usable, part, 1.0)), 0.0).sum(axis=1, keepdims=True)
                # a gene hidden everywhere: no reference
                ref[lo : lo + rows] = np.where(n_ref > 0, log_ref / np.maximum(n_ref, 1), np.nan)
        totals, medians, visibles = [], [], []  # per pass, in the dtypes the whole matrix's would have
        for lo in range(0, n_samples, step):
            part, seen = usable_of(lo, lo + step, 1)
            visibles.append(has := seen.any(axis=0))
            # what each sample's factor is computed from: its visible entries, or all its own entries when none is
            basis = np.where(has[None, :], np.where(seen, part, np.nan), part)
            totals.append(np.nansum(basis, axis=0))
            if ref is not None:
                logc = np.where(basis > 0, np.log(basis), np.nan)
                medians.append(np.nanmedian(logc - ref, axis=0))
        total, has_visible = np.concatenate(totals), np.concatenate(visibles)
        if method == "cpm":
            return np.where(total > 0, total / 1e6, 1.0)
        factor = np.exp(np.nan_to_num(np.concatenate(medians), nan=0.0))
        # scale so that the median sample has the same per-million scale as cpm (median over samples with
        # visible entries, from their visible totals)
        per_million = np.where((total > 0) & has_visible, total / 1e6, np.nan) / factor
        norm = np.nanmedian(per_million) if np.isfinite(per_million).any() else np.nan
        return factor * (norm if np.isfinite(norm) else 1.0)


@dataclass(frozen=True)
class CountScaling:
    """How counts were put on the modelling scale: ``value = log1p(count / factors[sample])`` (``log1p``) or
    ``count / factors[sample]``, the factors by ``method`` (:func:`size_factors`) from the visible entries."""

    method: str
    factors: np.ndarray
    log1p: bool

    def counts(self, values: np.ndarray, columns: slice | np.ndarray = slice(None)) -> np.ndarray:
        """float64 counts of model-scale ``values`` (rows x the samples ``columns``; NaN kept)."""
        counts = np.expm1(values, dtype=np.float64) if self.log1p else values.astype(np.float64)
        return counts * self.factors[columns][None, :]

    def rescale_at(self, values: np.ndarray, ratio: np.ndarray) -> np.ndarray:
        """``values`` (any shape) divided on the count scale by ``ratio`` (the same shape, or broadcast): a copy."""
        values = np.asarray(values, np.float64)
        return np.log1p(np.expm1(values) / ratio) if self.log1p else values / ratio

    def rescale(self, values: np.ndarray, ratio: np.ndarray) -> None:
        """``values`` (rows x every sample) divided on the count scale by ``ratio`` per sample, in place: the values
        a divisor ``factors * ratio`` gives. A pass of rows at a time: no full-size temporary."""
        rows = max(1, FACTOR_CELLS // max(values.shape[1], 1))
        for lo in range(0, values.shape[0], rows):
            rescale_columns(values[lo : lo + rows], ratio, self.log1p)


def fold_factors(scaling: CountScaling, values: np.ndarray | MatrixFile, fold: np.ndarray) -> np.ndarray:
    """(S,) the factors ``scaling`` would have given had the entries ``fold`` ((G, S) bool) been hidden too: counts
    normalised from the visible entries outside a training fold, so that a fold's own counts move no value its
    records read (a training fold's hidden values reach nothing, as the evaluation's hidden values do not).

    The counts are read back from the model-scale ``values`` (the problem's rows). ``cpm``: each sample's total
    less its fold entries' counts (the total counted every row of the input, annotated or not: exactly the total of
    the input without the fold). ``median_ratio``: the factor times the change the fold makes to the median of
    ratios over the problem's rows (computed with and without it: a fold that hides nothing changes nothing, and
    where every input row is a problem row, as the input's genes are annotated, exactly the factors of the input
    without the fold). A sample with no visible entry outside the fold is scaled by its own entries, as a sample
    the evaluation hides whole (CPM: it keeps its factor; a total whose counts outside the fold are all zero is none,
    factor 1, as :func:`size_factors` has it). Remembered per (scaling, values, the fold's content) while both
    live: a fold folded again (prepare's records, then its out-of-fold baselines) is not computed twice.
    """
    key = _fold_key(fold)
    factors = _recall(_FOLDS, (scaling, values), key)
    if factors is None:
        factors = _fold_factors(scaling, values, fold)
        _remember(_FOLDS, (scaling, values), key, factors, keep=8)
    return factors.copy()


def _fold_key(fold: np.ndarray) -> tuple:
    """A fold mask's identity by content (its shape and a digest of its bits): prepare and the out-of-fold
    baselines build the same fold as different arrays."""
    bits = np.packbits(np.ascontiguousarray(fold, bool))
    return fold.shape, hashlib.blake2b(bits.data, digest_size=16).digest()


def _fold_factors(scaling: CountScaling, values: np.ndarray | MatrixFile, fold: np.ndarray) -> np.ndarray:
    n_genes, n_samples = values.shape
    if scaling.method == "cpm":
        rows = max(1, FACTOR_CELLS // max(n_samples, 1))
        left = np.zeros(n_samples, bool)  # samples with a visible entry outside the fold
        fold_sum = np.zeros(n_samples)
        for lo in range(0, n_genes, rows):
            counts = scaling.counts(values[lo : lo + rows])
            seen = ~np.isnan(counts)
            left |= (seen & ~fold[lo : lo + rows]).any(axis=0)
            fold_sum += np.where(fold[lo : lo + rows] & seen, counts, 0.0).sum(axis=0)
        total = scaling.factors * 1e6 - fold_sum
        # what is left of a total whose every count outside the fold is zero is the float round-off of the counts
        # read back: no total, as size_factors has it (factor 1 there)
        new = np.where(total > 1e-6 * scaling.factors * 1e6, total / 1e6, 1.0)
        return np.where(left, new, scaling.factors)
    # the median of ratios without the fold's entries as the evaluation's hiding computes it (visible: outside the
    # fold; a sample with nothing visible there scaled by its own entries), relative to the same over every entry
    with warnings.catch_warnings():  # a sample with no count at all has no median (its factor is kept below)
        warnings.simplefilter("ignore", RuntimeWarning)
        without = size_factors(_FoldCounts(scaling, values, None), scaling.method, visible=_Outside(fold))
        new = scaling.factors * without / _basis_factors(scaling, values)
    return np.where(np.isfinite(new) & (new > 0), new, scaling.factors)


#: the median-of-ratios factors over a problem's rows, every visible entry in, per (scaling, values) pair (weak
#: references: an entry never keeps a matrix alive, and a dead one is never matched): each fold of one problem
#: divides by the same (18 s at 20,000 x 17,382 here)
_BASIS: list[tuple[tuple[weakref.ref, ...], Any, np.ndarray]] = []
#: each fold's factors per (scaling, values, fold mask's content): prepare cuts a fold's records and the
#: out-of-fold baselines estimate its entries, each folding the same problem (a median of ratios is 18 s a fold at
#: 20,000 x 17,382 here)
_FOLDS: list[tuple[tuple[weakref.ref, ...], Any, np.ndarray]] = []


def _recall(cache: list, owners: tuple, key: Any = None) -> Any:
    """The value :func:`_remember` stored in ``cache`` for these very ``owners`` (by identity, while they live) and
    ``key``; None when there is none."""
    for refs, entry_key, value in cache:
        if entry_key == key and all(r() is o for r, o in zip(refs, owners, strict=True)):
            return value
    return None


def _remember(cache: list, owners: tuple, key: Any, value: Any, keep: int) -> None:
    """Store ``value`` in ``cache`` for ``owners`` (weak references: an entry never keeps them alive, and a dead
    one is never matched) and ``key``, dropping entries whose owners died and all but the last ``keep``; an owner
    that takes no weak reference is not cached (computed each time)."""
    try:
        refs = tuple(weakref.ref(o) for o in owners)
    except TypeError:
        return
    cache[:] = [e for e in cache if all(r() is not None for r in e[0])][-(keep - 1):]
    cache.append((refs, key, value))


def _basis_factors(scaling: CountScaling, values: np.ndarray | MatrixFile) -> np.ndarray:
    factors = _recall(_BASIS, (scaling, values))
    if factors is None:
        factors = size_factors(_FoldCounts(scaling, values, None), scaling.method)
        _remember(_BASIS, (scaling, values), None, factors, keep=4)
    return factors


#: cohort samples whose factors fix a new sample's per-million scale (:func:`new_sample_factors`)
REFERENCE_SAMPLES = 256


def new_sample_factors(scaling: CountScaling, values: np.ndarray | MatrixFile, counts: np.ndarray) -> np.ndarray:
    """(S_new,) the factors of new samples' raw ``counts`` ((G, S_new), the problem's rows, NaN where unmeasured)
    on the scale of a problem normalised by ``scaling`` (its model-scale ``values``): what :func:`size_factors` run
    over the cohort would give them, without running it again over every sample.

    ``cpm``: each new sample's own total (a CPM factor is a sample's own; the caller's totals count every row of
    its file). ``median_ratio``: the median ratio of the new sample's counts to the cohort's pseudo-reference (each
    gene's geometric mean over the cohort's measured counts, > 0), times the cohort's per-million constant (read
    from up to :data:`REFERENCE_SAMPLES` cohort samples' factors against their own median ratios): a new donor's
    few tissues normalised against each other alone were put on a scale the model never saw (a lone column is
    plain CPM; up to 1.2 log1p units off on GTEx's counts). A new sample with no count the reference has keeps its
    total's CPM factor. Remembered per (scaling, values) while both live.
    """
    counts = np.asarray(counts, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        total = np.nansum(counts, axis=0)
        own = np.where(total > 0, total / 1e6, 1.0)
        if scaling.method == "cpm":
            return own
        log_ref, norm = _cohort_reference(scaling, values)
        logc = np.where(counts > 0, np.log(counts), np.nan) - log_ref[:, None]
        usable = np.isfinite(logc).any(axis=0)
        median = np.nanmedian(np.where(usable[None, :], logc, 0.0), axis=0)
    return np.where(usable, np.exp(median) * norm, own)


_REFERENCES: list[tuple[tuple[weakref.ref, ...], Any, tuple[np.ndarray, float]]] = []


def _cohort_reference(scaling: CountScaling, values: np.ndarray | MatrixFile) -> tuple[np.ndarray, float]:
    """(each row's log pseudo-reference over the cohort, the per-million constant) of :func:`new_sample_factors`."""
    known = _recall(_REFERENCES, (scaling, values))
    if known is not None:
        return known
    n_genes, n_samples = values.shape
    picked = np.unique(np.linspace(0, n_samples - 1, min(n_samples, REFERENCE_SAMPLES)).round().astype(np.int64))
    log_ref = np.full(n_genes, np.nan)
    picked_logs = np.full((n_genes, len(picked)), np.nan)
    rows = max(1, FACTOR_CELLS // max(n_samples, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        for lo in range(0, n_genes, rows):
            part = scaling.counts(values[lo : lo + rows])
            logs = np.where(part > 0, np.log(part), np.nan)
            n_ref = np.isfinite(logs).sum(axis=1)
            log_ref[lo : lo + rows] = np.where(n_ref > 0, np.nansum(logs, axis=1) / np.maximum(n_ref, 1), np.nan)
            picked_logs[lo : lo + rows] = logs[:, picked]
        ratios = picked_logs - log_ref[:, None]
        seen = np.isfinite(ratios).any(axis=0)
        medians = np.nanmedian(np.where(seen[None, :], ratios, 0.0), axis=0)
        norms = scaling.factors[picked] / np.exp(medians)
    norms = norms[seen & np.isfinite(norms) & (norms > 0)]
    norm = float(np.median(norms)) if len(norms) else 1.0
    _remember(_REFERENCES, (scaling, values), None, (log_ref, norm), keep=2)
    return log_ref, norm


class _Outside:
    """``~fold`` read a slice at a time (``size_factors``' ``visible``): no second (G, S) mask."""

    def __init__(self, fold: np.ndarray) -> None:
        self.fold = fold

    def __getitem__(self, key):
        return ~self.fold[key]


class _FoldCounts:
    """The counts of a problem's model-scale values with a fold's entries NaN, read a slice at a time as
    :func:`size_factors` reads (rows ``[lo:hi]``, columns ``[:, lo:hi]``): no (G, S) float64 copy."""

    def __init__(self, scaling: CountScaling, values: np.ndarray | MatrixFile, fold: np.ndarray | None) -> None:
        self.scaling, self.values, self.fold, self.shape = scaling, values, fold, values.shape

    def __getitem__(self, key):
        if isinstance(key, tuple):  # [:, lo:hi]
            cols = key[1]
            counts = self.scaling.counts(self.values[:, cols], cols)
            if self.fold is not None:
                counts[self.fold[:, cols]] = np.nan
            return counts
        counts = self.scaling.counts(self.values[key])
        if self.fold is not None:
            counts[self.fold[key]] = np.nan
        return counts


def to_model_scale(expr: Expression, config: ExpressionConfig, visible: np.ndarray | None = None,
                   rows: np.ndarray | None = None, *, in_place: bool = False,
                   scaling_out: list | None = None) -> np.ndarray:
    """Values on the modelling scale: ``log1p`` of TPM or of normalised counts, or as given for ``log`` and
    ``normalised``.

    Args:
        expr: the expression read.
        config: the transform and the counts normalisation.
        visible: (G, S) bool over ``expr``'s rows and columns: the entries that count normalisation may be
            computed from (see :func:`size_factors`); None: all measured entries.
        rows: the rows of ``expr`` returned, in this order (default: all). Count normalisation still reads every
            row (a sample's total counts the genes left out); only the rows returned are kept.
        in_place: take ``expr.values`` over instead of copying it (``expr.values`` is None afterwards): ``rows`` are
            moved to its top in place, the other rows freed, and the values scaled where they are, so that the
            process never holds a second matrix. The values are the copy's to the bit.
        scaling_out: where counts are normalised, a :class:`CountScaling` of the factors used is appended to it
            (what a training fold needs to normalise again without its entries: :func:`fold_factors`).

    Returns:
        float32 array of ``expr.values``' ``rows`` (NaN preserved): one copy (none ``in_place``), the steps below
        work on it in place.
    """
    factors = size_factors(expr.values, config.counts_normalisation, visible) if expr.scale == "counts" else None
    if isinstance(expr.values, MatrixFile) and not in_place:
        raise ValueError(f"to_model_scale: {expr.path}'s values are a matrix file; they are scaled in place")
    if in_place:
        values, expr.values = expr.values, None
        if not isinstance(values, MatrixFile):
            values = values.astype(np.float32, copy=False)
        if rows is not None:
            move_rows_up(values, rows)
            try:  # this frame holds the only reference: the array shrinks where it is, the other rows freed
                values.resize((len(rows), values.shape[1]))
            except ValueError:  # a view, or referenced elsewhere: keep the whole buffer and use its top rows
                values = values[: len(rows)]
    else:
        values = expr.values[rows] if rows is not None else expr.values.copy()
        values = values.astype(np.float32, copy=False)
    log1p = not (expr.scale in ("log", "normalised") or config.transform == "none")
    if factors is not None and scaling_out is not None:
        scaling_out.append(CountScaling(config.counts_normalisation, np.asarray(factors, np.float64), log1p))
    if factors is None and not log1p:
        return values
    divisor = None if factors is None else factors[None, :].astype(np.float32)

    def scale(block: np.ndarray) -> None:  # elementwise: the same values whether done at once or a pass at a time
        if divisor is not None:
            block /= divisor
        if log1p:
            np.log1p(block, out=block)

    update_rows(values, scale)
    return values


def move_rows_up(matrix: np.ndarray | MatrixFile, rows: np.ndarray) -> None:
    """Put ``matrix[rows]`` in ``matrix[:len(rows)]`` in place (``rows`` distinct); the other rows end below them in
    no particular order. Follows the cycles of the permutation with one row of scratch: no copy of the matrix (a
    :class:`~geximpute.io.matrixfile.MatrixFile`: one read and one write of each row moved)."""
    n = matrix.shape[0]
    source = np.empty(n, np.int64)  # the row whose values go to each row
    source[: len(rows)] = rows
    rest = np.ones(n, bool)
    rest[rows] = False
    source[len(rows) :] = np.flatnonzero(rest)
    done = source == np.arange(n)
    scratch = np.empty(matrix.shape[1:], matrix.dtype)
    for start in np.flatnonzero(~done):
        if done[start]:
            continue
        scratch[...] = matrix[start]
        row = start
        while source[row] != start:
            matrix[row] = matrix[source[row]]
            done[row] = True
            row = source[row]
        matrix[row] = scratch
        done[row] = True


def from_model_scale(values: np.ndarray, scale: str, config: ExpressionConfig) -> np.ndarray | None:
    """Inverse of the log1p transform: TPM (or normalised counts per million) from modelling-scale values, at least
    0 (an estimate below 0 on the log1p scale is no negative abundance); None where the model's scale is not a
    log1p of a linear one (``log`` and ``normalised`` input, ``transform: none``): there is no linear value to give."""
    if linear_unit(scale, config) is None:
        return None
    return np.expm1(np.maximum(values, 0.0))


def model_scale(scale: str, config: ExpressionConfig) -> str:
    """The modelling scale in a few words, for reports and axes: ``log1p TPM``, ``log1p normalised CPM``, or the
    input's own (``log``, ``normalised``: the values as given)."""
    unit = linear_unit(scale, config)
    if unit is None:
        return f"{scale}, as given" if scale in ("log", "normalised") else f"{scale}, untransformed"
    return "log1p TPM" if unit == "TPM" else "log1p normalised CPM"


def linear_unit(scale: str, config: ExpressionConfig) -> str | None:
    """What :func:`from_model_scale` gives back (the predictions' ``predicted_tpm``): ``TPM``, ``normalised counts
    per million`` (counts, CPM or median-of-ratios, per million of the file's genes), or None."""
    if scale in ("log", "normalised") or config.transform == "none":
        return None
    return "TPM" if scale == "tpm" else "normalised counts per million"

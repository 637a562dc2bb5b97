"""Expression: GCT 1.2, wide TSV/CSV (genes x samples or genes x tissues), long TSV/CSV/Parquet, or a QTLtools/FastQTL
phenotype BED (``#chr start end gene [gid|length strand]`` then one column per person).

Every layout is read into one in-memory form, :class:`Expression`: a genes x samples float32 matrix with NaN for
entries that were not measured, plus the gene and sample ids. Values are kept on the scale they were given on;
:func:`to_model_scale` turns them into the modelling scale (log1p of TPM or of normalised counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from geximpute import schema as S
from geximpute.config import ExpressionConfig
from geximpute.errors import InputError
from geximpute.io.checks import check_readable, open_text, strip_version
from geximpute.io.tables import is_parquet, read_table, require_columns

#: wide-table columns that describe genes rather than hold values
ANNOTATION_COLUMNS = {"description", "gene_name", "name", "symbol", "gene_symbol", "gene.name", "gene_type"}
GENE_ID_COLUMNS = ["gene_id", "Name", "gene", "geneid", "ensembl_gene_id", "id"]
#: annotation columns that carry gene symbols, in order of preference (a GCT's ``Description`` holds them)
NAME_COLUMNS = ["gene_name", "symbol", "gene_symbol", "gene.name", "description"]


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
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".gct"):
        return "gct"
    if name.endswith(".bed"):
        return "bed"
    if is_parquet(path):
        return "long"
    with open_text(path) as fh:
        header = fh.readline().strip().lower()
    sep = "," if name.endswith(".csv") else "\t"
    columns = {c.strip().strip('"') for c in header.split(sep)}
    return "long" if {"sample_id", "value"} <= columns else "wide"


def read_expression(path: str | Path, fmt: str = "auto", scale: str = "tpm") -> Expression:
    """Read and validate an expression file.

    Args:
        path: GCT 1.2, wide TSV/CSV, long TSV/CSV/Parquet or phenotype BED (plain, gzip or bgzip).
        fmt: ``auto``, ``gct``, ``wide``, ``long`` or ``bed``.
        scale: ``tpm`` and ``counts`` must be non-negative; ``log`` and ``normalised`` may be negative.

    Raises:
        InputError: missing/empty/truncated file, a bad GCT header, missing columns, non-numeric or negative
            values, duplicate gene ids or sample columns.
    """
    path = check_readable(path, "expression file")
    try:
        fmt = detect_format(path) if fmt == "auto" else fmt
        if fmt == "gct":
            expr = _read_gct(path, scale)
        elif fmt == "long":
            expr = _read_long(path, scale)
        elif fmt == "bed":
            expr = _read_phenotype_bed(path, scale)
        else:
            expr = _read_wide(path, scale, read_table(path, "expression table"), first_data_line=2)
    except UnicodeDecodeError as exc:
        raise InputError(path, f"is not UTF-8 text (byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r})",
                         expected="a UTF-8 (or ASCII) text table, plain or gzip") from exc
    if expr.values.size == 0:
        raise InputError(path, "expression table holds no values", expected="at least one gene and one sample")
    # NaN policy: an empty cell, NA or NaN is an unmeasured entry (imputed); an infinite value is an error
    infinite = np.isinf(expr.values)
    if infinite.any():
        g, s = (int(x[0]) for x in np.nonzero(infinite))
        raise InputError(
            path,
            f"infinite expression value {expr.values[g, s]:g}",
            record=f"gene {expr.gene_ids[g]}, sample {expr.sample_ids[s]}"
            + (f" (line {g + expr.report['first_data_line']})" if "first_data_line" in expr.report else ""),
            expected="a finite number, or an empty cell / NA for an unmeasured value",
        )
    if scale not in ("log", "normalised"):
        neg = expr.values < 0
        if neg.any():
            g, s = (int(x[0]) for x in np.nonzero(neg))
            raise InputError(
                path,
                f"negative expression value {expr.values[g, s]:g} for scale {scale!r}",
                record=f"gene {expr.gene_ids[g]}, sample {expr.sample_ids[s]}"
                + (f" (line {g + expr.report['first_data_line']})" if "first_data_line" in expr.report else ""),
                expected="values >= 0 (set inputs.scale: log for log-scale values, or normalised for values an "
                "eQTL pipeline has normalised)",
            )
    measured = ~np.isnan(expr.values)
    expr.report.update(
        format=fmt,
        n_genes=len(expr.gene_ids),
        n_samples=len(expr.sample_ids),
        n_measured=int(measured.sum()),
        measured_fraction=float(measured.mean()),
    )
    return expr


def _read_gct(path: Path, scale: str) -> Expression:
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
    table = read_table(path, "GCT expression file", skip_rows=2, delimiter="\t")
    if not table.column_names or table.column_names[0] != "Name":
        raise InputError(
            path,
            f"header starts with {table.column_names[:2]}",
            record="line 3",
            expected="'Name', 'Description', then one column per sample",
        )
    expr = _read_wide(path, scale, table, first_data_line=4)
    expr.report["gct_declared_shape"] = declared
    expr.report["gct_dimension_line_matches"] = declared == expr.values.shape
    return expr


#: the coordinate columns of a phenotype BED: QTLtools writes six (the fifth is a group id, or a length), FastQTL four
BED_COORDINATES = ("#chr", "start", "end")


def _read_phenotype_bed(path: Path, scale: str) -> Expression:
    """A QTLtools (``#chr start end pid gid strand``) or FastQTL (``#Chr start end ID``) phenotype BED."""
    table = read_table(path, "phenotype BED", delimiter="\t", quoting=False,
                       column_types={"#chr": pa.string(), "#Chr": pa.string()})
    names = table.column_names
    lower = [n.lower() for n in names]
    if len(names) < 5 or tuple(lower[:3]) != BED_COORDINATES:
        raise InputError(path, f"header starts with {names[:6]}", record="line 1",
                         expected="a phenotype BED header '#chr start end <id> [<gid or length> strand]' followed "
                         "by one column per person (QTLtools/FastQTL layout)")
    n_coord = 6 if len(names) > 6 and lower[5] == "strand" else 4
    coords = table.select(names[:n_coord])
    values = table.select([names[3], *names[n_coord:]])
    expr = _read_wide(path, scale, values.rename_columns(["gene_id", *names[n_coord:]]), first_data_line=2)
    strand = coords.column(5).cast(pa.string()) if n_coord == 6 else pa.nulls(table.num_rows, pa.string())
    expr.genes = pa.table({
        "gene_id": coords.column(3).cast(pa.string()),
        "chrom": coords.column(0).cast(pa.string()),
        "start0": coords.column(1),
        "end": coords.column(2),
        "strand": strand,
    })
    return expr


def _read_wide(path: Path, scale: str, table: pa.Table, first_data_line: int) -> Expression:
    names = table.column_names
    lower = {n.lower(): n for n in names}
    id_col = next((lower[c.lower()] for c in GENE_ID_COLUMNS if c.lower() in lower), names[0])
    value_cols = [
        n for n in names if n != id_col and not (n.lower() in ANNOTATION_COLUMNS and pa.types.is_string(table[n].type))
    ]
    if not value_cols:
        raise InputError(path, "no value columns", record="the header", expected="one column per sample or tissue")
    for i, n in enumerate(names):
        if i > 0 and n.strip() == "":
            raise InputError(path, f"column {i + 1} of the header has no name (a trailing tab or separator?)",
                             record=f"the header, line {first_data_line - 1}",
                             expected="a sample or tissue name over every value column")
    seen: dict[str, int] = {}
    for i, n in enumerate(value_cols):
        if n in seen:
            raise InputError(
                path,
                f"sample column {n!r} appears twice",
                record="the header",
                expected="unique sample names",
            )
        seen[n] = i
    # one (genes, samples) array filled a column at a time: no list of per-column arrays to stack (thousands of
    # small allocations that stayed in the process's heap after they were freed)
    values = np.empty((table.num_rows, len(value_cols)), np.float32)
    for j, n in enumerate(value_cols):
        col = table[n]
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_null(col.type)):
            _raise_non_numeric(path, table, id_col, n, first_data_line)
        values[:, j] = col.cast(pa.float32()).to_numpy(zero_copy_only=False)
    gene_ids = _gene_ids(path, table[id_col], first_data_line)
    name_col = next((lower[c] for c in NAME_COLUMNS if c in lower and lower[c] != id_col
                     and pa.types.is_string(table[lower[c]].type)), None)
    gene_names = None
    if name_col is not None:
        gene_names = [n.strip() or None if n is not None else None for n in table[name_col].to_pylist()]
    return Expression(
        path=path,
        gene_ids=gene_ids,
        sample_ids=list(value_cols),
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
    arr = np.asarray(ids, dtype=object)
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        lines = ", ".join(str(i + first_data_line) for i in np.flatnonzero(arr == dup)[:3])
        raise InputError(
            path,
            f"{int((counts > 1).sum())} duplicate gene id(s), e.g. {dup!r}",
            record=f"lines {lines}",
            expected="one row per gene (version suffixes are ignored when comparing)",
        )
    return ids


def _read_long(path: Path, scale: str) -> Expression:
    table = read_table(path, "expression table (long)")
    table = require_columns(
        table,
        path,
        "expression table (long)",
        {S.GENE_ID: ["gene", "Name"], S.SAMPLE_ID: ["sample"], S.VALUE: ["tpm", "count", "expression"]},
    )
    value = table[S.VALUE]
    if not (pa.types.is_integer(value.type) or pa.types.is_floating(value.type)):
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
    measured = ~np.isnan(counts)
    if visible is None:
        visible = measured
    visible = visible & measured
    has_visible = visible.any(axis=0)
    # what each sample's factor is computed from: its visible entries, or all its own entries when none is visible
    basis = np.where(has_visible[None, :], np.where(visible, counts, np.nan), counts)
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "cpm":
            total = np.nansum(basis, axis=0)
            return np.where(total > 0, total / 1e6, 1.0)
        logc = np.where(basis > 0, np.log(basis), np.nan)
        # the pseudo-reference comes from visible entries only
        usable = visible & (counts > 0)
        n_ref = usable.sum(axis=1, keepdims=True)
        log_ref = np.where(usable, np.log(np.where(usable, counts, 1.0)), 0.0).sum(axis=1, keepdims=True)
        ref = np.where(n_ref > 0, log_ref / np.maximum(n_ref, 1), np.nan)  # a gene hidden everywhere: no reference
        ratios = np.nanmedian(logc - ref, axis=0)
        factor = np.exp(np.nan_to_num(ratios, nan=0.0))
        # scale so that the median sample has the same per-million scale as cpm (median over samples with
        # visible entries, from their visible totals)
        total = np.nansum(basis, axis=0)
        per_million = np.where((total > 0) & has_visible, total / 1e6, np.nan) / factor
        norm = np.nanmedian(per_million) if np.isfinite(per_million).any() else np.nan
        return factor * (norm if np.isfinite(norm) else 1.0)


def to_model_scale(expr: Expression, config: ExpressionConfig, visible: np.ndarray | None = None) -> np.ndarray:
    """Values on the modelling scale: ``log1p`` of TPM or of normalised counts, or as given for ``log`` and
    ``normalised``.

    Args:
        expr: the expression read.
        config: the transform and the counts normalisation.
        visible: (G, S) bool over ``expr``'s rows and columns: the entries that count normalisation may be
            computed from (see :func:`size_factors`); None: all measured entries.

    Returns:
        float32 array of the same shape as ``expr.values`` (NaN preserved).
    """
    values = expr.values.astype(np.float32, copy=True)  # the one copy: the steps below work in place
    if expr.scale == "counts":
        factors = size_factors(values, config.counts_normalisation, visible)
        values /= factors[None, :].astype(np.float32)
    if expr.scale in ("log", "normalised") or config.transform == "none":
        return values
    return np.log1p(values, out=values)


def from_model_scale(values: np.ndarray, scale: str, config: ExpressionConfig) -> np.ndarray:
    """Inverse of the log1p transform: TPM (or normalised counts per million) from modelling-scale values."""
    if scale in ("log", "normalised") or config.transform == "none":
        return values
    return np.expm1(values)

"""Column names and Arrow schemas of every table geximpute reads or writes, declared once.

Readers return tables in these schemas; writers check against them with :func:`check_table`.
Coordinates are 1-based and inclusive, as in GTF and VCF.
"""

from __future__ import annotations

import pyarrow as pa

# Column names -------------------------------------------------------------------------------------------------
GENE_ID = "gene_id"
GENE_NAME = "gene_name"
GENE_TYPE = "gene_type"
CHROM = "chrom"
TSS = "tss"
STRAND = "strand"
START = "start"
END = "end"

SAMPLE_ID = "sample_id"
DONOR_ID = "donor_id"
TISSUE = "tissue"
VALUE = "value"

POS = "pos"
VARIANT_ID = "variant_id"
REF = "ref"
ALT = "alt"

#: donor id given to every column of a table that has no sample table (one reference genotype, as in medians)
REFERENCE_DONOR = "reference"

# Schemas ------------------------------------------------------------------------------------------------------
GENES = pa.schema(
    [
        pa.field(GENE_ID, pa.string(), nullable=False),
        pa.field(GENE_NAME, pa.string()),
        pa.field(GENE_TYPE, pa.string()),
        pa.field(CHROM, pa.string(), nullable=False),
        pa.field(START, pa.int64()),
        pa.field(END, pa.int64()),
        pa.field(TSS, pa.int64(), nullable=False),
        pa.field(STRAND, pa.string(), nullable=False),
    ]
)

SAMPLES = pa.schema(
    [
        pa.field(SAMPLE_ID, pa.string(), nullable=False),
        pa.field(DONOR_ID, pa.string(), nullable=False),
        pa.field(TISSUE, pa.string(), nullable=False),
    ]
)

EXPRESSION_LONG = pa.schema(
    [
        pa.field(GENE_ID, pa.string(), nullable=False),
        pa.field(SAMPLE_ID, pa.string(), nullable=False),
        pa.field(VALUE, pa.float64(), nullable=False),
    ]
)

VARIANT_SITES = pa.schema(
    [
        pa.field(CHROM, pa.string(), nullable=False),
        pa.field(POS, pa.int64(), nullable=False),
        pa.field(VARIANT_ID, pa.string()),
        pa.field(REF, pa.string(), nullable=False),
        pa.field(ALT, pa.list_(pa.string()), nullable=False),
    ]
)

PREDICTIONS = pa.schema(
    [
        pa.field(GENE_ID, pa.string(), nullable=False),
        pa.field(DONOR_ID, pa.string(), nullable=False),
        pa.field(TISSUE, pa.string(), nullable=False),
        pa.field(SAMPLE_ID, pa.string()),
        pa.field("predicted", pa.float32(), nullable=False),
        pa.field("predicted_lower", pa.float32()),
        pa.field("predicted_upper", pa.float32()),
        pa.field("predicted_tpm", pa.float32()),
        pa.field("observed", pa.float32()),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)


def check_table(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """Return ``table`` with columns ordered and cast to ``schema``.

    Raises:
        ValueError: a column is missing, cannot be cast, or a non-nullable column holds nulls.
    """
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{what}: missing columns {missing}; has {table.column_names}")
    table = table.select(schema.names)
    try:
        table = table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{what}: columns do not match the declared schema: {exc}") from exc
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise ValueError(f"{what}: column {field.name!r} has {table.column(field.name).null_count} nulls")
    return table

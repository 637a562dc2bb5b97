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

#: the partition folders of prediction outputs (hive style, values URI-encoded): ``geximpute impute`` writes
#: ``tissue=<t>/``, ``geximpute nightly`` writes ``run_date=<YYYY-MM-DD>/tissue=<t>/``; the partition columns are not
#: stored in the files, readers get them from the folder names. ``sample_id`` is null for a donor-tissue profile that
#: was never sampled; ``observed`` is null for an imputed entry.
RUN_DATE = "run_date"
PREDICTION_PARTITIONS = (TISSUE,)


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


# Records (geximpute prepare) ----------------------------------------------------------------------------------
#: orientation of a neighbour relative to the target gene
ORIENT_SAME, ORIENT_DIVERGENT, ORIENT_CONVERGENT = 0, 1, 2

CONTEXT = pa.schema(
    [
        pa.field(GENE_ID, pa.string(), nullable=False),
        pa.field(SAMPLE_ID, pa.string(), nullable=False),
        pa.field(DONOR_ID, pa.string(), nullable=False),
        pa.field(TISSUE, pa.string(), nullable=False),
        pa.field(CHROM, pa.string(), nullable=False),
        pa.field("gene_index", pa.int32(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("tissue_index", pa.int16(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("hidden", pa.bool_(), nullable=False),
        # the entry's own visible value, its training label: in a training fold's records set though the entry is
        # hidden from its context (``hidden`` true); null in the context records of hidden and unmeasured entries
        pa.field("target", pa.float32()),
        # K nearest genes on the chromosome with a visible value in this sample, nearest first
        pa.field("nb_value", pa.list_(pa.float32()), nullable=False),
        pa.field("nb_logdist", pa.list_(pa.float32()), nullable=False),  # sign(d) log10(1+|d|), d 5'->3' of target
        pa.field("nb_orient", pa.list_(pa.int8()), nullable=False),  # ORIENT_*
        pa.field("nb_overlap", pa.list_(pa.bool_()), nullable=False),
        # each neighbour's mean over all its visible samples: its value minus this is the region's tissue signal
        pa.field("nb_gene_mean", pa.list_(pa.float32()), nullable=False),
        # the same gene in the donor's other samples with a visible value
        pa.field("tis_value", pa.list_(pa.float32()), nullable=False),
        pa.field("tis_index", pa.list_(pa.int16()), nullable=False),
        pa.field("tis_corr", pa.list_(pa.float32()), nullable=False),  # correlation with the target tissue
        # the gene's mean in each of those tissues over the other donors (NaN where there is none)
        pa.field("tis_mean", pa.list_(pa.float32()), nullable=False),
        pa.field("tissue_mean", pa.float32()),  # the gene in the target tissue, mean over other donors
        pa.field("gene_mean", pa.float32()),  # the gene over every other visible sample
        pa.field("tissue_offset", pa.float32(), nullable=False),  # the target tissue's mean deviation from genes
        # the donor's cis-genetic score for the gene (geximpute.science.genomes.genetic_scores, fitted on the
        # visible values, the donor's other measured tissues among them; a measured target of impute
        # --include-observed reads a fit without its own value); null without personal genomes, for donors without
        # a genome and genes without variants
        pa.field("genetic_score", pa.float32()),
    ]
)

#: an optional context-record column (after the CONTEXT columns): what the gene's family says of the entry, the
#: visible values of the other genes of its symbol's family in the sample (geximpute.science.baselines.FamilyLevels,
#: the gene itself never counted); null for a gene without a family. Written when ``context.family`` asks for it;
#: networks trained on records with it read it (NetworkSpec.family_input)
FAMILY_LEVEL = "family_level"

PROMOTERS = pa.schema(
    [
        pa.field("promoter_id", pa.string(), nullable=False),  # hash of the sequence
        pa.field("sequence", pa.string(), nullable=False),  # 5'->3' on the gene's strand, upper case, N padded
        pa.field("padded", pa.int32(), nullable=False),
    ]
)

#: ``geximpute variant-effects``: one row per (variant ALT allele, gene whose cis window holds it, tissue): the
#: promoter window, or ``genotypes.cis_window`` bases either side of the TSS (a site outside the promoter moves the
#: cis-genetic score alone)
VARIANT_EFFECTS = pa.schema(
    [
        pa.field("variant_id", pa.string()),  # the VCF's ID, null for '.'
        pa.field(CHROM, pa.string(), nullable=False),
        pa.field("pos", pa.int64(), nullable=False),  # 1-based, as in the VCF
        pa.field("ref", pa.string(), nullable=False),
        pa.field("alt", pa.string(), nullable=False),
        pa.field(GENE_ID, pa.string(), nullable=False),
        pa.field("tss_offset", pa.int64(), nullable=False),  # POS - TSS along the gene's strand (< 0: upstream)
        pa.field(TISSUE, pa.string(), nullable=False),
        pa.field("predicted_ref", pa.float32(), nullable=False),  # homozygous reference promoter
        pa.field("predicted_alt", pa.float32(), nullable=False),  # homozygous for this ALT allele alone
        pa.field("effect", pa.float32(), nullable=False),  # (alt - ref) / 2: change per ALT allele, modelling scale
        # the cis-genetic score's fitted change per ALT allele (the score's input to the model; null where the
        # model reads no genomes)
        pa.field("genetic_effect", pa.float32()),
        pa.field("model_version", pa.string(), nullable=False),
    ]
)

#: donors whose promoter haplotypes differ from the reference: the rows that override gene_promoters for them
DONOR_PROMOTERS = pa.schema(
    [
        pa.field(GENE_ID, pa.string(), nullable=False),
        pa.field(DONOR_ID, pa.string(), nullable=False),
        pa.field("promoter_a", pa.string(), nullable=False),  # promoter_id of haplotype A
        pa.field("promoter_b", pa.string(), nullable=False),  # promoter_id of haplotype B
    ]
)

GENE_PROMOTERS = pa.schema(
    [
        pa.field(GENE_ID, pa.string(), nullable=False),
        pa.field(CHROM, pa.string(), nullable=False),
        pa.field("promoter_id", pa.string(), nullable=False),
        pa.field("soft_masked", pa.int32(), nullable=False),
    ]
)

# The model bundle (geximpute.fit.bundle) and the trained network (``geximpute train``) ---------------------------
#: the trained network, written by ``geximpute train`` into its folder and copied into every bundle
NETWORK_WEIGHTS_FILE = "network.pt"  # the state dict (torch.save; read back with torch.load(weights_only=True))
NETWORK_SPECS_FILE = "network.json"  # {"network": NetworkSpec, "features": FeatureSpec[, "metrics": training figures]}
#: the XGBoost head (geximpute.fit.head): boosters of the estimate and of the interval bounds, and their settings
HEAD_POINT_FILE = "point.ubj"
HEAD_INTERVAL_FILE = "interval.ubj"
HEAD_SPECS_FILE = "head.json"  # conformal width, feature count, coverage, engineered feature names
#: the reference promoter windows of the training genes (personal haplotypes come from the VCF at prediction time)
BUNDLE_PROMOTERS_FILE = "promoters.parquet"
BUNDLE_GENE_PROMOTERS_FILE = "gene_promoters.parquet"
BUNDLE_CONFIG_FILE = "config.yaml"  # the resolved config that made the bundle
BUNDLE_MANIFEST_FILE = "manifest.json"  # versions, input fingerprints, training metrics, model_version

#: every file of a bundle folder, in the order listed by :mod:`geximpute.fit.bundle`
BUNDLE_FILES = (
    NETWORK_WEIGHTS_FILE, NETWORK_SPECS_FILE, HEAD_POINT_FILE, HEAD_INTERVAL_FILE, HEAD_SPECS_FILE,
    BUNDLE_PROMOTERS_FILE, BUNDLE_GENE_PROMOTERS_FILE, BUNDLE_CONFIG_FILE, BUNDLE_MANIFEST_FILE,
)
#: the files whose bytes make ``model_version``: the model itself (the weights, the boosters and their specs);
#: two bundles built from the same inputs and settings with the same version predict the same
BUNDLE_VERSIONED_FILES = (NETWORK_WEIGHTS_FILE, HEAD_POINT_FILE, HEAD_INTERVAL_FILE, HEAD_SPECS_FILE,
                          NETWORK_SPECS_FILE)

#: ``promoters.parquet`` of a bundle: one row per reference promoter window used by a training gene
BUNDLE_PROMOTERS = pa.schema(
    [
        pa.field("sequence", pa.string(), nullable=False),  # as in PROMOTERS: 5'->3' on the gene's strand
    ]
)

#: ``gene_promoters.parquet`` of a bundle: the row of ``promoters.parquet`` that holds each gene's window
BUNDLE_GENE_PROMOTERS = pa.schema(
    [
        pa.field(GENE_ID, pa.string(), nullable=False),
        pa.field("promoter_row", pa.int64(), nullable=False),
    ]
)


def record_partitioning():
    """The hive partitioning that record folders (``chrom=<name>/``) are read with: the chromosome is text however
    its names look. Inferred from the folder names, Ensembl's ``1``..``22`` read as integers and ``X`` as text, so
    two folds with and without a record on X failed to concatenate, and all-numeric names reached the output as
    numbers."""
    import pyarrow.dataset as pads

    return pads.partitioning(pa.schema([(CHROM, pa.string())]), flavor="hive")

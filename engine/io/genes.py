"""Gene annotation: GTF/GTF.gz, GFF3, BED6 or TSV/CSV -> one row per gene with its TSS (geximpute.schema.GENES).

Ensembl gene ids lose their version suffix (``ENSG00000141510.17`` -> ``ENSG00000141510``) so that sources on
different GENCODE releases join; other ids keep what follows their dot (``RP11-34P13.7``). Chromosome names are
harmonised to the genome's (or to ``chr``-style without a genome) and the renames are reported. The TSS is the 5'
end on the gene's strand: ``start`` on ``+``, ``end`` on ``-``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geximpute import schema as S
from geximpute.errors import InputError
from geximpute.io.checks import check_readable, format_name, strip_version
from geximpute.io.chroms import harmonise_chroms, renamed
from geximpute.io.fasta import Genome
from geximpute.io.tables import count_leading_comments, csv_batches, read_table, require_columns, table_error

GFF_COLUMNS = ["seqid", "source", "feature", "start", "end", "score", "strand", "frame", "attributes"]
BED_COLUMNS = ["chrom", "start0", "end", "name", "score", "strand"]


@dataclass
class GeneTable:
    """Genes with their TSS.

    Attributes:
        table: one row per gene, :data:`geximpute.schema.GENES`, sorted by chrom then TSS.
        path: the file read.
        report: counts and renames for ``inspect``.
    """

    table: pa.Table
    path: Path
    report: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.table.num_rows


#: GFF3 feature types read as genes, beside any type ending ``_gene`` (``ncRNA_gene``: Ensembl's non-coding genes)
GFF3_GENE_FEATURES = ["gene", "pseudogene"]


def detect_format(path: Path) -> str:
    """Gene-annotation format from the file name."""
    name = format_name(path)
    for suffix, fmt in (
        (".gtf", "gtf"),
        (".gff3", "gff3"),
        (".gff", "gff3"),
        (".bed", "bed"),
        (".csv", "csv"),
    ):
        if name.endswith(suffix):
            return fmt
    return "tsv"


def _attribute(attrs: pa.ChunkedArray, pattern: str) -> pa.ChunkedArray:
    """First capture ``value`` of ``pattern`` in every attribute string (null where absent)."""
    return pc.struct_field(pc.extract_regex(attrs, pattern), [0])


def _read_gff(path: Path, fmt: str) -> pa.Table:
    """The gene records of a GTF or GFF3 (and a GTF's transcripts, for genes without a gene line), read a block of
    lines at a time: the exons, UTRs and other features, most of a GENCODE file's lines, are dropped as they are
    read instead of being held as one table (docs/benchmarks.md "Reading the expression and the annotation a block
    at a time")."""
    types = {"start": pa.int64(), "end": pa.int64(),
             **{c: pa.string() for c in ("seqid", "feature", "strand", "attributes", "source", "score", "frame")}}
    _, _, batches = csv_batches(path, "gene annotation", lambda _: types, column_names=GFF_COLUMNS,
                                skip_rows=count_leading_comments(path), quoting=False, skip_comment_rows=True,
                                fasta_section=fmt != "gtf")
    features = pa.array(["gene", "transcript"] if fmt == "gtf" else GFF3_GENE_FEATURES)

    def wanted(feature: pa.Array) -> pa.Array:
        # GFF3 types genes by kind: Ensembl's `ncRNA_gene` and `pseudogene`, Sequence Ontology's `*_gene`
        found = pc.is_in(feature, value_set=features)
        return found if fmt == "gtf" else pc.or_(found, pc.fill_null(pc.ends_with(feature, "_gene"), False))

    kept, n_lines = [], 0
    try:
        for batch in batches:
            records = pc.invert(pc.fill_null(pc.starts_with(batch["seqid"], "#"), False))  # not a comment line
            n_lines += pc.sum(records).as_py() or 0
            kept.append(batch.filter(pc.and_(records, wanted(batch["feature"]))))
    except pa.ArrowInvalid as exc:
        raise table_error(path, "gene annotation", exc) from exc
    schema = pa.schema([(name, types[name]) for name in GFF_COLUMNS])
    table = pa.Table.from_batches(kept, schema)
    if fmt == "gtf":
        genes = table.filter(pc.equal(table["feature"], "gene"))
        genes = pa.concat_tables([genes, _genes_from_transcripts(table, genes)])
    else:
        genes = table
    if genes.num_rows == 0:
        raise InputError(
            path,
            f"no 'gene' records among {n_lines} {fmt.upper()} lines",
            expected="column 3 = 'gene' for one record per gene",
        )
    attrs = genes["attributes"]
    if fmt == "gtf":
        gene_id = _attribute(attrs, r'gene_id "(?P<v>[^"]+)"')
        gene_name = _attribute(attrs, r'gene_name "(?P<v>[^"]+)"')
        gene_type = _attribute(attrs, r'gene_(?:bio)?type "(?P<v>[^"]+)"')
    else:
        gene_id = pc.coalesce(
            _attribute(attrs, r"(?:^|;)gene_id=(?P<v>[^;]+)"),
            _attribute(attrs, r"(?:^|;)ID=(?:gene:)?(?P<v>[^;]+)"),
        )
        gene_name = pc.coalesce(
            _attribute(attrs, r"(?:^|;)gene_name=(?P<v>[^;]+)"),
            _attribute(attrs, r"(?:^|;)Name=(?P<v>[^;]+)"),
        )
        gene_type = pc.coalesce(
            _attribute(attrs, r"(?:^|;)gene_type=(?P<v>[^;]+)"),
            _attribute(attrs, r"(?:^|;)biotype=(?P<v>[^;]+)"),
        )
    missing = pc.is_null(gene_id)
    if pc.any(missing).as_py():
        i = pc.index(missing, True).as_py()
        raise InputError(
            path,
            "a gene record has no gene id",
            record=f"gene record {i + 1} ({genes['seqid'][i].as_py()}:{genes['start'][i].as_py()})",
            expected='gene_id "..." (GTF) or ID=/gene_id= (GFF3) in column 9',
        )
    strand = genes["strand"]
    tss = pc.if_else(pc.equal(strand, "-"), genes["end"], genes["start"])
    return pa.table(
        {
            S.GENE_ID: gene_id,
            S.GENE_NAME: gene_name,
            S.GENE_TYPE: gene_type,
            S.CHROM: genes["seqid"],
            S.START: genes["start"],
            S.END: genes["end"],
            S.TSS: tss,
            S.STRAND: strand,
        }
    )


def _genes_from_transcripts(table: pa.Table, genes: pa.Table) -> pa.Table:
    """GTF 'gene' records for genes that have transcripts but no 'gene' line (GTF2 files, or a GTF cut by
    transcript): the gene spans its transcripts, on their chromosome and strand."""
    tx = table.filter(pc.equal(table["feature"], "transcript"))
    if tx.num_rows == 0:
        return genes.slice(0, 0)
    tx_gene = _attribute(tx["attributes"], r'gene_id "(?P<v>[^"]+)"')
    have = _attribute(genes["attributes"], r'gene_id "(?P<v>[^"]+)"')
    tx = tx.append_column("gene", tx_gene).filter(pc.and_(pc.is_valid(tx_gene),
                                                          pc.invert(pc.is_in(tx_gene, value_set=have))))
    if tx.num_rows == 0:
        return genes.slice(0, 0)
    spans = tx.group_by("gene", use_threads=False).aggregate(
        [("start", "min"), ("end", "max"), ("seqid", "first"), ("strand", "first"), ("attributes", "first")])
    return pa.table({
        "seqid": spans["seqid_first"], "source": pa.nulls(spans.num_rows, pa.string()),
        "feature": pa.array(["gene"] * spans.num_rows, pa.string()), "start": spans["start_min"],
        "end": spans["end_max"], "score": pa.nulls(spans.num_rows, pa.string()),
        "strand": spans["strand_first"], "frame": pa.nulls(spans.num_rows, pa.string()),
        "attributes": spans["attributes_first"],
    }).select(genes.column_names).cast(genes.schema)


def _read_bed(path: Path) -> pa.Table:
    table = read_table(
        path,
        "gene annotation (BED6)",
        column_names=BED_COLUMNS,
        column_types={
            "chrom": pa.string(),
            "start0": pa.int64(),
            "end": pa.int64(),
            "name": pa.string(),
            "strand": pa.string(),
        },
        skip_rows=count_leading_comments(path, "#") + count_leading_comments(path, "track"),
        delimiter="\t",
        quoting=False,
    )
    start = pc.add(table["start0"], 1)  # BED is 0-based half-open
    tss = pc.if_else(pc.equal(table["strand"], "-"), table["end"], start)
    return pa.table(
        {
            S.GENE_ID: table["name"],
            S.GENE_NAME: pa.nulls(table.num_rows, pa.string()),
            S.GENE_TYPE: pa.nulls(table.num_rows, pa.string()),
            S.CHROM: table["chrom"],
            S.START: start,
            S.END: table["end"],
            S.TSS: tss,
            S.STRAND: table["strand"],
        }
    )


def _read_named(path: Path, fmt: str) -> pa.Table:
    columns = {
        S.GENE_ID: ["gene", "ensembl_gene_id", "geneid", "id"],
        S.CHROM: ["chr", "chromosome", "seqname", "seqid", "contig"],
        S.STRAND: [],
    }
    table = read_table(path, "gene annotation", delimiter="," if fmt == "csv" else "\t",
                       text_columns={**columns, S.GENE_NAME: [], S.GENE_TYPE: []})
    table = require_columns(table, path, "gene annotation", columns)
    names = table.column_names
    n = table.num_rows

    def column(name: str, tp: pa.DataType) -> pa.Array | pa.ChunkedArray:
        if name not in names:
            return pa.nulls(n, tp)
        try:
            return table[name].cast(tp)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            # the first value that does not convert, named with its line (100.5 for a position: a whole number)
            values = table[name].to_pylist()
            bad = next((i for i, v in enumerate(values) if v is not None and not _converts(v, tp)), None)
            raise InputError(path, f"column {name!r} is not {tp}" + ("" if bad is None else f": {values[bad]!r}"),
                             record=None if bad is None else _record(fmt, bad, table),
                             expected=f"{tp} values" + (f" ({exc})" if bad is None else "")) from exc

    start, end = column(S.START, pa.int64()), column(S.END, pa.int64())
    if S.TSS in names:
        tss = column(S.TSS, pa.int64())
    elif S.START in names and S.END in names:
        tss = pc.if_else(pc.equal(table[S.STRAND], "-"), end, start)
    else:
        raise InputError(
            path,
            "gene annotation has no TSS",
            record="the header",
            expected=f"a 'tss' column, or 'start' and 'end' with 'strand'; the file has {names[:12]}",
        )
    return pa.table(
        {
            S.GENE_ID: column(S.GENE_ID, pa.string()),
            S.GENE_NAME: column(S.GENE_NAME, pa.string()),
            S.GENE_TYPE: column(S.GENE_TYPE, pa.string()),
            S.CHROM: column(S.CHROM, pa.string()),
            S.START: start,
            S.END: end,
            S.TSS: tss,
            S.STRAND: column(S.STRAND, pa.string()),
        }
    )


def _converts(value: object, tp: pa.DataType) -> bool:
    """Whether one value converts to ``tp`` as Arrow's cast would (no truncation)."""
    try:
        pa.array([value]).cast(tp)
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False


def _record(fmt: str, i: int, table: pa.Table) -> str:
    """Human locator of row ``i``: a data line for delimited files, the gene otherwise."""
    gene = table[S.GENE_ID][i].as_py()
    if fmt in ("tsv", "csv"):
        return f"line {i + 2} (gene {gene})"
    return f"gene {gene}"


def read_genes(
    path: str | Path,
    fmt: str = "auto",
    *,
    gene_types: tuple[str, ...] = (),
    genome: Genome | None = None,
    genome_partial: bool = False,
) -> GeneTable:
    """Read and validate a gene annotation.

    Args:
        path: GTF/GFF3/BED6/TSV/CSV, plain or gzip.
        fmt: ``auto`` (from the name), ``gtf``, ``gff3``, ``bed``, ``tsv`` or ``csv``.
        gene_types: keep only these gene types (when the file has them).
        genome: when given, chromosome names are harmonised to its records and TSSs checked against them.
        genome_partial: the genome holds only part of each chromosome (or only some chromosomes): genes outside
            it are kept and reported instead of being an error.

    Raises:
        InputError: missing/empty/truncated file, missing columns, bad strand or TSS, duplicate gene ids,
            chromosomes absent from the genome, a TSS outside its chromosome.
    """
    path = check_readable(path, "gene annotation")  # missing, a folder or empty: named before any reader opens it
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt in ("gtf", "gff3"):
        table = _read_gff(path, fmt)
    elif fmt == "bed":
        table = _read_bed(path)
    else:
        table = _read_named(path, fmt)
    return _validated(table, path, fmt, gene_types, genome, genome_partial)


def phenotype_bed_genes(coords: pa.Table, path: str | Path, *, genome: Genome | None = None,
                        genome_partial: bool = False) -> GeneTable:
    """The genes of a phenotype BED (:func:`geximpute.io.expression.read_expression`'s ``Expression.genes``).

    QTLtools writes each gene as a 1-bp interval at its TSS (``end`` is the TSS); for a longer interval the TSS is
    its 5' end on the strand, as in a BED6 annotation. Validated like :func:`read_genes`.

    Raises:
        InputError: the BED has no strand column (FastQTL's four-column layout), or any check of
            :func:`read_genes` fails.
    """
    path = Path(path)
    if coords["strand"].null_count == coords.num_rows:
        raise InputError(path, "phenotype BED has no strand column", record="the header",
                         expected="the QTLtools layout '#chr start end pid gid strand'",
                         hint="Give the genes' TSS and strand with inputs.genes (e.g. the GTF)")
    start = pc.add(coords["start0"], 1)  # BED is 0-based half-open
    table = pa.table({
        S.GENE_ID: coords["gene_id"],
        S.GENE_NAME: pa.nulls(coords.num_rows, pa.string()),
        S.GENE_TYPE: pa.nulls(coords.num_rows, pa.string()),
        S.CHROM: coords["chrom"],
        S.START: start,
        S.END: coords["end"],
        S.TSS: pc.if_else(pc.equal(coords["strand"], "-"), coords["end"], start),
        S.STRAND: coords["strand"],
    })
    return _validated(table, path, "phenotype-bed", (), genome, genome_partial)


def _first(bad: pa.ChunkedArray) -> int | None:
    """The row of the first True of a boolean column, or None."""
    return pc.index(bad, True).as_py() if pc.any(bad).as_py() else None


def _validated(table: pa.Table, path: Path, fmt: str, gene_types: tuple[str, ...], genome: Genome | None,
               genome_partial: bool) -> GeneTable:
    """Check and normalise a gene table read from ``path`` (see :func:`read_genes`)."""
    report: dict = {"format": fmt, "n_records": table.num_rows}

    # Nulls and bad values, reported with the first offending record.
    for name in (S.GENE_ID, S.CHROM, S.TSS, S.STRAND):
        if (i := _first(pc.is_null(table[name]))) is not None:
            raise InputError(path, f"no {name} (empty or '.')", record=_record(fmt, i, table),
                             expected=f"a {name} on every gene")
    if (i := _first(pc.invert(pc.is_in(table[S.STRAND], pa.array(["+", "-"]))))) is not None:
        raise InputError(path, f"strand {table[S.STRAND][i].as_py()!r}", record=_record(fmt, i, table),
                         expected="'+' or '-'")
    if (i := _first(pc.less(table[S.TSS], 1))) is not None:
        raise InputError(path, f"TSS {table[S.TSS][i].as_py()} is outside its chromosome",
                         record=_record(fmt, i, table), expected="a 1-based position >= 1")
    # where a record gives both ends: 1 <= start <= end (a swapped pair put the TSS at the wrong end, silently); a
    # BED's empty interval (start0 == end, as some QTL tools write a TSS) is one base past its end: allowed
    both = pc.and_(pc.is_valid(table[S.START]), pc.is_valid(table[S.END]))
    slack = 1 if fmt in ("bed", "phenotype-bed") else 0
    wrong = pc.and_(both, pc.or_(pc.less(table[S.START], 1),
                                 pc.greater(table[S.START], pc.add(table[S.END], slack))))
    if (i := _first(pc.fill_null(wrong, False))) is not None:
        raise InputError(path, f"start {table[S.START][i].as_py()} and end {table[S.END][i].as_py()}",
                         record=_record(fmt, i, table), expected="1 <= start <= end (1-based, inclusive)")

    if gene_types and pc.any(pc.is_valid(table[S.GENE_TYPE])).as_py():
        keep = pc.is_in(table[S.GENE_TYPE], pa.array(list(gene_types)))
        report["n_dropped_gene_type"] = table.num_rows - pc.sum(keep).as_py()
        if not pc.any(keep).as_py():  # a mistyped type kept nothing (the genome was blamed further on)
            present = pc.value_counts(table[S.GENE_TYPE].drop_null()).to_pylist()
            present.sort(key=lambda c: -c["counts"])
            common = ", ".join(f"{c['values']} ({c['counts']:,})" for c in present[:8])
            raise InputError(path, f"inputs.gene_types {list(gene_types)} keeps none of its {table.num_rows:,} genes",
                             expected=f"gene types the annotation has: {common}")
        table = table.filter(keep)

    raw = table[S.GENE_ID].to_pylist()
    ids = [strip_version(g) for g in raw]
    report["n_version_stripped"] = sum(a != b for a, b in zip(ids, raw, strict=True))
    table = table.set_column(0, S.GENE_ID, pa.array(ids, pa.string()))
    _check_unique(table, path, fmt, raw)

    chroms = pc.unique(table[S.CHROM]).to_pylist()
    mapping = harmonise_chroms(chroms, genome.chroms if genome is not None else None)
    report["renamed_chroms"] = renamed(mapping)
    if report["renamed_chroms"]:
        table = table.set_column(
            table.schema.get_field_index(S.CHROM),
            S.CHROM,
            pa.array([mapping[c] for c in table[S.CHROM].to_pylist()], pa.string()),
        )
    if genome is not None:
        report.update(_check_against_genome(table, path, fmt, genome, genome_partial))

    table = S.check_table(table, S.GENES, str(path))
    table = table.sort_by([(S.CHROM, "ascending"), (S.TSS, "ascending")])
    report["n_genes"] = table.num_rows
    report["n_chroms"] = len(pc.unique(table[S.CHROM]))
    return GeneTable(table=table, path=path, report=report)


def _check_unique(table: pa.Table, path: Path, fmt: str, raw: list[str] | None = None) -> None:
    """Refuse two records of one gene id (``raw``: the ids as written, before their version was stripped), naming
    each as written and its chromosome: one gene on two chromosomes, or two versions of it."""
    ids = np.asarray(table[S.GENE_ID].to_pylist(), dtype=object)
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        rows = np.flatnonzero(ids == dup[0])[:3]
        raw = raw if raw is not None else list(ids)
        where = ", ".join(f"{_record(fmt, int(i), table)} as {raw[i]!r} on {table[S.CHROM][int(i)].as_py()}"
                          for i in rows)
        raise InputError(
            path,
            f"{len(dup)} duplicate gene id(s), e.g. {dup[0]!r} ({', '.join(map(str, dup[1:4]))})".rstrip(" ()"),
            record=where,
            expected="one record per gene id (version suffixes are ignored when comparing)",
            hint="Remove the duplicates, or keep one gene type with inputs.gene_types",
        )


def _check_against_genome(table: pa.Table, path: Path, fmt: str, genome: Genome, partial: bool) -> dict:
    chrom = table[S.CHROM].to_pylist()
    tss = table[S.TSS].to_numpy()
    in_genome = np.array([c in genome for c in chrom])
    lengths = np.array([genome.lengths.get(c, 0) for c in chrom])
    if not in_genome.any():
        raise InputError(
            path,
            f"none of the annotation's chromosomes ({', '.join(sorted(set(chrom))[:6])}) is in the genome "
            f"{genome.path}",
            expected=f"chromosomes named as in the FASTA ({', '.join(genome.chroms[:6])})",
            hint="Check that the annotation and the FASTA are of the same genome",
        )
    if not in_genome.all() and not partial:
        i = int(np.flatnonzero(~in_genome)[0])
        absent = sorted({c for c, ok in zip(chrom, in_genome, strict=True) if not ok})
        raise InputError(
            path,
            f"chromosome(s) {', '.join(absent[:6])} absent from the genome {genome.path}",
            record=_record(fmt, i, table),
            expected=f"one of {', '.join(genome.chroms[:8])}",
            hint="Set inputs.genome_partial: true if the FASTA deliberately covers only part of the genome",
        )
    outside = in_genome & (tss > lengths)
    if outside.any() and not partial:
        i = int(np.flatnonzero(outside)[0])
        raise InputError(
            path,
            f"TSS {int(tss[i])} is outside its chromosome {chrom[i]} (length {int(lengths[i])} in {genome.path})",
            record=_record(fmt, i, table),
            expected="a TSS within the chromosome",
            hint="Check the genome build, or set inputs.genome_partial: true for a FASTA of chromosome pieces",
        )
    return {
        "n_on_genome_chroms": int(in_genome.sum()),
        "n_tss_in_genome": int((in_genome & ~outside).sum()),
    }


# Gene families from symbols ---------------------------------------------------------------------------------------

#: a gene symbol that names no family: an Ensembl id standing in for a missing symbol
_NO_FAMILY = re.compile(r"^ENS[A-Z]*G\d")
_FAMILY = re.compile(r"^([A-Z]+)(\d*)")


def gene_family_keys(names: np.ndarray | list) -> tuple[np.ndarray, np.ndarray]:
    """(coarse, fine) family keys of gene symbols: the leading letters (``SLC``, ``RPL``, ``ZNF``, ``OR``) and the
    letters with the number that follows them (``SLC25``, ``RPL10``, ``OR2``); None for a missing symbol, one that
    does not start with a letter, or an Ensembl id. HGNC names most gene families this way (paralogues share a
    stem), and a family's members share much of their expression (ribosomal proteins high everywhere, olfactory
    receptors off)."""
    coarse = np.full(len(names), None, dtype=object)
    fine = np.full(len(names), None, dtype=object)
    for i, name in enumerate(names):
        if not name:
            continue
        symbol = str(name).strip().upper()
        match = _FAMILY.match(symbol)
        if match is None or _NO_FAMILY.match(symbol):
            continue
        coarse[i], fine[i] = match.group(1), match.group(1) + match.group(2)
    return coarse, fine


def shared_families(names: np.ndarray | list) -> tuple[int, int]:
    """(genes in a shared family, shared families): the fine family keys (:func:`gene_family_keys`) that two genes or
    more of ``names`` have, and how many genes have one of them."""
    _, counts = np.unique([k for k in gene_family_keys(names)[1] if k is not None], return_counts=True)
    shared = counts[counts > 1]
    return int(shared.sum()), len(shared)

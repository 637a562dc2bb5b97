"""Readers on small hand-made files in every supported layout, checked value by value."""

from __future__ import annotations

import gzip
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geximpute import schema as S
from geximpute.config import ExpressionConfig
from geximpute.errors import InputError
from geximpute.io.chroms import harmonise_chroms
from geximpute.io.expression import move_rows_up, read_expression, size_factors, to_model_scale
from geximpute.io.fasta import Genome, reverse_complement
from geximpute.io.genes import read_genes
from geximpute.io.samples import read_samples

# chr1 = 40 bases with a soft-masked stretch at 11..20
CHR1 = "ACGTACGTAC" + "ggccttaagg" + "TTTTAAAACC" + "GGGGCCCCAT"
FASTA = ">chr1 test\n" + CHR1[:25] + "\n" + CHR1[25:] + "\n>chr2\n" + "A" * 30 + "\n"

GTF = """##description: toy
##format: gtf
chr1\tHAVANA\tgene\t5\t30\t.\t+\t.\tgene_id "ENSG01.3"; gene_type "protein_coding"; gene_name "AAA";
chr1\tHAVANA\ttranscript\t5\t30\t.\t+\t.\tgene_id "ENSG01.3"; transcript_id "T1"; gene_name "AAA";
chr1\tHAVANA\texon\t5\t30\t.\t+\t.\tgene_id "ENSG01.3"; transcript_id "T1"; exon_number 1;
chr1\tHAVANA\tgene\t12\t35\t.\t-\t.\tgene_id "ENSG02.1"; gene_type "lncRNA"; gene_name "BBB";
chr2\tHAVANA\tgene\t3\t9\t.\t-\t.\tgene_id "ENSG03"; gene_type "protein_coding"; gene_name "CCC";
"""


@pytest.fixture
def genome(write) -> Genome:
    return Genome(write("genome.fa", FASTA))


# FASTA ---------------------------------------------------------------------------------------------------------


def test_fetch_is_1_based_inclusive_and_keeps_soft_masking(genome):
    assert genome.lengths == {"chr1": 40, "chr2": 30}
    assert genome.fetch("chr1", 1, 4) == "ACGT"
    assert genome.fetch("chr1", 11, 14) == "ggcc"


def test_plus_strand_window(genome):
    w = genome.window("chr1", tss=5, strand="+", upstream=4, downstream=3)
    assert w.sequence == "ACGTACG" and w.padded == 0 and w.complete


def test_minus_strand_window_is_reverse_complemented(genome):
    # '-' gene with TSS 8: window covers 8-3+1=6 .. 8+4=12, read on the minus strand
    w = genome.window("chr1", tss=8, strand="-", upstream=4, downstream=3)
    assert w.sequence == reverse_complement(CHR1[5:12].upper())
    assert w.sequence == "CCGTACG"
    assert w.soft_masked == 2  # bases 11 and 12 are lower case


def test_window_off_the_record_is_padded_with_n_and_flagged(genome):
    start = genome.window("chr1", tss=2, strand="+", upstream=4, downstream=2)
    assert start.sequence == "NNN" + "ACG" and start.padded == 3 and not start.complete
    end = genome.window("chr1", tss=39, strand="+", upstream=1, downstream=5)
    assert end.sequence == "CATNNN" and end.padded == 3


def test_soft_masked_bases_upper_or_n(genome):
    upper = genome.window("chr1", tss=11, strand="+", upstream=0, downstream=4)
    n = genome.window("chr1", tss=11, strand="+", upstream=0, downstream=4, soft_mask="n")
    assert upper.sequence == "GGCC" and upper.soft_masked == 4
    assert n.sequence == "NNNN"


def test_bgzip_fasta_is_read(tmp_path, real_data):
    genome = Genome(real_data / "sequence" / "hg38_prefixes.fa.gz")
    assert genome.lengths["chr17"] == 7_843_138
    # TP53 TSS (GENCODE v45, minus strand) sits in the real chr17 piece
    assert len(genome.window("chr17", 7_687_538, "-", 1000, 500).sequence) == 1500


def test_plain_gzip_fasta_gets_a_clear_error(tmp_path):
    path = tmp_path / "genome.fa.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(FASTA)
    with pytest.raises(InputError, match=r"genome.fa.gz: .*plain gzip.*bgzip"):
        Genome(path)


def test_a_fasta_that_cannot_be_indexed_says_why_and_leaves_no_index(tmp_path):
    """A repeated record name and uneven line lengths were both called "a truncated copy?", and the index pyfaidx
    began was left beside the user's FASTA."""
    cases = {"dup.fa": (">chr1\nACGT\n>chr1\nGGCC\n", "each record name must be unique"),
             "ragged.fa": (">chr1\nACGTACGT\nACG\nACGTACGT\n", "each record's lines must have one length")}
    for name, (text, hint) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=rf"{name}: cannot be read as FASTA.*{hint}"):
            Genome(tmp_path / name)
        assert not (tmp_path / f"{name}.fai").exists()


# genes ---------------------------------------------------------------------------------------------------------


def test_an_index_older_than_its_fasta_is_rebuilt_or_warned_about(tmp_path, monkeypatch, caplog):
    """A FASTA edited after it was indexed: the old .fai's offsets would read the wrong bases without an error."""
    import os

    path = tmp_path / "g.fa"
    path.write_text(">a\nAAAACCCC\n>b\nGGGGTTTT\n")
    with Genome(path) as first:
        assert first.fetch("b", 1, 4) == "GGGG"
    path.write_text(">a\nAAAACCCCAAAACCCC\n>b\nTTTTGGGG\n")  # record a grew: b moved
    fai = tmp_path / "g.fa.fai"
    os.utime(fai, (path.stat().st_mtime - 60, path.stat().st_mtime - 60))
    monkeypatch.setattr("geximpute.io.fasta._writable", lambda _: False)
    with caplog.at_level("WARNING"), Genome(path) as unwritable:  # used as it is, with a warning naming both
        assert unwritable.lengths["a"] == 8
    assert "g.fa.fai is older than the FASTA and cannot be rebuilt" in caplog.text
    monkeypatch.undo()
    with Genome(path) as rebuilt:
        assert rebuilt.lengths["a"] == 16 and rebuilt.fetch("b", 1, 4) == "TTTT"
    assert fai.stat().st_mtime >= path.stat().st_mtime
    caplog.clear()
    with caplog.at_level("WARNING"), Genome(path):  # a fresh index: nothing to say
        pass
    assert "older than the FASTA" not in caplog.text


def test_gtf_genes_with_tss_from_strand_and_versions_stripped(write, genome):
    genes = read_genes(write("genes.gtf.gz", GTF), genome=genome)
    rows = {r["gene_id"]: r for r in genes.table.to_pylist()}
    assert set(rows) == {"ENSG01", "ENSG02", "ENSG03"}
    assert rows["ENSG01"]["tss"] == 5 and rows["ENSG01"]["strand"] == "+"
    assert rows["ENSG02"]["tss"] == 35 and rows["ENSG02"]["gene_type"] == "lncRNA"
    assert rows["ENSG03"]["tss"] == 9 and rows["ENSG03"]["gene_name"] == "CCC"
    assert genes.table.schema.equals(S.GENES)


def test_gene_types_filter(write):
    genes = read_genes(write("genes.gtf", GTF), gene_types=("protein_coding",))
    assert sorted(genes.table[S.GENE_ID].to_pylist()) == ["ENSG01", "ENSG03"]
    # a mistyped type keeps nothing: named, with the types the file has (the genome was blamed further on)
    with pytest.raises(InputError, match=r"genes2.gtf: inputs.gene_types \['protein_codin'\] keeps none of its .*"
                                         r"expected gene types the annotation has: protein_coding \(2\)"):
        read_genes(write("genes2.gtf", GTF), gene_types=("protein_codin",))


def test_gff3_genes(write):
    text = (
        "##gff-version 3\n"
        "1\tensembl\tgene\t100\t200\t.\t-\t.\tID=gene:ENSG07;Name=GGG;biotype=protein_coding\n"
        "1\tensembl\tmRNA\t100\t200\t.\t-\t.\tID=transcript:T7;Parent=gene:ENSG07\n"
        "###\n"
        "2\tensembl\tgene\t5\t50\t.\t+\t.\tID=ENSG08.2;gene_id=ENSG08.2;gene_name=HHH\n"
        # Ensembl types its non-coding genes and pseudogenes apart: genes all the same
        "2\tensembl\tncRNA_gene\t500\t900\t.\t-\t.\tID=gene:ENSG09;Name=LNC1;biotype=lncRNA\n"
        "2\tensembl\tpseudogene\t1000\t1200\t.\t+\t.\tID=gene:ENSG10;biotype=processed_pseudogene\n"
        "2\tensembl\tncRNA\t500\t900\t.\t-\t.\tID=transcript:T9;Parent=gene:ENSG09\n"
    )
    genes = read_genes(write("genes.gff3", text))
    rows = {r["gene_id"]: r for r in genes.table.to_pylist()}
    assert sorted(rows) == ["ENSG07", "ENSG08", "ENSG09", "ENSG10"]
    assert rows["ENSG09"]["tss"] == 900 and rows["ENSG10"]["gene_type"] == "processed_pseudogene"
    assert rows["ENSG07"]["tss"] == 200 and rows["ENSG07"]["chrom"] == "chr1"
    assert rows["ENSG07"]["gene_name"] == "GGG" and rows["ENSG07"]["gene_type"] == "protein_coding"
    assert rows["ENSG08"]["tss"] == 5 and rows["ENSG08"]["gene_name"] == "HHH"
    assert genes.report["renamed_chroms"] == {"1": "chr1", "2": "chr2"}
    # a GFF3 may end in a `##FASTA` section of its sequences (Prokka's do): sequence, not malformed features
    with_fasta = read_genes(write("fasta.gff3", text + "##FASTA\n>1 chromosome\nACGTNNacgt\nACGT\n>2\nGGCC\n"))
    assert with_fasta.table.equals(genes.table)


def test_text_tables_are_gzip_by_their_bytes_and_not_utf8_is_named(write, tmp_path):
    """Arrow decides gzip by a case-sensitive name: a plain file named .gz failed as a bare zlib error without the
    file's name, and a gzip file named .GZ was parsed as text (binary junk as rows). A Latin-1 header (a
    spreadsheet's export) escaped as a UnicodeDecodeError traceback."""
    import gzip

    samples = "sample_id\tdonor_id\ttissue\nS1\tD1\tLiver\nS2\tD1\tLung\n"
    expected = read_samples(write("s.tsv", samples)).to_pylist()
    (tmp_path / "plain.tsv.gz").write_text(samples)  # decompressed by a browser, name kept
    assert read_samples(tmp_path / "plain.tsv.gz").to_pylist() == expected
    (tmp_path / "UPPER.TSV.GZ").write_bytes(gzip.compress(samples.encode()))
    assert read_samples(tmp_path / "UPPER.TSV.GZ").to_pylist() == expected
    gtf = '1\tsrc\tgene\t10\t20\t.\t+\t.\tgene_id "G1"; gene_name "M\xfcller";\n'
    (tmp_path / "latin1.gtf").write_bytes(gtf.encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.gtf"):
        read_genes(tmp_path / "latin1.gtf")
    (tmp_path / "latin1.tsv").write_bytes("sample_id\tdonor_id\ttissue\tdescripci\xf3n\nS1\tD1\tLiver\tx\n"
                                          .encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.tsv: sample table is not UTF-8 text"):
        read_samples(tmp_path / "latin1.tsv")
    # other compressions Arrow knows by the name are read as before (bz2)
    import bz2

    (tmp_path / "s.tsv.bz2").write_bytes(bz2.compress(samples.encode()))
    assert read_samples(tmp_path / "s.tsv.bz2").to_pylist() == expected


def test_sequence_lines_are_skipped_only_in_a_gff3_with_a_fasta_section(write, tmp_path):
    """A GTF (or a GFF3 without `##FASTA`) cut short after a seqid of letters (`X`, `MT`) is an error, not the genes
    read so far; comment lines ending in a bare carriage return are counted as Arrow reads them."""
    gtf = '1\tsrc\tgene\t10\t20\t.\t+\t.\tgene_id "G1";\nX'
    with pytest.raises(InputError, match=r"cut.gtf: gene annotation cannot be parsed: a row has 1 fields; at line 2"):
        read_genes(write("cut.gtf", gtf))
    gff = "##gff-version 3\n1\tsrc\tgene\t10\t20\t.\t+\t.\tID=G1\nMT"
    with pytest.raises(InputError, match=r"cut.gff3: gene annotation cannot be parsed.*no ##FASTA section"):
        read_genes(write("cut.gff3", gff))
    bed = "#c1\r#c2\rchr1\t100\t200\tG1\t0\t+\rchr1\t300\t400\tG2\t0\t-\r"
    (tmp_path / "cr.bed").write_bytes(bed.encode())
    assert read_genes(tmp_path / "cr.bed").table.num_rows == 2


def test_a_gene_annotation_that_is_not_a_file_is_named(tmp_path):
    for path in (tmp_path / "absent.gtf", tmp_path):
        with pytest.raises(InputError, match="gene annotation") as err:
            read_genes(path)
        assert str(path) in str(err.value)


def test_gtf_and_gff3_read_a_few_lines_at_a_time(write, monkeypatch):
    """Blocks of two lines: the gene records (and a GTF gene known only by its transcripts, whose lines fall in
    two blocks) and a GFF3 with directive lines between blocks give the tables of one block."""
    from geximpute.io import tables

    gtf = GTF + ("chr2\tHAVANA\ttranscript\t20\t28\t.\t+\t.\tgene_id \"ENSG04\"; gene_name \"DDD\";\n"
                 "chr2\tHAVANA\texon\t20\t22\t.\t+\t.\tgene_id \"ENSG04\"; transcript_id \"T4\";\n"
                 "chr2\tHAVANA\ttranscript\t12\t25\t.\t+\t.\tgene_id \"ENSG04\"; gene_name \"DDD\";\n")
    gff = ("##gff-version 3\n" + "".join(
        f"1\tensembl\tgene\t{100 * g}\t{100 * g + 50}\t.\t+\t.\tID=gene:ENSG{g:02d};Name=G{g}\n###\n"
        for g in range(1, 6)))
    whole = [read_genes(write("a.gtf", gtf)).table, read_genes(write("a.gff3", gff)).table]
    monkeypatch.setattr(tables, "MIN_BLOCK_BYTES", 64)
    monkeypatch.setattr(tables, "BLOCK_ROWS", 2)
    assert len(list(tables.csv_batches(write("b.gtf", gtf), "t", lambda _: {}, column_names=list("abcdefghi"),
                                       quoting=False, skip_rows=2)[2])) > 3
    blocks = [read_genes(write("b.gtf", gtf)).table, read_genes(write("b.gff3", gff)).table]
    for one, many in zip(whole, blocks, strict=True):
        assert one.equals(many)
    rows = {r["gene_id"]: r for r in blocks[0].to_pylist()}
    assert rows["ENSG04"]["start"] == 12 and rows["ENSG04"]["end"] == 28 and rows["ENSG04"]["gene_name"] == "DDD"
    assert blocks[1].num_rows == 5


def test_bed6_is_zero_based(write):
    genes = read_genes(write("genes.bed", "chr1\t9\t20\tENSG01\t0\t+\nchr1\t29\t40\tENSG02\t0\t-\n"))
    rows = {r["gene_id"]: r["tss"] for r in genes.table.to_pylist()}
    assert rows == {"ENSG01": 10, "ENSG02": 40}


def test_named_tsv_and_csv(write):
    tsv = read_genes(write("genes.tsv", "gene_id\tchrom\ttss\tstrand\nENSG01.1\t17\t100\t+\n"))
    assert tsv.table.to_pylist()[0] | {} == {
        "gene_id": "ENSG01",
        "gene_name": None,
        "gene_type": None,
        "chrom": "chr17",
        "start": None,
        "end": None,
        "tss": 100,
        "strand": "+",
    }
    assert tsv.report["renamed_chroms"] == {"17": "chr17"}
    csv = read_genes(write("genes.csv", "gene,chromosome,start,end,strand\nENSG05,chr3,10,90,-\n"))
    assert csv.table.to_pylist()[0]["tss"] == 90


def test_chrom_names_follow_the_genome(genome):
    assert harmonise_chroms(["1", "chr2", "MT"], ["chr1", "chr2", "chrM"]) == {
        "1": "chr1",
        "chr2": "chr2",
        "MT": "chrM",
    }
    assert harmonise_chroms(["chr1", "X"], ["1", "X"]) == {"chr1": "1", "X": "X"}


# expression ----------------------------------------------------------------------------------------------------

GCT = "#1.2\n999\t999\nName\tDescription\tS1\tS2\tS3\nENSG01.5\tAAA\t1.5\t\t3\nENSG02.1\tBBB\t0\t2\tNA\n"


def test_gct_ignores_its_dimension_line_and_reads_blanks_as_missing(write):
    expr = read_expression(write("expr.gct.gz", GCT))
    assert expr.gene_ids == ["ENSG01", "ENSG02"] and expr.sample_ids == ["S1", "S2", "S3"]
    assert expr.values[0, 0] == 1.5 and math.isnan(expr.values[0, 1]) and math.isnan(expr.values[1, 2])
    assert expr.report["gct_declared_shape"] == (999, 999)
    assert expr.report["gct_dimension_line_matches"] is False
    assert expr.report["n_measured"] == 4
    assert expr.gene_names == ["AAA", "BBB"]  # the Description column: gene symbols


def test_a_gct_description_of_numbers_is_no_sample(write):
    """A GCT's second column is its Description by the format, whatever its values (Entrez ids read as numbers)
    or its heading; GenePattern heads the first column `NAME`. A numeric annotation named as one is no sample in a
    wide table either."""
    numbers = read_expression(write("entrez.gct", "#1.2\n2\t2\nNAME\tDescription\tS1\tS2\nENSG1.1\t7157\t1\t2\n"
                                                  "ENSG2.3\t672\t3\t4\n"))
    assert numbers.sample_ids == ["S1", "S2"]
    np.testing.assert_allclose(numbers.values, [[1, 2], [3, 4]])
    headed = read_expression(write("other.gct", "#1.2\n1\t2\nName\tEntrez\tS1\tS2\nENSG1\t7157\t1\t2\n"))
    assert headed.sample_ids == ["S1", "S2"]
    wide = read_expression(write("wide.tsv", "gene_id\tsymbol\tLiver\nENSG1\t1\t5\nENSG2\t2\t6\n"))
    assert wide.sample_ids == ["Liver"] and wide.gene_names == ["1", "2"]
    # a bad value found by the whole-table read names its own cell there too (it named column 2's first value)
    rows = "".join(f"ENSG{i}\tGENE{i}\t1\t{'abc' if i == 5 else 2}\n" for i in range(8))
    with pytest.raises(InputError, match=r"'abc' in column 'S2'; at line 9 \(gene ENSG5\)"):
        read_expression(write("bad.gct", "#1.2\n8\t2\nName\tGene\tS1\tS2\n" + rows))


def test_only_ensembl_ids_lose_their_version(write):
    """GENCODE's clone-based names differ after their dot: two genes, never one gene merged from both."""
    long = read_expression(write("long.tsv", "gene_id\tsample_id\tvalue\nRP11-34P13.7\tS1\t5\n"
                                             "RP11-34P13.8\tS1\t900\nENSG01.2\tS1\t1\n"))
    assert sorted(long.gene_ids) == ["ENSG01", "RP11-34P13.7", "RP11-34P13.8"]
    wide = read_expression(write("wide.tsv", "gene_id\tLiver\nRP11-34P13.7\t5\nRP11-34P13.8\t900\n"
                                             "ENSG00000141510.17_PAR_Y\t1\n"))
    assert wide.gene_ids == ["RP11-34P13.7", "RP11-34P13.8", "ENSG00000141510_PAR_Y"]


def test_wide_table_with_gene_name_column(write):
    expr = read_expression(write("medians.tsv", "gene_id\tgene_name\tLiver\tLung\nENSG01\tAAA\t10\t0.5\n"
                                                "ENSG02\t\t1\t2\n"))
    assert expr.sample_ids == ["Liver", "Lung"]
    assert expr.gene_names == ["AAA", None]
    assert read_expression(write("plain.tsv", "gene_id\tLiver\nENSG01\t1\n")).gene_names is None
    np.testing.assert_allclose(expr.values, [[10, 0.5], [1, 2]])


def test_long_tsv_and_parquet_give_the_same_matrix(write, tmp_path):
    text = "gene_id\tsample_id\tvalue\nENSG01\tS1\t1\nENSG01\tS2\t2\nENSG02\tS2\t5\n"
    tsv = read_expression(write("long.tsv", text))
    pq.write_table(
        pa.table({"gene_id": ["ENSG01", "ENSG01", "ENSG02"], "sample_id": ["S1", "S2", "S2"], "value": [1.0, 2, 5]}),
        tmp_path / "long.parquet",
    )
    par = read_expression(tmp_path / "long.parquet")
    for expr in (tsv, par):
        assert expr.gene_ids == ["ENSG01", "ENSG02"] and expr.sample_ids == ["S1", "S2"]
        np.testing.assert_array_equal(expr.values, np.array([[1, 2], [np.nan, 5]], dtype=np.float32))
    long = tsv.to_long()
    assert long.schema.equals(S.EXPRESSION_LONG) and long.num_rows == 3


def _wide_text(rng: np.random.Generator, n_genes: int, n_samples: int) -> tuple[str, np.ndarray]:
    values = np.round(rng.gamma(0.5, 20.0, size=(n_genes, n_samples)), 2).astype(np.float32)
    values[rng.random(values.shape) < 0.3] = np.nan
    cells = [["" if np.isnan(v) else f"{v:g}" for v in row] for row in values]
    lines = [f"ENSG{g:05d}.{g % 3}\tG{g}\t" + "\t".join(row) for g, row in enumerate(cells)]
    header = "Name\tDescription\t" + "\t".join(f"S{j}" for j in range(n_samples))
    return f"#1.2\n{n_genes}\t{n_samples}\n{header}\n" + "\n".join(lines) + "\n", values


def test_wide_files_read_a_block_at_a_time_equal_the_whole_read(write, monkeypatch):
    """Blocks of a few lines each: the matrix, ids, symbols and counts are the whole read's (the same file read
    whole by the fallback path), and a value in a later block is checked and named by its own line."""
    from geximpute.io import expression as E
    from geximpute.io import tables

    monkeypatch.setattr(tables, "MIN_BLOCK_BYTES", 64)
    monkeypatch.setattr(tables, "BLOCK_ROWS", 3)
    text, values = _wide_text(np.random.default_rng(0), 50, 7)
    path = write("expr.gct.gz", text)
    blocks = tables.csv_batches(path, "test", lambda schema: {n: pa.string() for n in schema.names}, skip_rows=2)
    assert blocks[1] == 53 and len(list(blocks[2])) > 5  # lines of the file; many batches
    streamed = read_expression(path)
    whole = E._whole_wide("GCT expression file", 2, "\t", 4)(path, "tpm")
    np.testing.assert_array_equal(streamed.values, values)
    np.testing.assert_array_equal(streamed.values, whole.values)
    assert streamed.gene_ids == whole.gene_ids == [f"ENSG{g:05d}" for g in range(50)]
    assert streamed.gene_names == whole.gene_names == [f"G{g}" for g in range(50)]
    assert streamed.report["n_measured"] == int((~np.isnan(values)).sum())
    lines = text.splitlines()
    for bad, message in (("inf", r"infinite expression value inf.*gene ENSG00037, sample S0 \(line 41\)"),
                         # a value that does not convert: read whole, which names the line
                         ("abc", r"non-numeric expression value 'abc' in column 'S0'.*line 41")):
        fields = lines[40].split("\t")  # gene 37, on line 41
        fields[2] = bad
        changed = [*lines[:40], "\t".join(fields), *lines[41:]]
        with pytest.raises(InputError, match=message):
            read_expression(write(f"{bad}.gct", "\n".join(changed) + "\n"))


def test_wide_parquet_matrices(tmp_path, monkeypatch):
    """A genes x samples Parquet (as pandas writes a DataFrame with the gene ids as its index, or with a gene_id
    and a symbol column), read a row group at a time; a Parquet with a sample column stays a long table."""
    import pandas as pd

    from geximpute.io import expression as E

    monkeypatch.setattr(E, "LONG_BATCH_ROWS", 3)
    values = np.array([[1.5, np.nan, 3], [0, 2, np.nan], [7, 8, 9], [4, np.nan, 1], [5, 5, 5]], np.float32)
    frame = pd.DataFrame(values, columns=["S1", "S2", "S3"], index=[f"ENSG0{g}.2" for g in range(5)])
    frame.to_parquet(tmp_path / "index.parquet", row_group_size=2)
    named = frame.reset_index(names="gene_id").assign(gene_name=list("ABCD") + [None])
    named["S3"] = named["S3"].astype("Int64")  # an integer column with a missing value
    named.to_parquet(tmp_path / "named.parquet", row_group_size=2)
    for name in ("index.parquet", "named.parquet"):
        expr = read_expression(tmp_path / name)
        assert expr.report["format"] == "wide" and expr.sample_ids == ["S1", "S2", "S3"]
        assert expr.gene_ids == [f"ENSG0{g}" for g in range(5)]
        np.testing.assert_array_equal(expr.values, values)
        assert expr.report["n_measured"] == 12
    assert read_expression(tmp_path / "named.parquet").gene_names == ["A", "B", "C", "D", None]
    frame.assign(S2=["x"] * 5).to_parquet(tmp_path / "text.parquet")
    with pytest.raises(InputError, match="column 'S2' holds (large_)?string values"):
        read_expression(tmp_path / "text.parquet")
    frame.assign(S1=[1.0, -2, 0, 0, 0]).to_parquet(tmp_path / "negative.parquet")
    with pytest.raises(InputError, match=r"negative expression value -2.*gene ENSG01, sample S1"):
        read_expression(tmp_path / "negative.parquet")
    frame.set_axis([f"ENSG0{g % 3}" for g in range(5)]).to_parquet(tmp_path / "twice.parquet")
    with pytest.raises(InputError, match=r"duplicate gene id.*'ENSG00'.*rows 1, 4"):
        read_expression(tmp_path / "twice.parquet")
    long = pa.table({"gene": ["ENSG01"], "sample": ["S1"], "tpm": [1.0]})
    pq.write_table(long, tmp_path / "long.parquet")
    assert read_expression(tmp_path / "long.parquet").report["format"] == "long"
    # the same columns in a text table are long too (only sample_id and value were, before: read as wide, the
    # sample ids failed as non-numeric values)
    (tmp_path / "long.tsv").write_text("gene_id\tsample\ttpm\nENSG01\tS1\t1\nENSG01\tS2\t2\n")
    text = read_expression(tmp_path / "long.tsv")
    assert text.report["format"] == "long" and text.sample_ids == ["S1", "S2"]
    # a comma-separated table named neither .csv nor .tsv (DataFrame.to_csv("expression.txt")) is read by its
    # first line: before, it was read as tab-separated, one column, and failed with "no value columns"
    (tmp_path / "wide.txt").write_text("gene_id,S1,S2\nENSG01,1,2\nENSG02,3,4\n")
    wide = read_expression(tmp_path / "wide.txt")
    assert wide.sample_ids == ["S1", "S2"] and wide.values.tolist() == [[1, 2], [3, 4]]
    (tmp_path / "long.txt").write_text("gene_id,sample,tpm\nENSG01,S1,1\nENSG01,S2,2\n")
    assert read_expression(tmp_path / "long.txt").report["format"] == "long"
    # a tab-separated table whose values hold commas stays tab-separated; a .tsv is never sniffed
    (tmp_path / "names.txt").write_text("gene_id\tS1,a\nENSG01\t1\n")
    assert read_expression(tmp_path / "names.txt").sample_ids == ["S1,a"]


def test_phenotype_bed_read_a_block_at_a_time(write, monkeypatch):
    from geximpute.io import tables

    monkeypatch.setattr(tables, "MIN_BLOCK_BYTES", 64)
    monkeypatch.setattr(tables, "BLOCK_ROWS", 2)
    rows = [f"chr22\t{100 * g}\t{100 * g + 1}\tENSG{g:05d}\tENSG{g:05d}\t{'+-'[g % 2]}\t{g}\t{-g / 2}"
            for g in range(9)]
    expr = read_expression(write("pheno.bed", "#chr\tstart\tend\tpid\tgid\tstrand\tP1\tP2\n" + "\n".join(rows)),
                           scale="normalised")
    np.testing.assert_array_equal(expr.values, np.array([[g, -g / 2] for g in range(9)], np.float32))
    assert expr.sample_ids == ["P1", "P2"] and expr.genes.num_rows == 9
    assert expr.genes["start0"].to_pylist() == [100 * g for g in range(9)]
    assert expr.genes["strand"].to_pylist() == ["+-"[g % 2] for g in range(9)]


def test_long_tables_read_in_batches_equal_the_whole_read(write, tmp_path, monkeypatch):
    """Long Parquet and TSV tables in batches of a few rows: the ids (versions stripped, sorted) and the matrix are
    the whole read's; a cell given twice in two batches, an empty id and a text value are named by the whole read."""
    from geximpute.io import expression as E
    from geximpute.io import tables

    monkeypatch.setattr(E, "LONG_BATCH_ROWS", 7)
    monkeypatch.setattr(E, "LONG_BLOCK_LINES", 5)
    monkeypatch.setattr(tables, "MIN_BLOCK_BYTES", 64)
    rng = np.random.default_rng(2)
    genes, samples = np.nonzero(rng.random((12, 9)) < 0.6)
    order = rng.permutation(len(genes))
    table = pa.table({"gene_id": [f"ENSG{g:03d}.{g % 3}" for g in genes[order]],
                      "sample_id": [f"S{s}" for s in samples[order]],
                      "value": np.round(rng.gamma(0.5, 20, len(genes)), 3)})
    pq.write_table(table, tmp_path / "long.parquet", row_group_size=10)
    rows = ["\t".join(map(str, r.values())) for r in table.to_pylist()]
    tsv = write("long.tsv", "gene_id\tsample_id\tvalue\n" + "\n".join(rows) + "\n")
    expected = np.full((len(set(genes)), len(set(samples))), np.nan, np.float32)
    expected[genes[order], samples[order]] = table["value"].to_numpy()
    for path in (tmp_path / "long.parquet", tsv):
        streamed, whole = read_expression(path), E._read_long_whole(path, "tpm")
        assert streamed.gene_ids == whole.gene_ids == [f"ENSG{g:03d}" for g in sorted(set(genes))]
        assert streamed.sample_ids == whole.sample_ids
        np.testing.assert_array_equal(streamed.values, whole.values)
        np.testing.assert_array_equal(streamed.values, expected[:, np.argsort([f"S{s}" for s in range(9)])])
    twice = write("twice.tsv", "gene_id\tsample_id\tvalue\n" + "\n".join([*rows, rows[0]]) + "\n")
    with pytest.raises(InputError, match=rf"appears more than once.*rows 1, {len(rows) + 1}"):
        read_expression(twice)
    empty = write("empty.tsv", "gene_id\tsample_id\tvalue\n" + "\n".join([*rows[:20], "ENSG001\t\t1"]) + "\n")
    with pytest.raises(InputError, match="empty sample_id.*row 21"):
        read_expression(empty)
    text = write("text.tsv", "gene_id\tsample_id\tvalue\n" + "\n".join([*rows[:20], "ENSG001\tS99\tabc"]) + "\n")
    with pytest.raises(InputError, match="non-numeric expression value 'abc'"):
        read_expression(text)
    # a column the reader does not use, empty in the first block and text later: still read a block at a time
    noted = write("noted.tsv", "gene_id\tsample_id\tvalue\tnote\n" + "\n".join(
        f"{r}\t{'' if i < 20 else 'checked'}" for i, r in enumerate(rows)) + "\n")
    monkeypatch.setattr(E, "_read_long_whole", lambda *_: pytest.fail("a valid table read whole"))
    np.testing.assert_array_equal(read_expression(noted).values, read_expression(tsv).values)


def test_hidden_entries_drawn_in_passes_are_the_measured_cells_numpy_draws(monkeypatch):
    """The entries task hides the measured cells a draw among their positions picks (the mask every evaluation
    figure was made with); found in passes of a few cells, without an index of every measured cell."""
    from geximpute.config import EvaluationConfig
    from geximpute.science import problem as P

    observed = np.random.default_rng(0).random((37, 23)) < 0.6
    task = EvaluationConfig(task="entries", fraction=0.1, seed=5)
    reference = np.zeros(observed.shape, bool)
    positions = np.flatnonzero(observed.ravel())
    reference.ravel()[np.random.default_rng(5).choice(positions, size=round(0.1 * len(positions)),
                                                      replace=False)] = True
    np.testing.assert_array_equal(P.hide(observed, task), reference)
    monkeypatch.setattr(P, "HIDE_CELLS", 10)
    np.testing.assert_array_equal(P.hide(observed, task), reference)
    np.testing.assert_array_equal(P.hide(np.asfortranarray(observed), task), reference)


@pytest.mark.parametrize("method", ["cpm", "median_ratio"])
def test_size_factors_in_passes_equal_one_pass(monkeypatch, method):
    """Each sample's factor is its own column's and each gene's reference its own row's: passes of a few cells
    give the factors of one pass to the bit, hidden (not visible) entries and unmeasured ones included."""
    from geximpute.io import expression as E

    rng = np.random.default_rng(3)
    counts = rng.poisson(rng.gamma(0.5, 50, size=(40, 1)), size=(40, 30)).astype(np.float32)
    counts[rng.random(counts.shape) < 0.3] = np.nan
    visible = rng.random(counts.shape) < 0.8
    visible[:, 0] = False  # a hidden sample
    one = [size_factors(counts, method, v) for v in (None, visible)]
    monkeypatch.setattr(E, "FACTOR_CELLS", 50)
    passes = [size_factors(counts, method, v) for v in (None, visible)]
    for a, b in zip(one, passes, strict=True):
        np.testing.assert_array_equal(a, b)
    counts[~visible] *= 7  # a hidden count moves no factor (but the hidden sample's own: it is scaled by them)
    np.testing.assert_array_equal(size_factors(counts, method, visible)[1:], passes[1][1:])


def test_counts_are_normalised_per_sample_then_log1p(write):
    expr = read_expression(write("counts.tsv", "gene_id\tA\tB\ng1\t10\t20\ng2\t30\t60\n"), scale="counts")
    cpm = to_model_scale(expr, ExpressionConfig(counts_normalisation="cpm"))
    # B is A sequenced twice as deep: the same profile after normalisation
    np.testing.assert_allclose(cpm[:, 0], cpm[:, 1], rtol=1e-6)
    np.testing.assert_allclose(cpm[:, 0], np.log1p([0.25e6, 0.75e6]), rtol=1e-6)
    ratio = size_factors(expr.values, "median_ratio")
    assert ratio[1] / ratio[0] == pytest.approx(2.0)


@pytest.mark.parametrize("keep", ["all", "reversed", "some", "none", "in_order"])
def test_rows_moved_up_in_place(keep):
    rng = np.random.default_rng(5)
    matrix = rng.random((41, 7)).astype(np.float32)
    rows = {"all": rng.permutation(41), "reversed": np.arange(41)[::-1], "some": rng.permutation(41)[:17],
            "none": np.zeros(0, np.int64), "in_order": np.arange(0, 41, 3)}[keep]
    expected = matrix[rows].copy()
    before = sorted(map(tuple, matrix))
    move_rows_up(matrix, rows)
    np.testing.assert_array_equal(matrix[: len(rows)], expected)
    assert sorted(map(tuple, matrix)) == before  # every row still there: a permutation, nothing overwritten


@pytest.mark.parametrize("method", ["cpm", "median_ratio"])
def test_model_scale_in_place_takes_the_matrix_over(write, method):
    """In place, the reader's matrix itself is scaled and shrunk to the rows kept (no second matrix), and the
    values are the copy's to the bit, the factors still read from every row."""
    rng = np.random.default_rng(2)
    counts = rng.poisson(30, size=(12, 5))
    lines = "gene_id\t" + "\t".join(f"s{j}" for j in range(5)) + "\n"
    lines += "".join(f"g{i}\t" + "\t".join(map(str, row)) + "\n" for i, row in enumerate(counts))
    path = write("counts.tsv", lines)
    config = ExpressionConfig(counts_normalisation=method)
    rows = np.array([7, 2, 11, 0, 5])
    for kept in (rows, None):
        copied = to_model_scale(read_expression(path, scale="counts"), config, rows=kept)
        expr = read_expression(path, scale="counts")
        matrix_id = id(expr.values)
        taken = to_model_scale(expr, config, rows=kept, in_place=True)
        np.testing.assert_array_equal(taken, copied)
        assert expr.values is None
        # the reader's matrix object, owning a buffer of just the rows kept
        assert id(taken) == matrix_id and taken.flags.owndata and taken.shape == copied.shape


@pytest.mark.parametrize("method", ["cpm", "median_ratio"])
def test_model_scale_of_a_matrix_file_equals_memory(write, method, tmp_path):
    """Read into a matrix file (each block written as it is converted), moved, shrunk and scaled there a pass of
    rows at a time: the in-memory values to the bit, the file truncated to the rows kept."""
    from geximpute.io import matrixfile

    rng = np.random.default_rng(3)
    counts = rng.poisson(30, size=(40, 6)).astype(float)
    counts[rng.random(counts.shape) < 0.2] = np.nan
    lines = "gene_id\t" + "\t".join(f"s{j}" for j in range(6)) + "\n"
    lines += "".join(f"g{i}\t" + "\t".join("" if np.isnan(v) else str(int(v)) for v in row) + "\n"
                     for i, row in enumerate(counts))
    path = write("counts.tsv", lines)
    config = ExpressionConfig(counts_normalisation=method)
    rows = rng.permutation(40)[:29]
    in_memory = to_model_scale(read_expression(path, scale="counts"), config, rows=rows)
    expr = read_expression(path, scale="counts", matrix=tmp_path / "m.f32")
    assert isinstance(expr.values, matrixfile.MatrixFile) and expr.values.shape == (40, 6)
    with pytest.raises(TypeError, match="not read implicitly"):
        np.isnan(expr.values)
    old = matrixfile.PASS_CELLS
    matrixfile.PASS_CELLS = 6 * 4  # passes of four rows
    try:
        taken = to_model_scale(expr, config, rows=rows, in_place=True)
    finally:
        matrixfile.PASS_CELLS = old
    assert expr.values is None and isinstance(taken, matrixfile.MatrixFile)
    np.testing.assert_array_equal(taken.read(), in_memory)
    assert (tmp_path / "m.f32").stat().st_size == 29 * 6 * 4


@pytest.mark.parametrize("name", ["expr.gct", "expr.parquet", "long.tsv"])
def test_every_layout_read_into_a_matrix_file(write, tmp_path, name):
    values = np.array([[1.5, np.nan, 3.0], [0.0, 2.0, np.nan]])
    if name.endswith(".gct"):
        text = "#1.2\n2\t3\nName\tDescription\ts1\ts2\ts3\n"
        text += "".join(f"g{i}\tG{i}\t" + "\t".join("" if np.isnan(v) else str(v) for v in row) + "\n"
                        for i, row in enumerate(values))
        path = write(name, text)
    elif name.endswith(".parquet"):
        path = tmp_path / name
        pq.write_table(pa.table({"gene_id": ["g0", "g1"], **{f"s{j + 1}": values[:, j] for j in range(3)}}), path)
    else:
        text = "gene_id\tsample_id\tvalue\n" + "".join(
            f"g{i}\ts{j + 1}\t{values[i, j]}\n" for i in range(2) for j in range(3) if not np.isnan(values[i, j]))
        path = write(name, text)
    memory = read_expression(path)
    on_disk = read_expression(path, matrix=tmp_path / "m.f32")
    assert on_disk.gene_ids == memory.gene_ids and on_disk.sample_ids == memory.sample_ids
    assert on_disk.report == memory.report
    np.testing.assert_array_equal(on_disk.values.read(), memory.values)


def test_matrix_file_reads_like_an_array(tmp_path):
    import pickle

    from geximpute.io.matrixfile import MatrixFile, append_columns, count_measured, update_rows

    rng = np.random.default_rng(0)
    a = rng.normal(size=(37, 11)).astype(np.float32)
    a[a > 1] = np.nan
    m = MatrixFile.from_array(tmp_path / "m", a)
    np.testing.assert_array_equal(m[3:9], a[3:9])
    np.testing.assert_array_equal(m[-1], a[-1])
    np.testing.assert_array_equal(m[[7, 2, 3, 30]], a[[7, 2, 3, 30]])
    np.testing.assert_array_equal(m[:, 2:5], a[:, 2:5])
    np.testing.assert_array_equal(m[:, ::-1], a[:, ::-1])
    np.testing.assert_array_equal(m[:, 9:1:-3], a[:, 9:1:-3])
    np.testing.assert_array_equal(m[4:10, [1, 3]], a[4:10][:, [1, 3]])
    # one column (build_context's per-sample read) is read as one, not the whole matrix first
    read_whole = []
    m_read = m._read
    m._read = lambda lo, hi: read_whole.append((lo, hi)) or m_read(lo, hi)
    np.testing.assert_array_equal(m[:, 4], a[:, 4])
    np.testing.assert_array_equal(m[:, -1], a[:, -1])
    assert read_whole == []
    del m._read
    gi, si = np.array([3, 3, 9, 0]), np.array([1, 2, 3, 4])
    np.testing.assert_array_equal(m[gi, si], a[gi, si])
    window = pickle.loads(pickle.dumps(m.window(10, 20)))  # what a task gets: the path and the offsets
    np.testing.assert_array_equal(window.read(), a[10:20])
    np.testing.assert_array_equal(window[:, 1:3], a[10:20, 1:3])
    with pytest.raises(ValueError, match="cannot be resized"):
        window.resize((5, 11))
    assert count_measured(m) == np.count_nonzero(~np.isnan(a))
    m[2:4] = np.zeros((2, 11))
    a[2:4] = 0
    update_rows(m, lambda b: np.multiply(b, 2, out=b), cells=30)
    np.testing.assert_array_equal(m.read(), a * 2)
    extra = rng.normal(size=(37, 2)).astype(np.float32)
    wider = append_columns(m, extra, tmp_path / "wider", cells=40)  # passes of three rows
    np.testing.assert_array_equal(wider.read(), np.concatenate([a * 2, extra], axis=1))
    m.resize((5, 11))
    assert m.read().shape == (5, 11) and (tmp_path / "m").stat().st_size == 5 * 11 * 4
    with pytest.raises(IndexError):
        m[5]


def test_a_failed_write_to_a_matrix_file_is_an_error_naming_it(tmp_path, monkeypatch):
    """A write that the file system refuses (a full disk; `/dev/full` refuses every byte) is an OSError with its
    errno and the file's name, whatever its size: not rows dropped without a word (numpy's `tofile` did not report
    a failure at close, and small writes end there) and read back as zeros. Reading a store into such a file says
    so too, not that the store is damaged."""
    import errno

    from geximpute.io.matrixfile import MatrixFile
    from geximpute.io.store import read_store

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    full = MatrixFile("/dev/full", (4, 100))
    for block in (np.ones((1, 100), np.float32), np.ones((4, 100), np.float32)):  # 400 bytes, 1,600 bytes
        with pytest.raises(OSError) as caught:
            full[: len(block)] = block
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == "/dev/full"
    with pytest.raises(OSError) as caught:
        MatrixFile.from_array("/dev/full", np.ones((3, 3), np.float32))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == "/dev/full"

    import geximpute.io.store as store_module

    class FullDisk(MatrixFile):  # the run's matrix on a file system that fills up once the reading starts
        @classmethod
        def create(cls, path, shape, dtype=np.float32, *, need=None):
            return cls("/dev/full", shape, dtype)

    store = _ingested_store(tmp_path)
    monkeypatch.setattr(store_module, "MatrixFile", FullDisk)
    with pytest.raises(OSError) as caught:
        read_store(store, "counts", matrix=tmp_path / "m.f32")
    assert not isinstance(caught.value, InputError) and caught.value.errno == errno.ENOSPC


def _ingested_store(tmp_path: Path) -> Path:
    """A two-gene store of counts, one chromosome."""
    from geximpute.config import load_config
    from geximpute.steps.ingest import ingest

    (tmp_path / "e.gct").write_text("#1.2\n2\t2\nName\tDescription\tS1\tS2\nG1\tA\t1\t2\nG2\tB\t3\t4\n")
    (tmp_path / "g.gtf").write_text('chr1\tt\tgene\t100\t400\t.\t+\t.\tgene_id "G1";\n'
                                    'chr1\tt\tgene\t800\t990\t.\t-\t.\tgene_id "G2";\n')
    (tmp_path / "c.yaml").write_text("name: t\ninputs:\n  genes: g.gtf\n  expression: e.gct\n  scale: counts\n")
    return ingest(load_config(tmp_path / "c.yaml"), tmp_path / "store").out_dir


def test_a_matrix_file_hiding_a_mask_reads_as_the_array_with_those_entries_hidden(tmp_path):
    """`prepare`'s training fold of a problem kept in a file: a read-only view that hides the mask's entries in
    every kind of read, a pickled window's (a task's) too."""
    import pickle

    from geximpute.io.matrixfile import MatrixFile, count_measured, measured, take_and_hide

    rng = np.random.default_rng(4)
    a = rng.normal(size=(23, 9)).astype(np.float32)
    a[a > 1.2] = np.nan
    mask = rng.random(a.shape) < 0.3
    hidden_a = np.where(mask, np.nan, a).astype(np.float32)
    m = MatrixFile.from_array(tmp_path / "m", a)
    view = m.hiding(MatrixFile.from_array(tmp_path / "mask", mask))
    np.testing.assert_array_equal(view.read(), hidden_a)
    np.testing.assert_array_equal(view[3:9], hidden_a[3:9])
    np.testing.assert_array_equal(view[[7, 2, 20]], hidden_a[[7, 2, 20]])
    np.testing.assert_array_equal(view[:, 2:5], hidden_a[:, 2:5])
    window = pickle.loads(pickle.dumps(view.window(5, 15)))
    np.testing.assert_array_equal(window.read(), hidden_a[5:15])
    np.testing.assert_array_equal(window[:, 1:3], hidden_a[5:15, 1:3])
    assert count_measured(view, cells=18) == np.count_nonzero(~np.isnan(hidden_a))
    np.testing.assert_array_equal(measured(view, cells=18), ~np.isnan(hidden_a))
    with pytest.raises(ValueError, match="read-only"):
        view[0:2] = np.zeros((2, 9))
    with pytest.raises(ValueError, match="expected a bool matrix"):
        m.hiding(MatrixFile.from_array(tmp_path / "wrong", mask[:5]))
    np.testing.assert_array_equal(m.read(), a)  # the values' file untouched
    # hiding in place: the hidden values taken out in np.nonzero order, a file's a pass of rows at a time
    copy = a.copy()
    expected = take_and_hide(copy, mask)
    got = take_and_hide(m, mask, cells=27)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, a[mask])
    np.testing.assert_array_equal(m.read(), copy)


def test_log_scale_allows_negative_values(write):
    expr = read_expression(write("log.tsv", "gene_id\tA\ng1\t-1.5\n"), scale="log")
    assert expr.values[0, 0] == -1.5
    assert to_model_scale(expr, ExpressionConfig())[0, 0] == -1.5


# samples -------------------------------------------------------------------------------------------------------


def test_engine_sample_table(write):
    table = read_samples(write("samples.tsv", "sample_id\tdonor_id\ttissue\textra\nS1\tD1\tLiver\tx\n"))
    assert table.to_pylist() == [{"sample_id": "S1", "donor_id": "D1", "tissue": "Liver"}]


def test_gtex_attribute_layout_derives_the_donor(write):
    text = "SAMPID\tSMTS\tSMTSD\nGTEX-1117F-0226-SM-5GZZ7\tAdipose Tissue\tAdipose - Subcutaneous\n"
    table = read_samples(write("SampleAttributesDS.txt", text))
    assert table.to_pylist() == [
        {
            "sample_id": "GTEX-1117F-0226-SM-5GZZ7",
            "donor_id": "GTEX-1117F",
            "tissue": "Adipose - Subcutaneous",
        }
    ]


# command line --------------------------------------------------------------------------------------------------


def test_cli_help_lists_the_design_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "geximpute.apps.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in (
        "inspect",
        "synth",
        "demo",
        "prepare",
        "train",
        "fit-head",
        "impute",
        "evaluate",
        "nightly",
        "benchmark",
        "submit",
        "variant-effects",
    ):
        assert name in out


def test_a_gene_twice_is_refused_naming_each_record_as_written(tmp_path):
    """Two versions of one gene id on two chromosomes: refused, naming each record as written and its chromosome
    (the message said `gene ENSG1, gene ENSG1`: nothing to find them by)."""
    bed = tmp_path / "genes.bed"
    bed.write_text("chr1\t100\t200\tENSG1.1\t0\t+\nchr2\t300\t400\tENSG2\t0\t-\nchrX\t500\t600\tENSG1.2\t0\t+\n")
    with pytest.raises(InputError, match=r"duplicate gene id.*'ENSG1\.1' on chr1.*'ENSG1\.2' on chrX"):
        read_genes(bed)


def test_ids_are_kept_as_written_whatever_they_look_like(write):
    """Id columns were typed by guessing: sample ids 001 read as 1 (then matched no expression column), donors 01
    and 1 merged into one donor without a word, annotation genes 007 and 7 reported as two '7's."""
    samples = read_samples(write("s.tsv", "sample_id\tdonor_id\ttissue\n"
                                          "001\t01\tLiver\n002\t1\tLiver\n003\t02\tLung\n"))
    assert samples[S.SAMPLE_ID].to_pylist() == ["001", "002", "003"]
    assert samples[S.DONOR_ID].to_pylist() == ["01", "1", "02"]  # three donors, not two
    genes = read_genes(write("g.csv", "gene_id,chrom,start,end,strand\n007,1,100,200,+\n7,1,300,400,+\n"))
    assert genes.table[S.GENE_ID].to_pylist() == ["007", "7"]
    long = read_expression(write("long.tsv", "gene_id\tsample_id\tvalue\n007\t001\t1.5\n7\t001\t2.5\n"), "long")
    assert sorted(long.gene_ids) == ["007", "7"] and long.sample_ids == ["001"]


def test_a_bgzip_fasta_cut_short_is_named(tmp_path, real_data):
    """A bgzip FASTA whose copy stopped part of the way (Bio.bgzf's struct.error was a traceback)."""
    whole = (real_data / "sequence" / "hg38_prefixes.fa.gz").read_bytes()
    cut = tmp_path / "genome.fa.gz"
    cut.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(InputError, match="cannot be read as FASTA") as err:
        Genome(cut)
    assert "genome.fa.gz" in str(err.value)


def test_header_and_coordinate_mistakes_are_named(write, tmp_path):
    """A table written with its row index (an unnamed first column, or pandas' 'Unnamed: 0'), a wide Parquet naming
    a sample twice (the text form was refused, the Parquet one read two samples 'S1'), and a gene whose start lies
    past its end were all accepted."""
    with pytest.raises(InputError, match="has no name.*index=False"):
        read_expression(write("indexed.csv", ",gene_id,Liver,Lung\n0,ENSG1,1,2\n1,ENSG2,3,4\n"))
    with pytest.raises(InputError, match="'Unnamed: 0'"):
        read_expression(write("indexed2.csv", "Unnamed: 0,gene_id,Liver,Lung\n0,ENSG1,1,2\n1,ENSG2,3,4\n"))
    table = pa.table([pa.array(["ENSG1", "ENSG2"]), pa.array([1.0, 2.0]), pa.array([3.0, 4.0])],
                     names=["gene_id", "S1", "S1"])
    pq.write_table(table, tmp_path / "twice.parquet")
    with pytest.raises(InputError, match="names column 'S1' twice"):
        read_expression(tmp_path / "twice.parquet")
    with pytest.raises(InputError, match="start 300 and end 200") as err:
        read_genes(write("swapped.tsv", "gene_id\tchrom\tstart\tend\tstrand\nG1\tchr1\t100\t150\t+\n"
                                        "G2\tchr1\t300\t200\t-\n"))
    assert "G2" in str(err.value) or "line 3" in str(err.value), err.value
    with pytest.raises(InputError, match=r"column 'start' is not int64: 100.5; at line 3 \(gene G2\)"):
        read_genes(write("half.tsv", "gene_id\tchrom\tstart\tend\tstrand\nG1\tchr1\t100\t150\t+\n"
                                     "G2\tchr1\t100.5\t300\t-\n"))


def test_a_phenotype_bed_position_that_is_no_whole_number_and_a_byte_order_mark(write):
    """A BED start of 99.5 or 'abc' ended in Arrow's own error about a schema or a missing kernel; a spreadsheet's
    byte-order mark before a GCT's '#1.2' or a sample map's header was refused as a bad header."""
    header = "#chr\tstart\tend\tpid\tgid\tstrand\tP1\tP2\n"
    for bad in ("99.5", "abc"):
        path = write(f"pheno-{bad}.bed", header + "chr22\t100\t101\tG1\tG1\t+\t1\t2\n"
                     f"chr22\t{bad}\t201\tG2\tG2\t-\t3\t4\n")
        with pytest.raises(InputError, match=f"start '{bad}' is not a position") as err:
            read_expression(path, scale="normalised")
        assert "line 3 (gene G2)" in str(err.value)
    # an empty interval (start0 == end, as some QTL tools write a TSS) is a gene, not a start past its end
    from geximpute.io.genes import phenotype_bed_genes

    empty = read_expression(write("empty.bed", header + "chr22\t100\t100\tG1\tG1\t+\t1\t2\n"), scale="normalised")
    assert phenotype_bed_genes(empty.genes, empty.path).table[S.TSS].to_pylist() == [101]
    gct = write("bom.gct", "\ufeff#1.2\n1\t2\nName\tDescription\tS1\tS2\nENSG1\ta\t1\t2\n")
    assert read_expression(gct).sample_ids == ["S1", "S2"]
    from geximpute.io.variants import read_sample_map

    assert read_sample_map(write("map.tsv", '\ufeff"vcf_sample"\t"donor_id"\nX1\tD1\n')) == {"X1": "D1"}


def test_a_long_parquet_with_numbers_stored_as_text_reads_as_its_text_form(write, tmp_path):
    """Numbers stored as text in a long Parquet file were refused as "non-numeric '1.5' at line 2" (a Parquet file
    has no lines; the same table as TSV reads); they read as numbers now, NA as missing, and real text is refused
    at the schema."""
    table = pa.table({"gene_id": ["G1", "G2", "G1"], "sample_id": ["S1", "S1", "S2"], "value": ["1.5", "NA", "2"]})
    pq.write_table(table, tmp_path / "long.parquet")
    expr = read_expression(tmp_path / "long.parquet", "long")
    np.testing.assert_array_equal(expr.values, np.array([[1.5, 2.0], [np.nan, np.nan]], np.float32))
    pq.write_table(table.set_column(2, "value", pa.array(["1.5", "high", "2"])), tmp_path / "text.parquet")
    with pytest.raises(InputError, match="not all numbers"):
        read_expression(tmp_path / "text.parquet", "long")


def test_gzip_files_named_bgz_or_without_a_suffix_are_read(tmp_path):
    """Arrow decompresses by the name (``.gz``); bgzip writes ``.bgz``, and a copy can lose its suffix: read by the
    file's own bytes, as the other readers tell gzip."""
    (tmp_path / "e.gct.bgz").write_bytes(gzip.compress(b"#1.2\n1\t2\nName\tDescription\tS1\tS2\nENSG1\ta\t1\t2\n"))
    (tmp_path / "expression").write_bytes(gzip.compress(b"gene_id\tLiver\nENSG1\t3\n"))
    (tmp_path / "g.gtf.bgz").write_bytes(gzip.compress(b'chr1\tx\tgene\t100\t200\t.\t-\t.\tgene_id "ENSG1";\n'))
    np.testing.assert_array_equal(read_expression(tmp_path / "e.gct.bgz").values, [[1, 2]])
    np.testing.assert_array_equal(read_expression(tmp_path / "expression").values, [[3]])
    assert read_genes(tmp_path / "g.gtf.bgz").table.to_pylist()[0]["tss"] == 200
    from geximpute.io.variants import read_sample_map

    (tmp_path / "map.tsv.bgz").write_bytes(gzip.compress(b"vcf_sample\tdonor_id\ns1\tD1\n"))
    assert read_sample_map(tmp_path / "map.tsv.bgz") == {"s1": "D1"}


def test_the_linear_scale_is_given_back_only_where_there_is_one():
    """``predicted_tpm``: TPM from log1p TPM, normalised counts per million from counts, at least 0; none for
    ``log`` or ``normalised`` input (it gave the model's own values under a TPM name)."""
    from geximpute.io.expression import from_model_scale, linear_unit

    config = ExpressionConfig()
    values = np.array([-0.2, 0.0, np.log1p(9.0)])
    np.testing.assert_allclose(from_model_scale(values, "tpm", config), [0.0, 0.0, 9.0])
    assert linear_unit("counts", config) == "normalised counts per million" and linear_unit("tpm", config) == "TPM"
    for scale in ("log", "normalised"):
        assert from_model_scale(values, scale, config) is None and linear_unit(scale, config) is None


def test_a_row_with_other_fields_than_the_header_is_named_by_its_line(write):
    """Arrow's message quoted the row but not its number ("Expected 3 columns, got 2: S2 D1")."""
    text = "sample_id\tdonor_id\ttissue\nS1\tD1\tLiver\nS2\tD1\nS3\tD2\tLung\n"
    with pytest.raises(InputError, match=r"short.tsv: sample table cannot be parsed: a row has 2 fields; at line 3; "
                                         r"expected 3 fields, as the header has"):
        read_samples(write("short.tsv", text))
    with pytest.raises(InputError, match=r"at line 3;"):
        read_samples(write("short.tsv.gz", text))

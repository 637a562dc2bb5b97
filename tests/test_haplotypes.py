"""Tests of geximpute.science.haplotypes on hand-made FASTA/VCF files (base by base) and on the real 1000 Genomes
subset."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

import geximpute.science.haplotypes as haplotypes
from geximpute.config import PromoterConfig
from geximpute.errors import ConfigError, InputError
from geximpute.io.fasta import Genome, reverse_complement
from geximpute.io.genes import read_genes
from geximpute.io.variants import read_variants
from geximpute.science.haplotypes import PromoterHaplotypes, build_haplotypes, edit_window, promoter_id
from geximpute.steps.prepare import promoter_tables

_rng = random.Random(5)
CHR1 = "".join(_rng.choice("ACGT") for _ in range(90))
# chr2: bases 21-40 soft-masked (lower case), as a repeat would be
CHR2 = "".join(_rng.choice("ACGT") for _ in range(60))
CHR2 = CHR2[:20] + CHR2[20:40].lower() + CHR2[40:]

TSS = 30
P = PromoterConfig(upstream=6, downstream=4)  # '+' window 24..33, '-' window 27..36 (1-based, genomic)


def bases(a: int, b: int, seq: str = CHR1) -> str:
    """Reference bases ``a..b`` (1-based, inclusive), as stored."""
    return seq[a - 1 : b]


def b(pos: int) -> str:
    return CHR1[pos - 1]


def other(base: str) -> str:
    """A base that differs from ``base``."""
    return {"A": "C", "C": "G", "G": "T", "T": "A"}[base.upper()]


def complement(base: str) -> str:
    return reverse_complement(base)


@pytest.fixture
def genome(tmp_path: Path) -> Genome:
    path = tmp_path / "ref.fa"
    lines = []
    for name, seq in (("chr1", CHR1), ("chr2", CHR2)):
        lines.append(f">{name}")
        lines.extend(seq[i : i + 50] for i in range(0, len(seq), 50))
    path.write_text("\n".join(lines) + "\n")
    with Genome(path) as g:
        yield g


def write_vcf(path: Path, records: list[str], samples: list[str]) -> Path:
    header = ["##fileformat=VCFv4.2", "##contig=<ID=chr1>", "##contig=<ID=chr2>"]
    header.append('##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">')
    header.append("\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT", *samples]))
    path.write_text("\n".join(header + records) + "\n")
    return path


def rec(pos: int, ref: str, alt: str, *gts: str, chrom: str = "chr1") -> str:
    return "\t".join([chrom, str(pos), ".", ref, alt, ".", "PASS", ".", "GT", *gts])


def genes_table(*rows: tuple[str, str, int, str]) -> pa.Table:
    gene_id, chrom, tss, strand = zip(*rows, strict=True)
    return pa.table({"gene_id": list(gene_id), "chrom": list(chrom), "tss": list(tss), "strand": list(strand)})


PLUS_MINUS = genes_table(("gplus", "chr1", TSS, "+"), ("gminus", "chr1", TSS, "-"))


def build(tmp_path: Path, genome: Genome, records: list[str], samples: list[str], genes: pa.Table = PLUS_MINUS,
          promoter: PromoterConfig = P, **kwargs) -> PromoterHaplotypes:
    variants = read_variants(write_vcf(tmp_path / "donors.vcf", records, samples), genome)
    return build_haplotypes(genome, genes, variants, promoter, **kwargs)


def cut(strand: str, edits: list[tuple[int, str, str]]) -> str:
    """The window of TSS 30 with ``edits``, from the whole of chr1."""
    return edit_window(CHR1, 1, TSS, strand, P.upstream, P.downstream, edits).sequence


def oriented(strand: str, forward: str) -> str:
    return forward if strand == "+" else reverse_complement(forward)


# edit_window, base by base ----------------------------------------------------------------------------------


def test_no_edits_gives_genome_window_on_both_strands_and_at_the_ends(genome: Genome) -> None:
    for chrom, seq in (("chr1", CHR1), ("chr2", CHR2)):
        region = genome.fetch(chrom, -19, len(seq) + 20)  # N beyond both ends, as Genome.window pads
        for tss in range(1, len(seq) + 1):
            for strand in "+-":
                for mask in ("upper", "n"):
                    expected = genome.window(chrom, tss, strand, P.upstream, P.downstream, mask).sequence
                    got = edit_window(region, -19, tss, strand, P.upstream, P.downstream, [], mask)
                    assert got.sequence == expected, (chrom, tss, strand, mask)
                    assert (got.n_applied, got.n_indels, got.n_overlap_skipped) == (0, 0, 0)


def test_snv_lands_at_the_strand_offset() -> None:
    alt = other(b(28))
    plus = cut("+", [(28, b(28), alt)])
    assert plus == bases(24, 27) + alt + bases(29, 33)
    assert plus[28 - 24] == alt
    minus = cut("-", [(28, b(28), alt)])
    assert minus == reverse_complement(bases(27, 27) + alt + bases(29, 36))
    assert minus[36 - 28] == complement(alt)


@pytest.mark.parametrize(
    ("strand", "pos", "index"),
    [("+", 24, 0), ("+", 33, 9), ("-", 36, 0), ("-", 27, 9), ("+", 30, 6), ("-", 30, 6)],
    ids=["plus-first", "plus-last", "minus-first", "minus-last", "plus-tss", "minus-tss"],
)
def test_snv_at_window_edges_and_tss(strand: str, pos: int, index: int) -> None:
    alt = other(b(pos))
    window = cut(strand, [(pos, b(pos), alt)])
    reference = cut(strand, [])
    assert window[index] == (alt if strand == "+" else complement(alt))
    assert window[:index] + window[index + 1 :] == reference[:index] + reference[index + 1 :]


@pytest.mark.parametrize(("strand", "pos"), [("+", 23), ("+", 34), ("-", 26), ("-", 37)])
def test_snv_just_outside_the_window_changes_nothing(strand: str, pos: int) -> None:
    assert cut(strand, [(pos, b(pos), other(b(pos)))]) == cut(strand, [])


def test_insertion_upstream_pushes_out_the_far_5prime_bases() -> None:
    # '+': GG between 27 and 28; the 6 upstream bases are now 26, 27, G, G, 28, 29
    assert cut("+", [(27, b(27), b(27) + "GG")]) == bases(26, 27) + "GG" + bases(28, 29) + bases(30, 33)
    # '-': AC between 33 and 34 (5' of the TSS on '-'); genomic 35, 36 leave the window
    assert cut("-", [(33, b(33), b(33) + "AC")]) == reverse_complement(bases(27, 33) + "AC" + bases(34, 34))


def test_insertion_downstream_pushes_out_the_far_3prime_bases() -> None:
    assert cut("+", [(31, b(31), b(31) + "T")]) == bases(24, 31) + "T" + bases(32, 32)
    # '-': T between 28 and 29 (3' of the TSS on '-'); genomic 27 leaves the window
    assert cut("-", [(28, b(28), b(28) + "T")]) == reverse_complement(bases(28, 28) + "T" + bases(29, 36))


def test_deletion_upstream_pulls_in_flanking_bases() -> None:
    # '+': 27 and 28 deleted; 22 and 23 come in from the 5' flank
    assert cut("+", [(26, bases(26, 28), b(26))]) == bases(22, 26) + bases(29, 33)
    # '-': 33 and 34 deleted; 37 and 38 come in
    assert cut("-", [(32, bases(32, 34), b(32))]) == reverse_complement(bases(27, 32) + bases(35, 38))


def test_deletion_downstream_pulls_in_flanking_bases() -> None:
    assert cut("+", [(31, bases(31, 32), b(31))]) == bases(24, 31) + bases(33, 34)
    assert cut("-", [(27, bases(27, 29), b(27))]) == reverse_complement(bases(25, 27) + bases(30, 36))


def test_deletion_spanning_the_tss_anchors_on_the_first_base_3prime_of_it() -> None:
    deletion = [(28, bases(28, 32), b(28))]  # deletes 29..32, the TSS (30) among them
    # '+': upstream = the 6 bases 5' of the deletion, downstream starts at 33
    assert cut("+", deletion) == bases(23, 28) + bases(33, 36)
    # '-': 3' is genomic left: downstream starts at 28 (going left), upstream = the 6 bases right of the deletion
    assert cut("-", deletion) == reverse_complement(bases(25, 28) + bases(33, 38))


def test_variants_straddling_the_window_edge() -> None:
    # deletion of 22..25 straddles the 5' edge (24): the part inside is gone, 20 and 21 come in
    assert cut("+", [(21, bases(21, 25), b(21))]) == bases(20, 21) + bases(26, 33)
    # MNV over 33..34 (the 3' edge): only its first base shows
    mnv = other(b(33)) + other(b(34))
    assert cut("+", [(33, bases(33, 34), mnv)]) == bases(24, 32) + mnv[0]
    # an insertion just before the window's first base or just after its last one changes nothing
    assert cut("+", [(23, b(23), b(23) + "GGG")]) == cut("+", [])
    assert cut("+", [(33, b(33), b(33) + "GGG")]) == cut("+", [])
    # one between the last two bases pushes the last one out
    assert cut("+", [(32, b(32), b(32) + "A")]) == bases(24, 32) + "A"


def test_overlapping_edits_keep_the_first_by_position() -> None:
    deletion, snv = (26, bases(26, 29), b(26)), (28, b(28), other(b(28)))  # the SNV lies inside the deletion
    for edits in ([deletion, snv], [snv, deletion]):
        result = edit_window(CHR1, 1, TSS, "+", P.upstream, P.downstream, edits)
        assert result.sequence == bases(21, 26) + bases(30, 33)
        assert (result.n_applied, result.n_indels, result.n_overlap_skipped) == (1, 1, 1)
    # an SNV right after the deleted span does not overlap it
    after = (30, b(30), other(b(30)))
    result = edit_window(CHR1, 1, TSS, "+", P.upstream, P.downstream, [deletion, after])
    assert result.sequence == bases(21, 26) + other(b(30)) + bases(31, 33)
    assert result.n_overlap_skipped == 0
    # two insertions at one point: the second is skipped
    insertions = [(27, b(27), b(27) + "A"), (27, b(27), b(27) + "C")]
    result = edit_window(CHR1, 1, TSS, "+", P.upstream, P.downstream, insertions)
    assert result.sequence == bases(25, 27) + "A" + bases(28, 33)
    assert result.n_overlap_skipped == 1
    # edits that trim to one start keep the VCF's order, whatever their lengths or bases: the first wins (a
    # deletion written before an SNV at its first deleted base was skipped, the shorter span sorting first; two
    # insertions at one point were chosen alphabetically)
    result = edit_window(CHR1, 1, TSS, "+", P.upstream, P.downstream, insertions[::-1])
    assert result.sequence == bases(25, 27) + "C" + bases(28, 33)
    deletion, snv = (26, bases(26, 29), b(26)), (27, b(27), other(b(27)))  # both trim to start 27
    result = edit_window(CHR1, 1, TSS, "+", P.upstream, P.downstream, [deletion, snv])
    assert result.sequence == bases(21, 26) + bases(30, 33) and result.n_overlap_skipped == 1
    result = edit_window(CHR1, 1, TSS, "+", P.upstream, P.downstream, [snv, deletion])
    assert result.sequence == bases(24, 26) + other(b(27)) + bases(28, 33) and result.n_overlap_skipped == 1


def test_the_window_checks_read_the_window_s_sites_only(tmp_path: Path, genome: Genome) -> None:
    """A site that select gathered only because a deletion nobody carries could pull it in is not the window's:
    its missing or unphased calls do not refuse the VCF, nor count in the report (a valid VCF was refused, naming a
    site outside the window as in it)."""
    genes = genes_table(("gplus", "chr1", TSS, "+"))  # window 24..33
    records = [rec(16, b(16), other(b(16)), "0/1", "./."),  # outside the window
               rec(26, b(26), other(b(26)), "1/0", "0/0"),  # inside
               rec(31, bases(31, 45), b(31), "0/0", "0/0")]  # a 14-base deletion nobody carries
    for policy in ({"unphased": "error"}, {"missing": "error"}):
        built = build(tmp_path, genome, records, ["D1", "D2"], genes, **policy)
        assert built.report["n_sites_in_windows"] == 2  # 26 and the deletion's first base, 31
    # a second unphased heterozygous site inside the window is still refused
    records[2] = rec(31, b(31), other(b(31)), "0/1", "0/0")
    with pytest.raises(InputError, match=r"donor D1, sites chr1:26 \(unphased\), chr1:31 \(unphased\)"):
        build(tmp_path, genome, records, ["D1", "D2"], genes, unphased="error")


def test_edit_window_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="ACGTN"):
        edit_window(CHR1, 1, TSS, "+", 6, 4, [(28, b(28), "<DEL>")])
    with pytest.raises(ValueError, match="strand"):
        edit_window(CHR1, 1, TSS, ".", 6, 4, [])
    with pytest.raises(ValueError, match="too short"):
        edit_window(bases(24, 33), 24, TSS, "+", 6, 4, [(26, bases(26, 28), b(26))])


# build_haplotypes -------------------------------------------------------------------------------------------


def test_phased_unphased_and_multiallelic_calls(tmp_path: Path, genome: Genome) -> None:
    alt1, alt2 = [x for x in "ACGT" if x != b(28)][:2]
    records = [rec(28, b(28), f"{alt1},{alt2}", "0|1", "1|0", "2/1", "0/0")]
    h = build(tmp_path, genome, records, ["d1", "d2", "d3", "d4"])

    expected_allele = {(0, 0): b(28), (0, 1): alt1, (1, 0): alt1, (1, 1): b(28), (2, 0): alt2, (2, 1): alt1,
                       (3, 0): b(28), (3, 1): b(28)}
    for (d, hap), allele in expected_allele.items():
        assert h.sequence(0, d, hap)[28 - 24] == allele
        assert h.sequence(1, d, hap)[36 - 28] == complement(allele)
        for g in (0, 1):
            rest = [i for i in range(10) if i != (4 if g == 0 else 8)]
            ref = h.sequences[h.reference_row[g]]
            assert [h.sequence(g, d, hap)[i] for i in rest] == [ref[i] for i in rest]
    assert (h.rows[:, 3, :] == h.reference_row[:, None]).all()
    assert h.rows[0, 0, 1] == h.rows[0, 1, 0] == h.rows[0, 2, 1]  # one sequence per distinct haplotype
    assert h.report["n_unphased_calls"] == 2
    assert h.report["n_sites_in_windows"] == 1
    assert h.donors == ["d1", "d2", "d3", "d4"] and h.gene_ids.tolist() == ["gplus", "gminus"]
    assert h.rows.dtype == np.int32 and h.reference_row.dtype == np.int64


def test_a_split_multiallelic_site_is_one_site_under_every_phase_policy(tmp_path: Path, genome: Genome) -> None:
    """``bcftools norm -m -`` writes an unphased 1/2 as two records of one position, 1/0 and 0/1: one
    heterozygous site whose ALTs lie on different haplotypes, as the unsplit record is read (``cis`` put both ALTs
    on haplotype B, where the second was skipped as overlapping, and A kept REF; ``error`` refused two sites). A
    ``*`` allele beside REF writes nothing, so a call 0/2 on it is no heterozygous site."""
    alt1, alt2 = [x for x in "ACGT" if x != b(28)][:2]
    split = [rec(28, b(28), alt1, "1/0"), rec(28, b(28), alt2, "0/1")]
    for policy in ("as_written", "cis", "error"):
        h = build(tmp_path, genome, split, ["d1"], unphased=policy)
        assert [h.sequence(0, 0, hap)[28 - 24] for hap in (0, 1)] == [alt1, alt2], policy
        assert h.report["n_overlap_skipped"] == 0
    # a heterozygous deletion and the record it spans, written with `*` (GATK): one site
    star = [rec(25, bases(25, 28), b(25), "0/1"), rec(27, b(27), f"{other(b(27))},*", "0/2")]
    h = build(tmp_path, genome, star, ["d1"], unphased="error")
    assert sorted(h.sequence(0, 0, hap) for hap in (0, 1)) == sorted([h.sequences[h.reference_row[0]],
                                                                       cut("+", [(25, bases(25, 28), b(25))])])


def test_missing_alleles_read_as_reference_or_refused(tmp_path: Path, genome: Genome) -> None:
    alt = other(b(31))
    records = [rec(31, b(31), alt, ".|1", "./.", "1|1")]
    h = build(tmp_path, genome, records, ["d1", "d2", "d3"])
    assert h.rows[0, 0, 0] == h.reference_row[0] and h.sequence(0, 0, 1)[31 - 24] == alt
    assert (h.rows[:, 1, :] == h.reference_row[:, None]).all()
    assert h.report["n_missing_alleles"] == 3

    with pytest.raises(InputError) as err:
        build(tmp_path, genome, records, ["d1", "d2", "d3"], missing="error")
    message = str(err.value)
    assert "donors.vcf" in message and "chr1:31" in message and "donor d1" in message and "haplotype A" in message
    assert "gplus" in message
    with pytest.raises(ConfigError, match="missing"):
        build(tmp_path, genome, records, ["d1", "d2", "d3"], missing="drop")


def test_symbolic_and_non_acgtn_alts_are_skipped_and_counted(tmp_path: Path, genome: Genome) -> None:
    snv = other(b(29))
    records = [rec(25, b(25), "<DEL>", "1|0", "0|0"), rec(29, b(29), f"{snv},<INS>", "2|1", "1|2")]
    h = build(tmp_path, genome, records, ["d1", "d2"])
    assert h.rows[0, 0, 0] == h.reference_row[0]  # <DEL> and <INS>: reference
    assert h.sequence(0, 0, 1)[29 - 24] == snv and h.sequence(0, 1, 0)[29 - 24] == snv
    assert h.report["n_symbolic_skipped"] == 3


def test_indels_and_overlaps_through_a_vcf(tmp_path: Path, genome: Genome) -> None:
    records = [
        rec(26, bases(26, 29), b(26), "1|0", "0|1", "0|0"),
        rec(28, b(28), other(b(28)), "1|1", "0|0", "0|0"),
        rec(32, b(32), b(32) + "TT", "0|0", "0|1", "0|0"),
    ]
    h = build(tmp_path, genome, records, ["d1", "d2", "d3"])
    assert h.sequence(0, 0, 0) == bases(21, 26) + bases(30, 33)  # the SNV inside the deletion is skipped
    assert h.sequence(0, 0, 1) == bases(24, 27) + other(b(28)) + bases(29, 33)
    assert h.sequence(0, 1, 1) == bases(21, 26) + bases(30, 32) + "T"
    # '-' (window 27..36): the deletion is 3' of the TSS, the insertion 5' of it
    assert h.sequence(1, 1, 1) == reverse_complement(bases(24, 26) + bases(30, 32) + "TT" + bases(33, 34))
    assert h.report["n_overlap_skipped"] == 2  # d1's haplotype A, at both genes
    assert h.report["n_indels_applied"] == 4 + 2  # the deletion on d1 A and d2 B, the insertion on d2 B; both genes


def test_reference_haplotype_has_the_promoter_id_of_promoter_tables(tmp_path: Path, genome: Genome) -> None:
    genes = genes_table(
        ("gplus", "chr1", TSS, "+"),
        ("gminus", "chr1", TSS, "-"),
        ("gedge", "chr1", 3, "+"),  # partly off the start (4 of 10 bases): N padded, kept under `loose`
        ("goff", "chr1", 200, "-"),  # wholly off the record: no window
        ("gmask", "chr2", 25, "-"),
        ("gabsent", "chrX", 30, "+"),  # chromosome not in the FASTA
    )
    records = [rec(28, b(28), other(b(28)), "0|0", "0|1")]
    loose = dataclasses.replace(P, max_unknown_fraction=0.5)
    h = build(tmp_path, genome, records, ["ref_only", "carrier"], genes=genes, promoter=loose)
    dataset = SimpleNamespace(genome=genome, genes=SimpleNamespace(table=genes), config=SimpleNamespace(promoter=loose))
    (tmp_path / "strict").mkdir()
    strict = build(tmp_path / "strict", genome, records, ["ref_only", "carrier"], genes=genes)
    _, strict_promoters = promoter_tables(SimpleNamespace(genome=genome, genes=SimpleNamespace(table=genes),
                                                          config=SimpleNamespace(promoter=P)),
                                          np.array(genes["gene_id"].to_pylist(), dtype=object))
    # the default max_unknown_fraction 0: a window with any unknown base is unknown, in both tables alike
    assert set(strict_promoters["gene_id"].to_pylist()) == {"gplus", "gminus", "gmask"}
    assert strict.reference_row[2] == -1 and strict.report["n_genes_with_window"] == 3
    promoters, gene_promoters = promoter_tables(dataset, np.array(genes["gene_id"].to_pylist(), dtype=object))
    expected = dict(zip(gene_promoters["gene_id"].to_pylist(), gene_promoters["promoter_id"].to_pylist(), strict=True))
    sequence_of = dict(zip(promoters["promoter_id"].to_pylist(), promoters["sequence"].to_pylist(), strict=True))

    assert h.reference_row.tolist()[3:] == [-1, h.reference_row[4], -1] and h.reference_row[4] >= 0
    assert (h.rows[[3, 5]] == -1).all()
    for g, gene in enumerate(h.gene_ids):
        if gene not in expected:
            continue
        for d, hap in ((0, 0), (0, 1), (1, 0)):
            row = h.rows[g, d, hap]
            assert row == h.reference_row[g]
            assert h.promoter_ids[row] == expected[gene] == promoter_id(h.sequences[row])
            assert h.sequences[row] == sequence_of[expected[gene]]
    assert set(expected) == {"gplus", "gminus", "gedge", "gmask"}
    assert h.rows[0, 1, 1] != h.reference_row[0]
    assert h.report["n_genes"] == 6 and h.report["n_genes_with_window"] == 4
    assert h.report["n_haplotype_slots"] == 4 * 2 * 2
    assert all(len(s) == P.length for s in h.sequences)


def test_soft_masked_variant_stays_masked(tmp_path: Path, genome: Genome) -> None:
    mask_n = PromoterConfig(upstream=6, downstream=4, soft_mask="n")
    genes = genes_table(("g", "chr2", 24, "+"))  # window 18..27; 21..27 soft-masked
    ref19, ref25 = CHR2[18], CHR2[24]
    records = [
        rec(19, ref19, other(ref19), "0|1", chrom="chr2"),
        rec(25, ref25.upper(), other(ref25), "1|0", chrom="chr2"),
    ]
    h = build(tmp_path, genome, records, ["d1"], genes=genes, promoter=mask_n)
    assert h.sequences[h.reference_row[0]] == genome.window("chr2", 24, "+", 6, 4, "n").sequence
    assert h.sequence(0, 0, 1) == CHR2[17] + other(ref19) + CHR2[19] + "N" * 7  # unmasked SNV shows
    assert h.sequence(0, 0, 0) == h.sequences[h.reference_row[0]]  # masked SNV stays N
    upper = build(tmp_path, genome, records, ["d1"], genes=genes)
    assert upper.sequence(0, 0, 0)[25 - 18] == other(ref25)


def test_sequences_are_built_once_per_distinct_haplotype(tmp_path: Path, genome: Genome, monkeypatch) -> None:
    calls = []
    original = haplotypes.edit_window

    def counting(*args, **kwargs):
        calls.append(args[6])
        return original(*args, **kwargs)

    monkeypatch.setattr(haplotypes, "edit_window", counting)
    rng = np.random.default_rng(0)
    patterns = [("0", "0"), ("1", "0"), ("1", "1")]  # alleles at sites 25 and 31: 3 haplotypes, 2 non-reference
    donors = [f"d{i}" for i in range(200)]
    picks = rng.integers(0, 3, size=(200, 2))
    gts = [[f"{patterns[a][s]}|{patterns[c][s]}" for a, c in picks] for s in range(2)]
    records = [rec(25, b(25), other(b(25)), *gts[0]), rec(31, b(31), other(b(31)), *gts[1])]
    h = build(tmp_path, genome, records, donors, genes=genes_table(("gplus", "chr1", TSS, "+")))

    assert len(calls) == 2
    assert h.report["n_distinct_per_gene_sum"] == 3 and h.report["n_unique_sequences"] == 3
    assert h.report["n_haplotype_slots"] == 400
    assert h.report["unique_ratio"] == pytest.approx(3 / 400)
    assert len(h.sequences) == 3
    row_of_pattern: dict[int, int] = {}
    for (d, hap), pattern in np.ndenumerate(picks):
        assert row_of_pattern.setdefault(int(pattern), int(h.rows[0, d, hap])) == h.rows[0, d, hap]
    assert row_of_pattern[0] == h.reference_row[0] and len(set(row_of_pattern.values())) == 3


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_edit_window_over_the_whole_chromosome(tmp_path: Path, genome: Genome, seed: int) -> None:
    """Random SNVs, insertions and deletions near the windows: the per-gene margin and site lookup lose nothing."""
    rng = random.Random(seed)
    donors = [f"d{i}" for i in range(12)]
    records, sites = [], []
    for pos in sorted(rng.sample(range(2, 80), 30)):
        kind = rng.choice(["snv", "ins", "del", "multi"])
        if kind == "snv":
            ref, alts = b(pos), [other(b(pos))]
        elif kind == "ins":
            ref, alts = b(pos), [b(pos) + "".join(rng.choice("ACGT") for _ in range(rng.randint(1, 6)))]
        elif kind == "del":
            n = rng.randint(2, 9)
            ref, alts = bases(pos, pos + n - 1), [b(pos)]
        else:
            ref, alts = bases(pos, pos + 2), [b(pos), other(b(pos)) + bases(pos + 1, pos + 2), b(pos) + "GA"]
        gts = [f"{rng.choice([0, 0, 0, *range(1, len(alts) + 1)])}|{rng.choice([0, 0, *range(1, len(alts) + 1)])}"
               for _ in donors]
        records.append(rec(pos, ref, ",".join(alts), *gts))
        sites.append((pos, ref, alts, gts))
    tsss = [(f"g{i}", "chr1", t, s) for i, (t, s) in enumerate((t, s) for t in (5, 18, 30, 44, 61, 80) for s in "+-")]
    # windows near the ends are partly off the record: kept here to test the padding
    h = build(tmp_path, genome, records, donors, genes=genes_table(*tsss),
              promoter=dataclasses.replace(P, max_unknown_fraction=0.9))

    padded = "N" * 40 + CHR1 + "N" * 40
    for g, (_, _, tss, strand) in enumerate(tsss):
        for d in range(len(donors)):
            for hap in range(2):
                edits = [(pos, ref, alts[int(gts[d].split("|")[hap]) - 1])
                         for pos, ref, alts, gts in sites if gts[d].split("|")[hap] != "0"]
                expected = edit_window(padded, -39, tss, strand, P.upstream, P.downstream, edits).sequence
                assert h.sequence(g, d, hap) == expected, (tss, strand, donors[d], hap)
    assert h.report["n_indels_applied"] > 0 and h.report["n_overlap_skipped"] > 0

    # handed to a sink in parts (as imputation does): the same sequence in every slot, through rows that follow on
    # from part to part; none kept in the result
    parts: list[list[str]] = []
    ends: list[int] = []
    sunk = build(tmp_path, genome, records, donors, genes=genes_table(*tsss),
                 promoter=dataclasses.replace(P, max_unknown_fraction=0.9),
                 sink=lambda sequences, next_gene: (parts.append(sequences), ends.append(next_gene)), part_rows=9)
    every = [seq for part in parts for seq in part]
    assert sunk.sequences == [] and len(parts) > 2 and sunk.report["n_unique_sequences"] == len(every)
    assert ends == sorted(ends) and ends[-1] == len(tsss)
    assert all(len(part) >= 9 for part in parts[:-1])  # a part closes once it has part_rows rows, at a gene's end
    bounds = np.cumsum([0] + [len(part) for part in parts])
    for i, end in enumerate(ends):  # the genes before next_gene read rows of this part or earlier ones, later genes not
        before, after = sunk.rows[:end], sunk.rows[end:]
        assert before[before >= 0].max(initial=-1) < bounds[i + 1] <= after[after >= 0].min(initial=bounds[-1])
    assert all(len(part) == len(set(part)) for part in parts)  # unique within a part
    assert len(set(every)) == len(h.sequences)  # every sequence, some repeated across parts
    np.testing.assert_array_equal(sunk.rows < 0, h.rows < 0)
    for (g, d, hap), row in np.ndenumerate(sunk.rows):
        if row >= 0:
            assert every[row] == h.sequence(g, d, hap)
    for g, row in enumerate(sunk.reference_row):
        assert (row < 0) == (h.reference_row[g] < 0) and (row < 0 or every[row] == h.sequences[h.reference_row[g]])


def test_genes_input_is_checked(tmp_path: Path, genome: Genome) -> None:
    with pytest.raises(ValueError, match="strand"):
        build(tmp_path, genome, [rec(28, b(28), "A" if b(28) != "A" else "C", "0|1")], ["d1"],
              genes=genes_table(("g", "chr1", TSS, ".")))
    with pytest.raises(ValueError, match="tss"):
        build_haplotypes(genome, {"gene_id": ["g"], "chrom": ["chr1"], "strand": ["+"]}, None, P)


# Real data --------------------------------------------------------------------------------------------------


@pytest.mark.real_data
def test_real_alt_alleles_land_where_the_vcf_says(real_data: Path) -> None:
    promoter = PromoterConfig(upstream=1000, downstream=500)
    with Genome(real_data / "sequence" / "hg38_prefixes.fa.gz") as genome:
        genes = read_genes(real_data / "coordinates" / "gencode_v45_chr17_genes_hg38.tsv", genome=genome,
                           genome_partial=True)
        variants = read_variants(
            real_data / "genotypes" / "1KG_phase3_subset_chr17p_0-7.84Mb_lifted_hg38.vcf.gz", genome
        )
        h = build_haplotypes(genome, genes, variants, promoter)

    table = genes.table
    pos = variants.sites["pos"].to_numpy()
    refs, alts = variants.sites["ref"].to_pylist(), variants.sites["alt"].to_pylist()
    checked = {"snv": set(), "insertion": set()}
    for g in np.flatnonzero(h.reference_row >= 0):
        tss, strand = table["tss"][int(g)].as_py(), table["strand"][int(g)].as_py()
        start, end = (tss - 1000, tss + 499) if strand == "+" else (tss - 499, tss + 1000)
        inside = np.flatnonzero((pos >= start) & (pos <= end))
        reference = h.sequences[h.reference_row[g]]
        calls = variants.genotypes[inside]  # (n, D, 2)
        for d, hap in zip(*np.nonzero((calls > 0).any(axis=0)), strict=True):
            carried = [(int(pos[i]), refs[i], alts[i][calls[j, d, hap] - 1]) for j, i in enumerate(inside)
                       if calls[j, d, hap] > 0]
            seq = h.sequence(int(g), int(d), int(hap))
            if all(len(r) == len(a) == 1 for _, r, a in carried):
                expected = list(reference)
                for p, r, a in carried:
                    offset = p - start if strand == "+" else end - p
                    assert reference[offset] == (r if strand == "+" else complement(r))
                    expected[offset] = a if strand == "+" else complement(a)
                    checked["snv"].add((strand, p))
                assert seq == "".join(expected)
            elif len(carried) == 1 and carried[0][2].startswith(carried[0][1]):  # one insertion after POS
                p, r, a = carried[0]
                inserted = a[len(r) :]
                last = p + len(r) - 1  # the inserted bases follow this REF base
                assert last < tss  # the real insertion lies 5' of a '+' TSS and 3' of a '-' one
                if strand == "+":  # the far-5' bases leave the window
                    k = last - start
                    assert seq == reference[len(inserted) : k + 1] + inserted + reference[k + 1 :]
                else:  # the far-3' bases leave
                    k = end - last
                    kept = reference[k : len(reference) - len(inserted)]
                    assert seq == reference[:k] + reverse_complement(inserted) + kept
                checked["insertion"].add((strand, p))
    assert {s for s, _ in checked["snv"]} == {"+", "-"} and len(checked["snv"]) >= 8
    assert {s for s, _ in checked["insertion"]} == {"+", "-"}
    assert h.report["n_donors"] == 1126 and h.report["n_missing_alleles"] == 0
    assert h.report["n_unique_sequences"] < h.report["n_genes_with_window"] + 20


def test_a_site_whose_ref_is_an_iupac_code_leaves_the_reference(tmp_path: Path) -> None:
    """A FASTA base that is an IUPAC code (`M`), named as REF by the VCF: the site cannot be written (no base to
    replace is known), so its haplotypes keep the reference there, instead of the run failing on the edit (which
    stopped a whole nightly run)."""
    seq = CHR1[:27] + "M" + CHR1[28:]
    path = tmp_path / "iupac.fa"
    path.write_text(">chr1\n" + seq + "\n>chr2\n" + CHR2 + "\n")
    with Genome(path) as genome:
        haps = build(tmp_path, genome, [rec(28, "M", "A", "0|1")], ["d1"])
        plain = build(tmp_path, genome, [rec(28, "M", "A", "0|0")], ["d1"])  # the reference, both haplotypes
        assert np.array_equal(haps.rows, plain.rows)


def test_a_replacement_of_another_length_over_the_tss_is_built(tmp_path: Path, genome: Genome) -> None:
    """A complex variant over the TSS (REF 25..30, an ALT one base shorter, or longer) anchors the window at the
    replacement's first base; the region was widened only by the bases it deletes, and the build stopped with a
    ValueError (every gene of the run lost)."""
    ref = bases(25, 30)
    for alt in ("".join(other(c) for c in ref[:-1]), "".join(other(c) for c in ref) + "A"):
        h = build(tmp_path, genome, [rec(25, ref, alt, "0|1")], ["D1"])
        for gene, strand in ((0, "+"), (1, "-")):
            assert h.sequence(gene, 0, 0) == h.sequences[h.reference_row[gene]]
            assert h.sequence(gene, 0, 1) == cut(strand, [(25, ref, alt)]), (alt, strand)


def test_two_heterozygous_records_at_one_position_are_two_sites_to_phase(tmp_path: Path, genome: Genome) -> None:
    """An SNV and a deletion sharing its base, each 0/1 unphased: two sites whose phase is unknown (read as one
    site, both ALTs went on one haplotype without a word, even under ``unphased: error``); a multi-allelic site
    split as 1/0 and 0/1 stays one site."""
    snv = rec(28, b(28), other(b(28)), "0/1")
    deletion = rec(28, bases(28, 30), b(28), "0/1")
    with pytest.raises(InputError, match=r"donor D1"):
        build(tmp_path, genome, [snv, deletion], ["D1"], unphased="error")
    split = [rec(28, b(28), other(b(28)), "1/0"), rec(28, bases(28, 30), b(28), "0/1")]
    h = build(tmp_path, genome, split, ["D1"], unphased="error")
    assert h.report["n_ambiguous_phase_pairs"] == 0

"""Tests of geximpute.io.variants on small hand-written VCF/FASTA files and on the real 1000 Genomes subset."""

from __future__ import annotations

import ctypes
import gzip
import random
from pathlib import Path

import cyvcf2
import numpy as np
import pyarrow as pa
import pytest

from geximpute import schema
from geximpute.errors import ConfigError, InputError
from geximpute.io.fasta import Genome
from geximpute.io.variants import check_ref_alleles, read_sample_map, read_variants

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
REAL_VCF = REAL / "genotypes" / "1KG_phase3_subset_chr17p_0-7.84Mb_lifted_hg38.vcf.gz"
REAL_FASTA = REAL / "sequence" / "hg38_prefixes.fa.gz"

_rng = random.Random(17)
# chr17's first line is soft-masked (lower case) so the REF check must ignore case
CHR17 = "".join(_rng.choice("ACGT") for _ in range(300))
CHR2 = "".join(_rng.choice("ACGT") for _ in range(120))
SAMPLES = ["s1", "s2", "s3"]


def base(pos: int, n: int = 1, seq: str = CHR17) -> str:
    """The reference bases at ``pos`` (1-based), upper case."""
    return seq[pos - 1 : pos - 1 + n]


def other(b: str) -> str:
    """A base that differs from ``b``."""
    return {"A": "C", "C": "G", "G": "T", "T": "A"}[b]


@pytest.fixture
def genome(tmp_path: Path) -> Genome:
    path = tmp_path / "ref.fa"
    lines = []
    for name, seq in (("chr17", CHR17), ("chr2", CHR2)):
        lines.append(f">{name} test record")
        chunks = [seq[i : i + 60] for i in range(0, len(seq), 60)]
        chunks[0] = chunks[0].lower()
        lines.extend(chunks)
    path.write_text("\n".join(lines) + "\n")
    with Genome(path) as g:
        yield g


def write_vcf(
    path: Path,
    records: list[str],
    *,
    samples: list[str] = SAMPLES,
    gt_header: bool = True,
    contigs: tuple[str, ...] = ("chr17", "chr2"),
    extra_header: tuple[str, ...] = (),
) -> Path:
    """A VCF with the given records, written as text (``path`` ending in .gz: plain gzip)."""
    header = ["##fileformat=VCFv4.2"]
    header += [f"##contig=<ID={c}>" for c in contigs]
    if gt_header:
        header.append('##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">')
    header.extend(extra_header)
    header.append("\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT", *samples]))
    text = "\n".join(header + [r.replace(" ", "\t") for r in records]) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def rec(chrom: str, pos: int, ref: str, alt: str, *gts: str, vid: str = ".") -> str:
    return " ".join([chrom, str(pos), vid, ref, alt, ".", "PASS", ".", "GT", *gts])


def snp(pos: int, *gts: str, chrom: str = "chr17", seq: str = CHR17) -> str:
    ref = base(pos, seq=seq)
    return rec(chrom, pos, ref, other(ref), *gts)


def good_records() -> list[str]:
    """An SNP, a multi-allelic site with haploid and missing calls, and a deletion."""
    r10, r20, r30 = base(10), base(20), base(30, 3)
    alts20 = [b for b in "ACGT" if b != r20][:2]
    return [
        rec("chr17", 10, r10, other(r10), "0|1", "1/1", "./.", vid="rs1"),
        rec("chr17", 20, r20, ",".join(alts20), "2|1", ".", "0"),
        rec("chr17", 30, r30, r30[0], "1|0", ".|.", "0/."),
    ]


def build_index(path: Path) -> None:
    """Build a CSI index with the htslib inside cyvcf2 (no tabix/bcftools needed)."""
    try:
        lib = ctypes.CDLL(cyvcf2.cyvcf2.__file__)
        build = lib.bcf_index_build
    except (OSError, AttributeError):
        pytest.skip("cyvcf2's htslib does not export bcf_index_build")
    build.argtypes = [ctypes.c_char_p, ctypes.c_int]
    assert build(str(path).encode(), 14) == 0


def write_compressed(plain: Path, out: Path) -> Path:
    """Re-write a plain VCF as BCF (``.bcf``) or bgzip VCF (``.vcf.gz``) with cyvcf2."""
    template = cyvcf2.VCF(str(plain))
    writer = cyvcf2.Writer(str(out), template)
    for variant in template:
        writer.write_record(variant)
    writer.close()
    template.close()
    return out


# Genotypes --------------------------------------------------------------------------------------------------


def test_genotypes_phase_multiallelic_missing_and_haploid(tmp_path: Path, genome: Genome) -> None:
    v = read_variants(write_vcf(tmp_path / "a.vcf", good_records()), genome)

    assert v.samples == SAMPLES
    assert v.genotypes.dtype == np.int8 and v.genotypes.shape == (3, 3, 2)
    assert v.genotypes.tolist() == [
        [[0, 1], [1, 1], [-1, -1]],
        [[2, 1], [-1, -1], [0, 0]],  # haploid calls fill both haplotypes
        [[1, 0], [-1, -1], [0, -1]],
    ]
    assert v.phased.tolist() == [[True, False, False], [True, True, True], [True, True, False]]
    assert v.sites.column("pos").to_pylist() == [10, 20, 30]
    assert v.sites.column("variant_id").to_pylist() == ["rs1", None, None]
    assert v.sites.column("alt").to_pylist()[1] == [b for b in "ACGT" if b != base(20)][:2]
    r = v.report
    assert (r["n_sites"], r["n_samples"], r["n_multiallelic"], r["n_indels"]) == (3, 3, 1, 1)
    assert r["n_missing_calls"] == 4  # ./.  .  .|.  0/.
    assert r["n_unphased_calls"] == 1  # 1/1
    assert (r["n_ref_checked"], r["n_ref_mismatch"], r["n_sites_off_genome"]) == (3, 0, 0)


def test_bgzip_vcf_and_bcf_read_like_plain_vcf(tmp_path: Path, genome: Genome) -> None:
    plain = write_vcf(tmp_path / "a.vcf", good_records())
    expected = read_variants(plain, genome)
    for out in (tmp_path / "a.vcf.gz", tmp_path / "a.bcf"):
        v = read_variants(write_compressed(plain, out), genome)
        assert v.sites.equals(expected.sites), out
        assert np.array_equal(v.genotypes, expected.genotypes), out
        assert np.array_equal(v.phased, expected.phased), out


def test_all_haploid_site(tmp_path: Path, genome: Genome) -> None:
    v = read_variants(write_vcf(tmp_path / "a.vcf", [snp(40, "1", "0", ".")]), genome)
    assert v.genotypes.tolist() == [[[1, 1], [0, 0], [-1, -1]]]
    assert v.phased.all()


def test_record_without_gt_is_all_missing(tmp_path: Path, genome: Genome) -> None:
    ds = '##FORMAT=<ID=DS,Number=1,Type=Float,Description="Dosage">'
    records = [snp(10, "0|1", "1|1", "0|0"), snp(20, "0.5", "1", "0").replace(" GT ", " DS ")]
    v = read_variants(write_vcf(tmp_path / "a.vcf", records, extra_header=(ds,)), genome)
    assert v.genotypes.tolist() == [[[0, 1], [1, 1], [0, 0]], [[-1, -1]] * 3]
    assert v.report["n_missing_calls"] == 3


# REF check --------------------------------------------------------------------------------------------------


def test_indel_ref_mismatch_below_threshold_is_dropped_and_counted(tmp_path: Path, genome: Genome) -> None:
    good_del = base(50, 4)
    bad_del = base(70) + other(base(71)) + base(72)  # right first base, wrong second
    records = [snp(p, "0|1", "0|0", "1|1") for p in range(80, 160, 10)]  # 8 SNPs
    records[:0] = [
        rec("chr17", 50, good_del, good_del[0], "0|1", "0|0", "0|0"),
        rec("chr17", 70, bad_del, bad_del[0], "0|1", "0|0", "0|0"),
    ]
    v = read_variants(write_vcf(tmp_path / "a.vcf", records), genome, max_ref_mismatch=0.2)

    assert 70 not in v.sites.column("pos").to_pylist()
    assert 50 in v.sites.column("pos").to_pylist()
    assert v.genotypes.shape == (9, 3, 2)
    assert (v.report["n_ref_checked"], v.report["n_ref_mismatch"]) == (10, 1)
    assert v.report["ref_mismatch_fraction"] == pytest.approx(0.1)
    assert v.report["ref_mismatch_examples"] == [f"chr17:70 REF={bad_del} FASTA={base(70, 3)}"]
    assert v.report["n_sites"] == 9 and v.report["n_sites_read"] == 10


def test_build_mismatch_raises_with_fraction_and_example(tmp_path: Path, genome: Genome) -> None:
    records = [rec("chr17", p, other(base(p)), base(p), "0|1", "0|0", "0|0") for p in (10, 20, 30)]
    records.append(snp(40, "0|1", "0|0", "0|0"))
    path = write_vcf(tmp_path / "hg19_calls.vcf", records)
    with pytest.raises(InputError) as err:
        read_variants(path, genome)
    message = str(err.value)
    assert "hg19_calls.vcf" in message
    assert "3 of 4 sites (75.0%)" in message
    assert "genome-build mismatch" in message
    assert f"chr17:10 REF={other(base(10))} FASTA={base(10)}" in message


def test_check_ref_alleles_skips_sites_off_the_genome(tmp_path: Path, genome: Genome) -> None:
    sites = pa.table(
        {
            "chrom": ["chr17", "chr9", "chr2"],
            "pos": [10, 5, 119],
            "variant_id": [None, None, None],
            "ref": [base(10), "A", base(119, 2, CHR2) + "ACG"],
            "alt": [["A"], ["C"], ["G"]],
        },
        schema=schema.VARIANT_SITES,
    )
    result = check_ref_alleles(sites, genome, tmp_path / "x.vcf", 0.0)
    assert result["n_ref_checked"] == 1  # chr9 is absent, the chr2 REF runs past the record's end
    assert result["mismatch_mask"].tolist() == [False, False, False]


# Chromosomes ------------------------------------------------------------------------------------------------


def test_chromosome_names_follow_the_fasta(tmp_path: Path, genome: Genome) -> None:
    records = [snp(10, "0|1", "0|0", "0|0", chrom="17"), snp(15, "0|1", "0|0", "0|0", chrom="2", seq=CHR2)]
    path = write_vcf(tmp_path / "a.vcf", records, contigs=("17", "2"))
    v = read_variants(path, genome)
    assert v.sites.column("chrom").to_pylist() == ["chr17", "chr2"]
    assert v.report["renamed_chroms"] == {"17": "chr17", "2": "chr2"}
    assert v.report["n_ref_mismatch"] == 0

    no_genome = read_variants(path)
    assert no_genome.sites.column("chrom").to_pylist() == ["chr17", "chr2"]
    assert no_genome.report["n_ref_checked"] == 0


def test_chromosome_absent_from_fasta(tmp_path: Path, genome: Genome) -> None:
    records = [snp(10, "0|1", "0|0", "0|0"), rec("chrY", 5, "A", "C", "0|1", "0|0", "0|0")]
    path = write_vcf(tmp_path / "a.vcf", records, contigs=("chr17", "chrY"))
    with pytest.raises(InputError) as err:
        read_variants(path, genome)
    assert "a.vcf" in str(err.value) and "chrY (1 sites)" in str(err.value)
    assert "genome_partial" in str(err.value)

    v = read_variants(path, genome, genome_partial=True)
    assert v.report["n_sites_off_genome"] == 1
    assert v.report["n_ref_checked"] == 1
    assert v.sites.column("chrom").to_pylist() == ["chr17", "chrY"]


def test_site_past_the_end_of_its_record(tmp_path: Path, genome: Genome) -> None:
    path = write_vcf(
        tmp_path / "a.vcf", [snp(10, "0|1", "0|0", "0|0"), rec("chr2", 500, "A", "C", "0|1", "0|0", "0|0")]
    )
    with pytest.raises(InputError) as err:
        read_variants(path, genome)
    assert "chr2:500 (record length 120)" in str(err.value)
    assert read_variants(path, genome, genome_partial=True).report["n_sites_off_genome"] == 1


def test_no_site_on_the_genome_fails_even_when_partial(tmp_path: Path, genome: Genome) -> None:
    path = write_vcf(tmp_path / "mouse.vcf", [rec("chr19_mm", 5, "A", "C", "0|1", "0|0", "0|0")], contigs=())
    with pytest.raises(InputError) as err:
        read_variants(path, genome, genome_partial=True)
    assert "mouse.vcf" in str(err.value) and "none of its 1 sites" in str(err.value)
    assert "chr19_mm" in str(err.value)


# Malformed files --------------------------------------------------------------------------------------------


def test_missing_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nowhere\.vcf: VCF file not found"):
        read_variants(tmp_path / "nowhere.vcf")
    (tmp_path / "empty.vcf").write_text("")
    with pytest.raises(InputError, match=r"empty\.vcf: VCF file is empty"):
        read_variants(tmp_path / "empty.vcf")


@pytest.mark.parametrize("bgzip", [False, True])
def test_truncated_gzip(tmp_path: Path, bgzip: bool) -> None:
    records = [snp(p, "0|1", "0|0", "1|1") for p in range(10, 300, 3)]
    if bgzip:
        path = write_compressed(write_vcf(tmp_path / "a.vcf", records), tmp_path / "cut.vcf.gz")
    else:
        path = write_vcf(tmp_path / "cut.vcf.gz", records)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError) as err:
        read_variants(path)
    assert "cut.vcf.gz" in str(err.value) and "truncated" in str(err.value)


def test_not_a_vcf(tmp_path: Path) -> None:
    path = tmp_path / "expr.tsv"
    path.write_text("gene\tsample\tvalue\nENSG1\ts1\t3.5\n")
    with pytest.raises(InputError) as err:
        read_variants(path)
    assert "expr.tsv" in str(err.value) and "is not a VCF" in str(err.value)

    no_chrom = tmp_path / "headless.vcf"
    no_chrom.write_text("##fileformat=VCFv4.2\nchr17\t10\t.\tA\tC\t.\tPASS\t.\tGT\t0|1\n")
    with pytest.raises(InputError, match=r"headless\.vcf.*no '#CHROM' header line"):
        read_variants(no_chrom)


def test_a_sample_named_twice_is_named_in_the_error(tmp_path: Path) -> None:
    """htslib refuses a repeated sample name as "cannot parse VCF header"; the error names the sample, and finds it
    past a header of thousands of ##contig lines (a GRCh38 VCF's header is larger than one read of the file)."""
    contigs = ("chr17", "chr2", *(f"chrUn_{i:05d}" for i in range(3000)))
    path = write_vcf(tmp_path / "twice.vcf.gz", [snp(10, "0|1", "0|0", "0|0")], samples=["S1", "S2", "S1"],
                     contigs=contigs)
    with pytest.raises(InputError, match=r"twice\.vcf\.gz: names sample\(s\) S1 twice in its #CHROM line"):
        read_variants(path)


def test_no_gt_field_in_header(tmp_path: Path) -> None:
    path = write_vcf(tmp_path / "dosage.vcf", [snp(10, "0|1", "0|0", "0|0")], gt_header=False)
    with pytest.raises(InputError) as err:
        read_variants(path)
    assert "dosage.vcf" in str(err.value) and "no GT field" in str(err.value)
    assert "##FORMAT=<ID=GT" in str(err.value)


def test_no_samples(tmp_path: Path) -> None:
    path = tmp_path / "sites.vcf"
    path.write_text(
        "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\nchr17\t10\t.\tA\tC\t.\t.\t.\n"
    )
    with pytest.raises(InputError, match=r"sites\.vcf: has no sample columns"):
        read_variants(path)


def test_unsorted_positions_name_the_record(tmp_path: Path) -> None:
    records = [snp(10, "0|1", "0|0", "0|0"), snp(30, "0|1", "0|0", "0|0"), snp(20, "0|1", "0|0", "0|0")]
    path = write_vcf(tmp_path / "unsorted.vcf", records)
    with pytest.raises(InputError) as err:
        read_variants(path)
    message = str(err.value)
    # 5 header lines (fileformat, 2 contigs, GT, #CHROM), so record 3 is line 8
    assert "unsorted.vcf" in message and "chr17:20 (record 3, line 8)" in message
    assert "bcftools sort" in message


def test_chromosome_reappearing_is_unsorted(tmp_path: Path) -> None:
    records = [
        snp(10, "0|1", "0|0", "0|0"),
        snp(5, "0|1", "0|0", "0|0", chrom="chr2", seq=CHR2),
        snp(40, "0|1", "0|0", "0|0"),
    ]
    with pytest.raises(InputError) as err:
        read_variants(write_vcf(tmp_path / "mixed.vcf.gz", records))
    message = str(err.value)
    assert "mixed.vcf.gz" in message and "chromosome chr17 appears again after chr2" in message
    assert "chr17:40 (record 3, line 8)" in message


def test_unparsable_record_names_its_number(tmp_path: Path) -> None:
    records = [snp(10, "0|1", "0|0", "0|0"), "chr17 abc . A C . PASS . GT 0|1 0|0 0|0"]
    with pytest.raises(InputError) as err:
        read_variants(write_vcf(tmp_path / "bad.vcf", records))
    assert "bad.vcf" in str(err.value) and "record 2, line 7" in str(err.value)


def test_allele_index_beyond_alt_count(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        read_variants(write_vcf(tmp_path / "a.vcf", [snp(10, "0|3", "0|0", "0|0")]))
    assert "a.vcf" in str(err.value) and "chr17:10 (record 1" in str(err.value)


# Samples ----------------------------------------------------------------------------------------------------


def test_sample_map_tsv_and_csv(tmp_path: Path) -> None:
    tsv = tmp_path / "map.tsv"
    tsv.write_text("vcf_sample\tdonor_id\tnote\ns1\tD1\tx\ns2\tD2\t\ns3\tD3\ty\n")
    csv = tmp_path / "map.csv"
    csv.write_text("donor_id,vcf_sample\nD1,s1\nD2,s2\n")
    assert read_sample_map(tsv) == {"s1": "D1", "s2": "D2", "s3": "D3"}
    assert read_sample_map(csv) == {"s1": "D1", "s2": "D2"}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("vcf_sample\tdonor\ns1\tD1\n", "lacks column(s) donor_id"),
        ("vcf_sample,donor_id\ns1,D1\ns2,D2\ns1,D3\n", "vcf_sample 's1' appears twice; at lines 2 and 4"),
        ("vcf_sample,donor_id\ns1,D1\ns2,D1\n", "donor_id 'D1' appears twice; at lines 2 and 3"),
        ("vcf_sample,donor_id\ns1,D1\n,D2\n", "empty value; at line 3"),
    ],
)
def test_sample_map_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad_map.csv"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        read_sample_map(path)
    assert "bad_map.csv" in str(err.value) and needle in str(err.value)


def test_sample_map_and_subset(tmp_path: Path, genome: Genome) -> None:
    path = write_vcf(tmp_path / "a.vcf", good_records())
    mapping = {"s1": "D1", "s2": "D2", "s3": "D3"}
    v = read_variants(path, genome, sample_map=mapping)
    assert v.samples == ["D1", "D2", "D3"]

    subset = read_variants(path, genome, sample_map=mapping, samples=["D3", "D1"])
    assert subset.samples == ["D3", "D1"]
    assert np.array_equal(subset.genotypes, v.genotypes[:, [2, 0]])
    assert np.array_equal(subset.phased, v.phased[:, [2, 0]])
    assert subset.report["n_samples"] == 2


def test_vcf_samples_absent_from_the_map(tmp_path: Path, caplog) -> None:
    """A cohort VCF holds people who were never measured: the map links those who were, the others are not read
    (and said so); a map that names none of the VCF's samples is refused."""
    path = write_vcf(tmp_path / "cohort.vcf", [snp(10, "0|1", "0|0", "0|0")])
    with caplog.at_level("INFO", logger="geximpute.io.variants"):
        mapped = read_variants(path, sample_map={"s1": "D1"})
    assert mapped.samples == ["D1"] and mapped.genotypes.shape[1] == 1
    assert "2 of 3 VCF samples are not in the sample map and are not read: s2, s3" in caplog.text
    with pytest.raises(InputError) as err:
        read_variants(path, sample_map={"elsewhere": "D1"})
    message = str(err.value)
    assert "cohort.vcf" in message and "none of its 3 VCF samples is in the sample map" in message

    # choosing mapped donors only is fine; asking for a donor the map cannot reach names the unmapped samples
    assert read_variants(path, sample_map={"s1": "D1"}, samples=["D1"]).samples == ["D1"]
    with pytest.raises(InputError) as err:
        read_variants(path, sample_map={"s1": "D1"}, samples=["D1", "D9"])
    assert "requested donors are not in the VCF: D9" in str(err.value) and "s2, s3" in str(err.value)


def test_samples_not_in_vcf_and_repeated(tmp_path: Path) -> None:
    path = write_vcf(tmp_path / "a.vcf", [snp(10, "0|1", "0|0", "0|0")])
    with pytest.raises(InputError, match=r"a\.vcf: 1 of 2 requested donors are not in the VCF: s7"):
        read_variants(path, samples=["s1", "s7"])
    with pytest.raises(ConfigError, match="repeated: s1"):
        read_variants(path, samples=["s1", "s1"])


# Regions ----------------------------------------------------------------------------------------------------


def region_records() -> list[str]:
    return [snp(p, "0|1", "0|0", "1|1") for p in (10, 20, 30, 40, 50)] + [
        snp(p, "1|1", "0|0", "0|1", chrom="chr2", seq=CHR2) for p in (5, 60)
    ]


def test_regions_filter_while_streaming(tmp_path: Path, genome: Genome) -> None:
    path = write_vcf(tmp_path / "a.vcf", region_records())
    # '17' and 'chr17' name one chromosome; overlapping intervals are merged, not read twice
    v = read_variants(path, genome, regions=[("17", 15, 30), ("chr17", 25, 40), ("chr2", 50, 70)])
    assert list(zip(v.sites.column("chrom").to_pylist(), v.sites.column("pos").to_pylist(), strict=True)) == [
        ("chr17", 20),
        ("chr17", 30),
        ("chr17", 40),
        ("chr2", 60),
    ]
    assert v.genotypes.shape == (4, 3, 2) and v.report["indexed"] is False


def test_regions_through_the_index(tmp_path: Path, genome: Genome) -> None:
    plain = write_vcf(tmp_path / "a.vcf", region_records())
    bcf = write_compressed(plain, tmp_path / "a.bcf")
    build_index(bcf)
    regions = [("chr17", 15, 30), ("chr2", 1, 10)]
    v = read_variants(bcf, genome, regions=regions)
    streamed = read_variants(plain, genome, regions=regions)
    assert v.report["indexed"] is True
    assert v.sites.column("pos").to_pylist() == [20, 30, 5]
    assert v.sites.equals(streamed.sites)
    assert np.array_equal(v.genotypes, streamed.genotypes)


def test_bad_region_is_a_config_error(tmp_path: Path) -> None:
    path = write_vcf(tmp_path / "a.vcf", region_records())
    with pytest.raises(ConfigError, match="start <= end"):
        read_variants(path, regions=[("chr17", 40, 10)])


# Real data --------------------------------------------------------------------------------------------------


@pytest.mark.real_data
def test_real_1000_genomes_subset(real_data) -> None:
    with Genome(REAL_FASTA) as genome:
        v = read_variants(REAL_VCF, genome)
    assert v.genotypes.shape == (139, 1126, 2)
    assert len(v.samples) == 1126 and v.samples[0] == "HG00096"
    assert v.phased.all()
    assert v.report["n_ref_checked"] == 139
    assert v.report["n_ref_mismatch"] == 0 and v.report["ref_mismatch_fraction"] == 0.0
    assert v.report["n_sites_off_genome"] == 0 and v.report["n_missing_calls"] == 0
    assert set(v.sites.column("chrom").to_pylist()) == {"chr17"}
    assert v.sites.slice(0, 1).to_pylist()[0] == {
        "chrom": "chr17",
        "pos": 156665,
        "variant_id": "rs186047019",
        "ref": "C",
        "alt": ["T"],
    }
    assert int(v.genotypes.max()) <= 2 and int(v.genotypes.min()) >= 0


def test_a_header_naming_fewer_samples_than_the_records_hold_is_refused(tmp_path: Path) -> None:
    """A sample name lost from the #CHROM line: htslib read the first columns by the names left, each donor a
    neighbour's genotypes, without a word. Plain and gzip alike."""
    records = [snp(10, "0|1", "0|0", "1|1"), snp(20, "0|0", "0|1", "1|1")]
    for name in ("lost.vcf", "lost.vcf.gz"):
        path = write_vcf(tmp_path / name, records, samples=SAMPLES[:2])
        with pytest.raises(InputError, match=rf"{name}: a record has 12 columns where the #CHROM line names 2 "
                                             r"sample\(s\); at line 6; expected 11 tab-separated columns"):
            read_variants(path)
    assert read_variants(write_vcf(tmp_path / "whole.vcf", records)).genotypes.shape == (2, 3, 2)
    trailing = [r + " " for r in records]  # a trailing tab (written by some tools) is no sample column
    assert read_variants(write_vcf(tmp_path / "trailing.vcf", trailing)).genotypes.shape == (2, 3, 2)

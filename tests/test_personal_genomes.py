"""Personal genomes for real (issue 14): the phenotype-BED expression layout and the Geuvadis files as shipped, VCFs
read by region, the missing-call and unphased-heterozygote policies, the cis window of the genetic score and the
elastic net, and nightly predictions that read each new donor's own genome."""

from __future__ import annotations

import dataclasses
import gzip
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import donor_vcf, nightly_config, read_nightly

from geximpute.config import config_from_dict, load_config
from geximpute.errors import ConfigError, InputError
from geximpute.io.dataset import load_dataset, variant_regions
from geximpute.io.expression import read_expression, to_model_scale
from geximpute.io.fasta import Genome
from geximpute.io.variants import read_variants
from geximpute.science.baselines import ElasticNetBaseline
from geximpute.science.genomes import genetic_scores
from geximpute.science.problem import make_problem

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def geuvadis(real_data) -> Path:
    folder = real_data / "geuvadis"
    assert folder.is_dir(), f"{folder} is absent: ../shared/data/real must hold it"  # a failure, as real_data's
    return folder


# Phenotype BED and the Geuvadis files ---------------------------------------------------------------------------


def test_phenotype_bed_gives_genes_people_and_one_tissue(geuvadis):
    bed = geuvadis / "geuvadis_lcl_chr22_genes_expression.bed.gz"
    config = config_from_dict({"inputs": {"expression": str(bed), "scale": "normalised", "tissue": "LCL"}})
    dataset = load_dataset(config)
    raw = pd.read_csv(bed, sep="\t", nrows=5)
    assert dataset.expression.shape == (608, 358)
    assert dataset.expression.sample_ids[:3] == list(raw.columns[6:9])
    # every column is a person: one sample per donor, all of one tissue
    assert dataset.samples["donor_id"].to_pylist() == dataset.expression.sample_ids
    assert set(dataset.samples["tissue"].to_pylist()) == {"LCL"}
    # the genes come from the BED: TSS = end (a 1-bp interval at the TSS), strand from its sixth column
    genes = dataset.genes.table.to_pandas().set_index("gene_id")
    for _, row in raw.iterrows():
        gene = genes.loc[row["gene"].split(".")[0]]
        assert (gene["chrom"], gene["tss"], gene["strand"]) == (row["#chr"], row["end"], row["strand"])
    # values are used as they are: no log1p for scale 'normalised'
    values = to_model_scale(dataset.expression, config.expression)
    assert np.allclose(values[0, :3], raw.iloc[0, 6:9].to_numpy(float), atol=1e-6)


def test_normalised_scale_keeps_negative_values_and_tpm_refuses_them(tmp_path):
    bed = tmp_path / "ranks.bed"
    bed.write_text("#chr\tstart\tend\tgene\tgid\tstrand\tP1\tP2\tP3\n"
                   "chr1\t99\t100\tENSG1.4\tENSG1\t+\t-1.25\t0.5\t0.75\n"
                   "chr1\t499\t500\tG2\tG2\t-\t0.1\t-0.2\t0.3\n")
    expr = read_expression(bed, "auto", "normalised")
    assert expr.gene_ids == ["ENSG1", "G2"] and expr.sample_ids == ["P1", "P2", "P3"]
    assert expr.values[0, 0] == pytest.approx(-1.25)
    with pytest.raises(InputError, match=r"negative expression value -1\.25.*normalised"):
        read_expression(bed, "auto", "tpm")
    # FastQTL's four-column layout has no strand: the genes must then come from an annotation
    fastqtl = tmp_path / "fastqtl.bed"
    fastqtl.write_text("#Chr\tstart\tend\tID\tP1\tP2\nchr1\t99\t100\tG1\t1.0\t2.0\n")
    with pytest.raises(InputError, match="no strand column"):
        load_dataset(config_from_dict({"inputs": {"expression": str(fastqtl), "scale": "normalised"}}))
    with pytest.raises(ConfigError, match="inputs.genes"):
        config_from_dict({"inputs": {"expression": str(tmp_path / "table.tsv")}})


def test_geuvadis_config_reads_the_files_as_shipped_with_the_gtf(geuvadis):
    config = load_config(REPO / "configs" / "geuvadis-lcl.yaml")
    assert config.evaluation.task == "samples" and config.evaluation.whole_donors
    assert config.evaluation.fraction == 0.25 and config.genotypes.cis_window == 100_000
    dataset = load_dataset(config, with_variants=False)
    assert config.inputs.genes.endswith("gencode.v19.chr22.gtf.gz")
    report = dataset.report
    assert report["genes"]["expression_with_annotation"] == 608
    assert report["samples"]["donors"] == 358 and report["samples"]["tissues"] == 1
    # the TSS is the GTF's (the gene's 5' end), the gene name too
    genes = dataset.genes.table.to_pandas().set_index("gene_id")
    assert genes.loc["ENSG00000215270", "gene_name"] is not None


def test_an_hg19_vcf_with_an_hg38_fasta_is_refused(geuvadis, real_data):
    with pytest.raises(InputError, match="none of its .* sites lies on the FASTA|REF alleles disagree"):
        read_variants(geuvadis / "1000G_phase1_chr22_hg19_unphased.vcf.gz",
                      genome=Genome(real_data / "sequence" / "hg38_sparse_promoters.fa.gz"),
                      genome_partial=True)


def test_vcf_is_read_in_the_model_windows_only_through_the_index_or_streaming(geuvadis, tmp_path):
    config = load_config(REPO / "configs" / "geuvadis-lcl.yaml", ["genotypes.cis_window=5000"])
    dataset = load_dataset(config)
    regions = variant_regions(dataset.genes, dataset.expression.gene_ids, config)
    v = dataset.variants
    assert v.report["indexed"] is True
    pos = v.sites["pos"].to_numpy()
    starts = np.array([r[1] for r in regions])
    ends = np.array([r[2] for r in regions])
    inside = ((pos[:, None] >= starts[None, :]) & (pos[:, None] <= ends[None, :])).any(axis=1)
    assert inside.all() and 1_000 < len(pos) < 46_312  # only the windows: far from the file's 46,312 SNPs
    # the same sites without an index (streamed, filtered as they pass)
    plain = tmp_path / "noindex.vcf.gz"
    shutil.copy(geuvadis / "1000G_phase1_chr22_hg19_unphased.vcf.gz", plain)
    streamed = read_variants(plain, dataset.genome, regions=regions, genome_partial=True,
                             samples=v.samples[:5])
    assert streamed.report["indexed"] is False
    assert np.array_equal(streamed.sites["pos"].to_numpy(), pos)
    assert np.array_equal(streamed.genotypes, v.genotypes[:, :5])


# A small dataset written on the fly: one chromosome, two genes, 40 people -----------------------------------------

N_PEOPLE = 40
TSS1, TSS2 = 5_000, 40_000
FAR = TSS1 + 20_000  # a SNP 20 kb from gene 1's TSS: outside its promoter, inside a 50 kb cis window


def _small_dataset(tmp: Path, extra_records: list[str] = (), gts: dict[int, list[str]] | None = None,
                   effect_far: float = 1.0) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    random.seed(1)
    chrom = "".join(random.choice("ACGT") for _ in range(60_000))
    (tmp / "ref.fa").write_text(">chr1\n" + "\n".join(chrom[i:i + 60] for i in range(0, len(chrom), 60)) + "\n")
    people = [f"P{i:02d}" for i in range(N_PEOPLE)]
    far = rng.integers(0, 3, N_PEOPLE)
    records = {FAR: [["0/0", "0/1", "1/1"][d] for d in far]}
    records.update(gts or {})
    lines = ["##fileformat=VCFv4.2", "##contig=<ID=chr1,length=60000>",
             '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
             "\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT", *people])]
    for pos in sorted(records):
        ref = chrom[pos - 1]
        alt = {"A": "C", "C": "G", "G": "T", "T": "A"}[ref]
        lines.append("\t".join(["chr1", str(pos), f"s{pos}", ref, alt, ".", "PASS", ".", "GT", *records[pos]]))
    (tmp / "people.vcf").write_text("\n".join([*lines, *extra_records]) + "\n")
    level1 = 2.0 + effect_far * far + rng.normal(0, 0.3, N_PEOPLE)
    level2 = 1.0 + rng.normal(0, 0.3, N_PEOPLE)
    header = "#chr\tstart\tend\tgene\tlength\tstrand\t" + "\t".join(people)
    rows = [f"chr1\t{TSS1 - 1}\t{TSS1}\tG1\t1000\t+\t" + "\t".join(f"{x:.4f}" for x in level1),
            f"chr1\t{TSS2 - 1}\t{TSS2}\tG2\t1000\t-\t" + "\t".join(f"{x:.4f}" for x in level2)]
    with gzip.open(tmp / "expr.bed.gz", "wt") as fh:
        fh.write("\n".join([header, *rows]) + "\n")
    inputs = {"expression": str(tmp / "expr.bed.gz"), "scale": "normalised", "tissue": "LCL",
              "genome": str(tmp / "ref.fa"), "variants": str(tmp / "people.vcf")}
    return tmp, {"inputs": inputs, "evaluation": {"task": "samples", "whole_donors": True, "fraction": 0.25}}


def _problem(data: dict, **genotypes):
    config = config_from_dict({**data, "genotypes": genotypes})
    dataset = load_dataset(config)
    return make_problem(dataset)


def test_cis_window_feeds_the_genetic_score_and_the_elastic_net_beyond_the_promoter(tmp_path):
    _, data = _small_dataset(tmp_path)
    promoter_only, _ = _problem(data)
    assert promoter_only.genomes.gene_dosage(0).shape[0] == 0  # the far SNP is outside the promoter window
    problem, truth = _problem(data, cis_window=50_000)
    genomes = problem.genomes
    assert genomes.gene_dosage(0).shape[0] == 1 and genomes.gene_dosage(1).shape[0] == 1  # 15 kb from gene 2 too
    scores, _ = genetic_scores(genomes, problem.values, problem.tissue_index, problem.donor_index, 1, None)
    # held-out people: their score comes from their genotype only, and follows the planted effect
    hidden = np.unique(problem.donor_index[truth.sample_index])
    dosage = genomes.gene_dosage(0)[0]
    assert np.corrcoef(scores[0, hidden], dosage[hidden])[0, 1] > 0.99
    assert np.all(np.isnan(problem.values[:, np.isin(problem.donor_index, hidden)]))
    # the elastic net reads the very same sites: it predicts held-out people from the far SNP
    net = ElasticNetBaseline(seed=0)
    net.fit(problem)
    assert net.n_fitted >= 1
    assert np.corrcoef(net.genetic[0, hidden], dosage[hidden])[0, 1] > 0.99
    assert promoter_only.genomes.report["n_cis_site_links"] == 0 and genomes.report["n_cis_site_links"] == 2


def test_missing_call_policies(tmp_path):
    gts = {TSS1 - 100: ["0/1"] * (N_PEOPLE - 1) + ["./."]}
    _, data = _small_dataset(tmp_path, gts=gts)
    mean, _ = _problem(data, missing="mean")
    last = mean.donors.index(f"P{N_PEOPLE - 1:02d}")
    assert np.isnan(mean.genomes.gene_dosage(0)[0, last]) and mean.genomes.gene_dosage(0)[0, 0] == 1
    reference, _ = _problem(data, missing="reference")
    assert reference.genomes.gene_dosage(0)[0, last] == 0
    # the missing call's haplotypes read REF in both policies
    ref_row = reference.genomes.reference_row[0]
    assert (reference.genomes.rows[0, last] == ref_row).all() and (mean.genomes.rows[0, last] == ref_row).all()
    with pytest.raises(InputError, match=rf"missing (call|allele).*site chr1:{TSS1 - 100}.*donor P{N_PEOPLE - 1:02d}"):
        _problem(data, missing="error")


def test_unphased_heterozygotes_at_two_sites_of_a_window(tmp_path):
    # P00: 1/0 and 0/1 (unphased, ambiguous); P01: 1|0 and 0|1 (phased: never changed); the rest REF
    a, b = TSS1 - 200, TSS1 + 100
    gts = {a: ["1/0", "1|0"] + ["0/0"] * (N_PEOPLE - 2), b: ["0/1", "0|1"] + ["0/0"] * (N_PEOPLE - 2)}
    _, data = _small_dataset(tmp_path, gts=gts)

    def haplotypes(policy: str) -> tuple[list[str], list[str]]:
        problem, _ = _problem(data, unphased=policy)
        g = problem.genomes
        return ([g.sequences[r] for r in g.rows[0, problem.donors.index("P00")]],
                [g.sequences[r] for r in g.rows[0, problem.donors.index("P01")]])

    reference = _problem(data)[0].genomes
    ref_seq = reference.sequences[reference.reference_row[0]]
    ia, ib = a - (TSS1 - 1000), b - (TSS1 - 1000)  # offsets in the '+' window
    written, phased = haplotypes("as_written")
    # as written: one ALT on each haplotype
    assert [s[ia] != ref_seq[ia] for s in written] == [True, False]
    assert [s[ib] != ref_seq[ib] for s in written] == [False, True]
    cis, phased_cis = haplotypes("cis")
    assert cis[0] == ref_seq  # both ALTs on haplotype B
    assert cis[1][ia] != ref_seq[ia] and cis[1][ib] != ref_seq[ib]
    assert phased_cis == phased  # phased calls keep their phase
    assert _problem(data, unphased="cis")[0].genomes.report["n_ambiguous_phase_pairs"] == 1
    with pytest.raises(InputError, match=rf"gene G1 whose phase relative to each other is unknown.*donor P00, "
                                         rf"sites chr1:{a} \(unphased\), chr1:{b} \(unphased\)"):
        _problem(data, unphased="error")


def _append_records(vcf: Path, records: list[str], header: tuple[str, ...] = ()) -> None:
    """Add ``records`` (sorted, after the file's own) and ``header`` lines (before #CHROM) to a VCF."""
    lines = vcf.read_text().splitlines()
    head = [line for line in lines if line.startswith("#")]
    body = [line for line in lines if not line.startswith("#")]
    vcf.write_text("\n".join([*head[:-1], *header, head[-1], *body, *records]) + "\n")


def _bases(tmp: Path, pos: int) -> tuple[str, str, str]:
    """The reference base at ``pos`` of the small dataset's chromosome and two other bases."""
    with Genome(tmp / "ref.fa") as fasta:
        ref = fasta.fetch("chr1", pos, pos).upper()
    x, y = [b for b in "ACGT" if b != ref][:2]
    return ref, x, y


def test_each_alt_of_a_multiallelic_site_is_a_variant_of_its_own(tmp_path):
    """``1/2`` is one copy of each ALT and ``2/2`` two of the second, not two of "ALT" (they were one dosage); the
    spanning deletion ``*`` is no variant of this site. A new donor's VCF may split a site into one record per ALT
    (with ``bcftools norm -m - -f``'s trimming of an indel too), or write only some of its ALTs, in any order: each
    ALT's copies are found; a no-call or a record that failed a FILTER there is unknown, never REF."""
    from geximpute.steps.nightly import InboxItem, NewDonor, donor_haplotypes, extend_problem

    tmp, data = _small_dataset(tmp_path)
    site, indel = TSS2 + 50, TSS2 + 120  # in gene 2's promoter window ('-' strand)
    ref, x, y = _bases(tmp, site)
    with Genome(tmp / "ref.fa") as fasta:
        b0, b1, b2 = fasta.fetch("chr1", indel, indel + 2).upper()
    gts = ["1/2", "2/2", "1/1", "0/3"] + ["0/0"] * (N_PEOPLE - 4)
    _append_records(tmp / "people.vcf", [
        "\t".join(["chr1", str(site), "multi", ref, f"{x},{y},*", ".", "PASS", ".", "GT", *gts]),
        "\t".join(["chr1", str(indel), "indels", b0 + b1 + b2, f"{b0},{b0 + b1}", ".", "PASS", ".", "GT",
                   *(["1/2", "0/2"] + ["0/0"] * (N_PEOPLE - 2))])])
    problem, _ = _problem(data)
    genomes = problem.genomes
    people = [problem.donors.index(f"P{i:02d}") for i in range(4)]
    dosage = genomes.gene_dosage(1)
    assert dosage.shape[0] == 4  # x and y ('*' has none), then the two deletions
    assert dosage[0, people].tolist() == [1, 0, 2, 0] and dosage[1, people].tolist() == [1, 2, 0, 0]
    assert genomes.site_allele[genomes.site_ptr[1]:genomes.site_ptr[2]].tolist() == [1, 2, 1, 2]
    assert genomes.report["n_multiallelic_cis_sites"] == 2 and genomes.report["n_cis_sites"] == 2
    assert genomes.report["n_cis_alleles"] == 4
    # P01 (2/2) carries y on both haplotypes, P02 (1/1) x: two different promoters
    assert len({genomes.rows[1, people[1], 0], genomes.rows[1, people[2], 0], genomes.reference_row[1]}) == 3

    header = ["##fileformat=VCFv4.2", "##contig=<ID=chr1,length=60000>", '##FILTER=<ID=LowQual,Description="q">',
              '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">']

    def new_donor(name: str, records: list[tuple]) -> NewDonor:
        path = tmp_path / f"{name}.vcf"
        body = [f"chr1\t{FAR}\t.\t{_bases(tmp, FAR)[0]}\t{_bases(tmp, FAR)[1]}\t.\tPASS\t.\tGT\t0/0"]
        body += ["\t".join(["chr1", str(pos), ".", r, alts, ".", flag, ".", "GT", gt])
                 for pos, r, alts, gt, flag in records]
        path.write_text("\n".join([*header, "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t" + name,
                                   *body]) + "\n")
        return NewDonor(InboxItem(name, path), read_variants(path, problem_dataset.genome, samples=[name],
                                                             filtered_as_missing=True))

    problem_dataset = load_dataset(config_from_dict(data))
    base, _ = make_problem(problem_dataset, hidden_mask=False)
    names = ("SPLIT", "YONLY", "NONE", "NOCALL", "LOWQUAL")
    donors = [
        # 1/2 at both sites, each written as one record per ALT; the indel's second ALT trimmed as `norm -f` does
        new_donor("SPLIT", [(site, ref, x, "0/1", "PASS"), (site, ref, y, "1/0", "PASS"),
                            (indel, b0 + b1 + b2, b0, "0/1", "PASS"), (indel + 1, b1 + b2, b1, "1/0", "PASS")]),
        new_donor("YONLY", [(site, ref, f"{y},{x}", "1/1", "PASS")]),  # the ALTs in another order: two copies of y
        new_donor("NONE", []),  # the sites absent on a covered chromosome: REF
        new_donor("NOCALL", [(site, ref, ".", "./.", "PASS")]),  # a no-call written with ALT '.'
        new_donor("LOWQUAL", [(site, ref, x, "1/1", "LowQual")]),  # failed QC: unknown, not REF
    ]
    extended, _ = extend_problem(base, donors, ())
    grown = donor_haplotypes(extended, donors, problem_dataset, base.genomes).genomes
    mine = grown.gene_dosage(1)[:, [extended.donors.index(d) for d in names]]
    np.testing.assert_array_equal(mine[0], [1, 0, 0, np.nan, np.nan])
    np.testing.assert_array_equal(mine[1], [1, 2, 0, np.nan, np.nan])
    np.testing.assert_array_equal(mine[2:, :3], [[1, 0, 0], [1, 0, 0]])


def test_records_that_failed_a_filter_are_not_read_unless_asked(tmp_path):
    tmp, data = _small_dataset(tmp_path)
    records = []
    for offset, flag in ((40, "LowQual"), (60, "."), (80, "PASS;q10")):
        ref, x, _ = _bases(tmp, TSS2 + offset)
        records.append("\t".join(["chr1", str(TSS2 + offset), ".", ref, x, ".", flag, ".", "GT",
                                  *["0/1"] * N_PEOPLE]))
    _append_records(tmp / "people.vcf", records,
                    ('##FILTER=<ID=LowQual,Description="low">', '##FILTER=<ID=q10,Description="q10">'))
    problem, _ = _problem(data)
    assert problem.genomes.gene_dosage(1).shape[0] == 1  # the '.' record alone
    dataset = load_dataset(config_from_dict(data))
    assert dataset.variants.report["n_filtered"] == 2
    assert dataset.variants.report["filtered_examples"][0] == f"chr1:{TSS2 + 40} FILTER=LowQual"
    kept, _ = _problem(data, keep_filtered=True)
    assert kept.genomes.gene_dosage(1).shape[0] == 3


def test_phase_sets_and_a_phased_call_beside_an_unphased_one(tmp_path):
    """Phased calls of two phase sets (FORMAT PS) are phased within their set only, and a phased heterozygote says
    nothing about an unphased one beside it: both leave the donor's two haplotypes ambiguous."""
    tmp, data = _small_dataset(tmp_path)
    a, b = TSS2 + 40, TSS2 + 90
    calls = {a: ["0|1:100", "0|1:100", "0|1:.", "0|1:.", "0|1:7"], b: ["0|1:100", "1|0:200", "0/1:.", "1|0:.", "0/0:7"]}
    records = []
    for pos, gts in calls.items():
        ref, x, _ = _bases(tmp, pos)
        records.append("\t".join(["chr1", str(pos), ".", ref, x, ".", "PASS", ".", "GT:PS",
                                  *gts, *["0/0:."] * (N_PEOPLE - len(gts))]))
    _append_records(tmp / "people.vcf", records,
                    ('##FORMAT=<ID=PS,Number=1,Type=Integer,Description="Phase set">',))
    dataset = load_dataset(config_from_dict(data))
    row = dataset.variants.sites["pos"].to_pylist().index(b)
    assert dataset.variants.phase_set[row, :5].tolist() == [100, 200, -1, -1, 7]
    # P00: one set; P01: two sets; P02: phased beside unphased; P03: phased without PS (one set); P04: one het
    problem, _ = _problem(data)
    assert problem.genomes.report["n_ambiguous_phase_pairs"] == 2
    with pytest.raises(InputError, match=rf"gene G2 whose phase relative to each other is unknown.*donor P01, "
                                         rf"sites chr1:{a} \(PS 100\), chr1:{b} \(PS 200\)"):
        _problem(data, unphased="error")
    cis, _ = _problem(data, unphased="cis")
    p02 = cis.donors.index("P02")
    assert cis.genomes.rows[1, p02, 0] == cis.genomes.reference_row[1]  # both ALTs on haplotype B
    assert cis.genomes.rows[1, p02, 1] != cis.genomes.reference_row[1]


# Nightly reads the new genomes -----------------------------------------------------------------------------------


def _set_genotype(vcf: Path, pos: int, gt: str, out: Path) -> Path:
    lines = vcf.read_text().splitlines()
    for i, line in enumerate(lines):
        fields = line.split("\t")
        if not line.startswith("#") and int(fields[1]) == pos:
            fields[9] = gt
            lines[i] = "\t".join(fields)
            break
    else:
        raise AssertionError(f"{vcf} has no record at {pos}")
    out.write_text("\n".join(lines) + "\n")
    return out


def test_nightly_predicts_new_donors_from_their_own_genomes(tiny_model, tmp_path):
    data = tiny_model.data
    eqtls = pd.read_csv(data / "truth" / "eqtls.tsv", sep="\t")
    f = eqtls["alt_frequency"]
    pick = eqtls.loc[(eqtls["effect"].abs() * np.sqrt(f * (1 - f))).idxmax()]
    gene, pos, effect = pick["gene_id"], int(pick["pos"]), float(pick["effect"])
    genes = pd.read_csv(data / "genes.gtf", sep="\t", header=None, comment="#")
    genes = genes[(genes[2] == "gene") & (genes[0] == "chr1")]
    tss = np.sort(np.where(genes[6] == "+", genes[3], genes[4]))
    gaps = np.diff(tss)
    lonely = int(tss[np.argmax(gaps)] + gaps.max() // 2)  # the middle of the widest gap between chr1's TSSs
    assert gaps.max() > 10_000
    with Genome(data / "genome.fa") as fasta:
        lonely_ref = fasta.fetch("chr1", lonely, lonely).upper()

    def run(work: Path, *extra: str) -> pd.DataFrame:
        inbox = work / "inbox"
        inbox.mkdir(parents=True)
        base = donor_vcf(data / "variants.vcf", "SYN-D0001", "X", work / "base.vcf")
        for name, gt in (("NEW-REF", "0|0"), ("NEW-ALT", "1|1")):
            _set_genotype(base, pos, gt, inbox / f"{name}.vcf")
            text = (inbox / f"{name}.vcf").read_text().replace("\tX\n", f"\t{name}\n", 1)
            (inbox / f"{name}.vcf").write_text(text)
        # a genome that lacks the model's regions: one record, far from every gene's window
        header = [line for line in base.read_text().splitlines() if line.startswith("#")]
        far = "\t".join(["chr1", str(lonely), ".", lonely_ref, "ACGT"["ACGT".index(lonely_ref) - 1], ".", "PASS", ".",
                         "GT", "0|1"])
        (inbox / "NEW-EMPTY.vcf").write_text("\n".join(header).replace("\tX", "\tNEW-EMPTY") + "\n" + far + "\n")
        config = nightly_config(data, tiny_model.folder, work, *extra)
        from geximpute.steps.nightly import nightly, output_root

        result = nightly(config, run_date="2026-02-01")
        return result, read_nightly(output_root(config))

    result, frame = run(tmp_path / "genomes")
    assert sorted(result.done) == ["NEW-ALT", "NEW-REF"]
    assert "windows the model reads" in result.quarantined["NEW-EMPTY.vcf"]
    mine = frame[frame["gene_id"] == gene].pivot(index="tissue", columns="donor_id", values="predicted")
    diff = (mine["NEW-ALT"] - mine["NEW-REF"]).to_numpy()
    assert np.all(np.sign(diff) == np.sign(effect)), (gene, effect, diff)
    # other genes whose windows do not hold the site: the two donors are predicted alike
    others = frame[frame["gene_id"] != gene].pivot_table(index=["gene_id", "tissue"], columns="donor_id",
                                                         values="predicted")
    assert np.median(np.abs(others["NEW-ALT"] - others["NEW-REF"])) < np.abs(diff).mean() / 5

    # a model without personal genomes: both donors are predicted from the reference genome, identically
    _, frame = run(tmp_path / "reference", "inputs.variants=null")
    table = frame.pivot_table(index=["gene_id", "tissue"], columns="donor_id", values="predicted")
    assert np.array_equal(table["NEW-ALT"].to_numpy(), table["NEW-REF"].to_numpy())


def test_evaluation_splits_genes_by_cis_and_promoter_variants(tmp_path):
    from geximpute.science.genomes import gene_variant_flags
    from geximpute.steps.evaluate import genetic_comparisons, genetic_table

    gts = {TSS1 - 100: ["0/1", "1/1"] * (N_PEOPLE // 2)}  # a promoter SNP of gene 1
    _, data = _small_dataset(tmp_path, gts=gts)
    config = config_from_dict({**data, "genotypes": {"cis_window": 50_000}})
    dataset = load_dataset(config)
    problem, truth = make_problem(dataset)
    n_cis, promoter = gene_variant_flags(problem.genomes, dataset.variants.sites["pos"].to_numpy(), problem.tss,
                                         problem.strand, 1000, 500)
    assert n_cis.tolist() == [2, 2] and promoter.tolist() == [True, False]
    gene, sample = truth.gene_index, truth.sample_index
    tissue = problem.tissue_index[sample]
    dosage = np.stack([problem.genomes.gene_dosage(g)[-1] for g in range(2)])  # the far SNP
    donors = problem.donor_index[sample]
    predictions = {"hybrid": dosage[gene, donors] + 0.01 * truth.values, "elastic_net": dosage[gene, donors],
                   "hybrid_reference": np.zeros(len(gene))}
    table = genetic_table(dataclasses_replace_min_donors(config), predictions, truth.values, gene, tissue,
                          problem.gene_ids, (n_cis, promoter))
    assert table["n_genes_cis_variant"] == 2 and table["n_genes_promoter_variant"] == 1
    assert table["n_genes_no_promoter_variant"] == 1
    assert table["mean_promoter_variant"]["hybrid_reference"] == 0.0
    assert [r["promoter_variant"] for r in table["per_gene"]] == [True, False]
    comparisons = genetic_comparisons(dataclasses_replace_min_donors(config), predictions, truth.values, gene,
                                      tissue, (n_cis, promoter))
    assert set(comparisons) == {"genetic_cis_variant", "genetic_promoter_variant", "genetic_no_promoter_variant"}

    # a planted truth that names each gene's kind of effect splits the table and the intervals by kind
    planted = tmp_path / "planted.tsv"
    planted.write_text("gene_id\th2\tgenetic_effect\n"
                       f"{problem.gene_ids[0]}\t0.3\tmotif_loss\n{problem.gene_ids[1]}\t0.5\tadditive\n")
    config = dataclasses_replace_min_donors(config)
    config = dataclasses.replace(config, evaluation=dataclasses.replace(config.evaluation,
                                                                        heritability=str(planted)))
    table = genetic_table(config, predictions, truth.values, gene, tissue, problem.gene_ids, (n_cis, promoter))
    assert [r["effect"] for r in table["per_gene"]] == ["motif_loss", "additive"]
    assert table["n_genes_effect_motif_loss"] == table["n_genes_effect_additive"] == 1
    assert table["mean_effect_additive"]["hybrid"] == table["per_gene"][1]["hybrid"]
    assert table["mean_effect_motif_loss"]["ceiling"] == pytest.approx(0.3**0.5)
    comparisons = genetic_comparisons(config, predictions, truth.values, gene, tissue, (n_cis, promoter),
                                      gene_ids=problem.gene_ids)
    assert {"genetic_effect_additive", "genetic_effect_motif_loss"} <= set(comparisons)


def dataclasses_replace_min_donors(config):
    import dataclasses

    return dataclasses.replace(config, evaluation=dataclasses.replace(config.evaluation, min_donors=5))


def test_new_donors_get_their_own_haplotypes_and_genetic_scores(tmp_path):
    from geximpute.steps.nightly import InboxItem, NewDonor, donor_haplotypes, extend_problem

    snp = TSS1 - 100
    _, data = _small_dataset(tmp_path, gts={snp: ["0/0"] * (N_PEOPLE - 1) + ["0/1"]})
    config = config_from_dict({**data, "genotypes": {"cis_window": 50_000}})
    dataset = load_dataset(config)
    problem, _ = make_problem(dataset, hidden_mask=False)
    sites = dataset.variants.sites.to_pandas().set_index("pos")
    lines = ["##fileformat=VCFv4.2", "##contig=<ID=chr1,length=60000>",
             '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
             "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tNEW"]

    def new_donor(name: str, far_gt: str, snp_gt: str) -> NewDonor:
        rows = [f"chr1\t{pos}\t.\t{sites.loc[pos, 'ref']}\t{sites.loc[pos, 'alt'][0]}\t.\tPASS\t.\tGT\t{gt}"
                for pos, gt in sorted({snp: snp_gt, FAR: far_gt}.items()) if gt != "absent"]
        path = tmp_path / f"{name}.vcf"
        path.write_text("\n".join([*lines[:-1], lines[-1].replace("NEW", name), *rows]) + "\n")
        return NewDonor(InboxItem(name, path), read_variants(path, dataset.genome, samples=[name]))

    donors = [new_donor("HIGH", "1/1", "0|1"), new_donor("LOW", "0/0", "absent")]
    extended, _ = extend_problem(problem, donors, ())
    genomes = donor_haplotypes(extended, donors, dataset, problem.genomes).genomes
    high, low = extended.donors.index("HIGH"), extended.donors.index("LOW")
    assert genomes.has_genome[[high, low]].all() and genomes.rows.shape[1] == len(extended.donors)
    far_dosage = genomes.gene_dosage(0)[-1]
    assert far_dosage[high] == 2 and far_dosage[low] == 0  # LOW's VCF lacks the site: REF on a covered chromosome
    # HIGH's promoter: haplotype A the reference, B with the ALT; LOW's both the reference
    ref = genomes.reference_row[0]
    assert genomes.rows[0, high, 0] == ref and genomes.rows[0, high, 1] != ref
    assert (genomes.rows[0, low] == ref).all()
    alt_seq = genomes.sequences[genomes.rows[0, high, 1]]
    assert alt_seq[snp - (TSS1 - 1000)] == sites.loc[snp, "alt"][0]
    scores, _ = genetic_scores(genomes, extended.values, extended.tissue_index, extended.donor_index, 1, None)
    assert scores[0, high] - scores[0, low] > 1.0  # the planted effect is +1 per ALT allele of the far SNP
    # the reference donors' genomes are unchanged
    assert np.array_equal(genomes.rows[:, : len(problem.donors)], problem.genomes.rows)


def test_a_vcf_whose_contig_is_shorter_than_the_fasta_record_is_refused(tmp_path, geuvadis):
    # an hg38 VCF (chr22 declared 50,818,468 bp) read with a FASTA whose chr22 is hg19's 51,304,566 bp
    random.seed(2)
    fasta = tmp_path / "long.fa"
    fasta.write_text(">chr22\n" + "".join(random.choice("ACGT") for _ in range(2000)) + "\n")
    vcf = tmp_path / "short.vcf"
    vcf.write_text("##fileformat=VCFv4.2\n##contig=<ID=chr22,length=1500,assembly=other>\n"
                   '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">\n'
                   "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tP1\n"
                   f"chr22\t10\t.\t{fasta.read_text().splitlines()[1][9]}\tN\t.\tPASS\t.\tGT\t0/1\n")
    with Genome(fasta) as genome, pytest.raises(InputError, match=r"declares chr22 1,500 bp long .* 2,000 bp"):
        read_variants(vcf, genome)
    # the Geuvadis VCF (chr22 declared 51,304,566 bp) with its 22-Mb piece of hg19: a piece is shorter, accepted
    with Genome(geuvadis / "chr22_hg19_1-22000000.fa.gz") as piece:
        v = read_variants(geuvadis / "1000G_phase1_chr22_hg19_unphased.vcf.gz", piece, genome_partial=True,
                          regions=[("chr22", 16_000_000, 16_100_000)], samples=["HG00096"])
        assert v.sites.num_rows > 0 and v.report["n_ref_mismatch"] == 0


def test_a_measured_entrys_genetic_score_never_reads_its_own_value(synth_small, tmp_path):
    """Imputing measured entries too (``include_observed``): the cis-genetic score in a measured target's record is
    the one fitted with its fold of the measured targets hidden (:func:`own_value_fold` on whole-problem indices),
    on every chromosome and in every block, and it does not move with the entry's own value; without
    ``own_value_free`` (prepare) and for a missing entry it is the whole problem's fit, which moves with it."""
    import pyarrow as pa

    from geximpute.science.baselines import OWN_VALUE_FOLDS
    from geximpute.science.genomes import own_value_fold
    from geximpute.science.problem import gene_rows
    from geximpute.science.shards import chromosome_spans, shard_records
    from geximpute.steps.impute import imputation_problem
    from geximpute.steps.prepare import context_shards, read_shard

    config = load_config(synth_small / "config.yaml", ["impute.include_observed=true"])
    problem, targets, _ = imputation_problem(config)
    assert problem.genomes is not None
    mask = targets & (np.random.default_rng(0).random(targets.shape) < 0.5)
    measured, missing = mask & ~np.isnan(problem.values), mask & np.isnan(problem.values)
    spans = chromosome_spans(problem.chroms)
    assert len(spans) >= 2 and measured.any() and missing.any()
    shrink = config.context.genetic_shrinkage

    def records(p, name, own):
        paths, cut = context_shards(config, p, mask, None, tmp_path / name, block_entries=60, own_value_free=own)
        assert len(cut) > 2 * len(spans)  # several blocks a chromosome: their offsets count
        table = pa.concat_tables([shard_records(read_shard(path), config.context.k_neighbours, None) for path in paths])
        assert "_genetic_score_own_value_free" not in table.column_names
        grid = np.full(p.values.shape, np.nan, np.float32)
        grid[table["gene_index"].to_numpy(), table["sample_index"].to_numpy()] = table["genetic_score"].to_numpy(
            zero_copy_only=False)
        return grid

    def expected(values):  # each chromosome's fits, written out: the whole one, and one per fold of its targets
        whole = np.full(values.shape, np.nan, np.float32)
        own = np.full(values.shape, np.nan, np.float32)
        for first, end in spans:
            rows = dataclasses.replace(gene_rows(problem, first, end), values=values[first:end])
            genomes = problem.genomes.gene_range(first, end)
            fit = [genetic_scores(genomes, rows.values, rows.tissue_index, rows.donor_index, len(rows.tissues),
                                  shrink)[0]]
            gi, si = np.nonzero(measured[first:end])
            fold = own_value_fold(gi + first, si, OWN_VALUE_FOLDS, config.seed)
            for k in range(OWN_VALUE_FOLDS):
                hidden = rows.values.copy()
                hidden[gi[fold == k], si[fold == k]] = np.nan
                fit.append(genetic_scores(genomes, hidden, rows.tissue_index, rows.donor_index, len(rows.tissues),
                                          shrink)[0])
            whole[first:end] = fit[0][:, problem.donor_index]
            own[gi + first, si] = [fit[1 + f][g, problem.donor_index[s]] for g, s, f in zip(gi, si, fold, strict=True)]
        return whole, own

    whole, own = expected(problem.values)
    before = records(problem, "before", True)
    np.testing.assert_allclose(before[missing], whole[missing], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(before[measured], own[measured], rtol=1e-5, atol=1e-6)
    assert np.nanmax(np.abs(own[measured] - whole[measured])) > 1e-3
    np.testing.assert_allclose(records(problem, "prepare", False)[measured], whole[measured], rtol=1e-5, atol=1e-6)

    # a measured entry of the last chromosome moved: its own score stays, the whole fit's moves
    first, end = spans[-1]
    gi, si = np.argwhere(measured[first:end] & np.isfinite(whole[first:end]))[0]
    moved = problem.values.copy()
    moved[first + gi, si] += 5.0
    after = records(dataclasses.replace(problem, values=moved), "after", True)
    assert after[first + gi, si] == pytest.approx(before[first + gi, si], rel=1e-5, abs=1e-6)
    assert abs(expected(moved)[0][first + gi, si] - whole[first + gi, si]) > 1e-3


def test_variant_effects_score_genes_without_a_promoter_window_by_their_genetic_score(tiny_model, tmp_path):
    """A gene whose promoter window is unknown (N-masked here, a gap in a real assembly) keeps its cis sites: both
    alleles read the network's stand-in and the site moves the genetic score only (such genes were left out, 510
    of 608 on the Geuvadis config); the manifest counts them."""
    from geximpute.steps.variant_effects import variant_effects

    config = tiny_model.config
    genes = pd.read_csv(tiny_model.data / "genes.gtf", sep="\t", comment="#", header=None)
    genes = genes[genes[2] == "gene"]
    sites = read_variants(tiny_model.data / "variants.vcf").sites.to_pandas()
    # the first gene with a site in its promoter window (the cis window here), that window masked
    gene = next(row for _, row in genes.iterrows()
                if ((sites["chrom"] == row[0]) & (sites["pos"] - (row[3] if row[6] == "+" else row[4])).abs()
                    .lt(400)).any())
    tss = gene[3] if gene[6] == "+" else gene[4]
    name = gene[8].split('gene_id "')[1].split('"')[0]
    records, chrom, lines = {}, None, (tiny_model.data / "genome.fa").read_text().splitlines()
    for line in lines:
        if line.startswith(">"):
            chrom = line[1:].split()[0]
            records[chrom] = []
        else:
            records[chrom].append(line)
    seq = list("".join(records[gene[0]]))
    seq[max(tss - 1600, 0) : tss + 1600] = "N" * len(seq[max(tss - 1600, 0) : tss + 1600])
    records[gene[0]] = ["".join(seq)]
    masked = tmp_path / "masked.fa"
    masked.write_text("".join(f">{c}\n" + "".join(body) + "\n" for c, body in records.items()))
    config = dataclasses.replace(config, inputs=dataclasses.replace(config.inputs, genome=str(masked)))
    table = variant_effects(config, tmp_path / "effects", tiny_model.folder).to_pandas()
    manifest = (tmp_path / "effects" / "_manifest.json").read_text()
    mine = table[table["gene_id"] == name.split(".")[0]]
    assert len(mine) > 0 and '"genes_without_promoter_window": ' in manifest
    assert int(manifest.split('"genes_without_promoter_window": ')[1].split(",")[0].split("}")[0]) >= 1
    # the promoter is the same stand-in for both alleles: where the score does not move, neither does the estimate
    still = mine[mine["genetic_effect"] == 0]
    np.testing.assert_allclose(still["predicted_alt"], still["predicted_ref"], atol=1e-6)


def test_variant_effects_refuse_a_foreign_output_before_reading_anything(synth_small, tmp_path, monkeypatch):
    """Its --out was refused only at the commit, after the VCF was read and every site scored."""
    from geximpute.runtime.atomic import OutputRefused
    from geximpute.steps import variant_effects as module

    mine = tmp_path / "data"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")

    def never(*args, **kwargs):
        raise AssertionError("the inputs were read before the output was checked")

    monkeypatch.setattr(module, "load_dataset", never)
    monkeypatch.setattr(module, "load_bundle", never)
    config = load_config(synth_small / "config.yaml")
    assert config.inputs.variants and config.inputs.genome
    with pytest.raises(OutputRefused):
        module.variant_effects(config, mine, tmp_path / "model")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_people_of_a_cohort_vcf_outside_the_expression_refuse_nothing(tmp_path):
    """A cohort VCF holds people the expression does not: their missing calls (or ambiguous phases) refused the
    run under ``genotypes.missing: error`` although no donor of the problem reads them."""
    _, data = _small_dataset(tmp_path, gts={TSS1 - 100: ["0/1"] * N_PEOPLE})  # a promoter SNP of gene 1
    vcf = tmp_path / "people.vcf"
    lines = []
    for line in vcf.read_text().splitlines():
        if line.startswith("#CHROM"):
            line += "\tQ99"
        elif not line.startswith("#"):
            line += "\t./." if line.split("\t")[1] == str(TSS1 - 100) else "\t0/0"
        lines.append(line)
    vcf.write_text("\n".join(lines) + "\n")
    problem, _ = _problem(data, missing="error")
    assert "Q99" not in problem.donors and problem.genomes is not None
    assert problem.genomes.gene_dosage(0).shape[0] == 1  # the promoter SNP, read for the problem's donors


def test_a_deletion_reaching_into_the_promoter_window_from_upstream_is_linked(tmp_path):
    """With the default ``cis_window`` (the promoter window) a deletion starting just 5' of the window is edited into
    the donors' haplotypes, but its dosage was linked by its position alone: no link, no dosage, no variant-effect
    row, and a missing call there never marked the haplotypes unknown."""
    from geximpute.science.genomes import gene_variant_flags, window_bounds

    _, data = _small_dataset(tmp_path)
    config = config_from_dict(data)
    start, _ = window_bounds(np.array([TSS1]), np.array([1]), config.promoter.upstream, config.promoter.downstream)
    pos = int(start[0]) - 1  # one base 5' of gene 1's window; its REF reaches two bases into it
    import pyfaidx

    ref = pyfaidx.Fasta(str(tmp_path / "ref.fa"))["chr1"][pos - 1:pos + 2].seq.upper()
    record = "\t".join(["chr1", str(pos), "del", ref, ref[0], ".", "PASS", ".", "GT",
                        *(["1|1"] + ["0|0"] * (N_PEOPLE - 1))])
    vcf = tmp_path / "people.vcf"
    lines = vcf.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    vcf.write_text("\n".join([*lines[:first], record, *lines[first:]]) + "\n")  # sorted: the window is first
    problem, _ = _problem(data)
    genomes = problem.genomes
    links = genomes.site_index[genomes.site_ptr[0]:genomes.site_ptr[1]]
    sites = load_dataset(config_from_dict(data)).variants.sites
    assert [int(sites["pos"][int(i)].as_py()) for i in links] == [pos]
    assert genomes.in_promoter[genomes.site_ptr[0]:genomes.site_ptr[1]].tolist() == [True]
    _, promoter = gene_variant_flags(genomes, sites["pos"].to_numpy(), problem.tss, problem.strand,
                                     config.promoter.upstream, config.promoter.downstream)
    assert promoter[0]

"""The synthetic dataset generator: formats, determinism, atomic writes, and the planted truth in the data."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import cyvcf2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyfaidx
import pytest

from geximpute.apps import synth
from geximpute.apps.synth import SynthResult, SynthSpec, generate
from geximpute.config import load_config
from geximpute.errors import ConfigError
from geximpute.io.fasta import Genome, reverse_complement

# Small enough to generate several times per test run; the default spec is used once per module.
SMALL = SynthSpec(seed=3, chrom_length=60_000, n_genes=40, n_donors=12, n_tissues=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    return generate(tmp_path_factory.mktemp("synth") / "default")


def _truth_genes(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "truth" / "genes.tsv", sep="\t")


def _gct_text(root: Path) -> pd.DataFrame:
    """The GCT body as strings (blank cells as ""), indexed by Name."""
    return pd.read_csv(
        root / "expression.gct", sep="\t", skiprows=2, dtype=str, keep_default_na=False, index_col="Name"
    )


def _log1p_gct(root: Path) -> pd.DataFrame:
    table = pd.read_csv(root / "expression.gct", sep="\t", skiprows=2, index_col="Name")
    return np.log1p(table.drop(columns="Description"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# Spec -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", -1),
        ("n_genes", 1.5),
        ("n_donors", 2),
        ("observed_cell_fraction", 0.0),
        ("observed_cell_fraction", 1.2),
        ("missing_entry_fraction", -0.1),
        ("eqtl_gene_fraction", float("nan")),
        ("motif_eqtl_fraction", 1.5),
        ("chrom_length", 5_000),
        ("downstream", 0),
        ("upstream", True),
    ],
)
def test_spec_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"SynthSpec\.{field}="):
        SynthSpec(**{field: value})


def test_the_command_line_says_which_option_is_wrong_and_writes_nothing(tmp_path: Path, capsys) -> None:
    from geximpute.apps.cli import main

    assert main(["synth", "--out", str(tmp_path / "bad"), "--motif-eqtl-fraction", "2"]) == 2
    assert "--motif-eqtl-fraction 2.0" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "bad"), "--genes", "0"]) == 2
    err = capsys.readouterr().err
    assert "--genes 0: expected at least one gene per chromosome" in err and "SynthSpec" not in err
    assert not (tmp_path / "bad").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    assert main(["synth", "--out", str(tmp_path / "full"), "--genes", "30"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_spec_rejects_a_window_too_small_for_the_motifs() -> None:
    with pytest.raises(ValueError, match=r"SynthSpec\.upstream=.*promoter window"):
        SynthSpec(upstream=20, downstream=20)


# Determinism and atomic writes ------------------------------------------------------------------------------


def test_same_spec_gives_the_same_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    first = _files(generate(tmp_path / "a", SMALL).out_dir)
    second = _files(generate(tmp_path / "b", SMALL).out_dir)
    other = _files(generate(tmp_path / "c", dataclasses.replace(SMALL, seed=4)).out_dir)
    expected = set(synth.FILES.values())
    assert set(first) == expected, "every promised file is written, and nothing else (no .fai)"
    assert first == second
    for name in ("genome.fa", "genes.gtf", "expression.gct", "variants.vcf", "truth/expression_full.parquet"):
        assert other[name] != first[name], name


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        generate(out, SMALL)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    result = generate(out, SMALL, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (result.config_path).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["data"], "no staging or old folder left behind"


def test_an_empty_folder_is_filled_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    assert generate(tmp_path / "data", SMALL).config_path.is_file()


def test_failure_mid_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_write_vcf", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        generate(tmp_path / "data", SMALL)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_overwriting_keeps_the_old_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = generate(tmp_path / "data", SMALL).out_dir
    before = _files(out)

    def bad_config(path: Path, _data: object) -> None:
        path.write_text("inputs: {genes: genes.gtf}\n")  # no expression: load_config must refuse it

    monkeypatch.setattr(synth, "_write_config", bad_config)
    with pytest.raises(ConfigError):
        generate(out, dataclasses.replace(SMALL, seed=9), overwrite=True)
    assert _files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


# Formats ----------------------------------------------------------------------------------------------------


def test_config_loads_with_paths_relative_to_it(data: SynthResult) -> None:
    text = data.config_path.read_text()
    assert str(data.out_dir) not in text
    config = load_config(data.config_path)
    assert config.name == "synthetic"
    assert config.inputs.scale == "tpm"
    assert (config.promoter.upstream, config.promoter.downstream) == (1000, 500)
    for name in ("genome", "genes", "expression", "samples", "variants"):
        path = Path(getattr(config.inputs, name))
        assert path.parent == data.out_dir and path.is_file(), name


def test_gct_has_present_samples_only_and_blank_missing_entries(data: SynthResult) -> None:
    root, counts = data.out_dir, data.truth["counts"]
    lines = (root / "expression.gct").read_text().splitlines()
    assert lines[0] == "#1.2"
    n_genes, n_samples = map(int, lines[1].split("\t"))
    header = lines[2].split("\t")
    assert header[:2] == ["Name", "Description"] and len(header) == 2 + n_samples
    assert len(lines) == 3 + n_genes == 3 + 240
    cells = [line.split("\t") for line in lines[3:]]
    assert all(len(row) == len(header) for row in cells)
    values = [v for row in cells for v in row[2:]]
    assert sum(v == "" for v in values) == counts["n_missing_entries"]
    assert counts["n_missing_entries"] == round(0.02 * n_genes * n_samples)
    assert min(float(v) for v in values if v) >= 0

    samples = pd.read_csv(root / "samples.tsv", sep="\t")
    assert list(samples.columns) == ["sample_id", "donor_id", "tissue"]
    assert header[2:] == samples["sample_id"].tolist()
    assert n_samples == counts["n_samples"] < 40 * 6, "missing donor-tissue cells have no column"
    assert samples["sample_id"].str.fullmatch(r"SYN-D\d{4}-T\d{2}").all()
    assert (samples["sample_id"] == samples["donor_id"] + "-T" + samples["tissue"].str[-2:]).all()
    assert samples["donor_id"].nunique() == 40, "every donor keeps at least one tissue"
    assert samples.groupby("tissue")["donor_id"].nunique().min() >= 3
    assert counts["observed_cell_fraction"] == pytest.approx(n_samples / 240)


def test_vcf_ref_matches_fasta_and_holds_each_kind_of_site(data: SynthResult) -> None:
    root = data.out_dir
    donors = sorted(pd.read_csv(root / "samples.tsv", sep="\t")["donor_id"].unique())
    fasta = pyfaidx.Fasta(str(root / "genome.fa"), sequence_always_upper=True)
    vcf = cyvcf2.VCF(str(root / "variants.vcf"))
    assert vcf.samples == donors
    assert dict(zip(vcf.seqnames, vcf.seqlens, strict=True)) == {c: len(fasta[c]) for c in fasta.keys()}
    assert "GT" in vcf.raw_header and "##fileformat=VCFv4.2" in vcf.raw_header
    kinds = {"snv": 0, "indel": 0, "multi": 0}
    last: tuple[str, int] | None = None
    n = 0
    for v in vcf:
        n += 1
        assert v.REF == str(fasta[v.CHROM][v.POS - 1 : v.POS - 1 + len(v.REF)]), f"{v.CHROM}:{v.POS}"
        assert last is None or (v.CHROM, v.POS) > last or v.CHROM != last[0]
        last = (v.CHROM, v.POS)
        assert all(v.gt_phases), "every genotype is phased"
        if len(v.ALT) > 1:
            kinds["multi"] += 1
        elif len(v.REF) != len(v.ALT[0]):
            kinds["indel"] += 1
        else:
            kinds["snv"] += 1
    assert n == data.truth["counts"]["n_variants"]
    assert kinds["multi"] >= 1 and kinds["indel"] >= 2
    assert kinds["snv"] > 0.85 * n
    counts = data.truth["counts"]
    assert 0.8 * n < counts["n_promoter_variants"] < n, "mostly in promoters, a few outside"


def test_gtf_is_gencode_style_sorted_and_agrees_with_truth(data: SynthResult) -> None:
    root = data.out_dir
    lines = (root / "genes.gtf").read_text().splitlines()
    rows = [line.split("\t") for line in lines if not line.startswith("#")]
    assert all(len(r) == 9 for r in rows)
    genes = [r for r in rows if r[2] == "gene"]
    assert len(genes) == 240
    assert sum(r[2] == "transcript" for r in rows) == 240 and sum(r[2] == "exon" for r in rows) >= 240
    ids = [re.search(r'gene_id "([^"]+)"', r[8]).group(1) for r in genes]
    assert all(re.fullmatch(r"SYNG\d{8}\.1", i) for i in ids)
    assert all('gene_type "protein_coding"' in r[8] and 'gene_name "SYN' in r[8] for r in genes)
    order = [(int(r[0][3:]), int(r[3])) for r in genes]
    assert order == sorted(order)

    truth = _truth_genes(root)
    assert truth["gene_id"].tolist() == [i.split(".")[0] for i in ids]
    tss = [int(r[3]) if r[6] == "+" else int(r[4]) for r in genes]
    assert truth["tss"].tolist() == tss
    assert set(truth["strand"]) == {"+", "-"}
    assert (truth["tss"] > 1500).all() and (truth["tss"] <= 400_000 - 1500).all()
    for r in rows:
        if r[2] == "exon":
            gene = genes[ids.index(re.search(r'gene_id "([^"]+)"', r[8]).group(1))]
            assert int(gene[3]) <= int(r[3]) <= int(r[4]) <= int(gene[4])
    assert data.truth["counts"]["n_divergent_pairs"] >= 3
    assert data.truth["counts"]["n_overlapping_pairs"] >= 3


# Planted truth ----------------------------------------------------------------------------------------------


def test_motifs_are_in_the_promoter_windows_and_counted_right(data: SynthResult) -> None:
    root = data.out_dir
    motifs = data.truth["motifs"]
    act, rep = motifs["activator"], motifs["repressor"]
    truth = _truth_genes(root)
    with Genome(root / "genome.fa") as genome:
        for g in truth.itertuples():
            window = genome.window(g.chrom, g.tss, g.strand, 1000, 500, soft_mask="n")
            assert window.complete
            assert (window.sequence.count(act), window.sequence.count(rep)) == (
                g.n_activator_motifs,
                g.n_repressor_motifs,
            ), g.gene_id
        # every copy anywhere in the genome (either strand) lies inside some promoter window
        starts = np.where(truth["strand"] == "+", truth["tss"] - 1000, truth["tss"] - 499)
        ends = starts + 1499
        for chrom in genome.chroms:
            text = genome.fetch(chrom, 1, genome.lengths[chrom]).upper()
            on = (truth["chrom"] == chrom).to_numpy()
            for pattern in (act, rep, reverse_complement(act), reverse_complement(rep)):
                for m in re.finditer(pattern, text):
                    pos = m.start() + 1
                    assert ((starts[on] <= pos) & (pos + 7 <= ends[on])).any(), f"{chrom}:{pos} {pattern}"
    assert (truth["n_activator_motifs"] > 0).mean() > 0.6 and (truth["n_repressor_motifs"] > 0).mean() > 0.6
    expected = motifs["activator_effect"] * truth["n_activator_motifs"]
    expected -= motifs["repressor_effect"] * truth["n_repressor_motifs"]
    assert np.allclose(truth["motif_effect"], expected, atol=1e-6)


def test_motif_effect_is_visible_in_gene_means(data: SynthResult) -> None:
    truth = _truth_genes(data.out_dir)
    mean = _log1p_gct(data.out_dir).mean(axis=1).to_numpy()
    r = np.corrcoef(truth["motif_effect"], mean)[0, 1]
    assert r > 0.3


def test_observed_values_are_the_rounded_truth(data: SynthResult) -> None:
    root = data.out_dir
    full = pq.read_table(root / "truth" / "expression_full.parquet").to_pandas()
    assert len(full) == 240 * 40 * 6
    assert full[["gene_id", "donor_id", "tissue"]].drop_duplicates().shape[0] == len(full)
    gct = _gct_text(root)
    gct.index = gct.index.str.split(".").str[0]
    with_sample = full[full["sample_id"].notna()]
    keys = zip(with_sample["gene_id"], with_sample["sample_id"], strict=True)
    cells = np.array([gct.at[g, s] for g, s in keys])
    observed = with_sample["observed"].to_numpy()
    assert (cells[~observed] == "").all(), "hidden entries of present samples are blank"
    want = [f"{v:.4g}" for v in np.expm1(with_sample["value_log1p"].to_numpy()[observed])]
    assert cells[observed].tolist() == want
    n_entries = gct.shape[0] * (gct.shape[1] - 1)  # less the Description column
    assert full["observed"].sum() == n_entries - data.truth["counts"]["n_missing_entries"]
    shown = np.log1p(cells[observed].astype(float))
    assert np.corrcoef(shown, with_sample["value_log1p"].to_numpy()[observed])[0, 1] > 0.99999


def test_values_are_in_a_realistic_range(data: SynthResult) -> None:
    full = pq.read_table(data.out_dir / "truth" / "expression_full.parquet")["value_log1p"].to_numpy()
    assert full.min() == 0.0
    assert ((full >= 0) & (full <= 8)).mean() > 0.98
    assert (full == 0).mean() < 0.08


def _dosage(root: Path, variant_ids: set[str]) -> dict[str, np.ndarray]:
    out = {}
    for v in cyvcf2.VCF(str(root / "variants.vcf")):
        if v.ID in variant_ids:
            out[v.ID] = np.array([(a == 1) + (b == 1) for a, b, _ in v.genotypes], dtype=float)
    return out


def test_eqtl_effects_have_the_planted_sign_and_heritability(data: SynthResult) -> None:
    root = data.out_dir
    genes, eqtls = _truth_genes(root), pd.read_csv(root / "truth" / "eqtls.tsv", sep="\t")
    has = genes["n_eqtls"] > 0
    assert has.sum() == data.truth["counts"]["n_eqtl_genes"] == 120
    assert genes.loc[has, "h2"].between(0.2, 0.7).all() and (genes.loc[~has, "h2"] == 0).all()
    assert genes.loc[has, "n_eqtls"].isin([1, 2]).all()
    assert eqtls.groupby("gene_id").size().equals(genes[has].set_index("gene_id")["n_eqtls"])

    dosage = _dosage(root, set(eqtls["variant_id"]))
    donors = cyvcf2.VCF(str(root / "variants.vcf")).samples
    samples = pd.read_csv(root / "samples.tsv", sep="\t")
    tissue = samples["tissue"].value_counts().idxmax()
    in_tissue = samples[samples["tissue"] == tissue]
    expr = _log1p_gct(root)[in_tissue["sample_id"]]
    expr.index = expr.index.str.split(".").str[0]
    rows = [donors.index(d) for d in in_tissue["donor_id"]]
    strongest = eqtls.loc[eqtls["effect"].abs().groupby(eqtls["gene_id"]).idxmax()]
    right = []
    for e in strongest.itertuples():
        y = expr.loc[e.gene_id].to_numpy()
        x = dosage[e.variant_id][rows]
        ok = ~np.isnan(y)
        if np.var(x[ok]) == 0:
            continue
        slope = np.cov(x[ok], y[ok])[0, 1] / np.var(x[ok], ddof=1)
        right.append(np.sign(slope) == np.sign(e.effect))
    assert len(right) > 100
    assert np.mean(right) > 0.8

    # the pooled within-tissue share of donor variance that the planted eQTLs explain is the recorded h2
    full = pq.read_table(root / "truth" / "expression_full.parquet").to_pandas()
    values = full["value_log1p"].to_numpy().reshape(240, 40, 6)
    gene_row = {g: i for i, g in enumerate(genes["gene_id"])}
    genetic = np.zeros((240, 40))
    for e in eqtls.itertuples():
        x = dosage[e.variant_id]
        genetic[gene_row[e.gene_id]] += e.effect * (x - x.mean())
    unfloored = (values > 0).all(axis=(1, 2)) & has.to_numpy()
    h2 = 6 * genetic.var(axis=1) / values.var(axis=1).sum(axis=1)
    assert unfloored.sum() > 60
    assert np.allclose(h2[unfloored], genes["h2"].to_numpy()[unfloored], atol=2e-3)


def test_motif_loss_eqtls_destroy_a_planted_copy_and_act_per_haplotype(tmp_path: Path) -> None:
    spec = SynthSpec(seed=5, chrom_length=200_000, n_genes=120, n_donors=60, n_tissues=3, motif_eqtl_fraction=0.3)
    root = generate(tmp_path / "motif", spec).out_dir
    genes, eqtls = _truth_genes(root), pd.read_csv(root / "truth" / "eqtls.tsv", sep="\t")
    motif = eqtls[eqtls["kind"] == "motif_loss"]
    kinds = genes.set_index("gene_id")["genetic_effect"]
    assert (kinds == "motif_loss").sum() >= 25  # 30% asked; genes with an additive eQTL are not drawn
    assert set(kinds[motif["gene_id"]]) <= {"motif_loss", "additive+motif_loss"}
    assert genes.loc[genes["genetic_effect"] == "motif_loss", "h2"].gt(0).all()

    truth = json.loads((root / "truth" / "truth.json").read_text())
    activator, repressor = truth["motifs"]["activator"], truth["motifs"]["repressor"]
    fasta = pyfaidx.Fasta(str(root / "genome.fa"))
    gene = genes.set_index("gene_id")
    haps = {v.ID: np.array([g[:2] for g in v.genotypes]) for v in cyvcf2.VCF(str(root / "variants.vcf"))
            if v.ID in set(motif["variant_id"])}
    full = pq.read_table(root / "truth" / "expression_full.parquet").to_pandas()
    values = full["value_log1p"].to_numpy().reshape(len(genes), spec.n_donors, spec.n_tissues).mean(axis=2)
    row = {g: i for i, g in enumerate(genes["gene_id"])}
    non_additive = 0
    for gene_id, pair in motif.groupby("gene_id"):
        if kinds[gene_id] != "motif_loss":
            continue
        # the two SNVs sit inside one planted copy, as the gene reads its strand, and either ALT breaks it
        g = gene.loc[gene_id]
        lo, hi = int(pair["pos"].min()), int(pair["pos"].max())
        assert len(pair) == 2 and hi - lo < 8
        region = str(fasta[g["chrom"]][hi - 8 : lo + 7]).upper()
        oriented = region if g["strand"] == "+" else reverse_complement(region)
        motif_seq = activator if pair["effect"].iloc[0] < 0 else repressor
        assert oriented.count(motif_seq) == 1
        for e in pair.itertuples():
            assert e.ref == region[e.pos - (hi - 7)]
            broken = region[: e.pos - (hi - 7)] + e.alt + region[e.pos - (hi - 7) + 1 :]
            broken = broken if g["strand"] == "+" else reverse_complement(broken)
            assert motif_seq not in broken
        # the level moves with the haplotypes that lost the copy (an OR of the two ALT alleles on each one), by
        # half the motif's effect per haplotype, and not with the sum of the two dosages where they disagree
        a, b = (haps[v] for v in pair["variant_id"])
        lost = ((a == 1) | (b == 1)).sum(axis=1)
        dosage = (a == 1).sum(axis=1) + (b == 1).sum(axis=1)
        non_additive += int((lost != dosage).any())
        y = values[row[gene_id]]
        if np.var(lost) > 0 and (y > 0.5).all():
            slope = np.cov(lost, y)[0, 1] / np.var(lost, ddof=1)
            assert np.sign(slope) == np.sign(pair["effect"].iloc[0])
    assert non_additive >= 20


def test_tissue_correlation_is_recovered_from_the_data(data: SynthResult) -> None:
    root = data.out_dir
    truth = pd.read_csv(root / "truth" / "tissue_correlation.tsv", sep="\t", index_col="tissue")
    samples = pd.read_csv(root / "samples.tsv", sep="\t").set_index("sample_id")
    expr = _log1p_gct(root)
    by_tissue = expr.T.groupby(samples.loc[expr.columns, "tissue"]).mean().T[truth.columns]
    centred = by_tissue.sub(by_tissue.mean(axis=1), axis=0)
    recovered = np.corrcoef(centred.to_numpy().T)
    planted = truth.to_numpy()
    upper = np.triu_indices(len(truth), k=1)
    assert np.allclose(np.diag(planted), 1.0) and np.allclose(planted, planted.T)
    assert np.corrcoef(recovered[upper], planted[upper])[0, 1] > 0.5
    # Centring per gene removes the part of the tissue effects common to all tissues (it cannot be told apart
    # from the gene's level), so the data recover the planted matrix as seen through that same centring.
    centring = np.eye(len(planted)) - 1 / len(planted)
    seen = centring @ planted @ centring
    seen /= np.sqrt(np.outer(np.diag(seen), np.diag(seen)))
    assert np.corrcoef(recovered[upper], seen[upper])[0, 1] > 0.85


def test_neighbourhoods_are_coexpressed_across_tissues(data: SynthResult) -> None:
    genes = _truth_genes(data.out_dir)
    full = pq.read_table(data.out_dir / "truth" / "expression_full.parquet")["value_log1p"].to_numpy()
    profile = full.reshape(240, 40, 6).mean(axis=1)
    profile -= profile.mean(axis=1, keepdims=True)
    corr = np.corrcoef(profile)
    same = genes["neighbourhood_id"].to_numpy()[:, None] == genes["neighbourhood_id"].to_numpy()[None, :]
    off = ~np.eye(240, dtype=bool)
    assert corr[same & off].mean() > corr[~same].mean() + 0.1


def test_truth_summary_matches_the_spec_and_files(data: SynthResult) -> None:
    summary = json.loads((data.out_dir / "truth" / "truth.json").read_text())
    assert summary == data.truth
    assert summary["spec"] == dataclasses.asdict(SynthSpec())
    assert summary["seed"] == 0
    motifs = summary["motifs"]
    assert len(motifs["activator"]) == len(motifs["repressor"]) == 8
    assert motifs["activator"] != motifs["repressor"]
    assert summary["counts"]["n_samples"] == len(pd.read_csv(data.out_dir / "samples.tsv", sep="\t"))

"""Personal genomes in the model: cis-genetic scores, whole-donor hold-out, haplotype lookups, the elastic-net
baseline, and a planted-eQTL run of ``evaluate`` and ``variant-effects`` against the synthetic truth."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import TINY_NETWORK

from geximpute.apps.cli import main as cli
from geximpute.apps.synth import SynthSpec, generate
from geximpute.config import EvaluationConfig, load_config
from geximpute.io.dataset import load_dataset
from geximpute.science.baselines import ElasticNetBaseline
from geximpute.science.folds import training_folds
from geximpute.science.genomes import DonorGenomes, genetic_scores, promoter_sites, window_bounds
from geximpute.science.problem import hide, make_problem
from geximpute.science.promoters import PromoterLookup

TINY = [*TINY_NETWORK, "train.batch_size=128", "train.epochs=3", "head.num_boost_round=60"]
GENOTYPE_TASK = [
    "evaluation.task=samples",
    "evaluation.whole_donors=true",
    "evaluation.fraction=0.25",
    "evaluation.min_donors=8",
    "evaluation.ablations=false",
    "evaluation.methods=[tissue_donor, elastic_net, hybrid, hybrid_reference]",
]


def _genomes(dosage: np.ndarray, site_ptr: np.ndarray) -> DonorGenomes:
    n_genes, n_donors = len(site_ptr) - 1, dosage.shape[1]
    return DonorGenomes(
        sequences=[], promoter_ids=[], reference_row=np.zeros(n_genes, np.int64),
        rows=np.zeros((n_genes, n_donors, 2), np.int32), has_genome=np.ones(n_donors, bool),
        site_ptr=site_ptr, site_index=np.arange(site_ptr[-1]), dosage=dosage.astype(np.float32), report={},
    )


def test_genetic_scores_recover_a_planted_effect_and_use_only_visible_donors():
    rng = np.random.default_rng(0)
    n_donors, n_tissues = 300, 3
    dosage = rng.binomial(2, 0.4, (3, n_donors)).astype(float)  # gene 0: sites 0, 1; gene 1: site 2
    genomes = _genomes(dosage, np.array([0, 2, 3, 3]))  # gene 2 has no site
    donor_index = np.repeat(np.arange(n_donors), n_tissues)
    tissue_index = np.tile(np.arange(n_tissues), n_donors)
    genetic = np.zeros((3, n_donors))
    genetic[0] = 0.8 * dosage[0]  # site 1 has no effect, gene 1 none at all
    values = genetic[:, donor_index] + rng.normal(0, 0.3, (3, len(donor_index))) + np.array([[5.0], [3.0], [1.0]])
    held_out = np.arange(n_donors) >= 250
    values[:, held_out[donor_index]] = np.nan  # whole donors hidden: only their genomes are known
    scores, effects = genetic_scores(genomes, values, tissue_index, donor_index, n_tissues, None)
    assert effects[0][0] == pytest.approx(0.8, abs=0.08) and abs(effects[0][1]) < 0.08
    assert abs(effects[1][0]) < 0.08 and len(effects[2]) == 0
    assert np.isnan(scores[2]).all()
    # held-out donors are scored from their genotypes alone, and the score tracks the planted value
    assert np.corrcoef(scores[0, held_out], genetic[0, held_out])[0, 1] > 0.95
    # changing a hidden value changes nothing: hidden values are not in the visible matrix at all
    again, _ = genetic_scores(genomes, values.copy(), tissue_index, donor_index, n_tissues, None)
    np.testing.assert_array_equal(np.nan_to_num(scores, nan=-9), np.nan_to_num(again, nan=-9))


def test_genetic_scores_are_centred_on_the_donors_they_were_fitted_on():
    """Donors known by their genome alone (held out, or arrived since: another ancestry here) do not move the
    scores: they are centred on the fitted donors, as the residuals they predict are (centred on every genome, a
    REF/REF fitted donor's score moved by the two groups' difference in allele frequency times the effect)."""
    rng = np.random.default_rng(0)
    n_donors = 400
    fitted = np.arange(n_donors) < 200
    dosage = rng.binomial(2, np.where(fitted, 0.1, 0.6)).astype(float)[None, :]
    values = (0.5 * (dosage[0] - dosage[0, fitted].mean()) + rng.normal(0, 0.5, n_donors))[None, :]
    values[:, ~fitted] = np.nan
    args = (np.zeros(n_donors, np.int32), np.arange(n_donors, dtype=np.int32), 1, 1.0)
    scores, _ = genetic_scores(_genomes(dosage, np.array([0, 1])), values, *args)
    assert abs(scores[0, fitted].mean()) < 1e-5
    # fewer genome-only donors: the fitted donors' scores stay where they were, a missing call's too (filled at
    # the fitted donors' mean dosage: it adds nothing, whatever the other genomes)
    dosage[0, 0] = np.nan
    scores, _ = genetic_scores(_genomes(dosage, np.array([0, 1])), values, *args)
    fewer, _ = genetic_scores(_genomes(dosage[:, :250], np.array([0, 1])), values[:, :250], args[0][:250],
                              args[1][:250], 1, 1.0)
    np.testing.assert_allclose(fewer[0, :200], scores[0, :200], atol=1e-5)
    assert abs(scores[0, 0]) < 1e-6


def test_a_missing_call_leaves_the_haplotype_stage_out_of_the_donors_score():
    """``genotypes.missing: mean``: a donor's missing call adds nothing. Its promoter haplotypes were built with the
    missing allele as REF, and the haplotype stage read that REF: a donor homozygous for the two-ALT haplotype,
    its second call missing, scored as if it carried neither (+0.02, where the A/A donors average +0.52)."""
    rng = np.random.default_rng(3)
    n_donors = 600
    a, b = rng.random((n_donors, 2)) < 0.4, rng.random((n_donors, 2)) < 0.4
    haplotypes = (a * 1 + b * 2).astype(np.int32)  # rows: 0 the reference, 1 A only, 2 B only, 3 both
    values = (1.0 * (haplotypes == 3).sum(axis=1) + rng.normal(0, 0.3, n_donors))[None, :].astype(np.float32)
    dosage = np.stack([a.sum(axis=1), b.sum(axis=1)]).astype(np.float32)
    k = int(np.flatnonzero((haplotypes == 3).all(axis=1))[0])

    def scores(dosage: np.ndarray, rows: np.ndarray) -> np.ndarray:
        genomes = dataclasses.replace(_genomes(dosage, np.array([0, 2])), rows=rows[None])
        return genetic_scores(genomes, values, np.zeros(n_donors, np.int32), np.arange(n_donors, dtype=np.int32),
                              1, None)[0][0]

    called = scores(dosage, haplotypes)
    dosage[1, k] = np.nan  # B missing: its haplotypes read B as REF, as donor_genomes builds them
    rows = haplotypes.copy()
    rows[k] = 1
    missing = scores(dosage, rows)
    a_a = a.sum(axis=1) == 2
    assert called[k] > 1.4 and abs(missing[k] - called[a_a].mean()) < 0.15
    # a missing call elsewhere in the cis window (not a promoter site) leaves the haplotypes known
    distant = np.vstack([dosage[:2], rng.binomial(2, 0.3, n_donors).astype(np.float32)])
    distant[1, k] = dosage[1, k] = 2.0
    distant[2, rng.random(n_donors) < 0.3] = np.nan
    genomes = dataclasses.replace(_genomes(distant, np.array([0, 3])), rows=haplotypes[None],
                                  in_promoter=np.array([True, True, False]))
    far, _ = genetic_scores(genomes, values, np.zeros(n_donors, np.int32), np.arange(n_donors, dtype=np.int32), 1,
                            None)
    assert np.corrcoef(far[0], called)[0, 1] > 0.98


def test_genetic_scores_learn_an_effect_that_lives_on_the_haplotype():
    """Two sites that each break the same motif on one haplotype break it once (an OR per haplotype): dosages alone
    cannot represent it, the haplotype stage of the score can, and where haplotypes add nothing it stays out."""
    rng = np.random.default_rng(1)
    n_donors, n_tissues = 400, 2
    alleles = (rng.random((2, n_donors, 2)) < 0.3).astype(np.int32)  # (site, donor, haplotype) ALT allele
    rows = 1 + alleles[0] + 2 * alleles[1]  # haplotype rows: 1 reference, 2 site 0, 3 site 1, 4 both
    lost = (alleles.max(axis=0)).sum(axis=1).astype(float)  # haplotypes that lost the motif, 0-2
    dosage = alleles.sum(axis=2).astype(float)  # (2 sites, D)
    genomes = DonorGenomes(
        sequences=[], promoter_ids=[], reference_row=np.array([1, 1], np.int64),
        rows=np.stack([rows, rows]).astype(np.int32), has_genome=np.ones(n_donors, bool),
        site_ptr=np.array([0, 2, 4]), site_index=np.arange(4), dosage=np.vstack([dosage, dosage]).astype(np.float32),
        report={},
    )
    donor_index = np.repeat(np.arange(n_donors), n_tissues)
    tissue_index = np.tile(np.arange(n_tissues), n_donors)
    genetic = np.stack([-0.6 * lost, 0.5 * dosage[0]])  # gene 0: the OR; gene 1: additive in one site
    values = genetic[:, donor_index] + rng.normal(0, 0.25, (2, len(donor_index))) + 4.0
    held_out = np.arange(n_donors) >= 300
    values[:, held_out[donor_index]] = np.nan
    scores, _ = genetic_scores(genomes, values, tissue_index, donor_index, n_tissues, None)
    additive = np.c_[np.ones(n_donors), dosage.T]
    best_additive = additive @ np.linalg.lstsq(additive, lost, rcond=None)[0]
    assert np.corrcoef(best_additive, lost)[0, 1] < 0.96  # the OR is not additive in the dosages
    r = np.corrcoef(scores[0, held_out], genetic[0, held_out])[0, 1]
    assert r > 0.98 and r > np.corrcoef(best_additive[held_out], lost[held_out])[0, 1]
    assert np.corrcoef(scores[1, held_out], genetic[1, held_out])[0, 1] > 0.98


def test_promoter_sites_follow_the_window_on_both_strands():
    tss = np.array([1000, 1000])
    start, end = window_bounds(tss, np.array([1, -1]), upstream=100, downstream=50)
    assert (start[0], end[0]) == (900, 1049) and (start[1], end[1]) == (951, 1100)
    chroms = np.array(["c", "c"], dtype=object)
    pos = np.array([899, 900, 1049, 1050, 1100, 1101])
    ptr, index = promoter_sites(chroms, start, end, np.array(["c"] * 6, dtype=object), pos)
    assert pos[index[ptr[0]:ptr[1]]].tolist() == [900, 1049, 1050][:2]
    assert pos[index[ptr[1]:ptr[2]]].tolist() == [1049, 1050, 1100]


def test_whole_donor_hiding_and_folds_take_every_sample_of_a_donor():
    rng = np.random.default_rng(1)
    donor_index = np.repeat(np.arange(40), 3)
    observed = rng.random((20, len(donor_index))) < 0.9
    task = EvaluationConfig(task="samples", whole_donors=True, fraction=0.25)
    hidden = hide(observed, task, donor_index=donor_index)
    donors = np.unique(donor_index[hidden.any(axis=0)])
    assert len(donors) == 10
    assert (hidden[:, np.isin(donor_index, donors)] == observed[:, np.isin(donor_index, donors)]).all()
    assert not hidden[:, ~np.isin(donor_index, donors)].any()
    with pytest.raises(Exception, match="whole_donors"):
        EvaluationConfig(task="entries", whole_donors=True)


def test_promoter_lookup_gives_personal_rows_and_the_reference_elsewhere():
    lookup = PromoterLookup(gene_row=np.array([0, 1, -1]), sample_donor=np.array([0, 1, 1, 2]),
                            personal_keys=np.array([0 * 3 + 1, 1 * 3 + 2]), personal_rows=np.array([[5, 6], [7, 1]]),
                            n_donors=3)
    a, b = lookup.rows(np.array([0, 0, 0, 1, 1, 2]), np.array([0, 1, 2, 0, 3, 3]))
    assert a.tolist() == [0, 5, 5, 1, 7, -1]
    assert b.tolist() == [0, 6, 6, 1, 1, -1]
    ref = PromoterLookup.reference(np.array([3, -1]))
    assert [x.tolist() for x in ref.rows(np.array([0, 1]), np.array([9, 9]))] == [[3, -1], [3, -1]]


@pytest.fixture(scope="module")
def eqtl_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eqtl") / "data"
    generate(out, SynthSpec(seed=11, n_genes=100, n_donors=120, n_tissues=3))
    return out


def test_elastic_net_predicts_held_out_donors_from_their_genotypes(eqtl_data):
    config = load_config(eqtl_data / "config.yaml", GENOTYPE_TASK)
    problem, truth = make_problem(load_dataset(config))
    assert problem.genomes is not None and problem.genomes.has_genome.all()
    method = ElasticNetBaseline()
    method.fit(problem)
    assert method.n_fitted > 10
    held = np.unique(problem.donor_index[truth.sample_index])
    # donors held out have no visible value, yet the baseline tells them apart
    assert np.isnan(problem.values[:, np.isin(problem.donor_index, held)]).all()
    assert np.ptp(method.genetic[:, held], axis=1).max() > 0


def test_genetic_scores_of_a_gene_range_are_the_whole_problems(eqtl_data):
    """A chromosome task fits its genes' cis-genetic scores from their rows and genomes alone
    (``DonorGenomes.gene_range``): the whole problem's scores, with one dosage row per site link or shared rows."""
    config = load_config(eqtl_data / "config.yaml", GENOTYPE_TASK)
    problem, _ = make_problem(load_dataset(config))
    genomes = problem.genomes
    args = (problem.tissue_index, problem.donor_index, len(problem.tissues), config.context.genetic_shrinkage)
    whole, _ = genetic_scores(genomes, problem.values, *args)
    assert np.isfinite(whole).sum() > 0
    links = int(genomes.site_ptr[-1])
    shared = dataclasses.replace(genomes, dosage=np.asarray(genomes.link_dosage(0, links))[::-1].copy(),
                                 dosage_row=np.arange(links)[::-1].copy())  # the same dosages through a row map
    for g in (genomes, shared):
        for lo, hi in ((0, 37), (37, 38), (38, problem.n_genes)):
            part, _ = genetic_scores(g.gene_range(lo, hi), problem.values[lo:hi], *args)
            np.testing.assert_array_equal(part, whole[lo:hi])


def test_training_folds_with_whole_donors_are_disjoint_donor_sets(eqtl_data):
    config = load_config(eqtl_data / "config.yaml", GENOTYPE_TASK)
    problem, _ = make_problem(load_dataset(config))
    folds = training_folds(problem, "samples", 2, 0.25, 0, whole_donors=True)
    donor_sets = [set(np.unique(problem.donor_index[f.any(axis=0)]).tolist()) for f in folds]
    assert donor_sets[0] and not donor_sets[0] & donor_sets[1]
    # every visible value of a chosen donor is re-hidden, and nothing of the others
    visible = ~np.isnan(problem.values)
    for f, donors in zip(folds, donor_sets, strict=True):
        cols = np.isin(problem.donor_index, list(donors))
        assert (f[:, cols] == visible[:, cols]).all() and not f[:, ~cols].any()


@pytest.fixture(scope="module")
def evaluated(ray_local, eqtl_data, tmp_path_factory) -> tuple[dict, Path, Path]:
    out = tmp_path_factory.mktemp("eqtl-eval")
    config = eqtl_data / "config.yaml"
    code = cli(["-q", "evaluate", "--config", str(config), "--out", str(out / "eval"),
                "--set", f"output_dir={out / 'work'}",
                "--set", f"evaluation.heritability={eqtl_data / 'truth' / 'genes.tsv'}",
                *[x for s in TINY + GENOTYPE_TASK for x in ("--set", s)]])
    assert code == 0
    return json.loads((out / "eval" / "metrics.json").read_text()), out, config


@pytest.mark.slow  # two hybrids and an elastic net: a few minutes on 2 cores (`bash scripts/test.sh -m slow`)
def test_planted_eqtls_genotype_hybrid_against_reference_elastic_net_and_ceiling(evaluated):
    metrics, _, _ = evaluated
    genetic = metrics["genetic"]
    heritable = genetic["mean_heritable"]
    assert genetic["n_heritable_genes"] >= 20
    # the reference-genome model predicts every held-out donor alike
    assert heritable["hybrid_reference"] == pytest.approx(0.0, abs=0.02)
    # the genotype-aware hybrid tells held-out donors apart, about as well as the elastic net, below the ceiling
    assert heritable["hybrid"] > 0.5 * heritable["ceiling"]
    assert heritable["hybrid"] >= heritable["elastic_net"] - 0.08
    assert heritable["hybrid"] <= heritable["ceiling"] + 0.1
    assert genetic["mean"]["hybrid"] < heritable["hybrid"]  # genes without planted eQTLs drag the mean down
    assert "hybrid_reference" in metrics["methods"] and "elastic_net" in metrics["methods"]


@pytest.mark.slow  # trains on the evaluation's records: runs with the test above
def test_variant_effects_follow_the_planted_eqtls(evaluated, tmp_path):
    _, out, config = evaluated
    records = out / "eval" / "records"
    common = ["--config", str(config), "--set", f"output_dir={tmp_path}",
              *[x for s in TINY + GENOTYPE_TASK for x in ("--set", s)]]
    assert cli(["-q", "train", *common, "--records", str(records)]) == 0
    assert cli(["-q", "fit-head", *common, "--records", str(records)]) == 0
    assert cli(["-q", "variant-effects", *common, "--out", str(tmp_path / "effects")]) == 0
    table = pq.read_table(tmp_path / "effects" / "variant_effects.parquet").to_pandas()
    manifest = json.loads((tmp_path / "effects" / "_manifest.json").read_text())
    assert manifest["rows"]["variant_effects"] == len(table)
    n_tissues = table["tissue"].nunique()
    assert n_tissues == 3 and len(table) == manifest["rows"]["variant_gene_pairs"] * n_tissues
    assert table.groupby(["variant_id", "gene_id", "alt"]).size().eq(n_tissues).all()
    import pandas as pd

    planted = pd.read_csv(config.parent / "truth" / "eqtls.tsv", sep="\t")[["variant_id", "gene_id", "effect"]]
    per_variant = table.groupby(["variant_id", "gene_id"], as_index=False)["effect"].mean()
    joined = per_variant.merge(planted, on=["variant_id", "gene_id"], how="left").fillna({"effect_y": 0.0})
    strong = joined[joined["effect_y"].abs() > 0.2]
    assert len(strong) >= 5
    # the sign of every strong planted effect is recovered, and effects correlate with the truth overall
    assert (np.sign(strong["effect_x"]) == np.sign(strong["effect_y"])).mean() >= 0.9
    assert np.corrcoef(joined["effect_x"], joined["effect_y"])[0, 1] > 0.5

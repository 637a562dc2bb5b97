"""The strong baselines on planted data: each beats ``row_tissue`` where its structure is planted; out-of-fold
estimates never see the entries they estimate; settings are tuned on visible data only. Numpy only (no Ray)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import donor_data, problem_of

from geximpute.config import BaselinesConfig
from geximpute.science import baselines as baselines_module
from geximpute.science.baselines import (
    BAG_SEED_STEP,
    ENTRY_METHODS,
    OWN_ROW_METHODS,
    CrossGeneRegressionBaseline,
    FamilyLevels,
    GeneFamilyBaseline,
    PairwiseRegressionBaseline,
    PromoterCompositionBaseline,
    RowTissueBaseline,
    baseline_estimates,
    family_rows,
    fit_ranges,
    forms_families,
    gene_family_keys,
    make_method,
    make_methods,
    out_of_fold_estimates,
    promoter_composition,
    range_estimates,
    range_families,
    tune_settings,
)
from geximpute.science.context import ContextIndex, build_context
from geximpute.science.folds import fold_problem, training_folds
from geximpute.science.problem import gene_rows, gene_subset

#: the defaults untuned, chained_boosting with one bag (three cost three times as long; bags have their own test)
FIXED = BaselinesConfig(tune=False, cb_bags=1)


def hide_samples(values: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cols = rng.choice(values.shape[1], size=int(fraction * values.shape[1]), replace=False)
    visible = values.copy()
    visible[:, cols] = np.nan
    gi, si = np.meshgrid(np.arange(values.shape[0]), cols, indexing="ij")
    return visible, gi.ravel(), si.ravel()


def rmse(method, problem, gi, si, truth) -> float:
    method.fit(problem)
    return float(np.sqrt(np.mean((method.predict_entries(gi, si) - truth) ** 2)))


@pytest.mark.parametrize("name", ["pairwise_regression", "cross_gene_regression", "tensor_factorisation",
                                  "iterative_ridge"])
def test_donor_methods_beat_row_tissue_on_hidden_samples(name):
    values, donor, tissue = donor_data(seed=1)
    visible, gi, si = hide_samples(values, 0.15, seed=2)
    problem = problem_of(visible, donor, tissue)
    truth = values[gi, si]
    base = rmse(RowTissueBaseline(), problem, gi, si, truth)
    err = rmse(make_method(name, FIXED), problem, gi, si, truth)
    # the donor's other tissues carry its planted factors: a method that reads them is far better than the mean
    assert err < 0.8 * base, (name, err, base)
    if name == "iterative_ridge":
        return  # one regression per tissue pooled over genes: it cannot follow gene-specific loadings
    # and it recovers the planted donor signal across donors: Pearson of each (gene, tissue) across hidden donors
    method = make_method(name, FIXED)
    method.fit(problem)
    pred = method.predict_entries(gi, si)
    rs = []
    for g in range(values.shape[0]):
        for t in range(6):
            m = (gi == g) & (tissue[si] == t)
            if m.sum() >= 8:
                rs.append(np.corrcoef(pred[m], truth[m])[0, 1])
    assert np.mean(rs) > 0.5, (name, np.mean(rs))


def across_donor_pearson(pred, truth, gi, tissue_of_entry, n_genes, n_tissues) -> float:
    """Mean over (gene, tissue) with >= 8 hidden donors of the Pearson across them."""
    rs = [np.corrcoef(pred[m], truth[m])[0, 1] for g in range(n_genes) for t in range(n_tissues)
          if (m := (gi == g) & (tissue_of_entry == t)).sum() >= 8]
    return float(np.mean(rs))


def test_cross_gene_regression_reads_the_donor_state_that_other_genes_share():
    # one donor factor moves every gene in every tissue; with 4 tissues and half the cells sampled a donor has few
    # other tissues of the gene itself, but ~30 genes in each: their lines estimate the donor far better
    values, donor, tissue = donor_data(seed=2, n_genes=30, n_donors=150, n_tissues=4, rank=1, observed=0.5)
    visible, gi, si = hide_samples(values, 0.15, seed=3)
    problem = problem_of(visible, donor, tissue)
    truth = values[gi, si]
    own = PairwiseRegressionBaseline(10, 0.0)
    own.fit(problem)
    own_est = own.predict_entries(gi, si)
    alone = CrossGeneRegressionBaseline(10, 0.0, 29)
    alone.fit(problem)
    # weight 0 on the other genes: exactly pairwise_regression without a prior
    np.testing.assert_allclose(alone.predict_entries(gi, si), own_est, rtol=0, atol=1e-9)
    both = CrossGeneRegressionBaseline(10, 0.05, 29)
    both.fit(problem)
    r_own = across_donor_pearson(own_est, truth, gi, tissue[si], 30, 4)
    r_both = across_donor_pearson(both.predict_entries(gi, si), truth, gi, tissue[si], 30, 4)
    assert r_both > r_own + 0.05, (r_both, r_own)  # measured: 0.666 against 0.566


def test_cross_gene_regression_draws_its_lines_from_the_genes_that_move_with_each_gene():
    # two groups of genes, each moved by its own donor factor: a gene's partners are genes of its own group
    rng = np.random.default_rng(5)
    n_donors, n_tissues = 200, 3
    z = rng.normal(size=(2, n_donors))
    group = np.repeat([0, 1], 6)
    level = rng.normal(3, 1, size=(12, n_tissues))
    cube = level[:, None, :] + z[group][:, :, None] + rng.normal(scale=0.5, size=(12, n_donors, n_tissues))
    partners = CrossGeneRegressionBaseline._partners(cube, level, 5)
    assert partners.shape == (12, 5)
    for g in range(12):
        assert set(partners[g]) == set(np.flatnonzero(group == group[g])) - {g}, (g, partners[g])
    assert CrossGeneRegressionBaseline._partners(cube[:1], level[:1], 5).shape == (1, 0)


def test_iterative_ridge_beats_row_tissue_on_a_gene_by_tissue_table():
    # one reference genotype: a genes x tissues table with two programs of tissue specificity
    rng = np.random.default_rng(4)
    n_genes, n_t = 2000, 12
    values = (rng.normal(3, 1, (n_genes, 1)) + rng.normal(size=(n_genes, 2)) @ rng.normal(size=(2, n_t))
              + rng.normal(scale=0.2, size=(n_genes, n_t)))
    hidden = rng.random(values.shape) < 0.1
    visible = np.where(hidden, np.nan, values)
    problem = problem_of(visible, np.zeros(n_t, int), np.arange(n_t))
    gi, si = np.nonzero(hidden)
    base = rmse(RowTissueBaseline(), problem, gi, si, values[gi, si])
    err = rmse(make_method("iterative_ridge", FIXED), problem, gi, si, values[gi, si])
    assert err < 0.6 * base, (err, base)


def test_local_regression_follows_gene_clusters_that_one_regression_per_tissue_misses():
    # a genes x tissues table of 12 clusters, each with its own tissue pattern (no low rank: 12 patterns in 10
    # tissues, so each tissue's one regression on the others over all genes is a compromise); a gene is its
    # cluster's pattern at its own amplitude plus its level and noise
    rng = np.random.default_rng(7)
    n_genes, n_t, n_clusters = 1500, 10, 12
    patterns = rng.normal(size=(n_clusters, n_t)) * 1.5
    cluster = rng.integers(n_clusters, size=n_genes)
    values = (rng.normal(3, 1, (n_genes, 1)) + rng.uniform(0.5, 1.5, (n_genes, 1)) * patterns[cluster]
              + rng.normal(scale=0.2, size=(n_genes, n_t)))
    hidden = rng.random(values.shape) < 0.1
    visible = np.where(hidden, np.nan, values)
    problem = problem_of(visible, np.zeros(n_t, int), np.arange(n_t))
    gi, si = np.nonzero(hidden)
    ridge = rmse(make_method("iterative_ridge", FIXED), problem, gi, si, values[gi, si])
    method = make_method("local_regression", FIXED)
    local = rmse(method, problem, gi, si, values[gi, si])
    assert local < 0.8 * ridge, (local, ridge)
    # a visible cell is its own value; every cell is finite
    vg, vs = np.nonzero(~hidden)
    np.testing.assert_allclose(method.predict_entries(vg[:50], vs[:50]), values[vg[:50], vs[:50]], rtol=1e-5)
    assert np.isfinite(method.cells).all()


def test_local_regression_with_donors_follows_gene_specific_loadings():
    # each gene loads the donors' factors differently in every tissue: one regression per tissue pooled over genes
    # (iterative_ridge) cannot follow that; a (gene, donor) row regressed on the same gene's nearest donors can
    values, donor, tissue = donor_data(seed=3, n_genes=12, n_donors=150)
    visible, gi, si = hide_samples(values, 0.15, seed=4)
    problem = problem_of(visible, donor, tissue)
    truth = values[gi, si]
    ridge = rmse(make_method("iterative_ridge", FIXED), problem, gi, si, truth)
    method = make_method("local_regression", FIXED)
    local = rmse(method, problem, gi, si, truth)
    assert local < 0.9 * ridge, (local, ridge)
    # with donors it starts from iterative_ridge's fill whatever lls_start says (chained_boosting: tables only)
    assert FIXED.lls_start == "chained_boosting"
    from_ridge = make_method("local_regression", dataclasses.replace(FIXED, lls_start="iterative_ridge"))
    from_ridge.fit(problem)
    np.testing.assert_array_equal(from_ridge.cells, method.cells)


def test_chained_boosting_follows_tissues_that_switch_on_where_linear_regressions_cannot():
    # a genes x tissues table where two tissues switch on only above a level of two others (a gene silent in the
    # one unless the other two are both high): no linear map across tissues follows a switch; trees do
    rng = np.random.default_rng(11)
    n_genes, n_t = 2000, 8
    values = rng.normal(3, 1, (n_genes, 1)) + rng.normal(size=(n_genes, 2)) @ rng.normal(size=(2, n_t)) * 0.5
    on = (values[:, 2] > 3.0) & (values[:, 3] > 3.0)
    values[:, 0] = np.where(on, values[:, 2] + 2.0, 0.0)
    values[:, 1] = np.where(values[:, 4] > 3.0, values[:, 4], 0.5)
    values = values + rng.normal(scale=0.1, size=values.shape)
    hidden = rng.random(values.shape) < 0.1
    visible = np.where(hidden, np.nan, values)
    problem = problem_of(visible, np.zeros(n_t, int), np.arange(n_t))
    gi, si = np.nonzero(hidden)
    switching = si < 2
    ridge = make_method("iterative_ridge", FIXED)
    ridge.fit(problem)
    method = make_method("chained_boosting", FIXED, seed=3)
    method.fit(problem)
    err = {name: np.sqrt(np.mean((m.predict_entries(gi[switching], si[switching]) - values[gi, si][switching]) ** 2))
           for name, m in (("ridge", ridge), ("boosting", method))}
    assert err["boosting"] < 0.6 * err["ridge"], err
    # a visible cell is its own value; every cell is finite; the same seed gives the same cells
    vg, vs = np.nonzero(~hidden)
    np.testing.assert_allclose(method.predict_entries(vg[:50], vs[:50]), values[vg[:50], vs[:50]], rtol=1e-5)
    assert np.isfinite(method.cells).all()
    again = make_method("chained_boosting", FIXED, seed=3)
    again.fit(problem)
    np.testing.assert_array_equal(again.cells, method.cells)


def test_chained_boosting_bags_average_runs_drawn_with_their_own_seeds():
    rng = np.random.default_rng(12)
    values = rng.normal(size=(300, 1)) + rng.normal(size=(300, 2)) @ rng.normal(size=(2, 5))
    values = values + rng.normal(scale=0.3, size=values.shape)
    visible = np.where(rng.random(values.shape) < 0.2, np.nan, values)
    problem = problem_of(visible, np.zeros(5, int), np.arange(5))
    assert BaselinesConfig().cb_bags == 3  # the default
    bagged = make_method("chained_boosting", dataclasses.replace(FIXED, cb_bags=3), seed=3)
    bagged.fit(problem)
    single = [make_method("chained_boosting", FIXED, seed=3 + BAG_SEED_STEP * b) for b in range(3)]
    for m in single:
        m.fit(problem)
    assert not np.allclose(single[0].cells, single[1].cells)  # each bag draws its own rows and trees
    np.testing.assert_allclose(bagged.cells, np.mean([m.cells for m in single], axis=0), rtol=1e-6, atol=1e-6)
    missing = np.isnan(visible)
    assert np.isfinite(bagged.cells[:, 0, :][missing]).all()
    np.testing.assert_allclose(bagged.cells[:, 0, :][~missing], visible[~missing], rtol=1e-5)  # visible kept


def test_chained_boosting_rounds_from_one_run_are_the_runs_of_fewer_rounds():
    """The tuning fills every cb_rounds candidate from one run of the most rounds (half the rounds fitted for the
    grid 1, 2, 3): each fill must be, to the last bit, the one a run of its own rounds gives, bags included."""
    rng = np.random.default_rng(13)
    values = rng.normal(size=(300, 1)) + rng.normal(size=(300, 2)) @ rng.normal(size=(2, 5))
    visible = np.where(rng.random(values.shape) < 0.2, np.nan, values + rng.normal(scale=0.3, size=values.shape))
    settings = dataclasses.replace(FIXED, cb_bags=2)
    shared = problem_of(visible, np.zeros(5, int), np.arange(5))
    make_method("chained_boosting", settings, seed=3).fill_rounds(shared, [1, 2, 3])
    for rounds in (1, 2, 3):
        cached = make_method("chained_boosting", dataclasses.replace(settings, cb_rounds=rounds), seed=3)
        cached.fit(shared)  # finds its fill: no boosting here
        own = make_method("chained_boosting", dataclasses.replace(settings, cb_rounds=rounds), seed=3)
        own.fit(problem_of(visible, np.zeros(5, int), np.arange(5)))  # a new problem: its own run
        np.testing.assert_array_equal(cached.cells, own.cells)
    one, three = (make_method("chained_boosting", dataclasses.replace(settings, cb_rounds=r), seed=3)
                  for r in (1, 3))
    one.fit(shared)
    three.fit(shared)
    assert not np.array_equal(one.cells, three.cells)  # the rounds do differ


def test_promoter_composition_predicts_hidden_genes_from_cpg():
    rng = np.random.default_rng(5)
    n_genes, n_t, length, upstream = 400, 5, 600, 400
    # half the genes have CpG-island promoters (GC-rich, CpG-rich) and are expressed higher in every tissue
    island = rng.random(n_genes) < 0.5
    seqs = []
    for g in range(n_genes):
        p = [0.2, 0.3, 0.3, 0.2] if island[g] else [0.3, 0.2, 0.2, 0.3]
        s = "".join(rng.choice(list("ACGT"), size=length, p=p))
        seqs.append(s.replace("CA", "CG") if island[g] else s)
    seqs[0] = None  # a gene without sequence falls back to the tissue mean
    comp = promoter_composition(seqs, upstream)
    assert np.isnan(comp[0]).all() and not np.isnan(comp[1:]).any()
    values = 2 + 2.5 * island[:, None] + rng.normal(size=(n_genes, n_t)) * 0.8
    hidden_genes = rng.choice(np.arange(1, n_genes), size=60, replace=False)
    visible = values.copy()
    visible[hidden_genes] = np.nan
    problem = problem_of(visible, np.zeros(n_t, int), np.arange(n_t))
    gi = np.repeat(hidden_genes, n_t)
    si = np.tile(np.arange(n_t), len(hidden_genes))
    truth = values[gi, si]
    method = make_method("promoter_composition", FIXED, composition=comp)
    method.fit(problem)
    pred = method.predict_entries(gi, si)
    assert np.corrcoef(pred, truth)[0, 1] > 0.6
    # row_tissue knows nothing of a hidden gene: one value per tissue
    base = RowTissueBaseline()
    base.fit(problem)
    assert np.ptp(base.predict_entries(gi[si == 0], si[si == 0])) < 1e-6
    assert np.sqrt(np.mean((pred - truth) ** 2)) < 0.7 * np.sqrt(np.mean((base.predict_entries(gi, si) - truth) ** 2))


def test_gene_family_keys_are_the_stems_of_symbols():
    coarse, fine = gene_family_keys(["RPL10A", "SLC25A1", "OR2A1", "HLA-DRB1", "ENSG00000141510", None, "",
                                     "7SK", "znf512"])
    assert list(coarse) == ["RPL", "SLC", "OR", "HLA", None, None, None, None, "ZNF"]
    assert list(fine) == ["RPL10", "SLC25", "OR2", "HLA", None, None, None, None, "ZNF512"]


def test_gene_family_predicts_hidden_genes_from_their_familys_other_genes():
    rng = np.random.default_rng(7)
    n_t = 5
    # three families at different levels in every tissue, plus genes without a symbol
    families = {"RPL": 8.0, "OR": 0.5, "ZNF": 3.0}
    names, level = [], []
    for stem, mu in families.items():
        for i in range(40):
            names.append(f"{stem}{i % 7 + 1}{'AB'[i % 2]}")
            level.append(mu)
    names += [None] * 20
    level += [4.0] * 20
    level = np.asarray(level)
    values = level[:, None] + rng.normal(size=(len(level), n_t)) * 0.5 + np.arange(n_t) * 0.1
    hidden_genes = rng.choice(len(level), size=30, replace=False)
    visible = values.copy()
    visible[hidden_genes] = np.nan
    problem = dataclasses.replace(problem_of(visible, np.zeros(n_t, int), np.arange(n_t)),
                                  gene_names=np.asarray(names, dtype=object))
    gi = np.repeat(hidden_genes, n_t)
    si = np.tile(np.arange(n_t), len(hidden_genes))
    method = make_method("gene_family", FIXED)
    method.fit(problem)
    pred = method.predict_entries(gi, si)
    assert np.isfinite(pred).all()
    assert np.corrcoef(pred, values[gi, si])[0, 1] > 0.9
    # a visible gene is estimated from the others of its family, never from its own value
    problem.values[0, 0] = 1_000.0
    method.fit(problem)
    alone = method.predict_entries(np.array([0]), np.array([0]))[0]
    other = method.predict_entries(np.array([2]), np.array([0]))[0]  # RPL genes 0 and 2 share the fine family
    assert alone < 20 < other
    # a gene without a symbol gets the sample's mean over the other visible genes
    no_name = len(level) - 1
    sample_mean = np.nanmean(np.delete(problem.values[:, 1], no_name))
    assert method.predict_entries(np.array([no_name]), np.array([1]))[0] == pytest.approx(sample_mean)
    # with a strong prior the families' means fade into the sample's mean
    strong = GeneFamilyBaseline(1e9)
    strong.fit(problem)
    assert np.ptp(strong.predict_entries(gi[si == 0], si[si == 0])) < 1e-3


def test_family_levels_in_passes_leave_the_gene_out_and_mark_genes_without_a_family():
    rng = np.random.default_rng(3)
    names = np.asarray(["RPL10A", "RPL10B", "RPL11", "SLC25A1", "SLC2A1", None, "ENSG00000141510", "OR2A1"] * 5,
                       dtype=object)
    values = rng.normal(size=(len(names), 9)) + 3
    values[rng.random(values.shape) < 0.3] = np.nan
    values[:, 4] = np.nan  # a sample with nothing visible
    tissue = np.arange(9) % 3
    one = FamilyLevels(values, names, tissue, 3)
    passes = FamilyLevels(values, names, tissue, 3, chunk=2)
    gi, si = np.divmod(np.arange(values.size), values.shape[1])
    np.testing.assert_allclose(passes.estimate(gi, si, 3.0), one.estimate(gi, si, 3.0), rtol=1e-12)
    level = one.level(gi, si, 3.0)
    no_family = np.isin(names[gi], [None, "ENSG00000141510"])
    assert np.isnan(level[no_family]).all() and np.isfinite(level[~no_family]).all()
    # the same estimate gene_family gives (where there is a family), and never the gene's own value
    method = GeneFamilyBaseline(3.0)
    method.fit(dataclasses.replace(problem_of(values, np.zeros(9, int), tissue), gene_names=names))
    np.testing.assert_allclose(level[~no_family], method.predict_entries(gi, si)[~no_family], rtol=1e-5)
    changed = values.copy()
    changed[0, 0] = 1_000.0
    assert FamilyLevels(changed, names, tissue, 3).level(np.array([0]), np.array([0]), 3.0)[0] == pytest.approx(
        level[0], rel=1e-12)
    assert FamilyLevels(changed, names, tissue, 3).level(np.array([1]), np.array([0]), 3.0) > level[1] + 10
    assert forms_families(names) and not forms_families([f"SYN{i}" for i in range(50)])
    # each stem five times: RPL, SLC, OR; RPL10, RPL11, SLC25, SLC2, OR2
    assert family_rows(names) == sum(len(sums) for sums in one.sums) == 3 + 5


def test_gene_family_reads_the_whole_problems_families_in_every_gene_range(monkeypatch):
    """Fitted on gene ranges (``baselines.block_cells``), ``gene_family`` estimates every gene from its family
    wherever the members are (the families' sums of the whole problem, shared by the ranges): the estimates of one
    range to the bit, where a range's own families alone would lose members; the other methods stay per range."""
    rng = np.random.default_rng(5)
    stems = np.array(["RPL", "OR", "ZNF", "SLC"])
    # a family's members spread over the genome: every fourth gene, across all the ranges
    names = np.asarray([f"{stems[g % 4]}{g % 9 + 1}" for g in range(48)], dtype=object)
    values = np.array([8.0, 0.5, 3.0, 5.0])[np.arange(48) % 4, None] + rng.normal(size=(48, 6)) * 0.5
    hidden = np.arange(0, 48, 5)
    values[hidden] = np.nan
    problem = dataclasses.replace(problem_of(values, np.zeros(6, int), np.arange(6)), gene_names=names)
    gi, si = np.repeat(hidden, 6), np.tile(np.arange(6), len(hidden))
    names_fitted = ("gene_family", "row_tissue")
    one = baseline_estimates(problem, gi, si, names_fitted, FIXED)
    monkeypatch.setattr(baselines_module, "MIN_FIT_GENES", 4)
    ranged = dataclasses.replace(FIXED, block_cells=6 * 8)  # six ranges of eight genes
    assert len(fit_ranges(problem, ranged.block_cells)) == 6
    many = baseline_estimates(problem, gi, si, names_fitted, ranged)
    np.testing.assert_array_equal(many["gene_family"], one["gene_family"])
    assert np.corrcoef(many["gene_family"], (np.array([8.0, 0.5, 3.0, 5.0])[gi % 4]))[0, 1] > 0.95
    # a range's own families alone: what the ranges gave before (two members of a family per range at most)
    alone = np.concatenate([range_estimates(gene_rows(problem, lo, hi), gi[(gi >= lo) & (gi < hi)] - lo,
                                            si[(gi >= lo) & (gi < hi)], ("gene_family",), ranged)["gene_family"]
                            for lo, hi in fit_ranges(problem, ranged.block_cells)])
    assert not np.allclose(alone, one["gene_family"])
    # the parts are views of one set of sums: a part's levels are the whole's for its genes
    whole = range_families(problem, names_fitted, fit_ranges(problem, ranged.block_cells))
    assert whole is not None and whole.values is None
    part = whole.part(slice(8, 16)).bind(problem.values[8:16])
    assert part.sums[0] is whole.sums[0]
    np.testing.assert_array_equal(part.estimate(np.arange(8), np.zeros(8, int), 3.0),
                                  FamilyLevels(problem.values, names, problem.tissue_index, 6).estimate(
                                      np.arange(8, 16), np.zeros(8, int), 3.0))
    assert range_families(problem, ("row_tissue",), [(0, 8), (8, 48)]) is None
    assert range_families(problem, names_fitted, [(0, 48)]) is None
    # entries hidden by a mask count as the NaN they would be (the tuning's split), and a part takes any rows
    split = np.zeros(problem.values.shape, bool)
    split[[1, 9, 30], :] = True
    masked = problem.values.copy()
    masked[split] = np.nan
    rows = np.array([1, 2, 9, 30, 47])
    by_mask = FamilyLevels(problem.values, names, problem.tissue_index, 6, hidden=split).part(rows).bind(masked[rows])
    by_nan = FamilyLevels(masked, names, problem.tissue_index, 6)
    np.testing.assert_array_equal(by_mask.estimate(np.arange(5), np.full(5, 2), 1.0),
                                  by_nan.estimate(rows, np.full(5, 2), 1.0))
    # the tuning on two of twelve ranges reads the whole problem's families too: their members in the other ranges
    # (ten of every twelve members) make its validation score higher than that of the two ranges' families alone
    noisy = np.array([8.0, 0.5, 3.0, 5.0, 1.0, 6.0, 2.0, 4.0])[np.arange(96) % 8, None] + rng.normal(size=(96, 6)) * 2
    stems = np.array(["RPL", "OR", "ZNF", "SLC", "HLA", "KRT", "COL", "MYH"])
    wide = dataclasses.replace(problem_of(noisy, np.zeros(6, int), np.arange(6)),
                               gene_names=np.asarray([f"{stems[g % 8]}{g % 5 + 1}" for g in range(96)], dtype=object))
    tuning = dataclasses.replace(ranged, tune_ranges=2, tune_fraction=0.25)
    _, report = tune_settings(wide, ("gene_family",), tuning, "genes", seed=1)
    # the same two ranges and split, tuned as a problem of their own (the ranges' own families: the old tuning)
    ranges = fit_ranges(wide, tuning.block_cells)
    picked = np.sort(np.random.default_rng(1 + 7_919).choice(len(ranges), 2, replace=False))  # as tune_settings
    kept = np.concatenate([np.arange(*ranges[i]) for i in picked])
    _, alone = tune_settings(gene_subset(wide, kept), ("gene_family",), tuning, "genes", seed=1)
    assert len(ranges) == 12 and report["gene_family"]["n_genes"] == alone["gene_family"]["n_genes"] == 16
    assert report["gene_family"]["n_validation"] == alone["gene_family"]["n_validation"]
    assert report["gene_family"]["score"] > alone["gene_family"]["score"] + 0.05


def test_gene_family_needs_symbols_and_whole_hidden_genes():
    _, skipped = make_methods(("gene_family",), FIXED, n_donors=1, task="genes")
    assert "gene symbols" in skipped["gene_family"]
    kept, _ = make_methods(("gene_family",), FIXED, n_donors=1, task="genes", gene_names=True)
    assert [m.name for m in kept] == ["gene_family"]
    _, skipped = make_methods(("gene_family",), FIXED, n_donors=1, task="entries", gene_names=True)
    assert "genes task" in skipped["gene_family"]


def test_methods_that_need_donors_or_sequence_are_skipped_with_a_reason():
    methods, skipped = make_methods(("row_tissue", "pairwise_regression", "tensor_factorisation",
                                     "promoter_composition", "hybrid"), FIXED, n_donors=1)
    assert [m.name for m in methods] == ["row_tissue"]
    assert set(skipped) == {"pairwise_regression", "tensor_factorisation", "promoter_composition"}
    methods, skipped = make_methods(("iterative_ridge", "chained_boosting"), FIXED, n_donors=5)
    assert [m.name for m in methods] == ["iterative_ridge"] and "gene x tissue table" in skipped["chained_boosting"]


def test_out_of_fold_estimates_never_see_their_own_entries():
    values, donor, tissue = donor_data(seed=6, n_genes=20, n_donors=60)
    problem = problem_of(values, donor, tissue)
    folds = training_folds(problem, "samples", 3, 0.2, seed=0)
    oof = out_of_fold_estimates(problem, folds, ENTRY_METHODS, FIXED)
    assert set(oof) == {"row_tissue", "matrix_completion", "pairwise_regression", "cross_gene_regression",
                        "iterative_ridge", "local_regression", "tensor_factorisation"}
    # (no composition given; chained_boosting: tables only)
    in_folds = np.any(folds, axis=0)
    for name, grid in oof.items():
        assert np.isfinite(grid[in_folds]).all() and np.isnan(grid[~in_folds]).all(), name
    # each fold's estimates are those of a fit with that fold hidden...
    gi, si = np.nonzero(folds[1])
    method = make_method("pairwise_regression", FIXED)
    method.fit(fold_problem(problem, folds[1]))
    np.testing.assert_allclose(oof["pairwise_regression"][gi, si], method.predict_entries(gi, si), rtol=1e-5)
    # ...so changing the values of fold 1 moves no estimate of fold 1
    changed = values.copy()
    changed[folds[1]] += np.random.default_rng(0).normal(scale=5, size=int(folds[1].sum()))
    oof2 = out_of_fold_estimates(problem_of(changed, donor, tissue), folds, ENTRY_METHODS, FIXED)
    for name in oof:
        np.testing.assert_array_equal(oof[name][folds[1]], oof2[name][folds[1]], err_msg=name)
        assert not np.allclose(oof[name][folds[0]], oof2[name][folds[0]]), name


def test_entry_baselines_are_fitted_per_gene_range_of_bounded_size(monkeypatch):
    values, donor, tissue = donor_data(seed=9, n_genes=50, n_donors=40)
    visible, gi, si = hide_samples(values, 0.2, seed=10)
    problem = problem_of(visible, donor, tissue)
    composition = np.random.default_rng(1).normal(size=(problem.n_genes, 5))
    composition[:30] = np.nan  # the first range has no sequence at all: the method still applies to the problem
    cells = max(problem.n_samples, 40 * 6)
    assert fit_ranges(problem, BaselinesConfig().block_cells) == [(0, 50)]  # small data: one fit, as before
    monkeypatch.setattr(baselines_module, "MIN_FIT_GENES", 5)
    small = BaselinesConfig(tune=False, block_cells=cells * 17)
    ranges = fit_ranges(problem, small.block_cells)
    assert ranges == [(0, 17), (17, 33), (33, 50)]  # about 17 genes each, consecutive, every gene once
    whole = baseline_estimates(problem, gi, si, ENTRY_METHODS, FIXED, composition=composition)
    blocked = baseline_estimates(problem, gi, si, ENTRY_METHODS, small, composition=composition)
    applying = tuple(n for n in ENTRY_METHODS if n not in ("chained_boosting", "gene_family"))  # no symbols here
    assert set(blocked) == set(whole) == set(applying)
    for lo, hi in ranges:  # each entry has the estimate of a fit on its gene range alone
        inside = (gi >= lo) & (gi < hi)
        alone = range_estimates(gene_rows(problem, lo, hi), gi[inside] - lo, si[inside], applying, small,
                                composition=composition[lo:hi])
        for name in applying:
            np.testing.assert_array_equal(blocked[name][inside], alone[name], err_msg=name)
            assert np.isfinite(alone[name]).all(), name
    # a range never reads another's values: changing the last range's moves none of the first two's estimates
    changed = visible.copy()
    changed[33:] += np.random.default_rng(2).normal(scale=3, size=changed[33:].shape)
    moved = baseline_estimates(problem_of(changed, donor, tissue), gi, si, ENTRY_METHODS, small,
                               composition=composition)
    first = gi < 33
    for name in applying:
        np.testing.assert_array_equal(moved[name][first], blocked[name][first], err_msg=name)
        assert not np.allclose(moved[name][~first], blocked[name][~first]), name
    # and the whole problem's fit is not the ranges' (the ranges are fitted apart)
    assert not np.allclose(whole["iterative_ridge"], blocked["iterative_ridge"])


def test_settings_are_tuned_on_a_validation_split_of_visible_data():
    values, donor, tissue = donor_data(seed=7, n_genes=25, n_donors=100, rank=4)
    visible, gi, si = hide_samples(values, 0.1, seed=8)
    problem = problem_of(visible, donor, tissue)
    tuned, report = tune_settings(problem, ("tensor_factorisation", "iterative_ridge", "row_tissue"), FIXED,
                                  "samples", seed=0, min_donors=4)
    assert set(report) == {"tensor_factorisation", "iterative_ridge"}  # row_tissue has nothing to tune
    tf = report["tensor_factorisation"]
    # chosen by the task's headline metric (across-donor Pearson for hidden samples), RMSE kept beside it
    assert tf["metric"] == "across_donors_pearson_mean"
    assert len(tf["grid"]) == 12 and tf["score"] == max(r["score"] for r in tf["grid"])
    assert all(r["rmse"] > 0 for r in tf["grid"])
    assert tuned.tf_rank == tf["chosen"]["tf_rank"] >= 4  # four planted donor factors need rank >= 4
    # the hidden samples play no part: changing them changes nothing in the choice
    changed = problem_of(np.where(np.isnan(visible), 99.0, visible), donor, tissue)
    changed.values[np.isnan(visible)] = np.nan
    _, report2 = tune_settings(changed, ("tensor_factorisation",), FIXED, "samples", seed=0, min_donors=4)
    assert report2["tensor_factorisation"]["grid"] == tf["grid"]


def test_record_methods_are_scored_against_their_own_entries_when_tuned():
    # tissue_donor and distance predict from context records, which come back in their own order
    from geximpute.science.baselines import validation_mask

    values, donor, tissue = donor_data(seed=9, n_genes=30, n_donors=80)
    problem = problem_of(values, donor, tissue)
    _, report = tune_settings(problem, ("tissue_donor",), FIXED, "samples", seed=0)
    mask = validation_mask(problem, "samples", FIXED.tune_fraction, 0)
    gi, si = np.nonzero(mask)
    row_tissue = rmse(RowTissueBaseline(), fold_problem(problem, mask), gi, si, values[gi, si])
    # the donor's other tissues carry its planted factors: scored entry by entry, tissue_donor beats row_tissue
    assert report["tissue_donor"]["rmse"] < 0.9 * row_tissue, (report["tissue_donor"]["rmse"], row_tissue)


def low_rank_table(seed: int, n_genes: int, n_tissues: int = 6) -> tuple:
    """(problem, its generator): a gene x tissue table of one donor, a gene level plus a rank-2 tissue pattern, 10%
    of its entries missing; the generator goes on from there (for the test's own draws)."""
    rng = np.random.default_rng(seed)
    values = rng.normal(3, 1, (n_genes, 1)) + rng.normal(size=(n_genes, 2)) @ rng.normal(size=(2, n_tissues))
    problem = problem_of(np.where(rng.random(values.shape) < 0.1, np.nan, values), np.zeros(n_tissues, int),
                         np.arange(n_tissues))
    return problem, rng


def test_methods_are_tuned_after_the_methods_they_start_from_with_the_settings_chosen_for_them(monkeypatch):
    # local_regression starts from iterative_ridge's or chained_boosting's fill: listed first, it is still tuned
    # after both, and every candidate of it is built with the penalty and rounds already chosen for them
    problem, _ = low_rank_table(seed=12, n_genes=400)
    monkeypatch.setitem(baselines_module.TUNING_GRIDS, "iterative_ridge", {"ridge_alpha": (0.5, 1e6)})
    monkeypatch.setitem(baselines_module.TUNING_GRIDS, "chained_boosting", {"cb_rounds": (1, 2)})
    monkeypatch.setitem(baselines_module.TUNING_GRIDS, "local_regression",
                        {"lls_start": ("iterative_ridge", "chained_boosting"), "lls_k": (10,), "lls_alpha": (10.0,)})
    built = []
    real = baselines_module.make_method

    def spy(name, config, **kwargs):
        built.append((name, config.ridge_alpha, config.cb_rounds))
        return real(name, config, **kwargs)

    monkeypatch.setattr(baselines_module, "make_method", spy)
    tuned, report = tune_settings(problem, ("local_regression", "chained_boosting", "iterative_ridge"), FIXED,
                                  "entries")
    assert list(report) == ["iterative_ridge", "chained_boosting", "local_regression"]
    assert tuned.ridge_alpha == 0.5  # a penalty of a million flattens every regression to the means
    after_ridge = [b for b in built if b[0] in ("chained_boosting", "local_regression")]
    assert after_ridge and all(alpha == tuned.ridge_alpha for _, alpha, _ in after_ridge)
    lls = [b for b in built[built.index(after_ridge[0]):] if b[0] == "local_regression"]
    assert len(lls) >= 2 and all(rounds == tuned.cb_rounds for _, _, rounds in lls)


def test_a_fill_is_shared_by_methods_fitted_on_the_same_problem_and_never_by_a_problem_made_from_it():
    values, donor, tissue = donor_data(seed=13, n_genes=10, n_donors=60)
    problem = problem_of(values, donor, tissue)
    first, second = make_method("local_regression", FIXED), make_method("chained_boosting", FIXED)
    rows = first.start.filled_rows(problem)
    assert second.filled_rows(problem) is rows  # the same settings: fitted once
    assert not rows.filled.flags.writeable  # shared, so nobody may change it
    folds = training_folds(problem, "samples", 2, 0.2, seed=0)
    fold = fold_problem(problem, folds[0])
    refit = second.filled_rows(fold)
    assert refit is not rows
    gi, si = np.nonzero(folds[0])
    # the fold's fill never saw the fold's values: changing them leaves it as it is
    changed = problem_of(np.where(folds[0], values + 5.0, values), donor, tissue)
    np.testing.assert_array_equal(second.filled_rows(fold_problem(changed, folds[0])).filled, refit.filled)
    assert len(gi) > 0


def test_settings_are_tuned_on_a_sample_of_the_gene_ranges_of_a_large_problem(monkeypatch):
    # a problem of four fit ranges is tuned on baselines.tune_ranges of them, as imputation fits them: every
    # candidate is fitted on those ranges' genes only, and the report says how many
    problem, rng = low_rank_table(seed=21, n_genes=800)
    composition = rng.normal(size=(problem.n_genes, 3))
    settings = dataclasses.replace(FIXED, block_cells=1)  # 256 genes a range at least: four ranges of 200
    assert len(baselines_module.fit_ranges(problem, settings.block_cells)) == 4
    monkeypatch.setitem(baselines_module.TUNING_GRIDS, "iterative_ridge", {"ridge_alpha": (0.5, 1e6)})
    fitted = []
    real = baselines_module.make_method

    def spy(name, config, **kwargs):
        method = real(name, config, **kwargs)
        fit = method.fit
        method.fit = lambda p: (fitted.append(p.n_genes), fit(p))[1]
        return method

    monkeypatch.setattr(baselines_module, "make_method", spy)
    tuned, report = tune_settings(problem, ("iterative_ridge",), settings, "entries", composition=composition)
    assert fitted and set(fitted) == {400} and report["iterative_ridge"]["n_genes"] == 400
    assert tuned.ridge_alpha == 0.5  # still the right choice on half the genome
    fitted.clear()
    _, report = tune_settings(problem, ("iterative_ridge",), dataclasses.replace(settings, tune_ranges=4), "entries",
                              composition=composition)
    assert set(fitted) == {800} and report["iterative_ridge"]["n_genes"] == 800


def test_methods_that_read_a_genes_own_values_are_skipped_where_whole_genes_are_hidden():
    """The premise of :data:`OWN_ROW_METHODS`: with whole genes hidden, each gives every hidden gene the same value
    in a sample (so it is skipped on the ``genes`` task), on donor data and on a gene x tissue table alike."""
    values, donor, tissue = donor_data(seed=12, n_genes=40, n_donors=30)
    table = np.random.default_rng(13).normal(size=(40, 6)) + np.arange(6)
    hidden_genes = np.array([3, 11, 17, 25, 38])
    for data, donors, tissues in ((values, donor, tissue), (table, np.zeros(6, int), np.arange(6))):
        visible = data.copy()
        visible[hidden_genes] = np.nan
        problem = problem_of(visible, donors, tissues)
        gi = np.repeat(hidden_genes, problem.n_samples)
        si = np.tile(np.arange(problem.n_samples), len(hidden_genes))
        applying, _ = make_methods(OWN_ROW_METHODS, FIXED, len(problem.donors))
        assert len(applying) >= (1 if len(problem.donors) == 1 else 6)
        records = build_context(ContextIndex(problem), gi, si, np.ones(len(gi), bool), 8)
        order = np.lexsort((records["sample_index"].to_numpy(), records["gene_index"].to_numpy()))
        for method in applying:
            method.fit(problem)
            if method.name in ENTRY_METHODS:
                estimate = np.asarray(method.predict_entries(gi, si))
            else:  # tissue_donor reads context records (in their own order)
                estimate = np.asarray(method.predict(records))[order]
            estimate = estimate.reshape(len(hidden_genes), problem.n_samples)
            assert np.isfinite(estimate).all(), method.name
            np.testing.assert_allclose(estimate, estimate[:1].repeat(len(hidden_genes), 0), atol=1e-6,
                                       err_msg=method.name)
        kept, skipped = make_methods((*ENTRY_METHODS, "tissue_donor"), FIXED, len(problem.donors), task="genes")
        assert {m.name for m in kept} == {"row_tissue", "matrix_completion"}  # (no composition given)
        assert all("genes task hides" in skipped[name] for name in OWN_ROW_METHODS)
        folds = training_folds(problem, "genes", 2, 0.25, seed=0)
        assert set(out_of_fold_estimates(problem, folds, ENTRY_METHODS, FIXED, task="genes")) == {
            "row_tissue", "matrix_completion"}
    _, other = make_methods(("iterative_ridge",), FIXED, 5, task="entries")
    assert other == {}  # other tasks keep them


def test_measured_entries_are_estimated_without_their_own_values():
    """Imputing measured entries too (``include_observed``): with ``own_value_free`` a measured entry's estimate
    does not move when its own value does (its fold is hidden where the methods are fitted), as the stacked head's
    training rows were out of fold; fitted on the visible values, ``iterative_ridge`` returned the entry's own value.
    Unmeasured entries are estimated as before."""
    values, donor, tissue = donor_data(4, n_genes=24, n_donors=40)
    values[np.random.default_rng(0).random(values.shape) < 0.1] = np.nan
    problem = problem_of(values, donor, tissue)
    names = ("row_tissue", "pairwise_regression", "iterative_ridge")
    rng = np.random.default_rng(1)
    measured = np.argwhere(~np.isnan(values))[rng.choice(int((~np.isnan(values)).sum()), 40, replace=False)]
    unmeasured = np.argwhere(np.isnan(values))[:20]
    gi = np.concatenate([measured[:, 0], unmeasured[:, 0]])
    si = np.concatenate([measured[:, 1], unmeasured[:, 1]])
    free = range_estimates(problem, gi, si, names, FIXED, seed=3, own_value_free=True)
    plain = range_estimates(problem, gi, si, names, FIXED, seed=3)
    np.testing.assert_allclose(plain["iterative_ridge"][:40], values[gi[:40], si[:40]], rtol=1e-5)  # its own value
    for name in names:  # unmeasured entries: the same fit
        np.testing.assert_allclose(free[name][40:], plain[name][40:], rtol=1e-6, err_msg=name)
    for i in (0, 7, 23):  # one measured entry's value changed: its own estimate stays
        moved = values.copy()
        moved[gi[i], si[i]] += 4.0
        again = range_estimates(problem_of(moved, donor, tissue), gi, si, names, FIXED, seed=3, own_value_free=True)
        for name in names:
            assert again[name][i] == pytest.approx(free[name][i], rel=1e-5, abs=1e-5), name
    assert np.abs(free["iterative_ridge"][:40] - values[gi[:40], si[:40]]).mean() > 0.1


def test_samples_tuning_scores_whole_donor_groups_and_ranges_that_hold_a_split():
    """On the ``samples`` task a validation split larger than ``max_entries`` is scored on whole (gene, tissue)
    groups (single entries drawn left 2-3 donors a group, under ``min_donors``: the tuning fell back to RMSE);
    ranges whose genes are all on the test chromosomes are never the ones drawn (the split was empty there and
    every method silently kept its defaults)."""
    rng = np.random.default_rng(1)
    n_genes, n_donors, n_tissues = 40, 300, 4
    donor = np.repeat(np.arange(n_donors), n_tissues)
    tissue = np.tile(np.arange(n_tissues), n_donors)
    values = 5 + rng.normal(size=(n_genes, 1)) + rng.normal(size=(n_genes, n_donors))[:, donor] \
        + 0.5 * rng.normal(size=(n_genes, n_donors * n_tissues))
    problem = problem_of(values, donor, tissue)
    for cap in (60_000, 320):
        _, report = tune_settings(problem, ("pairwise_regression",), FIXED, "samples", seed=0, max_entries=cap,
                                  min_donors=10)
        pr = report["pairwise_regression"]
        assert pr["metric"] == "across_donors_pearson_mean" and all(r["score"] is not None for r in pr["grid"])
        assert pr["n_validation"] <= cap

    big, _ = low_rank_table(seed=21, n_genes=1024)
    big = dataclasses.replace(big, split=np.where(np.arange(1024) < 512, 2, 0).astype(np.int8))  # half on test
    settings = dataclasses.replace(FIXED, block_cells=1, tune_ranges=1)  # four ranges of 256 genes, one tuned on
    for seed in range(8):
        _, report = tune_settings(big, ("iterative_ridge",), settings, "entries", seed=seed)
        assert report and report["iterative_ridge"]["n_validation"] > 0, seed
        assert report["iterative_ridge"]["n_genes"] == 256, seed


def test_promoter_composition_fits_each_tissue_on_the_genes_measured_there():
    """A gene without a visible value in a tissue has only a filled-in mean there (its mean plus the tissue's
    offset): each tissue's ridge is fitted on the genes measured in it (before, on every gene seen anywhere, which
    halved a planted slope where half the genes were hidden in the tissue)."""
    rng = np.random.default_rng(3)
    composition = rng.normal(size=(200, 5))
    values = np.column_stack([rng.normal(size=200), 3.0 * composition[:, 0]])
    truth = values[:100, 1].copy()
    values[:100, 1] = np.nan  # the entries task: half the genes' tissue-1 value hidden
    problem = problem_of(values, np.array([0, 0]), np.array([0, 1]))
    method = PromoterCompositionBaseline(composition, alpha=1e-6)
    method.fit(problem)
    pred = method.predict_entries(np.arange(100), np.ones(100, np.int64))
    assert np.sqrt(np.mean((pred - truth) ** 2)) < 0.05
    # measured where the composition is high only: the tissue's genes are not centred where every seen gene is,
    # and its ridge is centred on its own (an intercept taken as y's mean over uncentred columns biased it)
    values = np.column_stack([rng.normal(size=200), 3.0 * composition[:, 0]])
    values[composition[:, 0] < -0.3, 1] = np.nan
    method.fit(problem_of(values, np.array([0, 0]), np.array([0, 1])))
    shown = ~np.isnan(values[:, 1])
    pred = method.predict_entries(np.flatnonzero(shown), np.ones(int(shown.sum()), np.int64))
    assert np.sqrt(np.mean((pred - values[shown, 1]) ** 2)) < 0.05


def test_a_measured_entry_is_estimated_without_its_own_value_by_the_ranges_families(monkeypatch):
    """``include_observed`` on a problem of several gene ranges: ``gene_family`` reads the whole problem's levels
    (``range_families``), which hold every visible value; hiding a fold in the range's values left the entry's own
    value in those sums, and its estimate moved with it (36.7 for +100, -33.4 for -100, against 2.75)."""
    rng = np.random.default_rng(5)
    stems = np.array(["RPL", "OR", "ZNF", "SLC"])
    names = np.asarray([f"{stems[g % 4]}{g % 9 + 1}" for g in range(48)], dtype=object)
    values = np.array([8.0, 0.5, 3.0, 5.0])[np.arange(48) % 4, None] + rng.normal(size=(48, 6)) * 0.5
    problem = dataclasses.replace(problem_of(values, np.zeros(6, int), np.arange(6)), gene_names=names)
    monkeypatch.setattr(baselines_module, "MIN_FIT_GENES", 4)
    ranged = dataclasses.replace(FIXED, block_cells=6 * 8)  # six ranges of eight genes
    assert len(fit_ranges(problem, ranged.block_cells)) == 6
    gi, si = np.array([3, 17, 30, 41]), np.array([0, 2, 4, 5])  # measured entries, one in each of four ranges
    fitted = ("gene_family", "row_tissue")
    free = baseline_estimates(problem, gi, si, fitted, ranged, seed=2, own_value_free=True)
    for i in range(len(gi)):
        moved = values.copy()
        moved[gi[i], si[i]] += 100.0
        again = baseline_estimates(dataclasses.replace(problem, values=moved), gi, si, fitted, ranged, seed=2,
                                   own_value_free=True)
        for name in fitted:
            assert again[name][i] == pytest.approx(free[name][i], rel=1e-6), (name, i)
    # the family's other members still count: the estimate is the family's level, not the sample's mean
    assert np.corrcoef(free["gene_family"], np.array([8.0, 0.5, 3.0, 5.0])[gi % 4])[0, 1] > 0.95

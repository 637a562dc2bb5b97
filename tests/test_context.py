"""Context records and baselines on a hand-made problem whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from geximpute import schema as S
from geximpute.science.baselines import (
    DistanceBaseline,
    MatrixCompletionBaseline,
    RowTissueBaseline,
    TissueDonorBaseline,
)
from geximpute.science.context import ContextIndex, build_context
from geximpute.science.problem import VisibleProblem

NAN = np.nan


def toy_problem() -> VisibleProblem:
    """Five genes on chr1 (and one on chr2), two donors x two tissues.

    gene  tss    strand   body
    g0    1000   +        1000-1500
    g1    1200   -        800-1200    (overlaps g0)
    g2    5000   +        5000-6000
    g3    20000  -        19000-20000
    g4    21000  +        21000-22000
    h0    500    +        (chr2)
    """
    values = np.array(
        [
            # D1:T1 D1:T2 D2:T1 D2:T2
            [1.0, 2.0, 3.0, 4.0],  # g0
            [5.0, NAN, 7.0, 8.0],  # g1
            [2.0, 2.5, NAN, 3.5],  # g2
            [0.0, 1.0, 0.5, NAN],  # g3
            [9.0, 9.5, 8.0, 8.5],  # g4
            [4.0, 4.0, 4.0, 4.0],  # h0
        ],
        dtype=np.float32,
    )
    return VisibleProblem(
        gene_ids=np.array(["g0", "g1", "g2", "g3", "g4", "h0"], dtype=object),
        chroms=np.array(["chr1"] * 5 + ["chr2"], dtype=object),
        tss=np.array([1000, 1200, 5000, 20000, 21000, 500]),
        start=np.array([1000, 800, 5000, 19000, 21000, 500]),
        end=np.array([1500, 1200, 6000, 20000, 22000, 900]),
        strand=np.array([1, -1, 1, -1, 1, 1], dtype=np.int8),
        split=np.zeros(6, dtype=np.int8),
        sample_ids=np.array(["D1:T1", "D1:T2", "D2:T1", "D2:T2"], dtype=object),
        donor_index=np.array([0, 0, 1, 1], dtype=np.int32),
        tissue_index=np.array([0, 1, 0, 1], dtype=np.int32),
        donors=["D1", "D2"],
        tissues=["T1", "T2"],
        values=values,
        tissue_corr=np.array([[1.0, 0.6], [0.6, 1.0]], dtype=np.float32),
    )


def context_of(problem, gene, sample, k=3, hidden=False):
    table = build_context(ContextIndex(problem), np.array([gene]), np.array([sample]), np.array([hidden]), k)
    assert table.schema.equals(S.CONTEXT)
    return table.to_pylist()[0]


def test_neighbours_are_the_k_nearest_visible_on_the_same_chromosome():
    rec = context_of(toy_problem(), gene=0, sample=0, k=3)
    # g1 (200 bp), g2 (4 kb), g3 (19 kb); h0 is on chr2; g0 itself is never its own neighbour
    assert rec["nb_value"] == [5.0, 2.0, 0.0]
    np.testing.assert_allclose(rec["nb_logdist"], [np.log10(201), np.log10(4001), np.log10(19001)], rtol=1e-6)
    # g1 is downstream of g0 and on the other strand: tail to tail -> convergent; g2 same strand
    assert rec["nb_orient"] == [S.ORIENT_CONVERGENT, S.ORIENT_SAME, S.ORIENT_CONVERGENT]
    assert rec["nb_overlap"] == [True, False, False]
    assert rec["target"] == 1.0 and rec["hidden"] is False


def test_neighbours_skip_genes_not_visible_in_that_sample_and_orient_on_the_minus_strand():
    rec = context_of(toy_problem(), gene=1, sample=1, k=2)
    # in sample D1:T2 g1 itself is missing; nearest visible: g0 (200 bp), g2 (3.8 kb)
    assert rec["nb_value"] == [2.0, 2.5]
    # for a minus-strand target a smaller coordinate is downstream: g0 (plus strand) faces it (convergent),
    # g2 (plus strand, larger coordinate) is upstream and points away (divergent)
    np.testing.assert_allclose(rec["nb_logdist"], [np.log10(201), -np.log10(3801)], rtol=1e-6)
    assert rec["nb_orient"] == [S.ORIENT_CONVERGENT, S.ORIENT_DIVERGENT]
    assert rec["target"] is None


def test_divergent_pair():
    rec = context_of(toy_problem(), gene=4, sample=0, k=1)
    # g3 (minus strand) sits upstream of g4 (plus strand): head to head
    assert rec["nb_value"] == [0.0] and rec["nb_logdist"][0] < 0
    assert rec["nb_orient"] == [S.ORIENT_DIVERGENT]
    # opposite strands sharing a TSS (a bidirectional promoter) are head to head too, from either side
    import dataclasses

    problem = toy_problem()
    shared = dataclasses.replace(problem, tss=np.where(np.arange(6) == 3, 21000, problem.tss))
    for gene in (3, 4):
        assert context_of(shared, gene=gene, sample=0, k=1)["nb_orient"] == [S.ORIENT_DIVERGENT]


def test_tissue_context_and_means_leave_the_target_out():
    rec = context_of(toy_problem(), gene=0, sample=2)  # g0 in D2:T1, value 3.0
    assert rec["tis_value"] == [4.0] and rec["tis_index"] == [1]
    assert rec["tis_corr"] == [pytest.approx(0.6)]
    assert rec["tis_mean"] == [pytest.approx(2.0)]  # g0 in T2 over the other donor (D1)
    assert rec["tissue_mean"] == pytest.approx(1.0)  # T1 in the other donor only
    assert rec["gene_mean"] == pytest.approx((1 + 2 + 4) / 3)  # every other sample


def test_tissue_offset_is_the_tissue_mean_deviation_from_gene_means():
    problem = toy_problem()
    rec = context_of(problem, gene=0, sample=2)
    values = problem.values
    resid = values - np.nanmean(values, axis=1, keepdims=True)
    assert rec["tissue_offset"] == pytest.approx(float(np.nanmean(resid[:, [0, 2]])), rel=1e-5)


def test_hidden_target_has_no_label():
    rec = context_of(toy_problem(), gene=2, sample=2, hidden=True)
    assert rec["target"] is None and rec["hidden"] is True


def records_for(problem, pairs):
    gi = np.array([g for g, _ in pairs])
    si = np.array([s for _, s in pairs])
    table = build_context(ContextIndex(problem), gi, si, np.ones(len(gi), dtype=bool), 3)
    return table.sort_by([("gene_index", "ascending"), ("sample_index", "ascending")])


def test_distance_baseline_is_the_inverse_distance_weighted_mean():
    problem = toy_problem()
    method = DistanceBaseline(k=2, offset=100.0)
    method.fit(problem)
    pred = method.predict(records_for(problem, [(0, 0)]))
    w1, w2 = 1 / (200 + 100), 1 / (4000 + 100)
    assert pred[0] == pytest.approx((w1 * 5.0 + w2 * 2.0) / (w1 + w2), rel=1e-5)


def test_row_tissue_baseline():
    problem = toy_problem()
    method = RowTissueBaseline()
    method.fit(problem)
    means = np.nanmean(problem.values, axis=1)
    resid = problem.values - means[:, None]
    offset_t1 = np.nanmean(resid[:, [0, 2]])
    pred = method.predict(records_for(problem, [(2, 2)]))
    assert pred[0] == pytest.approx(means[2] + offset_t1, rel=1e-6)


def test_tissue_donor_baseline():
    problem = toy_problem()
    method = TissueDonorBaseline(shrinkage=1.0)
    method.fit(problem)
    # g2 in D2:T1 is missing; tissue mean of g2 in T1 = 2.0 (D1); D2's other tissue T2: 3.5 vs T2 mean 3.0
    pred = method.predict(records_for(problem, [(2, 2)]))
    assert pred[0] == pytest.approx(2.0 + (3.5 - 3.0) / (1 + 1.0), rel=1e-6)


def test_matrix_completion_recovers_a_low_rank_matrix():
    rng = np.random.default_rng(0)
    low = rng.normal(size=(40, 2)) @ rng.normal(size=(2, 30))
    full = (low + 5).astype(np.float32)
    problem = toy_problem()
    mask = rng.random(full.shape) < 0.2
    visible = full.copy()
    visible[mask] = np.nan
    problem = VisibleProblem(
        **{
            **problem.__dict__,
            "values": visible,
            "gene_ids": np.arange(40).astype(str).astype(object),
            "sample_ids": np.arange(30).astype(str).astype(object),
            "tissue_index": np.zeros(30, dtype=np.int32),
            "donor_index": np.arange(30, dtype=np.int32),
            "donors": [str(i) for i in range(30)],
            "tissues": ["T"],
        }
    )
    method = MatrixCompletionBaseline(rank=2, shrinkage=0.0, iterations=300)
    method.fit(problem)
    gi, si = np.nonzero(mask)
    records = pa.table({"gene_index": gi, "sample_index": si})
    err = np.abs(method.predict(records) - full[gi, si])
    assert err.mean() < 0.01


def test_metrics_leave_undefined_correlations_out():
    from geximpute.science.metrics import score

    observed = np.array([1.0, 2.0, 3.0, 4.0, 1.5, 2.5, 3.5, 4.5])
    constant_per_group = np.array([0.1 + 0.2] * 4 + [2.0] * 4)  # one value per (gene, tissue): no across-donor r
    gene = np.array([0] * 4 + [1] * 4)
    out = score(constant_per_group, observed, gene=gene, tissue=np.zeros(8, int), donor=np.arange(8),
                tissue_names=["T"], min_donors=3)
    assert out["across_donors_pearson_mean"] is None and out["across_donors_pairs"] == 0
    good = score(observed + 0.1, observed, gene=gene, tissue=np.zeros(8, int), donor=np.arange(8),
                 tissue_names=["T"], min_donors=3)
    assert good["across_donors_pearson_mean"] == pytest.approx(1.0)
    assert good["rmse"] == pytest.approx(0.1) and good["per_tissue"]["T"]["n"] == 8
    # a method that tells the donors apart in one pair only is not scored on that pair alone: the constant pair
    # counts as 0, as in the paired bootstrap's point estimate
    from geximpute.science.comparisons import gene_stats, metric_from

    half = np.where(gene == 0, 0.3, observed + 0.1)
    mixed = score(half, observed, gene=gene, tissue=np.zeros(8, int), donor=np.arange(8), tissue_names=["T"],
                  min_donors=3)
    assert mixed["across_donors_pearson_mean"] == pytest.approx(0.5) and mixed["across_donors_pairs"] == 2
    stats = gene_stats("across_donors_pearson_mean", half, observed, gene, 2, np.zeros(8, int), 3)
    assert float(metric_from("across_donors_pearson_mean", stats.sum(axis=0))) == pytest.approx(0.5)


def test_neighbours_carry_their_own_mean_level():
    problem = toy_problem()
    rec = context_of(problem, gene=0, sample=0, k=3)
    means = np.nanmean(problem.values, axis=1)
    np.testing.assert_allclose(rec["nb_gene_mean"], means[[1, 2, 3]], rtol=1e-6)


def test_the_tissue_donor_feature_without_other_tissues_is_the_tissue_mean_at_any_shrinkage():
    """A record with no other visible tissue of its donor adds no deviation, as the ``tissue_donor`` baseline adds
    none: with ``donor_shrinkage`` 0 (in the tuning's grid, and chosen where every candidate ties) the head's
    feature was 0/0, NaN in every such row."""
    from geximpute.science.head_features import FEATURE_NAMES, engineered_features

    records = records_for(toy_problem(), [(1, 0), (0, 0)])  # g1 in D1:T1: D1:T2 of g1 is not visible
    col = FEATURE_NAMES.index("est_tissue_donor")
    for shrinkage in (0.0, 1.0):
        with np.errstate(all="raise"):
            out = engineered_features(records, donor_shrinkage=shrinkage)
        first = records["gene_index"].to_pylist().index(1)
        assert out[first, col] == pytest.approx(records["tissue_mean"][first].as_py())
        assert np.isfinite(out[:, col]).all()

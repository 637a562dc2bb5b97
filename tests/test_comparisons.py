"""Paired bootstrap intervals over genes, interval coverage breakdowns and seed summaries (numpy only)."""

from __future__ import annotations

import numpy as np

from geximpute.science.comparisons import coverage_breakdown, paired_bootstrap, summarise_seeds


def hidden_entries(seed: int = 0, n_genes: int = 200, per_gene: int = 12):
    rng = np.random.default_rng(seed)
    gene = np.repeat(np.arange(n_genes), per_gene)
    tissue = np.tile(np.arange(per_gene) % 3, n_genes)
    truth = rng.normal(size=n_genes)[gene] + rng.normal(scale=0.5, size=len(gene))
    return rng, gene, tissue, truth


def test_a_better_method_gets_an_interval_that_excludes_zero():
    rng, gene, tissue, truth = hidden_entries()
    preds = {
        "hybrid": truth + rng.normal(scale=0.3, size=len(truth)),
        "good": truth + rng.normal(scale=0.6, size=len(truth)),
        "poor": truth + rng.normal(scale=1.5, size=len(truth)),
        "hybrid_network": truth,  # the hybrid's own part: never the "best other"
        "cnn_only": truth + rng.normal(scale=0.4, size=len(truth)),  # an ablation of its network: neither
    }
    for task in ("entries", "genes"):
        out = paired_bootstrap(preds, truth, gene, tissue, task, against=None, n_boot=300)
        assert out["best_other"] == "good"
        c = out["comparisons"]["good"]
        assert c["reference_better"], (task, c)
        lo, hi = c["ci95"]
        assert lo <= c["difference"] <= hi
        assert (hi < 0) if task == "entries" else (lo > 0)
    # a method against itself: difference 0, interval [0, 0], not better
    same = paired_bootstrap({"hybrid": preds["good"], "good": preds["good"]}, truth, gene, tissue, "genes",
                            n_boot=100)["comparisons"]["good"]
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and not same["reference_better"]


def test_across_donor_comparison_and_subsets():
    rng, gene, tissue, truth = hidden_entries(per_gene=30)
    # per (gene, tissue) the donors differ by their own noise: a method that follows it wins across donors
    preds = {"hybrid": truth + rng.normal(scale=0.2, size=len(truth)),
             "pairwise_regression": truth + rng.normal(scale=1.0, size=len(truth))}
    out = paired_bootstrap(preds, truth, gene, tissue, "samples", n_boot=200, min_donors=5)
    assert out["metric"] == "across_donors_pearson_mean" and out["comparisons"]["pairwise_regression"][
        "reference_better"]
    mask = gene < 50
    sub = paired_bootstrap(preds, truth, gene, tissue, "samples", mask=mask, n_boot=200, min_donors=5)
    assert sub["n_genes"] == 50
    assert paired_bootstrap({"other": truth}, truth, gene, tissue, "genes") == {}  # no hybrid, no comparison


def test_coverage_breakdown_by_tissue_and_quartile():
    rng, gene, tissue, truth = hidden_entries()
    lower, upper = truth - 1.0, truth + 1.0
    lower[tissue == 2] = truth[tissue == 2] + 0.1  # tissue 2 never covered
    out = coverage_breakdown(truth, lower, upper, tissue, ["a", "b", "c"])
    assert out["by_tissue"]["a"]["coverage"] == 1.0 and out["by_tissue"]["c"]["coverage"] == 0.0
    assert abs(out["overall"] - 2 / 3) < 1e-9
    assert sum(q["n"] for q in out["by_quartile"]) == len(truth)
    assert [q["quartile"] for q in out["by_quartile"]] == [1, 2, 3, 4]
    assert all(abs(q["n"] - len(truth) / 4) <= 2 for q in out["by_quartile"])
    assert "by_estimate_quartile" not in out
    # an estimate pulled towards the mean with an interval of one width: the extreme observed quartiles are missed
    # more often, while by quartile of the estimate the coverage stays even
    estimate = 0.4 * truth + rng.normal(0, np.std(truth) * np.sqrt(1 - 0.4 ** 2) * 0.4, len(truth))
    half = np.quantile(np.abs(truth - estimate), 0.8)
    out = coverage_breakdown(truth, estimate - half, estimate + half, tissue, ["a", "b", "c"], estimate)
    observed_q = [q["coverage"] for q in out["by_quartile"]]
    estimate_q = [q["coverage"] for q in out["by_estimate_quartile"]]
    assert min(observed_q[0], observed_q[3]) < 0.7 < 0.9 < min(observed_q[1], observed_q[2])
    assert max(estimate_q) - min(estimate_q) < 0.12


def test_summarise_seeds_mean_and_spread():
    runs = [{"seed": s, "task": "entries", "dataset": "x",
             "methods": {"a": {"rmse": r, "pearson": None}, "b": {"rmse": 1.0}}} for s, r in ((0, 0.5), (1, 0.7))]
    out = summarise_seeds(runs)
    assert out["methods"]["a"]["rmse"]["mean"] == 0.6
    assert abs(out["methods"]["a"]["rmse"]["sd"] - np.std([0.5, 0.7], ddof=1)) < 1e-12
    assert "pearson" not in out["methods"]["a"]


def test_quartiles_by_rank_with_many_ties_and_seeds_of_one_definition():
    """30% zeros no longer empty the first quartile into the second (the bins are equal by rank); a seeds summary
    refuses runs of two metric definitions or of two evaluations."""
    import pytest

    from geximpute.science.comparisons import quartile_coverage

    rng = np.random.default_rng(0)
    value = np.where(rng.random(1000) < 0.3, 0.0, np.abs(rng.normal(3, 1, 1000)) + 0.01)
    bins = quartile_coverage(np.ones(1000, bool), value)
    assert [b["n"] for b in bins] == [250, 250, 250, 250]
    assert bins[0]["low"] == bins[0]["high"] == 0.0 and bins[1]["low"] == 0.0
    run = {"seed": 0, "task": "entries", "dataset": "x", "metrics_version": 2, "methods": {"a": {"rmse": 0.5}}}
    with pytest.raises(ValueError, match="mix metric definitions"):
        summarise_seeds([run, {**run, "seed": 1, "metrics_version": 1}])
    with pytest.raises(ValueError, match="mix metric definitions"):
        summarise_seeds([run, {**run, "seed": 1, "task": "genes"}])
    assert summarise_seeds([run, {**run, "seed": 1}])["metrics_version"] == 2


def test_the_bootstrap_resamples_the_genes_that_carry_the_across_donor_metric():
    """Genes with no (gene, tissue) pair of enough donors carry nothing across donors: they are not resampled
    (they thinned resamples out and made some all-empty ones, silently dropped) nor counted in n_genes."""
    rng, gene, tissue, truth = hidden_entries(per_gene=30)
    few = gene >= 30  # these genes keep 3 entries each: under min_donors
    keep = ~few | (np.arange(len(gene)) % 30 < 3)
    gene, tissue, truth = gene[keep], tissue[keep], truth[keep]
    preds = {"hybrid": truth + rng.normal(scale=0.2, size=len(truth)),
             "pairwise_regression": truth + rng.normal(scale=1.0, size=len(truth))}
    out = paired_bootstrap(preds, truth, gene, tissue, "samples", n_boot=200, min_donors=5)
    assert out["n_genes"] == len(np.unique(gene[gene < 30]))
    assert out["comparisons"]["pairwise_regression"]["reference_better"]


def test_a_method_constant_across_donors_is_no_comparator_across_donors():
    """A method that gives every donor of a (gene, tissue) pair the same value (a gene-level estimate) has no
    across-donor figure in ``metrics.score`` (null): the bootstrap neither compares it (a 0.0 beside score's null)
    nor makes it the best other."""
    from geximpute.science.metrics import score

    rng, gene, tissue, truth = hidden_entries(per_gene=30)
    level = np.bincount(gene, weights=truth) / np.bincount(gene)
    preds = {"hybrid": truth + rng.normal(scale=0.2, size=len(truth)),
             "distance": level[gene],  # the same for every donor of a pair
             "pairwise_regression": truth + rng.normal(scale=3.0, size=len(truth))}
    donor = np.arange(len(gene)) % 30
    assert score(preds["distance"], truth, gene=gene, tissue=tissue, donor=donor, tissue_names=["a", "b", "c"],
                 min_donors=5)["across_donors_pearson_mean"] is None
    out = paired_bootstrap(preds, truth, gene, tissue, "samples", n_boot=100, min_donors=5)
    assert out["best_other"] == "pairwise_regression"
    assert set(out["comparisons"]) == {"pairwise_regression"}
    named = paired_bootstrap(preds, truth, gene, tissue, "samples", against=["distance"], n_boot=100, min_donors=5)
    assert named["comparisons"] == {}
    # on the entries task the same method is an ordinary comparator
    assert "distance" in paired_bootstrap(preds, truth, gene, tissue, "entries", n_boot=100)["comparisons"]
    # nor is the reference compared where it tells no donor apart (a hybrid without genomes, neighbours or other
    # tissues): score's null was compared as 0.0 and its differences entered the seeds' summary
    flat = {"hybrid": level[gene] + 0.1 * tissue, "pairwise_regression": preds["pairwise_regression"]}
    assert score(flat["hybrid"], truth, gene=gene, tissue=tissue, donor=donor, tissue_names=["a", "b", "c"],
                 min_donors=5)["across_donors_pearson_mean"] is None
    assert paired_bootstrap(flat, truth, gene, tissue, "samples", n_boot=100, min_donors=5) == {}


def test_seeds_read_back_from_json_and_replicates_drawn_one_way():
    """A comparison's difference that was not finite is null in metrics.json: the mean is over the others, and
    the report says n/a where none is left. Replicates whose model seeds were drawn two ways (``seed`` + s, or
    not) are refused."""
    import json

    import pytest

    from geximpute.science.comparisons import seeds_report

    def run(seed, difference, model_seed=None):
        out = {"seed": seed, "task": "genes", "dataset": "x", "metrics_version": 2,
               "methods": {"hybrid": {"pearson": 0.5}},
               "comparisons": {"all": {"metric": "pearson", "comparisons": {"distance": {
                   "difference": difference, "ci95": [None, None], "reference_better": False}}}}}
        if model_seed is not None:
            out["model_seed"] = model_seed
        return json.loads(json.dumps(out))

    summary = summarise_seeds([run(0, None, 7), run(1, 0.25, 8), run(2, 0.05, 9)])
    assert summary["comparisons"]["all"]["distance"]["difference_mean"] == pytest.approx(0.15)
    none = summarise_seeds([run(0, None), run(1, None)])
    assert none["comparisons"]["all"]["distance"]["difference_mean"] is None
    assert "| distance | n/a |" in seeds_report(none)
    with pytest.raises(ValueError, match="model seeds are drawn two ways"):
        summarise_seeds([run(0, 0.1, 7), run(1, 0.1, 7)])
    with pytest.raises(ValueError, match="model seeds are drawn two ways"):
        summarise_seeds([run(0, 0.1, 7), run(1, 0.1)])


def test_a_seed_without_a_figure_is_named_in_the_summary_and_its_intervals_name_their_seeds():
    """A method scored at some seeds only is summarised over those, and the table says so; a comparator compared
    at some seeds only has its intervals labelled by seed; seeds whose intervals aim at other coverages are refused."""
    import pytest

    from geximpute.science.comparisons import seeds_report

    def comparison(diff: float) -> dict:
        return {"comparisons": {"b": {"difference": diff, "ci95": [diff - 0.1, diff + 0.1],
                                      "reference_better": False}}}

    runs = [{"seed": s, "task": "entries", "dataset": "x",
             "methods": {"hybrid": {"rmse": 0.5 + s / 10, "coverage_nominal": 0.8},
                         "a": {"rmse": 0.9 if s == 0 else None}, "b": {"rmse": 1.0}},
             "comparisons": {"all": comparison(-0.5)} if s != 1 else {}} for s in (0, 1, 2)]
    out = summarise_seeds(runs)
    assert out["methods"]["a"]["rmse"]["n"] == 1 and out["methods"]["hybrid"]["rmse"]["n"] == 3
    assert out["comparisons"]["all"]["b"]["seeds"] == [0, 2]
    text = seeds_report(out)
    assert "| a | n/a | 0.9000 (1 of 3 seeds) |" in text
    assert "seed 0 [-0.6000, -0.4000]; seed 2 [-0.6000, -0.4000] | 0/2 seeds |" in text
    runs[2]["methods"]["hybrid"]["coverage_nominal"] = 0.9
    with pytest.raises(ValueError, match="different coverages"):
        summarise_seeds(runs)

"""What a hidden gene's family and promoter could add, on the medians (docs/benchmarks.md, "A gene's family").

Numpy only, no Ray, a few minutes. For each seed's hidden set of ``geximpute evaluate`` (task ``genes``, and task
``entries`` for the last check), scored on the hidden entries, per-tissue Pearson averaged over tissues (or RMSE):

- ``gene_family`` alone with its default settings, against ``distance``'s neighbours in the engine's own baseline
  (the evaluation's figures come from ``geximpute evaluate``; these are the diagnostics' own reference);
- the coarse family's members within ``--window`` bp on the same chromosome (tandem paralogues), their visible mean
  shrunk towards ``gene_family``'s estimate;
- on the hidden genes with a known promoter: the 50 visible genes nearest by promoter 5-mer profile (their mean),
  and what it adds to a linear blend of ``gene_family`` and ``promoter_composition``;
- on the ``entries`` task: ``gene_family``'s level and a variant that adds the family's deviation in the sample to
  the gene's own visible mean, each beside ``iterative_ridge`` in a linear blend.

Blends are fitted on half of the hidden genes (or entries) and scored on the other half: a diagnostic of what an
input could add, not a method (no method here is tuned on hidden values; none of these blends is shipped).

    .venv/bin/python benchmarks/gene_family_diagnostics.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
K = 5  # k-mer length of the promoter profiles


def tissue_pearson(est: np.ndarray, truth: np.ndarray, tissue: np.ndarray, mask: np.ndarray | None = None) -> float:
    keep = np.ones(len(est), bool) if mask is None else mask
    return float(np.mean([np.corrcoef(est[keep & (tissue == t)], truth[keep & (tissue == t)])[0, 1]
                          for t in np.unique(tissue[keep])]))


def half_blend(columns: list[np.ndarray], truth: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """A least-squares blend of ``columns`` fitted on the ``fit`` rows, evaluated on every row."""
    design = np.column_stack([*columns, np.ones(len(truth))])
    coef = np.linalg.lstsq(design[fit], truth[fit], rcond=None)[0]
    return design @ coef


def kmer_profiles(sequences: list[str]) -> np.ndarray:
    """(N, 4**K) log1p counts of each K-mer, centred, each row scaled to unit length."""
    index = {"".join(k): i for i, k in enumerate(itertools.product("ACGT", repeat=K))}
    out = np.zeros((len(sequences), len(index)))
    for row, seq in enumerate(sequences):
        for i in range(len(seq) - K + 1):
            j = index.get(seq[i:i + K])
            if j is not None:
                out[row, j] += 1
    out = np.log1p(out)
    out -= out.mean(axis=0)
    return out / (np.linalg.norm(out, axis=1, keepdims=True) + 1e-9)


def genes_task(seed: int, window: float) -> None:
    from geximpute.config import load_config
    from geximpute.io.dataset import load_dataset
    from geximpute.science.baselines import (
        GeneFamilyBaseline,
        PromoterCompositionBaseline,
        composition_of,
        gene_family_keys,
        make_method,
    )
    from geximpute.science.context import ContextIndex, build_context
    from geximpute.science.problem import make_problem
    from geximpute.steps.prepare import promoter_tables

    config = load_config(REPO / "configs" / "gtex-medians.yaml", ["evaluation.task=genes", f"evaluation.seed={seed}"])
    dataset = load_dataset(config)
    problem, truth = make_problem(dataset, genomes=False)
    gi, si, y = truth.gene_index, truth.sample_index, truth.values.astype(np.float64)
    tissue = problem.tissue_index[si]
    family = GeneFamilyBaseline(config.baselines.fam_shrinkage)
    family.fit(problem)
    fam = family.predict_entries(gi, si)
    records = build_context(ContextIndex(problem), gi, si, np.ones(len(gi), bool), config.context.k_neighbours)
    distance = make_method("distance", config.baselines)
    distance.fit(problem)
    # context records come back in their own order: each scored against its own entry's value
    grid = np.full(problem.values.shape, np.nan)
    grid[gi, si] = y
    rg, rs = records["gene_index"].to_numpy(), records["sample_index"].to_numpy()
    dist_score = tissue_pearson(np.asarray(distance.predict(records), np.float64), grid[rg, rs],
                                problem.tissue_index[rs])

    # the coarse family's members near the gene on its chromosome
    coarse, _ = gene_family_keys(problem.gene_names)
    near = fam.copy()
    k = config.baselines.fam_shrinkage
    for g in np.unique(gi):
        if coarse[g] is None:
            continue
        members = np.flatnonzero((coarse == coarse[g]) & (problem.chroms == problem.chroms[g])
                                 & (np.abs(problem.tss - problem.tss[g]) < window))
        members = members[members != g]
        rows = gi == g
        if len(members):
            values = problem.values[members][:, si[rows]]
            near[rows] = (np.nansum(values, axis=0) + k * fam[rows]) / ((~np.isnan(values)).sum(axis=0) + k)
    print(f"seed {seed} genes: distance {dist_score:.4f}, gene_family "
          f"{tissue_pearson(fam, y, tissue):.4f}, with its members within {window / 1e3:.0f} kb "
          f"{tissue_pearson(near, y, tissue):.4f}", flush=True)

    # hidden genes with a known promoter: a 5-mer nearest-neighbour estimate beside family and composition
    promoters, gene_promoters = promoter_tables(dataset, problem.gene_ids)
    sequence_of = dict(zip(promoters["promoter_id"].to_pylist(), promoters["sequence"].to_pylist(), strict=True))
    promoter_of = dict(zip(gene_promoters["gene_id"].to_pylist(), gene_promoters["promoter_id"].to_pylist(),
                           strict=True))
    has = np.array([g in promoter_of for g in problem.gene_ids])
    composition = composition_of(problem.gene_ids, gene_promoters, promoters, config.promoter.upstream)
    comp_method = PromoterCompositionBaseline(composition, config.baselines.comp_alpha)
    comp_method.fit(problem)
    comp = comp_method.predict_entries(gi, si)
    with_seq = np.flatnonzero(has)
    profiles = kmer_profiles([sequence_of[promoter_of[problem.gene_ids[g]]] for g in with_seq])
    row_of = {g: i for i, g in enumerate(with_seq)}
    seen = ~np.isnan(problem.values).all(axis=1)
    candidates = np.array([g for g in with_seq if seen[g]])
    hidden_seq = np.unique(gi[has[gi]])
    similarity = profiles[[row_of[g] for g in hidden_seq]] @ profiles[[row_of[g] for g in candidates]].T
    nearest = np.argsort(-similarity, axis=1)[:, :50]
    kmer_mean = {g: np.nanmean(problem.values[candidates[nearest[r]]], axis=0) for r, g in enumerate(hidden_seq)}
    knn = np.array([kmer_mean[g][s] if g in kmer_mean else np.nan for g, s in zip(gi, si, strict=True)])
    mask = has[gi]
    genes = np.unique(gi[mask])
    fit_genes = np.random.default_rng(seed).choice(genes, len(genes) // 2, replace=False)
    fit = mask & np.isin(gi, fit_genes)
    score = mask & ~fit
    both = half_blend([fam, comp], y, fit)
    all_three = half_blend([fam, comp, np.nan_to_num(knn)], y, fit)
    print(f"seed {seed} genes with a promoter: 5-mer kNN {tissue_pearson(knn, y, tissue, mask):.4f}; blend of "
          f"gene_family + promoter_composition {tissue_pearson(both, y, tissue, score):.4f}, + the kNN "
          f"{tissue_pearson(all_three, y, tissue, score):.4f}", flush=True)


def entries_task(seed: int) -> None:
    from geximpute.config import load_config
    from geximpute.io.dataset import load_dataset
    from geximpute.science.baselines import GeneFamilyBaseline, make_method
    from geximpute.science.problem import make_problem

    config = load_config(REPO / "configs" / "gtex-medians.yaml", ["evaluation.task=entries", f"evaluation.seed={seed}"])
    problem, truth = make_problem(load_dataset(config), genomes=False)
    gi, si, y = truth.gene_index, truth.sample_index, truth.values.astype(np.float64)

    def rmse(est: np.ndarray, rows: np.ndarray) -> float:
        return float(np.sqrt(np.mean((est[rows] - y[rows]) ** 2)))

    ridge_method = make_method("iterative_ridge", config.baselines)
    ridge_method.fit(problem)
    ridge = ridge_method.predict_entries(gi, si)
    family = GeneFamilyBaseline(config.baselines.fam_shrinkage)
    family.fit(problem)
    level = family.predict_entries(gi, si)
    # the family's deviation in the sample, added to the gene's own visible mean
    visible = ~np.isnan(problem.values)
    mean = np.nansum(problem.values, axis=1) / np.maximum(visible.sum(axis=1), 1)
    deviation_problem = problem.values - mean[:, None]
    shifted = GeneFamilyBaseline(config.baselines.fam_shrinkage)
    shifted.fit(dataclasses.replace(problem, values=deviation_problem.astype(np.float32)))
    deviation = mean[gi] + shifted.predict_entries(gi, si)
    fit = np.random.default_rng(seed).random(len(y)) < 0.5
    alone = half_blend([ridge], y, fit)
    print(f"seed {seed} entries: iterative_ridge {rmse(ridge, ~fit):.4f} (refitted alone {rmse(alone, ~fit):.4f}); "
          f"gene_family level {rmse(level, ~fit):.4f}, + ridge {rmse(half_blend([ridge, level], y, fit), ~fit):.4f}; "
          f"own mean + family deviation {rmse(deviation, ~fit):.4f}, + ridge "
          f"{rmse(half_blend([ridge, deviation], y, fit), ~fit):.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--window", type=float, default=1e6, help="bp either side for a family's near members")
    args = parser.parse_args()
    for seed in args.seeds:
        genes_task(seed, args.window)
        entries_task(seed)


if __name__ == "__main__":
    main()

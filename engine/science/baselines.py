"""Classical baselines, each behind one interface and scored on exactly the same hidden entries.

A method is fitted on the visible problem only and predicts the target entries of a table of context records
(:data:`engine.schema.CONTEXT`). All predictions are on the modelling scale.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pyarrow as pa

from engine.config import BaselinesConfig
from engine.science.head_features import idw_estimate, list_parts
from engine.science.problem import VisibleProblem


class Method(Protocol):
    """What every method of ``geximpute evaluate`` provides."""

    name: str

    def fit(self, problem: VisibleProblem) -> None: ...

    def predict(self, records: pa.Table) -> np.ndarray: ...


def _gene_means(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-gene visible mean (global mean where a gene has no visible value) and the global mean."""
    with np.errstate(invalid="ignore"):
        overall = float(np.nanmean(values)) if np.isfinite(values).any() else 0.0
        counts = (~np.isnan(values)).sum(axis=1)
        sums = np.nansum(values, axis=1)
        means = np.where(counts > 0, sums / np.maximum(counts, 1), overall)
    return means, overall


class DistanceBaseline:
    """Inverse-distance-weighted mean of the K nearest visible neighbours in the same sample.

    Weight of a neighbour at TSS distance d: ``1 / (d + offset)``. An entry without any visible neighbour gets its
    sample's visible mean.
    """

    name = "distance"

    def __init__(self, k: int, offset: float) -> None:
        self.k, self.offset = k, offset

    def fit(self, problem: VisibleProblem) -> None:
        with np.errstate(invalid="ignore"):
            col = np.nanmean(problem.values, axis=0)
        self.sample_mean = np.where(np.isnan(col), np.nanmean(problem.values), col)

    def predict(self, records: pa.Table) -> np.ndarray:
        estimate = idw_estimate(records, self.k, self.offset)
        fallback = self.sample_mean[records["sample_index"].to_numpy()]
        return np.where(np.isnan(estimate), fallback, estimate)


class RowTissueBaseline:
    """The gene's visible mean plus a per-tissue offset (the tissue's mean deviation from gene means)."""

    name = "row_tissue"

    def fit(self, problem: VisibleProblem) -> None:
        self.gene_mean, _ = _gene_means(problem.values)
        resid = problem.values - self.gene_mean[:, None]
        n_t = len(problem.tissues)
        sums = np.zeros(n_t)
        counts = np.zeros(n_t)
        ok = ~np.isnan(resid)
        np.add.at(sums, problem.tissue_index, np.where(ok, resid, 0).sum(axis=0))
        np.add.at(counts, problem.tissue_index, ok.sum(axis=0))
        self.tissue_offset = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)

    def predict(self, records: pa.Table) -> np.ndarray:
        g = records["gene_index"].to_numpy()
        t = records["tissue_index"].to_numpy()
        return self.gene_mean[g] + self.tissue_offset[t]


class MatrixCompletionBaseline:
    """Soft-impute (Mazumder, Hastie & Tibshirani 2010) of the gene x sample matrix around gene means and sample
    effects; singular values shrunk by ``shrinkage`` x the largest and truncated to ``rank``."""

    name = "matrix_completion"

    def __init__(self, rank: int, shrinkage: float, iterations: int) -> None:
        self.rank, self.shrinkage, self.iterations = rank, shrinkage, iterations

    def fit(self, problem: VisibleProblem) -> None:
        values = problem.values.astype(np.float64)
        ok = ~np.isnan(values)
        gene_mean, _ = _gene_means(values)
        # start from the gene means; each iteration re-estimates gene means and sample effects from the completed
        # matrix, so that the low-rank part is fitted to the doubly centred residual
        filled = np.where(ok, values, gene_mean[:, None])
        rank = min(self.rank, *values.shape)
        for _ in range(self.iterations):
            mu = filled.mean(axis=1, keepdims=True)
            effect = (filled - mu).mean(axis=0, keepdims=True)
            resid = filled - mu - effect
            u, s, vt = np.linalg.svd(resid, full_matrices=False)
            s = np.maximum(s[:rank] - self.shrinkage * s[0], 0.0)
            estimate = mu + effect + (u[:, :rank] * s) @ vt[:rank]
            new = np.where(ok, values, estimate)
            delta = np.linalg.norm(new - filled) / max(np.linalg.norm(filled), 1e-12)
            filled = new
            if delta < 1e-6:
                break
        self.completed = estimate

    def predict(self, records: pa.Table) -> np.ndarray:
        g = records["gene_index"].to_numpy()
        s = records["sample_index"].to_numpy()
        return self.completed[g, s]


class TissueDonorBaseline:
    """The gene's mean in the target tissue across donors, plus the donor's own deviation from the tissue means in
    its other tissues (shrunk toward 0 by ``shrinkage`` pseudo-tissues). Needs a sample table with donors."""

    name = "tissue_donor"

    def __init__(self, shrinkage: float) -> None:
        self.shrinkage = shrinkage

    def fit(self, problem: VisibleProblem) -> None:
        values = problem.values
        n_t = len(problem.tissues)
        ok = ~np.isnan(values)
        sums = np.zeros((values.shape[0], n_t))
        counts = np.zeros((values.shape[0], n_t))
        np.add.at(sums.T, problem.tissue_index, np.where(ok, values, 0).T)
        np.add.at(counts.T, problem.tissue_index, ok.T.astype(float))
        fallback = RowTissueBaseline()
        fallback.fit(problem)
        row_tissue = fallback.gene_mean[:, None] + fallback.tissue_offset[None, :]
        self.tissue_mean = np.where(counts > 0, sums / np.maximum(counts, 1), row_tissue)

    def predict(self, records: pa.Table) -> np.ndarray:
        g = records["gene_index"].to_numpy()
        t = records["tissue_index"].to_numpy()
        base = self.tissue_mean[g, t]
        values, rows, _ = list_parts(records["tis_value"])
        tissues, _, _ = list_parts(records["tis_index"])
        tissues = tissues.astype(np.int64)
        resid = values - self.tissue_mean[g[rows], tissues]
        n = records.num_rows
        total = np.bincount(rows, weights=resid, minlength=n)
        count = np.bincount(rows, minlength=n)
        return base + total / (count + self.shrinkage)


class ElasticNetBaseline:
    """PrediXcan-style genetic predictor: per gene, an elastic net (scikit-learn ``ElasticNetCV``, l1_ratio 0.5,
    penalty chosen by 5-fold cross-validation over donors) of the donors' expression on the ALT dosages of the
    variants in the gene's cis window (``genotypes.cis_window``, the very window of the hybrid's cis-genetic score);
    prediction = the gene's visible mean in the target tissue + the
    donor's predicted genetic deviation.

    The model is fitted per gene on the donor residuals pooled over tissues (each donor's mean visible deviation
    from the gene's tissue means, :func:`engine.science.genomes.donor_residuals`), not per (gene, tissue) as PrediXcan
    does: with few donors per tissue, pooling gives the baseline more data for effects shared across tissues.
    Needs personal genomes (``inputs.variants``).
    """

    name = "elastic_net"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def fit(self, problem: VisibleProblem) -> None:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import ElasticNetCV

        from engine.science.genomes import donor_residuals

        genomes = problem.genomes
        if genomes is None:
            raise ValueError("elastic_net needs personal genomes (inputs.variants)")
        donor_fit = TissueDonorBaseline(0.0)
        donor_fit.fit(problem)
        self.tissue_mean = donor_fit.tissue_mean
        n_genes, n_donors = genomes.rows.shape[:2]
        resid = donor_residuals(problem.values, problem.tissue_index, problem.donor_index, n_donors,
                                len(problem.tissues))
        self.genetic = np.zeros((n_genes, n_donors))
        self.n_fitted = 0
        has = genomes.has_genome
        for g in range(n_genes):
            lo, hi = genomes.site_ptr[g], genomes.site_ptr[g + 1]
            y = resid[g]
            fit = has & ~np.isnan(y)
            if hi == lo or fit.sum() < 10:
                continue
            x = genomes.link_dosage(lo, hi).T.astype(np.float64)  # (D, m)
            mean = np.nan_to_num(np.nanmean(np.where(has[:, None], x, np.nan), axis=0))
            x = np.where(np.isnan(x), mean, x)
            if not np.any(x[fit].std(axis=0) > 0):
                continue
            model = ElasticNetCV(l1_ratio=0.5, alphas=20, cv=5, random_state=self.seed, max_iter=5000)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(x[fit], y[fit])
            self.genetic[g, has] = model.predict(x[has])
            self.n_fitted += 1
        self.sample_donor = problem.donor_index

    def predict(self, records: pa.Table) -> np.ndarray:
        g = records["gene_index"].to_numpy()
        t = records["tissue_index"].to_numpy()
        d = self.sample_donor[records["sample_index"].to_numpy()]
        return self.tissue_mean[g, t] + self.genetic[g, d]


def make_methods(names: tuple[str, ...], config: BaselinesConfig, n_donors: int,
                 has_genomes: bool = False, seed: int = 0) -> tuple[list[Method], dict]:
    """The configured baselines, and the reasons for any that do not apply to this dataset."""
    methods: list[Method] = []
    skipped = {}
    for name in names:
        if name == "elastic_net":
            if has_genomes:
                methods.append(ElasticNetBaseline(seed))
            else:
                skipped[name] = "needs personal genomes (inputs.variants)"
        if name == "distance":
            methods.append(DistanceBaseline(config.distance_k, config.distance_offset))
        elif name == "row_tissue":
            methods.append(RowTissueBaseline())
        elif name == "matrix_completion":
            methods.append(MatrixCompletionBaseline(config.mc_rank, config.mc_shrinkage, config.mc_iterations))
        elif name == "tissue_donor":
            if n_donors < 2:
                skipped[name] = "needs sample-level data with several donors"
            else:
                methods.append(TissueDonorBaseline(config.donor_shrinkage))
    return methods, skipped

"""Classical baselines, each behind one interface and scored on exactly the same hidden entries.

A method is fitted on the visible problem only and predicts the target entries of a table of context records
(:data:`geximpute.schema.CONTEXT`). All predictions are on the modelling scale.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import logging
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
from scipy import sparse
from threadpoolctl import threadpool_limits

from geximpute.config import BaselinesConfig
from geximpute.io.expression import fold_factors
from geximpute.io.genes import gene_family_keys, shared_families
from geximpute.science.context import ContextIndex, build_context
from geximpute.science.folds import fold_problem, fold_ratio, fold_targets, forget_fold, trainable, training_folds
from geximpute.science.genomes import donor_residuals
from geximpute.science.groups import group_sums
from geximpute.science.head_features import idw_estimate, list_parts
from geximpute.science.problem import SPLITS, VisibleProblem, gene_rows, gene_subset

log = logging.getLogger(__name__)


class Method(Protocol):
    """What every method of ``geximpute evaluate`` provides."""

    name: str

    def fit(self, problem: VisibleProblem) -> None: ...

    def predict(self, records: pa.Table) -> np.ndarray: ...


def one_blas_thread(fn):
    """Run ``fn`` with one BLAS thread. The baselines multiply matrices with at most a few dozen columns (tissues,
    ranks): one thread is about as fast alone, and 10-20x faster when other processes share the cores (measured on
    the 2-core machine: an 18,000 x 29 SVD took 0.22 s with OpenBLAS's default threads under load, 0.014 s with
    one)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


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
        # a sample hidden as a whole (task samples) has no visible mean: it gets the overall one, without
        # nanmean's empty-slice warning
        n = (~np.isnan(problem.values)).sum(axis=0)
        col = np.where(n > 0, np.nansum(problem.values, axis=0) / np.maximum(n, 1), np.nan)
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
        self.sample_tissue = problem.tissue_index

    def predict(self, records: pa.Table) -> np.ndarray:
        return self.predict_entries(records["gene_index"].to_numpy(), records["sample_index"].to_numpy())

    def predict_entries(self, gene_index: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
        return self.gene_mean[gene_index] + self.tissue_offset[self.sample_tissue[sample_index]]


class MatrixCompletionBaseline:
    """Soft-impute (Mazumder, Hastie & Tibshirani 2010) of the gene x sample matrix around gene means and sample
    effects; singular values shrunk by ``shrinkage`` x the largest and truncated to ``rank``."""

    name = "matrix_completion"

    def __init__(self, rank: int, shrinkage: float, iterations: int) -> None:
        self.rank, self.shrinkage, self.iterations = rank, shrinkage, iterations

    @one_blas_thread
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
        return self.predict_entries(records["gene_index"].to_numpy(), records["sample_index"].to_numpy())

    def predict_entries(self, gene_index: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
        return self.completed[gene_index, sample_index]


class TissueDonorBaseline:
    """The gene's mean in the target tissue across donors, plus the donor's own deviation from the tissue means in
    its other tissues (shrunk toward 0 by ``shrinkage`` pseudo-tissues). Needs a sample table with donors."""

    name = "tissue_donor"

    def __init__(self, shrinkage: float) -> None:
        self.shrinkage = shrinkage

    def fit(self, problem: VisibleProblem) -> None:
        sums, counts = group_sums(problem.values, problem.tissue_index, len(problem.tissues))
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
        # a donor without any other visible tissue has no deviation to add (also with shrinkage 0)
        return base + np.where(count > 0, total / np.maximum(count + self.shrinkage, 1e-12), 0.0)


class ElasticNetBaseline:
    """PrediXcan-style genetic predictor: per gene, an elastic net (scikit-learn ``ElasticNetCV``, l1_ratio 0.5,
    penalty chosen by 5-fold cross-validation over donors among 10 on glmnet's path for p > n, from the largest
    useful penalty down to 1/100 of it) of the donors' expression on the ALT dosages of the
    variants in the gene's cis window (``genotypes.cis_window``, the very window of the hybrid's cis-genetic score);
    prediction = the gene's visible mean in the target tissue + the
    donor's predicted genetic deviation.

    The model is fitted per gene on the donor residuals pooled over tissues (each donor's mean visible deviation
    from the gene's tissue means, :func:`geximpute.science.genomes.donor_residuals`), not per (gene, tissue) as
    PrediXcan
    does: with few donors per tissue, pooling gives the baseline more data for effects shared across tissues.
    Needs personal genomes (``inputs.variants``).
    """

    name = "elastic_net"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def fit(self, problem: VisibleProblem) -> None:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import ElasticNetCV

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
            # glmnet's path for p > n (lambda_min = lambda_max / 100) on a precomputed Gram matrix: with a cis window
            # of hundreds of correlated SNPs the default path down to lambda_max / 1000 took ~3 s per gene
            model = ElasticNetCV(l1_ratio=0.5, alphas=10, eps=1e-2, cv=5, precompute=True,
                                 random_state=self.seed, max_iter=5000)
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


def donor_tissue_cube(problem: VisibleProblem) -> np.ndarray:
    """(G, D, T) float64 visible mean of each (gene, donor, tissue) cell over its samples; NaN where none is visible.

    GTEx has one sample per donor and tissue; where a cell has several, their visible values are averaged.
    """
    n_d, n_t = len(problem.donors), len(problem.tissues)
    cell = problem.donor_index.astype(np.int64) * n_t + problem.tissue_index
    onehot = sparse.csr_matrix((np.ones(problem.n_samples), (np.arange(problem.n_samples), cell)),
                               shape=(problem.n_samples, n_d * n_t))
    ok = ~np.isnan(problem.values)
    sums = np.asarray(np.where(ok, problem.values, 0.0).astype(np.float64) @ onehot)
    counts = np.asarray(ok.astype(np.float64) @ onehot)
    with np.errstate(invalid="ignore", divide="ignore"):
        cube = np.where(counts > 0, sums / counts, np.nan)
    return cube.reshape(problem.n_genes, n_d, n_t)


def _gene_tissue_means(cube: np.ndarray) -> np.ndarray:
    """(G, T) mean over donors of each (gene, tissue); row_tissue-style fallback (gene mean + tissue offset, or the
    global mean + tissue offset for a gene with nothing visible) where a (gene, tissue) has no visible donor."""
    ok = ~np.isnan(cube)
    # genes or tissues with nothing visible (a hidden gene) have no mean: NaN, filled below, without a warning
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        counts = ok.sum(axis=1)
        means = np.where(counts > 0, np.where(ok, cube, 0.0).sum(axis=1) / np.maximum(counts, 1), np.nan)
        overall = float(np.nanmean(cube)) if ok.any() else 0.0
        gene_mean = np.nanmean(means, axis=1)
        gene_mean = np.where(np.isnan(gene_mean), overall, gene_mean)
        offset = np.nanmean(means - gene_mean[:, None], axis=0)
    offset = np.where(np.isnan(offset), 0.0, offset)
    return np.where(np.isnan(means), gene_mean[:, None] + offset[None, :], means)


def shared_fill(problem: VisibleProblem, key: tuple, make) -> Any:
    """``make()``, computed once per problem object and ``key``: methods fitted one after another on the same
    problem (a tuning grid, :func:`range_estimates`) start from the same filled rows instead of recomputing them.

    Kept on the problem object itself, not in a dataclass field, so a problem made from it
    (:func:`geximpute.science.folds.fold_problem`, :func:`geximpute.science.problem.gene_rows`, both through
    ``dataclasses.replace``) starts without it; a problem's values are never changed in place.
    """
    store = _shared_fills(problem)
    if key not in store:
        store[key] = make()
    return store[key]


def _shared_fills(problem: VisibleProblem) -> dict:
    """The problem's own store of :func:`shared_fill`'s fills, by key."""
    return problem.__dict__.setdefault("_shared_fills", {})


class _CubeMethod:
    """A method that predicts every (gene, donor, tissue) cell at fit time; a sample reads its donor-tissue cell."""

    name = ""

    @one_blas_thread
    def fit(self, problem: VisibleProblem) -> None:
        self.sample_donor = problem.donor_index
        self.sample_tissue = problem.tissue_index
        self.cells = self._fit_cube(problem)

    def _fit_cube(self, problem: VisibleProblem) -> np.ndarray:
        raise NotImplementedError

    def predict(self, records: pa.Table) -> np.ndarray:
        return self.predict_entries(records["gene_index"].to_numpy(), records["sample_index"].to_numpy())

    def predict_entries(self, gene_index: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
        sample_index = np.asarray(sample_index, np.int64)
        return self.cells[np.asarray(gene_index, np.int64), self.sample_donor[sample_index],
                          self.sample_tissue[sample_index]]


class PairwiseRegressionBaseline(_CubeMethod):
    """TEEBoT-style pairwise tissue regression (Basu et al. 2021).

    For each gene and each ordered tissue pair (target t, predictor u), a least-squares line of the gene's value in
    t on its value in u across the donors with both visible (at least ``min_donors``). A donor's estimate in t is
    the average of the lines' predictions from the donor's visible other tissues, each weighted by r^2 / (1 - r^2)
    of its line; ``prior`` adds the gene's mean in t across donors with that weight. Cells without any usable
    predictor get that mean. Needs a sample table with several donors.
    """

    name = "pairwise_regression"

    def __init__(self, min_donors: int, prior: float) -> None:
        self.min_donors, self.prior = min_donors, prior

    def _fit_cube(self, problem: VisibleProblem) -> np.ndarray:
        cube = donor_tissue_cube(problem)
        base = _gene_tissue_means(cube)
        out = np.empty_like(cube)
        eye = np.eye(cube.shape[2], dtype=bool)
        for g in range(cube.shape[0]):
            ok = ~np.isnan(cube[g])
            m = ok.astype(np.float64)
            a = np.where(ok, cube[g], 0.0)
            n = m.T @ m  # [t, u]: donors with both visible
            s_t = a.T @ m  # sum of x_t over them
            s_tt = (a * a).T @ m
            s_tu = a.T @ a
            with np.errstate(invalid="ignore", divide="ignore"):
                mean_t, mean_u = s_t / n, s_t.T / n
                cov = s_tu / n - mean_t * mean_u
                var_t = s_tt / n - mean_t**2
                var_u = var_t.T
                usable = (n >= self.min_donors) & (var_t > 1e-9) & (var_u > 1e-9) & ~eye
                slope = np.where(usable, cov / var_u, 0.0)
                r2 = np.where(usable, np.minimum(cov**2 / (var_t * var_u), 0.99), 0.0)
            weight = r2 / (1.0 - r2)
            intercept = np.where(usable, mean_t - slope * mean_u, 0.0)
            num = m @ (weight * intercept).T + a @ (weight * slope).T + self.prior * base[g][None, :]
            den = m @ weight.T + self.prior
            with np.errstate(invalid="ignore", divide="ignore"):
                out[g] = np.where(den > 1e-12, num / den, base[g][None, :])
        return out


class CrossGeneRegressionBaseline(_CubeMethod):
    """Pairwise lines from every visible (gene, tissue) of the donor, not only the gene's own other tissues.

    ``pairwise_regression`` predicts a donor's gene g in tissue t from the same gene in the donor's other tissues.
    Much of what moves a gene across donors is the donor's state (age, sex, the circumstances of death, time to
    sampling), which moves many genes in every tissue at once: here the lines of g in t on *other* genes in the
    donor's tissues (every tissue, t included where a sample of it is visible) join the gene's own, each weighted by
    ``weight`` x r^2 / (1 - r^2) of its line (the gene's own lines by r^2 / (1 - r^2), as in
    ``pairwise_regression``, to which ``weight`` 0 is equal with ``prior`` 0). Many weak lines averaged with a
    small weight: measured on a validation split of the visible GTEx v8 samples (docs/benchmarks.md), across-donor
    Pearson 0.354 from the gene's own tissues alone, 0.385 with the other genes' lines at weight 0.05.

    The other genes are the ``genes`` of the fit range (:func:`fit_ranges`) whose donor effects (a donor's mean
    standardised deviation over its visible tissues) correlate most with g's across donors, so each gene's cost
    is bounded (``(genes + 1) x tissues`` predictor columns) whatever the range's size.
    """

    name = "cross_gene_regression"

    def __init__(self, min_donors: int, weight: float, genes: int) -> None:
        self.min_donors, self.weight, self.genes = min_donors, weight, genes

    @staticmethod
    def _partners(cube: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
        """(G, min(k, G - 1)) the genes whose donor effects correlate most (in absolute value) with each gene's."""
        n_genes = cube.shape[0]
        k = min(k, n_genes - 1)
        if k <= 0:
            return np.zeros((n_genes, 0), dtype=np.int64)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            dev = cube - base[:, None, :]
            sd = np.sqrt(np.nanmean(dev**2, axis=1, keepdims=True))
            effect = np.nanmean(dev / np.where(sd > 1e-9, sd, np.nan), axis=2)  # (G, D)
        ok = ~np.isnan(effect)
        e = np.where(ok, effect, 0.0)
        m = ok.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = (e @ e.T) / np.sqrt(((e * e) @ m.T) * (m @ (e * e).T))
        corr = np.where(np.isfinite(corr), np.abs(corr), -1.0)
        np.fill_diagonal(corr, -np.inf)
        return np.argsort(-corr, axis=1, kind="stable")[:, :k]

    def _fit_cube(self, problem: VisibleProblem) -> np.ndarray:
        cube = donor_tissue_cube(problem)
        n_genes, n_donors, n_tissues = cube.shape
        base = _gene_tissue_means(cube)
        flat = cube.transpose(1, 0, 2).reshape(n_donors, n_genes * n_tissues)
        ok = ~np.isnan(flat)
        m = ok.astype(np.float64)
        centre = base.reshape(-1)  # the lines are shift-invariant: centred values keep the sums well conditioned
        a = np.where(ok, flat - centre[None, :], 0.0)
        partners = self._partners(cube, base, self.genes)
        tissue_cols = np.arange(n_tissues)
        out = np.empty_like(cube)
        for g in range(n_genes):
            genes = np.concatenate([[g], partners[g]])
            cols = (genes[:, None] * n_tissues + tissue_cols[None, :]).ravel()  # own tissues first
            own = np.zeros(len(cols), dtype=bool)
            own[:n_tissues] = True
            mt, at = m[:, g * n_tissues:(g + 1) * n_tissues], a[:, g * n_tissues:(g + 1) * n_tissues]
            mu, au = m[:, cols], a[:, cols]
            n = mt.T @ mu  # [t, u]: donors with both visible
            with np.errstate(invalid="ignore", divide="ignore"):
                mean_t, mean_u = (at.T @ mu) / n, (mt.T @ au) / n
                var_t = ((at * at).T @ mu) / n - mean_t**2
                var_u = (mt.T @ (au * au)) / n - mean_u**2
                cov = (at.T @ au) / n - mean_t * mean_u
                usable = (n >= self.min_donors) & (var_t > 1e-9) & (var_u > 1e-9)
                usable[:, :n_tissues] &= ~np.eye(n_tissues, dtype=bool)
                slope = np.where(usable, cov / var_u, 0.0)
                r2 = np.where(usable, np.minimum(cov**2 / (var_t * var_u), 0.99), 0.0)
            weight = r2 / (1.0 - r2) * np.where(own, 1.0, self.weight)[None, :]
            intercept = np.where(usable, mean_t - slope * mean_u, 0.0)
            num = mu @ (weight * intercept).T + au @ (weight * slope).T
            den = mu @ weight.T
            with np.errstate(invalid="ignore", divide="ignore"):
                out[g] = np.where(den > 1e-12, centre[g * n_tissues:(g + 1) * n_tissues][None, :] + num / den,
                                  base[g][None, :])
        return out


class IterativeRidgeBaseline(_CubeMethod):
    """MICE-style chained ridge regressions over tissues (van Buuren & Groothuis-Oudshoorn 2011, with ridge).

    Rows are (gene, donor) pairs (genes alone for a median-by-tissue table) and columns tissues. With several
    donors each cell is first taken as its deviation from the (gene, tissue) mean over donors, so the regressions
    learn how a donor's deviations carry across tissues rather than how genes differ. Missing cells start at the
    row's visible mean plus the tissue's mean offset; then, ``iterations`` times, each tissue's column is
    regressed (ridge, penalty ``alpha``, intercept) on all the other columns over the rows where it is visible, and
    its missing cells are replaced by the regression's prediction.
    """

    name = "iterative_ridge"

    def __init__(self, alpha: float, iterations: int) -> None:
        self.alpha, self.iterations = alpha, iterations

    def _fit_cube(self, problem: VisibleProblem) -> np.ndarray:
        rows = self.filled_rows(problem)
        return rows.cube(rows.filled)

    def filled_rows(self, problem: VisibleProblem) -> FilledRows:
        """The problem's rows (:class:`FilledRows`) with every missing cell filled by the chained regressions
        (computed once per problem and setting: :func:`shared_fill`; read-only)."""
        return shared_fill(problem, ("iterative_ridge", self.alpha, self.iterations), lambda: self._fill(problem))

    def _fill(self, problem: VisibleProblem) -> FilledRows:
        cube = donor_tissue_cube(problem)
        n_g, n_d, n_t = cube.shape
        base = _gene_tissue_means(cube) if n_d > 1 else np.zeros((n_g, n_t))
        x = (cube - base[:, None, :]).reshape(n_g * n_d, n_t)
        ok = ~np.isnan(x)
        with np.errstate(invalid="ignore", divide="ignore"):
            counts = ok.sum(axis=1)
            row_mean = np.where(counts > 0, np.where(ok, x, 0.0).sum(axis=1) / np.maximum(counts, 1), np.nan)
            if n_d > 1:  # a row with nothing visible: no deviation from the (gene, tissue) means
                row_mean = np.where(np.isnan(row_mean), 0.0, row_mean)
            else:  # a gene with nothing visible: the global mean
                row_mean = np.where(np.isnan(row_mean), np.nanmean(x) if ok.any() else 0.0, row_mean)
            offset = np.nanmean(np.where(ok, x - row_mean[:, None], np.nan), axis=0) if ok.any() else np.zeros(n_t)
        offset = np.where(np.isnan(offset), 0.0, offset)
        filled = np.where(ok, x, row_mean[:, None] + offset[None, :])
        for _ in range(self.iterations if n_t > 1 else 0):
            for t in range(n_t):
                obs = ok[:, t]
                if obs.all() or obs.sum() < 3:
                    continue
                xo = filled[obs]
                mu_x = xo.mean(axis=0)
                xc = xo - mu_x
                gram = xc.T @ xc + self.alpha * np.eye(n_t)
                rhs = xc.T @ (x[obs, t] - x[obs, t].mean())
                # column t is the response: drop it from the regressors
                gram[t, :], gram[:, t], gram[t, t], rhs[t] = 0.0, 0.0, 1.0, 0.0
                beta = np.linalg.solve(gram, rhs)
                miss = ~obs
                filled[miss, t] = x[obs, t].mean() + (filled[miss] - mu_x) @ beta
        for array in (filled, ok, base):
            array.setflags(write=False)
        return FilledRows(filled, ok, base, cube.shape)


@dataclasses.dataclass
class FilledRows:
    """A problem's (gene, donor) rows over tissues, as :class:`IterativeRidgeBaseline` fills them.

    Attributes:
        filled: (G * D, T) float64 deviations from each (gene, tissue)'s mean over donors (the values themselves
            with one donor), every missing cell filled.
        visible: (G * D, T) bool, the cells that were visible.
        base: (G, T) the (gene, tissue) means taken out (zeros with one donor).
        shape: (G, D, T).
    """

    filled: np.ndarray
    visible: np.ndarray
    base: np.ndarray
    shape: tuple[int, int, int]

    def cube(self, rows: np.ndarray) -> np.ndarray:
        """(G, D, T) cells of ``rows`` (laid out as :attr:`filled`) with the base added back."""
        return rows.reshape(self.shape) + self.base[:, None, :]

    def groups(self) -> list[np.ndarray]:
        """The row indices among which a row's neighbours are sought: every gene with one donor (a gene x tissue
        table), each gene's own donors otherwise (a (gene, donor) row's deviations are the donor's, gene by gene)."""
        n_g, n_d, _ = self.shape
        if n_d == 1:
            return [np.arange(n_g)]
        return [np.arange(g * n_d, (g + 1) * n_d) for g in range(n_g)]


class LocalRegressionBaseline(_CubeMethod):
    """Local least squares imputation (LLSimpute, Kim, Golub & Park 2005) over filled rows.

    Rows are (gene, donor) pairs over tissues as in :class:`IterativeRidgeBaseline`; every missing cell is filled
    first, by ``start`` (``iterative_ridge``'s chained ridge regressions or, for a gene x tissue table,
    ``chained_boosting``'s boosted ones; with several donors ``iterative_ridge``'s always).
    Each row with a missing cell then takes its ``k`` nearest rows (Euclidean distance of the filled, row-centred
    profiles; among all genes of a gene x tissue table, among the gene's own donors otherwise), regresses its
    visible cells on theirs (ridge, penalty ``alpha``) and fills its missing cells from the neighbours' values
    there. A global regression per tissue misses what only genes of one kind share (a cluster's own tissue
    pattern); the neighbours carry it.
    """

    name = "local_regression"

    #: distances computed at once: rows whose neighbours are sought together x the rows of their group (16.8
    #: million float64, 128 MiB, and as much again for the product it is made from while it is made)
    DISTANCES = 1 << 24

    def __init__(self, k: int, alpha: float, start: IterativeRidgeBaseline | ChainedBoostingBaseline,
                 fallback: IterativeRidgeBaseline) -> None:
        """``fallback``: the start used where ``start`` does not apply to the problem fitted (:func:`make_method`
        passes ``iterative_ridge`` with the same settings)."""
        self.k, self.alpha, self.start, self.fallback = k, alpha, start, fallback

    def _fit_cube(self, problem: VisibleProblem) -> np.ndarray:
        # a start that does not apply to this problem (:func:`not_applicable`) gives way to iterative_ridge
        start = self.fallback if not_applicable(self.start.name, len(problem.donors)) else self.start
        rows = start.filled_rows(problem)
        out = rows.filled.copy()
        for group in rows.groups():
            self._refine(rows, group, out)
        return rows.cube(out)

    def _refine(self, rows: FilledRows, group: np.ndarray, out: np.ndarray) -> None:
        """Refill the missing cells of the rows of ``group`` from their nearest rows in ``group`` (into ``out``)."""
        k = min(self.k, len(group) - 1)
        if k < 1:
            return
        mean = rows.filled[group].mean(axis=1)
        z = rows.filled[group] - mean[:, None]  # (R, T) centred profiles
        visible = rows.visible[group]
        todo = np.nonzero(visible.any(axis=1) & ~visible.all(axis=1))[0]  # rows to refill (something to fit on)
        norms = np.einsum("rt,rt->r", z, z)
        eye = self.alpha * np.eye(k)
        chunk = max(1, min(1024, self.DISTANCES // len(group)))
        for lo in range(0, len(todo), chunk):
            mine = todo[lo : lo + chunk]
            dist = norms[mine, None] + norms[None, :] - 2.0 * (z[mine] @ z.T)  # (c, R)
            dist[np.arange(len(mine)), mine] = np.inf  # not its own neighbour
            near = np.argpartition(dist, k - 1, axis=1)[:, :k]  # (c, k)
            a = z[near]  # (c, k, T) the neighbours' profiles
            vis = visible[mine].astype(np.float64)  # (c, T)
            gram = np.einsum("ckt,ct,clt->ckl", a, vis, a) + eye
            rhs = np.einsum("ckt,ct->ck", a, vis * z[mine])
            weights = np.linalg.solve(gram, rhs[..., None])[..., 0]  # (c, k)
            estimate = np.einsum("ckt,ck->ct", a, weights) + mean[mine, None]
            out[group[mine]] = np.where(visible[mine], rows.filled[group[mine]], estimate)


#: seeds of ``chained_boosting``'s bags: bag b draws with seed + b x this (a prime; bag 0 is the plain seed)
BAG_SEED_STEP = 7919


class ChainedBoostingBaseline(_CubeMethod):
    """Chained gradient-boosted regressions over tissues: MissForest (Stekhoven & Buehlmann 2012) with boosted
    trees (XGBoost) in place of random forests, started from ``iterative_ridge``'s filled rows.

    Rows and columns as in :class:`IterativeRidgeBaseline`. Each round, each tissue's column is regressed on the
    other columns of the current filled rows (and the row's mean, spread and count of missing cells) over the rows
    where it is visible, and its missing cells take the prediction; all tissues are refitted from the same round's
    fill, which the next round starts from. Trees find what one linear map across tissues cannot: a gene silent in
    most tissues, a tissue that follows others only above a level. Each regression stops adding trees when a tenth
    of its rows, held out, stops improving (visible rows only; at most :attr:`MAX_TREES`), and learns from at most
    ``max_rows`` rows drawn with ``seed`` (its trees ``max_depth`` deep: ``baselines.cb_max_depth``). With ``bags``
    > 1 that whole run is repeated with other seeds (:data:`BAG_SEED_STEP`) and the fills averaged: the trees of
    one run vary with its row and column samples and where its held-out tenth stops it, and the average varies
    less.

    For a gene x tissue table only (:data:`TABLE_METHODS`): with sample-level data the rows are (gene, donor)
    deviations pooled over genes, where trees fell far below ``iterative_ridge`` on GTEx v8 and took ~50 s a round.
    """

    name = "chained_boosting"

    MAX_TREES = 1000
    PARAMS = {"eta": 0.1, "subsample": 0.8, "colsample_bytree": 0.8, "min_child_weight": 5.0,
              "lambda": 5.0, "objective": "reg:squarederror", "tree_method": "hist", "verbosity": 0}

    def __init__(self, rounds: int, max_rows: int, ridge_alpha: float, ridge_iterations: int, seed: int = 0,
                 bags: int = 1, max_depth: int = 6) -> None:
        self.rounds, self.max_rows, self.seed, self.bags = rounds, max_rows, seed, bags
        self.max_depth = max_depth
        self.ridge = IterativeRidgeBaseline(ridge_alpha, ridge_iterations)

    def _fit_cube(self, problem: VisibleProblem) -> np.ndarray:
        rows = self.filled_rows(problem)
        return rows.cube(rows.filled)

    def filled_rows(self, problem: VisibleProblem) -> FilledRows:
        """The problem's rows (:class:`FilledRows`) with every missing cell filled by the boosted regressions
        (computed once per problem and setting: :func:`shared_fill`; read-only)."""
        return shared_fill(problem, self._key(self.rounds), lambda: self._fills(problem, [self.rounds])[0])

    @one_blas_thread  # as fit runs it: the start's ridge fill is then the same to the last bit
    def fill_rounds(self, problem: VisibleProblem, rounds: list[int]) -> None:
        """Compute the fills of this method with each of ``rounds`` rounds (its other settings as they are) from one
        run of the most rounds, into the problem's shared fills (:func:`shared_fill`), where :meth:`filled_rows` of
        each finds its own. A run's first k rounds draw and fit exactly what a run of k rounds does (one generator,
        drawn from in the same order), so each fill equals the one its own run gives (tested), for the cost of the
        largest alone: the tuning of ``cb_rounds`` over (1, 2, 3) fitted 6 rounds, it fits 3."""
        store = _shared_fills(problem)
        wanted = [k for k in sorted({int(r) for r in rounds}) if self._key(k) not in store]
        if wanted:
            store.update(zip(map(self._key, wanted), self._fills(problem, wanted), strict=True))

    def _key(self, rounds: int) -> tuple:
        """The key of this method's fill with ``rounds`` rounds in the problem's shared fills."""
        return ("chained_boosting", self.ridge.alpha, self.ridge.iterations, rounds, self.max_rows, self.seed,
                self.bags, self.max_depth)

    def _fills(self, problem: VisibleProblem, rounds: list[int]) -> list[FilledRows]:
        """The filled rows after each of ``rounds`` (ascending) rounds, from one run (per bag) of the most."""
        rows = self.ridge.filled_rows(problem)
        # bag 0 is the single run's fill; with more bags their fills are averaged, summed as they come (two fills
        # a round held at once, not one per bag)
        sums: list[np.ndarray] | None = None
        for b in range(self.bags):
            fills = self.boosted(rows, self.seed + BAG_SEED_STEP * b, rounds)
            if sums is None:
                # nothing to boost (one tissue) leaves the start's own fill, which is shared: copied to be summed
                sums = [f.copy() if self.bags > 1 and f is rows.filled else f for f in fills]
            else:
                for total, f in zip(sums, fills, strict=True):
                    total += f
        assert sums is not None
        out = []
        for total in sums:
            if self.bags > 1:
                total /= self.bags
            total.setflags(write=False)
            out.append(dataclasses.replace(rows, filled=total))
        return out

    def boosted(self, rows: FilledRows, seed: int, rounds: list[int]) -> list[np.ndarray]:
        """``rows.filled`` with every missing cell refilled by boosted regressions, drawn with ``seed`` (the rows
        each regression learns from, its held-out tenth, the trees' samples): the fill after each of ``rounds``
        (ascending) rounds, from one run of the last."""
        import xgboost as xgb

        rng = np.random.default_rng(seed)
        filled, visible = rows.filled, rows.visible
        n_t = filled.shape[1]
        n_missing = (~visible).sum(axis=1, keepdims=True).astype(np.float64)
        params = dict(self.PARAMS, seed=seed, max_depth=self.max_depth)
        after: dict[int, np.ndarray] = {0: filled}
        for done in range(1, (max(rounds) if n_t > 1 else 0) + 1):
            total, squares = filled.sum(axis=1), np.einsum("rt,rt->r", filled, filled)
            nxt = filled.copy()
            for t in range(n_t):
                obs = np.flatnonzero(visible[:, t])
                miss = np.flatnonzero(~visible[:, t])
                if len(miss) == 0 or len(obs) < 20:
                    continue
                if len(obs) > self.max_rows:
                    obs = np.sort(rng.choice(obs, size=self.max_rows, replace=False))
                held = rng.random(len(obs)) < 0.1
                # the row's summary over the *other* tissues: with column t in it, a visible row's mean would
                # carry its own target
                others = np.delete(filled, t, axis=1)
                mean = (total - filled[:, t]) / (n_t - 1)
                sd = np.sqrt(np.maximum((squares - filled[:, t] ** 2) / (n_t - 1) - mean**2, 0.0))
                features = np.column_stack([others, mean, sd, n_missing - ~visible[:, t:t + 1]]).astype(np.float32)
                train = xgb.DMatrix(features[obs[~held]], label=filled[obs[~held], t])
                check = xgb.DMatrix(features[obs[held]], label=filled[obs[held], t])
                booster = xgb.train(params, train, num_boost_round=self.MAX_TREES, evals=[(check, "held")],
                                    early_stopping_rounds=20, verbose_eval=False)
                nxt[miss, t] = booster.predict(xgb.DMatrix(features[miss]),
                                               iteration_range=(0, booster.best_iteration + 1))
            filled = nxt
            if done in rounds:
                after[done] = filled
        return [after.get(k, filled) for k in rounds]  # one tissue: nothing boosted, the start's fill each round


class TensorFactorisationBaseline(_CubeMethod):
    """Low-rank factorisation of the gene x donor x tissue array around each (gene, tissue)'s mean over donors.

    The residual of cell (g, d, t) is modelled as ``W[g, t] . Z[d]``: ``rank`` latent factors per donor, learned
    from every visible cell of that donor, and a loading per (gene, tissue) (a Tucker-1 factorisation along the
    donor mode, HYFA-like in spirit). Fitted by alternating ridge least squares (penalty ``lam``) on the visible
    cells only; a donor with nothing visible gets Z = 0, i.e. the (gene, tissue) mean. Needs several donors.
    """

    name = "tensor_factorisation"

    def __init__(self, rank: int, lam: float, iterations: int, seed: int = 0) -> None:
        self.rank, self.lam, self.iterations, self.seed = rank, lam, iterations, seed

    @staticmethod
    def _solve(mask: np.ndarray, resid: np.ndarray, factors: np.ndarray, lam: float) -> np.ndarray:
        """Ridge solution of each row of ``resid`` (masked) on ``factors``: (rows, r)."""
        r = factors.shape[1]
        outer = (factors[:, :, None] * factors[:, None, :]).reshape(len(factors), r * r)
        gram = (mask @ outer).reshape(-1, r, r) + lam * np.eye(r)
        rhs = resid @ factors
        return np.linalg.solve(gram, rhs[:, :, None])[:, :, 0]

    def _fit_cube(self, problem: VisibleProblem) -> np.ndarray:
        cube = donor_tissue_cube(problem)
        n_g, n_d, n_t = cube.shape
        base = _gene_tissue_means(cube)
        # rows (gene, tissue), columns donors
        resid = (cube - base[:, None, :]).transpose(0, 2, 1).reshape(n_g * n_t, n_d)
        ok = ~np.isnan(resid)
        mask = ok.astype(np.float64)
        resid0 = np.where(ok, resid, 0.0)
        rng = np.random.default_rng(self.seed)
        z = rng.normal(scale=0.1, size=(n_d, self.rank))
        for _ in range(self.iterations):
            w = self._solve(mask, resid0, z, self.lam)
            z = self._solve(mask.T, resid0.T, w, self.lam)
        fitted = (w @ z.T).reshape(n_g, n_t, n_d).transpose(0, 2, 1)
        return base[:, None, :] + fitted


COMPOSITION_FEATURES = ("gc", "cpg_per_100bp", "cpg_obs_exp", "gc_core", "cpg_core_per_100bp")


def promoter_composition(sequences: list[str | None], upstream: int, core: int = 250) -> np.ndarray:
    """Base composition of strand-oriented promoter windows: GC fraction, CpG dinucleotides per 100 bp and CpG
    observed/expected over the whole window, and GC and CpG density of the core ``+/- core`` bp around the TSS.

    Only known bases count (``N`` is unknown sequence); a window with less than half its bases known, or None,
    gives a row of NaN.

    Args:
        sequences: one window per gene (None for a gene without one); the TSS is at offset ``upstream``.
        upstream: bases of the window upstream of the TSS.
        core: half-width of the core window.

    Returns:
        (N, 5) float64 in the order of :data:`COMPOSITION_FEATURES`.
    """
    out = np.full((len(sequences), len(COMPOSITION_FEATURES)), np.nan)

    def stats(seq: str) -> tuple[float, float, float, int]:
        known = sum(seq.count(b) for b in "ACGT")
        gc = seq.count("G") + seq.count("C")
        cpg = seq.count("CG")
        c, g = seq.count("C"), seq.count("G")
        oe = cpg * known / (c * g) if c and g else 0.0
        return gc / max(known, 1), 100.0 * cpg / max(known, 1), oe, known

    for i, seq in enumerate(sequences):
        if not seq:
            continue
        seq = seq.upper()
        gc, cpg, oe, known = stats(seq)
        if known < len(seq) / 2:
            continue
        core_seq = seq[max(0, upstream - core) : upstream + core]
        gc_c, cpg_c, _, known_c = stats(core_seq)
        out[i] = (gc, cpg, oe, gc_c if known_c else gc, cpg_c if known_c else cpg)
    return out


def composition_of(gene_ids: np.ndarray, gene_promoters: pa.Table, promoters: pa.Table, upstream: int) -> np.ndarray:
    """(G, F) :func:`promoter_composition` of the reference promoter of each gene of ``gene_ids`` (NaN rows for genes
    without one), from a prepare output's ``gene_promoters`` (gene_id -> promoter_id) and ``promoters``
    (promoter_id -> sequence) tables."""
    seq_of = dict(zip(promoters["promoter_id"].to_pylist(), promoters["sequence"].to_pylist(), strict=True))
    pid_of = dict(zip(gene_promoters["gene_id"].to_pylist(), gene_promoters["promoter_id"].to_pylist(), strict=True))
    return promoter_composition([seq_of.get(pid_of.get(g)) for g in gene_ids], upstream)


class PromoterCompositionBaseline:
    """Expression from promoter base composition alone (CpG islands mark broadly expressed genes): per tissue, a
    ridge regression (penalty ``alpha`` on standardised features) of the genes' visible mean in that tissue on the
    composition of their promoter (:func:`promoter_composition`), fitted on the genes with a visible value in that
    tissue (fewer than 3: the tissue's fallback mean). Genes without a known promoter get the tissue's mean over
    genes without one.

    Args:
        composition: (G, F) features of the problem's genes, NaN rows for genes without sequence.
        alpha: ridge penalty.
    """

    name = "promoter_composition"

    def __init__(self, composition: np.ndarray, alpha: float) -> None:
        self.composition, self.alpha = np.asarray(composition, np.float64), alpha

    @one_blas_thread
    def fit(self, problem: VisibleProblem) -> None:
        if len(self.composition) != problem.n_genes:
            raise ValueError(f"promoter_composition: {len(self.composition)} composition rows for "
                             f"{problem.n_genes} genes")
        means = _gene_tissue_means(donor_tissue_cube(problem))  # (G, T) with fallbacks
        observed = ~np.isnan(problem.values)
        seen = observed.any(axis=1)
        has = ~np.isnan(self.composition).any(axis=1)
        fit = has & seen
        n_t = len(problem.tissues)
        fallback_rows = seen & ~has
        self.fallback = (means[fallback_rows].mean(axis=0) if fallback_rows.any()
                         else means[seen].mean(axis=0) if seen.any() else np.zeros(n_t))
        self.has = has
        self.sample_tissue = problem.tissue_index
        if fit.sum() < 3:
            self.coef = np.zeros((self.composition.shape[1], n_t))
            self.intercept = self.fallback
            self.mu, self.sd = np.zeros(self.composition.shape[1]), np.ones(self.composition.shape[1])
            return
        x = self.composition[fit]
        self.mu, self.sd = x.mean(axis=0), x.std(axis=0)
        self.sd = np.where(self.sd > 0, self.sd, 1.0)
        # each tissue's ridge on the genes visible in that tissue: a gene seen elsewhere only has a filled-in mean
        # there (its mean plus the tissue's offset), which it learned as if measured
        seen_in = np.zeros((problem.n_genes, n_t), dtype=bool)
        for t in range(n_t):
            seen_in[:, t] = observed[:, problem.tissue_index == t].any(axis=1)
        self.intercept = self.fallback.astype(np.float64).copy()
        self.coef = np.zeros((self.composition.shape[1], n_t))
        eye = self.alpha * np.eye(x.shape[1])
        for t in range(n_t):
            rows = has & seen_in[:, t]
            if rows.sum() < 3:
                continue  # too few genes measured here: the tissue's fallback mean
            xs = (self.composition[rows] - self.mu) / self.sd
            centre = xs.mean(axis=0)  # this tissue's genes, not every seen gene: the ridge's columns centred on them
            y = means[rows, t]
            self.coef[:, t] = np.linalg.solve((xs - centre).T @ (xs - centre) + eye,
                                              (xs - centre).T @ (y - y.mean()))
            self.intercept[t] = y.mean() - centre @ self.coef[:, t]

    def predict(self, records: pa.Table) -> np.ndarray:
        return self.predict_entries(records["gene_index"].to_numpy(), records["sample_index"].to_numpy())

    def predict_entries(self, gene_index: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
        gene_index = np.asarray(gene_index, np.int64)
        t = self.sample_tissue[np.asarray(sample_index, np.int64)]
        x = (np.nan_to_num(self.composition[gene_index]) - self.mu) / self.sd
        est = self.intercept[t] + np.einsum("nf,fn->n", x, self.coef[:, t])
        return np.where(self.has[gene_index], est, self.fallback[t])


def shared_family_codes(keys: np.ndarray) -> np.ndarray:
    """(G,) each gene's family at one level of :func:`gene_family_keys` as 0..F-1, counting only the families of two
    genes or more (one of a single gene says nothing of its gene, which never counts towards itself); -1 for the
    others and for genes without a key."""
    known = np.flatnonzero(np.not_equal(keys, None))
    codes = np.full(len(keys), -1, np.int64)
    if len(known):
        _, codes[known] = np.unique(keys[known].astype(str), return_inverse=True)
        shared = np.bincount(codes[known])[codes[known]] > 1
        codes[known[~shared]] = -1
        known = known[shared]
        _, codes[known] = np.unique(codes[known], return_inverse=True)
    return codes


def family_rows(names: np.ndarray | list) -> int:
    """The rows :class:`FamilyLevels` keeps for ``names``: its coarse and fine families of two genes or more (one
    row at least per level)."""
    return sum(max(int(shared_family_codes(level).max(initial=-1)) + 1, 1) for level in gene_family_keys(names))


def forms_families(names: np.ndarray | list) -> bool:
    """Whether gene symbols group genes into families: some fine family key (:func:`gene_family_keys`) is shared
    by two genes or more (synthetic genes named ``SYN1``, ``SYN2``, ... form none)."""
    return shared_families(names)[1] > 0


#: samples :class:`FamilyLevels` sums at once (a float64 copy of that many columns of the values at a time)
FAMILY_CHUNK = 2048


class FamilyLevels:
    """What a gene's family says of it in each sample: per family (coarse and fine, :func:`gene_family_keys`) and
    sample, the sum and count of its members' visible values (families of two genes or more: one of a single gene
    never counts towards it), and the sums and counts of all visible values by sample, by tissue and overall (the
    priors). :meth:`estimate` takes a gene's own value out of each, so a gene
    never counts towards its own estimate. Built in bounded passes over the samples (no (G, S) copy of the values
    is kept).

    Args:
        values: (G, S) visible values, NaN where hidden or unmeasured (not copied; :meth:`estimate` reads it).
        gene_names: (G,) gene symbols, None where unknown.
        tissue_index: (S,) each sample's tissue; ``n_tissues`` of them.
        chunk: samples summed at once.
        hidden: (G, S) bool, entries counted as hidden besides the NaN of ``values`` (a validation split's, without
            a copy of the values).
    """

    def __init__(self, values: np.ndarray, gene_names: np.ndarray, tissue_index: np.ndarray, n_tissues: int,
                 chunk: int = FAMILY_CHUNK, hidden: np.ndarray | None = None) -> None:
        self.values = values
        n_genes, n_samples = values.shape
        keys = gene_family_keys(gene_names)
        self.named = np.not_equal(keys[0], None)  # a gene whose symbol names a family (:meth:`has_family`)
        members, self.codes = [], []
        for level in keys:
            codes = shared_family_codes(level)
            known = np.flatnonzero(codes >= 0)
            n_codes = int(codes.max(initial=-1)) + 1
            members.append(sparse.csr_matrix((np.ones(len(known)), (codes[known], known)),
                                             shape=(max(n_codes, 1), n_genes)))
            self.codes.append(codes)
        self.sums = [np.zeros((m.shape[0], n_samples)) for m in members]
        # counts are whole numbers, exact in float32 (up to 2**24 genes): half the memory of the sums beside them
        self.counts = [np.zeros((m.shape[0], n_samples), np.float32) for m in members]
        total, n = np.zeros(n_samples), np.zeros(n_samples)
        for lo in range(0, n_samples, chunk):
            part = values[:, lo : lo + chunk]
            visible = ~np.isnan(part)
            if hidden is not None:
                visible &= ~hidden[:, lo : lo + chunk]
            filled = np.where(visible, part, 0.0)
            total[lo : lo + chunk], n[lo : lo + chunk] = filled.sum(axis=0), visible.sum(axis=0)
            for member, sums, counts in zip(members, self.sums, self.counts, strict=True):
                sums[:, lo : lo + chunk] = member @ filled
                counts[:, lo : lo + chunk] = member @ visible.astype(np.float64)
        # each sample's sum and count, its tissue's and all of them: the priors, each taken without the gene
        self.tissue_index = np.asarray(tissue_index, np.int64)
        self.sample_sum, self.sample_n = total, n
        self.tissue_sum = np.bincount(self.tissue_index, weights=total, minlength=n_tissues)
        self.tissue_n = np.bincount(self.tissue_index, weights=n, minlength=n_tissues)
        self.overall_sum, self.overall_n = float(total.sum()), float(n.sum())

    def part(self, rows: slice | np.ndarray) -> FamilyLevels:
        """The levels of genes ``rows`` alone (a range, or increasing indices), without values (:meth:`bind` gives
        them those genes'): the families' sums and the priors stay the whole problem's (shared, not copied), so a
        gene range's estimates are those of the whole problem, its families reaching into the other ranges and
        chromosomes."""
        out = copy.copy(self)
        out.values = None  # type: ignore[assignment]
        out.named = self.named[rows]
        out.codes = [codes[rows] for codes in self.codes]
        return out

    def bind(self, values: np.ndarray) -> FamilyLevels:
        """These levels reading ``values`` (the visible values of the genes they cover) for each gene's own value."""
        if len(values) != len(self.named):
            raise ValueError(f"FamilyLevels.bind: {len(values)} rows of values for {len(self.named)} genes")
        out = copy.copy(self)
        out.values = values
        return out

    def has_family(self, gene_index: np.ndarray) -> np.ndarray:
        """(N,) bool: the gene's symbol names a family (it has a coarse key, :func:`gene_family_keys`)."""
        return self.named[np.asarray(gene_index, np.int64)]

    def estimate(self, gene_index: np.ndarray, sample_index: np.ndarray, shrinkage: float) -> np.ndarray:
        """(N,) float64: the fine family's mean without the gene itself, shrunk towards the coarse family's, itself
        shrunk towards the sample's mean over the other genes, each with ``shrinkage`` pseudo-genes (that mean for
        a gene with no family). The gene's own value counts nowhere."""
        gi = np.asarray(gene_index, np.int64)
        si = np.asarray(sample_index, np.int64)
        own = self.values[gi, si].astype(np.float64)
        own_n = ~np.isnan(own)
        own = np.where(own_n, own, 0.0)
        # the sample's mean over the other visible genes; with none, its tissue's, else every sample's
        t = self.tissue_index[si]
        prior = []
        for total, count in ((self.sample_sum[si], self.sample_n[si]), (self.tissue_sum[t], self.tissue_n[t]),
                             (self.overall_sum, self.overall_n)):
            count = count - own_n
            with np.errstate(invalid="ignore", divide="ignore"):
                prior.append(np.where(count > 0, (total - own) / count, np.nan))
        est = np.where(np.isnan(prior[0]), np.where(np.isnan(prior[1]), np.nan_to_num(prior[2]), prior[1]), prior[0])
        for codes, sums, counts in zip(self.codes, self.sums, self.counts, strict=True):  # coarse, then fine
            code = codes[gi]
            has = code >= 0
            total = np.where(has, sums[np.maximum(code, 0), si] - own, 0.0)
            count = np.where(has, counts[np.maximum(code, 0), si].astype(np.float64) - own_n, 0.0)
            est = (total + shrinkage * est) / (count + shrinkage)
        return est

    def level(self, gene_index: np.ndarray, sample_index: np.ndarray, shrinkage: float) -> np.ndarray:
        """:meth:`estimate` where the gene has a family, NaN where it has none (a network's input: no family is
        no evidence, not the sample's mean)."""
        return np.where(self.has_family(gene_index), self.estimate(gene_index, sample_index, shrinkage), np.nan)


def family_levels(problem: VisibleProblem) -> FamilyLevels:
    """:class:`FamilyLevels` of a problem with gene symbols.

    Raises:
        ValueError: the problem has no gene symbols.
    """
    if problem.gene_names is None:
        raise ValueError("gene_family: the problem has no gene symbols")
    return FamilyLevels(problem.values, problem.gene_names, problem.tissue_index, len(problem.tissues))


class GeneFamilyBaseline:
    """A gene's expression from the other genes of its family (the stem of its symbol, :func:`gene_family_keys`)
    in the same sample: the mean of the fine family's visible members shrunk towards that of the coarse family,
    itself shrunk towards the sample's mean over the other visible genes, each with ``shrinkage`` pseudo-genes. A
    gene never counts towards its own estimate, so a gene whose values are all hidden gets what its family says
    (the ``genes`` task); genes without a symbol get the sample's mean. A sample with no other visible value (a
    missing profile) starts from its tissue's visible mean, else the overall mean (:class:`FamilyLevels`).

    Symbols come from the annotation (``gene_name`` of a GTF) or the expression file (a GCT's ``Description``):
    :attr:`geximpute.science.problem.VisibleProblem.gene_names`. On the medians ``genes`` task (3 seeds): Pearson
    0.453 alone against ``distance`` 0.283, and stacked in the head the hybrid rose from 0.405 to 0.524
    (docs/benchmarks.md, "A gene's family").

    Args:
        shrinkage: pseudo-genes of the prior at each level.
        family: for a gene range cut from a larger problem (:func:`fit_ranges`), that problem's
            :meth:`FamilyLevels.part` of the range: a family's other members count wherever they are. None: the
            problem fitted on is the whole.
    """

    name = "gene_family"

    def __init__(self, shrinkage: float, family: FamilyLevels | None = None) -> None:
        self.shrinkage = shrinkage
        self.given = family

    @one_blas_thread
    def fit(self, problem: VisibleProblem) -> None:
        # a gene range of a larger problem reads that problem's families (FamilyLevels.part); else its own
        self.family = self.given.bind(problem.values) if self.given is not None else family_levels(problem)

    def predict(self, records: pa.Table) -> np.ndarray:
        return self.predict_entries(records["gene_index"].to_numpy(), records["sample_index"].to_numpy())

    def predict_entries(self, gene_index: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
        return self.family.estimate(gene_index, sample_index, self.shrinkage)


#: methods that predict any (gene, sample) entry from the fitted problem alone, without context records; they
#: give out-of-fold estimates (:func:`out_of_fold_entries`)
ENTRY_METHODS = ("row_tissue", "matrix_completion", "pairwise_regression", "cross_gene_regression", "iterative_ridge",
                 "chained_boosting", "local_regression", "tensor_factorisation", "promoter_composition", "gene_family")
#: methods that need several donors (a sample table)
DONOR_METHODS = ("tissue_donor", "pairwise_regression", "cross_gene_regression", "tensor_factorisation")
#: methods for a gene x tissue table (one donor) only
TABLE_METHODS = ("chained_boosting",)
#: methods that estimate an entry from the visible values of its own gene (across donors or tissues): where the
#: task hides whole genes (``genes``), a hidden gene has none, and each of them gives every hidden gene the same
#: value in a sample, which ``row_tissue`` (the tissue's level) and ``matrix_completion`` (the sample's level too)
#: already give. Measured on the medians ``genes`` task: one value per tissue for all 1,800 hidden genes, at 45% of
#: an evaluation's time (their tuning, fits and out-of-fold fits); ``tests/test_baselines.py`` checks the premise.
OWN_ROW_METHODS = ("tissue_donor", "pairwise_regression", "cross_gene_regression", "iterative_ridge",
                   "chained_boosting", "local_regression", "tensor_factorisation")


def not_applicable(name: str, n_donors: int, has_genomes: bool = False,
                   composition: np.ndarray | None = None, task: str | None = None,
                   gene_names: bool = False) -> str | None:
    """Why baseline ``name`` does not apply to a problem with ``n_donors`` donors (and personal genomes or not,
    promoter composition or not, gene symbols or not) under the evaluation ``task`` (None: any), or None when it
    does: the one rule that :func:`make_methods`, the start of ``local_regression`` and :func:`tune_settings`'
    candidates all follow."""
    if task == "genes" and name in OWN_ROW_METHODS:
        return ("reads a gene's own visible values, which the genes task hides: it would give every hidden gene the "
                "same value in a sample (as row_tissue and matrix_completion do)")
    if name == "elastic_net" and not has_genomes:
        return "needs personal genomes (inputs.variants)"
    if name in DONOR_METHODS and n_donors < 2:
        return "needs sample-level data with several donors"
    if name in TABLE_METHODS and n_donors > 1:
        # measured on GTEx v8 (docs/benchmarks.md): trees pooled over every gene's (gene, donor) deviations
        # fell far below iterative_ridge (across-donor Pearson 0.175 against 0.319) at ~50 s a round
        return "applies to a gene x tissue table (one donor); with sample-level data see iterative_ridge"
    if name == "promoter_composition" and (composition is None or np.isnan(composition).all()):
        return "needs promoter sequence (inputs.genome) for some genes"
    if name == "gene_family" and task not in (None, "genes"):
        return ("estimates a gene whose own values are all hidden (the genes task) from its family; where a gene's "
                "own visible values are there they say more (on the medians entries it moved iterative_ridge's RMSE "
                "by 0.003 at most in a linear blend: benchmarks/gene_family_diagnostics.py)")
    if name == "gene_family" and not gene_names:
        return "needs gene symbols (a gene_name in the genes table, or a symbol column such as a GCT's Description)"
    return None


def make_method(name: str, config: BaselinesConfig, *, seed: int = 0,
                composition: np.ndarray | None = None, family: FamilyLevels | None = None) -> Method:
    """One baseline by name with the settings of ``config`` (no applicability check: see :func:`make_methods`);
    ``family``: ``gene_family``'s levels of a gene range (:class:`GeneFamilyBaseline`)."""
    if name == "distance":
        return DistanceBaseline(config.distance_k, config.distance_offset)
    if name == "row_tissue":
        return RowTissueBaseline()
    if name == "matrix_completion":
        return MatrixCompletionBaseline(config.mc_rank, config.mc_shrinkage, config.mc_iterations)
    if name == "tissue_donor":
        return TissueDonorBaseline(config.donor_shrinkage)
    if name == "elastic_net":
        return ElasticNetBaseline(seed)
    if name == "pairwise_regression":
        return PairwiseRegressionBaseline(config.pr_min_donors, config.pr_prior)
    if name == "cross_gene_regression":
        return CrossGeneRegressionBaseline(config.xg_min_donors, config.xg_weight, config.xg_genes)
    if name == "iterative_ridge":
        return IterativeRidgeBaseline(config.ridge_alpha, config.ridge_iterations)
    if name == "local_regression":
        start = make_method(config.lls_start, config, seed=seed)
        ridge = make_method("iterative_ridge", config, seed=seed)
        return LocalRegressionBaseline(config.lls_k, config.lls_alpha, start, ridge)  # type: ignore[arg-type]
    if name == "chained_boosting":
        return ChainedBoostingBaseline(config.cb_rounds, config.cb_max_rows, config.ridge_alpha,
                                       config.ridge_iterations, seed, config.cb_bags, config.cb_max_depth)
    if name == "tensor_factorisation":
        return TensorFactorisationBaseline(config.tf_rank, config.tf_lambda, config.tf_iterations, seed)
    if name == "promoter_composition":
        if composition is None:
            raise ValueError("promoter_composition needs the promoter composition of every gene")
        return PromoterCompositionBaseline(composition, config.comp_alpha)
    if name == "gene_family":
        return GeneFamilyBaseline(config.fam_shrinkage, family)
    raise ValueError(f"unknown baseline {name!r}")


def make_methods(names: tuple[str, ...], config: BaselinesConfig, n_donors: int,
                 has_genomes: bool = False, seed: int = 0,
                 composition: np.ndarray | None = None, task: str | None = None,
                 gene_names: bool = False) -> tuple[list[Method], dict]:
    """The configured baselines, and the reasons for any that do not apply to this dataset.

    Args:
        names: method names; names that are not baselines (``hybrid``...) are ignored.
        config: their settings.
        n_donors: donors of the problem (methods of :data:`DONOR_METHODS` need at least 2).
        has_genomes: whether the problem has personal genomes (``elastic_net`` needs them).
        seed: seeds the methods that draw random numbers.
        composition: (G, F) promoter composition of the genes (:func:`promoter_composition`), for
            ``promoter_composition``; None: that method is skipped.
        task: the evaluation task whose hidden entries the methods estimate (``genes`` skips
            :data:`OWN_ROW_METHODS`); None: any.
        gene_names: whether the problem has gene symbols (``gene_family`` needs them).
    """
    methods: list[Method] = []
    skipped = {}
    for name in names:
        if name not in BASELINES:
            continue
        reason = not_applicable(name, n_donors, has_genomes, composition, task, gene_names)
        if reason:
            skipped[name] = reason
        else:
            methods.append(make_method(name, config, seed=seed, composition=composition))
    return methods, skipped


BASELINES = ("distance", "row_tissue", "matrix_completion", "tissue_donor", "elastic_net", "pairwise_regression",
             "cross_gene_regression", "iterative_ridge", "chained_boosting", "local_regression", "tensor_factorisation",
             "promoter_composition", "gene_family")

#: the grid each tunable method's settings are chosen from on the validation split
TUNING_GRIDS: dict[str, dict[str, tuple]] = {
    "distance": {"distance_k": (2, 5, 10, 16), "distance_offset": (100.0, 1000.0, 10000.0)},
    "matrix_completion": {"mc_rank": (1, 2, 3, 5, 8), "mc_shrinkage": (0.0, 0.01, 0.05)},
    "tissue_donor": {"donor_shrinkage": (0.0, 0.5, 1.0, 2.0, 5.0)},
    "pairwise_regression": {"pr_min_donors": (5, 10, 20, 40), "pr_prior": (0.0, 0.3, 1.0)},
    "cross_gene_regression": {"xg_min_donors": (20, 40), "xg_weight": (0.02, 0.05, 0.1, 0.2)},
    "iterative_ridge": {"ridge_alpha": (1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0)},
    # tuned after iterative_ridge (ENTRY_METHODS order), whose chosen penalty fills the rows it starts from
    "chained_boosting": {"cb_rounds": (1, 2, 3)},
    # tuned after both: it starts from the filled rows of one of them (shared by every candidate: shared_fill)
    "local_regression": {"lls_start": ("iterative_ridge", "chained_boosting"), "lls_k": (10, 20, 40, 80),
                         "lls_alpha": (10.0, 100.0)},
    "tensor_factorisation": {"tf_rank": (2, 4, 8, 16), "tf_lambda": (1.0, 10.0, 100.0)},
    "promoter_composition": {"comp_alpha": (0.1, 1.0, 10.0, 100.0, 1000.0)},
    "gene_family": {"fam_shrinkage": (0.3, 1.0, 3.0, 10.0, 30.0)},
}


def validation_mask(problem: VisibleProblem, task: str, fraction: float, seed: int, *,
                    whole_donors: bool = False) -> np.ndarray:
    """(G, S) bool: a validation split carved out of the *visible* entries, hidden as the task hides (whole genes,
    samples or donors, or single entries). Its seed is offset from the training folds' so the two differ."""
    return training_folds(problem, task, 1, fraction, seed + 104_729, whole_donors=whole_donors)[0]


@one_blas_thread
def tune_settings(problem: VisibleProblem, names: tuple[str, ...], config: BaselinesConfig, task: str, *,
                  seed: int = 0, whole_donors: bool = False, composition: np.ndarray | None = None,
                  k_neighbours: int = 16, max_entries: int = 60_000,
                  min_donors: int = 10) -> tuple[BaselinesConfig, dict]:
    """Choose each named method's settings from :data:`TUNING_GRIDS` on a validation split of the visible data.

    The split hides ``config.tune_fraction`` of the visible units as the task hides them
    (:func:`validation_mask`); each candidate is fitted on what is left and scored on the split's values (at most
    ``max_entries`` of them, drawn with ``seed``) by the task's headline metric
    (:data:`geximpute.science.comparisons.TASK_METRIC`: across-donor Pearson for ``samples``, RMSE for ``entries``,
    Pearson for ``genes``), so that each comparator is as strong as it can be on the figure it is compared on; RMSE
    decides where that metric is undefined. Hidden (evaluation) entries are not in ``problem`` and play no part.
    Methods are tuned in :data:`TUNING_GRIDS`' order, each with the settings chosen before it (``local_regression``
    starts from the fill of ``iterative_ridge`` or ``chained_boosting`` as chosen). A problem of more than
    ``config.tune_ranges`` gene ranges (:func:`fit_ranges`, the ranges imputation fits the methods on) is tuned on
    that many of them, drawn with ``seed`` among the ranges holding a gene the split can hide (not all on
    ``split.test_chroms``): the tuning's cost does not grow with the genome (``gene_family`` reads the whole
    problem's families there, as in every range: :func:`range_families`). On the ``samples`` task the entries
    scored are whole (gene, tissue) groups of the split (:func:`~geximpute.science.folds.fold_targets`), as its
    across-donor Pearson compares them; on the others single entries.

    Returns:
        (the config with every chosen setting, ``{method: {"metric": name, "chosen": {...}, "score": x, "rmse": y,
        "grid": [{setting..., "score", "rmse"}], "n_validation": n, "n_genes": genes fitted on}}``).
    """
    from geximpute.science.comparisons import TASK_METRIC, gene_stats, metric_from

    metric, higher = TASK_METRIC[task]
    has_genomes = problem.genomes is not None
    ranges = fit_ranges(problem, config.block_cells)
    n_genes = problem.n_genes
    whole, kept = problem, None
    # ranges whose every gene lies on the test chromosomes hold no validation entry (never re-hidden)
    eligible = np.array([i for i, (lo, hi) in enumerate(ranges)
                         if (np.asarray(problem.split[lo:hi]) != SPLITS.index("test")).any()], dtype=np.int64)
    if len(ranges) > config.tune_ranges and len(eligible):  # a sample of the ranges, fitted and scored as a whole
        picked = np.sort(np.random.default_rng(seed + 7_919).choice(eligible, min(config.tune_ranges, len(eligible)),
                                                                    replace=False))
        kept = np.concatenate([np.arange(*ranges[i]) for i in picked])
        problem = gene_subset(problem, kept)
        composition = None if composition is None else composition[kept]
        log.info("baselines: settings tuned on %d of %d gene ranges (%d of %d genes)", len(picked), len(ranges),
                 len(kept), n_genes)

    def headline(pred: np.ndarray, target: np.ndarray, gene: np.ndarray, sample: np.ndarray) -> float | None:
        uniq, code = np.unique(gene, return_inverse=True)
        stats = gene_stats(metric, pred, target, code, len(uniq), problem.tissue_index[sample], min_donors)
        value = float(metric_from(metric, stats.sum(axis=0)))
        return value if np.isfinite(value) else None

    mask = validation_mask(problem, task, config.tune_fraction, seed, whole_donors=whole_donors)
    scored = trainable(problem, mask)  # hidden as the task hides; scored off the test chromosomes
    gi, si = np.nonzero(scored)
    if len(gi) == 0:
        return config, {}
    if len(gi) > max_entries and task == "samples":
        # whole (gene, tissue) groups: single entries drawn from ~35 donors a group left 2-3 of each, under the
        # metric's min_donors, and the tuning fell back to RMSE
        gi, si = np.nonzero(fold_targets(scored, problem.tissue_index, max_entries, seed))
    elif len(gi) > max_entries:
        keep = np.sort(np.random.default_rng(seed).choice(len(gi), size=max_entries, replace=False))
        gi, si = gi[keep], si[keep]
    split = None
    if kept is not None and (whole.scaling is not None or ("gene_family" in names and whole.gene_names is not None)):
        split = np.zeros(whole.values.shape, bool)  # the split's entries in the whole problem
        split[kept] = mask
    # counts normalised again without the split's entries, from the whole problem (the sampled ranges are a part)
    factors = "auto" if split is None or whole.scaling is None else fold_factors(whole.scaling, whole.values, split)
    valid_problem = fold_problem(problem, mask, factors)

    def split_scale(values: np.ndarray, samples: np.ndarray) -> np.ndarray:
        """The split's values on its own scale (counts: its factors), as its candidates' estimates are."""
        ratio = fold_ratio(problem, valid_problem)
        if ratio is None:
            return np.asarray(values, np.float64)
        return problem.scaling.rescale_at(values, ratio[samples])

    truth = split_scale(problem.values[gi, si], si)
    family = None
    if "gene_family" in names and kept is not None and whole.gene_names is not None:
        # as the ranges are fitted: gene_family reads the whole problem's families (without the split's entries,
        # on the split's scale)
        values = whole.values
        if whole.scaling is not None:  # a fold of the whole problem (a view where its values are a file)
            whole_fold = fold_problem(whole, split, valid_problem.scaling.factors)
            values = whole_fold.values
        family = FamilyLevels(values, whole.gene_names, whole.tissue_index, len(whole.tissues),
                              hidden=split).part(kept)
        if whole.scaling is not None:
            forget_fold(whole_fold)
            del whole_fold
        del values
    del split
    records = None
    report: dict = {}
    chosen = config
    # in TUNING_GRIDS' order, whatever the order of ``names``: a method that starts from another's fill is tuned
    # after it, with its chosen settings
    for name in [n for n in TUNING_GRIDS if n in names]:
        grid = TUNING_GRIDS[name]
        if name not in BASELINES:
            continue
        methods, skipped = make_methods((name,), chosen, len(problem.donors), has_genomes, seed, composition, task,
                                        problem.gene_names is not None)
        if not methods:
            continue
        if name == "chained_boosting" and set(grid) == {"cb_rounds"}:
            # every candidate's fill from one run of the most rounds (the same fills as their own runs)
            method = make_method(name, chosen, seed=seed, composition=composition, family=family)
            method.fill_rounds(valid_problem, list(grid["cb_rounds"]))
        if name not in ENTRY_METHODS and records is None:
            genetic = np.zeros((problem.n_genes, len(problem.donors))) if has_genomes else None
            records = build_context(ContextIndex(valid_problem, genetic=genetic), gi, si,
                                    np.ones(len(gi), dtype=bool), k_neighbours)
        keys = list(grid)
        candidates = [dict(zip(keys, combo, strict=True)) for combo in _product(*(grid[k] for k in keys))]
        if "distance_k" in grid:
            candidates = [c for c in candidates if c["distance_k"] <= k_neighbours]
        # a start that does not apply here would be fitted as its fallback: the same candidate twice
        candidates = [c for c in candidates if not_applicable(c.get("lls_start", ""), len(problem.donors)) is None]
        rows = []
        for cand in candidates:
            method = make_method(name, dataclasses.replace(chosen, **cand), seed=seed, composition=composition,
                                 family=family)
            method.fit(valid_problem)
            if name in ENTRY_METHODS:
                pred, target, rg, rs = method.predict_entries(gi, si), truth, gi, si
            else:  # context records come back in their own order: score each against its own entry's value
                pred = np.asarray(method.predict(records), np.float64)
                rg, rs = records["gene_index"].to_numpy(), records["sample_index"].to_numpy()
                target = split_scale(problem.values[rg, rs], rs)
            pred = np.asarray(pred, np.float64)
            err = float(np.sqrt(np.mean((pred - target) ** 2)))
            if not np.isfinite(err):  # a setting that failed: recorded, never chosen
                rows.append({**cand, "score": None, "rmse": None})
                continue
            rows.append({**cand, "score": headline(pred, target, rg, rs), "rmse": err})
        valid = [r for r in rows if r["rmse"] is not None]
        if not valid:
            continue
        if metric != "rmse" and all(r["score"] is not None for r in valid):
            best = (max if higher else min)(valid, key=lambda r: r["score"])
            used = metric
        else:
            best, used = min(valid, key=lambda r: r["rmse"]), "rmse"
        settings = {k: best[k] for k in keys}
        chosen = dataclasses.replace(chosen, **settings)
        report[name] = {"metric": used, "chosen": settings, "score": best["score"] if used != "rmse" else best["rmse"],
                        "rmse": best["rmse"], "grid": rows, "n_validation": int(len(gi)),
                        "n_genes": problem.n_genes}
    forget_fold(valid_problem)  # the split's mask file, where the values are a file's
    return chosen, report


def _product(*axes: tuple) -> list[tuple]:
    return list(itertools.product(*axes))


#: fewest genes of a fit range (:func:`fit_ranges`): below this, the methods' shared parts (tissue offsets,
#: regressions across tissues, donor factors) would rest on too few genes
MIN_FIT_GENES = 256


def fit_ranges(problem: VisibleProblem, block_cells: int) -> list[tuple[int, int]]:
    """The consecutive gene ranges the entry methods are fitted on, one at a time (``baselines.block_cells``).

    Each range holds about ``block_cells`` gene x cell values, a cell being a sample or a donor-tissue pair,
    whichever the problem has more of (the methods' largest arrays are gene x sample and gene x donor x tissue), and
    at least :data:`MIN_FIT_GENES` genes; the ranges are as equal as can be. A problem within one range is fitted
    as a whole. The ranges depend on the problem's shape only, so every caller that fits the same problem cuts it
    the same way.
    """
    per_gene = max(problem.n_samples, len(problem.donors) * len(problem.tissues), 1)
    genes = max(MIN_FIT_GENES, block_cells // per_gene)
    n_ranges = max(1, -(-problem.n_genes // genes))
    cuts = np.linspace(0, problem.n_genes, n_ranges + 1).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]


def baseline_estimates(problem: VisibleProblem, gene_index: np.ndarray, sample_index: np.ndarray,
                       names: tuple[str, ...], config: BaselinesConfig, *, seed: int = 0,
                       composition: np.ndarray | None = None, task: str | None = None,
                       run: Callable[[list[tuple]], list[dict[str, np.ndarray]]] | None = None,
                       own_value_free: bool = False) -> dict[str, np.ndarray]:
    """Each applicable entry method (:data:`ENTRY_METHODS`; under ``task``, :func:`not_applicable`) fitted on
    ``problem`` and evaluated at the entries (``gene_index[i]``, ``sample_index[i]``): the head features of the
    hidden (evaluation) entries.

    The methods are fitted on each gene range of :func:`fit_ranges` separately (one range: the whole problem), and
    each entry gets the estimate of its gene's range: what :func:`range_estimates` computes for each range alone.
    ``gene_family`` reads the whole problem's families in every range (:func:`range_families`): a gene's family is
    spread over the genome, not over one run of neighbouring genes.

    Args:
        run: with several ranges, computes :func:`part_estimates` of each tuple of arguments, results in their
            order (the fit layer's runs each in a Ray task; every tuple holds the same family object); default one
            after another here.
        own_value_free: entries measured in ``problem`` estimated without their own values
            (:func:`range_estimates`).

    Returns:
        ``{name: (N,) float64}``; methods that do not apply to the problem are left out.
    """
    gene_index = np.asarray(gene_index, np.int64)
    sample_index = np.asarray(sample_index, np.int64)
    names = applicable_entry_methods(problem, names, config, composition, task)
    ranges = fit_ranges(problem, config.block_cells)
    if len(ranges) == 1:
        return range_estimates(problem, gene_index, sample_index, names, config, seed=seed, composition=composition,
                               own_value_free=own_value_free)
    family = range_families(problem, names, ranges)
    inside = [np.flatnonzero((gene_index >= lo) & (gene_index < hi)) for lo, hi in ranges]
    used = [(r, rows) for r, rows in zip(ranges, inside, strict=True) if len(rows)]
    calls = [(gene_rows(problem, lo, hi), gene_index[rows] - lo, sample_index[rows], names, config, seed,
              None if composition is None else composition[lo:hi], family, (lo, hi), own_value_free)
             for (lo, hi), rows in used]
    out: dict[str, np.ndarray] = {}
    results = run(calls) if run is not None else [part_estimates(*call) for call in calls]
    for (_, rows), part in zip(used, results, strict=True):
        for name, values in part.items():
            out.setdefault(name, np.full(len(gene_index), np.nan))[rows] = values
    return out


def part_estimates(rows: VisibleProblem, gene_index: np.ndarray, sample_index: np.ndarray, names: tuple[str, ...],
                   config: BaselinesConfig, seed: int, composition: np.ndarray | None, family: FamilyLevels | None,
                   genes: tuple[int, int], own_value_free: bool = False) -> dict[str, np.ndarray]:
    """:func:`range_estimates` of one gene range of a larger problem (``rows``: its genes and every sample;
    ``genes``: (lo, hi) there, where ``family``, that problem's :func:`range_families`, is read): one call of
    :func:`baseline_estimates`' ``run``."""
    return range_estimates(rows, gene_index, sample_index, names, config, seed=seed, composition=composition,
                           family=None if family is None else family.part(slice(*genes)),
                           own_value_free=own_value_free)


def entry_methods_skipped(problem: VisibleProblem, names: tuple[str, ...], config: BaselinesConfig,
                          composition: np.ndarray | None = None, task: str | None = None
                          ) -> tuple[tuple[str, ...], dict[str, str]]:
    """(the entry methods of ``names`` that apply to the whole of ``problem``, in order; why each other entry
    method of ``names`` does not) by :func:`make_methods`' checks."""
    names = tuple(n for n in names if n in ENTRY_METHODS)
    _, skipped = make_methods(names, config, len(problem.donors), problem.genomes is not None, 0, composition, task,
                              problem.gene_names is not None)
    return tuple(n for n in names if n not in skipped), skipped


def applicable_entry_methods(problem: VisibleProblem, names: tuple[str, ...], config: BaselinesConfig,
                             composition: np.ndarray | None = None, task: str | None = None) -> tuple[str, ...]:
    """The entry methods of ``names`` that apply to the whole of ``problem`` (:func:`make_methods`' checks), in
    order: a gene range is fitted with the methods of its problem, not only those that would apply to the range
    alone."""
    return entry_methods_skipped(problem, names, config, composition, task)[0]


def range_families(problem: VisibleProblem, names: tuple[str, ...], ranges: list[tuple[int, int]],
                   levels: FamilyLevels | None = None) -> FamilyLevels | None:
    """The whole problem's :class:`FamilyLevels` without its values, for ``gene_family`` fitted on each of several
    gene ``ranges`` (:meth:`FamilyLevels.part`); None where it is not among ``names``, the problem is one range or
    it has no symbols. Its size is (families x samples), not (genes x samples). ``levels``: the problem's, where the
    caller built them already (:func:`family_levels`)."""
    if "gene_family" not in names or len(ranges) < 2 or problem.gene_names is None:
        return None
    return (levels if levels is not None else family_levels(problem)).part(slice(None))


def range_estimates(problem: VisibleProblem, gene_index: np.ndarray, sample_index: np.ndarray,
                    names: tuple[str, ...], config: BaselinesConfig, *, seed: int = 0,
                    composition: np.ndarray | None = None, family: FamilyLevels | None = None,
                    own_value_free: bool = False) -> dict[str, np.ndarray]:
    """The entry methods ``names`` (:func:`applicable_entry_methods` of the problem this range was cut from)
    fitted on the whole of ``problem`` (one gene range) and evaluated at the entries (``gene_index[i]``,
    ``sample_index[i]``); ``{name: (N,) float64}``. ``family``: the levels of the range's genes in the problem it
    was cut from (:func:`range_families`), read by ``gene_family``.

    ``own_value_free``: an entry measured in ``problem`` is estimated without its own value, as a stacked head's
    training rows were (out of fold): the measured entries are cut into :data:`OWN_VALUE_FOLDS` random folds
    (drawn with ``seed``), each estimated by the methods fitted with its fold hidden (imputation with
    ``include_observed``; fitted on the visible values, some of them, such as ``iterative_ridge``'s fill, return
    the entry's own value, and the head stacked on them copied it). Unmeasured entries are estimated as without it.
    """
    gene_index = np.asarray(gene_index, np.int64)
    sample_index = np.asarray(sample_index, np.int64)
    measured = np.zeros(len(gene_index), bool)
    if own_value_free and len(gene_index):
        measured = ~np.isnan(np.asarray(problem.values[gene_index, sample_index], np.float64))
    if not measured.any():
        out = {}
        for name in names:
            method = make_method(name, config, seed=seed, composition=composition, family=family)
            method.fit(problem)
            out[method.name] = np.asarray(method.predict_entries(gene_index, sample_index), np.float64)
        return out
    out: dict[str, np.ndarray] = {}
    if family is not None and "gene_family" in names:
        # a larger problem's levels hold every visible value of the range (hiding a fold in the range's values does
        # not take it out of their sums); they take each gene's own value out by themselves (FamilyLevels.estimate)
        # where they read it, so they are read with every value in place
        out.update(range_estimates(problem, gene_index, sample_index, ("gene_family",), config, seed=seed,
                                   composition=composition, family=family))
        names = tuple(n for n in names if n != "gene_family")
    fold = np.full(len(gene_index), -1)
    fold[measured] = np.random.default_rng(seed + 7_727).integers(0, OWN_VALUE_FOLDS, int(measured.sum()))
    for k in range(-1, OWN_VALUE_FOLDS):
        rows = np.flatnonzero(fold == k)
        if not len(rows):
            continue
        fitted = problem
        if k >= 0:  # this fold's measured entries hidden
            values = np.array(problem.values, np.float32, copy=True)
            values[gene_index[rows], sample_index[rows]] = np.nan
            fitted = dataclasses.replace(problem, values=values)
        part = range_estimates(fitted, gene_index[rows], sample_index[rows], names, config, seed=seed,
                               composition=composition, family=family)
        for name, estimate in part.items():
            out.setdefault(name, np.full(len(gene_index), np.nan))[rows] = estimate
    return out


#: folds of the measured entries that :func:`range_estimates` estimates without their own values: each fit hides a
#: quarter of them, as a training fold on the ``genes`` and ``samples`` tasks hides a quarter of the visible units
OWN_VALUE_FOLDS = 4


@one_blas_thread
def out_of_fold_entries(problem: VisibleProblem, fold_masks: list[np.ndarray], names: tuple[str, ...],
                        config: BaselinesConfig, *, seed: int = 0,
                        composition: np.ndarray | None = None, task: str | None = None,
                        entries: list[tuple[np.ndarray, np.ndarray]] | None = None,
                        estimate: Callable[..., dict[str, np.ndarray]] | None = None,
                        progress: Callable[[], object] | None = None) -> list[dict[str, np.ndarray]]:
    """Out-of-fold estimates of the entry methods for training units: the head features of the training folds.

    For each fold k, every method is fitted on ``problem`` with fold k's entries hidden as well
    (:func:`geximpute.science.folds.fold_problem`) and predicts fold k's entries, exactly as the evaluation fits on
    the visible problem and predicts the hidden entries. No estimate of an entry ever saw that entry's value.

    Args:
        problem: the visible problem.
        fold_masks: disjoint (G, S) bool masks (e.g. :func:`geximpute.science.folds.training_folds`).
        names: methods wanted; only applicable :data:`ENTRY_METHODS` are computed (under ``task``: see
            :func:`not_applicable`).
        entries: per fold, the (gene, sample) indices to estimate, all inside its mask (the entries that have a
            training record, :func:`geximpute.science.folds.fold_targets`); default every entry of the mask, in
            ``np.nonzero`` order.
        estimate: :func:`baseline_estimates` or a function that computes the same (the fit layer's fits each gene
            range in a Ray task); default :func:`baseline_estimates`.
        progress: called after each fold.

    Returns:
        per fold, ``{name: (N_k,) float32}`` at its entries, in their order (an empty dict for a fold without
        entries): no (G, S) grid is made.
    """
    out: list[dict[str, np.ndarray]] = []
    for k, mask in enumerate(fold_masks):
        gi, si = np.nonzero(mask) if entries is None else entries[k]
        found: dict[str, np.ndarray] = {}
        if len(gi):
            fold = fold_problem(problem, mask)
            found = {name: np.asarray(est, np.float32) for name, est in (estimate or baseline_estimates)(
                fold, gi, si, names, config, seed=seed, composition=composition, task=task).items()}
            forget_fold(fold)  # a fold's mask file, where the values are a file's
            del fold
        out.append(found)
        if progress is not None:
            progress()
    return out


def out_of_fold_estimates(problem: VisibleProblem, fold_masks: list[np.ndarray], names: tuple[str, ...],
                          config: BaselinesConfig, **kwargs: Any) -> dict[str, np.ndarray]:
    """:func:`out_of_fold_entries` (same arguments) as ``{name: (G, S) float32}`` grids: the estimate at each
    estimated fold entry, NaN elsewhere (for inspection and checks of a small problem; ``fit-head`` keeps the
    values per entry)."""
    entries = kwargs.get("entries")
    out: dict[str, np.ndarray] = {}
    for k, found in enumerate(out_of_fold_entries(problem, fold_masks, names, config, **kwargs)):
        gi, si = np.nonzero(fold_masks[k]) if entries is None else entries[k]
        for name, est in found.items():
            out.setdefault(name, np.full(problem.values.shape, np.nan, dtype=np.float32))[gi, si] = est
    return out

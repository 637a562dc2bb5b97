"""The XGBoost head, fitted with Ray Train's ``XGBoostTrainer``: a point estimate and an 80% interval.

The head sees the network's embedding (when there is one) and the engineered features of
:mod:`geximpute.science.head_features`. Two boosters are fitted in the same Ray Train run: squared error for the
estimate and XGBoost's multi-quantile objective for the interval bounds. The bounds are then conformalised on held-out
training records (Romano, Patterson & Candes 2019): widened (or narrowed) by the quantile of
``max(lower - y, y - upper)`` that makes the interval cover the intended fraction of held-out values.

A head table of fewer than ``head.ray_min_rows`` rows (a small dataset, a test) is boosted by the same code in the
calling process: starting an ``XGBoostTrainer`` (placement group, worker, dataset split) costs more than such a fit.

When some input columns are themselves estimates of the target (the stacked layout: the network's prediction and the
baselines' out-of-fold estimates), both boosters start from their non-negative least-squares blend (:class:`Blend`,
XGBoost's ``base_margin``) instead of a constant: trees approximate "copy this column" only in steps, so a head
boosted from a constant can end below the best of its own inputs (measured: 0.462 against the network's 0.510 on the
planted-motif genes). From the blend, early stopping on held-out rows keeps only the trees that improve on it (by
their RMSE; on the ``genes`` task, judged by the Pearson, by their Pearson).

The head is fitted on rows that each went through one fold network (out of fold), but predicts the mean of its
outputs over all K fold networks: the network column it meets then carries less noise than the one it was fitted
on, and a blend fitted on single networks gives the weaker estimates too much weight beside the ensemble (measured
on the planted-motif genes: the K networks' mean 0.460, each alone 0.39-0.45, the head 0.458). With ``members``
(the held-out rows through every fold network: rows that no fold network trained on entries of) the fit accounts
for that:

- the blend used at prediction (``Blend.ensemble_coef``) is the same non-negative least squares with the network
  column's variance reduced by what averaging removes, ``s2 * (1 - 1/K)``, where ``s2`` is the networks' mean
  disagreement (variance between members) on the held-out rows (an errors-in-variables correction);
- the number of point trees is chosen on the held-out rows as the head is used: each row's outputs averaged over the
  K members, from the prediction blend.

- the interval is calibrated on the held-out rows the same way: their boosters' outputs averaged over the K
  members (:func:`_conformalised`).

Where the task compares the members of groups (``samples``: the donors of a gene in a tissue, by across-donor
Pearson), the blend's weights are fitted within the groups and a level column carries the groups' levels
(:meth:`Blend.fit_within`): on GTEx v8, one fit over all rows left the head below ``cross_gene_regression``, one of
its own inputs, on that metric (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from geximpute import schema as S
from geximpute.config import HeadConfig
from geximpute.errors import GeximputeError
from geximpute.runtime.console import stage
from geximpute.runtime.raytools import fit_trainer, progress_callbacks

log = logging.getLogger(__name__)

POINT_FILE = S.HEAD_POINT_FILE
INTERVAL_FILE = S.HEAD_INTERVAL_FILE


@dataclass
class Blend:
    """A non-negative least-squares blend of the input columns that estimate the target: where the head's boosting
    starts.

    Attributes:
        columns: indices of the estimate columns in the head's inputs.
        coef: (len(columns),) weights; intercept: the constant.
        fill: value of a row none of whose estimates is available (the training labels' mean).
        ensemble_coef, ensemble_intercept: the weights used at prediction, where the first column is the mean of K
            ensemble members' estimates (:meth:`fit`'s ``member_noise``); None: ``coef`` and ``intercept``.
        level, level_coef, ensemble_level_coef: a blend fitted within groups (:meth:`fit_within`): the feature
            column of the groups' level and its weight (at prediction: ``ensemble_level_coef``); None: no level.
    """

    columns: list[int]
    coef: list[float]
    intercept: float
    fill: float
    ensemble_coef: list[float] | None = None
    ensemble_intercept: float | None = None
    level: int | None = None
    level_coef: float = 0.0
    ensemble_level_coef: float | None = None

    @staticmethod
    def _filled(estimates: np.ndarray, fill: float) -> np.ndarray:
        """A missing estimate reads the mean of the row's other estimates (they estimate the same value)."""
        present = np.isfinite(estimates)
        count = present.sum(axis=1, keepdims=True)
        row_mean = np.where(count > 0, np.where(present, estimates, 0.0).sum(axis=1, keepdims=True)
                            / np.maximum(count, 1), fill)
        return np.where(present, estimates, row_mean)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, columns: list[int], *,
            member_noise: float = 0.0, groups: np.ndarray | None = None, level: int | None = None) -> Blend:
        """Non-negative least squares of ``labels`` on the columns, with a free intercept (Breiman's stacked
        regression): estimates of one value are often nearly collinear (several baselines fall back to the same
        tissue mean on a hidden gene), and unconstrained weights then cancel in large pairs that amplify their
        small differences on new rows (measured: weights +2.7 and -3.9 on two such columns).

        ``member_noise`` > 0: the first column is one ensemble member's estimate here and the members' mean at
        prediction, whose variance is smaller by ``member_noise`` (``s2 * (1 - 1/K)``, ``s2`` the variance between
        members); ``ensemble_coef`` is then the same fit with the first column's variance reduced by it.

        ``groups`` (one key per row, e.g. gene x tissue) and ``level`` (a feature column that is about constant
        within a group: its level, e.g. the gene's visible mean in the tissue): the weights are fitted for what
        varies *within* the groups (:meth:`fit_within`), the level column's weight and the constant for the rest."""
        from scipy.optimize import nnls

        fill = float(np.mean(labels))
        x = cls._filled(features[:, columns].astype(np.float64), fill)
        y = labels.astype(np.float64)
        if groups is not None and level is not None:
            return cls.fit_within(x, y, list(columns), fill, groups, features[:, level], level, member_noise)
        x_mean, y_mean = x.mean(axis=0), float(y.mean())
        coef, _ = nnls(x - x_mean, y - y_mean)
        blend = cls(list(columns), [float(c) for c in coef], float(y_mean - x_mean @ coef), fill)
        if member_noise > 0:
            ensemble = _nnls_corrected(x - x_mean, y - y_mean, member_noise)
            blend.ensemble_coef = [float(c) for c in ensemble]
            blend.ensemble_intercept = float(y_mean - x_mean @ ensemble)
        return blend

    @classmethod
    def fit_within(cls, x: np.ndarray, y: np.ndarray, columns: list[int], fill: float, groups: np.ndarray,
                   level_values: np.ndarray, level: int, member_noise: float = 0.0) -> Blend:
        """The blend for a target that is compared within groups (across the donors of one gene and tissue).

        One least-squares blend over all rows sets its weights mostly by the groups' levels, where every estimate
        is about as good, and not by how each follows the members of a group, where they differ: an estimate whose
        deviations are right but shrunk (many weak lines averaged) gets too little weight. Here the non-negative
        weights are fitted on the rows' deviations from their group's mean (estimates and labels alike), and the
        weight of the ``level`` feature column (the group's level, e.g. the gene's visible mean in the tissue) and
        the constant by least squares on what those weights leave, so that the blend's level follows the groups'.
        Rows of single-row groups carry no within-group information and count in the second step only.
        """
        from scipy.optimize import nnls

        _, code = np.unique(groups, return_inverse=True)
        count = np.bincount(code).astype(np.float64)

        def within(a: np.ndarray) -> np.ndarray:
            sums = np.stack([np.bincount(code, weights=a[:, j], minlength=len(count)) for j in range(a.shape[1])],
                            axis=1)
            return a - (sums / count[:, None])[code]

        xw, yw = within(x), within(y[:, None])[:, 0]
        lev = cls._level(level_values, x)

        def assemble(weights: np.ndarray) -> tuple[list[float], float, float]:
            rest = y - x @ weights
            (gamma, const), *_ = np.linalg.lstsq(np.column_stack([lev, np.ones(len(y))]), rest, rcond=None)
            return [float(c) for c in weights], float(gamma), float(const)

        weights, _ = nnls(xw, yw)
        coef, gamma, intercept = assemble(weights)
        blend = cls(list(columns), coef, intercept, fill, level=level, level_coef=gamma)
        if member_noise > 0:
            blend.ensemble_coef, blend.ensemble_level_coef, blend.ensemble_intercept = assemble(
                _nnls_corrected(xw, yw, member_noise))
        return blend

    @staticmethod
    def _level(values: np.ndarray, filled: np.ndarray) -> np.ndarray:
        """The level feature, where missing the mean of the row's (filled) estimates."""
        values = values.astype(np.float64)
        return np.where(np.isfinite(values), values, filled.mean(axis=1))

    def margin(self, features: np.ndarray, *, ensemble: bool = False) -> np.ndarray:
        """(N,) the blend's estimate of each row; ``ensemble``: with the prediction weights (``ensemble_coef``,
        when fitted), for rows whose first column is one member of the ensemble that is averaged."""
        x = self._filled(features[:, self.columns].astype(np.float64), self.fill)
        use_ensemble = ensemble and self.ensemble_coef is not None
        coef, intercept, level_coef = ((self.ensemble_coef, self.ensemble_intercept, self.ensemble_level_coef)
                                       if use_ensemble else (self.coef, self.intercept, self.level_coef))
        out = x @ np.asarray(coef) + float(intercept)
        if self.level is not None:
            out += float(level_coef) * self._level(features[:, self.level], x)
        return out

    def to_json(self) -> dict:
        return {"columns": self.columns, "coef": self.coef, "intercept": self.intercept, "fill": self.fill,
                "ensemble_coef": self.ensemble_coef, "ensemble_intercept": self.ensemble_intercept,
                "level": self.level, "level_coef": self.level_coef, "ensemble_level_coef": self.ensemble_level_coef}


def _nnls_corrected(x: np.ndarray, y: np.ndarray, noise: float) -> np.ndarray:
    """Non-negative least squares of centred ``y`` on centred ``x`` with the first column's variance reduced by
    ``noise``, solved on the Gram matrix through its Cholesky factor.

    The reduction is capped at 90% of the first column's variance that the other columns do not explain (the Schur
    complement of the rest of the Gram matrix): no more noise can be taken off a column than its own part, and the
    reduced Gram matrix stays positive definite (a cap at 90% of the whole variance let two nearly collinear
    columns make it indefinite, and the Cholesky factorisation fail)."""
    from scipy.optimize import nnls

    n = len(x)
    gram = x.T @ x
    if not np.trace(gram) > 0:  # nothing varies (every group a single row): no weight to correct
        return np.zeros(x.shape[1])
    cross = gram[0, 1:]
    explained = float(cross @ np.linalg.lstsq(gram[1:, 1:], cross, rcond=None)[0]) if len(cross) else 0.0
    own = max(gram[0, 0] - explained, 0.0)
    gram[0, 0] -= min(n * noise, 0.9 * own)
    gram += np.eye(len(gram)) * 1e-9 * np.trace(gram)  # collinear columns (baselines falling back alike)
    factor = np.linalg.cholesky(gram).T  # factor.T @ factor == gram
    coef, _ = nnls(factor, np.linalg.solve(factor.T, x.T @ y))
    return coef


def member_noise(members: list[np.ndarray], column: int, groups: np.ndarray | None = None,
                 fitted_groups: np.ndarray | None = None) -> float:
    """What averaging K members removes from the variance of ``column`` (one member's estimate): the mean over rows
    of the variance between the members' estimates, times ``1 - 1/K``; 0 with one member.

    With ``groups`` (one per row) each member's estimates are centred within their group first: the disagreement a
    blend fitted within groups (:meth:`Blend.fit_within`) sees, where members that differ by a constant per group
    do not disagree. Centring over a group of n rows keeps (1 - 1/n) of a row's own disagreement: each row's is
    scaled back by n / (n - 1) (a group of one row tells nothing), and with ``fitted_groups`` (the groups of the
    rows the blend is fitted on) brought to what their centring keeps, the mean of (1 - 1/m) over those rows (a
    held-out group is smaller than a training one: its disagreement read low, by half in groups of two)."""
    k = len(members)
    if k < 2 or not len(members[0]):
        return 0.0
    estimates = np.stack([m[:, column].astype(np.float64) for m in members])
    scale = np.ones(estimates.shape[1])
    if groups is not None:
        _, code = np.unique(groups, return_inverse=True)
        for row in estimates:
            known = np.isfinite(row)
            count = np.bincount(code[known], minlength=code.max() + 1)
            total = np.bincount(code[known], weights=row[known], minlength=code.max() + 1)
            row -= (total / np.maximum(count, 1))[code]  # in place; a NaN stays NaN
        size = np.bincount(code)[code].astype(np.float64)
        scale = np.where(size > 1, size / np.maximum(size - 1, 1), np.nan)
        if fitted_groups is not None and len(fitted_groups):
            _, fitted = np.unique(fitted_groups, return_inverse=True)
            scale = scale * float(np.mean(1 - 1 / np.bincount(fitted)[fitted]))
    spread = np.var(estimates, axis=0, ddof=1) * scale
    spread = spread[np.isfinite(spread)]
    return float(np.mean(spread)) * (1 - 1 / k) if len(spread) else 0.0


@dataclass
class HeadModel:
    """The fitted head.

    Attributes:
        point: booster of the estimate.
        interval: booster of the lower and upper quantiles (two outputs).
        conformal: amount added to the upper and subtracted from the lower bound.
        n_features: number of input columns.
        coverage: the intended coverage of the interval (0.8 for quantiles 0.1 and 0.9).
        blend: where both boosters start (None: from a constant).
        conformal_edges, conformal_bins: the conformal amount per bin of the estimate (:func:`conformal_amounts`):
            (B - 1,) increasing edges of the estimate and (B,) amounts, used instead of ``conformal``; None: one
            amount for every row.
    """

    point: object
    interval: object
    conformal: float
    n_features: int
    coverage: float
    blend: Blend | None = None
    conformal_edges: list[float] | None = None
    conformal_bins: list[float] | None = None

    def widening(self, estimate: np.ndarray) -> np.ndarray | float:
        """What the conformal step adds to the upper and takes from the lower bound of rows with this estimate."""
        if self.conformal_bins is None or self.conformal_edges is None:
            return self.conformal
        return np.asarray(self.conformal_bins)[np.searchsorted(np.asarray(self.conformal_edges), estimate,
                                                                side="right")]

    def predict(self, features: np.ndarray, *, ensemble: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(estimate, lower, upper), each (N,), from (N, n_features) features; ``ensemble``: the rows went through
        one of the fold networks whose outputs are averaged (the blend's prediction weights, :class:`Blend`)."""
        return self.widened(*self.raw(features, ensemble=ensemble))

    def raw(self, features: np.ndarray, *, ensemble: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(estimate, lower quantile, upper quantile) of the boosters, before the conformal step (:meth:`widened`)."""
        if features.shape[1] != self.n_features:
            raise ValueError(f"head expects {self.n_features} features, got {features.shape[1]}")
        # the interval booster has one output per quantile (head.quantiles holds two)
        margin = self.blend.margin(features, ensemble=ensemble) if self.blend is not None else None
        # in place, without a DMatrix: the same outputs, 7-13% less CPU per row (benchmarks/head_predict_cpu.py)
        point = self.point.inplace_predict(features, missing=np.nan, base_margin=margin)
        bounds = self.interval.inplace_predict(
            features, missing=np.nan, base_margin=None if margin is None else np.repeat(margin[:, None], 2, axis=1)
        ).reshape(len(features), 2)  # (N, 2) for N = 0 too
        return point, np.minimum(bounds[:, 0], bounds[:, -1]), np.maximum(bounds[:, 0], bounds[:, -1])

    def widened(self, point: np.ndarray, lower: np.ndarray, upper: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(estimate, lower, upper) of :meth:`raw`'s outputs (or their average over fold networks) after the
        conformal step for that estimate."""
        widening = self.widening(point)
        # a negative conformal amount (the quantile booster's band wider than its held-out rows needed) narrows
        # the band; it never turns it inside out nor leaves the estimate outside its own interval
        return point, np.minimum(lower - widening, point), np.maximum(upper + widening, point)

    def save(self, folder: Path) -> None:
        self.point.save_model(str(folder / POINT_FILE))
        self.interval.save_model(str(folder / INTERVAL_FILE))

    @classmethod
    def load(cls, folder: Path, conformal: float, n_features: int, coverage: float,
             blend: dict | None = None, conformal_edges: list[float] | None = None,
             conformal_bins: list[float] | None = None) -> HeadModel:
        import xgboost

        point, interval = xgboost.Booster(), xgboost.Booster()
        point.load_model(str(folder / POINT_FILE))
        interval.load_model(str(folder / INTERVAL_FILE))

        def number(x: float | None) -> float:  # head.json writes a non-finite figure as null
            return float("nan") if x is None else x

        return cls(point, interval, number(conformal), n_features, number(coverage),
                   Blend(**blend) if blend else None, conformal_edges,
                   None if conformal_bins is None else [number(x) for x in conformal_bins])


#: fewest calibration rows per bin of :func:`conformal_amounts` (else one amount for all rows)
MIN_BIN_ROWS = 100


def _conformal_quantile(score: np.ndarray, coverage: float) -> float:
    """The split-conformal amount of ``score`` (max(lower - y, y - upper) per row) for ``coverage``: its quantile at
    the finite-sample level ceil((n + 1) coverage) / n; 0 without rows."""
    n = len(score)
    if not n:
        return 0.0
    return float(np.quantile(score, min(1.0, np.ceil((n + 1) * coverage) / n)))


def conformal_amounts(estimate: np.ndarray, score: np.ndarray, coverage: float,
                      bins: int) -> tuple[float, list[float] | None, list[float] | None]:
    """(the amount over all rows, the bins' edges of the estimate, each bin's amount) of the conformal step.

    One amount for every row gives the intended coverage over all rows, but not within ranges of the estimate
    where the quantile booster's spread is off. With ``bins`` >= 2 the calibration rows are cut into that many bins
    of equal size by their estimate and each bin gets its own amount (Mondrian, or label-free group-conditional,
    conformal prediction: the coverage then holds within each bin of the estimate, which is known for every row,
    for rows exchangeable with the calibration rows). Measured on medians ``genes`` (docs/benchmarks.md): 0.73-0.85
    by quartile of the estimate, against 0.74-0.87 with one amount, where the calibration rows' genes (the
    validation chromosomes') differ from the hidden ones more than the bins do; 0.81 in each on v8. Bins of fewer than
    :data:`MIN_BIN_ROWS` rows, or edges that do not separate the rows (ties), give (amount, None, None)."""
    overall = _conformal_quantile(score, coverage)
    if bins < 2 or len(score) < bins * MIN_BIN_ROWS:
        return overall, None, None
    edges = np.quantile(estimate, np.arange(1, bins) / bins)
    which = np.searchsorted(edges, estimate, side="right")
    counts = np.bincount(which, minlength=bins)
    if np.any(np.diff(edges) <= 0) or counts.min() < MIN_BIN_ROWS:
        return overall, None, None
    return overall, [float(e) for e in edges], [_conformal_quantile(score[which == b], coverage)
                                               for b in range(bins)]


def _table(features: np.ndarray, labels: np.ndarray, margin: np.ndarray | None) -> pa.Table:
    cols = {f"f{i}": pa.array(features[:, i]) for i in range(features.shape[1])}
    cols["label"] = pa.array(labels.astype(np.float32))
    if margin is not None:
        cols["margin"] = pa.array(margin.astype(np.float32))
    return pa.table(cols)


def _xgb_params(config: dict, nthread: int) -> dict:
    return {
        "tree_method": "hist",
        "max_depth": config["max_depth"],
        "eta": config["eta"],
        "subsample": config["subsample"],
        "colsample_bytree": config["colsample_bytree"],
        "min_child_weight": config["min_child_weight"],
        "nthread": nthread,
        "seed": config["seed"],
    }


def _matrices(features: np.ndarray, labels: np.ndarray | None, margin: np.ndarray | None,
              n_quantiles: int) -> tuple[object, object]:
    """(matrix of the point booster, matrix of the interval booster): with a blend, each starts from it."""
    import xgboost

    if margin is None:
        plain = xgboost.DMatrix(features, label=labels, missing=np.nan)
        return plain, plain
    return (xgboost.DMatrix(features, label=labels, missing=np.nan, base_margin=margin),
            xgboost.DMatrix(features, label=labels, missing=np.nan,
                            base_margin=np.repeat(margin[:, None], n_quantiles, axis=1)))


def _boost(train: tuple[object, object], valid: object, config: dict) -> tuple[object, object, dict]:
    """Both boosters: the point estimate with early stopping on ``valid``, then the interval with as many rounds
    (judged by the Pearson, ``select`` "pearson": the point booster keeps the rounds boosted past its best, for
    :func:`_ensemble_rounds` to choose from).

    Args:
        train: (point matrix, interval matrix) of the training rows (:func:`_matrices`).
        valid: point matrix of the held-out rows.
        config: the loop config (:func:`_loop_config`).

    Returns:
        (point booster, interval booster, metrics).
    """
    import xgboost

    base = _xgb_params(config, config["nthread"])
    # each ray.train.report costs seconds: evaluation logs stay inside xgboost, one report at the end
    point = xgboost.train(
        {**base, "objective": "reg:squarederror", "eval_metric": "rmse"},
        train[0],
        num_boost_round=config["num_boost_round"],
        evals=[(valid, "valid")],
        early_stopping_rounds=30,
        verbose_eval=False,
        # early stopping follows the last metric: on a head judged by the Pearson, the Pearson
        custom_metric=_negative_pearson if config.get("select") == "pearson" else None,
    )
    rounds = point.best_iteration + 1
    best = point[:rounds]
    if config.get("select") != "pearson":
        point = best
    # judged by the Pearson (the genes task), the trees are chosen again afterwards on a pooled figure: the held-out
    # rows through every fold network and the training rows out of fold (_conformalised); the rounds boosted past
    # this one network's best (early_stopping_rounds more) stay for that choice, which a cut here would cap
    interval = xgboost.train(
        {**base, "objective": "reg:quantileerror", "quantile_alpha": np.asarray(config["quantiles"])},
        train[1],
        num_boost_round=rounds,
        verbose_eval=False,
    )
    return point, interval, {"rounds": rounds, "valid_rmse": float(best.eval(valid).split(":")[-1])}


def _negative_pearson(estimate: np.ndarray, matrix: object) -> tuple[str, float]:
    """XGBoost evaluation metric: minus the Pearson of the estimates (the blend's margin included) with the labels;
    0 where either is constant."""
    labels = matrix.get_label()
    if len(labels) < 3 or np.std(estimate) == 0 or np.std(labels) == 0:
        return "negative_pearson", 0.0
    return "negative_pearson", -float(np.corrcoef(estimate, labels)[0, 1])


def _head_worker(config: dict) -> None:
    """Ray Train worker of the XGBoost fit: both boosters, one report (with the checkpoint) at the end."""
    import ray.train

    def matrices(name: str) -> tuple[object, object]:
        frame = ray.train.get_dataset_shard(name).materialize().to_pandas()
        # plain arrays, no feature names: prediction later sees numpy arrays too
        features = frame.drop(columns=[c for c in ("label", "margin") if c in frame]).to_numpy(dtype=np.float32)
        margin = frame["margin"].to_numpy() if "margin" in frame else None
        return _matrices(features, frame["label"].to_numpy(), margin, len(config["quantiles"]))

    point, interval, metrics = _boost(matrices("train"), matrices("valid")[0], config)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            point.save_model(os.path.join(folder, POINT_FILE))
            interval.save_model(os.path.join(folder, INTERVAL_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def _loop_config(config: HeadConfig, seed: int, select: str = "rmse") -> dict:
    """The boosting settings of both boosters; ``select`` "pearson": the point booster stops early on the held-out
    rows' Pearson (:func:`_negative_pearson`), as its trees are then chosen, instead of their RMSE."""
    return {
        "select": select,
        "max_depth": config.max_depth,
        "eta": config.eta,
        "subsample": config.subsample,
        "colsample_bytree": config.colsample_bytree,
        "min_child_weight": config.min_child_weight,
        "num_boost_round": config.num_boost_round,
        "quantiles": list(config.quantiles),
        "nthread": max(1, int(round(config.cpus_per_worker))),
        "seed": seed,
    }


def averaged(head: HeadModel, members: list[np.ndarray], *, widen: bool = True
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(estimate, lower, upper) of the same rows through each member (fold network): the boosters' outputs averaged,
    then the conformal step for the averaged estimate (``widen``): how the stacked head predicts."""
    outputs = [head.raw(m) for m in members]
    mean = tuple(np.mean([o[i] for o in outputs], axis=0) for i in range(3))
    return head.widened(*mean) if widen else mean  # type: ignore[return-value]


#: fewest held-out rows of a group for its Pearson to count in :func:`within_pearson`
MIN_GROUP_ROWS = 10


def within_pearson(estimate: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Mean over the groups with at least :data:`MIN_GROUP_ROWS` rows of the Pearson between ``estimate`` and
    ``labels`` within the group: the ``samples`` task's across-donor Pearson
    (:func:`geximpute.science.comparisons.gene_stats`, each group as one gene in one tissue); NaN when no group has
    enough."""
    from geximpute.science.comparisons import gene_stats, metric_from

    if len(groups) == 0:
        return float("nan")
    _, code = np.unique(groups, return_inverse=True)
    stats = gene_stats("across_donors_pearson_mean", np.asarray(estimate, np.float64), np.asarray(labels, np.float64),
                       code, int(code.max(initial=-1)) + 1, np.zeros(len(code), np.int64), MIN_GROUP_ROWS)
    return float(metric_from("across_donors_pearson_mean", stats.sum(axis=0)))


def _grid(total: int) -> np.ndarray:
    """The numbers of trees :func:`_ensemble_rounds` scores: 1 to ``total``, at most 25 points."""
    return np.unique(np.linspace(1, total, min(total, 25)).round().astype(int))


def _ensemble_rounds(point: object, members: list[np.ndarray], labels: np.ndarray, blend: Blend | None,
                     groups: np.ndarray | None = None, select: str = "rmse",
                     folded: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None) -> object:
    """``point`` cut to the number of trees (1 to all, on a grid of at most 25) whose outputs, averaged over the
    members from the blend's prediction weights, have the smallest RMSE on ``labels``; with ``groups`` (the rows'
    gene x tissue keys on the ``samples`` task), the largest Pearson within groups (:func:`within_pearson`); with
    ``select`` "pearson" (the ``genes`` task), the largest Pearson over all rows: the figure the task is judged by
    (trees fitted for squared error can lower it while lowering the error).

    ``folded``: (estimates, labels, groups) of the head's training rows, ``estimates`` (len(grid), n) from trees
    that were not fitted on a row's unit (:func:`_cross_validated`, at the same grid): each grid point is then
    scored on the held-out rows and these rows together."""
    import xgboost

    total = point.num_boosted_rounds()
    matrices = [xgboost.DMatrix(m, missing=np.nan,
                                base_margin=None if blend is None else blend.margin(m, ensemble=True))
                for m in members]
    if folded is not None:
        labels = np.concatenate([labels, folded[1]])
        if groups is not None:
            groups = np.concatenate([groups, folded[2]])
    by_groups = groups is not None and np.isfinite(within_pearson(labels, labels, groups))
    by_pearson = not by_groups and select == "pearson" and len(labels) > 2 and np.std(labels) > 0
    best, best_score = total, np.inf
    for i, rounds in enumerate(_grid(total)):
        estimate = np.mean([point.predict(d, iteration_range=(0, int(rounds))) for d in matrices], axis=0)
        if folded is not None:
            estimate = np.concatenate([estimate, folded[0][i]])
        if by_groups:
            score = -within_pearson(estimate, labels, groups)
        elif by_pearson:
            score = -float(np.corrcoef(estimate, labels)[0, 1]) if np.std(estimate) > 0 else np.inf
        else:
            score = float(np.sqrt(np.mean((estimate - labels) ** 2)))
        if score < best_score:
            best, best_score = int(rounds), score
    measure = "Pearson within groups" if by_groups else "Pearson" if by_pearson else "RMSE"
    rows = "the held-out rows" + (f" and {len(folded[1])} training rows out of fold" if folded is not None else "")
    log.info("head: %d of %d trees kept on %s averaged over %d members (%s %.4f)", best, total, rows,
             len(members), measure, abs(best_score))
    return point[:best]


def _cross_validated(total: int, features: np.ndarray, labels: np.ndarray, margin: np.ndarray | None,
                     units: np.ndarray, config: HeadConfig, seed: int) -> np.ndarray:
    """(len(_grid(total)), N) estimates of each row by point trees boosted (``total`` rounds, the head's
    settings, from ``margin``) on the rows of the other ``config.cv_folds`` folds, cut at each grid point: the folds
    split ``units`` (one key per row: the task's unit, a gene on the ``genes`` task), so that no row is estimated by
    trees that saw a row of its unit. The blend ``margin`` comes from all the rows (a handful of weights fitted on
    every row; the trees are what the folds keep apart)."""
    import xgboost

    _, code = np.unique(units, return_inverse=True)
    fold = np.random.default_rng(seed).permutation(int(code.max(initial=-1)) + 1)[code] % config.cv_folds
    params = {**_xgb_params(_loop_config(config, seed), max(1, int(round(config.cpus_per_worker
                                                                         * config.num_workers)))),
              "objective": "reg:squarederror"}
    grid = _grid(total)
    out = np.empty((len(grid), len(labels)))
    for k in range(config.cv_folds):
        test = fold == k
        if not test.any():
            continue
        train = xgboost.DMatrix(features[~test], label=labels[~test], missing=np.nan,
                                base_margin=None if margin is None else margin[~test])
        booster = xgboost.train(params, train, num_boost_round=total)
        held = xgboost.DMatrix(features[test], missing=np.nan, base_margin=None if margin is None else margin[test])
        for i, rounds in enumerate(grid):
            out[i, test] = booster.predict(held, iteration_range=(0, int(rounds)))
    return out


def _conformalised(point: object, interval: object, features: np.ndarray, labels: np.ndarray, valid: np.ndarray,
                   config: HeadConfig, blend: Blend | None, members: list[np.ndarray] | None = None,
                   groups: np.ndarray | None = None, select: str = "rmse", units: np.ndarray | None = None,
                   seed: int = 0) -> HeadModel:
    """The head, its interval widened (or narrowed) to cover ``config.quantiles``' span of the ``valid`` rows; with
    ``members`` (the ``valid`` rows through each fold network), its trees chosen on their averaged outputs, as it
    will predict; with ``units`` (the task's unit of each row) and ``config.cv_folds`` >= 2, on the training rows
    too, each estimated out of fold (:func:`_cross_validated`).

    With ``members`` the interval is calibrated as the head predicts: each ``valid`` row's boosters' outputs
    averaged over the fold networks (:func:`averaged`), the conformal amounts by bin of that averaged estimate. No
    fold network trained on these rows, nor (since ``fb33df7``) pre-trained its CNN on their units, so the average
    is what a new row meets. (Calibrated on each row through its own fold network, as until session 39, the
    coverage was about the same: medians ``entries`` 0.83 either way, ``genes`` 0.80 against 0.79 now,
    docs/benchmarks.md; calibrated on the average at ``abfae09``, when the other networks' CNNs had pre-trained on
    those genes, it covered 0.73 of the planted-motif genes' hidden entries.) Without members, each row through
    its own network, with the blend it was fitted from."""
    coverage = config.quantiles[1] - config.quantiles[0]
    folded = None
    if units is not None and config.cv_folds >= 2 and (~valid).any():
        t0 = time.perf_counter()
        train = ~valid
        margin = None if blend is None else blend.margin(features[train])
        folded = (_cross_validated(point.num_boosted_rounds(), features[train], labels[train], margin,
                                   units[train], config, seed),
                  labels[train], None if groups is None else groups[train])
        log.info("head: %d-fold cross-validation of the tree count over %d training rows, %.1f s", config.cv_folds,
                 int(train.sum()), time.perf_counter() - t0)
    if members or folded is not None or ((select == "pearson" or groups is not None) and valid.any()):
        # a head without members (xgb_features_only) has its trees cut by the same measure, on its own rows: the
        # Pearson on `genes`, the Pearson within groups on `samples` (there it kept XGBoost's RMSE stopping, a
        # measure the hybrid beside it was not cut by)
        point = _ensemble_rounds(point, members or [features[valid]], labels[valid], blend,
                                 None if groups is None else groups[valid], select, folded)
    head = HeadModel(point, interval, 0.0, features.shape[1], coverage, blend)
    if members:
        estimate, lower, upper = averaged(head, members, widen=False)
    else:
        estimate, lower, upper = head.raw(features[valid], ensemble=False)
    score = np.maximum(lower - labels[valid], labels[valid] - upper)
    head.conformal, head.conformal_edges, head.conformal_bins = conformal_amounts(estimate, score, coverage,
                                                                                  config.conformal_bins)
    if head.conformal_bins is not None:
        log.info("head: conformal amounts by bin of the estimate %s (edges %s; %+.4f over all rows)",
                 np.round(head.conformal_bins, 4).tolist(), np.round(head.conformal_edges, 3).tolist(),
                 head.conformal)
    return head


def _blend_margin(features: np.ndarray, labels: np.ndarray, valid: np.ndarray, estimates: list[int] | None,
                  members: list[np.ndarray] | None = None, groups: np.ndarray | None = None,
                  level: int | None = None) -> tuple[Blend | None, np.ndarray | None]:
    """(the blend of the ``estimates`` columns fitted on the training rows, its margin on every row), or (None,
    None) without estimate columns: where both boosters start. With ``members``, the blend's prediction weights
    account for the first estimate column being averaged over them (:func:`member_noise`); with ``groups`` and
    ``level``, its weights are fitted within groups (:meth:`Blend.fit_within`)."""
    if not estimates:
        return None, None
    within = groups is not None and level is not None
    # within groups the blend's weights read the members' deviations from their group's mean: their disagreement
    # is measured there too (a per-group offset between members, removed by the centring, inflated the weight)
    noise = (member_noise(members, estimates[0], groups[valid] if within else None,
                          groups[~valid] if within else None) if members else 0.0)
    blend = Blend.fit(features[~valid], labels[~valid], estimates, member_noise=noise,
                      groups=groups[~valid] if within else None, level=level if within else None)
    if noise:
        log.info("head: members disagree by %.4f (variance removed by averaging); blend weights %s, at prediction %s",
                 noise, np.round(blend.coef, 3).tolist(), np.round(blend.ensemble_coef, 3).tolist())
    if within:
        log.info("head: blend fitted within groups, level column %d weighted %.3f", level, blend.level_coef)
    return blend, blend.margin(features)


#: fewest held-out rows the head stops its trees and calibrates its interval on (under 4 the finite-sample
#: conformal level exceeds 1 for an 80% interval)
MIN_HELD_OUT = 4


def _require_held_out(valid: np.ndarray, name: str) -> None:
    """Enough held-out rows (``valid``) and enough rows left to fit on, or an error that says what to give."""
    fit_on = int(np.count_nonzero(~valid))
    if fit_on < MIN_HELD_OUT:
        raise GeximputeError(
            f"{name}: {fit_on} row(s) of {len(valid)} left to fit the head on once its held-out rows are set aside; "
            f"at least {MIN_HELD_OUT} are needed (the task's units are held out by a seeded hash of about 15%, or "
            "every record on the validation chromosomes split.valid_chroms: a head fold on those alone has none "
            "left): give more samples, donors or genes, or other split.valid_chroms")
    n = int(np.count_nonzero(valid))
    if n < MIN_HELD_OUT:
        raise GeximputeError(
            f"{name}: {n} held-out row(s) to stop the head's trees and calibrate its interval on; at least "
            f"{MIN_HELD_OUT} are needed (the task's units are held out by a seeded hash of about 15%, or the "
            "validation chromosomes split.valid_chroms): give more samples, donors or genes")


def fit_head_in_process(
    features: np.ndarray,
    labels: np.ndarray,
    valid: np.ndarray,
    config: HeadConfig,
    *,
    seed: int = 0,
    estimates: list[int] | None = None,
    members: list[np.ndarray] | None = None,
    groups: np.ndarray | None = None,
    level: int | None = None,
    select: str = "rmse",
    units: np.ndarray | None = None,
) -> HeadModel:
    """The head of :func:`fit_head` (the same blend, boosters and conformal step) boosted in this process, without
    Ray Train: for small tables, where starting an ``XGBoostTrainer`` costs more than the fit."""
    _require_held_out(valid, "head")
    blend, margin = _blend_margin(features, labels, valid, estimates, members, groups, level)
    n_q = len(config.quantiles)
    train = _matrices(features[~valid], labels[~valid], None if margin is None else margin[~valid], n_q)
    held_out = _matrices(features[valid], labels[valid], None if margin is None else margin[valid], n_q)[0]
    point, interval, _ = _boost(train, held_out, _loop_config(config, seed, select))
    return _conformalised(point, interval, features, labels, valid, config, blend, members, groups, select,
                          units, seed)


def fit_head(
    features: np.ndarray,
    labels: np.ndarray,
    valid: np.ndarray,
    config: HeadConfig,
    storage: Path,
    *,
    seed: int = 0,
    name: str = "head",
    estimates: list[int] | None = None,
    members: list[np.ndarray] | None = None,
    groups: np.ndarray | None = None,
    level: int | None = None,
    select: str = "rmse",
    units: np.ndarray | None = None,
) -> HeadModel:
    """Fit the head with ``XGBoostTrainer`` and conformalise its interval on the ``valid`` rows; a table of fewer
    than ``config.ray_min_rows`` rows is boosted in this process instead (:func:`fit_head_in_process`).

    Args:
        features: (N, F) float32, NaN = missing.
        labels: (N,) values on the modelling scale.
        valid: (N,) bool, rows held out for early stopping and for calibrating the interval.
        config: head settings.
        storage: folder for Ray Train's run and checkpoint.
        seed: XGBoost seed.
        name: Ray Train run name.
        estimates: columns of ``features`` that estimate the target (out of fold): both boosters start from their
            non-negative least-squares blend, fitted on the training rows (:class:`Blend`); None or empty: from a
            constant.
        members: the ``valid`` rows' features through each of the K networks whose head outputs are averaged at
            prediction (rows in ``features[valid]``'s order; the first ``estimates`` column is the network's
            estimate): the blend's prediction weights and the number of trees are then fitted for that average
            and the interval calibrated on it (module docstring). None: for single rows as given.
        groups: (N,) a key per row (gene x tissue) whose members are compared with each other (the ``samples``
            task's across-donor Pearson), with ``level``, a feature column about constant within a group (its
            level): the blend's weights are then fitted within groups (:meth:`Blend.fit_within`). None: over all
            rows.
        select: how the number of trees is chosen on the ``valid`` rows after boosting (:func:`_ensemble_rounds`):
            "rmse" (with ``members``; without them XGBoost's early stopping on the same rows decides alone), or
            "pearson", the Pearson over all rows, for a head judged by it (the ``genes`` task), with or without
            ``members``; the point booster's early stopping then follows the Pearson too.
        units: (N,) the task's unit of each row (a gene on the ``genes`` task): with ``config.cv_folds`` >= 2 the
            number of trees is chosen on the training rows as well, each estimated by trees boosted on the other
            folds of units (:func:`_cross_validated`), beside the held-out rows; None: on the held-out rows alone.
    """
    _require_held_out(valid, name)
    if len(labels) < config.ray_min_rows:
        t0 = time.perf_counter()
        head = fit_head_in_process(features, labels, valid, config, seed=seed, estimates=estimates, members=members,
                                   groups=groups, level=level, select=select, units=units)
        log.info("head %s: %d rows (< head.ray_min_rows %d) boosted in this process, conformal %+.4f, %.1f s", name,
                 len(labels), config.ray_min_rows, head.conformal, time.perf_counter() - t0)
        return head

    import ray
    import xgboost
    from ray.train import RunConfig, ScalingConfig
    from ray.train.xgboost import XGBoostTrainer

    t0 = time.perf_counter()
    blend, margin = _blend_margin(features, labels, valid, estimates, members, groups, level)
    train_ds = ray.data.from_arrow(_table(features[~valid], labels[~valid],
                                          None if margin is None else margin[~valid]))
    valid_ds = ray.data.from_arrow(_table(features[valid], labels[valid], None if margin is None else margin[valid]))
    loop_config = _loop_config(config, seed, select)

    progress = stage(f"fit head: {name}", total=1, unit="fits")
    trainer = XGBoostTrainer(
        _head_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.num_workers,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        datasets={"train": train_ds, "valid": valid_ds},
        run_config=RunConfig(storage_path=str(storage.resolve()), name=name,
                             callbacks=progress_callbacks(progress.counter())),
    )
    with progress:
        result = fit_trainer(trainer)
    with result.checkpoint.as_directory() as folder:
        point, interval = xgboost.Booster(), xgboost.Booster()
        point.load_model(str(Path(folder) / POINT_FILE))
        interval.load_model(str(Path(folder) / INTERVAL_FILE))
    head = _conformalised(point, interval, features, labels, valid, config, blend, members, groups, select,
                          units, seed)
    log.info("head %s: %s, conformal %+.4f, starts from %s, %.1f s", name, result.metrics, head.conformal,
             f"a blend of columns {blend.columns} (weights {np.round(blend.coef, 3).tolist()})"
             if blend is not None else "a constant", time.perf_counter() - t0)
    return head

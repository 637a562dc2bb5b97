"""The hybrid model inside the evaluation protocol: networks, heads and ablations, fitted on training folds.

``fit_hybrid`` trains the CNN-transformer (and, for the ablations, its promoter-only and context-only variants)
on the labelled training folds, fits the XGBoost heads on the network embedding plus engineered features, and
returns a :class:`HybridModels` that predicts context records. With K >= 2 training folds the head is
cross-fitted: K networks, network k trained on every fold but k, each give their held-out fold's rows a
prediction and an embedding, so the head learns on K folds of out-of-fold network outputs and, beside them, on the
strong baselines' out-of-fold estimates (:func:`geximpute.science.baselines.out_of_fold_entries`): a head that sees
its inputs as they will be on hidden entries cannot do worse than the best of them. Methods it contributes to
``metrics.json``:

- ``hybrid``: XGBoost head on [network embedding, engineered features, network prediction, baseline estimates],
  with an 80% interval, averaged over the K fold networks;
- ``hybrid_network``: the mean of the K fold networks' own predictions;
- ``xgb_features_only``: the same head without the network (engineered features and baseline estimates);
- ``transformer_only``: the network without its promoter branch, its own regression output;
- ``cnn_only``: the network without its context transformer, its own regression output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from geximpute import schema as S
from geximpute.config import BaselinesConfig, Config
from geximpute.fit.head import fit_head
from geximpute.fit.models import HybridModels, genetic_offset
from geximpute.fit.pretrain import visible_levels
from geximpute.fit.train import NetworkRun, fold_dirs, holdout, holdout_grid, holdout_task, train_networks
from geximpute.model.inference import TrainedNetwork
from geximpute.runtime.console import stage
from geximpute.science.baselines import (
    ENTRY_METHODS,
    baseline_estimates,
    composition_of,
    out_of_fold_entries,
    part_estimates,
    tune_settings,
)
from geximpute.science.folds import training_folds
from geximpute.science.head_features import FEATURE_NAMES
from geximpute.science.problem import SPLITS, VisibleProblem
from geximpute.science.promoters import promoter_inputs

log = logging.getLogger(__name__)

#: the Ray Train run (under the storage folder) that trains the K fold networks
FOLD_RUN = "hybrid_folds"


def read_training(dirs: list[Path]) -> pa.Table:
    """The labelled training records of the given fold folders, each fold's sorted by entry: prepare's files are
    named in the order its Ray Data workers finished, which differs between runs, and the head's boosters sample
    rows by position (the same data and seed gave another head, another model version)."""
    return pa.concat_tables(_by_entry(pads.dataset(d, format="parquet", partitioning=S.record_partitioning())
                                      .to_table()) for d in dirs)


def _by_entry(table: pa.Table) -> pa.Table:
    if not {"gene_index", "sample_index"} <= set(table.column_names):  # a fold without records
        return table
    return table.sort_by([("gene_index", "ascending"), ("sample_index", "ascending")])


def record_entries(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(gene_index, sample_index) of the records of one training fold's folder: the entries of the fold that have
    a record (``train.max_fold_records`` may leave the rest of the fold without one); empty for a fold without
    records."""
    data = pads.dataset(folder, format="parquet", partitioning=S.record_partitioning())
    if "gene_index" not in data.schema.names:  # no records: the folder has no files to take a schema from
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    index = data.to_table(columns=["gene_index", "sample_index"])
    return index["gene_index"].to_numpy().astype(np.int64), index["sample_index"].to_numpy().astype(np.int64)


def split_folds(n_folds: int) -> tuple[list[int], list[int]]:
    """(folds that train the networks, folds that fit the heads).

    The head must see embeddings of records the network was not trained on, or it learns to trust an embedding
    that is better on its training rows than it will be on hidden entries (the classic stacking leak). With one
    fold there is nothing to separate, and both use it.
    """
    if n_folds == 1:
        log.warning("train.folds is 1: the head is fitted on the network's own training records")
        return [0], [0]
    return list(range(n_folds - 1)), [n_folds - 1]


def train_hybrid_network(
    config: Config,
    records_dir: Path,
    gene_ids: np.ndarray,
    n_tissues: int,
    storage: Path,
    *,
    use_promoter: bool = True,
    use_context: bool = True,
    name: str = "hybrid",
    problem: VisibleProblem | None = None,
) -> TrainedNetwork:
    """Train one network variant on the network folds of ``records_dir`` (``geximpute train``); with ``problem``
    its CNN pre-trains on every visible gene less the folds it does not train on (:func:`pretrain_levels`)."""
    return train_networks(config, [network_run(config, records_dir, name, problem, use_promoter, use_context)],
                          records_dir, gene_ids, n_tissues, storage=storage, name=name)[0]


def network_run(config: Config, records_dir: Path, name: str, problem: VisibleProblem | None = None,
                use_promoter: bool = True, use_context: bool = True) -> NetworkRun:
    """A network variant on the network folds of ``records_dir`` (:func:`split_folds`), its CNN's pre-training
    levels from ``problem`` when given."""
    net_folds, _ = split_folds(config.train.folds)
    levels = None
    if problem is not None:
        levels = pretrain_levels(config, problem, [f for f in range(config.train.folds) if f not in net_folds])
    return NetworkRun(name, fold_dirs(records_dir, net_folds), use_promoter, use_context, levels)


def fold_masks(config: Config, problem: VisibleProblem) -> list[np.ndarray]:
    """The training folds of ``problem`` as prepare cut them (:func:`geximpute.science.folds.training_folds` with
    the config's task, folds, seed and donor grouping)."""
    t = config.train
    return training_folds(problem, config.evaluation.task, t.folds, config.fold_fraction, config.seed,
                          whole_donors=config.evaluation.whole_donors)


def pretrain_levels(config: Config, problem: VisibleProblem, exclude: list[int],
                    masks: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(level, valid_gene) of the genes for a network's CNN pre-training: each gene's mean over the visible entries
    outside training folds ``exclude`` (the same folds as prepare's; ``masks``: those folds, when the caller has
    them already), genes of the validation chromosomes apart; genes of the test chromosomes get no level (no
    network learns from them).

    Without validation chromosomes the networks and the head hold out a seeded share of the task's units instead
    (:func:`geximpute.fit.train.holdout`): their entries are left out here too, so that no network's CNN has seen
    the level of a unit the head stops its trees and calibrates its interval on (in the ``genes`` task a held-out
    gene would otherwise reach the CNN of every network but the one whose fold holds it)."""
    valid_gene = problem.split == SPLITS.index("valid")
    test_gene = problem.split == SPLITS.index("test")
    hide = np.broadcast_to(test_gene[:, None], problem.values.shape) if test_gene.any() else None
    if exclude:
        if masks is None:
            masks = fold_masks(config, problem)
        folds = np.logical_or.reduce([masks[k] for k in exclude])
        hide = folds if hide is None else hide | folds
    # the head (cross-fitted: on every fold's records) holds out hashed units where none of its records lies on a
    # validation chromosome: hide them here whenever no fold's entry lies on a validation gene (every such gene
    # hidden by the evaluation, e.g.), not only when there is no validation gene
    if valid_gene.any() and masks is None:
        masks = fold_masks(config, problem)
    if not (valid_gene.any() and any(mask[valid_gene].any() for mask in masks)):
        held = holdout_grid(holdout_task(config), problem.n_genes, problem.n_samples, config.seed,
                            sample_donors=np.asarray(problem.donors, dtype=object)[problem.donor_index])
        hide = held if hide is None else hide | held
    return visible_levels(problem.values, hide, valid_gene)


def head_training(config: Config, records_dir: Path) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """(records, labels minus their genetic offset, validation rows) of the head folds of ``records_dir``."""
    _, head_folds = split_folds(config.train.folds)
    training = read_training(fold_dirs(records_dir, head_folds))
    labels = training["target"].to_numpy(zero_copy_only=False).astype(np.float64) - genetic_offset(training)
    use_chroms = bool(config.split.valid_chroms) and bool(
        np.any(training["split"].to_numpy(zero_copy_only=False) == "valid")
    )
    return training, labels, holdout(training, holdout_task(config), use_chroms, config.seed)


def fit_hybrid_head(
    config: Config, records_dir: Path, network: TrainedNetwork, gene_ids: np.ndarray, storage: Path
) -> tuple[HybridModels, np.ndarray, pa.Table]:
    """Fit the hybrid head on the head folds, over the embeddings of ``network`` (``geximpute fit-head``).

    Returns:
        the models, the engineered features of the head's training records, and those records.
    """
    t0 = time.perf_counter()
    promoters, lookup = promoter_inputs(records_dir, gene_ids, config.promoter.length)
    training, labels, valid = head_training(config, records_dir)
    models = HybridModels(config, promoters, lookup, network, head=None)  # type: ignore[arg-type]
    engineered, _, inputs = models.head_inputs(training)
    embed_seconds = round(time.perf_counter() - t0, 1)
    t = time.perf_counter()
    models.head = fit_head(inputs, labels, valid, config.head, storage, seed=config.seed, name="head_hybrid",
                           select=_tree_measure(config), units=_cv_units(config, training))
    models.seconds = {"embed_training": embed_seconds, "head_hybrid": round(time.perf_counter() - t, 1)}
    return models, engineered, training


def gene_composition(records_dir: Path, gene_ids: np.ndarray, upstream: int) -> np.ndarray:
    """(G, F) promoter composition of each gene of a prepare output (NaN rows for genes without a known window)."""
    return composition_of(gene_ids, pq.read_table(records_dir / "gene_promoters.parquet"),
                          pq.read_table(records_dir / "promoters.parquet", columns=["promoter_id", "sequence"]),
                          upstream)


def estimates_in_tasks(config: Config) -> Callable[..., dict[str, np.ndarray]]:
    """:func:`~geximpute.science.baselines.baseline_estimates` (same arguments, the same values) with each gene
    range (:func:`~geximpute.science.baselines.fit_ranges`) fitted in a Ray task of its own
    (:func:`~geximpute.science.baselines.part_estimates`), at most ``ray.concurrency`` at once with
    ``ray.cpus_per_task`` CPUs each, where Ray is running (else in this process): the out-of-fold fits of a
    genome-sized problem spread over the cluster's CPUs, each task holding its range's rows, as imputation fits
    them."""

    def run(calls: list[tuple]) -> list[dict[str, np.ndarray]]:
        import ray

        if not calls:
            return []
        family = calls[0][7]  # every range reads the same families: one copy in the object store
        family_ref = ray.put(family) if family is not None else None
        remote = ray.remote(part_estimates).options(num_cpus=config.ray.cpus_per_task)
        results: dict = {}
        pending: dict = {}
        for i, call in enumerate(calls):
            while len(pending) >= config.ray.concurrency:
                done, _ = ray.wait(list(pending), num_returns=1)
                results[pending.pop(done[0])] = ray.get(done[0])
            pending[remote.remote(*call[:7], family_ref, *call[8:])] = i
        for ref, i in pending.items():
            results[i] = ray.get(ref)
        return [results[i] for i in range(len(calls))]

    def estimate(*args: object, **kwargs: object) -> dict[str, np.ndarray]:
        import ray

        return baseline_estimates(*args, **kwargs, run=run if ray.is_initialized() else None)  # type: ignore[arg-type]

    return estimate


@dataclass
class FoldEstimates:
    """The baselines' out-of-fold estimates at each training fold's records' entries (:func:`stacked_baselines`):
    one value per record and method, no (genes x samples) grid.

    Attributes:
        names: the methods, in the order of :meth:`columns`.
        entries: per fold, the (gene_index, sample_index) of the values.
        values: per fold, ``{name: (N_k,) float32}`` in ``entries``' order (a method a fold lacks reads NaN).
        n_samples: the problem's samples (to key an entry by gene and sample).
    """

    names: list[str]
    entries: list[tuple[np.ndarray, np.ndarray]]
    values: list[dict[str, np.ndarray]]
    n_samples: int

    def columns(self, fold: int, records: pa.Table) -> np.ndarray:
        """(N, len(names)) float32: the estimates of fold ``fold`` at each record's (``gene_index``,
        ``sample_index``), NaN for a record the fold has none of."""
        out = np.full((records.num_rows, len(self.names)), np.nan, np.float32)
        gi, si = self.entries[fold]
        if not self.names or not records.num_rows or not len(gi):
            return out
        keys = gi.astype(np.int64) * self.n_samples + si
        order = np.argsort(keys, kind="stable")
        want = (records["gene_index"].to_numpy().astype(np.int64) * self.n_samples
                + records["sample_index"].to_numpy().astype(np.int64))
        at = order[np.minimum(np.searchsorted(keys[order], want), len(keys) - 1)]
        hit = keys[at] == want
        for j, name in enumerate(self.names):
            if name in self.values[fold]:
                out[hit, j] = self.values[fold][name][at[hit]]
        return out


def stacked_baselines(config: Config, problem: VisibleProblem, records_dir: Path, *, visible_grids: bool = True
                      ) -> tuple[FoldEstimates, dict[str, np.ndarray | None]]:
    """(out-of-fold estimates, all-visible grids ``{name: (G, S) float32}``) of the entry baselines, same names.

    The out-of-fold estimates are, at each training record's entry of fold k, those of a baseline fitted with
    fold k hidden as well: the same folds as prepare's (:func:`geximpute.science.folds.training_folds`, same
    arguments), so a head row's baseline features never saw its label. The all-visible grid is the baselines
    fitted on the whole visible problem, as for hidden entries; neither sees a hidden value. Without
    ``visible_grids`` (a bundle, which fits its baselines where it predicts) each name maps to None.
    """
    masks = fold_masks(config, problem)
    composition = gene_composition(records_dir, problem.gene_ids, config.promoter.upstream)
    task = config.evaluation.task  # the folds hide units as the task does: on `genes`, whole genes
    entries = [record_entries(folder) for folder in fold_dirs(records_dir, list(range(len(masks))))]
    estimate = estimates_in_tasks(config)
    with stage("baselines: out-of-fold estimates of the training folds", total=len(masks), unit="folds") as progress:
        values = out_of_fold_entries(problem, masks, ENTRY_METHODS, config.baselines, seed=config.seed,
                                     composition=composition, task=task, entries=entries, estimate=estimate,
                                     progress=progress.advance)
    names = [n for n in ENTRY_METHODS if any(n in fold for fold in values)]
    if not visible_grids:
        return FoldEstimates(names, entries, values, problem.n_samples), dict.fromkeys(names)
    shape = problem.values.shape
    gi, si = (part.ravel() for part in np.indices(shape))
    full = estimate(problem, gi, si, ENTRY_METHODS, config.baselines, seed=config.seed, composition=composition,
                    task=task)
    names = [n for n in names if n in full]
    return (FoldEstimates(names, entries, values, problem.n_samples),
            {n: full[n].reshape(shape).astype(np.float32) for n in names})


def fold_network_runs(config: Config, records_dir: Path, problem: VisibleProblem | None = None) -> list[NetworkRun]:
    """What :func:`train_fold_networks` trains: with K >= 2 training folds, K runs, run k on every fold but k; with
    one fold, one. With ``problem`` (the visible problem the folds were cut from) run k's CNN pre-trains on the
    levels of every visible gene outside fold k (computed here: the runs no longer need ``problem``); without it,
    on its training records' genes."""
    n_folds = config.train.folds
    if n_folds == 1:
        return [network_run(config, records_dir, "hybrid", problem)]
    runs = []
    masks = None if problem is None else fold_masks(config, problem)
    for k in range(n_folds):
        others = [f for f in range(n_folds) if f != k]
        levels = pretrain_levels(config, problem, [k], masks) if problem is not None else None
        runs.append(NetworkRun(f"hybrid_fold{k}", fold_dirs(records_dir, others), levels=levels))
    return runs


def train_fold_networks(config: Config, records_dir: Path, gene_ids: np.ndarray, n_tissues: int,
                        storage: Path, problem: VisibleProblem | None = None, *,
                        runs: list[NetworkRun] | None = None) -> list[TrainedNetwork]:
    """The networks the head is stacked on (``geximpute train``): with K >= 2 training folds, K networks, network k
    trained on every fold but k, so that each fold gets out-of-fold network outputs; with one fold, one network.
    With ``problem`` (the visible problem the folds were cut from) network k's CNN pre-trains on the levels of every
    visible gene outside fold k; without it, on its training records' genes. ``runs``: those of
    :func:`fold_network_runs`, made before (``problem`` is then not read)."""
    if runs is None:
        runs = fold_network_runs(config, records_dir, problem)
    if len(runs) == 1:
        return train_networks(config, runs, records_dir, gene_ids, n_tissues, storage=storage, name="hybrid")
    log.info("hybrid: training %d fold networks in one Ray Train run (network k on every fold but k)", len(runs))
    return train_networks(config, runs, records_dir, gene_ids, n_tissues, storage=storage, name=FOLD_RUN)


#: the methods whose settings the head's engineered features read (``est_distance`` and the inverse-distance
#: columns: ``distance``'s; ``est_tissue_donor``: ``tissue_donor``'s), beside the stacked baselines of
#: :data:`~geximpute.science.baselines.ENTRY_METHODS`
HEAD_FEATURE_METHODS = ("distance", "tissue_donor")


def head_tuned_methods(also: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The methods a hybrid's settings are tuned for (its stacked baselines and the methods its engineered
    features read), then ``also``: one list for ``fit-head`` and ``evaluate``, so that the hybrid an evaluation
    scores reads the settings a bundle of the same data would."""
    return tuple(dict.fromkeys((*ENTRY_METHODS, *HEAD_FEATURE_METHODS, *also)))


def tuned_baselines(config: Config, problem: VisibleProblem, composition: np.ndarray | None,
                    methods: tuple[str, ...] | list[str] | None = None) -> tuple[BaselinesConfig, dict]:
    """The baselines' settings, chosen on a validation split of the visible data when ``baselines.tune``
    (:func:`geximpute.science.baselines.tune_settings`), and the tuning report (empty when not tuned).

    Args:
        methods: the methods whose settings are tuned (default ``evaluation.methods``).
    """
    if not config.baselines.tune:
        return config.baselines, {}
    methods = list(config.evaluation.methods if methods is None else methods)
    with stage("baselines: tune settings on a visible validation split", total=1, unit="passes") as progress:
        chosen, tuning = tune_settings(problem, methods, config.baselines, config.evaluation.task,
                                       seed=config.evaluation.seed, whole_donors=config.evaluation.whole_donors,
                                       composition=composition, k_neighbours=config.context.k_neighbours,
                                       min_donors=config.evaluation.min_donors)
        progress.advance()
    for name, row in tuning.items():
        log.info("baselines: %s settings %s (validation %s %.4f, RMSE %.4f, on %d visible entries)", name,
                 row["chosen"], row["metric"], row["score"], row["rmse"], row["n_validation"])
    return chosen, tuning


def fit_hybrid(
    config: Config,
    records_dir: Path,
    gene_ids: np.ndarray,
    n_tissues: int,
    storage: Path,
    *,
    ablations: bool = True,
    problem: VisibleProblem | None = None,
    networks: list[TrainedNetwork] | None = None,
    visible_grids: bool = True,
) -> HybridModels:
    """Cross-fit the hybrid on the K training folds (see the module docstring); with ``problem`` (the visible
    problem the folds were cut from) the head also reads the baselines' out-of-fold estimates. With ``ablations``
    also the promoter-only and context-only networks (trained on the first K - 1 folds, as
    :func:`train_hybrid_network`) and the head without the network. With one fold, the network and the head share
    it (:func:`split_folds`). ``networks``: the fold networks of :func:`train_fold_networks`, already trained
    (default: trained here). ``visible_grids``: fit the baselines on the whole visible problem too, for the models
    to predict its hidden entries (``evaluate``); a bundle, which fits them where it predicts, does without."""
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    n_folds = config.train.folds
    if networks is not None and len(networks) != n_folds:
        raise ValueError(f"{len(networks)} fold networks for train.folds = {n_folds}; train them with this config")

    feature_estimates: list[int] = []  # the single-fold layout has no estimate columns
    groups, feature_level = None, None
    if n_folds == 1:
        if networks is None:
            t = time.perf_counter()
            networks = [train_hybrid_network(config, records_dir, gene_ids, n_tissues, storage, problem=problem)]
            seconds["train_hybrid"] = round(time.perf_counter() - t, 1)
        single = networks[0]
        models, engineered, training = fit_hybrid_head(config, records_dir, single, gene_ids, storage)
        seconds.update(models.seconds)
        features = engineered
    else:
        if networks is None:
            t = time.perf_counter()
            networks = train_fold_networks(config, records_dir, gene_ids, n_tissues, storage, problem)
            seconds["train_hybrid_folds"] = round(time.perf_counter() - t, 1)
        fold_networks = list(networks)
        t = time.perf_counter()
        promoters, lookup = promoter_inputs(records_dir, gene_ids, config.promoter.length)
        models = HybridModels(config, promoters, lookup, fold_networks[0], head=None,  # type: ignore[arg-type]
                              fold_networks=fold_networks, stacked=True)
        oof: FoldEstimates | None = None
        if problem is not None:
            oof, models.baselines = stacked_baselines(config, problem, records_dir, visible_grids=visible_grids)
            seconds["baselines_out_of_fold"] = round(time.perf_counter() - t, 1)
            log.info("hybrid: head reads the out-of-fold estimates of %s", ", ".join(oof.names) or "no baseline")
        t = time.perf_counter()
        parts = [read_training(fold_dirs(records_dir, [k])) for k in range(n_folds)]
        inputs, engineered_parts, baseline_parts = [], [], []
        for k, part in enumerate(parts):
            engineered = models.engineered(part)
            base = oof.columns(k, part) if oof is not None else np.zeros((part.num_rows, 0), np.float32)
            _, _, x = models.head_inputs(part, fold_networks[k], engineered=engineered, baselines=base)
            inputs.append(x)
            engineered_parts.append(engineered)
            baseline_parts.append(base)
        training = pa.concat_tables(parts, promote_options="default")
        engineered = np.vstack(engineered_parts)
        features = np.hstack([engineered, np.vstack(baseline_parts)]).astype(np.float32)
        labels = training["target"].to_numpy(zero_copy_only=False).astype(np.float64) - genetic_offset(training)
        valid = _head_holdout(config, training)
        members = _held_out_members(models, parts, valid, inputs, engineered_parts, baseline_parts)
        seconds["embed_training"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        # the last columns of the stacked layout are estimates of the target: the network's prediction and the
        # baselines' (geximpute.fit.models.HybridModels.head_inputs); the head boosts from their blend
        n_base = baseline_parts[0].shape[1]
        n_in = inputs[0].shape[1]
        groups, level = _within_groups(config, training)
        n_embedding = n_in - engineered.shape[1] - 1 - n_base  # inputs: embedding, engineered, network, baselines
        models.head = fit_head(np.vstack(inputs), labels, valid, config.head, storage, seed=config.seed,
                               name="head_hybrid", estimates=list(range(n_in - 1 - n_base, n_in)), members=members,
                               groups=groups, level=None if level is None else n_embedding + level,
                               select=_tree_measure(config), units=_cv_units(config, training))
        seconds["head_hybrid"] = round(time.perf_counter() - t, 1)
        feature_estimates = list(range(features.shape[1] - n_base, features.shape[1]))
        feature_level = level
    models.head_rows = training.num_rows
    if ablations:
        t = time.perf_counter()
        labels = training["target"].to_numpy(zero_copy_only=False).astype(np.float64) - genetic_offset(training)
        models.features_head = fit_head(features, labels, _head_holdout(config, training), config.head, storage,
                                        seed=config.seed, name="head_features_only", estimates=feature_estimates,
                                        groups=groups, level=feature_level, select=_tree_measure(config),
                                        units=_cv_units(config, training))
        seconds["head_features_only"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        runs = [network_run(config, records_dir, "transformer_only", problem, use_promoter=False),
                network_run(config, records_dir, "cnn_only", problem, use_context=False)]
        trained = train_networks(config, runs, records_dir, gene_ids, n_tissues, storage=storage, name="ablations")
        models.ablations = {run.name: network for run, network in zip(runs, trained, strict=True)}
        seconds["train_ablations"] = round(time.perf_counter() - t, 1)
    seconds["fit_total"] = round(time.perf_counter() - t0, 1)
    models.seconds = seconds
    log.info("hybrid: fitted in %.0f s (%s)", seconds["fit_total"], seconds)
    return models


def _held_out_members(models: HybridModels, parts: list[pa.Table], valid: np.ndarray, inputs: list[np.ndarray],
                      engineered: list[np.ndarray], baselines: list[np.ndarray]) -> list[np.ndarray] | None:
    """The head's held-out rows through every fold network: one (V, F) input array per network, rows in the order
    of the held-out rows of the concatenated ``parts`` (fold k's rows already went through network k: ``inputs``).
    No fold network trained on these rows (:func:`geximpute.fit.train.holdout` holds out the same units in every
    network's training on entries, and :func:`pretrain_levels` leaves them out of every CNN's pre-training), so
    their spread between networks is what averaging them removes on new rows.
    None without held-out rows."""
    if not valid.any():
        return None
    starts = np.cumsum([0] + [p.num_rows for p in parts])
    members: list[list[np.ndarray]] = [[] for _ in models.fold_networks]
    for k, part in enumerate(parts):
        rows = valid[starts[k]:starts[k + 1]]
        if not rows.any():
            continue
        held = part.filter(pa.array(rows))
        for j, network in enumerate(models.fold_networks):
            if j == k:
                members[j].append(inputs[k][rows])
            else:
                members[j].append(models.head_inputs(held, network, engineered=engineered[k][rows],
                                                     baselines=baselines[k][rows])[2])
    return [np.vstack(m) for m in members]


def _within_groups(config: Config, training: pa.Table) -> tuple[np.ndarray | None, int | None]:
    """(a gene x tissue key per training row, the index of ``tissue_mean`` among the engineered features) when the
    task hides whole samples, else (None, None): there the hybrid is judged by how it orders the donors of each gene
    and tissue (across-donor Pearson), and its blend is fitted for that (:meth:`geximpute.fit.head.Blend.fit_within`);
    ``tissue_mean`` (the gene's mean in the tissue over the other donors) carries each group's level."""
    if config.evaluation.task != "samples":
        return None, None
    gene = training["gene_index"].to_numpy(zero_copy_only=False).astype(np.int64)
    tissue = training["tissue_index"].to_numpy(zero_copy_only=False).astype(np.int64)
    return gene * (int(tissue.max(initial=0)) + 1) + tissue, FEATURE_NAMES.index("tissue_mean")


def _tree_measure(config: Config) -> str:
    """How the head's number of trees is chosen on its held-out rows (:func:`geximpute.fit.head.fit_head`'s
    ``select``): by the figure the task is judged by, as the baselines' settings are
    (:func:`geximpute.science.baselines.tune_settings`): the Pearson over all rows on the ``genes`` task, RMSE on
    ``entries``; on ``samples`` the Pearson within (gene, tissue) groups, chosen through the head's groups."""
    return "pearson" if config.evaluation.task == "genes" else "rmse"


def _cv_units(config: Config, training: pa.Table) -> np.ndarray | None:
    """The gene of each training row on the ``genes`` task, whose head also chooses its trees by cross-validation
    over its training genes (``head.cv_folds``); None elsewhere: there the held-out units (15% of the samples or
    entries, or the validation chromosomes) are many, and the choice rests on them alone."""
    if config.evaluation.task != "genes":
        return None
    return training["gene_index"].to_numpy(zero_copy_only=False)


def _head_holdout(config: Config, training: pa.Table) -> np.ndarray:
    """Rows of the head's training records held out for early stopping and the interval's calibration."""
    use_chroms = bool(config.split.valid_chroms) and bool(
        np.any(training["split"].to_numpy(zero_copy_only=False) == "valid")
    )
    return holdout(training, holdout_task(config), use_chroms, config.seed)

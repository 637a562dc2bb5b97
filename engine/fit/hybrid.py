"""The hybrid model inside the evaluation protocol: networks, heads and ablations, fitted on training folds.

``fit_hybrid`` trains the CNN-transformer (and, for the ablations, its promoter-only and context-only variants)
on the labelled training folds, fits the XGBoost heads on the network embedding plus engineered features, and
returns a :class:`HybridModels` that predicts context records. Methods it contributes to ``metrics.json``:

- ``hybrid``: XGBoost head on [network embedding, engineered features], with an 80% interval;
- ``xgb_features_only``: the same head on the engineered features alone;
- ``transformer_only``: the network without its promoter branch, its own regression output;
- ``cnn_only``: the network without its context transformer, its own regression output.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from engine.config import Config
from engine.fit.head import fit_head
from engine.fit.models import HybridModels, genetic_offset
from engine.fit.train import fold_dirs, holdout, train_network
from engine.model.inference import TrainedNetwork
from engine.science.promoters import promoter_inputs

log = logging.getLogger(__name__)

def read_training(dirs: list[Path]) -> pa.Table:
    """The labelled training records of the given fold folders."""
    return pa.concat_tables(pads.dataset(d, format="parquet", partitioning="hive").to_table() for d in dirs)


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
) -> TrainedNetwork:
    """Train one network variant on the network folds of ``records_dir`` (``geximpute train``)."""
    net_folds, _ = split_folds(config.train.folds)
    return train_network(config, fold_dirs(records_dir, net_folds), records_dir, gene_ids, n_tissues,
                         use_promoter=use_promoter, use_context=use_context, storage=storage, name=name)


def head_training(config: Config, records_dir: Path) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """(records, labels minus their genetic offset, validation rows) of the head folds of ``records_dir``."""
    _, head_folds = split_folds(config.train.folds)
    training = read_training(fold_dirs(records_dir, head_folds))
    labels = training["target"].to_numpy(zero_copy_only=False).astype(np.float64) - genetic_offset(training)
    use_chroms = bool(config.split.valid_chroms) and bool(
        np.any(training["split"].to_numpy(zero_copy_only=False) == "valid")
    )
    return training, labels, holdout(training, config.evaluation.task, use_chroms, config.seed)


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
    models.head = fit_head(inputs, labels, valid, config.head, storage, seed=config.seed, name="head_hybrid")
    models.seconds = {"embed_training": embed_seconds, "head_hybrid": round(time.perf_counter() - t, 1)}
    return models, engineered, training


def fit_hybrid(
    config: Config,
    records_dir: Path,
    gene_ids: np.ndarray,
    n_tissues: int,
    storage: Path,
    *,
    ablations: bool = True,
) -> HybridModels:
    """Train the network(s) on the first training folds and fit the head(s) on the last one (see
    :func:`split_folds`); with ``ablations`` also the promoter-only and context-only networks and the head on
    engineered features alone."""
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}

    def network(use_promoter: bool, use_context: bool, name: str) -> TrainedNetwork:
        t = time.perf_counter()
        trained = train_hybrid_network(config, records_dir, gene_ids, n_tissues, storage,
                                       use_promoter=use_promoter, use_context=use_context, name=name)
        seconds[f"train_{name}"] = round(time.perf_counter() - t, 1)
        return trained

    full = network(True, True, "hybrid")
    models, engineered, training = fit_hybrid_head(config, records_dir, full, gene_ids, storage)
    seconds.update(models.seconds)
    if ablations:
        t = time.perf_counter()
        _, labels, valid = head_training(config, records_dir)
        models.features_head = fit_head(engineered, labels, valid, config.head, storage, seed=config.seed,
                                        name="head_features_only")
        seconds["head_features_only"] = round(time.perf_counter() - t, 1)
        models.ablations = {
            "transformer_only": network(False, True, "transformer_only"),
            "cnn_only": network(True, False, "cnn_only"),
        }
    seconds["fit_total"] = round(time.perf_counter() - t0, 1)
    models.seconds = seconds
    log.info("hybrid: fitted in %.0f s (%s)", seconds["fit_total"], seconds)
    return models

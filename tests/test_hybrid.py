"""The hybrid model on a real local Ray: Ray Train with one and two workers (DDP over gloo), resuming from a
checkpoint, the XGBoost head on Ray Train, and the model bundle loading back to the same predictions."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from tiny import TINY

from engine.config import load_config
from engine.fit.bundle import load_bundle, save_bundle
from engine.fit.hybrid import fit_hybrid_head, train_hybrid_network
from engine.fit.train import latest_checkpoint
from engine.model.network import HybridNet
from engine.steps.prepare import prepare, read_problem_index


@pytest.fixture(scope="module")
def prepared(ray_local, synth_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid")
    config = load_config(synth_small / "config.yaml", [f"output_dir={out}", *TINY])
    result = prepare(config, out / "records", targets="hidden", training=True)
    assert result.n_train > 0
    return config, out / "records", result


@pytest.mark.parametrize("workers", [1, 2])
def test_train_with_one_and_two_workers(prepared, tmp_path, workers):
    config, records, result = prepared
    config = load_config(
        _config_path(config),
        [f"output_dir={tmp_path}", *TINY, f"train.num_workers={workers}"],
    )
    gene_ids, tissues = read_problem_index(records)
    network = train_hybrid_network(config, records, gene_ids, len(tissues), tmp_path / "runs", name=f"w{workers}")
    assert network.metrics["epoch"] == 1
    assert np.isfinite(network.metrics["val_loss"]) and np.isfinite(network.metrics["train_loss"])
    fresh = HybridNet(network.spec).state_dict()
    changed = [k for k, v in network.state.items() if not torch.equal(v, fresh[k])]
    assert len(changed) > len(fresh) // 2  # the weights were trained, not the initial ones
    # two workers saw the data once between them: the examples of an epoch add up over the workers
    assert network.metrics["examples"] > 0


def _config_path(config):
    from pathlib import Path

    return Path(config.inputs.genes).parent / "config.yaml"


def test_resume_from_checkpoint(prepared, tmp_path):
    config, records, _ = prepared
    gene_ids, tissues = read_problem_index(records)
    one = load_config(_config_path(config), [f"output_dir={tmp_path}", *TINY, "train.epochs=1"])
    train_hybrid_network(one, records, gene_ids, len(tissues), tmp_path, name="first")
    checkpoint = latest_checkpoint(tmp_path, "first")
    assert checkpoint is not None

    from engine.fit.hybrid import split_folds
    from engine.fit.train import fold_dirs, train_network

    three = load_config(_config_path(config), [f"output_dir={tmp_path}", *TINY, "train.epochs=3",
                                                "train.patience=5"])
    net_folds, _ = split_folds(three.train.folds)
    resumed = train_network(three, fold_dirs(records, net_folds), records, gene_ids, len(tissues),
                            storage=tmp_path, name="second", resume_from=checkpoint)
    assert resumed.metrics["epoch"] == 2
    # epoch 0 came from the checkpoint: the resumed run wrote checkpoints for epochs 1 and 2 only
    assert len([p for p in (tmp_path / "second").glob("checkpoint_*") if p.is_dir()]) == 2


def test_bundle_loads_back_to_the_same_predictions(prepared, tmp_path):
    config, records, result = prepared
    gene_ids, tissues = read_problem_index(records)
    network = train_hybrid_network(config, records, gene_ids, len(tissues), tmp_path, name="net")
    models, _, _ = fit_hybrid_head(config, records, network, gene_ids, tmp_path)
    hidden = pads.dataset(records / "context", partitioning="hive").to_table()
    expected = models.predict_head(hidden)
    personal = (models.promoters, models.lookup)  # the synthetic data has genomes: the donors' own haplotypes
    assert models.lookup.personal
    sequences = pq.read_table(records / "promoters.parquet")["sequence"].to_pylist()
    version = save_bundle(models, tmp_path / "bundle", sequences=sequences, gene_ids=gene_ids)
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.model_version == version
    got = bundle.predict(hidden, gene_ids, promoters=personal)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    estimate, lower, upper = got
    assert np.all(lower <= upper) and np.isfinite(estimate).all()
    # the head learned something: better than predicting the mean of the labels
    truth = result.truth
    n_samples = result.problem.n_samples
    order = {int(g) * n_samples + int(s): v for g, s, v in zip(truth.gene_index, truth.sample_index, truth.values,
                                                                  strict=True)}
    observed = np.array([order[int(g) * n_samples + int(s)] for g, s in
                         zip(hidden["gene_index"].to_numpy(), hidden["sample_index"].to_numpy(), strict=True)])
    assert np.mean((estimate - observed) ** 2) < np.var(observed)

"""The hybrid model on a real local Ray: Ray Train with one and two workers (DDP over gloo), resuming from a
checkpoint, the XGBoost head on Ray Train, the cross-fitted bundle loading back to the same predictions, and the hybrid
beating the per-gene-and-tissue mean on the planted synthetic task. The one-worker network, its checkpoints and the
bundle are the session's tiny model (``tiny_model`` in conftest.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY

from geximpute import schema as S
from geximpute.config import load_config
from geximpute.errors import GeximputeError
from geximpute.fit.bundle import load_bundle, load_networks, save_networks
from geximpute.fit.hybrid import FOLD_RUN
from geximpute.fit.train import latest_checkpoint
from geximpute.model.network import HybridNet
from geximpute.science.baselines import make_methods
from geximpute.steps.evaluate import hidden_values
from geximpute.steps.prepare import read_problem_index


@pytest.fixture(scope="module")
def prepared(tiny_model):
    """(config, records folder, prepare's output) of the session's tiny model."""
    result = tiny_model.progress.results["prepare"]
    assert result.n_train > 0
    return tiny_model.config, tiny_model.records, result


def test_train_with_one_worker(prepared, tiny_model):
    config, _, _ = prepared
    assert config.train.num_workers == 1  # the session's tiny model: trained with one worker by build_bundle
    network = tiny_model.progress.results["train"]
    assert network.metrics["epoch"] == 1
    assert np.isfinite(network.metrics["val_loss"]) and np.isfinite(network.metrics["train_loss"])
    fresh = HybridNet(network.spec).state_dict()
    changed = [k for k, v in network.state.items() if not torch.equal(v, fresh[k])]
    assert len(changed) > len(fresh) // 2  # the weights were trained, not the initial ones
    assert network.metrics["examples"] > 0
    # the stage's figures count every fold network's examples (the benchmark's training samples/s counted the
    # first network's alone, over the time of all of them)
    from geximpute.fit.bundle import load_networks

    trained = load_networks(Path(tiny_model.config.output_dir) / "network")
    figures = tiny_model.progress.stages["train"]
    assert figures["networks"] == len(trained) == config.train.folds == 2
    assert figures["samples"] == sum((n.metrics["epoch"] + 1) * n.metrics["examples"] for n in trained)
    assert figures["samples"] > figures["epochs"] * figures["examples_per_epoch"]


def _config_path(config):
    from pathlib import Path

    return Path(config.inputs.genes).parent / "config.yaml"


def test_two_workers_resume_the_one_worker_checkpoint(prepared, tmp_path, caplog):
    """DDP over gloo with two workers, resumed from the tiny model's last checkpoint (one worker; its first fold
    network, epochs 0 and 1, is the run's one network): the run trains only the epoch left, and both workers'
    examples add up."""
    config, records, _ = prepared
    gene_ids, tissues = read_problem_index(records)
    assert config.train.epochs == 2
    checkpoint = latest_checkpoint(Path(config.output_dir) / "network" / "runs", FOLD_RUN)
    assert checkpoint is not None

    from geximpute.fit.hybrid import split_folds
    from geximpute.fit.train import fold_dirs, train_network

    three = load_config(_config_path(config), [f"output_dir={tmp_path}", *TINY, "train.epochs=3",
                                                "train.patience=5", "train.num_workers=2"])
    net_folds, _ = split_folds(three.train.folds)
    with caplog.at_level("WARNING", logger="geximpute.fit.train"):
        resumed = train_network(three, fold_dirs(records, net_folds), records, gene_ids, len(tissues),
                                storage=tmp_path, name="second", resume_from=checkpoint)
    # matched by position, and said so: this run's one network goes on from the fold run's first
    assert "resumes from the state of network 'hybrid_fold0'" in caplog.text
    m = resumed.metrics
    assert m["epoch"] == 2
    assert np.isfinite(m["val_loss"]) and np.isfinite(m["train_loss"])
    # epochs 0 and 1 came from the checkpoint: the resumed run wrote a checkpoint for epoch 2 only
    assert len([p for p in (tmp_path / "second").glob("checkpoint_*") if p.is_dir()]) == 1
    # the two workers' shards add up to the training records (each epoch visits all of them: no cut here)
    n_train = sum(pq.ParquetDataset(d).read(columns=["target"]).num_rows for d in fold_dirs(records, net_folds))
    assert 0.5 * n_train < m["examples"] <= n_train
    fresh = HybridNet(resumed.spec).state_dict()
    assert sum(not torch.equal(v, fresh[k]) for k, v in resumed.state.items()) > len(fresh) // 2



def test_two_workers_share_every_networks_rows_evenly(prepared, tmp_path, caplog):
    """Two networks, each reading one fold, trained in one run by two workers: each worker keeps its share of the
    records by entry, so both networks train on nearly all their rows each epoch. Ray Data's split handed each
    worker whole files in reading order (a fold here is one file): one worker held most of fold 0 and the other
    most of fold 1, and each network took as many steps as the worker with fewest of its rows allowed (on the
    Geuvadis folds: 7,968 rows of 40,736)."""
    import re

    from geximpute.fit.train import NetworkRun, fold_dirs, train_networks

    config, records, _ = prepared
    gene_ids, tissues = read_problem_index(records)
    two = load_config(_config_path(config), [f"output_dir={tmp_path}", *TINY, "train.epochs=1",
                                              "train.pretrain_epochs=0", "train.num_workers=2",
                                              "train.cpus_per_worker=0.25"])
    # each fold in one file, as prepare writes a fold of one chromosome (the Geuvadis folds)
    single = tmp_path / "single"
    for k in (0, 1):
        fold = pads.dataset(fold_dirs(records, [k])[0], partitioning="hive").to_table()
        fold = fold.set_column(fold.schema.get_field_index("chrom"), "chrom", fold["chrom"].cast(pa.string()))
        (single / f"fold={k}").mkdir(parents=True)
        pq.write_table(fold, single / f"fold={k}" / "part-0.parquet")
    runs = [NetworkRun(f"on_fold{k}", [single / f"fold={k}"]) for k in (0, 1)]
    with caplog.at_level("INFO", logger="geximpute.fit.train"):
        trained = train_networks(two, runs, records, gene_ids, len(tissues), storage=tmp_path, name="shared")
    for run, network in zip(runs, trained, strict=True):
        n_train = int(re.search(rf"train {run.name}: (\d+) training and", caplog.text).group(1))
        # each worker's share is a hash draw (on ~1,300 rows, a few percent from half) and an epoch drops a partial
        # batch a worker: 0.88 of the rows here; the split by files left a network few rows on one worker
        assert 0.8 * n_train <= network.metrics["examples"] <= n_train, (run.name, n_train, network.metrics)
        assert f"train {run.name}: the 2 workers hold" in caplog.text


def test_a_run_with_a_worker_holding_no_training_rows_is_refused():
    """A network with fewer training rows than workers (near enough) would leave a worker none: refused on the
    driver, naming the network and the setting, before any worker starts."""
    from geximpute.fit.train import NetworkRun, _check_worker_rows, worker_of

    table = pa.table({"gene_index": np.array([3], np.int64), "sample_index": np.array([7], np.int64)})
    run = NetworkRun("lonely", [Path("records/train/fold=0")])
    _check_worker_rows(run, table, np.zeros(1, bool), 1)  # one worker: nothing to share
    with pytest.raises(GeximputeError, match=r"lonely.*train.num_workers = 2.*would hold none"):
        _check_worker_rows(run, table, np.zeros(1, bool), 2)
    # the shares: a hash of the entry, even over many entries, the same in every call
    g, s = np.divmod(np.arange(20_000), 100)
    share = np.bincount(worker_of(g, s, 4), minlength=4)
    assert share.min() > 0.95 * 5_000 and np.array_equal(worker_of(g, s, 4), worker_of(g, s, 4))


def test_a_bundle_is_read_from_one_version_and_a_network_cut_short_is_refused(tiny_model, tmp_path):
    """load_bundle reads the version its link names at that moment, and names it (actors load that one, whatever a
    build commits meanwhile); train's network files carry the weights' checksum, so a save cut between its two
    renames (new weights, old feature scaling) is refused when read, not used."""
    from geximpute.fit.bundle import load_network, save_network

    bundle = load_bundle(tiny_model.folder)
    assert bundle.folder == Path(tiny_model.folder).resolve() and bundle.reads_genomes  # the tiny data has a VCF
    network = tiny_model.progress.results["train"]
    save_network(network, tmp_path / "net")
    assert load_network(tmp_path / "net").metrics["epoch"] == network.metrics["epoch"]
    assert sorted(p.name for p in (tmp_path / "net").iterdir()) == ["network.json", "network.pt"]
    other = {k: v + 1 if v.is_floating_point() else v for k, v in network.state.items()}
    torch.save(other, tmp_path / "net" / "network.pt")  # the weights of another save, with this save's specs
    with pytest.raises(GeximputeError, match=r"network\.pt is not the weights network\.json was written with"):
        load_network(tmp_path / "net")


def test_a_model_trained_without_genomes_is_not_given_them(tmp_path, caplog):
    """A model whose records never carried a cis-genetic score predicts from the reference genome: its imputation
    and nightly runs do not read the config's VCF (its untrained inputs read the scores, and the score was added
    to every estimate and bound, before); a model trained with genomes reads them as before."""
    import dataclasses
    from types import SimpleNamespace

    from geximpute.config import config_from_dict
    from geximpute.fit.bundle import Bundle
    from geximpute.steps.impute import genomes_the_model_reads

    config = config_from_dict({"inputs": {"genes": "g.tsv", "expression": "e.tsv", "variants": "donors.vcf.gz",
                                          "genome": "hg38.fa"}})
    @dataclasses.dataclass
    class Loaded:  # a dataset a caller loaded, with its VCF's sites
        variants: object
        expression: object = None

    dataset = Loaded(variants="the sites")
    blind = SimpleNamespace(reads_genomes=False, folder=tmp_path / "model")
    with caplog.at_level("WARNING", logger="geximpute.steps.impute"):
        seen, data = genomes_the_model_reads(config, blind, dataset, "impute")
    assert seen.inputs.variants is None and seen.inputs.genome == config.inputs.genome and data.variants is None
    assert dataset.variants == "the sites"  # the caller's, untouched
    assert "trained without personal genomes" in caplog.text and "donors.vcf.gz is not read" in caplog.text
    reading = SimpleNamespace(reads_genomes=True, folder=tmp_path / "model")
    assert genomes_the_model_reads(config, reading, dataset, "impute") == (config, dataset)
    # what the bundle recorded decides: genotypes null (trained without inputs.variants), or not recorded (older)
    for compat, reads in (({"genotypes": None}, False), ({"genotypes": {"genotypes.cis_window": None}}, True),
                          (None, True), ({"tissues": ["Liver"], "scale": "tpm"}, True)):  # older: not recorded
        assert Bundle.reads_genomes.fget(SimpleNamespace(compatibility=compat)) is reads

def _hidden(records) -> pa.Table:
    """The tiny model's context records: the entries hidden for evaluation, sorted by (gene, sample)."""
    table = pads.dataset(records / "context", partitioning="hive").to_table()
    return table.sort_by([("gene_index", "ascending"), ("sample_index", "ascending")])


def _fitted(tiny_model, hidden: pa.Table) -> tuple[object, dict[str, np.ndarray]]:
    """(the tiny model's models as fitted, before saving, holding the bundle's baseline grids of the ``hidden``
    entries; those grids): fit-head does not fit the baselines on the whole visible problem, the bundle does that
    where it predicts. A copy: the session's models are left as they are."""
    models = copy.copy(tiny_model.progress.results["fit_head"])
    problem = tiny_model.progress.results["prepare"].problem
    targets = np.zeros(problem.values.shape, bool)
    targets[hidden["gene_index"].to_numpy(), hidden["sample_index"].to_numpy()] = True
    models.baselines = load_bundle(tiny_model.folder).baseline_grids(problem, targets)
    return models, models.baselines


def test_bundle_loads_back_to_the_same_predictions(tiny_model):
    hidden = _hidden(tiny_model.records)
    fitted = tiny_model.progress.results["fit_head"]
    # fit-head fits its baselines on the training folds only: the models hold no grid of the hidden entries, and
    # say so when asked to predict them
    assert fitted.baselines and all(grid is None for grid in fitted.baselines.values())
    with pytest.raises(GeximputeError, match="Bundle.baseline_grids"):
        fitted.predict_head(hidden)
    models, grids = _fitted(tiny_model, hidden)
    expected = models.predict_head(hidden)
    # the head's boosters' outputs averaged over the fold networks, then one conformal step for the average: as
    # the interval was calibrated (each network's output widened and then averaged was the order until session 39)
    from geximpute.fit.models import genetic_offset

    engineered, base = models.engineered(hidden), models.baseline_inputs(hidden)
    raw = [models.head.raw(models.head_inputs(hidden, network, engineered=engineered, baselines=base)[2])
           for network in models.networks()]
    mean = [np.mean([r[i] for r in raw], axis=0) for i in range(3)]
    for got, want in zip(expected, models.head.widened(*mean), strict=True):
        np.testing.assert_allclose(got, want + genetic_offset(hidden), rtol=1e-6, atol=1e-6)
    personal = (models.promoters, models.lookup)  # the synthetic data has genomes: the donors' own haplotypes
    assert models.lookup.personal
    gene_ids, _ = read_problem_index(tiny_model.records)
    bundle = load_bundle(tiny_model.folder)  # a fresh copy: predict() sets the promoters of the shared one
    assert bundle.model_version == tiny_model.progress.stages["fit_head"]["model_version"]
    # the bundle is the cross-fitted, stacked hybrid that evaluate scores: one network per training fold, and a
    # head that reads the baselines' estimates, which the bundle recomputes from the visible values
    assert bundle.stacked and len(bundle.models.fold_networks) == tiny_model.config.train.folds == 2
    assert {"row_tissue", "pairwise_regression", "iterative_ridge"} <= set(bundle.baseline_names)
    assert list(bundle.baseline_names) == list(models.baselines)
    # the head boosts from the blend of its estimate columns, saved with the bundle
    assert models.head.blend is not None and bundle.models.head.blend == models.head.blend
    # and the conformal step's amounts (per bin of the estimate where the held-out rows are enough)
    assert (bundle.models.head.conformal_edges, bundle.models.head.conformal_bins) == (
        models.head.conformal_edges, models.head.conformal_bins)
    # the session's tiny head was boosted by Ray Train's XGBoostTrainer (head.ray_min_rows=0): its run is kept
    assert (Path(tiny_model.config.output_dir) / "network" / "runs" / "head_hybrid").is_dir()
    # the bundle fits its baselines with the settings fit-head tuned, and estimates the targets alone
    assert bundle.models.config.baselines == models.config.baselines
    problem = tiny_model.progress.results["prepare"].problem
    targets = np.zeros(problem.values.shape, bool)
    targets[hidden["gene_index"].to_numpy(), hidden["sample_index"].to_numpy()] = True
    for grid in grids.values():
        assert np.isnan(grid[~targets]).all()
    with pytest.raises(GeximputeError, match="baseline_grids"):
        bundle.predict(hidden, gene_ids, promoters=personal)
    got = bundle.predict(hidden, gene_ids, promoters=personal, baselines=grids)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    estimate, lower, upper = got
    assert np.all(lower <= upper) and np.isfinite(estimate).all()
    # the bundle's files are the ones geximpute.schema declares (beside the atomic store's hidden bookkeeping) and
    # the second fold network, its tables in their declared schemas
    assert sorted(p.name for p in tiny_model.folder.iterdir() if not p.name.startswith(".")) == sorted(
        [*S.BUNDLE_FILES, "fold1"])
    assert sorted(p.name for p in (tiny_model.folder / "fold1").iterdir()) == sorted(
        [S.NETWORK_SPECS_FILE, S.NETWORK_WEIGHTS_FILE])
    for name, schema in ((S.BUNDLE_PROMOTERS_FILE, S.BUNDLE_PROMOTERS),
                         (S.BUNDLE_GENE_PROMOTERS_FILE, S.BUNDLE_GENE_PROMOTERS)):
        assert pq.read_schema(tiny_model.folder / name).remove_metadata().equals(schema)


def test_a_head_baseline_that_does_not_apply_to_the_data_is_named_in_a_warning(tiny_model, caplog):
    import dataclasses
    import logging

    bundle = load_bundle(tiny_model.folder)
    bundle.baseline_names = (*bundle.baseline_names, "gene_family")  # as a genes-task bundle's head would read it
    problem = dataclasses.replace(tiny_model.progress.results["prepare"].problem, gene_names=None)
    targets = np.zeros(problem.values.shape, bool)
    targets[:3, :2] = True
    with caplog.at_level(logging.WARNING, logger="geximpute.fit.bundle"):
        grids = bundle.baseline_grids(problem, targets)
    assert np.isnan(grids["gene_family"]).all() and np.isfinite(grids["row_tissue"][targets]).all()
    assert "gene_family" in caplog.text and "gene symbols" in caplog.text


def test_a_bundle_whose_head_reads_other_features_is_refused(tiny_model, tmp_path):
    """The head reads its engineered features by position: a bundle that recorded another list (an engine that
    added, removed or reordered one) is refused by name, not read from the wrong columns."""
    import json
    import shutil

    from geximpute import schema as S
    from geximpute.errors import GeximputeError

    folder = tmp_path / "model"
    shutil.copytree(tiny_model.folder, folder)
    spec = json.loads((folder / S.HEAD_SPECS_FILE).read_text())
    names = spec["engineered_features"]
    assert len(names) > 2
    spec["engineered_features"] = [names[1], names[0], *names[2:]]
    (folder / S.HEAD_SPECS_FILE).write_text(json.dumps(spec))
    with pytest.raises(GeximputeError, match=rf"position 0 \('{names[1]}' in the bundle, '{names[0]}' here\)"):
        load_bundle(folder)
    spec["engineered_features"] = names[:-1]
    (folder / S.HEAD_SPECS_FILE).write_text(json.dumps(spec))
    with pytest.raises(GeximputeError, match=rf"{len(names) - 1} engineered features .* computes {len(names)}"):
        load_bundle(folder)


def test_a_bundle_written_before_a_setting_keeps_the_value_its_head_was_fitted_with(tiny_model, tmp_path):
    """``chained_boosting``'s trees were 6 deep before ``baselines.cb_max_depth`` (default 8): a bundle whose
    config does not name it is read with 6, the depth of the estimates its stacked head learned from."""
    import shutil

    import yaml

    from geximpute import schema as S
    from geximpute.fit.bundle import load_bundle

    assert load_bundle(tiny_model.folder).models.config.baselines.cb_max_depth == 8
    folder = tmp_path / "model"
    shutil.copytree(tiny_model.folder, folder)
    saved = yaml.safe_load((folder / S.BUNDLE_CONFIG_FILE).read_text())
    del saved["baselines"]["cb_max_depth"]
    (folder / S.BUNDLE_CONFIG_FILE).write_text(yaml.safe_dump(saved))
    assert load_bundle(folder).models.config.baselines.cb_max_depth == 6
    # a setting this engine does not know (a bundle of a newer version): named as the bundle's, not the user's
    from geximpute.errors import GeximputeError

    saved["context"]["tissue_tokens"] = 4
    (folder / S.BUNDLE_CONFIG_FILE).write_text(yaml.safe_dump(saved))
    with pytest.raises(GeximputeError, match=r"model/config.yaml: the model's own settings do not read here "
                                             r"\(.*tissue_tokens.*another geximpute version"):
        load_bundle(folder)


def test_network_folders_hold_one_run_of_fold_networks(tiny_model, tmp_path):
    """``geximpute train`` writes K fold networks (fold0/ ...); a later run with fewer folds removes the extra fold
    folders, so that fit-head never stacks networks of two runs."""
    network = tiny_model.progress.results["train"]
    save_networks([network, network, network], tmp_path)
    assert len(load_networks(tmp_path)) == 3
    (tmp_path / "fold2" / "notes.txt").write_text("not ours")  # a file the engine did not write stays
    save_networks([network, network], tmp_path)
    assert len(load_networks(tmp_path)) == 2 and (tmp_path / "fold2" / "notes.txt").is_file()
    save_networks([network], tmp_path)
    assert len(load_networks(tmp_path)) == 1 and not (tmp_path / "fold0").exists()


def test_hybrid_beats_the_gene_tissue_mean_on_the_planted_task(tiny_model):
    """The synthetic data plants donor effects shared across a donor's tissues (geximpute.apps.synth): a donor's other
    tissues tell the hidden entry more than the gene's mean in the tissue does. The tiny hybrid (2 epochs, 30 trees)
    must use that: a lower error than ``row_tissue`` on the same hidden entries, and a positive correlation with the
    truth within genes (which ``row_tissue``, one value per gene and tissue, cannot have across donors)."""
    prepared = tiny_model.progress.results["prepare"]
    hidden = _hidden(tiny_model.records)
    truth = hidden_values(prepared, hidden)
    estimate, lower, upper = _fitted(tiny_model, hidden)[0].predict_head(hidden)
    (row_tissue,), _ = make_methods(("row_tissue",), tiny_model.config.baselines, len(prepared.problem.donors))
    row_tissue.fit(prepared.problem)
    baseline = np.asarray(row_tissue.predict(hidden), np.float64)
    ok = np.isfinite(baseline)
    assert ok.mean() > 0.9 and len(truth) > 200
    rmse = {name: float(np.sqrt(np.mean((pred[ok] - truth[ok]) ** 2)))
            for name, pred in (("hybrid", estimate), ("row_tissue", baseline))}
    assert rmse["hybrid"] < 0.9 * rmse["row_tissue"], rmse
    # the interval is meant to cover 80%: far from it either way means the conformal step broke
    coverage = float(np.mean((truth >= lower) & (truth <= upper)))
    assert 0.6 <= coverage <= 0.97, coverage


def test_head_does_not_lose_to_the_best_of_its_estimate_columns():
    """A head boosted from the blend of its estimate columns is at least as good as the best of them on new rows
    (boosted from a constant, the same trees ended more than 1% above that column's error on these data: 95984d3).
    Boosted in process: the blend, boosters and conformal step are those ``fit_head`` runs in its Ray Train worker,
    without the ~13 s start of an ``XGBoostTrainer``."""
    from geximpute.config import HeadConfig
    from geximpute.fit.head import fit_head_in_process

    def rows(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = rng.normal(0, 2, n)
        good = y + rng.normal(0, 0.3, n)
        poor = np.where(rng.random(n) < 0.2, np.nan, y + rng.normal(0, 0.8, n))
        return np.c_[rng.normal(size=(n, 4)), good, poor].astype(np.float32), y

    x, y = rows(1500, np.random.default_rng(0))
    x_new, y_new = rows(2000, np.random.default_rng(1))
    valid = np.random.default_rng(2).random(len(y)) < 0.2
    config = HeadConfig(num_workers=1, cpus_per_worker=0.5, num_boost_round=80)
    best_column = float(np.sqrt(np.mean((x_new[:, 4] - y_new) ** 2)))

    def rmse(head) -> float:
        return float(np.sqrt(np.mean((head.predict(x_new)[0] - y_new) ** 2)))

    blended = fit_head_in_process(x, y, valid, config, estimates=[4, 5])
    assert blended.blend is not None and blended.blend.coef[0] > blended.blend.coef[1] > 0
    assert rmse(blended) <= best_column * 1.01, (rmse(blended), best_column)
    # the same boosting from a constant does lose to that column here (1.19x its error): the blend is what holds it
    assert rmse(fit_head_in_process(x, y, valid, config)) > best_column * 1.05
    estimate, lower, upper = blended.predict(x_new)
    assert 0.72 <= np.mean((lower <= y_new) & (y_new <= upper)) <= 0.88
    # a negative conformal amount (held-out rows quieter than the band) narrows it, never inside out
    import dataclasses

    narrowed = dataclasses.replace(blended, conformal=-50.0, conformal_edges=None, conformal_bins=None)
    estimate, lower, upper = narrowed.predict(x_new)
    assert np.all(lower <= estimate) and np.all(estimate <= upper)
    # no rows (a VCF whose sites give variant-effects no pair): three empty arrays, not a reshape error
    assert [part.shape for part in blended.predict(x_new[:0])] == [(0,), (0,), (0,)]
    # too few held-out rows to stop the trees and calibrate on: a clear error (a reshape error, or an interval
    # calibrated on two rows, before)
    from geximpute.errors import GeximputeError

    few = np.zeros(len(y), bool)
    few[:2] = True
    with pytest.raises(GeximputeError, match="2 held-out row"):
        fit_head_in_process(x, y, few, config, estimates=[4, 5])
    # every row held out (a head fold all on the validation chromosomes): named, not XGBoost's NaN base score
    with pytest.raises(GeximputeError, match="0 row\\(s\\) of .* left to fit the head on"):
        fit_head_in_process(x, y, np.ones(len(y), bool), config, estimates=[4, 5])


def test_head_fitted_on_one_member_predicts_for_the_members_mean():
    """Fitted on rows that each went through one of K noisy networks and used on their mean, the head's blend
    (errors-in-variables weights from the members' spread on the held-out rows) and its trees and interval (chosen
    on the held-out rows averaged over the members) do better on the mean than the weights fitted for one member,
    and its interval covers what it was meant to on the members' mean. Without that correction the blend leans on
    the weaker estimate: measured on the planted-motif genes, the head below the networks' mean."""
    from geximpute.config import HeadConfig
    from geximpute.fit.head import averaged, fit_head_in_process, member_noise

    k = 3

    def rows(n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
        signal = rng.normal(0, 1, n)
        y = signal + rng.normal(0, 0.3, n)
        weak = 0.5 * signal + rng.normal(0, 0.6, n)  # a baseline: partly right, the same in every member
        noise = rng.normal(size=(n, 3))
        members = [np.c_[noise, signal + rng.normal(0, 1.0, n), weak].astype(np.float32) for _ in range(k)]
        return members, y

    members, y = rows(3000, np.random.default_rng(0))
    valid = np.random.default_rng(1).random(len(y)) < 0.25
    x = members[0]  # each training row through one member, as the cross-fitted head sees it
    held_out = [m[valid] for m in members]
    new_members, y_new = rows(4000, np.random.default_rng(2))
    config = HeadConfig(num_workers=1, cpus_per_worker=0.5, num_boost_round=60)

    assert member_noise(held_out, 3) == pytest.approx(1.0 * (1 - 1 / k), rel=0.1)
    assert member_noise(held_out[:1], 3) == 0.0
    plain = fit_head_in_process(x, y, valid, config, estimates=[3, 4])
    ensemble = fit_head_in_process(x, y, valid, config, estimates=[3, 4], members=held_out)
    blend = ensemble.blend
    assert blend.ensemble_coef is not None and plain.blend.ensemble_coef is None
    # on one member the weights are shared; for the mean, the network's weight rises and the baseline's falls
    assert blend.coef == pytest.approx(plain.blend.coef)
    assert blend.ensemble_coef[0] > blend.coef[0] and blend.ensemble_coef[1] < blend.coef[1]

    def rmse(head) -> float:
        return float(np.sqrt(np.mean((averaged(head, new_members)[0] - y_new) ** 2)))

    assert rmse(ensemble) < rmse(plain) * 0.97, (rmse(ensemble), rmse(plain))
    _, lower, upper = averaged(ensemble, new_members)
    # calibrated on the held-out rows' outputs averaged over the members, as it predicts: 80%, not the wide side
    # that calibrating each row through its own member left (0.86 here before session 39)
    assert 0.76 <= np.mean((lower <= y_new) & (y_new <= upper)) <= 0.84
    # a bundle's head metadata carries the prediction weights
    from geximpute.fit.head import Blend

    assert Blend(**blend.to_json()).margin(x, ensemble=True) == pytest.approx(blend.margin(x, ensemble=True))


def test_blend_fitted_within_groups_follows_the_members_of_each_group():
    """Across-donor comparisons (the ``samples`` task): an estimate whose deviations within a gene and tissue are
    right but shrunk (many weak lines averaged) gets too little weight from one least-squares fit over all rows,
    whose error is mostly the groups' levels. Fitted within groups, with the groups' level read from a feature
    column (``tissue_mean``), the blend orders each group's members better (the headline there) and its level still
    follows the groups'."""
    from geximpute.fit.head import Blend

    def rows(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n_groups, size = 120, 30
        group = np.repeat(np.arange(n_groups), size)
        level = rng.normal(0, 3, n_groups)[group]
        donor = rng.normal(0, 1, len(group))
        y = level + donor + rng.normal(0, 0.5, len(group))
        tissue_mean = level + rng.normal(0, 0.05, n_groups)[group]  # one value per group
        noisy = level + 0.6 * donor + rng.normal(0, 1.0, len(group))  # right levels, noisy deviations
        shrunk = level + rng.normal(0, 0.05, n_groups)[group] + 0.3 * donor  # right but shrunk deviations
        return np.c_[tissue_mean, noisy, shrunk], y, group

    x, y, group = rows(np.random.default_rng(0))
    x_new, y_new, group_new = rows(np.random.default_rng(1))
    plain = Blend.fit(x, y, [1, 2])
    within = Blend.fit(x, y, [1, 2], groups=group, level=0)

    def across(pred: np.ndarray) -> float:
        return float(np.mean([np.corrcoef(pred[group_new == g], y_new[group_new == g])[0, 1]
                              for g in np.unique(group_new)]))

    assert within.coef[1] > 2 * plain.coef[1] and within.coef[1] > 2.0, (within.coef, plain.coef)
    assert across(within.margin(x_new)) > across(plain.margin(x_new)) + 0.05
    # the level: each group's mean blend follows its mean label as closely as the plain blend's does
    def level_error(margin: np.ndarray) -> float:
        return float(np.std([margin[group_new == g].mean() - y_new[group_new == g].mean()
                             for g in np.unique(group_new)]))

    assert level_error(within.margin(x_new)) < 1.5 * level_error(plain.margin(x_new)) + 0.05
    assert within.level == 0 and within.level_coef < 0  # the shrunk estimates' levels, counted thrice, taken off
    assert Blend(**within.to_json()).margin(x_new) == pytest.approx(within.margin(x_new))
    # nothing varies within single-row groups: the weights come to 0 and the level column carries the blend
    single = Blend.fit(x[:100], y[:100], [1, 2], groups=np.arange(100), level=0)
    assert single.coef == [0.0, 0.0] and single.level_coef > 0.5


def test_members_that_differ_by_a_group_offset_do_not_inflate_a_within_group_blend():
    """Fold networks that disagree by a constant per (gene, tissue) group agree on every deviation a blend fitted
    within groups reads: their disagreement there is measured within groups, or the averaged network's weight was
    inflated up to tenfold (a 90% variance correction); single-row groups (nothing varies) give no weight and no
    failed factorisation."""
    from geximpute.fit.head import Blend, member_noise

    rng = np.random.default_rng(0)
    n_groups, size, k = 300, 30, 4
    group = np.repeat(np.arange(n_groups), size)
    level = rng.normal(0, 2, n_groups)[group]
    deviation = rng.normal(0, 1, len(group))
    y = level + deviation + rng.normal(0, 1, len(group))
    members = [np.c_[level, level + 0.5 * deviation + rng.normal(0, 1.0, n_groups)[group]
                     + rng.normal(0, 0.05, len(group))] for _ in range(k)]
    assert member_noise(members, 1, group) < 0.01 < 0.5 < member_noise(members, 1)
    blend = Blend.fit(members[0], y, [1], member_noise=member_noise(members, 1, group), groups=group, level=0)
    assert blend.ensemble_coef[0] == pytest.approx(blend.coef[0], rel=0.05) and 1.5 < blend.coef[0] < 2.5
    single = Blend.fit(members[0][:50], y[:50], [1], member_noise=0.3, groups=np.arange(50), level=0)
    assert single.coef == [0.0] and single.ensemble_coef == [0.0]


def test_member_noise_within_small_held_out_groups_is_the_training_groups():
    """The members' disagreement measured within held-out groups of n rows keeps (1 - 1/n) of it: groups of two
    read half of it. Scaled back and brought to the training groups' size, every held-out size reads the same."""
    from geximpute.fit.head import member_noise

    rng = np.random.default_rng(0)
    k, fitted = 4, np.repeat(np.arange(100), 30)  # training groups of 30 rows
    expected = (1 - 1 / 30) * (1 - 1 / k)  # unit disagreement per row, as the blend's centring keeps it
    for size in (2, 5, 30):
        groups = np.repeat(np.arange(6000 // size), size)
        members = [rng.normal(size=(len(groups), 1)) for _ in range(k)]
        assert member_noise(members, 0, groups, fitted) == pytest.approx(expected, rel=0.06), size
    assert member_noise(members, 0, np.arange(len(groups)), fitted) == 0.0  # groups of one: nothing to read


def test_within_pearson_is_the_mean_pearson_of_groups_with_enough_rows():
    from geximpute.fit.head import MIN_GROUP_ROWS, within_pearson

    rng = np.random.default_rng(3)
    groups = np.repeat([0, 1, 2], [30, 40, MIN_GROUP_ROWS - 1])
    labels = rng.normal(size=len(groups)) + 5 * groups  # levels differ: they must not count
    estimate = labels + rng.normal(scale=1.0, size=len(groups))
    expected = np.mean([np.corrcoef(estimate[groups == g], labels[groups == g])[0, 1] for g in (0, 1)])
    assert within_pearson(estimate, labels, groups) == pytest.approx(expected)
    assert within_pearson(estimate, labels, groups) < np.corrcoef(estimate, labels)[0, 1]
    assert np.isnan(within_pearson(estimate[:5], labels[:5], groups[:5]))
    assert np.isnan(within_pearson(estimate[:0], labels[:0], groups[:0]))


def test_head_on_groups_keeps_the_trees_chosen_by_the_pearson_within_groups(caplog):
    """On the ``samples`` task the stacked head's blend is fitted within groups and its trees are cut where the
    held-out rows' Pearson within groups (the task's figure) is best, not their RMSE."""
    import logging

    from geximpute.config import HeadConfig
    from geximpute.fit.head import fit_head_in_process, within_pearson

    rng = np.random.default_rng(7)
    group = np.repeat(np.arange(80), 25)
    level = rng.normal(0, 3, 80)[group]
    donor = rng.normal(0, 1, len(group))
    y = level + donor + rng.normal(0, 0.5, len(group))
    x = np.c_[rng.normal(size=(len(y), 2)), level + rng.normal(0, 0.05, 80)[group],  # noise, noise, tissue_mean
              level + 0.3 * donor + rng.normal(0, 0.2, len(y)),  # network: shrunk deviations
              level + 0.6 * donor + rng.normal(0, 1.0, len(y))].astype(np.float32)  # a noisy baseline
    valid = rng.random(len(y)) < 0.3
    members = [x[valid], x[valid]]
    config = HeadConfig(num_workers=1, cpus_per_worker=0.5, num_boost_round=40)
    with caplog.at_level(logging.INFO, logger="geximpute.fit.head"):
        head = fit_head_in_process(x, y, valid, config, estimates=[3, 4], members=members, groups=group, level=2)
    assert head.blend is not None and head.blend.level == 2 and head.blend.coef[0] > 2.0
    assert "Pearson within groups" in caplog.text and "blend fitted within groups" in caplog.text
    estimate = head.predict(x[valid])[0]
    assert np.isfinite(estimate).all()
    assert within_pearson(estimate, y[valid], group[valid]) > 0.6  # the network alone: about 0.7 in expectation


def test_head_on_the_genes_task_keeps_the_trees_chosen_by_the_pearson(caplog):
    """On the ``genes`` task (judged by the Pearson over all entries) the head's trees are cut where the held-out
    rows' Pearson is best, with or without fold-network members; elsewhere by RMSE."""
    import logging

    import xgboost

    from geximpute.config import HeadConfig
    from geximpute.fit.head import _ensemble_rounds, fit_head_in_process

    rng = np.random.default_rng(11)
    n = 3000
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = x[:, 0] + 0.5 * np.sin(3 * x[:, 1]) + rng.normal(0, 1.0, n)
    valid = rng.random(n) < 0.3
    config = HeadConfig(num_workers=1, cpus_per_worker=0.5, num_boost_round=60)
    with caplog.at_level(logging.INFO, logger="geximpute.fit.head"):
        fit_head_in_process(x, y, valid, config, estimates=[0], select="pearson")  # no members: xgb_features_only
    assert "trees kept on the held-out rows averaged over 1 members (Pearson" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="geximpute.fit.head"):
        fit_head_in_process(x, y, valid, config, estimates=[0])
    assert "trees kept" not in caplog.text  # RMSE, without members: XGBoost's early stopping alone, as before
    # the cut is the grid point of the best Pearson of the members' mean
    point = xgboost.train({"max_depth": 4, "eta": 0.3}, xgboost.DMatrix(x[~valid], y[~valid]), 30)
    members = [x[valid], x[valid] + rng.normal(0, 0.3, x[valid].shape).astype(np.float32)]
    kept = _ensemble_rounds(point, members, y[valid], None, select="pearson").num_boosted_rounds()

    def pearson(rounds: int) -> float:
        mean = np.mean([point.predict(xgboost.DMatrix(m), iteration_range=(0, rounds)) for m in members], axis=0)
        return float(np.corrcoef(mean, y[valid])[0, 1])

    grid = np.unique(np.linspace(1, 30, 25).round().astype(int))
    assert kept == grid[int(np.argmax([pearson(int(r)) for r in grid]))]


def test_head_tree_count_cross_validated_over_the_training_genes(caplog):
    """On the ``genes`` task the head's tree count is also scored on its training rows, each estimated by trees
    boosted on the other folds of genes: a row's estimate does not move when its own gene's labels do, and the cut
    is the grid point of the best Pearson over the held-out and the out-of-fold rows together."""
    import logging

    import xgboost

    from geximpute.config import HeadConfig
    from geximpute.fit.head import _cross_validated, _ensemble_rounds, _grid, fit_head_in_process

    rng = np.random.default_rng(5)
    n_genes, per_gene = 300, 8
    gene = np.repeat(np.arange(n_genes), per_gene)
    level = rng.normal(size=n_genes)[gene]
    x = np.column_stack([level + rng.normal(0, 0.7, len(gene)), rng.normal(size=(len(gene), 3))]).astype(np.float32)
    y = level + 0.4 * np.sin(2 * x[:, 1]) + rng.normal(0, 0.5, len(gene))
    config = HeadConfig(num_workers=1, cpus_per_worker=0.5, num_boost_round=40, cv_folds=4)
    out = _cross_validated(30, x, y, None, gene, config, seed=0)
    assert out.shape == (len(_grid(30)), len(y)) and np.isfinite(out).all()
    moved = y.copy()
    moved[gene == 7] += 5.0  # one gene's labels: its own rows' estimates come from trees that never saw them
    again = _cross_validated(30, x, moved, None, gene, config, seed=0)
    np.testing.assert_array_equal(again[:, gene == 7], out[:, gene == 7])
    assert not np.array_equal(again, out)  # the other folds' trees did see them

    valid = gene < 30  # few held-out genes, as on a small genes task
    point = xgboost.train({"max_depth": 4, "eta": 0.3, "seed": 0}, xgboost.DMatrix(x[~valid], y[~valid]), 30)
    folded = (out[:, ~valid], y[~valid], None)
    kept = _ensemble_rounds(point, [x[valid]], y[valid], None, select="pearson", folded=folded).num_boosted_rounds()
    grid = _grid(30)
    pooled = [np.corrcoef(np.concatenate([point.predict(xgboost.DMatrix(x[valid]), iteration_range=(0, int(r))),
                                          out[i, ~valid]]), np.concatenate([y[valid], y[~valid]]))[0, 1]
              for i, r in enumerate(grid)]
    assert kept == grid[int(np.argmax(pooled))]

    with caplog.at_level(logging.INFO, logger="geximpute.fit.head"):
        head = fit_head_in_process(x, y, valid, config, estimates=[0], select="pearson", units=gene)
    assert "4-fold cross-validation of the tree count" in caplog.text
    assert f"and {int((~valid).sum())} training rows out of fold" in caplog.text
    assert np.isfinite(head.predict(x[valid])[0]).all()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="geximpute.fit.head"):
        fit_head_in_process(x, y, valid, HeadConfig(num_workers=1, cpus_per_worker=0.5, num_boost_round=40,
                                                    cv_folds=0), estimates=[0], select="pearson", units=gene)
    assert "cross-validation" not in caplog.text and "training rows out of fold" not in caplog.text


def test_head_judged_by_the_pearson_stops_early_on_the_pearson():
    """On the ``genes`` task the point booster's early stopping follows the held-out rows' Pearson, not their RMSE:
    the trees kept are where the Pearson peaks among all the rounds boosted."""
    import xgboost

    from geximpute.config import HeadConfig
    from geximpute.fit.head import _boost, _loop_config, _matrices, _xgb_params

    rng = np.random.default_rng(3)
    n = 4000
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = x[:, 0] + 0.7 * np.sin(3 * x[:, 1]) + rng.normal(0, 1.0, n)
    valid = rng.random(n) < 0.3
    config = HeadConfig(num_workers=1, cpus_per_worker=0.5, num_boost_round=300, eta=0.3)
    train = _matrices(x[~valid], y[~valid], None, 2)
    held = _matrices(x[valid], y[valid], None, 2)[0]
    by_pearson = _loop_config(config, 0, "pearson")
    point, interval, metrics = _boost(train, held, by_pearson)
    rounds = metrics["rounds"]
    full = xgboost.train({**_xgb_params(by_pearson, 1), "objective": "reg:squarederror"}, train[0], rounds + 30)
    pearson = [np.corrcoef(full.predict(held, iteration_range=(0, r)), y[valid])[0, 1] for r in range(1, rounds + 31)]
    assert rounds == int(np.argmax(pearson)) + 1
    # the trees past that best stay for the choice made afterwards on the pooled rows (_ensemble_rounds); the
    # interval booster has the best's rounds
    assert point.num_boosted_rounds() == rounds + 30 and interval.num_boosted_rounds() == rounds
    assert _boost(train, held, _loop_config(config, 0))[0].num_boosted_rounds() == _boost(
        train, held, _loop_config(config, 0))[2]["rounds"]  # judged by the RMSE: cut at the best


def test_corrected_blend_of_nearly_collinear_columns_stays_solvable():
    # the first column is the second plus a little noise: taking 90% of its whole variance off (the old cap) left
    # an indefinite Gram matrix and the Cholesky factorisation failed; the cap is now 90% of its own variance
    from geximpute.fit.head import _nnls_corrected

    rng = np.random.default_rng(0)
    base = rng.normal(size=500)
    x = np.column_stack([base + 0.05 * rng.normal(size=500), base])
    y = base + 0.1 * rng.normal(size=500)
    x, y = x - x.mean(axis=0), y - y.mean()
    coef = _nnls_corrected(x, y, noise=10.0)  # far more noise than the column has
    assert np.all(np.isfinite(coef)) and np.all(coef >= 0)
    assert coef.sum() == pytest.approx(1.0, abs=0.1)  # together the columns still carry y's scale
    # a column that the others do not explain: the reduction raises its weight, as before
    z = rng.normal(size=(500, 2))
    yz = z @ np.array([0.5, 0.5]) + 0.1 * rng.normal(size=500)
    plain, corrected = _nnls_corrected(z, yz, 0.0), _nnls_corrected(z, yz, 0.3)
    assert corrected[0] > plain[0]


def test_conformal_step_per_bin_of_the_estimate_covers_within_each_bin():
    """One conformal amount covers 80% over all rows but not within ranges of the estimate where the quantile
    booster's spread is off; an amount per quartile of the estimate (Mondrian) covers ~80% in each, also on new rows
    of the same kind; the bundle keeps the bins."""
    from geximpute.config import HeadConfig
    from geximpute.fit.head import HeadModel, conformal_amounts, fit_head_in_process

    rng = np.random.default_rng(11)

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, 3)).astype(np.float32)
        # the noise grows with the level: a spread learned from few trees is too narrow at the top, too wide below
        return x, x[:, 0] + rng.normal(0, 0.2 + 0.6 * (x[:, 0] > 0.7), n)

    x, y = rows(12000)
    valid = rng.random(len(y)) < 0.3
    plain = HeadConfig(num_workers=1, cpus_per_worker=0.5, num_boost_round=4, eta=0.3, conformal_bins=1)
    one = fit_head_in_process(x, y, valid, plain)
    binned = fit_head_in_process(x, y, valid, HeadConfig(num_workers=1, cpus_per_worker=0.5, num_boost_round=4,
                                                          eta=0.3, conformal_bins=4))
    assert one.conformal_bins is None and len(binned.conformal_bins) == 4 and len(binned.conformal_edges) == 3
    assert binned.conformal == pytest.approx(one.conformal)  # the same boosters, the same amount over all rows

    new_x, new_y = rows(20000)

    def by_quartile(head: HeadModel) -> np.ndarray:
        estimate, lower, upper = head.predict(new_x)
        quartile = np.searchsorted(np.quantile(estimate, [0.25, 0.5, 0.75]), estimate, side="right")
        inside = (new_y >= lower) & (new_y <= upper)
        return np.array([inside[quartile == q].mean() for q in range(4)])

    assert np.abs(by_quartile(one) - 0.8).max() > 0.08  # one amount: off in some quartile
    assert np.abs(by_quartile(binned) - 0.8).max() < 0.05  # an amount per bin: close in each

    # too few rows per bin, or ties that leave a bin empty: one amount
    assert conformal_amounts(np.arange(300.0), np.ones(300), 0.8, 4)[1] is None
    assert conformal_amounts(np.repeat([0.0, 1.0], 500), np.ones(1000), 0.8, 4)[1] is None


def test_a_bundle_of_a_vcf_without_its_reference_loads_as_a_model_without_genomes(tiny_model, tmp_path):
    """Before ``inputs.variants`` needed ``inputs.genome``, a model could be built from a VCF without the
    reference: no genetic score was built, so it learned from none. It loads (its config no longer reads as a
    config), as the model without genomes it is."""
    import shutil

    import yaml

    from geximpute import schema as S

    folder = shutil.copytree(tiny_model.folder, tmp_path / "model")
    saved = yaml.safe_load((folder / S.BUNDLE_CONFIG_FILE).read_text())
    assert saved["inputs"]["variants"] and load_bundle(folder).reads_genomes
    saved["inputs"]["genome"] = None
    (folder / S.BUNDLE_CONFIG_FILE).write_text(yaml.safe_dump(saved))
    bundle = load_bundle(folder)
    assert not bundle.reads_genomes and bundle.models.config.inputs.variants is None


def test_a_head_without_members_on_groups_keeps_its_trees_by_the_pearson_within_groups(caplog):
    """``xgb_features_only`` on ``samples``: its trees are cut by the Pearson within (gene, tissue) groups, as the
    hybrid's beside it are (it kept XGBoost's RMSE early stopping there, so the ablation was tuned otherwise)."""
    import logging

    from geximpute.config import HeadConfig
    from geximpute.fit.head import fit_head_in_process

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 20)
    level = rng.normal(0, 3, 60)[groups]
    y = level + rng.normal(0, 1, len(groups))
    x = np.c_[level + rng.normal(0, 0.1, len(y)), y - level + rng.normal(0, 0.7, len(y)),
              rng.normal(size=(len(y), 2))].astype(np.float32)
    valid = np.isin(groups, np.arange(0, 60, 5))
    config = HeadConfig(num_workers=1, cpus_per_worker=0.5, num_boost_round=40)
    with caplog.at_level(logging.INFO, logger="geximpute.fit.head"):
        fit_head_in_process(x, y, valid, config, groups=groups, select="rmse")
    assert "trees kept on the held-out rows averaged over 1 members (Pearson within groups" in caplog.text

"""One model from a config: prepare the training records, train the network, fit the XGBoost head, save the bundle.

:func:`build_bundle` is the library's one recipe for a model; the ``geximpute`` commands ``train`` and ``fit-head``
are its two middle stages (:func:`train_and_save`, :func:`fit_head_and_save`), run one at a time with their files
in between. The demo, the benchmark, the benchmarks scripts and the tests build their models through it.

Folders, each defaulting to a folder of ``config.output_dir``::

    records/   prepare's output with the labelled training folds (geximpute.steps.prepare)
    network/   the trained network (geximpute.fit.bundle.save_network) and its Ray Train runs and checkpoints (runs/)
    model/     the bundle (geximpute.fit.bundle, layout in geximpute.schema.BUNDLE_FILES)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from geximpute.config import Config, fold_fraction_of
from geximpute.errors import ConfigError
from geximpute.fit.bundle import Bundle, load_bundle, load_networks, networks_index, save_bundle, save_networks
from geximpute.fit.hybrid import (
    fit_hybrid,
    fit_hybrid_head,
    fold_network_runs,
    gene_composition,
    head_tuned_methods,
    train_fold_networks,
    tuned_baselines,
)
from geximpute.fit.models import HybridModels
from geximpute.fit.train import check_holdout
from geximpute.io.dataset import Dataset, load_dataset
from geximpute.model.inference import TrainedNetwork
from geximpute.runtime.atomic import (
    MARKER,
    Lease,
    OutputRefused,
    check_replaceable,
    marker_of,
    scratch_folder,
    store_of,
)
from geximpute.runtime.raytools import ensure_ray
from geximpute.science.problem import VisibleProblem, make_problem
from geximpute.steps.prepare import MATRIX_FOLDER, prepare, read_problem_index

log = logging.getLogger(__name__)

#: the stages of :func:`build_bundle`, in order
STAGES = ("prepare", "train", "fit_head")


def output_path(config: Config, given: str | Path | None, default: str) -> Path:
    """``given``, or the folder ``default`` (``records``, ``network``, ``model``) of ``config.output_dir``; the
    model's is :attr:`Config.model_dir` (``impute.model_dir`` where set: the bundle imputation reads)."""
    if given:
        return Path(given)
    return config.model_dir if default == "model" else Path(config.output_dir) / default


@dataclass
class Progress:
    """What :func:`build_bundle` did, stage by stage: pass one in to read it back, or a subclass to measure stages.

    Attributes:
        stages: stage name -> its figures (plain numbers and strings, ready for JSON): ``seconds`` and counts.
        results: stage name -> what the stage made: ``prepare`` the :class:`~geximpute.steps.prepare.Prepared`,
            ``train`` the :class:`~geximpute.model.inference.TrainedNetwork`, ``fit_head`` the fitted
            :class:`~geximpute.fit.models.HybridModels` (before saving; the returned bundle is read back from disk).
    """

    stages: dict[str, dict] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Run one stage: yields the dict its figures go into, then records its wall time under ``seconds``."""
        figures: dict = {}
        t0 = time.perf_counter()
        yield figures
        figures["seconds"] = round(time.perf_counter() - t0, 1)
        self.stages[name] = figures
        log.info("build_bundle: %s done in %.1f s", name, figures["seconds"])


def train_and_save(config: Config, records_dir: str | Path | None = None,
                   network_dir: str | Path | None = None, *, problem: VisibleProblem | None = None
                   ) -> TrainedNetwork:
    """Train the networks on the training folds of ``records_dir`` and save them into ``network_dir``
    (``geximpute train``): with K >= 2 folds the K cross-fitted fold networks (:func:`train_fold_networks`), in
    ``fold0/`` ... ``fold{K-1}/``; with one fold one network in ``network_dir`` itself. Ray Train's runs and
    checkpoints go to ``network_dir/runs``. Returns the first network (its metrics are the run's summary).
    ``problem``: the visible problem prepare cut the folds from, whose genes the CNNs pre-train on (default: made
    again from the config's inputs)."""
    records = output_path(config, records_dir, "records")
    out = output_path(config, network_dir, "network")
    check_records_settings(config, records)
    trained_on = records_fingerprint(records)  # before training: records prepared again meanwhile are not these
    check_network_folder(out)
    gene_ids, tissues = read_problem_index(records)
    # one train run on a folder at a time (a second one would remove the first's live Ray Train run, or both
    # resume it and save their networks into one set)
    # a retry after a crash waits out the dead run's lease and resumes; a live run on the folder is refused
    lease = Lease(store_of(out.absolute()) / "lease.json", what=f"`train` run on {out}").acquire_after_the_dead()
    try:
        with contextlib.ExitStack() as scratch:
            if problem is None:  # read here: its matrix in a file of the run's own, as prepare keeps it
                folder = scratch.enter_context(scratch_folder(out, MATRIX_FOLDER))
                problem = read_visible_problem(config, gene_ids, records, matrix=folder / "expression.f32")
            # the CNNs' pre-training levels are all the networks read of the problem: its file goes before training
            runs = fold_network_runs(config, records, problem)
        del problem
        ensure_ray(config.ray)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / MARKER).is_file():  # the folder is train's (written in place: its Ray Train runs live in it)
            (out / MARKER).write_text(json.dumps({"format": "geximpute-output", "step": "train"}) + "\n")
        networks = train_fold_networks(config, records, gene_ids, len(tissues), out / "runs", runs=runs)
        save_networks(networks, out, records=trained_on)
    finally:
        lease.release()
    return networks[0]


#: the settings by which prepare cuts the training folds: `train` recomputes the folds from its own config (the CNNs'
#: pre-training levels leave each network's fold out) and must cut the ones the records were labelled by
FOLD_SETTINGS = ("seed", "train.folds", "train.fold_fraction", "evaluation.task", "evaluation.whole_donors",
                 "evaluation.fraction", "evaluation.seed", "split.valid_chroms", "split.test_chroms")


def _setting(config: dict, dotted: str) -> Any:
    """The value at ``dotted`` (``train.folds``) in a config's dictionary; None where a level is missing;
    ``train.fold_fraction`` as resolved (:func:`~geximpute.config.fold_fraction_of`: null is the task's default)."""
    if dotted == "train.fold_fraction" and isinstance(config, dict) and "train" in config:
        return fold_fraction_of(config)
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def check_records_settings(config: Config, records: Path) -> None:
    """Refuse a config whose training folds are not the ones prepare cut ``records`` by (:data:`FOLD_SETTINGS`, as
    its ``_manifest.json`` records them; records without one are not checked).

    Raises:
        ConfigError: a setting differs, named with both values.
    """
    prepared = _records_manifest(records).get("config")
    if not isinstance(prepared, dict):
        return
    now = config.to_dict()
    for dotted in FOLD_SETTINGS:
        a, b = _setting(prepared, dotted), _setting(now, dotted)
        if a is not None and (list(a) if isinstance(a, (list, tuple)) else a) != (
                list(b) if isinstance(b, (list, tuple)) else b):
            raise ConfigError(f"{records}: the records were prepared with {dotted} {a!r}; this config says {b!r}: "
                              "the networks would leave other folds out than the records hold (prepare again with "
                              "this config, or train with the records' setting)")


def records_fingerprint(records: Path) -> str | None:
    """Which records a set of networks was trained on, recorded with them and compared by ``fit-head``: a SHA-256
    of what prepare's ``_manifest.json`` in ``records`` says makes them (the inputs' checksums, the settings that
    cut the folds (:data:`FOLD_SETTINGS`), the records' counts), not of its run's time or versions: the same
    records prepared again have the same fingerprint. None without a manifest."""
    manifest = _records_manifest(records)
    config = manifest.get("config")
    if not isinstance(config, dict):
        return None
    folds = {dotted: _setting(config, dotted) for dotted in FOLD_SETTINGS}
    made = {"inputs": manifest.get("inputs"), "rows": manifest.get("rows"), "targets": manifest.get("targets"),
            "folds": folds}
    return hashlib.sha256(json.dumps(made, sort_keys=True, default=str).encode()).hexdigest()


def check_network_folder(out: Path) -> None:
    """Refuse a `train` output that is not absent, empty or an earlier `train` output: `train` writes its folder
    in place (its Ray Train runs resume there), so a committed output (a bundle's link) or a user's folder would
    be written into.

    Raises:
        OutputRefused: ``out`` is a link, a file, or a folder of another step or of no step of ours.
    """
    if out.is_symlink():
        raise OutputRefused(f"{out}: is a link to {os.path.realpath(out)} (a committed output); `train` writes its "
                            "networks into a folder of its own in place: choose another output folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputRefused(f"{out}: is a file; `train` writes its networks into a folder of its own")
    if not any(out.iterdir()):
        return
    marker = marker_of(out)
    if marker is not None and marker.get("step") == "train":
        return
    # train's folders written before they carried a marker: their networks and Ray Train runs
    legacy = marker is None and any((out / name).exists() for name in ("runs", "fold0", "network.json"))
    if not legacy:
        found = f"the output of `{marker.get('step')}`" if marker else "a folder that is not a geximpute output"
        raise OutputRefused(f"{out}: holds {found}; `train` writes its networks into a folder of its own in place "
                            "and would mix them with what is there: choose another output folder")


def fit_head_and_save(
    config: Config,
    records_dir: str | Path | None = None,
    network: TrainedNetwork | str | Path | None = None,
    out: str | Path | None = None,
    *,
    problem: VisibleProblem | None = None,
    check_records: bool = True,
    force: bool = False,
) -> tuple[HybridModels, str, int]:
    """Fit the XGBoost head over the trained networks on the training folds of ``records_dir`` and write the
    bundle into ``out`` (``geximpute fit-head``).

    With K >= 2 fold networks the head is cross-fitted and stacked (:func:`geximpute.fit.hybrid.fit_hybrid`): it
    learns on every training fold from that fold's own network and from the strong baselines' out-of-fold
    estimates, whose settings are tuned on a visible validation split (``baselines.tune``) and saved with the
    bundle; the model ``evaluate`` scores as ``hybrid``.

    Args:
        config: the resolved config.
        records_dir: prepare's output with training folds (default ``<output_dir>/records``).
        network: a trained network, or the folder :func:`train_and_save` wrote to (default
            ``<output_dir>/network``); the head's Ray Train runs go to that folder's ``runs``.
        out: the bundle folder (default ``<output_dir>/model``), replaced atomically.
        problem: the visible problem prepare cut the folds from (default: made again from the config's inputs).
        check_records: refuse networks trained on other records than ``records_dir``'s (False: a head fitted on
            purpose over another data set's networks, as the benchmark's gene sets are).
        force: replace ``out`` even when it is not an earlier bundle (:mod:`geximpute.runtime.atomic`).

    Returns:
        (the fitted models, the bundle's ``model_version``, the number of records the head was fitted on).
    """
    records = output_path(config, records_dir, "records")
    bundle_dir = output_path(config, out, "model")
    # refused before the head is fitted (minutes to hours), and again where the bundle is committed
    check_replaceable(bundle_dir, "bundle", store_of(bundle_dir.absolute()), force)
    if isinstance(network, TrainedNetwork):
        networks, runs = [network], output_path(config, None, "network") / "runs"
    else:
        net_dir = output_path(config, network, "network")
        networks, runs = load_networks(net_dir), net_dir / "runs"
        check_holdout(networks, config, net_dir)
        trained_on = (networks_index(net_dir) or {}).get("records")
        if check_records and trained_on is not None and records_fingerprint(records) not in (None, trained_on):
            raise ConfigError(f"the networks in {net_dir} were trained on other records than those in {records} "
                              "(prepared again since): the head would be fitted on rows the networks saw; train "
                              "again on these records (geximpute train)")
    gene_ids, tissues = read_problem_index(records)
    if len(networks) != config.train.folds and len(networks) > 1:
        raise ConfigError(f"{len(networks)} fold networks were trained but train.folds is {config.train.folds}; "
                          "train again with this config (geximpute train)")
    ensure_ray(config.ray)
    if len(networks) == 1 and config.train.folds >= 2:
        log.warning("fit-head: one network for %d training folds: the head is fitted on the plain layout (no "
                    "cross-fitting, no baseline estimates); `geximpute train` trains the fold networks",
                    config.train.folds)
        models, _, training = fit_hybrid_head(config, records, networks[0], gene_ids, runs)
        n_head = training.num_rows
    else:
        if problem is None and config.train.folds >= 2:
            problem = read_visible_problem(config, gene_ids, records)
        if problem is not None:
            composition = gene_composition(records, problem.gene_ids, config.promoter.upstream)
            baselines, _ = tuned_baselines(config, problem, composition, head_tuned_methods())
            config = dataclasses.replace(config, baselines=baselines)
        models = fit_hybrid(config, records, gene_ids, len(tissues), runs, ablations=False, problem=problem,
                            networks=networks, visible_grids=False)
        n_head = models.head_rows
    sequences = pq.read_table(records / "promoters.parquet")["sequence"].to_pylist()
    version = save_bundle(models, bundle_dir, sequences=sequences, gene_ids=gene_ids, metrics=networks[0].metrics,
                          tissues=tissues, force=force)
    return models, version, n_head


def evaluation_hidden(records: Path) -> bool:
    """Whether prepare hid the evaluation's entries before cutting the training folds of ``records`` (its
    manifest's ``evaluation_hidden``; records of a prepare before it was recorded did)."""
    return bool(_records_manifest(records).get("evaluation_hidden", True))


def _records_manifest(records: Path) -> dict:
    """Prepare's ``_manifest.json`` in ``records``, or ``{}`` where there is none to read (records of an older
    prepare, or a folder without one): the readers above then check nothing and assume what older prepares did."""
    try:
        manifest = json.loads((records / "_manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def read_visible_problem(config: Config, gene_ids, records: Path, *, matrix: Path | None = None) -> VisibleProblem:
    """The visible problem that prepare cut the training folds of ``records`` from, made again from the config's
    inputs (with the evaluation's entries hidden where prepare hid them: the folds are cut from the same entries);
    its genes must be the prepare output's (``gene_ids``), or the inputs changed in between. ``matrix``: keep its
    values in that file (:class:`~geximpute.io.matrixfile.MatrixFile`), not in memory."""
    problem, _ = make_problem(load_dataset(config, matrix=matrix), consume=True,
                              hidden_mask=evaluation_hidden(records))
    if list(problem.gene_ids) != list(gene_ids):
        raise ConfigError(f"the inputs of the config give {problem.n_genes} genes, the training records "
                          f"{len(gene_ids)} others; run prepare again with this config")
    return problem


def build_bundle(
    config: Config,
    *,
    dataset: Dataset | None = None,
    targets: str = "hidden",
    records_dir: str | Path | None = None,
    network_dir: str | Path | None = None,
    out: str | Path | None = None,
    progress: Progress | None = None,
) -> Bundle:
    """prepare (with training folds) -> train -> fit-head -> bundle; returns the bundle as loaded from ``out``.

    Args:
        config: the resolved config (its ``train``, ``head`` and ``evaluation`` settings decide the model).
        dataset: the config's inputs, already loaded (default: load them).
        targets: the entries that get a context record besides the training folds (``prepare --targets``); the
            model needs none of them, so the default is the smallest set, the entries hidden for evaluation.
        records_dir: prepare's output folder (default ``<output_dir>/records``), replaced.
        network_dir: the trained network and its Ray Train runs (default ``<output_dir>/network``).
        out: the bundle folder (default ``<output_dir>/model``), replaced atomically.
        progress: receives each stage's figures and results (see :class:`Progress`); a subclass can wrap the stages
            in its own measurements (the benchmark measures memory this way).
    """
    progress = progress if progress is not None else Progress()
    records = output_path(config, records_dir, "records")
    with progress.stage("prepare") as figures:
        prepared = prepare(config, records, dataset=dataset, targets=targets, training=True, matrix_file=False)
        figures.update(records=prepared.n_records + prepared.n_train, context_records=prepared.n_records,
                       training_records=prepared.n_train, promoters=prepared.n_promoters)
    progress.results["prepare"] = prepared
    with progress.stage("train") as figures:
        network = train_and_save(config, records, network_dir, problem=prepared.problem)
        # every network of the run (K fold networks, trained one after another in the stage): its examples
        trained = load_networks(output_path(config, network_dir, "network"))
        figures.update(epochs=int(network.metrics.get("epoch", 0)) + 1,
                       examples_per_epoch=int(network.metrics.get("examples", 0)),
                       networks=len(trained),
                       samples=sum((int(n.metrics.get("epoch", 0)) + 1) * int(n.metrics.get("examples", 0))
                                   for n in trained),
                       # the kept epoch's (the last epoch's may be worse: early stopping waits train.patience)
                       val_loss=_finite(network.metrics.get("best_val", network.metrics.get("val_loss"))))
    progress.results["train"] = network
    with progress.stage("fit_head") as figures:
        net_dir = output_path(config, network_dir, "network")
        models, version, n_head = fit_head_and_save(config, records, net_dir, out, problem=prepared.problem)
        figures.update(records=n_head, model_version=version, head_trees=models.head.point.num_boosted_rounds(),
                       seconds_detail=models.seconds)
    progress.results["fit_head"] = models
    return load_bundle(output_path(config, out, "model"))


def _finite(value: Any) -> float | None:
    """``value`` as a float, or None where it is missing or not finite (a network without validation rows)."""
    return float(value) if value is not None and math.isfinite(value) else None

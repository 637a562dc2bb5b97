"""The model bundle: the single artefact that later steps load.

A bundle folder holds (names and Parquet schemas declared in :mod:`geximpute.schema`, ``BUNDLE_FILES``)::

    network.pt        network weights (a plain state dict; loaded with ``torch.load(weights_only=True)``)
    network.json      NetworkSpec and FeatureSpec of the network (the format of :func:`save_network`)
    fold1/ ...        the other fold networks of a cross-fitted model (network.pt and network.json each)
    point.ubj         XGBoost booster of the estimate
    interval.ubj      XGBoost booster of the interval bounds
    head.json         conformal width (and per bin of the estimate), feature count, coverage, engineered feature
                      names, the stacked layout (number of fold networks, the baselines whose estimates the head
                      reads)
    promoters.parquet the reference promoter sequences of the training genes
    gene_promoters.parquet gene id -> row of promoters.parquet
    config.yaml       the resolved config that made it
    manifest.json     versions, input fingerprints, training metrics, model_version

``model_version`` is a hash of the weights, the boosters and their specs (network.json, head.json): the model
itself. ``config.yaml`` (the tuned baselines' and the engineered features' settings) and the promoter tables are
not part of it, being the same for two builds of the same inputs and settings: a bundle edited by hand there keeps
its version.
A cross-fitted (stacked) bundle predicts through every fold network and averages the head's outputs; its head also
reads the estimates of the strong baselines (settings tuned when the bundle was built, in ``config.yaml``), which
are fitted on the visible values of the data being predicted (:meth:`Bundle.baseline_grids`). Personal haplotypes
are not stored: they are rebuilt from the VCF of whatever donors are being predicted and passed to
:meth:`Bundle.predict` with their lookup.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from geximpute import schema as S
from geximpute.config import BaselinesConfig, Config, config_from_dict, dump_config
from geximpute.errors import ConfigError, GeximputeError
from geximpute.fit.head import HeadModel
from geximpute.fit.models import HybridModels, baseline_column
from geximpute.io.fasta import Genome
from geximpute.model.features import FeatureSpec
from geximpute.model.inference import TrainedNetwork, encode_promoters
from geximpute.model.network import NetworkSpec
from geximpute.runtime.atomic import staged_output
from geximpute.runtime.provenance import finite_json, manifest, write_json
from geximpute.science.baselines import baseline_estimates, entry_methods_skipped, promoter_composition
from geximpute.science.head_features import FEATURE_NAMES
from geximpute.science.problem import VisibleProblem
from geximpute.science.promoters import PromoterLookup, no_promoters, one_hot_promoters

log = logging.getLogger(__name__)


def save_network(network: TrainedNetwork, folder: str | Path, *, with_metrics: bool = True) -> Path:
    """Write a trained network's weights and specs into ``folder`` (``geximpute train``'s output; a bundle's copy).

    Args:
        network: the trained network.
        folder: created if absent; ``network.pt`` and ``network.json`` in it are replaced.
        with_metrics: also record the training figures in ``network.json`` (a bundle keeps them in its manifest
            instead, so that its ``model_version`` depends on the model alone).

    Returns:
        the path of the weights file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / S.NETWORK_WEIGHTS_FILE
    specs = {"network": dataclasses.asdict(network.spec), "features": dataclasses.asdict(network.features)}
    if not with_metrics:  # a bundle's copy: written in its staging folder, committed whole
        torch.save(network.state, weights)
        (folder / S.NETWORK_SPECS_FILE).write_text(json.dumps(specs, indent=2, default=str))
        return weights
    # train's output is replaced in place (its Ray Train runs live beside it): each file written whole under a
    # temporary name and renamed, the specs naming the weights' checksum, so that a save cut between the two
    # renames is refused when read (old weights read with the new feature scaling would predict without an error)
    new_weights = folder / f".{S.NETWORK_WEIGHTS_FILE}.{os.getpid()}.tmp"
    torch.save(network.state, new_weights)
    specs["weights_sha256"] = hashlib.sha256(new_weights.read_bytes()).hexdigest()
    specs["metrics"] = finite_json(network.metrics)
    new_specs = folder / f".{S.NETWORK_SPECS_FILE}.{os.getpid()}.tmp"
    new_specs.write_text(json.dumps(specs, indent=2, default=str))
    # the specs (naming the new weights' checksum) first: a save cut before the weights' rename leaves specs that
    # refuse the old weights, whatever wrote those (an older engine recorded no checksum)
    os.replace(new_specs, folder / S.NETWORK_SPECS_FILE)
    os.replace(new_weights, weights)
    return weights


def load_network(folder: str | Path) -> TrainedNetwork:
    """Read a network written by :func:`save_network` (weights loaded with ``weights_only=True``, on the CPU).

    Raises:
        GeximputeError: ``folder`` holds no trained network.
    """
    folder = Path(folder)
    weights, specs_file = folder / S.NETWORK_WEIGHTS_FILE, folder / S.NETWORK_SPECS_FILE
    if not weights.is_file() or not specs_file.is_file():
        raise GeximputeError(f"{folder}: no trained network ({S.NETWORK_WEIGHTS_FILE} and {S.NETWORK_SPECS_FILE}); "
                             "run `geximpute train` first")
    specs = json.loads(specs_file.read_text())
    recorded = specs.get("weights_sha256")
    if recorded is not None and hashlib.sha256(weights.read_bytes()).hexdigest() != recorded:
        raise GeximputeError(
            f"{folder}: {S.NETWORK_WEIGHTS_FILE} is not the weights {S.NETWORK_SPECS_FILE} was written with (its "
            f"sha256 differs from the recorded {recorded[:12]}: a save cut short, or a file copied from another run); "
            "run `geximpute train` again")
    return TrainedNetwork(
        spec=NetworkSpec(**specs["network"]),
        features=FeatureSpec(**specs["features"]),
        state=torch.load(weights, weights_only=True, map_location="cpu"),
        metrics=specs.get("metrics", {}),
    )


def fold_folder(folder: Path, k: int) -> Path:
    """Where fold network ``k`` of a cross-fitted model lives inside ``folder`` (a network folder or a bundle)."""
    return folder / f"fold{k}"


#: in a network folder: the set of networks :func:`save_networks` wrote (how many, each one's weights' checksum,
#: the records they learned from), written last; and the mark of a save in progress, removed after it
NETWORKS_INDEX = "networks.json"
SAVING_MARK = "networks.saving"


def save_networks(networks: list[TrainedNetwork], folder: str | Path, *, records: str | None = None) -> None:
    """Write ``geximpute train``'s networks: one network into ``folder`` itself, or K fold networks into
    ``folder/fold0`` ... ``fold{K-1}``. The networks of an earlier run are removed first (fold folders that hold a
    saved network, and the single network's files when folds are written), so that :func:`load_networks` reads
    this run's networks only; :data:`SAVING_MARK` stays while the set is incomplete (a save cut short is refused
    when read, not read as the folds it got to) and :data:`NETWORKS_INDEX` is written last. ``records``: the
    fingerprint of the records they were trained on (:func:`records_fingerprint`), for ``fit-head`` to compare."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    saving = folder / SAVING_MARK
    saving.write_text("a save of the networks is in progress, or was cut short: run `geximpute train` again\n")
    (folder / NETWORKS_INDEX).unlink(missing_ok=True)
    for stale in folder.glob(f"**/.{S.NETWORK_WEIGHTS_FILE}.*.tmp"):  # what killed saves left
        stale.unlink(missing_ok=True)
    for old in folder.glob("fold*"):
        if old.is_dir() and (old / S.NETWORK_SPECS_FILE).is_file():
            for name in (S.NETWORK_WEIGHTS_FILE, S.NETWORK_SPECS_FILE):
                (old / name).unlink(missing_ok=True)
            if not any(old.iterdir()):
                old.rmdir()
    if len(networks) > 1:  # an earlier single network's files would be read as this set's when a fold is missing
        for name in (S.NETWORK_WEIGHTS_FILE, S.NETWORK_SPECS_FILE):
            (folder / name).unlink(missing_ok=True)
    folders = [folder] if len(networks) == 1 else [fold_folder(folder, k) for k in range(len(networks))]
    written = [save_network(network, where) for network, where in zip(networks, folders, strict=True)]
    index = {"count": len(networks), "records": records,
             "networks": [{"folder": str(w.parent.relative_to(folder)) if w.parent != folder else ".",
                           "weights_sha256": json.loads((w.parent / S.NETWORK_SPECS_FILE).read_text())
                           .get("weights_sha256")} for w in written]}
    temporary = folder / f".{NETWORKS_INDEX}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(temporary, folder / NETWORKS_INDEX)
    saving.unlink()


def networks_index(folder: str | Path) -> dict | None:
    """What :func:`save_networks` recorded of the networks in ``folder`` (None: written before the index was)."""
    try:
        return json.loads((Path(folder) / NETWORKS_INDEX).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise GeximputeError(f"{Path(folder) / NETWORKS_INDEX}: unreadable ({exc}); run `geximpute train` "
                             "again") from exc


def load_networks(folder: str | Path) -> list[TrainedNetwork]:
    """The networks :func:`save_networks` wrote: the fold networks when ``folder/fold0`` holds one, else the one
    network of ``folder``."""
    folder = Path(folder)
    if (folder / SAVING_MARK).exists():
        raise GeximputeError(f"{folder}: the networks' save was cut short ({SAVING_MARK} is there): the set is "
                             "incomplete; run `geximpute train` again")
    index = networks_index(folder)
    if index is not None:  # the set as it was saved: each network's specs name the weights the index recorded
        networks = []
        for entry in index["networks"]:
            where = folder / entry["folder"]
            network = load_network(where)  # its weights checked against its specs
            specs = json.loads((where / S.NETWORK_SPECS_FILE).read_text())
            if specs.get("weights_sha256") != entry["weights_sha256"]:
                raise GeximputeError(f"{where}: not the network {folder / NETWORKS_INDEX} lists (another run's "
                                     "files); run `geximpute train` again")
            networks.append(network)
        return networks
    if (fold_folder(folder, 0) / S.NETWORK_SPECS_FILE).is_file():
        networks, k = [], 0
        while (fold_folder(folder, k) / S.NETWORK_SPECS_FILE).is_file():
            networks.append(load_network(fold_folder(folder, k)))
            k += 1
        return networks
    return [load_network(folder)]


def _model_version(folder: Path, n_folds: int = 1) -> str:
    digest = hashlib.sha256()
    for name in S.BUNDLE_VERSIONED_FILES:
        digest.update((folder / name).read_bytes())
    for k in range(1, n_folds):
        for name in (S.NETWORK_WEIGHTS_FILE, S.NETWORK_SPECS_FILE):
            digest.update((fold_folder(folder, k) / name).read_bytes())
    return digest.hexdigest()[:16]


#: (section, key, value) of settings whose default changed after bundles were written without them: such a bundle
#: is read with the value it was fitted with (``chained_boosting``'s trees were 6 deep before ``cb_max_depth``)
BUNDLE_SETTING_DEFAULTS = (("baselines", "cb_max_depth", 6),)


def compatibility(config: Config, gene_ids: Sequence[str], tissues: Sequence[str]) -> dict[str, Any]:
    """What data a model fits, recorded in its bundle and compared with the data of ``impute`` and ``nightly``.

    Keys: ``tissues`` (names, in the order of the tissue embedding), ``scale``, ``transform``,
    ``counts_normalisation``, ``k_neighbours``, ``max_distance``, ``genes_sha256`` (a fingerprint of the gene
    set), ``n_genes``, ``genome_contigs`` (contig lengths of the FASTA: the genome build; null without one), and
    the settings that make the records' features as the networks and head learned them: ``family_shrinkage``,
    ``promoter`` (the window and which windows count as known; null without a genome) and ``genotypes`` (how
    genomes are read and the genetic score shrunk; null without genomes): :data:`FEATURE_SETTINGS`.
    """
    genome = None
    if config.inputs.genome:
        with Genome(config.inputs.genome) as fasta:
            genome = dict(fasta.lengths)
    return {
        "tissues": [str(t) for t in tissues],
        "scale": config.inputs.scale,
        "transform": config.expression.transform,
        "counts_normalisation": config.expression.counts_normalisation,
        "k_neighbours": config.context.k_neighbours,
        "max_distance": config.context.max_distance,
        "genes_sha256": hashlib.sha256("\n".join(sorted(map(str, gene_ids))).encode()).hexdigest(),
        "n_genes": len(gene_ids),
        "genome_contigs": genome,
        "family_shrinkage": config.context.family_shrinkage,
        "promoter": FEATURE_SETTINGS["promoter"](config) if config.inputs.genome else None,
        "genotypes": FEATURE_SETTINGS["genotypes"](config) if config.inputs.variants else None,
    }


#: policies whose ``error`` refuses what the others would fill in: data read under it have nothing to fill, so it
#: matches a model of any of them (a strict imputation of a lenient model's data, or the reverse)
STRICT_POLICIES = ("genotypes.missing", "genotypes.unphased")
#: the settings (besides the data's) that shape a record's features, per compatibility key, by their config keys:
#: a model read with others would be given features it never learned from (a window of another length, another
#: policy for missing calls, another shrinkage of the genetic score)
FEATURE_SETTINGS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "promoter": lambda c: {f"promoter.{k}": getattr(c.promoter, k)
                           for k in ("upstream", "downstream", "soft_mask", "max_unknown_fraction")},
    "genotypes": lambda c: {**{f"genotypes.{k}": getattr(c.genotypes, k)
                               for k in ("cis_window", "missing", "unphased", "keep_filtered")},
                            "context.genetic_shrinkage": c.context.genetic_shrinkage},
}


def check_compatible(recorded: dict[str, Any] | None, data: dict[str, Any], folder: Path, source: str) -> None:
    """Refuse data that the bundle in ``folder`` was not trained for, naming the first key that differs.

    Args:
        recorded: the bundle's :func:`compatibility` (None: a bundle written before it was recorded: nothing is
            compared here; ``impute`` and ``nightly`` still compare the number of tissues).
        data: the same for the data at hand.
        folder: the bundle folder (for the message).
        source: what the data is (e.g. the config file), for the message.

    Raises:
        GeximputeError: a key differs.
    """
    def refuse(key: str, model: Any, here: Any) -> None:
        raise GeximputeError(
            f"{folder}: the model does not fit the data of {source}: {key} is {model!r} in the bundle but {here!r} "
            f"in the data; expected the same {key} as the data the model was trained on (the bundle's config.yaml "
            f"and manifest.json say which), or a model trained on this data")

    if recorded is None:
        return
    for key in ("scale", "transform", "counts_normalisation", "k_neighbours", "max_distance"):
        if key in recorded and recorded[key] != data[key]:
            refuse(key, recorded[key], data[key])
    # null where the model's networks do not read the family level (save_bundle)
    if recorded.get("family_shrinkage") is not None and recorded["family_shrinkage"] != data["family_shrinkage"]:
        refuse("context.family_shrinkage", recorded["family_shrinkage"], data["family_shrinkage"])
    # a model without a genome or genomes, or data without them, is not judged on how they are read
    for key in FEATURE_SETTINGS:
        model, here = recorded.get(key), data.get(key)
        if model is not None and here is not None:
            for name in {**model, **here}:  # the first setting that differs, by its config key
                if model.get(name) != here.get(name) and not (name in STRICT_POLICIES and "error" in
                                                              (model.get(name), here.get(name))):
                    refuse(name, model.get(name), here.get(name))
    if recorded.get("tissues") is not None and list(recorded["tissues"]) != list(data["tissues"]):
        model, here = list(recorded["tissues"]), list(data["tissues"])
        only_model = [t for t in model if t not in here][:3]
        only_data = [t for t in here if t not in model][:3]
        detail = (f"tissues {only_model} only in the model and {only_data} only in the data" if only_model or only_data
                  else "the same tissue names in another order")
        refuse("tissues", f"{len(model)} tissues", f"{len(here)} tissues ({detail})")
    if recorded.get("genes_sha256") and recorded["genes_sha256"] != data["genes_sha256"]:
        refuse("gene set", f"{recorded.get('n_genes')} genes (sha256 {recorded['genes_sha256'][:12]})",
               f"{data['n_genes']} genes (sha256 {data['genes_sha256'][:12]})")
    model_genome, data_genome = recorded.get("genome_contigs"), data.get("genome_contigs")
    if model_genome and data_genome:
        shared = sorted(set(model_genome) & set(data_genome))
        if not shared:
            refuse("genome build", f"contigs {sorted(model_genome)[:3]}", f"contigs {sorted(data_genome)[:3]}")
        for contig in shared:
            if model_genome[contig] != data_genome[contig]:
                refuse("genome build", f"{contig} of {model_genome[contig]:,} bp", f"{contig} of "
                       f"{data_genome[contig]:,} bp")


def save_bundle(models: HybridModels, folder: str | Path, *, sequences: list[str], gene_ids: np.ndarray,
                metrics: dict | None = None, tissues: Sequence[str] | None = None, force: bool = False) -> str:
    """Write ``models`` (network and hybrid head) as a bundle, atomically; returns its ``model_version``.

    Args:
        models: the fitted hybrid.
        folder: bundle folder (replaced as a whole).
        sequences: the promoter sequences of the rows of ``models.promoters``.
        gene_ids: problem genes, in the order of ``models.lookup.gene_row``.
        metrics: training figures recorded in the manifest.
        tissues: the problem's tissue names (the order of the tissue embedding), recorded with the rest of the
            bundle's :func:`compatibility`.
        force: replace ``folder`` even when it is not an earlier bundle.
    """
    compat = compatibility(models.config, gene_ids, tissues) if tissues is not None else None
    if compat is not None and not any(n.spec.family_input for n in models.networks()):
        compat["family_shrinkage"] = None  # the networks do not read the family level: any prior fits
    folds = models.fold_networks or [models.network]
    with staged_output(folder, step="bundle", force=force) as staging:
        save_network(folds[0], staging, with_metrics=False)
        for k, network in enumerate(folds[1:], start=1):
            save_network(network, fold_folder(staging, k), with_metrics=False)
        models.head.save(staging)
        # finite_json: a conformal amount or coverage that came out NaN is written as null, never as bare NaN
        (staging / S.HEAD_SPECS_FILE).write_text(json.dumps(finite_json({
            "conformal": models.head.conformal,
            "conformal_edges": models.head.conformal_edges,
            "conformal_bins": models.head.conformal_bins,
            "n_features": models.head.n_features,
            "coverage": models.head.coverage,
            "blend": models.head.blend.to_json() if models.head.blend is not None else None,
            "engineered_features": list(FEATURE_NAMES),
            # the stacked layout (geximpute.fit.models.HybridModels): the fold networks and, in this order, the
            # baselines whose estimates the head reads (computed where the bundle predicts: Bundle.baseline_grids)
            "stacked": models.stacked,
            "fold_networks": len(folds),
            "baselines": list(models.baselines) if models.stacked else [],
        }), indent=2))
        gene_row = models.lookup.gene_row
        has = gene_row >= 0
        # only the reference windows: personal haplotypes come from the VCF of the donors being predicted
        used, row = np.unique(gene_row[has], return_inverse=True)
        pq.write_table(pa.table({"sequence": pa.array([sequences[i] for i in used], pa.string())},
                                schema=S.BUNDLE_PROMOTERS), staging / S.BUNDLE_PROMOTERS_FILE)
        pq.write_table(
            pa.table({S.GENE_ID: pa.array(np.asarray(gene_ids, dtype=object)[has], pa.string()),
                      "promoter_row": pa.array(row.astype(np.int64))}, schema=S.BUNDLE_GENE_PROMOTERS),
            staging / S.BUNDLE_GENE_PROMOTERS_FILE,
        )
        (staging / S.BUNDLE_CONFIG_FILE).write_text(dump_config(models.config))
        version = _model_version(staging, len(folds))
        write_json(staging / S.BUNDLE_MANIFEST_FILE, manifest(models.config, step="bundle", model_version=version,
                                                       metrics=metrics or {}, seconds=models.seconds,
                                                       compatibility=compat))
    return version


@dataclasses.dataclass
class Bundle:
    """A loaded bundle: the hybrid and the promoter row of each gene id."""

    models: HybridModels
    gene_promoter: dict[str, int]
    model_version: str
    folder: Path
    compatibility: dict | None = None  # what data the model fits (:func:`compatibility`); None in older bundles
    reference_sequences: list[str] = dataclasses.field(default_factory=list)  # the training genes' reference windows
    baseline_names: tuple[str, ...] = ()  # the baselines whose estimates a stacked head reads, in its order

    @functools.cached_property
    def reference_promoters(self) -> np.ndarray:
        """(P, 4, L) one-hot :attr:`reference_sequences`, made when first asked for (an imputation with the donors'
        own haplotypes never reads them), then kept (one table: the networks' encoder cache stays valid)."""
        return one_hot_promoters(self.reference_sequences, self.models.network.spec.promoter_length)

    @property
    def stacked(self) -> bool:
        """The head reads the baselines' estimates: :meth:`predict` needs :meth:`baseline_grids`."""
        return self.models.stacked

    def reference_lookup(self, gene_ids: np.ndarray) -> PromoterLookup:
        """Every record of ``gene_ids`` reads its gene's reference window from the bundle's own table."""
        return PromoterLookup.reference(np.array([self.gene_promoter.get(g, -1) for g in gene_ids], dtype=np.int64))

    def baseline_entries(self, problem: VisibleProblem, targets: np.ndarray) -> dict[str, np.ndarray]:
        """The estimates a stacked head reads beside the network at the ``targets`` entries, ``{name: (N,)
        float32}`` in the head's order and in ``np.nonzero(targets)`` order: each baseline, with the bundle's
        (tuned) settings, fitted on the visible values of ``problem``, as the evaluation fits them on the visible
        values to estimate the hidden ones (a measured target without its own value, as the head's training rows
        were: :func:`~geximpute.science.baselines.range_estimates`' ``own_value_free``); NaN for a baseline that
        does not apply to these data (e.g. no donors). Empty for a bundle without the stacked layout.

        Args:
            problem: the problem being predicted (with its virtual samples); nothing of it is hidden here.
            targets: (G, S) bool, the entries that will be predicted.
        """
        if not self.stacked:
            return {}
        names, settings, seed, composition = self.baseline_inputs(problem)
        gi, si = np.nonzero(targets)
        estimates = baseline_estimates(problem, gi, si, names, settings, seed=seed, composition=composition,
                                       own_value_free=True)
        return head_estimates(estimates, self.baseline_names, len(gi))

    def baseline_inputs(self, problem: VisibleProblem) -> tuple[tuple[str, ...], BaselinesConfig, int, np.ndarray]:
        """What fitting the head's baselines on ``problem`` takes besides its values: (the entry methods of
        :attr:`baseline_names` that apply to it, the bundle's tuned settings, its seed, the (G, F) promoter
        composition of the problem's genes from the bundle's reference windows)."""
        config = self.models.config
        composition = promoter_composition(
            [self.reference_sequences[self.gene_promoter[g]] if g in self.gene_promoter else None
             for g in problem.gene_ids], config.promoter.upstream)
        names, why = entry_methods_skipped(problem, self.baseline_names, config.baselines, composition)
        missing = [n for n in self.baseline_names if n not in names]
        if missing:  # e.g. gene_family on data without gene symbols: the head reads NaN there
            log.warning("%s: the head reads %s, which %s not apply to these data (%s): their inputs are missing "
                        "(NaN) for every entry, and the estimates are those of the head's trees without them",
                        self.folder, ", ".join(missing), "does" if len(missing) == 1 else "do",
                        "; ".join(f"{n}: {why.get(n, 'not applicable')}" for n in missing))
        return names, config.baselines, config.seed, composition

    def baseline_grids(self, problem: VisibleProblem, targets: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`baseline_entries` as ``{name: (G, S) float32}`` grids, NaN off the ``targets``."""
        gi, si = np.nonzero(targets)
        grids = {}
        for name, values in self.baseline_entries(problem, targets).items():
            grid = np.full(problem.values.shape, np.nan, np.float32)
            grid[gi, si] = values
            grids[name] = grid
        return grids

    def no_baseline_estimates(self) -> dict[str, np.ndarray] | None:
        """Baseline estimates that are all missing (the head's trees take their missing-value branch), for records
        that are no entry of a problem, such as variant-effects' population records; None when not stacked."""
        if not self.stacked:
            return None
        return {name: np.full((0, 0), np.nan, np.float32) for name in self.baseline_names}

    @property
    def reads_family(self) -> bool:
        """The networks read each record's family level (:data:`geximpute.schema.FAMILY_LEVEL`): imputation's
        records must carry it."""
        return any(n.spec.family_input for n in self.models.networks())

    @property
    def reads_genomes(self) -> bool:
        """The model was trained with personal genomes (``inputs.variants``): its records carried cis-genetic
        scores, which it learned from. A model trained without them never did (the score's inputs were 0 with their
        flag 0 throughout): it predicts every donor from the reference genome. True for bundles written before
        this was recorded (no compatibility record, or one without its ``genotypes`` key)."""
        recorded = self.compatibility
        return recorded is None or "genotypes" not in recorded or recorded["genotypes"] is not None

    @property
    def reads_promoters(self) -> bool:
        """The networks have a promoter branch (they read the promoter table)."""
        return bool(self.models.network.spec.use_promoter)

    def encode_promoters(self, table: np.ndarray) -> list[np.ndarray]:
        """Each network's (P, D) embeddings of every row of the one-hot promoter ``table``
        (:func:`geximpute.model.inference.encode_promoters`, on ``models.device``), in the order :meth:`predict`
        takes them as ``embeddings``."""
        if not self.reads_promoters:
            raise ValueError(f"{self.folder}: the model's networks have no promoter branch; nothing to encode")
        m = self.models
        return [encode_promoters(n, table, device=m.device, precision=m.precision) for n in m.networks()]

    def predict(
        self,
        records: pa.Table,
        gene_ids: np.ndarray,
        promoters: tuple[np.ndarray, PromoterLookup] | None = None,
        baselines: dict[str, np.ndarray] | None = None,
        embeddings: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(estimate, lower, upper) of context records whose ``gene_index`` indexes ``gene_ids``.

        Args:
            records: context records (schema.CONTEXT).
            gene_ids: the genes of ``gene_index``.
            promoters: the one-hot promoter table and lookup of the records (e.g. with donors' haplotypes built
                from their VCF, see :func:`geximpute.science.promoters.genome_promoter_inputs`); default: the bundle's
                reference windows.
            baselines: :meth:`baseline_grids` of the records' problem, indexed by their (``gene_index``,
                ``sample_index``); required when the bundle is :attr:`stacked`, unless the records carry each
                baseline's estimate in its column (:func:`geximpute.fit.models.baseline_column`).
            embeddings: :meth:`encode_promoters` of the table of ``promoters``, encoded beforehand (then that
                table is not read and may be empty); default: each network encodes the rows it meets.

        Raises:
            GeximputeError: a stacked bundle is given no baseline estimates.
        """
        if promoters is None:
            self.models.promoters, self.models.lookup = self.reference_promoters, self.reference_lookup(gene_ids)
        else:
            self.models.promoters, self.models.lookup = promoters
        if embeddings is not None and len(embeddings) != len(self.models.networks()):
            raise ValueError(f"{len(embeddings)} promoter embeddings for {len(self.models.networks())} networks")
        self.models.promoter_embeddings = embeddings
        if self.stacked:
            carried = [baseline_column(name) in records.column_names for name in self.baseline_names]
            if baselines is None and all(carried):  # the records carry the estimates (imputation's blocks)
                baselines = dict.fromkeys(self.baseline_names)
            if baselines is None or list(baselines) != list(self.baseline_names):
                raise GeximputeError(
                    f"{self.folder}: the head reads the estimates of {', '.join(self.baseline_names)}; pass "
                    "Bundle.baseline_grids(problem, targets) as `baselines`, or records with their columns "
                    f"{', '.join(baseline_column(n) for n in self.baseline_names)} (got "
                    f"{'none' if baselines is None else ', '.join(baselines)})")
            self.models.baselines = baselines
        return self.models.predict_head(records)


def head_estimates(estimates: dict[str, np.ndarray], names: Sequence[str], n: int) -> dict[str, np.ndarray]:
    """The baselines' ``estimates`` at ``n`` entries as a stacked head reads them: ``{name: (n,) float32}`` in the
    head's order ``names``, NaN for a baseline that did not apply (the head's trees take their missing branch)."""
    return {name: np.asarray(estimates[name], np.float32) if name in estimates else np.full(n, np.nan, np.float32)
            for name in names}


def check_features(recorded: Sequence[str] | None, folder: Path) -> None:
    """Refuse a bundle whose head was fitted on other engineered features than :data:`FEATURE_NAMES`: its trees and
    its blend read the head's inputs by position, so another list or order would be read without an error and
    predict from the wrong columns. A bundle that recorded none (written before they were recorded) is not checked.

    Raises:
        GeximputeError: the lists differ (the message names the first position where they do).
    """
    if recorded is None or list(recorded) == list(FEATURE_NAMES):
        return
    recorded, here = list(recorded), list(FEATURE_NAMES)
    shared = min(len(recorded), len(here))
    at = next((i for i in range(shared) if recorded[i] != here[i]), shared)
    model = recorded[at] if at < len(recorded) else "(none)"
    engine = here[at] if at < len(here) else "(none)"
    raise GeximputeError(
        f"{folder / S.HEAD_SPECS_FILE}: the model's head reads {len(recorded)} engineered features and this engine "
        f"computes {len(here)}; they differ at position {at} ({model!r} in the bundle, {engine!r} here); expected "
        "the features of the engine that wrote the bundle: rebuild the model with this version (`geximpute "
        "prepare --training --targets none`, `train` and `fit-head`, or `python -m geximpute.jobs.build`)")


def _without_genomes(compatibility: dict | None) -> dict:
    """A bundle's compatibility record as a model trained without genomes records it (``genotypes`` null)."""
    return {**(compatibility or {}), "genotypes": None}


def _settings_refused_since(saved: dict, path: Path) -> None:
    """Settings that configs refuse since a bundle may have been written with them, taken out of its saved config
    (in place) with a log line, so that the model loads: ``inputs.tissue`` beside ``inputs.samples`` (never read:
    the sample table gives the tissues) and infinite or NaN numbers (their defaults instead)."""
    inputs = saved.get("inputs")
    if isinstance(inputs, dict) and inputs.get("tissue") and inputs.get("samples"):
        log.info("%s: inputs.tissue beside inputs.samples was never read; left out", path)
        inputs["tissue"] = None
    for section, values in saved.items():
        if not isinstance(values, dict):
            continue
        for key, value in list(values.items()):
            if isinstance(value, float) and not math.isfinite(value):
                log.info("%s: %s.%s %r is read as its default (a number configs refuse since)", path, section,
                         key, value)
                del values[key]


def _version_of(folder: Path) -> Path:
    """The version folder that the output link ``folder`` names now (``folder`` itself where it is not a link):
    only that last link is followed, so a parent folder that is a link on this host stays as the user named it
    (workers on other hosts read the same path)."""
    if not folder.is_symlink():
        return folder
    return folder.parent / os.readlink(folder)


def load_bundle(folder: str | Path) -> Bundle:
    """Load a bundle written by :func:`save_bundle`.

    ``Bundle.folder`` is the version folder read (the link ``folder`` resolved): whoever loads the bundle again
    for the same run (imputation's actors and tasks) loads it from there, the same version.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        GeximputeError: the bundle's head reads other engineered features than this engine computes, or a
            network's files are missing or do not match.
    """
    # the version the link names now, read whole from there: a build committed meanwhile switches the link, and
    # files read through it one by one could come from two versions
    folder = _version_of(Path(folder))
    if not (folder / S.BUNDLE_MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{folder}: not a model bundle (no {S.BUNDLE_MANIFEST_FILE}); "
                                "run `geximpute fit-head` first")

    saved = yaml.safe_load((folder / S.BUNDLE_CONFIG_FILE).read_text())
    # settings added since a bundle was written take the value its head was fitted with, not today's default
    for section, key, then in BUNDLE_SETTING_DEFAULTS:
        saved.setdefault(section, {}).setdefault(key, then)
    inputs = saved.get("inputs") or {}
    if inputs.get("variants") and not inputs.get("genome"):
        # written before inputs.variants needed inputs.genome: its VCF gave no genetic score (none was built
        # without the reference), so the model read none: it loads as the model without genomes it is
        log.info("%s: the model's config names a VCF without a reference genome; read as a model without genomes",
                 folder / S.BUNDLE_CONFIG_FILE)
        inputs["variants"] = None
        without_genomes = True
    else:
        without_genomes = False
    _settings_refused_since(saved, folder / S.BUNDLE_CONFIG_FILE)
    try:
        config: Config = config_from_dict(saved)
    except ConfigError as exc:
        raise GeximputeError(f"{folder / S.BUNDLE_CONFIG_FILE}: the model's own settings do not read here ({exc}); "
                             "the bundle was written by another geximpute version: use that version, or build the "
                             "model again with this one") from exc
    head_meta = json.loads((folder / S.HEAD_SPECS_FILE).read_text())
    check_features(head_meta.get("engineered_features"), folder)
    network = load_network(folder)
    head = HeadModel.load(folder, head_meta["conformal"], head_meta["n_features"], head_meta["coverage"],
                          head_meta.get("blend"), head_meta.get("conformal_edges"), head_meta.get("conformal_bins"))
    sequences = pq.read_table(folder / S.BUNDLE_PROMOTERS_FILE)["sequence"].to_pylist()
    links = pq.read_table(folder / S.BUNDLE_GENE_PROMOTERS_FILE)
    gene_promoter = dict(zip(links[S.GENE_ID].to_pylist(), links["promoter_row"].to_pylist(), strict=True))
    n_folds = int(head_meta.get("fold_networks", 1))
    folds = [network, *(load_network(fold_folder(folder, k)) for k in range(1, n_folds))] if n_folds > 1 else []
    stacked = bool(head_meta.get("stacked", False))
    # the promoter table of the records is set by each Bundle.predict (the reference windows or the donors' own)
    models = HybridModels(config, no_promoters(network.spec.promoter_length),
                          PromoterLookup.reference(np.zeros(0, np.int64)), network, head,
                          fold_networks=folds, stacked=stacked)
    bundle_manifest = json.loads((folder / S.BUNDLE_MANIFEST_FILE).read_text())
    return Bundle(models, gene_promoter, bundle_manifest["model_version"], folder,
                  compatibility=_without_genomes(bundle_manifest.get("compatibility")) if without_genomes
                  else bundle_manifest.get("compatibility"), reference_sequences=sequences,
                  baseline_names=tuple(head_meta.get("baselines", ())))

"""``geximpute train``: the CNN-transformer trained with Ray Train's TorchTrainer (DDP), one report per epoch.

Workers read the labelled training folds through Ray Data (``ray.train.get_dataset_shard``, one dataset split into
training and validation rows by each worker) once, then each epoch visit a fresh seeded permutation of all their
training records (cut to ``train.max_examples_per_epoch``), so
every epoch samples the whole genome rather than the first chromosomes of the files; they featurise each batch,
hide whole evidence groups at random (denoising), and minimise the squared error on standardised values. Each
epoch's report says how many training genes and chromosomes it saw. Validation uses held-out chromosomes
(``split.valid_chroms``) or, without them, a seeded holdout of the task's units (genes, samples or entries).
Every epoch writes a checkpoint; a restarted worker group resumes from the last one (``train.max_failures``);
training stops when the validation loss has not improved for ``train.patience`` epochs and the best weights are
kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from geximpute import schema as S
from geximpute.config import Config
from geximpute.errors import ConfigError, GeximputeError
from geximpute.fit.pretrain import gene_levels, pretrain_cnn, record_levels
from geximpute.model.features import GROUPS, FeatureSpec, drop_groups, featurize, to_tensors
from geximpute.model.inference import TrainedNetwork
from geximpute.model.network import HybridNet, NetworkSpec
from geximpute.runtime.console import stage
from geximpute.runtime.raytools import fit_trainer, progress_callbacks
from geximpute.science.hashing import mix64
from geximpute.science.problem import pass_rows
from geximpute.science.promoters import PromoterLookup, promoter_inputs

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
HOLDOUT_PERCENT = 15
#: which hash draws the validation units (recorded with each network, :func:`holdout_identity`): "mix64" since
#: 8fdfc09 (a linear hash before, unrecorded)
HOLDOUT_HASH = "mix64"


def holdout_task(config: Config) -> str:
    """The unit :func:`holdout` holds out for the evaluation's task: ``genes``, ``samples``, ``entries``, or
    ``donors`` for the ``samples`` task with ``evaluation.whole_donors`` (whose hidden units are whole donors: a
    held-out sample whose donor has other samples in the training rows would judge the early stopping, the tree
    count and the interval on donors that are not new)."""
    task = config.evaluation.task
    return "donors" if task == "samples" and config.evaluation.whole_donors else task


def holdout_identity(config: Config) -> dict[str, Any]:
    """What decides which units :func:`holdout` holds out under ``config``: recorded with each trained network
    (its ``metrics["holdout"]``) and compared by ``fit-head`` (:func:`check_holdout`), whose head is calibrated on
    the rows the networks did not train on."""
    return {"task": holdout_task(config), "seed": config.seed,
            "valid_chroms": sorted(str(c) for c in config.split.valid_chroms), "hash": HOLDOUT_HASH}


def check_holdout(networks: list[TrainedNetwork], config: Config, folder: Path | str) -> None:
    """Refuse to fit a head over ``networks`` (read from ``folder``) with a holdout other than the one they chose
    their epochs on: the head's held-out rows would include rows the networks trained on, and its tree count and
    interval would be judged on the networks' fitted outputs. Networks trained before the holdout was recorded pass.

    Raises:
        ConfigError: a network's recorded holdout differs from ``config``'s, naming the setting.
    """
    want = holdout_identity(config)
    for k, network in enumerate(networks):
        had = network.metrics.get("holdout")
        if not had:
            if not config.split.valid_chroms:
                log.warning("%s: network %d records no holdout (trained before it was recorded, perhaps with the "
                            "hash used before 8fdfc09, which drew other validation units): the head's held-out rows "
                            "may include rows it trained on, which makes its tree count and interval optimistic; "
                            "train it again (geximpute train)", folder, k)
            continue
        had = {"hash": "mix64", **had}  # recorded before the hash's name was (89f8713): drawn by mix64 already
        for key, value in want.items():
            if had.get(key) != value:
                setting = {"task": "evaluation.task (and evaluation.whole_donors)", "seed": "seed",
                           "valid_chroms": "split.valid_chroms", "hash": "the engine's version"}[key]
                raise ConfigError(
                    f"{folder}: network {k} chose its epochs on the validation units of {key} {had.get(key)!r}, "
                    f"this config holds out those of {value!r} ({setting}): the head would be calibrated on rows "
                    f"the network trained on. Fit the head with the config the networks were trained with, or "
                    f"train them again with this one (geximpute train)")


def holdout(table: pa.Table, task: str, use_chroms: bool, seed: int) -> np.ndarray:
    """Rows held out for validation: records on validation chromosomes, or a seeded 15% of the task's units
    (:func:`holdout_task`; ``donors`` reads the records' ``donor_id``)."""
    if use_chroms:
        return table["split"].to_numpy(zero_copy_only=False) == "valid"
    donor = donor_keys(table[S.DONOR_ID].to_numpy(zero_copy_only=False)) if task == "donors" else None
    return _held_units(table["gene_index"].to_numpy(), table["sample_index"].to_numpy(), task, seed, donor)


def holdout_grid(task: str, n_genes: int, n_samples: int, seed: int,
                 sample_donors: np.ndarray | None = None) -> np.ndarray:
    """(G, S) bool: the entries whose unit :func:`holdout` holds out when no validation chromosomes are set (its
    seeded 15% of the task's units), on the (gene, sample) grid the records' indices point into
    (``sample_donors``: (S,) the donor id of each sample, for ``donors``). Built in passes of at most
    :data:`~geximpute.science.problem.STATS_CELLS` cells (the hash's uint64 temporaries)."""
    out = np.empty((n_genes, n_samples), bool)
    sample = np.arange(n_samples)[None, :]
    donor = None
    if task == "donors":
        if sample_donors is None:
            raise ValueError("holdout_grid: the donors task needs each sample's donor id")
        donor = donor_keys(np.asarray(sample_donors))[None, :]
    rows = pass_rows(n_samples, n_genes)
    for lo in range(0, n_genes, rows):
        gene = np.arange(lo, min(lo + rows, n_genes))[:, None]
        out[lo : lo + rows] = _held_units(gene, sample, task, seed, donor)
    return out


def donor_keys(donor_ids: np.ndarray) -> np.ndarray:
    """(n,) uint64 a stable number per donor id (CRC-32 of its text): the same in every table and grid."""
    uniq, inverse = np.unique(np.asarray(donor_ids, dtype=object).astype(str), return_inverse=True)
    return np.array([zlib.crc32(u.encode()) for u in uniq], np.uint64)[inverse.reshape(-1)]


def _held_units(gene: np.ndarray, sample: np.ndarray, task: str, seed: int,
                donor: np.ndarray | None = None) -> np.ndarray:
    """Whether each (gene, sample) pair's unit (the gene, the sample, the donor or the entry, by ``task``) is held
    out (``donor``: the pairs' :func:`donor_keys`, for ``donors``)."""
    gene, sample = np.asarray(gene).astype(np.uint64), np.asarray(sample).astype(np.uint64)
    shape = np.broadcast_shapes(gene.shape, sample.shape)
    if task == "donors":
        unit = (np.asarray(donor, np.uint64),)
    else:
        unit = {"genes": (gene,), "samples": (sample,)}.get(task, (gene, sample))
    # a well-mixed hash: the held units of two seeds overlap by HOLDOUT_PERCENT of them, as independent draws do
    # (seed * 97 added to a linear hash moved the window by 3 in 100: seeds 0 and 1 shared 80% of their units)
    mixed = np.broadcast_to(mix64(*unit, seed), shape)
    return (mixed % np.uint64(100)) < HOLDOUT_PERCENT


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


#: folded into :func:`worker_of`'s hash: the workers' shares are drawn independently of the holdout's units
WORKER_TAG = 0x5744_4450  # "WDDP"


def worker_of(gene_index: np.ndarray, sample_index: np.ndarray, world: int) -> np.ndarray:
    """(N,) the Ray Train worker (0 .. ``world`` - 1) that trains on each record of the entries (``gene_index``,
    ``sample_index``): a hash of the entry, so every network's training and validation rows are shared out evenly
    whatever folds, chromosomes or files they come from, and the same way in every run and restart.

    Ray Data's split of the records hands each worker whole blocks in reading order: with one file a fold, one
    worker held most of one fold and the other most of the next, and a network whose training folds a worker
    barely held took as few steps as that worker had rows (DDP keeps workers in step), or none at all."""
    if world <= 1:
        return np.zeros(len(gene_index), np.int64)
    return (mix64(np.asarray(gene_index, np.int64), np.asarray(sample_index, np.int64), WORKER_TAG)
            % np.uint64(world)).astype(np.int64)


def _read_shard(shard, rank: int = 0, world: int = 1) -> pa.Table | None:
    """This worker's share of the records (:func:`worker_of`) as one table (None when empty), read from the whole
    dataset a batch at a time, sorted by entry: Ray Data hands blocks over in the order they finish, which differs
    between runs; sorted, every run visits the same records in the same order."""
    parts = []
    for batch in shard.iter_batches(batch_size=65536, batch_format="pyarrow"):
        if world > 1:
            mine = worker_of(batch["gene_index"].to_numpy(), batch["sample_index"].to_numpy(), world) == rank
            batch = batch.filter(pa.array(mine))
        parts.append(batch)
    records = pa.concat_tables(parts).combine_chunks() if parts else None
    if records is None or not records.num_rows:
        return None
    return records.sort_by([("gene_index", "ascending"), ("sample_index", "ascending")])


def _network_rows(table: pa.Table | None, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of one network among a worker's records, as row numbers of ``table``: the
    rows of the network's folds (the hive partition column ``fold``), split by :func:`holdout`. Row numbers, not
    copies: the worker holds one copy of its records however many networks of the run read them."""
    if table is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    mine = pc.is_in(table["fold"].cast(pa.string()), value_set=pa.array(cfg["folds"], pa.string()))
    mine = mine.to_numpy(zero_copy_only=False)
    held = holdout(table, cfg["task"], cfg["use_chroms"], cfg["seed"])
    return np.flatnonzero(mine & ~held), np.flatnonzero(mine & held)


def _batches(table: pa.Table | None, rows: np.ndarray, batch_size: int, features: FeatureSpec,
             lookup: PromoterLookup):
    """Featurised numpy batches of the ``rows`` of ``table``, in their order (validation)."""
    for lo in range(0, len(rows), batch_size):
        part = table.take(pa.array(rows[lo : lo + batch_size]))
        yield featurize(part, features, lookup.for_records(part))


def epoch_rows(n: int, limit: int | None, seed: int, epoch: int, rank: int) -> np.ndarray:
    """The rows one training epoch visits, in order: a fresh permutation of all ``n`` rows, seeded by (seed,
    epoch, worker rank), cut to ``limit``. Every row is equally likely in every epoch, wherever it is stored."""
    order = np.random.default_rng([seed, epoch, rank]).permutation(n)
    return order if limit is None else order[:limit]


def _epoch_batches(table: pa.Table, order: np.ndarray, batch_size: int, features: FeatureSpec,
                   lookup: PromoterLookup):
    """(record rows, featurised batch) of one epoch over ``table`` in ``order``; a trailing partial batch is
    dropped unless it is the only one (workers' shards have equal sizes: DDP stays in step)."""
    stop = len(order) - len(order) % batch_size if len(order) >= batch_size else len(order)
    for lo in range(0, stop, batch_size):
        part = table.take(pa.array(order[lo : lo + batch_size]))
        yield part, featurize(part, features, lookup.for_records(part))


def _saved_networks(checkpoint, device) -> dict[int, dict]:
    """Each network's state in a checkpoint of :func:`_train_loop` (by its index in the run); {} without one. A
    checkpoint of one network from before runs held several is that run's network 0."""
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as folder:
        saved = torch.load(os.path.join(folder, STATE_FILE), weights_only=True, map_location=device)
    return saved["networks"] if "networks" in saved else {0: saved}


def _warn_resume_by_position(resume_from, runs: list[NetworkRun]) -> None:
    """Log each network of ``runs`` that resumes from the state of a network of another name in ``resume_from``
    (states are matched by position: a one-network run may go on from network 0 of a fold run, on purpose; a run of
    another layout would start a network from another's weights, which the log then says)."""
    if resume_from is None:
        return
    states = _saved_networks(resume_from, "cpu")
    for index, run in enumerate(runs):
        saved = (states.get(index) or {}).get("metrics") or {}
        if saved.get("network") not in (None, run.name):
            log.warning("train: network %d (%s) resumes from the state of network %r in %s (states are matched by "
                        "position)", index, run.name, saved["network"], resume_from.path)


def _finished(state: dict | None, cfg: dict) -> bool:
    return state is not None and (state["epoch"] >= cfg["epochs"] - 1 or state["bad_epochs"] >= cfg["patience"])


def _train_loop(cfg: dict) -> None:
    """Ray Train worker: the run's networks one after another (``cfg["networks"]``), each one epoch at a time, with
    a checkpoint of every network's state and one report per epoch. A restarted worker group resumes each network
    where the last checkpoint left it: finished networks are kept, the one in progress continues."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(cfg["threads"])))
    torch.set_flush_denormal(True)  # tiny Adam moments otherwise slow CPU steps down
    device = ray.train.torch.get_device()
    # a copy: the table arrives read-only from the object store, and torch warns about sharing a read-only array
    promoters = torch.tensor(cfg["promoters"], device=device) if len(cfg["promoters"]) else None
    # the run's own checkpoint (after a worker failure) wins over the one it was asked to start from
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and cfg["resume_path"]:
        checkpoint = ray.train.Checkpoint.from_directory(cfg["resume_path"])
    states = _saved_networks(checkpoint, device)
    # this worker's records of every network's folds, read once (one Ray Data execution for the run, not one per
    # network or epoch); each network reads its folds' training and validation rows of them by row number
    records = _read_shard(ray.train.get_dataset_shard("records"), rank, world)
    for index, network in enumerate(cfg["networks"]):
        if _finished(states.get(index), cfg):
            continue
        _train_network(cfg, network, index, records, states, promoters, device, rank, world)


def _train_network(cfg: dict, network: dict, index: int, records: pa.Table | None, states: dict[int, dict],
                   promoters: torch.Tensor | None, device: torch.device, rank: int, world: int) -> None:
    """Train network ``index`` of the run (``network``: its settings) on its folds' rows of this worker's
    ``records``, from its state in ``states`` when it has one; every epoch's checkpoint holds ``states``, updated."""
    import ray.train
    import ray.train.torch

    lookup = cfg["promoter_lookup"]
    torch.manual_seed(cfg["seed"])  # each network starts as it would in a run of its own
    net = HybridNet(network["spec"]).to(device)
    saved = states.get(index)
    state = {"epoch": -1, "best_val": float("inf"), "best_model": None, "bad_epochs": 0, "best_epoch": -1}
    pretrain_r: list[float] = []
    if saved is None and rank == 0 and network["spec"].use_promoter and promoters is not None:
        # rank 0 only: wrapping the model in DDP below copies rank 0's weights to every worker
        pretrain_r = pretrain_cnn(net.promoter_cnn, network["spec"].d_model, promoters, network["gene_levels"],
                                  epochs=cfg["pretrain_epochs"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                  seed=cfg["seed"])
        if pretrain_r:
            log.info("%s: CNN pre-training: %d training genes, validation Pearson by epoch %s (kept the best)",
                     network["name"], len(network["gene_levels"].train_rows),
                     " ".join(f"{r:.3f}" for r in pretrain_r))
    # a pre-trained CNN stays as pre-training left it (every rank decides alike, before DDP wraps the model)
    freeze = (cfg["freeze_cnn"] and network["spec"].use_promoter and promoters is not None
              and cfg["pretrain_epochs"] > 0 and network["gene_levels"].usable)
    if freeze:
        net.freeze_promoter_cnn(None)
    model = ray.train.torch.prepare_model(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if saved is not None:
        _unwrap(model).load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = {k: saved.get(k, state[k]) for k in state}
        pretrain_r = [r for r in [saved.get("metrics", {}).get("pretrain_valid_pearson")] if r is not None]
    if freeze:  # the shared (broadcast or restored) weights, encoded once for every promoter of the table
        _unwrap(model).freeze_promoter_cnn(promoters)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    train_rows, valid_rows = _network_rows(records, {**cfg, **network})
    n_train = len(train_rows)
    if world > 1:
        # the shares are even by a hash, not exactly equal: every worker takes as many steps as the fewest rows allow
        # collectives on the worker's device: NCCL (Ray Train's backend where workers hold GPUs) reduces CUDA tensors
        # only, a CPU tensor there stopped every multi-GPU run at its first step
        fewest = torch.tensor([n_train], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(fewest, op=torch.distributed.ReduceOp.MIN)
        n_train = int(fewest.cpu()[0])
    per_worker_limit = cfg["max_examples"] // world if cfg["max_examples"] else None
    per_worker_limit = n_train if per_worker_limit is None else min(per_worker_limit, n_train)
    gene_chrom = network["gene_chrom"]
    features = network["features"]

    for epoch in range(state["epoch"] + 1, cfg["epochs"]):
        if state["bad_epochs"] >= cfg["patience"]:
            break
        t0 = time.perf_counter()
        model.train()
        rng = np.random.default_rng(cfg["seed"] * 1000 + epoch * 10 + rank)
        loss_sum, n_seen = 0.0, 0
        genes_seen = torch.zeros(len(gene_chrom), dtype=torch.float64)
        order = train_rows[epoch_rows(len(train_rows), per_worker_limit, cfg["seed"], epoch, rank)]
        for part, batch in _epoch_batches(records, order, cfg["batch_size"], features, lookup) if len(order) else ():
            genes_seen[torch.as_tensor(part["gene_index"].to_numpy().astype(np.int64))] = 1.0
            batch = drop_groups(batch, rng, *cfg["drop"])
            if cfg["drop_promoter"] > 0:
                # the stand-in now and then: the network cannot lean on recognising a training gene's promoter
                drop = rng.random(len(batch["promoter_index"])) < cfg["drop_promoter"]
                for key in ("promoter_index", "promoter_index_b"):
                    batch[key] = np.where(drop, -1, batch[key])
            tensors = to_tensors(batch, device)
            with autocast:
                pred, _ = model(tensors, promoters)
            loss = torch.mean((pred.float() - tensors["target"]) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss_sum += loss.detach().item() * len(pred)
            n_seen += len(pred)
        model.eval()
        sq, count = 0.0, 0
        with torch.no_grad():
            for batch in _batches(records, valid_rows, 4 * cfg["batch_size"], features, lookup):
                tensors = to_tensors(batch, device)
                with autocast:
                    pred, _ = model(tensors, promoters)
                sq += float(torch.sum((pred.float() - tensors["target"]) ** 2))
                count += len(pred)
        totals = torch.tensor([sq, count, loss_sum, n_seen], dtype=torch.float64, device=device)
        if world > 1:
            genes_seen = genes_seen.to(device)
            torch.distributed.all_reduce(totals)
            torch.distributed.all_reduce(genes_seen)
        totals = totals.cpu()
        seen = genes_seen.cpu().numpy() > 0
        chroms_seen = np.unique(gene_chrom[seen & (gene_chrom >= 0)])
        # no validation rows (a warning at the start): every epoch's weights replace the last, none is judged; a
        # loss gone NaN on validation rows (a diverged epoch) is a bad epoch, its weights never kept
        unjudged = float(totals[1]) == 0
        val_loss = float(totals[0] / totals[1]) if not unjudged else float("nan")
        train_loss = float(totals[2] / max(totals[3], 1))
        improved = not unjudged and val_loss < state["best_val"] - 1e-4
        if unjudged or improved:
            if improved:
                state["best_val"] = val_loss
            state["bad_epochs"], state["best_epoch"] = 0, epoch
            state["best_model"] = {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        metrics = {"network": network["name"], "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                   "best_val": state["best_val"], "best_epoch": state["best_epoch"], "examples": int(totals[3]),
                   "seconds": time.perf_counter() - t0,
                   "genes_seen": int(seen.sum()), "genes_train": network["n_train_genes"],
                   "chroms_seen": len(chroms_seen), "chroms_train": network["n_train_chroms"],
                   "chroms_unseen": sorted(set(network["train_chroms"])
                                           - {network["chrom_names"][c] for c in chroms_seen}),
                   "pretrain_valid_pearson": max((r for r in pretrain_r if np.isfinite(r)), default=None)}
        if rank == 0:
            log.info("%s epoch %d: %d examples, %d of %d training genes and %d of %d chromosomes seen%s",
                     network["name"], epoch,
                     metrics["examples"], metrics["genes_seen"], metrics["genes_train"], metrics["chroms_seen"],
                     metrics["chroms_train"], f" (never: {metrics['chroms_unseen']})" if metrics["chroms_unseen"]
                     else "")
        states[index] = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), **state,
                         "metrics": metrics}
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                torch.save({"networks": states}, os.path.join(folder, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)


def fold_dirs(records_dir: Path, folds: list[int]) -> list[Path]:
    """The Parquet folders of the given training folds of a prepare output."""
    dirs = [records_dir / "train" / f"fold={f}" for f in folds]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"training folds missing: {missing}; run prepare with training folds first")
    return dirs


def latest_checkpoint(storage: Path, name: str):
    """The newest checkpoint of run ``name`` under ``storage`` (a ``ray.train.Checkpoint``), or None."""
    from ray.train import Checkpoint

    runs = sorted((p for p in (storage / name).glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return Checkpoint.from_directory(str(runs[-1])) if runs else None


@dataclass
class NetworkRun:
    """One network of a Ray Train run of :func:`train_networks`: its name, the training folds it reads and its
    variant.

    Attributes:
        train_dirs: Parquet folders of labelled training records (``train/fold=<i>`` of a prepare output).
        levels: (level, valid_gene) per gene for the CNN's gene-level pre-training
            (:func:`geximpute.fit.pretrain.visible_levels`); default: from the training records.
    """

    name: str
    train_dirs: list[Path]
    use_promoter: bool = True
    use_context: bool = True
    levels: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def folds(self) -> list[str]:
        """The fold of each folder (``fold=<i>``), as the hive partition column reads it."""
        folds = []
        for d in self.train_dirs:
            key, _, value = Path(d).name.partition("=")
            if key != "fold" or not value:
                raise ValueError(f"{d}: not a training fold folder of a prepare output (expected train/fold=<i>)")
            folds.append(value)
        return folds


def train_network(
    config: Config,
    train_dirs: list[Path],
    records_dir: Path,
    gene_ids: np.ndarray,
    n_tissues: int,
    *,
    use_promoter: bool = True,
    use_context: bool = True,
    storage: Path,
    name: str = "network",
    resume_from=None,
    levels: tuple[np.ndarray, np.ndarray] | None = None,
) -> TrainedNetwork:
    """Train one network variant with ``TorchTrainer`` and return its best weights: :func:`train_networks` with one
    network (``train_dirs``, ``use_promoter``, ``use_context`` and ``levels`` as in :class:`NetworkRun`)."""
    run = NetworkRun(name, list(train_dirs), use_promoter, use_context, levels)
    return train_networks(config, [run], records_dir, gene_ids, n_tissues, storage=storage, name=name,
                          resume_from=resume_from)[0]


def carries_family(dirs: list[Path]) -> bool:
    """Whether the context records under ``dirs`` carry the family level (:data:`geximpute.schema.FAMILY_LEVEL`)."""
    import pyarrow.dataset as pads

    names = [pads.dataset(d, format="parquet", partitioning=S.record_partitioning()).schema.names for d in dirs]
    return any(S.FAMILY_LEVEL in n for n in names)


def absent_groups(dirs: list[Path]) -> tuple[str, ...]:
    """The evidence groups (:data:`geximpute.model.features.GROUPS`) that no context record under ``dirs`` has: a
    task's folds hide them in every record (a ``samples`` fold's records have no neighbour, a ``genes`` fold's no
    other tissue and no gene mean). Every record is read, a batch of the four columns at a time, until each group
    has been seen once: a group that is there is found in the first batch, and one that is not is empty lists."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    parts = [pads.dataset(str(d), format="parquet", partitioning=S.record_partitioning()) for d in dirs]
    seen = dict.fromkeys(GROUPS, False)
    rows = 0
    for batch in (parts[0] if len(parts) == 1 else pads.dataset(parts)).to_batches(
            columns=["nb_value", "tis_value", "gene_mean", "tissue_mean"]):
        if not batch.num_rows:
            continue
        rows += batch.num_rows
        seen["neighbours"] |= pc.max(pc.list_value_length(batch.column("nb_value"))).as_py() > 0
        seen["tissues"] |= pc.max(pc.list_value_length(batch.column("tis_value"))).as_py() > 0
        seen["gene"] |= any(np.isfinite(batch.column(c).to_numpy(zero_copy_only=False)).any()
                            for c in ("gene_mean", "tissue_mean"))
        if all(seen.values()):
            break
    return tuple(g for g in GROUPS if not seen[g]) if rows else ()


#: beside a Ray Train run's folder: what it trains (:func:`_run_fingerprint`), so that a run of the same name is
#: resumed only when it trains the same networks on the same records
RUN_FINGERPRINT = ".{name}.fingerprint.json"


def _run_fingerprint(config: Config, runs: list[NetworkRun], records_dir: Path,
                     resume_from: Any = None) -> dict[str, Any]:
    """What a training run trains: the records (their prepare manifest, or the folds' files by name, size and
    time), the networks and their folds, and every setting that moves the weights (not how many workers or CPUs
    train them, which a resumed run may change)."""
    manifest = Path(records_dir) / "_manifest.json"
    if manifest.is_file():
        records = hashlib.sha256(manifest.read_bytes()).hexdigest()
    else:
        files = sorted(p for run in runs for d in run.train_dirs for p in Path(d).rglob("*.parquet"))
        records = hashlib.sha256("\n".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                           for p in files).encode()).hexdigest()
    train = {k: v for k, v in dataclasses.asdict(config.train).items()
             if k not in ("num_workers", "cpus_per_worker", "use_gpu", "max_failures")}
    settings = {"train": train, "model": dataclasses.asdict(config.model), "seed": config.seed,
                "promoter": dataclasses.asdict(config.promoter), "context": dataclasses.asdict(config.context),
                "split": dataclasses.asdict(config.split), "task": holdout_task(config), "holdout_hash": HOLDOUT_HASH}
    def levels(run: NetworkRun) -> str | None:  # the CNN's pre-training levels (an input replaced moves them)
        if run.levels is None:
            return None
        digest = hashlib.sha256()
        for part in run.levels:
            digest.update(np.ascontiguousarray(part).tobytes())
        return digest.hexdigest()

    return {"records": records,
            "networks": [[run.name, [str(d) for d in run.train_dirs], run.use_promoter, run.use_context, levels(run)]
                         for run in runs],
            "settings": hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest(),
            "resume_from": None if resume_from is None else str(resume_from.path)}


def _start_or_resume(run_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Keep ``run_dir`` (Ray Train resumes a run of the same name from its checkpoints) only when it trains what
    ``fingerprint`` says; a run of other records or settings (an earlier ``train`` or ``build`` into the same
    folder) is removed first, or its finished networks would come back as this run's. The fingerprint is written
    beside the run's folder before it starts."""
    mark = run_dir.parent / RUN_FINGERPRINT.format(name=run_dir.name)
    recorded = None
    with contextlib.suppress(OSError, ValueError):
        recorded = json.loads(mark.read_text())
    if run_dir.exists() and recorded != fingerprint:
        log.warning("train %s: %s holds a run of other records or settings (%s); it is removed and training starts "
                    "afresh", run_dir.name, run_dir, "no fingerprint" if recorded is None else "another fingerprint")
        shutil.rmtree(run_dir)
    elif run_dir.exists():
        log.info("train %s: resuming the run in %s (the same records and settings)", run_dir.name, run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # whole or not at all: a half-written fingerprint read as none would remove a resumable run
    temporary = mark.parent / f".{mark.name}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(fingerprint))
    os.replace(temporary, mark)


def _check_worker_rows(run: NetworkRun, table: pa.Table, valid: np.ndarray, world: int) -> None:
    """Refuse a run in which some worker would hold none of the network's training rows (DDP keeps the workers in
    step: every worker would take as many steps as that one, none); log the spread of the workers' shares.

    Raises:
        GeximputeError: a worker's share of the training rows is empty (fewer rows than workers, near enough).
    """
    if world <= 1:
        return
    train = ~valid
    share = np.bincount(worker_of(table["gene_index"].to_numpy()[train], table["sample_index"].to_numpy()[train],
                                  world), minlength=world)
    if share.min() == 0:
        raise GeximputeError(
            f"train {run.name}: {int(train.sum())} training record(s) in "
            f"{', '.join(str(d) for d in run.train_dirs)} for train.num_workers = {world}: worker(s) "
            f"{', '.join(str(w) for w in np.flatnonzero(share == 0))} would hold none, and DDP trains every worker "
            "as many steps as the fewest rows allow (none). Train with fewer workers (train.num_workers)")
    log.info("train %s: the %d workers hold %d-%d of its training records each (each epoch takes %d a worker at "
             "most)", run.name, world, int(share.min()), int(share.max()), int(share.min()))


def _network_settings(config: Config, run: NetworkRun, gene_ids: np.ndarray, n_tissues: int,
                      lookup: PromoterLookup) -> dict:
    """What the workers need to train ``run``'s network (its spec, feature scaling, validation split, gene-level
    pre-training targets and chromosome bookkeeping), from its training records."""
    table = pa.concat_tables(
        pq.ParquetDataset(d, partitioning=S.record_partitioning()).read(
            columns=["target", "split", "gene_index", "sample_index", "chrom", S.DONOR_ID])
        for d in run.train_dirs
    )
    labels = table["target"].to_numpy(zero_copy_only=False)
    use_chroms = bool(config.split.valid_chroms) and bool(np.any(table["split"].to_numpy(zero_copy_only=False)
                                                                 == "valid"))
    valid = holdout(table, holdout_task(config), use_chroms, config.seed)
    if valid.all():
        raise GeximputeError(
            f"train {run.name}: every one of the {len(valid)} training records in "
            f"{', '.join(str(d) for d in run.train_dirs)} is held out for validation"
            + (f" (they all lie on split.valid_chroms {list(config.split.valid_chroms)})" if use_chroms else "")
            + ": nothing is left to train on. Give the network more units (genes, samples or donors), more "
              "train.folds or a larger train.fold_fraction, or other split.valid_chroms")
    if not valid.any():
        log.warning("train %s: the holdout of the %s task leaves none of its %d training records for validation "
                    "(few units: more train.folds, a larger train.fold_fraction, another seed or "
                    "split.valid_chroms would give some): it trains every epoch, without early stopping, and "
                    "keeps the last", run.name, holdout_task(config), len(valid))
    _check_worker_rows(run, table, valid, config.train.num_workers)
    train_labels = labels[~valid]
    features = FeatureSpec(
        k_neighbours=config.context.k_neighbours,
        n_tissues=n_tissues,
        promoter_length=config.promoter.length,
        value_center=float(np.mean(train_labels)),
        value_scale=float(np.std(train_labels)) or 1.0,
        absent=absent_groups(run.train_dirs),
    )
    if features.absent:
        log.info("train: %s: no training record has its %s (the folds hide them as the task does); predictions "
                 "hide them too", run.name, " or ".join(features.absent))
    # records that carry the family level (prepare's context.family) train a network that reads it
    family = carries_family(run.train_dirs)
    spec = NetworkSpec.of(config.model, n_tissues=n_tissues, promoter_length=config.promoter.length,
                          use_promoter=run.use_promoter, use_context=run.use_context, family_input=family)
    # the chromosome of each gene, to report which chromosomes an epoch reached
    chrom_names, chrom_code = np.unique(np.asarray(table["chrom"].to_pylist(), dtype=object), return_inverse=True)
    gene_chrom = np.full(len(gene_ids), -1, dtype=np.int64)
    gene_index = table["gene_index"].to_numpy().astype(np.int64)
    gene_chrom[gene_index] = chrom_code
    train_genes = np.unique(gene_index[~valid])
    levels = run.levels if run.levels is not None else record_levels(gene_index, labels, valid, len(gene_ids))
    settings = {
        "name": run.name,
        "folds": run.folds,
        "spec": spec,
        "features": features,
        "use_chroms": use_chroms,
        "gene_levels": gene_levels(*levels, lookup.gene_row, config.seed),
        "gene_chrom": gene_chrom,
        "chrom_names": [str(c) for c in chrom_names],
        "n_train_genes": len(train_genes),
        "train_chroms": sorted({str(chrom_names[c]) for c in np.unique(gene_chrom[train_genes])}),
        "n_train_chroms": len(np.unique(gene_chrom[train_genes])),
    }
    log.info("train %s: %d training and %d validation examples (%s)", run.name, int((~valid).sum()),
             int(valid.sum()), "chromosomes" if use_chroms else "unit holdout")
    return settings


def train_networks(
    config: Config,
    runs: list[NetworkRun],
    records_dir: Path,
    gene_ids: np.ndarray,
    n_tissues: int,
    *,
    storage: Path,
    name: str,
    resume_from=None,
) -> list[TrainedNetwork]:
    """Train the networks of ``runs`` one after another in one ``TorchTrainer`` run (one worker group start for all
    of them: each worker reads the union of their folds once and keeps one copy of its share, :func:`worker_of`,
    each network reading its rows by row number) and return each one's best weights.

    Args:
        config: the resolved config (``model``, ``train``, ``split``, ``evaluation.task``, ``seed``).
        runs: the networks, in the order they are trained.
        records_dir: the prepare output holding ``promoters.parquet`` and ``gene_promoters.parquet``.
        gene_ids: ids of the problem's genes (``gene_index`` order).
        n_tissues: tissue vocabulary size.
        storage: folder for Ray Train's runs and checkpoints.
        name: run name (a run of the same name and storage resumes).
        resume_from: a ``ray.train.Checkpoint`` to continue from (each network from its state there, by position;
            a network whose state there has another name is logged).
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    tc = config.train
    _warn_resume_by_position(resume_from, runs)
    promoters, lookup = promoter_inputs(records_dir, gene_ids, config.promoter.length)
    networks = [_network_settings(config, run, gene_ids, n_tissues, lookup) for run in runs]
    folders = sorted({str(d) for run in runs for d in run.train_dirs})
    # one dataset of every network's folds, taken apart by each worker (the fold is a hive partition column, the
    # training/validation split a function of the row); not split by Ray Data: each worker runs the read itself
    # and keeps its share by entry (worker_of), balanced within every network's folds
    records = ray.data.read_parquet(folders, num_cpus=config.ray.cpus_per_task)
    data_config = DataConfig(datasets_to_split=[])
    loop_config = {
        "networks": networks,
        "promoters": promoters,
        "promoter_lookup": lookup,
        "seed": config.seed,
        "lr": tc.lr,
        "weight_decay": tc.weight_decay,
        "epochs": tc.epochs,
        "patience": tc.patience,
        "batch_size": tc.batch_size,
        "drop": (tc.drop_neighbours, tc.drop_tissues, tc.drop_gene),
        "drop_promoter": tc.drop_promoter,
        "max_examples": tc.max_examples_per_epoch,
        "pretrain_epochs": tc.pretrain_epochs,
        "freeze_cnn": tc.freeze_cnn,
        "threads": tc.cpus_per_worker,
        "resume_path": resume_from.path if resume_from is not None else None,
        "task": holdout_task(config),
    }
    _start_or_resume(Path(storage) / name, _run_fingerprint(config, runs, records_dir, resume_from))
    log.info("train %s: %d network(s) (%s), %d promoters, %d worker(s)%s", name, len(runs),
             ", ".join(run.name for run in runs), len(promoters), tc.num_workers, " with GPU" if tc.use_gpu else "")
    progress = stage(f"train: {name}", total=tc.epochs * len(runs), unit="epochs")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})},
        ),
        datasets={"records": records},
        dataset_config=data_config,
        run_config=RunConfig(
            storage_path=str(storage.resolve()),
            name=name,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=progress_callbacks(progress.counter()),
        ),
    )
    with progress:
        result = fit_trainer(trainer)
    states = _saved_networks(result.checkpoint, "cpu")
    seconds = round(time.perf_counter() - t0, 1)
    trained = []
    for index, (run, settings) in enumerate(zip(runs, networks, strict=True)):
        saved = states[index]
        if saved["best_model"] is None:  # validation rows at every epoch, and never a finite loss on them
            raise GeximputeError(
                f"train {run.name}: the validation loss was NaN at every one of its {saved['epoch'] + 1} epochs "
                "(the training diverged, or its records carry NaN features): no weights to keep. Lower "
                "train.lr, or check the inputs")
        best = saved["best_model"]
        metrics = {**saved.get("metrics", result.metrics), "seconds": seconds, "holdout": holdout_identity(config)}
        if np.isfinite(saved["best_val"]):
            log.info("train %s: best validation loss %.4f at epoch %d of %d (its weights kept)", run.name,
                     saved["best_val"], saved.get("best_epoch", -1) + 1, saved["epoch"] + 1)
        else:
            log.info("train %s: no validation rows: the weights of the last of %d epochs kept", run.name,
                     saved["epoch"] + 1)
        trained.append(TrainedNetwork(spec=settings["spec"], features=settings["features"], state=best,
                                      metrics=metrics))
    log.info("train %s: %d network(s) in %.0f s", name, len(runs), seconds)
    return trained

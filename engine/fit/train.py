"""``geximpute train``: the CNN-transformer trained with Ray Train's TorchTrainer (DDP), one report per epoch.

Workers read the labelled training folds through Ray Data (``ray.train.get_dataset_shard``), featurise each
Arrow batch, hide whole evidence groups at random (denoising), and minimise the squared error on standardised
values. Validation uses held-out chromosomes (``split.valid_chroms``) or, without them, a seeded holdout of the
task's units (genes, samples or entries). Every epoch writes a checkpoint; a restarted worker group resumes from
the last one (``train.max_failures``); training stops when the validation loss has not improved for
``train.patience`` epochs and the best weights are kept.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from engine import schema as S
from engine.config import Config
from engine.model.features import FeatureSpec, PromoterLookup, drop_groups, featurize, one_hot_promoters, to_tensors
from engine.model.network import HybridNet, NetworkSpec

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
HOLDOUT_PERCENT = 15


def holdout(table: pa.Table, task: str, use_chroms: bool, seed: int) -> np.ndarray:
    """Rows held out for validation: records on validation chromosomes, or a seeded 15% of the task's units."""
    if use_chroms:
        return table["split"].to_numpy(zero_copy_only=False) == "valid"
    gene = table["gene_index"].to_numpy().astype(np.uint64)
    sample = table["sample_index"].to_numpy().astype(np.uint64)
    unit = {"genes": gene, "samples": sample}.get(task, gene * np.uint64(1_000_003) + sample)
    mixed = (unit * np.uint64(2654435761) + np.uint64(seed * 97 + 13)) % np.uint64(2**32)
    return (mixed % np.uint64(100)) < HOLDOUT_PERCENT


def promoter_inputs(records_dir: Path, gene_ids: np.ndarray, length: int) -> tuple[np.ndarray, PromoterLookup]:
    """(one-hot promoter table (P, 4, L) uint8, the promoter rows of each record) of a prepare output.

    Records read their gene's reference window, or, with personal genomes (``donor_promoters.parquet``), their
    donor's two haplotypes.
    """
    promoters = pq.read_table(records_dir / "promoters.parquet")
    links = pq.read_table(records_dir / "gene_promoters.parquet")
    table = one_hot_promoters(promoters["sequence"].to_pylist(), length)
    personal = records_dir / "donor_promoters.parquet"
    samples = pq.read_table(records_dir / "samples.parquet", columns=[S.DONOR_ID])[S.DONOR_ID].to_pylist()
    lookup = make_lookup(promoters["promoter_id"].to_pylist(), links, gene_ids, samples,
                         pq.read_table(personal) if personal.is_file() else None)
    return table, lookup


def make_lookup(promoter_ids: list[str], gene_promoters: pa.Table, gene_ids: np.ndarray, sample_donors: list[str],
                donor_promoters: pa.Table | None) -> PromoterLookup:
    """The :class:`PromoterLookup` of records over ``gene_ids`` and samples whose donors are ``sample_donors``.

    Args:
        promoter_ids: ids of the rows of the one-hot table.
        gene_promoters: ``gene_id`` -> ``promoter_id`` of the reference windows (schema.GENE_PROMOTERS).
        gene_ids: (G,) the records' ``gene_index`` order.
        sample_donors: (S,) donor id of each ``sample_index``.
        donor_promoters: (gene, donor) -> haplotype ids where they differ from the reference, or None.
    """
    row_of = {pid: i for i, pid in enumerate(promoter_ids)}
    gene_row = {g: row_of[p] for g, p in zip(gene_promoters[S.GENE_ID].to_pylist(),
                                            gene_promoters["promoter_id"].to_pylist(), strict=True)}
    rows = np.array([gene_row.get(g, -1) for g in gene_ids], dtype=np.int64)
    if donor_promoters is None or donor_promoters.num_rows == 0:
        return PromoterLookup.reference(rows)
    donors, sample_donor = np.unique(np.asarray(sample_donors, dtype=object), return_inverse=True)
    donor_of = {d: i for i, d in enumerate(donors)}
    gene_of = {g: i for i, g in enumerate(gene_ids)}
    g = np.array([gene_of.get(x, -1) for x in donor_promoters[S.GENE_ID].to_pylist()], dtype=np.int64)
    d = np.array([donor_of.get(x, -1) for x in donor_promoters[S.DONOR_ID].to_pylist()], dtype=np.int64)
    a = np.array([row_of.get(x, -1) for x in donor_promoters["promoter_a"].to_pylist()], dtype=np.int64)
    b = np.array([row_of.get(x, -1) for x in donor_promoters["promoter_b"].to_pylist()], dtype=np.int64)
    keep = (g >= 0) & (d >= 0) & (a >= 0) & (b >= 0)
    keys = g[keep] * len(donors) + d[keep]
    order = np.argsort(keys, kind="stable")
    return PromoterLookup(rows, sample_donor.astype(np.int64), keys[order],
                          np.stack([a[keep], b[keep]], axis=1)[order], len(donors))


class PromoterEncoderCache(torch.nn.Module):
    """Inference stand-in for ``HybridNet.promoter_cnn``: each row of a promoter table is encoded once, then reused.

    ``HybridNet.promoter_embedding`` passes the CNN the rows a batch needs, ``promoters[unique]``. Given the
    (P, 1) table of row numbers :attr:`row_ids` as its ``promoters``, it passes (U, 1) row numbers here instead of
    one-hot sequences, and this module returns their embeddings, running the wrapped CNN only on rows it has not
    encoded before. Donors share reference promoters and a gene has few distinct haplotypes, so the CNN's work
    follows the unique haplotypes, not the entries. The math is the network's own: in eval mode a sequence's
    embedding does not depend on the other sequences of its batch.

    Args:
        cnn: the network's ``PromoterCNN``.
        table: (P, 4, L) one-hot promoter table (kept by reference, not copied).
        chunk: sequences per CNN call when many rows are new at once: small calls keep the activations in the CPU's
            cache (64 ran 2x faster per sequence than 512 on the development machine, docs/benchmarks.md).
    """

    def __init__(self, cnn: torch.nn.Module, table: np.ndarray, chunk: int = 64) -> None:
        super().__init__()
        self.cnn = cnn
        with warnings.catch_warnings():  # a read-only array from Ray's object store: only ever read here
            warnings.simplefilter("ignore", UserWarning)
            self.table = torch.as_tensor(table)  # (P, 4, L), shares memory with ``table``
        self.chunk = chunk
        self.embeddings: torch.Tensor | None = None  # (P, D) once the first row is encoded
        self.known = torch.zeros(len(table), dtype=torch.bool)  # (P,)
        self.encoded = 0  # sequences run through the CNN so far

    @property
    def row_ids(self) -> torch.Tensor:
        """(P, 1) int64 row numbers: what the network takes as its promoter table when this module stands in."""
        return torch.arange(len(self.known), dtype=torch.int64)[:, None]

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """(U, 1) int64 row numbers -> (U, D) embeddings."""
        rows = rows[:, 0].cpu()
        new = torch.unique(rows[~self.known[rows]])
        for start in range(0, len(new), self.chunk):
            part = new[start : start + self.chunk]
            encoded = self.cnn(self.table[part])  # (u, D)
            if self.embeddings is None:
                self.embeddings = torch.zeros((len(self.known), encoded.shape[1]), dtype=encoded.dtype)
            self.embeddings[part] = encoded
            self.known[part] = True
            self.encoded += len(part)
        if self.embeddings is None:  # no row at all
            return torch.zeros((0, self.cnn.proj.out_features))
        return self.embeddings[rows]


@dataclass
class TrainedNetwork:
    """A trained network: its spec, its input spec and its best weights."""

    spec: NetworkSpec
    features: FeatureSpec
    state: dict
    metrics: dict
    # the eval-mode network of run_network and its promoter cache, built once per process (not pickled)
    _inference: tuple | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def model(self) -> HybridNet:
        net = HybridNet(self.spec)
        net.load_state_dict(self.state)
        return net.eval()

    def inference(self, promoters: np.ndarray) -> tuple[HybridNet, torch.Tensor | None]:
        """(the eval-mode network, the promoter table to pass its forward) for predicting with ``promoters``.

        The network is built once; with a promoter branch its CNN is wrapped in a :class:`PromoterEncoderCache` of
        ``promoters``, kept while later calls pass the same table object (a new table starts a new cache).
        """
        if self._inference is not None and self._inference[1] is promoters:
            model, _, table = self._inference
            return model, table
        model = self._inference[0] if self._inference is not None else self.model()
        table = None
        if self.spec.use_promoter:
            cnn = model.promoter_cnn.cnn if isinstance(model.promoter_cnn, PromoterEncoderCache) else model.promoter_cnn
            if len(promoters):
                model.promoter_cnn = PromoterEncoderCache(cnn, promoters)
                table = model.promoter_cnn.row_ids
            else:
                model.promoter_cnn = cnn
        self._inference = (model, promoters, table)
        return model, table

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_inference"] = None
        return state


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _batches(shard, batch_size: int, cfg: dict, lookup: PromoterLookup, limit: int | None, shuffle: bool):
    """Featurised numpy batches of a Ray Data shard (each worker gets equal-sized shards: DDP stays in step)."""
    seen = 0
    kwargs = {"local_shuffle_buffer_size": 4 * batch_size, "local_shuffle_seed": cfg["seed"]} if shuffle else {}
    for table in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=shuffle, **kwargs):
        if limit is not None and seen >= limit:
            break
        seen += table.num_rows
        yield featurize(table, cfg["features"], lookup.for_records(table))


def _train_loop(cfg: dict) -> None:
    """Ray Train worker: one epoch at a time, a checkpoint and one report per epoch."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(max(1, int(cfg["threads"])))
    torch.set_flush_denormal(True)  # tiny Adam moments otherwise slow CPU steps down
    device = ray.train.torch.get_device()
    net = HybridNet(cfg["spec"])
    model = ray.train.torch.prepare_model(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    promoters = torch.as_tensor(cfg["promoters"], device=device) if len(cfg["promoters"]) else None
    lookup = cfg["promoter_lookup"]
    state = {"epoch": -1, "best_val": float("inf"), "best_model": None, "bad_epochs": 0}
    # the run's own checkpoint (after a worker failure) wins over the one it was asked to start from
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and cfg["resume_path"]:
        checkpoint = ray.train.Checkpoint.from_directory(cfg["resume_path"])
    if checkpoint:
        with checkpoint.as_directory() as folder:
            saved = torch.load(os.path.join(folder, STATE_FILE), weights_only=True, map_location=device)
        _unwrap(model).load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = {k: saved[k] for k in state}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")
    per_worker_limit = cfg["max_examples"] // world if cfg["max_examples"] else None

    for epoch in range(state["epoch"] + 1, cfg["epochs"]):
        if state["bad_epochs"] >= cfg["patience"]:
            break
        t0 = time.perf_counter()
        model.train()
        rng = np.random.default_rng(cfg["seed"] * 1000 + epoch * 10 + rank)
        loss_sum, n_seen = 0.0, 0
        for batch in _batches(train_shard, cfg["batch_size"], cfg, lookup, per_worker_limit, shuffle=True):
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
            loss_sum += float(loss) * len(pred)
            n_seen += len(pred)
        model.eval()
        sq, count = 0.0, 0
        with torch.no_grad():
            for batch in _batches(valid_shard, 4 * cfg["batch_size"], cfg, lookup, None, shuffle=False):
                tensors = to_tensors(batch, device)
                with autocast:
                    pred, _ = model(tensors, promoters)
                sq += float(torch.sum((pred.float() - tensors["target"]) ** 2))
                count += len(pred)
        totals = torch.tensor([sq, count, loss_sum, n_seen], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(totals)
        val_loss = float(totals[0] / max(totals[1], 1))
        train_loss = float(totals[2] / max(totals[3], 1))
        if val_loss < state["best_val"] - 1e-4:
            state["best_val"], state["bad_epochs"] = val_loss, 0
            state["best_model"] = {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "best_val": state["best_val"],
                   "examples": int(totals[3]), "seconds": time.perf_counter() - t0}
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), **state},
                           os.path.join(folder, STATE_FILE))
                saved = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=saved)


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
) -> TrainedNetwork:
    """Train one network variant with ``TorchTrainer`` and return its best weights.

    Args:
        config: the resolved config (``model``, ``train``, ``split``, ``evaluation.task``, ``seed``).
        train_dirs: Parquet folders of labelled training records (folds of ``train/`` of a prepare output).
        records_dir: the prepare output holding ``promoters.parquet`` and ``gene_promoters.parquet``.
        gene_ids: ids of the problem's genes (``gene_index`` order).
        n_tissues: tissue vocabulary size.
        use_promoter, use_context: the variant (both: hybrid; ablations otherwise).
        storage: folder for Ray Train's runs and checkpoints.
        name: run name (a run of the same name and storage resumes).
        resume_from: a ``ray.train.Checkpoint`` to continue from.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    tc = config.train
    table = pa.concat_tables(
        pq.ParquetDataset(d).read(columns=["target", "split", "gene_index", "sample_index"]) for d in train_dirs
    )
    labels = table["target"].to_numpy(zero_copy_only=False)
    use_chroms = bool(config.split.valid_chroms) and bool(np.any(table["split"].to_numpy(zero_copy_only=False)
                                                                 == "valid"))
    valid = holdout(table, config.evaluation.task, use_chroms, config.seed)
    train_labels = labels[~valid]
    features = FeatureSpec(
        k_neighbours=config.context.k_neighbours,
        n_tissues=n_tissues,
        promoter_length=config.promoter.length,
        value_center=float(np.mean(train_labels)),
        value_scale=float(np.std(train_labels)) or 1.0,
    )
    # ModelConfig's fields are NetworkSpec's size fields, by name
    spec = NetworkSpec(n_tissues=n_tissues, promoter_length=config.promoter.length, use_promoter=use_promoter,
                       use_context=use_context, **dataclasses.asdict(config.model))
    promoters, lookup = promoter_inputs(records_dir, gene_ids, config.promoter.length)
    valid_ref = np.flatnonzero(valid)

    def split(part: str):
        def select(batch: pa.Table) -> pa.Table:
            rows = holdout(batch, config.evaluation.task, use_chroms, config.seed)
            return batch.filter(pa.array(rows if part == "valid" else ~rows))

        return ray.data.read_parquet([str(d) for d in train_dirs]).map_batches(
            select, batch_format="pyarrow", num_cpus=config.ray.cpus_per_task
        )

    loop_config = {
        "spec": spec,
        "features": features,
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
        "threads": tc.cpus_per_worker,
        "resume_path": resume_from.path if resume_from is not None else None,
    }
    log.info("train %s: %d training and %d validation examples (%s), %d promoters, %d worker(s)%s", name,
             int((~valid).sum()), len(valid_ref), "chromosomes" if use_chroms else "unit holdout",
             len(promoters), tc.num_workers, " with GPU" if tc.use_gpu else "")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})},
        ),
        datasets={"train": split("train"), "valid": split("valid")},
        run_config=RunConfig(
            storage_path=str(storage.resolve()),
            name=name,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        saved = torch.load(os.path.join(folder, STATE_FILE), weights_only=True, map_location="cpu")
    best = saved["best_model"] if saved["best_model"] is not None else saved["model"]
    metrics = {**result.metrics, "seconds": round(time.perf_counter() - t0, 1)}
    log.info("train %s: best validation loss %.4f after %d epochs (%.0f s)", name, saved["best_val"],
             saved["epoch"] + 1, metrics["seconds"])
    return TrainedNetwork(spec=spec, features=features, state=best, metrics=metrics)


def run_network(
    network: TrainedNetwork,
    records: pa.Table,
    promoters: np.ndarray,
    lookup: PromoterLookup,
    batch_size: int = 512,
    chunk: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """(predictions on the value scale (N,), embeddings (N, D)) of ``records``, in-process, no gradients.

    Records are featurised ``chunk`` rows at a time and go through the network ``batch_size`` rows at a time:
    small batches keep the attention's activations in the CPU's cache and let each batch drop the padded slots
    that none of its rows uses (on the 2-core development machine 512 rows ran 2.3x faster per entry than 4096,
    docs/benchmarks.md). The network is built once per process and each unique promoter haplotype is encoded once
    (:meth:`TrainedNetwork.inference`).
    """
    model, table = network.inference(promoters)
    n = records.num_rows
    preds = np.empty(n, np.float32)
    embs = np.empty((n, model.embedding_dim), np.float32)
    with torch.no_grad():
        for lo in range(0, n, chunk):
            part = records.slice(lo, chunk)
            batch = featurize(part, network.features, lookup.for_records(part))
            batch.pop("target", None)
            tensors = to_tensors(batch)
            for start in range(0, part.num_rows, batch_size):
                pred, emb = model({k: v[start : start + batch_size] for k, v in tensors.items()}, table)
                rows = slice(lo + start, lo + start + len(pred))
                preds[rows] = network.features.unstandardise(pred.numpy())
                embs[rows] = emb.numpy()
    return preds, embs

"""Inference with a trained network, in-process and without Ray: the network and its best weights, a promoter
encoder cache, and :func:`run_network` (predictions and embeddings of context records). Plain torch and numpy.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from geximpute import schema as S
from geximpute.model.features import FeatureSpec, featurize, to_tensors
from geximpute.model.network import HybridNet, NetworkSpec
from geximpute.science.promoters import PromoterLookup

#: sequences per promoter-CNN call on each kind of device. On a CPU the activations of a call should fit in the
#: core's cache: with the default network (32 channels x 1,500 bp) 16 ran at 0.19 ms per sequence on the 2-core
#: development machine (Xeon, 2 MiB L2 per core) against 0.60-0.70 ms at 64 and 256 (docs/benchmarks.md); a GPU
#: wants large calls.
ENCODE_CHUNK = {"cpu": 16, "cuda": 2048}


def encode_chunk(device: torch.device | str) -> int:
    """Sequences per promoter-CNN call on ``device`` (:data:`ENCODE_CHUNK`)."""
    return ENCODE_CHUNK.get(torch.device(device).type, ENCODE_CHUNK["cpu"])


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
        chunk: sequences per CNN call when many rows are new at once (:func:`encode_chunk`): on a CPU small
            calls keep the activations in the core's cache.
    """

    def __init__(self, cnn: torch.nn.Module, table: np.ndarray, chunk: int = 16) -> None:
        super().__init__()
        self.cnn = cnn
        with warnings.catch_warnings():  # a read-only array from Ray's object store: only ever read here
            warnings.simplefilter("ignore", UserWarning)
            self.table = torch.as_tensor(table)  # (P, 4, L), shares memory with ``table``
        self.chunk = chunk
        self.embeddings: torch.Tensor | None = None  # (P, D) once the first row is encoded
        self.known = torch.zeros(len(table), dtype=torch.bool)  # (P,)
        self.encoded = 0  # sequences run through the CNN so far

    @classmethod
    def of_embeddings(cls, cnn: torch.nn.Module, embeddings: np.ndarray) -> PromoterEncoderCache:
        """A cache whose every row is already encoded (:func:`encode_promoters`, e.g. once per imputation run):
        it never runs the CNN and holds no one-hot table."""
        cache = cls(cnn, np.zeros((0, 4, 1), np.uint8))
        device = next(cnn.parameters()).device
        with warnings.catch_warnings():  # a read-only array from Ray's object store: only ever read here
            warnings.simplefilter("ignore", UserWarning)
            cache.embeddings = torch.as_tensor(embeddings, dtype=torch.float32).to(device)
        cache.known = torch.ones(len(embeddings), dtype=torch.bool)
        return cache

    @property
    def row_ids(self) -> torch.Tensor:
        """(P, 1) int64 row numbers: what the network takes as its promoter table when this module stands in."""
        return torch.arange(len(self.known), dtype=torch.int64)[:, None]

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """(U, 1) int64 row numbers -> (U, D) embeddings, on the CNN's device.

        The table stays in host memory; only the new rows go to the CNN's device, and the embeddings are kept there
        (float32 whatever the autocast precision of the CNN's output)."""
        device = next(self.cnn.parameters()).device
        rows = rows[:, 0].cpu()
        new = torch.unique(rows[~self.known[rows]])
        for start in range(0, len(new), self.chunk):
            part = new[start : start + self.chunk]
            encoded = self.cnn(self.table[part].to(device, non_blocking=True))  # (u, D)
            if self.embeddings is None:
                self.embeddings = torch.zeros((len(self.known), encoded.shape[1]), dtype=torch.float32,
                                              device=device)
            self.embeddings[part.to(device)] = encoded.float()
            self.known[part] = True
            self.encoded += len(part)
        if self.embeddings is None:  # no row at all
            return torch.zeros((0, self.cnn.proj.out_features), device=device)
        return self.embeddings[rows.to(device)]


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

    def inference(self, promoters: np.ndarray, device: torch.device | str = "cpu",
                  embeddings: np.ndarray | None = None,
                  dtype: torch.dtype | None = None) -> tuple[HybridNet, torch.Tensor | None]:
        """(the eval-mode network on ``device``, the promoter table to pass its forward) for predicting with
        ``promoters``.

        The network is built once (and moved when another device is asked for); with a promoter branch its CNN is
        wrapped in a :class:`PromoterEncoderCache` of ``promoters``, kept while later calls pass the same table
        object (a new table starts a new cache). With ``embeddings`` (this network's :func:`encode_promoters` of
        the table) the cache starts full and ``promoters`` is not read. ``dtype``: the autocast precision the caller
        runs the network under (None: none); the cache holds embeddings computed at one precision, so another one
        starts a new cache.
        """
        device = torch.device(device)
        source = embeddings if embeddings is not None else promoters
        if (self._inference is not None and self._inference[1] is source and self._inference[3] == dtype
                and same_device(_device_of(self._inference[0]), device)):
            model, _, table, _ = self._inference
            return model, table
        model = self._inference[0] if self._inference is not None else self.model()
        model = model.to(device)
        table = None
        if self.spec.use_promoter:
            cnn = model.promoter_cnn.cnn if isinstance(model.promoter_cnn, PromoterEncoderCache) else model.promoter_cnn
            if embeddings is not None:
                model.promoter_cnn = PromoterEncoderCache.of_embeddings(cnn, embeddings)
                table = model.promoter_cnn.row_ids
            elif len(promoters):
                model.promoter_cnn = PromoterEncoderCache(cnn, promoters, chunk=encode_chunk(device))
                table = model.promoter_cnn.row_ids
            else:
                model.promoter_cnn = cnn
        self._inference = (model, source, table, dtype)
        return model, table

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_inference"] = None  # a built network and a reference to a promoter table: rebuilt where unpickled
        return state


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: ``cuda`` is the current CUDA device (a network moved to ``cuda`` reports
    ``cuda:0``, which is not ``== torch.device("cuda")``: every call on a GPU started a new promoter cache)."""
    def index(d: torch.device) -> int:
        if d.index is not None:
            return d.index
        return torch.cuda.current_device() if d.type == "cuda" else 0

    return a.type == b.type and index(a) == index(b)


def inference_device(use_gpu: bool) -> torch.device:
    """The device a predictor's network runs on: the actor's GPU when it holds one (Ray sets
    ``CUDA_VISIBLE_DEVICES`` to it), else the CPU."""
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of inference on ``device``: ``auto`` is bf16 on CUDA (as training) and none (float32) on
    the CPU; ``bf16`` asks for it anywhere (the CPU runs the GPU's code path this way in the tests), ``fp32`` never."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision not in ("auto", "bf16"):
        raise ValueError(f"inference precision {precision!r}: expected auto, bf16 or fp32")
    return torch.bfloat16


def encode_promoters(network: TrainedNetwork, promoters: np.ndarray, device: torch.device | str = "cpu",
                     precision: str = "auto") -> np.ndarray:
    """(P, D) float32 embeddings of every row of the one-hot table ``promoters`` through the network's promoter
    CNN: what :class:`PromoterEncoderCache` computes row by row, for a whole table at once (imputation encodes its
    donors' haplotypes once per run and ships these instead of the (P, 4, L) table). Same device and autocast
    as :func:`run_network`."""
    if not network.spec.use_promoter:
        raise ValueError("encode_promoters: the network has no promoter branch")
    device = torch.device(device)
    cnn = network.model().promoter_cnn.to(device)
    cache = PromoterEncoderCache(cnn, promoters, chunk=encode_chunk(device))
    dtype = autocast_dtype(device, precision)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = cache(torch.arange(len(promoters), dtype=torch.int64)[:, None])
    return out.float().cpu().numpy()


def run_network(
    network: TrainedNetwork,
    records: pa.Table,
    promoters: np.ndarray,
    lookup: PromoterLookup,
    batch_size: int = 512,
    chunk: int = 16384,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    embeddings: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(predictions on the value scale (N,), embeddings (N, D)) of ``records``, in-process, no gradients.

    The network runs on ``device`` (a predictor actor's GPU, or the CPU) under :func:`autocast_dtype` of
    ``precision``; features are built on the host and each batch is copied over, the outputs come back as float32.

    Records are featurised ``chunk`` rows at a time and go through the network ``batch_size`` rows at a time:
    small batches keep the attention's activations in the CPU's cache and let each batch drop the padded slots
    that none of its rows uses (on the 2-core development machine 512 rows ran 2.3x faster per entry than 4096,
    docs/benchmarks.md). The network is built once per process and each unique promoter haplotype is encoded once
    (:meth:`TrainedNetwork.inference`); with ``embeddings`` (this network's :func:`encode_promoters` of the
    table) none is encoded here.
    """
    if network.spec.family_input and S.FAMILY_LEVEL not in records.column_names:
        raise ValueError(f"run_network: the network reads each record's {S.FAMILY_LEVEL!r} (it was trained on records "
                         "with it) and these records have no such column; build them with the family level "
                         "(geximpute.steps.prepare.context_shards(family=True))")
    device = torch.device(device)
    dtype = autocast_dtype(device, precision)
    model, table = network.inference(promoters, device, embeddings, dtype)
    if table is not None:
        table = table.to(device)
    n = records.num_rows
    preds = np.empty(n, np.float32)
    embs = np.empty((n, model.embedding_dim), np.float32)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for lo in range(0, n, chunk):
            part = records.slice(lo, chunk)
            batch = network.features.serving(featurize(part, network.features, lookup.for_records(part)))
            batch.pop("target", None)
            tensors = to_tensors(batch)
            for start in range(0, part.num_rows, batch_size):
                inputs = {k: v[start : start + batch_size].to(device, non_blocking=True) for k, v in tensors.items()}
                pred, emb = model(inputs, table)
                rows = slice(lo + start, lo + start + len(pred))
                preds[rows] = network.features.unstandardise(pred.float().cpu().numpy())
                embs[rows] = emb.float().cpu().numpy()
    return preds, embs

"""Context records (:data:`geximpute.schema.CONTEXT`) to fixed-shape arrays for the network, vectorised, no Ray.

:func:`featurize` pads or truncates every list column of a record table to a fixed width using the list arrays'
offsets (one gather per column, no per-row Python); :func:`drop_groups` hides whole evidence groups per row as a
denoising augmentation. Promoters are one-hot encoded once per table
(:func:`geximpute.science.promoters.one_hot_promoters`), so a batch carries only an index into it. Values enter the
network standardised, ``(v - value_center) / value_scale``.

Batch keys and shapes (N rows, K = ``k_neighbours``, T = ``n_tissues``)::

    nb_value (N, K) float32      nb_logdist (N, K) float32    nb_orient (N, K) int64
    nb_overlap (N, K) float32    nb_gene_mean (N, K) float32  nb_mask (N, K) bool
    tis_value (N, T) float32     tis_index (N, T) int64       tis_corr (N, T) float32
    tis_mean (N, T) float32      tis_mean_ok (N, T) float32   tis_mask (N, T) bool
    tissue_index (N,) int64      tissue_mean (N,) float32     tissue_mean_ok (N,) float32
    gene_mean (N,) float32       gene_mean_ok (N,) float32    tissue_offset (N,) float32
    genetic_score (N,) float32   genetic_score_ok (N,) float32
    family_level (N,) float32    family_level_ok (N,) float32
    promoter_index (N,) int64    promoter_index_b (N,) int64  (the donor's two haplotypes; equal for the reference)
    target (N,) float32          (only when the table has a ``target`` column; NaN where null)

Expression levels (``*_value``, ``*_mean``, ``target``) are standardised; ``tissue_offset`` and ``genetic_score``
are differences of levels, so they are only divided by ``value_scale``; ``family_level`` (the optional column
:data:`geximpute.schema.FAMILY_LEVEL`) is a level, standardised, 0 with ok 0 where null or absent. Slots under a
False mask hold 0; a neighbour or tissue whose value is NaN in the records counts as absent, and a NaN ``tis_mean``
(no other donor) gives ``tis_mean_ok`` 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from geximpute import schema as S

#: neighbour log distances are sign(d) log10(1 + |d|); dividing by this puts 1 Mb at about 1
LOGDIST_SCALE = 6.0

#: the list columns of one neighbour and of one tissue; each group shares its row lengths
NEIGHBOUR_COLUMNS = ("nb_value", "nb_logdist", "nb_orient", "nb_overlap", "nb_gene_mean")
TISSUE_COLUMNS = ("tis_value", "tis_index", "tis_corr", "tis_mean")

#: every key :func:`featurize` returns except ``target``; what the network reads
BATCH_KEYS = (
    "nb_value",
    "nb_logdist",
    "nb_orient",
    "nb_overlap",
    "nb_gene_mean",
    "nb_mask",
    "tis_value",
    "tis_index",
    "tis_corr",
    "tis_mean",
    "tis_mean_ok",
    "tis_mask",
    "tissue_index",
    "tissue_mean",
    "tissue_mean_ok",
    "gene_mean",
    "gene_mean_ok",
    "tissue_offset",
    "genetic_score",
    "genetic_score_ok",
    "family_level",
    "family_level_ok",
    "promoter_index",
    "promoter_index_b",
)

#: the evidence groups of a record that :func:`drop_groups` hides, in its argument order
GROUPS = ("neighbours", "tissues", "gene")


@dataclass(frozen=True)
class FeatureSpec:
    """How records become arrays.

    Attributes:
        k_neighbours: neighbour lists are padded or truncated (nearest kept) to this width.
        n_tissues: tissue vocabulary size; tissue lists are padded or truncated (first kept) to this width and
            every tissue index must lie in ``[0, n_tissues)``.
        promoter_length: L of the one-hot promoters.
        value_center: expression values enter the network as ``(v - value_center) / value_scale``.
        value_scale: see ``value_center``; > 0.
        absent: the evidence groups (:data:`GROUPS`) that no training record had, so the network never learned
            to read them (its weights for them kept their random start: every record of a ``samples`` fold has
            no neighbour, every record of a ``genes`` fold no other tissue and no gene mean); prediction hides them
            (:meth:`serving`) from records that have them, such as a measured sample's missing entries.
    """

    k_neighbours: int
    n_tissues: int
    promoter_length: int
    value_center: float = 0.0
    value_scale: float = 1.0
    absent: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "absent", tuple(self.absent))  # a list, as read back from JSON
        unknown = [g for g in self.absent if g not in GROUPS]
        if unknown:
            raise ValueError(f"FeatureSpec.absent: unknown evidence group(s) {unknown}; expected some of {GROUPS}")
        for name in ("k_neighbours", "n_tissues", "promoter_length"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"FeatureSpec.{name}: expected an integer >= 1, got {value!r}")
        if not np.isfinite(self.value_scale) or self.value_scale <= 0:
            raise ValueError(f"FeatureSpec.value_scale: expected a finite number > 0, got {self.value_scale!r}")
        if not np.isfinite(self.value_center):
            raise ValueError(f"FeatureSpec.value_center: expected a finite number, got {self.value_center!r}")

    def serving(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch`` (of :func:`featurize`) with the :attr:`absent` groups hidden, as :func:`drop_groups` hides a
        group: what the network saw in training (the batch itself when nothing is absent)."""
        if not self.absent:
            return batch
        return drop_groups(batch, np.random.default_rng(0), *(float(g in self.absent) for g in GROUPS))

    def standardise(self, values: np.ndarray) -> np.ndarray:
        """``(values - value_center) / value_scale`` as float32."""
        return ((np.asarray(values, dtype=np.float64) - self.value_center) / self.value_scale).astype(np.float32)

    def unstandardise(self, values: np.ndarray) -> np.ndarray:
        """Network output back on the value scale: ``values * value_scale + value_center``."""
        return (np.asarray(values, dtype=np.float64) * self.value_scale + self.value_center).astype(np.float32)


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row starts, row lengths, flat values) of a list column; starts index into the flat values."""
    col = table.column(name)
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy().astype(np.int64)
    starts = offsets[:-1]
    lengths = offsets[1:] - starts
    if arr.null_count:  # a null list slot may carry any offsets; it holds nothing
        lengths = np.where(arr.is_valid().to_numpy(zero_copy_only=False), lengths, 0)
    flat = arr.values
    if flat.null_count and not pa.types.is_floating(flat.type):  # floats turn null into NaN; others need a value
        flat = pc.fill_null(flat, False if pa.types.is_boolean(flat.type) else 0)
    return starts, lengths, flat.to_numpy(zero_copy_only=False)


def _pad(starts: np.ndarray, lengths: np.ndarray, values: np.ndarray, width: int, dtype: type) -> np.ndarray:
    """Gather the first ``width`` items of each row into an (N, width) array, zeros past each row's end."""
    pos = np.arange(width)
    present = pos[None, :] < np.minimum(lengths, width)[:, None]
    if values.size == 0:
        return np.zeros(present.shape, dtype=dtype)
    idx = np.where(present, starts[:, None] + pos[None, :], 0)
    return np.where(present, values[idx], 0).astype(dtype)


def _group(
    table: pa.Table, columns: tuple[str, ...], width: int, dtypes: tuple[type, ...]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Padded arrays of a group of parallel list columns and their (N, width) presence mask."""
    out: dict[str, np.ndarray] = {}
    first_lengths = None
    for name, dtype in zip(columns, dtypes, strict=True):
        starts, lengths, values = _list_column(table, name)
        if first_lengths is None:
            first_lengths = lengths
        elif not np.array_equal(lengths, first_lengths):
            row = int(np.flatnonzero(lengths != first_lengths)[0])
            raise ValueError(
                f"featurize: list column {name!r} has {lengths[row]} items in row {row} but {columns[0]!r} has "
                f"{first_lengths[row]}; the columns {list(columns)} must be parallel (rebuild the records)"
            )
        out[name] = _pad(starts, lengths, values, width, dtype)
    mask = np.arange(width)[None, :] < np.minimum(first_lengths, width)[:, None]
    return out, mask


def _scalar(table: pa.Table, name: str) -> np.ndarray:
    """A nullable numeric column as float64 with NaN for null."""
    return table.column(name).to_numpy().astype(np.float64) if table.num_rows else np.zeros(0)


def _standard_where(present: np.ndarray, values: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Standardised ``values`` where ``present`` and known, 0 (the mean) elsewhere, float32: a NaN in a present slot
    is unknown, not an expression of 0 (which standardised to a confident ``-center / scale``)."""
    known = present & ~np.isnan(values)
    return np.where(known, spec.standardise(np.nan_to_num(values)), 0).astype(np.float32)


def _check_range(values: np.ndarray, where: np.ndarray, lo: int, hi: int, name: str, hint: str) -> None:
    """Raise when ``values`` under ``where`` leave ``[lo, hi)``, naming the first bad row."""
    bad = where & ((values < lo) | (values >= hi))
    if bad.any():
        row = int(np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1))[0])
        raise ValueError(
            f"featurize: column {name!r} holds {values[bad][0]} in row {row}, expected [{lo}, {hi}); {hint}"
        )


_TISSUE_HINT = "is FeatureSpec.n_tissues the size of the tissue vocabulary the records were built with?"


def featurize(
    records: pa.Table,
    spec: FeatureSpec,
    promoter_index: np.ndarray | tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Fixed-shape arrays of a table of context records.

    Args:
        records: a table with the :data:`geximpute.schema.CONTEXT` columns (extra columns are ignored; ``target`` is
            optional).
        spec: widths and value standardisation.
        promoter_index: (N,) index of each row's promoter in the one-hot promoter table, -1 for none; or a pair
            of such arrays, the rows of the donor's haplotypes A and B (:meth:`PromoterLookup.rows`); all -1
            when None.

    Returns:
        The arrays listed in the module docstring.

    Raises:
        ValueError: a column is missing, parallel list columns disagree in length, an index is out of range, or
            ``promoter_index`` has the wrong shape.
    """
    needed = [*NEIGHBOUR_COLUMNS, *TISSUE_COLUMNS, "tissue_index", "tissue_mean", "gene_mean", "tissue_offset"]
    missing = [c for c in needed if c not in records.column_names]
    if missing:
        raise ValueError(f"featurize: records lack columns {missing}; expected the geximpute.schema.CONTEXT columns")
    n = records.num_rows
    k, t = spec.k_neighbours, spec.n_tissues

    nb, nb_mask = _group(records, NEIGHBOUR_COLUMNS, k, (np.float64, np.float32, np.int64, np.float32, np.float64))
    tis, tis_mask = _group(records, TISSUE_COLUMNS, t, (np.float64, np.int64, np.float32, np.float64))
    # a NaN value is no evidence: drop the slot rather than let it poison the attention
    nb_mask &= ~np.isnan(nb["nb_value"])
    tis_mask &= ~np.isnan(tis["tis_value"]) & ~np.isnan(tis["tis_corr"])
    _check_range(nb["nb_orient"], nb_mask, 0, 3, "nb_orient", "expected one of geximpute.schema.ORIENT_*")
    _check_range(tis["tis_index"], tis_mask, 0, t, "tis_index", _TISSUE_HINT)
    tis_mean_ok = tis_mask & ~np.isnan(tis["tis_mean"])

    batch: dict[str, np.ndarray] = {
        "nb_value": _standard_where(nb_mask, nb["nb_value"], spec),
        "nb_logdist": np.where(nb_mask, nb["nb_logdist"] / LOGDIST_SCALE, 0).astype(np.float32),
        "nb_orient": np.where(nb_mask, nb["nb_orient"], 0).astype(np.int64),
        "nb_overlap": np.where(nb_mask, nb["nb_overlap"], 0).astype(np.float32),
        "nb_gene_mean": _standard_where(nb_mask, nb["nb_gene_mean"], spec),
        "nb_mask": nb_mask,
        "tis_value": _standard_where(tis_mask, tis["tis_value"], spec),
        "tis_index": np.where(tis_mask, tis["tis_index"], 0).astype(np.int64),
        "tis_corr": np.where(tis_mask, np.nan_to_num(tis["tis_corr"]), 0).astype(np.float32),
        "tis_mean": _standard_where(tis_mean_ok, tis["tis_mean"], spec),
        "tis_mean_ok": tis_mean_ok.astype(np.float32),
        "tis_mask": tis_mask,
    }

    tissue_index = records.column("tissue_index").to_numpy().astype(np.int64) if n else np.zeros(0, np.int64)
    _check_range(tissue_index, np.ones(n, dtype=bool), 0, t, "tissue_index", _TISSUE_HINT)
    batch["tissue_index"] = tissue_index
    for name in ("tissue_mean", "gene_mean"):
        raw = _scalar(records, name)
        ok = ~np.isnan(raw)
        batch[name] = _standard_where(ok, raw, spec)
        batch[f"{name}_ok"] = ok.astype(np.float32)
    # a tissue's deviation from gene means: a difference of levels, so scaled but not centred
    offset = np.nan_to_num(_scalar(records, "tissue_offset")) / spec.value_scale
    batch["tissue_offset"] = offset.astype(np.float32)
    # the donor's cis-genetic score: a deviation from the gene's level, so scaled but not centred
    genetic = _scalar(records, "genetic_score") if "genetic_score" in records.column_names else np.full(n, np.nan)
    genetic_ok = ~np.isnan(genetic)
    batch["genetic_score"] = np.where(genetic_ok, np.nan_to_num(genetic) / spec.value_scale, 0).astype(np.float32)
    batch["genetic_score_ok"] = genetic_ok.astype(np.float32)
    # the gene's family in this sample (other genes' visible values): a level
    family = _scalar(records, S.FAMILY_LEVEL) if S.FAMILY_LEVEL in records.column_names else np.full(n, np.nan)
    family_ok = ~np.isnan(family)
    batch["family_level"] = _standard_where(family_ok, family, spec)
    batch["family_level_ok"] = family_ok.astype(np.float32)

    pair = promoter_index if isinstance(promoter_index, tuple) else (promoter_index, promoter_index)
    for key, pidx in zip(("promoter_index", "promoter_index_b"), pair, strict=True):
        if pidx is None:
            batch[key] = np.full(n, -1, dtype=np.int64)
            continue
        pidx = np.asarray(pidx)
        if pidx.shape != (n,) or (pidx.size and pidx.min() < -1):
            raise ValueError(
                f"featurize: promoter_index must be ({n},) integers >= -1, got shape {pidx.shape}"
                + (f" with minimum {pidx.min()}" if pidx.size else "")
            )
        batch[key] = pidx.astype(np.int64)

    if "target" in records.column_names:
        batch["target"] = spec.standardise(_scalar(records, "target"))
    return batch


def drop_groups(
    batch: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    p_neighbours: float,
    p_tissues: float,
    p_gene: float,
) -> dict[str, np.ndarray]:
    """Hide whole evidence groups, each row and each group independently (denoising augmentation).

    With probability ``p_neighbours`` a row loses all its neighbour slots, with ``p_tissues`` all its other-tissue
    slots, and with ``p_gene`` both gene-level means (``tissue_mean`` and ``gene_mean``; ``tissue_offset`` is a
    property of the tissue, known for every prediction, and stays). A dropped group looks
    exactly as :func:`featurize` writes a row that never had it (mask False or ok 0, values 0), so the network
    learns to impute when a group is absent at prediction time.

    Args:
        batch: arrays from :func:`featurize` (numpy); not modified.
        rng: random source.
        p_neighbours, p_tissues, p_gene: drop probabilities in [0, 1].

    Returns:
        A new dict; arrays that change are copies, the others are shared with ``batch``.
    """
    for name, p in (("p_neighbours", p_neighbours), ("p_tissues", p_tissues), ("p_gene", p_gene)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop_groups: {name} must lie in [0, 1], got {p}")
    out = dict(batch)
    n = len(batch["tissue_index"])
    drop_nb = rng.random(n) < p_neighbours
    drop_tis = rng.random(n) < p_tissues
    drop_gene = rng.random(n) < p_gene
    for keys, drop in (
        (("nb_mask", "nb_value", "nb_logdist", "nb_orient", "nb_overlap", "nb_gene_mean"), drop_nb),
        (("tis_mask", "tis_value", "tis_index", "tis_corr", "tis_mean", "tis_mean_ok"), drop_tis),
        (("tissue_mean", "tissue_mean_ok", "gene_mean", "gene_mean_ok"), drop_gene),
    ):
        if not drop.any():
            continue
        for key in keys:
            arr = np.asarray(batch[key])
            cleared = arr.copy()
            cleared[drop] = 0  # False for masks, 0 for values, ok flags and indices
            out[key] = cleared
    return out


def to_tensors(batch: Mapping[str, np.ndarray], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The batch as torch tensors (dtypes kept), on ``device``; shares memory with the arrays on CPU."""
    return {key: torch.as_tensor(np.ascontiguousarray(arr), device=device) for key, arr in batch.items()}


def empty_batch(spec: FeatureSpec) -> dict[str, np.ndarray]:
    """A zero-row batch with the right keys, dtypes and widths (for shape checks and warm-up)."""
    return featurize(S.CONTEXT.empty_table(), spec)

"""The fitted hybrid as it predicts: networks, heads and ablations of one evaluation or one model bundle.

Fitting lives in :mod:`geximpute.fit.hybrid` (with the training loop); this module only predicts, so loading a bundle
(:mod:`geximpute.fit.bundle`) does not import the training code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from geximpute.config import Config
from geximpute.errors import GeximputeError
from geximpute.fit.head import HeadModel
from geximpute.model.inference import TrainedNetwork, run_network
from geximpute.science.head_features import engineered_features
from geximpute.science.promoters import PromoterLookup


@dataclass
class HybridModels:
    """The fitted networks and heads of one evaluation (or of one model bundle).

    Two layouts of the head's inputs:

    - plain (``stacked`` False, what ``geximpute fit-head`` and a bundle hold): [embedding, engineered features] of
      ``network``, the head fitted on a fold that network was not trained on;
    - stacked (``stacked`` True, :func:`geximpute.fit.hybrid.fit_hybrid`): [embedding, engineered features, network
      prediction, baseline estimates] of each cross-fitted network of ``fold_networks``; network k was trained on
      every training fold but k and gave the head fold k's rows, so every head row is out of fold. New records
      go through every fold network and the head's outputs are averaged. The baseline estimates are read from
      ``baselines`` (each (G, S) grid fitted on all visible data) at the records' (gene, sample).
    """

    config: Config
    promoters: np.ndarray
    lookup: PromoterLookup
    network: TrainedNetwork
    head: HeadModel
    ablations: dict[str, TrainedNetwork] = field(default_factory=dict)
    features_head: HeadModel | None = None
    seconds: dict = field(default_factory=dict)
    fold_networks: list[TrainedNetwork] = field(default_factory=list)
    stacked: bool = False
    baselines: dict[str, np.ndarray] = field(default_factory=dict)
    head_rows: int = 0  # the records the head was fitted on
    device: str = "cpu"  # where the networks run when predicting (a predictor actor's GPU: "cuda")
    precision: str = "auto"  # autocast of the networks (geximpute.model.inference.autocast_dtype): bf16 on CUDA
    # each of :meth:`networks`' encode_promoters of the promoter table, when encoded beforehand (imputation: once
    # per run); None: each network encodes the rows it meets (PromoterEncoderCache)
    promoter_embeddings: list[np.ndarray] | None = None

    def networks(self) -> list[TrainedNetwork]:
        """The networks whose head outputs are averaged: the fold networks, or the one network."""
        return self.fold_networks or [self.network]

    def embeddings_of(self, network: TrainedNetwork) -> np.ndarray | None:
        """``network``'s row of :attr:`promoter_embeddings` (None when not encoded beforehand)."""
        if self.promoter_embeddings is None:
            return None
        for mine, embeddings in zip(self.networks(), self.promoter_embeddings, strict=True):
            if mine is network:
                return embeddings
        raise ValueError("promoter_embeddings were encoded for other networks than this one")

    def engineered(self, records: pa.Table) -> np.ndarray:
        """(N, F) engineered features of ``records`` (:func:`geximpute.science.head_features.engineered_features`)."""
        b = self.config.baselines
        return engineered_features(
            records, distance_k=b.distance_k, distance_offset=b.distance_offset, donor_shrinkage=b.donor_shrinkage
        )

    def baseline_inputs(self, records: pa.Table) -> np.ndarray:
        """(N, B) the baselines' estimates at the records' (gene, sample), in ``baselines`` order; NaN off the grid."""
        return baseline_columns(self.baselines, records)

    def head_inputs(self, records: pa.Table, network: TrainedNetwork | None = None, *,
                    engineered: np.ndarray | None = None,
                    baselines: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(engineered features, network predictions, head inputs) of ``records`` through ``network`` (default
        ``network``); ``engineered`` and ``baselines`` (the stacked layout's estimates) when already computed."""
        engineered = self.engineered(records) if engineered is None else engineered
        network = network or self.network
        pred, emb = run_network(network, records, self.promoters, self.lookup, device=self.device,
                                precision=self.precision, embeddings=self.embeddings_of(network))
        parts = [emb, engineered]
        if self.stacked:
            parts += [pred[:, None], self.baseline_inputs(records) if baselines is None else baselines]
        return engineered, pred, np.hstack(parts).astype(np.float32)

    def features_inputs(self, records: pa.Table, engineered: np.ndarray) -> np.ndarray:
        """Inputs of the head without the network: engineered features (and baseline estimates when stacked)."""
        if not self.stacked:
            return engineered
        return np.hstack([engineered, self.baseline_inputs(records)]).astype(np.float32)

    def _hybrid(self, records: pa.Table, engineered: np.ndarray) -> tuple[tuple, np.ndarray]:
        """((estimate, lower, upper) of the head, the network prediction), averaged over the fold networks."""
        networks = self.networks()
        baselines = self.baseline_inputs(records) if self.stacked else None
        head_sum = [np.zeros(records.num_rows) for _ in range(3)]
        net_sum = np.zeros(records.num_rows)
        for network in networks:
            _, pred, inputs = self.head_inputs(records, network, engineered=engineered, baselines=baselines)
            for total, part in zip(head_sum, self.head.raw(inputs), strict=True):
                total += part
            net_sum += pred
        # the boosters' outputs averaged over the fold networks, then the conformal step for the averaged estimate:
        # as the interval was calibrated (geximpute.fit.head.averaged)
        mean = [total / len(networks) for total in head_sum]
        return self.head.widened(*mean), net_sum / len(networks)

    def predict_head(self, records: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(estimate, lower, upper) of the hybrid head on ``records`` (the genetic offset added back)."""
        head, _ = self._hybrid(records, self.engineered(records))
        offset = genetic_offset(records)
        return tuple(part + offset for part in head)  # type: ignore[return-value]

    def predict(self, records: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
        """``{method: (estimate, lower, upper)}`` for every method available (bounds None where there are none)."""
        engineered = self.engineered(records)
        head, net_pred = self._hybrid(records, engineered)
        offset = genetic_offset(records)
        out = {"hybrid": tuple(p + offset for p in head), "hybrid_network": (net_pred, None, None)}
        if self.features_head is not None:
            inputs = self.features_inputs(records, engineered)
            out["xgb_features_only"] = tuple(p + offset for p in self.features_head.predict(inputs))
        for name, network in self.ablations.items():
            pred, _ = run_network(network, records, self.promoters, self.lookup, device=self.device,
                                  precision=self.precision)
            out[name] = (pred, None, None)
        return out


def baseline_column(name: str) -> str:
    """The name of the record column that carries baseline ``name``'s estimate (imputation ships each block's
    estimates with its records instead of the (G, S) grids)."""
    return f"baseline_{name}"


def baseline_columns(grids: dict[str, np.ndarray | None], records: pa.Table) -> np.ndarray:
    """(N, len(grids)) float32: each (G, S) grid read at the records' (``gene_index``, ``sample_index``); NaN for a
    record outside a grid (a sample the grids do not have, such as an imputed virtual sample). A grid of None: the
    records carry that baseline's estimates in their column :func:`baseline_column`."""
    out = np.full((records.num_rows, len(grids)), np.nan, dtype=np.float32)
    if not grids:
        return out
    g = records["gene_index"].to_numpy().astype(np.int64)
    s = records["sample_index"].to_numpy().astype(np.int64)
    for j, (name, grid) in enumerate(grids.items()):
        if grid is None:
            if baseline_column(name) not in records.column_names:
                raise GeximputeError(
                    f"the head reads the estimates of {name}: these models hold no grid of them (a bundle's are "
                    f"computed where it predicts: Bundle.baseline_grids) and the records carry no column "
                    f"{baseline_column(name)}")
            out[:, j] = records[baseline_column(name)].to_numpy(zero_copy_only=False)
            continue
        inside = (g < grid.shape[0]) & (s < grid.shape[1])
        out[inside, j] = grid[g[inside], s[inside]]
    return out


def genetic_offset(records: pa.Table) -> np.ndarray:
    """(N,) the records' cis-genetic score, 0 where there is none: the heads learn the rest around it.

    Trees split a continuous input into steps; a donor's genetic deviation within a gene is small next to the
    differences between genes, so a head that had to rebuild it from splits would lose most of it. The score is
    already a shrunken estimate (:func:`geximpute.science.genomes.genetic_scores`), so it enters additively, as
    XGBoost's base margin would, and the head still sees it as a feature to correct it.
    """
    if "genetic_score" not in records.column_names:
        return np.zeros(records.num_rows)
    return np.nan_to_num(records["genetic_score"].to_numpy(zero_copy_only=False).astype(np.float64))

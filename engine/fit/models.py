"""The fitted hybrid as it predicts: networks, heads and ablations of one evaluation or one model bundle.

Fitting lives in :mod:`engine.fit.hybrid` (with the training loop); this module only predicts, so loading a bundle
(:mod:`engine.fit.bundle`) does not import the training code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from engine.config import Config
from engine.fit.head import HeadModel
from engine.model.inference import TrainedNetwork, run_network
from engine.science.head_features import engineered_features
from engine.science.promoters import PromoterLookup


@dataclass
class HybridModels:
    """The fitted networks and heads of one evaluation (or of one model bundle)."""

    config: Config
    promoters: np.ndarray
    lookup: PromoterLookup
    network: TrainedNetwork
    head: HeadModel
    ablations: dict[str, TrainedNetwork] = field(default_factory=dict)
    features_head: HeadModel | None = None
    seconds: dict = field(default_factory=dict)

    def predict_head(self, records: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(estimate, lower, upper) of the hybrid head on ``records`` (the genetic offset added back)."""
        _, _, inputs = self.head_inputs(records)
        offset = genetic_offset(records)
        return tuple(part + offset for part in self.head.predict(inputs))  # type: ignore[return-value]

    def head_inputs(self, records: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(engineered features, network predictions, head inputs = [embedding, engineered]) of ``records``."""
        b = self.config.baselines
        engineered = engineered_features(
            records, distance_k=b.distance_k, distance_offset=b.distance_offset, donor_shrinkage=b.donor_shrinkage
        )
        pred, emb = run_network(self.network, records, self.promoters, self.lookup)
        return engineered, pred, np.hstack([emb, engineered]).astype(np.float32)

    def predict(self, records: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
        """``{method: (estimate, lower, upper)}`` for every method available (bounds None where there are none)."""
        engineered, net_pred, inputs = self.head_inputs(records)
        offset = genetic_offset(records)
        out = {"hybrid": tuple(p + offset for p in self.head.predict(inputs)), "hybrid_network": (net_pred, None, None)}
        if self.features_head is not None:
            out["xgb_features_only"] = tuple(p + offset for p in self.features_head.predict(engineered))
        for name, network in self.ablations.items():
            pred, _ = run_network(network, records, self.promoters, self.lookup)
            out[name] = (pred, None, None)
        return out


def genetic_offset(records: pa.Table) -> np.ndarray:
    """(N,) the records' cis-genetic score, 0 where there is none: the heads learn the rest around it.

    Trees split a continuous input into steps; a donor's genetic deviation within a gene is small next to the
    differences between genes, so a head that had to rebuild it from splits would lose most of it. The score is
    already a shrunken estimate (:func:`engine.science.genomes.genetic_scores`), so it enters additively, as
    XGBoost's base margin would, and the head still sees it as a feature to correct it.
    """
    if "genetic_score" not in records.column_names:
        return np.zeros(records.num_rows)
    return np.nan_to_num(records["genetic_score"].to_numpy(zero_copy_only=False).astype(np.float64))

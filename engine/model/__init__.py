"""The imputation network and its input arrays: plain torch modules and numpy featurisation, no Ray.

``features`` turns context records into fixed-shape arrays; ``network`` holds the promoter CNN, the context
transformer and the hybrid network with its ablations; ``inference`` runs a trained network on records. The
promoter one-hot encoder and lookup are numpy only and live in :mod:`geximpute.science.promoters`.
"""

from geximpute.model.features import (
    BATCH_KEYS,
    FeatureSpec,
    drop_groups,
    empty_batch,
    featurize,
    to_tensors,
)
from geximpute.model.network import ContextEncoder, HybridNet, NetworkSpec, PromoterCNN

__all__ = [
    "BATCH_KEYS",
    "ContextEncoder",
    "FeatureSpec",
    "HybridNet",
    "NetworkSpec",
    "PromoterCNN",
    "drop_groups",
    "empty_batch",
    "featurize",
    "to_tensors",
]

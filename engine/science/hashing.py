"""Seeded hashes of indices: a unit's draw (held out or not, its fold) found wherever it is needed, with no grid kept
and no random state passed around."""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's step: every input bit reaches every output bit."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def mix64(*parts: np.ndarray | int) -> np.ndarray:
    """A uint64 hash of non-negative integer ``parts`` (arrays broadcast together, or ints such as a seed), each
    folded in by a splitmix64 step: two seeds draw independent-looking subsets (a seed added to a linear hash
    shifts the same subset instead)."""
    with np.errstate(over="ignore"):
        h = np.uint64(0)
        for part in parts:
            h = _splitmix(h ^ np.asarray(part).astype(np.uint64))
    return np.asarray(h, np.uint64)

"""Each row's visible values summed over groups of columns: the per-(gene, tissue) and per-(gene, donor) sums that
the gene statistics, the tissue correlations, the genetic scores' residuals, the context records and the baselines
all start from. A leaf module (numpy only), so that every one of them can import it."""

from __future__ import annotations

import numpy as np


def group_sums(values: np.ndarray, group: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(sums, counts), each (rows, ``n_groups``) float64: the sum and the number of the visible (not NaN) values of
    each row of ``values`` (rows, columns) over the columns whose ``group`` (columns,) is each group."""
    visible = ~np.isnan(values)
    sums = np.zeros((values.shape[0], n_groups))
    counts = np.zeros((values.shape[0], n_groups))
    np.add.at(sums.T, group, np.where(visible, values, 0.0).T)
    np.add.at(counts.T, group, visible.T.astype(float))
    return sums, counts

"""Pure-numpy checks of how training epochs sample records (no Ray)."""

from __future__ import annotations

import numpy as np

from engine.fit.train import epoch_rows


def test_epoch_rows_sample_the_whole_file_afresh_each_epoch():
    # 10 chromosomes of 1,000 records each, stored one after the other (as prepare writes them)
    chrom = np.repeat(np.arange(10), 1000)
    first = epoch_rows(len(chrom), 500, seed=0, epoch=0, rank=0)
    second = epoch_rows(len(chrom), 500, seed=0, epoch=1, rank=0)
    assert len(first) == 500 and len(np.unique(first)) == 500
    # a twentieth of the records still reaches every chromosome, roughly in proportion
    counts = np.bincount(chrom[first], minlength=10)
    assert counts.min() > 20, counts
    # a new epoch draws a new sample; the same (seed, epoch, rank) draws the same one
    assert len(np.intersect1d(first, second)) < 100
    np.testing.assert_array_equal(first, epoch_rows(len(chrom), 500, seed=0, epoch=0, rank=0))
    assert not np.array_equal(first, epoch_rows(len(chrom), 500, seed=0, epoch=0, rank=1))
    # without a cap an epoch visits every record once
    everything = epoch_rows(len(chrom), None, seed=0, epoch=2, rank=0)
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(chrom)))

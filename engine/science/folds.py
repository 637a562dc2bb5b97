"""Training examples that look like the evaluation's hidden entries: inner folds hidden from the visible data.

The network and the head learn to impute by predicting visible values that were hidden *again*, in the same way
as the evaluation task hides values (whole genes, whole samples or single entries). Each fold hides a disjoint
``fraction`` of the visible units; the records of a fold are built from what is left visible in it and labelled
with the re-hidden visible values. Outer hidden values are never touched: they are not in the visible problem.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

import numpy as np

from geximpute.io.expression import fold_factors
from geximpute.io.matrixfile import MatrixFile, measured
from geximpute.science.problem import SPLITS, VisibleProblem, mark_ranks, tissue_correlation


def training_folds(
    problem: VisibleProblem, task: str, n_folds: int, fraction: float, seed: int, *, whole_donors: bool = False
) -> list[np.ndarray]:
    """Disjoint inner-hidden masks, one per fold, each a subset of the visible entries.

    Args:
        problem: the visible problem.
        task: ``entries``, ``genes`` or ``samples``: the unit hidden together.
        n_folds: number of folds.
        fraction: fraction of the visible units each fold hides (``n_folds * fraction <= 1``).
        seed: seeds the assignment of units to folds.
        whole_donors: with ``samples``, the unit is a donor (every sample of it), as in the evaluation.

    Returns:
        ``n_folds`` boolean (G, S) masks. No unit is chosen among the entries of genes on ``split.test_chroms``
        (no training example is labelled with their values, no validation split carved from them: callers label and
        score a fold's :func:`trainable` entries); on ``samples`` a chosen sample or donor is hidden in every gene,
        theirs too, as the evaluation hides it (a held-out sample's test genes left visible gave its other genes
        same-sample context a hidden entry never has).
    """
    if n_folds * fraction > 1 + 1e-9:
        raise ValueError(f"train.folds x train.fold_fraction = {n_folds} x {fraction} > 1: folds would overlap")
    measured_any = measured(problem.values)
    visible = measured_any & (problem.split != SPLITS.index("test"))[:, None]
    rng = np.random.default_rng(seed)
    if task == "genes":
        units = rng.permutation(np.flatnonzero(visible.any(axis=1)))
    elif task == "samples" and whole_donors:
        units = rng.permutation(np.unique(problem.donor_index[visible.any(axis=0)]))
    elif task == "samples":
        units = rng.permutation(np.flatnonzero(visible.any(axis=0)))
    else:
        # the ranks of the visible cells (row-major), permuted: the same draw as permuting the cells' positions
        # (a permutation's swaps depend only on its length), without an int64 index of every visible cell beside
        # it; each fold's cells are found from their ranks a pass at a time
        units = rng.permutation(int(np.count_nonzero(visible)))
    per_fold = max(1, int(round(fraction * len(units))))
    masks = []
    for f in range(n_folds):
        chosen = units[f * per_fold : (f + 1) * per_fold]
        mask = np.zeros_like(visible)
        if task == "genes":
            mask[chosen] = True
        elif task == "samples" and whole_donors:
            mask[:, np.isin(problem.donor_index, chosen)] = True
        elif task == "samples":
            mask[:, chosen] = True
        else:
            chosen.sort()  # in place: each fold's segment of the permutation is its own
            mark_ranks(visible.ravel(), chosen, mask.ravel())
        mask &= measured_any if task == "samples" else visible
        masks.append(mask)
    return masks


def trainable(problem: VisibleProblem, mask: np.ndarray) -> np.ndarray:
    """The entries of a fold's ``mask`` (:func:`training_folds`) that may be labelled or scored: those off the
    genes of ``split.test_chroms``."""
    test = problem.split == SPLITS.index("test")
    return mask & ~test[:, None] if test.any() else mask


def fold_targets(inner: np.ndarray, tissue_index: np.ndarray, limit: int | None, seed: int,
                 fold: int = 0) -> np.ndarray:
    """(G, S) bool: the entries of a training fold (``inner``, one of :func:`training_folds`) that get a labelled
    record. All of them when they are ``limit`` or fewer (None: no limit); else every entry of a seeded random set
    of the fold's (gene, tissue) groups, drawn until the next group would pass ``limit``, seeded by (``seed``,
    ``fold``) as a pair: a seed added to the fold number would give replicate s's fold 1 the draw of replicate
    s + 1's fold 0.

    The whole fold stays hidden from the fold's problem, so every record's context is what it would be without the
    limit; only fewer entries are labelled, and the records, the training epochs and the head's rows stop growing
    with the data (``train.max_fold_records``). Whole (gene, tissue) groups are drawn, not single entries, so that
    each group the head compares within (the ``samples`` task's donors of one gene in one tissue) keeps all its
    rows; a gene keeps some of its tissues, so the genes drawn from stay as many as the groups allow. With one
    sample per tissue (a median table) a group is one entry.
    """
    tissue_index = np.asarray(tissue_index, np.int64)
    n_tissues = int(tissue_index.max(initial=-1)) + 1
    counts = np.zeros((inner.shape[0], n_tissues), np.int64)
    for t in range(n_tissues):
        counts[:, t] = np.count_nonzero(inner[:, tissue_index == t], axis=1)
    if limit is None or counts.sum() <= limit:
        return inner
    flat = counts.ravel()
    order = np.random.default_rng((seed, fold, 15_485_863)).permutation(np.flatnonzero(flat))
    kept = max(1, int(np.searchsorted(np.cumsum(flat[order]), limit, side="right")))
    keep = np.zeros(flat.shape, bool)
    keep[order[:kept]] = True
    return inner & keep.reshape(counts.shape)[:, tissue_index]


def fold_problem(problem: VisibleProblem, inner_hidden: np.ndarray,
                 factors: np.ndarray | None | str = "auto") -> VisibleProblem:
    """The problem with ``inner_hidden`` entries hidden as well; counts normalised again without them and tissue
    correlations recomputed without them.

    On counts (``problem.scaling``) each sample's values are put on the scale its factor would have had without the
    fold's entries (:func:`~geximpute.io.expression.fold_factors`): a fold's own counts move no value its records
    read, as the evaluation's hidden counts move no visible value (a dominant gene's fold, under CPM, shifted its
    samples' other values by as much as its own level, which the fold's records would read as a feature of their
    labels). ``factors``: those factors, when the caller computed them on the whole problem (this one is a part of
    it); ``"auto"``: computed here from ``problem``; None: not normalised again.

    A problem whose values are a matrix file (:class:`~geximpute.io.matrixfile.MatrixFile`) gets a view of the same
    file that hides the fold's entries (and rescales) as it reads (:meth:`~geximpute.io.matrixfile.MatrixFile.hiding`),
    the mask written to a file beside the values (``<values>.fold-<pid>-<n>``: one name per process and call, so that
    two processes folding one file never share a mask; removed with the values' folder, or by :func:`forget_fold`):
    no second matrix, in the driver or in a task that reads a window of it."""
    scaling = problem.scaling
    if isinstance(factors, str):
        factors = fold_factors(scaling, problem.values, inner_hidden) if scaling is not None else None
    ratio = None
    if scaling is not None and factors is not None:
        ratio = np.asarray(factors, np.float64) / scaling.factors
        if np.allclose(ratio, 1.0, rtol=0, atol=1e-12):
            ratio = None
    if isinstance(problem.values, MatrixFile):
        path = Path(problem.values.path)
        name = f"{path.name}.fold-{os.getpid()}-{next(_FOLD_FILES)}"
        mask = MatrixFile.from_array(path.with_name(name), inner_hidden)
        values = problem.values.hiding(mask, None if ratio is None else (ratio, scaling.log1p))
    else:
        values = problem.values.copy()
        values[inner_hidden] = np.nan
        if ratio is not None:
            scaling.rescale(values, ratio)
    corr = tissue_correlation(values, problem.tissue_index, len(problem.tissues))
    new_scaling = scaling if ratio is None else dataclasses.replace(scaling, factors=np.asarray(factors, np.float64))
    return dataclasses.replace(problem, values=values, tissue_corr=corr, scaling=new_scaling)


def fold_labels(problem: VisibleProblem, fold: VisibleProblem) -> np.ndarray | MatrixFile:
    """``problem``'s values on the scale of ``fold`` (its :func:`fold_problem`), nothing hidden: the labels of the
    fold's records. On counts a fold's entries are normalised by the fold's factors, as the evaluation's hidden
    entries are by factors that leave them out, so that labels and the features built from the fold problem share
    one scale (the outer values as labels sat on the scale that counted the fold's own counts). The problem's own
    values where the scale is the same; a copy rescaled in memory, or a view of a matrix file."""
    ratio = fold_ratio(problem, fold)
    if ratio is None:
        return problem.values
    if isinstance(problem.values, MatrixFile):
        return problem.values.rescaled((ratio, problem.scaling.log1p))
    values = problem.values.copy()
    problem.scaling.rescale(values, ratio)
    return values


def fold_ratio(problem: VisibleProblem, fold: VisibleProblem) -> np.ndarray | None:
    """(S,) how much each sample's count divisor grew from ``problem`` to its :func:`fold_problem` ``fold``; None
    where the scale is the same (not counts, or nothing renormalised)."""
    if fold.scaling is problem.scaling or problem.scaling is None or fold.scaling is None:
        return None
    return fold.scaling.factors / problem.scaling.factors


def forget_fold(problem: VisibleProblem) -> None:
    """Remove the mask file of a :func:`fold_problem` of a problem kept in a matrix file (nothing otherwise)."""
    if isinstance(problem.values, MatrixFile) and problem.values.hidden is not None:
        problem.values.hidden.unlink()


_FOLD_FILES = itertools.count()

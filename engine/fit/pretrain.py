"""Gene-level pre-training of the promoter CNN: plain torch, no Ray.

Inside the full network the CNN's gradient is one small part of a loss dominated by the context tokens, and early
stopping on that loss ends training before the CNN has found its motifs (measured on the planted-motif data: most
networks stopped at epoch 3 of 8, the CNN alone needed about 8 epochs). Before the network trains, the CNN (with a
throw-away linear read-out) is fitted to each training gene's mean standardised level from its reference promoter,
one example per gene, and the epoch with the best Pearson on the validation genes is kept. The network then starts
from a CNN whose embedding already carries the sequence's level.

The levels are the genes' means over the visible entries less the fold a network predicts out of fold
(:func:`visible_levels`; with cross-fitting, fold network k never reads fold k), so pre-training reads every visible
gene, not only the training fold's, and never a hidden entry; without the visible problem they come from the
labelled training records alone (:func:`record_levels`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from geximpute.science.problem import pass_rows

log = logging.getLogger(__name__)

#: fewer training genes with a promoter than this: no pre-training (nothing to learn a motif from)
MIN_GENES = 20
#: share of the training genes carved out for choosing the epoch when no validation gene has a promoter
CARVE_FRACTION = 0.15
BATCH_SIZE = 64
#: epochs without a better validation Pearson before pre-training stops
PATIENCE = 3
#: epochs pre-training runs at least, whatever the patience: on planted motifs (~1,000 genes) the validation Pearson
#: often stalls near 0 for 4-6 epochs before the first motif is found, then climbs to its best at epochs 7-13; with
#: a patience of 3 from the first epoch one run stopped at epoch 4 at 0.04 (the validation curves of every logged
#: run, docs/benchmarks.md). Real promoters peak at epochs 3-7: a few epochs more, the best one still kept.
MIN_EPOCHS = 8


@dataclass(frozen=True)
class GeneLevels:
    """What pre-training fits: one row per gene with a reference promoter.

    Attributes:
        train_rows, valid_rows: (n,) rows of the one-hot promoter table.
        train_y, valid_y: (n,) the gene's mean standardised level over its labelled records.
    """

    train_rows: np.ndarray
    train_y: np.ndarray
    valid_rows: np.ndarray
    valid_y: np.ndarray

    @property
    def usable(self) -> bool:
        """Enough genes to fit and to choose an epoch."""
        return len(self.train_rows) >= MIN_GENES and len(self.valid_rows) >= 3


def visible_levels(values: np.ndarray, hide: np.ndarray | None, valid_gene: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(level, valid_gene): each gene's mean visible value with the ``hide`` entries left out (NaN: none left).

    Args:
        values: (G, S) visible values on the modelling scale, NaN where not measured or hidden (an array or a
            :class:`~geximpute.io.matrixfile.MatrixFile`: read a pass of rows at a time).
        hide: (G, S) bool entries a network must not read (the fold it predicts out of fold), or None.
        valid_gene: (G,) bool genes that validate (held-out chromosomes): they choose the epoch, never train.
    """
    n_genes = values.shape[0]
    sums, counts = np.zeros(n_genes, np.float64), np.zeros(n_genes, np.int64)
    step = pass_rows(values.shape[1], n_genes)  # a pass of rows at a time: its temporaries, not the matrix's
    for lo in range(0, n_genes, step):
        block = values[lo : lo + step]
        kept = block if hide is None else np.where(hide[lo : lo + step], np.nan, block)
        seen = np.isfinite(kept)
        counts[lo : lo + step] = seen.sum(axis=1)
        sums[lo : lo + step] = np.where(seen, kept, 0.0).sum(axis=1, dtype=np.float64)
    level = sums / np.maximum(counts, 1)
    return np.where(counts > 0, level, np.nan), np.asarray(valid_gene, bool)


def record_levels(gene_index: np.ndarray, target: np.ndarray, valid: np.ndarray, n_genes: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(level, valid_gene) from labelled training records alone (when the visible problem is not at hand).

    Args:
        gene_index, target: (N,) each record's gene and value (modelling scale).
        valid: (N,) bool, the record is held out for validation: its gene validates.
        n_genes: G.
    """
    gene_index = np.asarray(gene_index, np.int64)
    sums = np.bincount(gene_index, weights=np.asarray(target, np.float64), minlength=n_genes)
    counts = np.bincount(gene_index, minlength=n_genes)
    valid_gene = np.bincount(gene_index[np.asarray(valid, bool)], minlength=n_genes) > 0
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), valid_gene


def gene_levels(level: np.ndarray, valid_gene: np.ndarray, gene_row: np.ndarray, seed: int) -> GeneLevels:
    """The genes pre-training fits: those with a level and a reference promoter, split into training and validation
    genes, standardised by the training genes' own mean and spread (the read-out is thrown away, and targets of
    unit spread train at the same pace whatever the data's scale).

    Args:
        level, valid_gene: (G,) of :func:`visible_levels` or :func:`record_levels`.
        gene_row: (G,) reference promoter row of each gene, -1 = none (``PromoterLookup.gene_row``).
        seed: seeds the carve-out when no validation gene has a promoter.
    """
    gene_row = np.asarray(gene_row, np.int64)
    level = np.asarray(level, np.float64)
    usable = np.isfinite(level) & (gene_row >= 0)
    is_valid = usable & np.asarray(valid_gene, bool)
    is_train = usable & ~np.asarray(valid_gene, bool)
    train_rows, train_y = gene_row[is_train], level[is_train]
    valid_rows, valid_y = gene_row[is_valid], level[is_valid]
    if len(valid_rows) < 3 and len(train_rows) >= MIN_GENES:
        carve = np.random.default_rng([seed, 7]).random(len(train_rows)) < CARVE_FRACTION
        train_rows, valid_rows = train_rows[~carve], train_rows[carve]
        train_y, valid_y = train_y[~carve], train_y[carve]
    center = float(train_y.mean()) if len(train_y) else 0.0
    scale = float(train_y.std()) if len(train_y) > 1 and train_y.std() > 0 else 1.0
    return GeneLevels(train_rows, ((train_y - center) / scale).astype(np.float32), valid_rows,
                      ((valid_y - center) / scale).astype(np.float32))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def pretrain_cnn(cnn: nn.Module, d_out: int, promoters: torch.Tensor, levels: GeneLevels, *, epochs: int,
                 lr: float, weight_decay: float, seed: int, patience: int = PATIENCE,
                 min_epochs: int = MIN_EPOCHS) -> list[float]:
    """Fit ``cnn`` (in place) to the genes' levels; keep the weights of the epoch best on the validation genes,
    stopping after ``patience`` epochs without a better one once ``min_epochs`` have run.

    Args:
        cnn: a :class:`geximpute.model.network.PromoterCNN` (promoters -> (P, d_out)).
        d_out: its output width.
        promoters: (P, 4, L) one-hot table (uint8 or float) on the CNN's device.
        levels: the genes (:func:`gene_levels`).
        epochs, lr, weight_decay: AdamW over the CNN and a linear read-out, batches of :data:`BATCH_SIZE` genes.
        seed: the order of the genes in each epoch.

    Returns:
        The validation Pearson of each epoch (empty when ``levels`` is not usable or ``epochs`` is 0).
    """
    if epochs < 1 or not levels.usable:
        return []
    device = next(cnn.parameters()).device
    readout = nn.Sequential(nn.GELU(), nn.Linear(d_out, 1)).to(device)
    params = list(cnn.parameters()) + list(readout.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    train_y = torch.as_tensor(levels.train_y, device=device)
    rng = np.random.default_rng([seed, 11])
    was_training = cnn.training
    history: list[float] = []
    best, best_state, bad = -np.inf, None, 0
    for _ in range(epochs):
        cnn.train()
        readout.train()
        order = rng.permutation(len(levels.train_rows))
        for lo in range(0, len(order), BATCH_SIZE):
            pick = order[lo : lo + BATCH_SIZE]
            rows = torch.as_tensor(levels.train_rows[pick], device=promoters.device)
            pred = readout(cnn(promoters[rows].to(device))).squeeze(-1)
            loss = torch.mean((pred - train_y[torch.as_tensor(pick, device=device)]) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        cnn.eval()
        readout.eval()
        preds = []
        with torch.no_grad():
            for lo in range(0, len(levels.valid_rows), 4 * BATCH_SIZE):
                rows = torch.as_tensor(levels.valid_rows[lo : lo + 4 * BATCH_SIZE], device=promoters.device)
                preds.append(readout(cnn(promoters[rows].to(device))).squeeze(-1).float().cpu().numpy())
        r = _pearson(np.concatenate(preds), levels.valid_y)
        history.append(r)
        if np.isfinite(r) and r > best:
            best, best_state, bad = r, {k: v.detach().clone() for k, v in cnn.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= patience and len(history) >= min_epochs:
                break
    if best_state is not None:
        cnn.load_state_dict(best_state)
    cnn.train(was_training)
    return history

"""Variants of the promoter CNN on the real medians promoters, outside Ray: how much of a gene's level each reads.

Each variant is ``geximpute.model.network.PromoterCNN`` (``binned``: pooled over 6 stretches of the window too,
``model.cnn_bins``) with a GELU + linear read-out, fitted with AdamW (batches of 64 genes, one thread) to the genes'
standardised mean log1p level over the 29 tissues, or to the 29 levels at once (``multi``). The genes are those
with a known 1,000 + 500 bp window, less every gene hidden by the evaluation runs named with ``--exclude-runs``
(their ``seed_*/predictions.parquet``): the measurement never reads an evaluation's hidden genes. The genes left
are split at random: 20% test, and of the rest 20% for choosing the epoch (the best validation Pearson over
``--epochs``, as pre-training keeps it), the other 64% for fitting. Reported: each variant's test Pearson at its
chosen epoch, the mean of the variants' read-outs so far (an ensemble of the fitted models), and least squares on
the five composition features of ``promoter_composition``.

Usage:
    python benchmarks/promoter_cnn_variants.py --exclude-runs RUN [RUN ...] [--variants base seed1 ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from geximpute.config import load_config
from geximpute.io.dataset import load_dataset
from geximpute.model.network import PromoterCNN
from geximpute.science.baselines import promoter_composition
from geximpute.science.promoters import one_hot_promoters
from geximpute.steps.prepare import promoter_tables

#: name -> (model factory, multi-task, reverse-complement augmentation, shift augmentation in bp, seed, lr)
VARIANTS = {
    "base": (lambda: PromoterCNN(32, 64, 15, 1), False, False, 0, 0, 2e-3),
    "seed1": (lambda: PromoterCNN(32, 64, 15, 1), False, False, 0, 1, 2e-3),
    "seed2": (lambda: PromoterCNN(32, 64, 15, 1), False, False, 0, 2, 2e-3),
    "channels128": (lambda: PromoterCNN(32, 128, 15, 1), False, False, 0, 0, 2e-3),
    "binned": (lambda: PromoterCNN(32, 64, 15, 1, 6), False, False, 0, 0, 2e-3),
    "binned_seed1": (lambda: PromoterCNN(32, 64, 15, 1, 6), False, False, 0, 1, 2e-3),
    "binned_seed2": (lambda: PromoterCNN(32, 64, 15, 1, 6), False, False, 0, 2, 2e-3),
    "binned3": (lambda: PromoterCNN(32, 64, 15, 1, 3), False, False, 0, 0, 2e-3),
    "binned12": (lambda: PromoterCNN(32, 64, 15, 1, 12), False, False, 0, 0, 2e-3),
    "binned_shift20": (lambda: PromoterCNN(32, 64, 15, 1, 6), False, False, 20, 0, 2e-3),
    "shift20_seed1": (lambda: PromoterCNN(32, 64, 15, 1), False, False, 20, 1, 2e-3),
    "multi": (lambda: PromoterCNN(32, 64, 15, 1), True, False, 0, 0, 2e-3),
    "reverse_complement": (lambda: PromoterCNN(32, 64, 15, 1), False, True, 0, 0, 2e-3),
    "shift20": (lambda: PromoterCNN(32, 64, 15, 1), False, False, 20, 0, 2e-3),
    "lr5e-4": (lambda: PromoterCNN(32, 64, 15, 1), False, False, 0, 0, 5e-4),
}


def fit(name: str, x: torch.Tensor, levels: np.ndarray, train: np.ndarray, valid: np.ndarray, test: np.ndarray,
        epochs: int) -> tuple[np.ndarray, float, int]:
    """(test read-out of the mean level at the epoch best on ``valid``, that Pearson, that epoch)."""
    make, multi, rc, shift, seed, lr = VARIANTS[name]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    target = torch.as_tensor(levels if multi else levels.mean(1, keepdims=True), dtype=torch.float32)
    cnn = make()
    readout = nn.Sequential(nn.GELU(), nn.Linear(32, target.shape[1]))
    params = list(cnn.parameters()) + list(readout.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    mean_level = levels.mean(1)

    def predict(rows: np.ndarray) -> np.ndarray:
        cnn.eval()
        readout.eval()
        with torch.no_grad():
            out = torch.cat([readout(cnn(x[rows[i : i + 256]])) for i in range(0, len(rows), 256)])
        return out.numpy().mean(1)

    best, best_test, best_epoch = -np.inf, None, 0
    for epoch in range(epochs):
        cnn.train()
        readout.train()
        order = rng.permutation(train)
        for lo in range(0, len(order), 64):
            pick = order[lo : lo + 64]
            batch = x[pick].float()
            if shift:
                s = int(rng.integers(-shift, shift + 1))
                batch = torch.roll(batch, s, dims=-1)
                if s > 0:
                    batch[:, :, :s] = 0
                elif s < 0:
                    batch[:, :, s:] = 0
            if rc and rng.random() < 0.5:
                batch = batch.flip(1).flip(2)  # ACGT one-hot: complement is the channel flip
            loss = ((readout(cnn(batch)) - target[pick]) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        r = float(np.corrcoef(predict(valid), mean_level[valid])[0, 1])
        if r > best:
            best, best_test, best_epoch = r, predict(test), epoch + 1
    return best_test, float(np.corrcoef(best_test, mean_level[test])[0, 1]), best_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gtex-medians.yaml")
    parser.add_argument("--exclude-runs", nargs="+", required=True, type=Path,
                        help="evaluation output folders whose hidden genes are left out")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=14)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = load_dataset(load_config(args.config), with_variants=False)
    gene_ids = np.array(dataset.expression.gene_ids)
    promoters, gene_promoters = promoter_tables(dataset, gene_ids)
    sequence_of = dict(zip(promoters["promoter_id"].to_pylist(), promoters["sequence"].to_pylist(), strict=True))
    sequence = {g: sequence_of[p] for g, p in zip(gene_promoters["gene_id"].to_pylist(),
                                                   gene_promoters["promoter_id"].to_pylist(), strict=True)}
    hidden: set[str] = set()
    for run in args.exclude_runs:
        for path in sorted(run.glob("seed_*/predictions.parquet")):
            hidden |= set(pq.read_table(path, columns=["gene_id"])["gene_id"].to_pylist())
    if not hidden:
        raise SystemExit(f"no seed_*/predictions.parquet under {', '.join(map(str, args.exclude_runs))}")
    row = {g: i for i, g in enumerate(gene_ids)}
    genes = [g for g in sequence if g not in hidden and g in row]
    levels = np.log1p(np.nan_to_num(dataset.expression.values[[row[g] for g in genes]].astype(np.float64)))
    levels = (levels - levels.mean(0)) / levels.std(0)
    x = torch.as_tensor(one_hot_promoters([sequence[g] for g in genes], dataset.config.promoter.length))
    perm = np.random.default_rng(0).permutation(len(genes))
    n_test = len(genes) // 5
    test, rest = perm[:n_test], perm[n_test:]
    valid, train = rest[: len(rest) // 5], rest[len(rest) // 5 :]
    print(f"{len(genes)} genes with a window ({len(hidden)} hidden genes of the runs left out): "
          f"{len(train)} fit, {len(valid)} choose the epoch, {len(test)} test", flush=True)
    outputs = []
    for name in args.variants:
        t0 = time.perf_counter()
        out, r, epoch = fit(name, x, levels, train, valid, test, args.epochs)
        outputs.append(out)
        print(f"{name:20s} test Pearson {r:.3f} (epoch {epoch}); mean of the {len(outputs)} so far "
              f"{np.corrcoef(np.mean(outputs, 0), levels.mean(1)[test])[0, 1]:.3f}; {time.perf_counter() - t0:.0f} s",
              flush=True)
    features = promoter_composition([sequence[g] for g in genes], dataset.config.promoter.upstream)
    features = (features - features[train].mean(0)) / features[train].std(0)
    design = np.column_stack([np.ones(len(genes)), features])
    coef = np.linalg.lstsq(design[rest], levels.mean(1)[rest], rcond=None)[0]
    print(f"composition (least squares on the 5 features) test Pearson "
          f"{np.corrcoef(design[test] @ coef, levels.mean(1)[test])[0, 1]:.3f}")


if __name__ == "__main__":
    main()

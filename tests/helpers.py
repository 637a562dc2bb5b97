"""What several test modules share: tiny-model settings, the tiny model they all use, data copies, output readers
and the golden predictions. Test modules import from here, never from each other.

The golden file ``tests/golden/tiny_predictions.csv`` holds ``GOLDEN_ROWS`` rows of the imputation made by the
session's tiny model (:func:`build_tiny_model` on a GTEx-named copy of the session's synthetic data, seed 3, TINY
settings). ``tests/test_golden.py`` compares a fresh run against it; when the model changes on purpose, regenerate
it with::

    flock /tmp/geximpute-ray.lock .venv/bin/python tests/regenerate_golden.py

and commit the new file with the change that moved it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from geximpute.config import Config, load_config
from geximpute.fit.bundle import Bundle
from geximpute.science.problem import VisibleProblem, tissue_correlation
from geximpute.steps.impute import ImputeResult, impute
from geximpute.steps.pipeline import Progress, build_bundle

TESTS = Path(__file__).resolve().parent

# Tiny-model settings ---------------------------------------------------------------------------------------------

#: shrink the network and give Ray Train and XGBoost workers half a CPU each (so Ray Data's tasks still get one)
TINY_NETWORK = [
    "model.d_model=8",
    "model.n_heads=2",
    "model.n_layers=1",
    "model.cnn_channels=8",
    "model.cnn_layers=2",
    "train.cpus_per_worker=0.5",
    "head.cpus_per_worker=0.5",
    # the CNN's pre-training path runs in every tiny build, shortly: up to 20 epochs of 0.1-0.2 s in every network
    # the suite trains took it from 521 s to 656 s
    "train.pretrain_epochs=2",
]

#: ``TINY_NETWORK`` plus a short training, few boosting rounds and the entries task; later overrides win, so a test
#: adds its own settings after these
TINY = [
    *TINY_NETWORK,
    "train.batch_size=64",
    "train.epochs=2",
    "head.num_boost_round=30",
    "evaluation.task=entries",
    # the folds the tiny models were built with before the entries task's folds followed evaluation.fraction (0.1):
    # a quarter of the visible entries each, enough labelled records on the small synthetic data
    "train.fold_fraction=0.25",
]

# Data ------------------------------------------------------------------------------------------------------------

#: tissue names as GTEx writes them: spaces, dashes and brackets must survive the hive partition folder names
TISSUE_NAMES = {
    "Tissue01": "Brain - Cortex",
    "Tissue02": "Cells - EBV-transformed lymphocytes",
    "Tissue03": "Skin - Sun Exposed (Lower leg)",
    "Tissue04": "Whole Blood",
}


def gtex_named_copy(src: Path, dst: Path) -> Path:
    """A copy of a synthetic dataset whose tissues carry GTEx-style names; returns its config path."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    samples = pd.read_csv(dst / "samples.tsv", sep="\t")
    samples["tissue"] = samples["tissue"].map(lambda t: TISSUE_NAMES.get(t, t))
    samples.to_csv(dst / "samples.tsv", sep="\t", index=False)
    return dst / "config.yaml"


def donor_vcf(src: Path, donor: str, name: str, out: Path) -> Path:
    """The genome of ``donor`` from a multi-sample VCF, as a one-sample VCF whose sample is called ``name``."""
    lines = []
    column = None
    for line in src.read_text().splitlines():
        if line.startswith("##"):
            lines.append(line)
            continue
        fields = line.split("\t")
        if line.startswith("#CHROM"):
            column = fields.index(donor)
            fields = fields[:9] + [name]
        else:
            fields = fields[:9] + [fields[column]]
        lines.append("\t".join(fields))
    out.write_text("\n".join(lines) + "\n")
    return out


def nightly_config(data: Path, bundle: Path, work: Path, *extra: str) -> Config:
    """The config of a nightly run of ``data`` with ``bundle``, its inbox and output under ``work``."""
    return load_config(data / "config.yaml", [f"output_dir={work}", f"nightly.inbox={work / 'inbox'}",
                                              f"impute.model_dir={bundle}", *extra])


# Outputs ---------------------------------------------------------------------------------------------------------


def expected_missing(data: Path) -> tuple[int, set[tuple[str, str]], int]:
    """Independently of the engine: (missing entries of measured samples, donor-tissue pairs without a sample,
    genes), from the raw GCT and sample table."""
    expr = pd.read_csv(data / "expression.gct", sep="\t", skiprows=2).drop(columns=["Name", "Description"])
    samples = pd.read_csv(data / "samples.tsv", sep="\t").set_index("sample_id").loc[expr.columns]
    pairs = set(zip(samples["donor_id"], samples["tissue"], strict=True))
    all_pairs = {(d, t) for d in samples["donor_id"].unique() for t in samples["tissue"].unique()}
    return int(expr.isna().to_numpy().sum()), all_pairs - pairs, len(expr)


def read_output(folder: Path) -> pd.DataFrame:
    """An ``impute`` output folder as one frame (the tissue from the partition folders)."""
    return pads.dataset(folder, format="parquet", partitioning="hive").to_table().to_pandas()


def read_nightly(root: Path) -> pd.DataFrame:
    """A ``nightly`` output root as one frame, tissue and run date as strings."""
    frame = pads.dataset(root, format="parquet", partitioning="hive").to_table().to_pandas()
    frame["tissue"] = frame["tissue"].astype(str)
    frame["run_date"] = frame["run_date"].astype(str)
    return frame


def assert_keys_unique(frame: pd.DataFrame) -> None:
    keys = frame[["donor_id", "tissue", "gene_id"]].astype(str)
    dupes = keys.duplicated().sum()
    assert dupes == 0, f"{dupes} duplicated (donor, tissue, gene) keys"


# The tiny model --------------------------------------------------------------------------------------------------


@dataclass
class TinyModel:
    """A tiny model built by :func:`geximpute.steps.pipeline.build_bundle`, and what it was built from."""

    data: Path  # the dataset folder (config.yaml, expression.gct, samples.tsv, variants.vcf, ...)
    config: Config  # the resolved config of the build (TINY settings, output_dir = the work folder)
    bundle: Bundle  # the bundle as loaded from disk
    progress: Progress  # each stage's figures and results (the fitted models before saving, prepare's output)

    @property
    def folder(self) -> Path:
        """The bundle folder."""
        return self.bundle.folder

    @property
    def records(self) -> Path:
        """prepare's output, with the training folds."""
        return Path(self.config.output_dir) / "records"


def synth_small(out: Path) -> Path:
    """The session's small synthetic dataset (120 genes, 24 donors, 4 tissues, seed 3) written to ``out``."""
    from geximpute.apps.synth import SynthSpec, generate

    generate(out, SynthSpec(seed=3, n_genes=120, n_donors=24, n_tissues=4))
    return out


def build_tiny_model(data: Path, work: Path, *overrides: str) -> TinyModel:
    """Build the tiny model of ``data`` into ``work`` (records/, network/, model/); needs a running Ray.

    Its head goes through Ray Train's ``XGBoostTrainer`` however small its table (``head.ray_min_rows=0``): the
    suite's one fit on that path; the other small builds boost their heads in process."""
    config = load_config(data / "config.yaml", [f"output_dir={work}", *TINY, "head.ray_min_rows=0", *overrides])
    progress = Progress()
    bundle = build_bundle(config, progress=progress)
    return TinyModel(data, config, bundle, progress)


def impute_tiny(model: TinyModel, out: Path) -> tuple[Config, ImputeResult]:
    """Impute every missing entry of the tiny model's data with its bundle into ``out`` (default impute settings)."""
    config = load_config(model.data / "config.yaml", [f"output_dir={out.parent}"])
    return config, impute(config, model=model.folder, out_dir=out)


# Golden predictions ----------------------------------------------------------------------------------------------

GOLDEN_FILE = TESTS / "golden" / "tiny_predictions.csv"
GOLDEN_ROWS = 300
GOLDEN_KEYS = ["donor_id", "tissue", "gene_id"]
GOLDEN_VALUES = ["predicted", "predicted_lower", "predicted_upper"]


def golden_rows(predictions: pd.DataFrame) -> pd.DataFrame:
    """``GOLDEN_ROWS`` rows spread evenly over an imputation sorted by (donor, tissue, gene): key and values."""
    frame = predictions[GOLDEN_KEYS + GOLDEN_VALUES].copy()
    frame["tissue"] = frame["tissue"].astype(str)
    frame = frame.sort_values(GOLDEN_KEYS).reset_index(drop=True)
    picks = np.unique(np.linspace(0, len(frame) - 1, GOLDEN_ROWS).round().astype(int))
    return frame.iloc[picks].reset_index(drop=True)


def problem_of(values: np.ndarray, donor_index: np.ndarray, tissue_index: np.ndarray) -> VisibleProblem:
    """A visible problem around a (G, S) matrix, genes on one chromosome 10 kb apart."""
    n_genes, n_samples = values.shape
    n_d, n_t = int(donor_index.max()) + 1, int(tissue_index.max()) + 1
    tss = np.arange(n_genes, dtype=np.int64) * 10_000 + 1
    return VisibleProblem(
        gene_ids=np.array([f"G{i}" for i in range(n_genes)], dtype=object),
        chroms=np.array(["chr1"] * n_genes, dtype=object),
        tss=tss, start=tss, end=tss + 100,
        strand=np.ones(n_genes, np.int8),
        split=np.zeros(n_genes, np.int8),
        sample_ids=np.array([f"S{i}" for i in range(n_samples)], dtype=object),
        donor_index=donor_index.astype(np.int32),
        tissue_index=tissue_index.astype(np.int32),
        donors=[f"D{i}" for i in range(n_d)],
        tissues=[f"T{i}" for i in range(n_t)],
        values=values.astype(np.float32),
        tissue_corr=tissue_correlation(values, tissue_index, n_t),
    )


def donor_data(seed: int, n_genes: int = 30, n_donors: int = 120, n_tissues: int = 6, rank: int = 2,
               observed: float = 0.7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, donor_index, tissue_index): one sample per observed (donor, tissue); each gene has tissue levels
    plus donor factors (``rank`` per donor) loaded differently in every (gene, tissue), plus noise."""
    rng = np.random.default_rng(seed)
    cells = [(d, t) for d in range(n_donors) for t in range(n_tissues) if rng.random() < observed]
    donor = np.array([c[0] for c in cells])
    tissue = np.array([c[1] for c in cells])
    level = rng.normal(3, 1.5, size=(n_genes, n_tissues))
    z = rng.normal(size=(n_donors, rank))
    load = rng.normal(size=(n_genes, n_tissues, rank))
    signal = np.einsum("gtr,dr->gdt", load, z)
    values = level[:, tissue] + signal[:, donor, tissue] + rng.normal(scale=0.3, size=(n_genes, len(cells)))
    return values, donor, tissue

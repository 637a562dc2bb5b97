"""The Python API for notebooks and scripts: load a config, run a step, read the predictions.

It sits at the level of :mod:`geximpute.apps` (it may import every layer) and does what the command line does, without
a terminal::

    from geximpute import api

    config = api.load_config("configs/gtex-v8-samples.yaml", {"train.epochs": 2, "output_dir": "out"})
    api.run("prepare", config, training=True)   # steps start a local Ray (or join ray.address) themselves
    api.run("train", config)
    api.run("fit-head", config)
    api.run("impute", config)
    liver = api.read_predictions(config, tissues=["Liver"])   # pandas, partition columns included
    table = api.predictions(config).to_table(columns=["gene_id", "predicted"])   # or Arrow, lazily

Steps return what their functions return (:class:`~geximpute.steps.prepare.Prepared`,
:class:`~geximpute.steps.impute.ImputeResult`, the metrics dict of ``evaluate``...).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from geximpute.config import Config
from geximpute.config import load_config as _load
from geximpute.errors import ConfigError, GeximputeError


def load_config(path: str | Path, overrides: Mapping[str, Any] | Iterable[str] = ()) -> Config:
    """Read a YAML config and apply overrides.

    Args:
        path: the YAML file (relative input paths are read relative to it).
        overrides: ``{"train.epochs": 2}`` or the command line's ``["train.epochs=2"]``; values of a mapping
            may be any YAML value (lists, None...).
    """
    if isinstance(overrides, Mapping):
        overrides = [f"{key}={json.dumps(value, default=_plain)}" for key, value in overrides.items()]  # JSON: YAML
    return _load(path, list(overrides))


def _plain(value: Any) -> Any:
    """A notebook's value as plain JSON: a path as its text, a numpy scalar or array as Python's, a date as ISO."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{value!r} ({type(value).__name__}) is not a value a config holds")


def _steps() -> dict[str, Callable[..., Any]]:
    # imported when a step runs, as the CLI does: `from geximpute import api` stays free of torch and Ray
    from geximpute.steps.evaluate import evaluate
    from geximpute.steps.impute import impute
    from geximpute.steps.ingest import ingest
    from geximpute.steps.nightly import nightly
    from geximpute.steps.pipeline import build_bundle, fit_head_and_save, train_and_save
    from geximpute.steps.prepare import prepare
    from geximpute.steps.variant_effects import variant_effects

    return {"ingest": ingest, "prepare": prepare, "train": train_and_save, "fit-head": fit_head_and_save,
            # a model for imputation, as the build job makes it: every visible entry, none held out to score
            "build": functools.partial(build_bundle, targets="none"),
            "impute": impute, "evaluate": evaluate, "variant-effects": variant_effects, "nightly": nightly}


#: the steps :func:`run` knows (``ingest``: the expression file once into a store, :mod:`geximpute.io.store`);
#: ``build`` is prepare -> train -> fit-head in one call
STEPS = ("ingest", "prepare", "train", "fit-head", "build", "impute", "evaluate", "variant-effects", "nightly")


def run(step: str, config: Config | str | Path, **options: Any) -> Any:
    """Run one step of the engine and return its result.

    Args:
        step: one of :data:`STEPS` (``fit_head`` and ``variant_effects`` spellings work too).
        config: a loaded config or the path of a YAML file.
        options: the step function's keyword arguments, e.g. ``training=True`` for prepare, ``out_dir=...`` for
            prepare, impute, evaluate and variant-effects, ``run_date=...`` for nightly.
    """
    name = step.replace("_", "-")
    if name not in STEPS:
        raise ConfigError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
    if not isinstance(config, Config):
        config = load_config(config)
    from geximpute.runtime.provenance import versions

    versions()  # the code and libraries this process runs, as its manifests record them
    return _steps()[name](config, **options)


def predictions_path(source: Config | str | Path) -> Path:
    """The predictions folder of a config (``impute.out_dir`` or ``<output_dir>/predictions``), or ``source``."""
    if isinstance(source, Config):
        from geximpute.steps.impute import output_dir

        return output_dir(source)
    return Path(source)


def predictions(source: Config | str | Path, *, tissues: Iterable[str] | None = None,
                donors: Iterable[str] | None = None, genes: Iterable[str] | None = None,
                latest: bool = True) -> pads.Dataset:
    """The predictions as a lazy Arrow dataset, hive partitions (``tissue``, nightly's ``run_date``) as columns.

    Args:
        source: a config (its predictions folder), or a folder written by impute or nightly.
        tissues, donors, genes: keep only these (the tissue filter prunes whole partitions before reading).
        latest: on a nightly root, each donor's rows of its latest ``run_date`` alone (a genome delivered again is
            imputed again into a later run date, and its earlier rows stay there: read whole, the root holds an
            entry once per delivery); False: every run date's.

    Raises:
        GeximputeError: the folder holds no predictions.
    """
    folder = predictions_path(source)
    if not folder.is_dir() or not _holds_parquet(folder):
        raise GeximputeError(f"{folder}: no predictions here (Parquet files); run `geximpute impute` first")
    dataset = pads.dataset(folder, format="parquet", partitioning="hive")
    conditions = []
    for column, values in (("tissue", tissues), ("donor_id", donors), ("gene_id", genes)):
        if values is not None:
            if column not in dataset.schema.names:
                raise GeximputeError(f"{folder}: the predictions have no column {column!r}")
            conditions.append(pads.field(column).isin(list(values)))
    if latest and "run_date" in dataset.schema.names and "donor_id" in dataset.schema.names:
        conditions.append(_latest_run_dates(folder, dataset))
    for condition in conditions:
        dataset = dataset.filter(condition)
    return dataset


def _latest_run_dates(folder: Path, dataset: pads.Dataset) -> pads.Expression:
    """A filter that keeps each donor's rows of its latest ``run_date``: from the donors each run date's
    ``_manifest.json`` lists (nightly writes them; a partition without one is read from its rows)."""
    from geximpute.runtime.partitions import committed_donors

    kind = dataset.schema.field("run_date").type
    by_date: dict = {}
    for donor, info in committed_donors(folder).items():
        by_date.setdefault(info["run_date"], []).append(donor)
    keep = None
    for day, donors in by_date.items():
        as_value = pa.array([day]).cast(kind)[0]
        one = (pads.field("run_date") == as_value) & pads.field("donor_id").isin(donors)
        keep = one if keep is None else keep | one
    return keep if keep is not None else pads.scalar(True)


def _holds_parquet(folder: Path) -> bool:
    """Whether a Parquet file lies anywhere under ``folder``, through linked folders too (nightly's ``run_date=``
    partitions are links into its versions; ``Path.rglob`` does not follow them)."""
    return any(name.endswith(".parquet") for _, _, names in os.walk(folder, followlinks=True) for name in names)


def read_predictions(source: Config | str | Path, *, columns: list[str] | None = None,
                     tissues: Iterable[str] | None = None, donors: Iterable[str] | None = None,
                     genes: Iterable[str] | None = None, latest: bool = True):
    """The predictions as a pandas DataFrame (see :func:`predictions` for the arguments)."""
    dataset = predictions(source, tissues=tissues, donors=donors, genes=genes, latest=latest)
    return dataset.to_table(columns=columns).to_pandas()


def read_metrics(folder: str | Path) -> dict:
    """``metrics.json`` of an ``evaluate`` output folder (its ``report.html`` sits beside it)."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise GeximputeError(f"{folder}: no metrics.json; run `geximpute evaluate --out {folder}` first")
    return json.loads(path.read_text())

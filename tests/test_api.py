"""The notebook API: configs with overrides, steps by name, predictions as Arrow or pandas with partitions."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pytest

from geximpute import api
from geximpute.errors import ConfigError, GeximputeError


def test_load_config_takes_a_mapping_or_the_command_line_form(synth_small):
    path = synth_small / "config.yaml"
    by_map = api.load_config(path, {"train.epochs": 3, "evaluation.methods": ["distance", "row_tissue"],
                                    "ray.num_cpus": None})
    by_list = api.load_config(path, ["train.epochs=3", "evaluation.methods=[distance, row_tissue]",
                                     "ray.num_cpus=null"])
    assert by_map == by_list
    assert by_map.train.epochs == 3 and by_map.evaluation.methods == ("distance", "row_tissue")
    with pytest.raises(ConfigError, match="train.epochs"):
        api.load_config(path, {"train.epochs": "many"})
    # a notebook's values: a path, numpy numbers (a bare TypeError before)
    from pathlib import Path

    notebook = api.load_config(path, {"output_dir": Path("/tmp/gx"), "train.epochs": np.int64(3),
                                      "evaluation.fraction": np.float32(0.25)})
    assert notebook.output_dir == "/tmp/gx" and notebook.train.epochs == 3 and notebook.evaluation.fraction == 0.25


def test_build_prepares_as_the_build_job_prepares():
    """``api.run("build")`` prepares as ``python -m geximpute.jobs.build`` does (``prepare --training --targets
    none``: every visible entry, none held out for an evaluation; before, it held out the evaluation's entries).
    What ``--targets none`` prepares is checked in tests/test_training.py."""
    from geximpute.jobs.build import BUILD_STEPS

    assert BUILD_STEPS[0][0] == "prepare" and "--training" in BUILD_STEPS[0]
    targets = BUILD_STEPS[0][BUILD_STEPS[0].index("--targets") + 1]
    assert api._steps()["build"].keywords == {"targets": targets} == {"targets": "none"}


def test_unknown_step_is_named(synth_small):
    with pytest.raises(ConfigError, match="unknown step 'trian'.*prepare, train"):
        api.run("trian", synth_small / "config.yaml")


def test_run_prepare_by_name(ray_local, synth_small, tmp_path):
    config = api.load_config(synth_small / "config.yaml", {"output_dir": str(tmp_path)})
    prepared = api.run("prepare", config, out_dir=tmp_path / "records", targets="hidden")
    assert prepared.n_records == len(prepared.truth) > 0
    context = pads.dataset(tmp_path / "records" / "context", format="parquet", partitioning="hive")
    assert context.count_rows() == prepared.n_records


def test_predictions_with_partitions_and_filters(tiny_imputation):
    config, result = tiny_imputation
    everything = api.predictions(config)  # the config's predictions folder
    assert "tissue" in everything.schema.names  # the hive partition is a column
    assert everything.count_rows() == result.n_rows
    tissue = sorted(result.rows)[0]
    frame = api.read_predictions(result.out_dir, tissues=[tissue], columns=["gene_id", "tissue", "predicted"])
    assert len(frame) == result.rows[tissue] > 0
    assert set(frame["tissue"]) == {tissue}
    donors = api.read_predictions(result.out_dir, columns=["donor_id"])["donor_id"].unique()[:2]
    some = api.read_predictions(config, donors=donors, tissues=[tissue])
    assert set(some["donor_id"]) <= set(donors) and set(some["tissue"]) == {tissue}
    direct = pads.dataset(result.out_dir, format="parquet", partitioning="hive").to_table(
        filter=(pads.field("tissue") == tissue) & pads.field("donor_id").isin(list(donors))).to_pandas()
    assert len(some) == len(direct)
    assert np.allclose(np.sort(some["predicted"].to_numpy()), np.sort(direct["predicted"].to_numpy()))


def test_a_nightly_root_reads_through_its_linked_run_dates(tmp_path):
    """Nightly commits each run date as a link into its versions; the API finds the predictions through it (it
    looked for Parquet files without following links, and refused every nightly root)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from geximpute.runtime.atomic import staged_output
    from geximpute.steps.nightly import partition_store

    root = tmp_path / "nightly"
    part = root / "run_date=2026-12-07"
    with staged_output(part, step="nightly", store=partition_store(root) / part.name) as staging:
        (staging / "tissue=Liver").mkdir()
        pq.write_table(pa.table({"gene_id": ["g1"], "donor_id": ["d1"], "predicted": [1.0]}),
                       staging / "tissue=Liver" / "part-0.parquet")
    assert part.is_symlink()
    frame = api.read_predictions(root)
    assert frame[["gene_id", "tissue", "run_date"]].astype(str).values.tolist() == [["g1", "Liver", "2026-12-07"]]


def test_no_predictions_is_a_clear_error(tmp_path):
    with pytest.raises(GeximputeError, match="no predictions here"):
        api.predictions(tmp_path)
    with pytest.raises(GeximputeError, match="no metrics.json"):
        api.read_metrics(tmp_path)


def test_a_nightly_root_reads_each_donor_from_its_latest_run_date(tmp_path):
    """A genome delivered again is imputed again into a later run date; its earlier rows stay there. The API reads
    each donor's latest run date (the root read whole held an entry once per delivery)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    def part(day: str, donor: str, value: float) -> None:
        folder = tmp_path / "nightly" / f"run_date={day}" / "tissue=Liver"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"gene_id": ["G1", "G2"], "donor_id": [donor, donor], "predicted": [value, value]}),
                       folder / f"part-{donor}.parquet")

    part("2026-01-01", "A", 1.0)
    part("2026-01-01", "B", 2.0)
    part("2026-01-03", "A", 3.0)  # A delivered again
    frame = api.read_predictions(tmp_path / "nightly")
    assert sorted(zip(frame["donor_id"], frame["predicted"], strict=True)) == [("A", 3.0)] * 2 + [("B", 2.0)] * 2
    assert len(api.read_predictions(tmp_path / "nightly", latest=False)) == 6
    assert len(api.read_predictions(tmp_path / "nightly", donors=["A"])) == 2
    # nightly's own roots: each run date's manifest lists its donors (no scan of the rows)
    for day, donors in (("2026-01-01", ["A", "B"]), ("2026-01-03", ["A"])):
        (tmp_path / "nightly" / f"run_date={day}" / "_manifest.json").write_text(json.dumps({"donors": {
            d: {"rows": 2} for d in donors}}))
    frame = api.read_predictions(tmp_path / "nightly")
    assert sorted(zip(frame["donor_id"], frame["predicted"], strict=True)) == [("A", 3.0)] * 2 + [("B", 2.0)] * 2
    # a manifest that lists no donors (or is torn): that run date's donors are read from its rows
    (tmp_path / "nightly" / "run_date=2026-01-03" / "_manifest.json").write_text(json.dumps({"config": {}}))
    frame = api.read_predictions(tmp_path / "nightly")
    assert sorted(zip(frame["donor_id"], frame["predicted"], strict=True)) == [("A", 3.0)] * 2 + [("B", 2.0)] * 2

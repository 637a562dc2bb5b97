"""Batch imputation on a real local Ray with the session's tiny real bundle: every missing entry
exactly once, missing donor-tissue profiles, the output contract of DESIGN.md, the manifest, readers (pyarrow,
pandas, DuckDB with the README's query), idempotent reruns and the selection settings."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from helpers import TISSUE_NAMES, assert_keys_unique, expected_missing, read_output

from geximpute import schema as S
from geximpute.errors import ConfigError, GeximputeError
from geximpute.fit.bundle import check_compatible
from geximpute.runtime.atomic import SUPERSEDED, resolve, store_of
from geximpute.science.problem import VisibleProblem
from geximpute.steps.impute import add_missing_profiles, impute, target_mask

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tiny_data) -> Path:
    return tiny_data


@pytest.fixture(scope="module")
def bundle(tiny_model) -> Path:
    return tiny_model.folder


@pytest.fixture(scope="module")
def first_run(tiny_imputation):
    return tiny_imputation


# Without Ray ----------------------------------------------------------------------------------------------------


def _problem() -> VisibleProblem:
    values = np.array([[1.0, 2.0, np.nan], [3.0, np.nan, 4.0]], dtype=np.float32)  # 2 genes x 3 samples
    return VisibleProblem(
        gene_ids=np.array(["g1", "g2"], dtype=object), chroms=np.array(["chr1", "chr1"], dtype=object),
        tss=np.array([100, 200]), start=np.array([100, 200]), end=np.array([150, 250]),
        strand=np.array([1, -1], dtype=np.int8), split=np.zeros(2, np.int8),
        sample_ids=np.array(["s1", "s2", "s3"], dtype=object), donor_index=np.array([0, 0, 1], np.int32),
        tissue_index=np.array([0, 1, 0], np.int32), donors=["d1", "d2"], tissues=["A", "B"], values=values,
        tissue_corr=np.eye(2, dtype=np.float32),
    )


def test_missing_profiles_are_virtual_samples_of_nothing_measured():
    problem = _problem()
    extended, virtual = add_missing_profiles(problem)
    # d2 has no sample in tissue B: one virtual sample, NaN everywhere, ordered by (tissue, donor)
    assert virtual.sum() == 1 and extended.n_samples == 4
    assert np.isnan(extended.values[:, virtual]).all()
    assert list(extended.tissue_index) == sorted(extended.tissue_index)
    v = int(np.flatnonzero(virtual)[0])
    assert (extended.donors[extended.donor_index[v]], extended.tissues[extended.tissue_index[v]]) == ("d2", "B")
    # the measured values travel with their samples
    for s, sid in enumerate(problem.sample_ids):
        np.testing.assert_array_equal(extended.values[:, list(extended.sample_ids).index(sid)], problem.values[:, s])
    targets = target_mask(extended)
    assert targets.sum() == 2 + 2  # two missing entries of measured samples, two genes of the virtual sample
    assert target_mask(extended, include_observed=True).all()
    only = target_mask(extended, donors=["d1"], tissues=["B"])
    assert only.sum() == 1 and only[:, list(extended.sample_ids).index("s2")].sum() == 1
    assert add_missing_profiles(problem, tissues=["A"])[1].sum() == 0
    with pytest.raises(ConfigError, match="impute.donors"):
        add_missing_profiles(problem, donors=["nobody"])


def test_missing_profiles_in_place_equal_the_copy(monkeypatch, caplog, tmp_path):
    """In place, the wider matrix is filled a pass of rows at a time while the given one shrinks behind: the same
    problem as the copy's, the given problem's matrix taken (None), and no pass fell back to a whole copy."""
    import logging

    from geximpute.steps import impute as I

    rng = np.random.default_rng(4)
    n_genes, pairs = 23, [(d, t) for d in range(6) for t in range(3) if rng.random() < 0.6]

    def problem():
        return VisibleProblem(
            gene_ids=np.array([f"g{i}" for i in range(n_genes)], dtype=object),
            chroms=np.array(["chr1"] * n_genes, dtype=object), tss=np.arange(n_genes), start=np.arange(n_genes),
            end=np.arange(n_genes), strand=np.ones(n_genes, np.int8), split=np.zeros(n_genes, np.int8),
            sample_ids=np.array([f"s{i}" for i in range(len(pairs))], dtype=object),
            donor_index=np.array([d for d, _ in pairs], np.int32),
            tissue_index=np.array([t for _, t in pairs], np.int32),
            donors=[f"d{i}" for i in range(6)], tissues=["A", "B", "C"],
            values=np.random.default_rng(1).random((n_genes, len(pairs))).astype(np.float32),
            tissue_corr=np.eye(3, dtype=np.float32))

    monkeypatch.setattr(I, "WIDEN_CELLS", 3 * 18)  # passes of three rows
    copied, virtual = add_missing_profiles(problem())
    given = problem()
    with caplog.at_level(logging.DEBUG, logger=I.log.name):
        taken, virtual_taken = add_missing_profiles(given, in_place=True)
    assert given.values is None and "copied whole" not in caplog.text
    np.testing.assert_array_equal(taken.values, copied.values)
    np.testing.assert_array_equal(virtual_taken, virtual)
    assert list(taken.sample_ids) == list(copied.sample_ids) and virtual.sum() > 0
    # the matrix in a file (impute's): the wider one written beside it, the given file shrunk and removed
    from geximpute.io.matrixfile import MatrixFile

    on_disk = problem()
    path = tmp_path / "matrix.f32"
    on_disk.values = MatrixFile.from_array(path, on_disk.values)
    widened, virtual_file = add_missing_profiles(on_disk, in_place=True)
    assert on_disk.values is None and not path.exists() and isinstance(widened.values, MatrixFile)
    np.testing.assert_array_equal(widened.values.read(), copied.values)
    np.testing.assert_array_equal(virtual_file, virtual)
    for observed in (False, True):  # its targets mask: a file beside it
        in_file = target_mask(widened, include_observed=observed)
        assert isinstance(in_file, MatrixFile)
        np.testing.assert_array_equal(in_file.read(), target_mask(copied, include_observed=observed))
    # nothing to add nor move: the matrix itself
    ordered, _ = add_missing_profiles(_problem(), tissues=["A"])
    matrix = ordered.values
    same, added = add_missing_profiles(ordered, tissues=["A"], in_place=True)
    assert same.values is matrix and added.sum() == 0


# On Ray ---------------------------------------------------------------------------------------------------------


def test_every_missing_entry_once_with_the_output_contract(first_run, data, bundle):
    config, result = first_run
    n_missing, missing_pairs, n_genes = expected_missing(data)
    frame = read_output(result.out_dir)
    assert len(frame) == result.n_rows == n_missing + len(missing_pairs) * n_genes
    assert result.n_missing_profiles == len(missing_pairs)
    assert_keys_unique(frame)
    # the matrix the run kept on disk beside its output: gone with the run
    assert not list(result.out_dir.parent.glob(f".{result.out_dir.name}.matrix-*"))
    # DESIGN.md's columns, on the declared schema
    assert set(S.PREDICTIONS.names) <= set(frame.columns)
    files = list(result.out_dir.glob("tissue=*/*.parquet"))
    assert files and all(f.name.startswith("part-") for f in files)  # tissue=.../part-*.parquet, as designed
    assert files and pq.read_schema(files[0]).remove_metadata().equals(S.PREDICTIONS.remove(2), check_metadata=False)
    assert set(frame["tissue"].astype(str)) == set(TISSUE_NAMES.values())
    # missing profiles: no sample id; missing genes of measured samples: their sample id
    virtual = frame["sample_id"].isna()
    assert set(zip(frame.loc[virtual, "donor_id"], frame.loc[virtual, "tissue"].astype(str),
                   strict=True)) == missing_pairs
    assert virtual.sum() == len(missing_pairs) * n_genes
    assert frame["observed"].isna().all()
    assert (frame["predicted_lower"] <= frame["predicted_upper"]).all() and np.isfinite(frame["predicted"]).all()
    # back on TPM, at least 0 (an estimate below 0 on the log1p scale is no negative abundance)
    np.testing.assert_allclose(frame["predicted_tpm"], np.expm1(np.maximum(frame["predicted"], 0)), rtol=1e-4,
                               atol=1e-4)
    version = json.loads((bundle / "manifest.json").read_text())["model_version"]
    assert set(frame["model_version"]) == {version} and set(frame["run_id"]) == {result.run_id}
    # the manifest: config, inputs, model, run, rows per partition, versions
    manifest = json.loads((result.out_dir / "_manifest.json").read_text())
    assert manifest["run_id"] == result.run_id and manifest["model_version"] == version
    assert manifest["rows"] == frame.groupby(frame["tissue"].astype(str)).size().to_dict()
    assert {"config", "versions", "inputs"} <= set(manifest) and "expression" in manifest["inputs"]
    # what the columns hold: the synthetic data is TPM, its intervals 80%
    assert manifest["columns"] == {"predicted": "log1p of TPM", "predicted_tpm": "TPM", "interval_level": 0.8,
                                   "interval_quantiles": [0.1, 0.9]}
    # the code that made it: this checkout's commit (the suite runs from a git checkout)
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert manifest["versions"]["geximpute_commit"].split("+")[0] == head
    # nothing but the committed folder is left beside it
    assert sorted(p.name for p in result.out_dir.parent.iterdir()) == sorted(["predictions", ".predictions.geximpute"])


def test_pyarrow_pandas_and_duckdb_read_the_output_with_the_readme_query(first_run):
    import duckdb

    _, result = first_run
    n = result.n_rows
    assert pads.dataset(result.out_dir, format="parquet", partitioning="hive").count_rows() == n
    frame = pd.read_parquet(result.out_dir)
    assert len(frame) == n and set(frame["tissue"].astype(str)) == set(TISSUE_NAMES.values())
    # the exact query README shows, pointed at this output instead of the demo's
    readme = (REPO / "README.md").read_text()
    match = re.search(r"```sql\n(.*?)```", readme, re.S)
    assert match, "README.md has no ```sql block"
    query = match.group(1)
    demo_path = re.search(r"read_parquet\('([^']+?)/\*\*/\*\.parquet'", query).group(1)
    rows = duckdb.sql(query.replace(demo_path, str(result.out_dir))).fetchall()
    assert rows, "the README query returned nothing"
    total = duckdb.sql(f"SELECT count(*) FROM read_parquet('{result.out_dir}/**/*.parquet', hive_partitioning = "
                       f"true)").fetchall()[0][0]
    assert total == n
    tissues = {r[0] for r in duckdb.sql(f"SELECT DISTINCT tissue FROM read_parquet('{result.out_dir}/**/*.parquet', "
                                        f"hive_partitioning = true)").fetchall()}
    assert tissues == set(TISSUE_NAMES.values())


def test_rerun_replaces_with_the_same_rows(first_run, bundle):
    config, result = first_run
    before = read_output(result.out_dir)
    again = impute(config, model=bundle, out_dir=result.out_dir)
    after = read_output(result.out_dir)
    assert again.run_id == result.run_id and again.n_rows == result.n_rows == len(after)
    key = ["donor_id", "tissue", "gene_id"]
    for frame in (before, after):
        frame["tissue"] = frame["tissue"].astype(str)
    pd.testing.assert_frame_equal(before.sort_values(key).reset_index(drop=True),
                                  after.sort_values(key).reset_index(drop=True), check_exact=False, rtol=1e-5)
    store = store_of(result.out_dir)
    assert sorted(p.name for p in result.out_dir.parent.iterdir()) == sorted(["predictions", store.name])
    # the output names its new version; the previous one stays for its readers, marked superseded
    versions = sorted(store.iterdir())
    assert len(versions) >= 2 and all(v.name.startswith("v-") for v in versions)
    assert resolve(result.out_dir) in versions
    assert all((v / SUPERSEDED).exists() for v in versions if v != resolve(result.out_dir))


def test_selection_with_observed_entries_through_the_cli(first_run, data, bundle, tmp_path):
    from geximpute.apps.cli import main

    config, _ = first_run
    donor = "SYN-D0002"
    tissues = ["Whole Blood", "Skin - Sun Exposed (Lower leg)"]
    out = tmp_path / "selected"
    rc = main(["-q", "impute", "--config", str(data / "config.yaml"), "--model", str(bundle), "--out", str(out),
               "--include-observed", "--set", f"impute.donors=[{donor}]",
               "--set", f"impute.tissues={json.dumps(tissues)}"])
    assert rc == 0
    frame = read_output(out)
    _, _, n_genes = expected_missing(data)
    assert len(frame) == len(tissues) * n_genes  # every entry of the donor in those tissues, measured or not
    assert_keys_unique(frame)
    assert set(frame["donor_id"]) == {donor} and set(frame["tissue"].astype(str)) == set(tissues)
    measured = frame["observed"].notna()
    assert measured.any() and (~measured).any()
    assert frame.loc[measured, "sample_id"].notna().all()
    # the observed value is the measured one on the modelling scale (log1p TPM)
    expr = pd.read_csv(data / "expression.gct", sep="\t", skiprows=2).set_index("Name")
    expr.index = expr.index.str.replace(r"\.\d+$", "", regex=True)
    row = frame.loc[measured].iloc[0]
    np.testing.assert_allclose(row["observed"], np.log1p(expr.loc[row["gene_id"], row["sample_id"]]), rtol=1e-5)


def test_readme_shows_the_query_the_demo_runs():
    from geximpute.apps.demo import README_QUERY

    assert README_QUERY.format(path="geximpute-demo/gtex-v8/predictions") in (REPO / "README.md").read_text()


def test_check_compatible_names_the_key_that_differs(tmp_path):
    recorded = {"tissues": ["Liver", "Lung"], "scale": "tpm", "transform": "log1p", "counts_normalisation": "cpm",
                "k_neighbours": 16, "max_distance": None, "genes_sha256": "a" * 64, "n_genes": 10,
                "genome_contigs": {"chr1": 1000, "chr2": 500}, "family_shrinkage": 3.0,
                "promoter": {"promoter.upstream": 1000, "promoter.downstream": 500, "promoter.soft_mask": "upper",
                             "promoter.max_unknown_fraction": 0.0},
                "genotypes": {"genotypes.cis_window": None, "genotypes.missing": "mean",
                              "genotypes.unphased": "as_written", "genotypes.keep_filtered": False,
                              "context.genetic_shrinkage": None}}
    check_compatible(recorded, dict(recorded), tmp_path, "the data")
    # the settings that shape a record's features: another window, missing-call policy or family prior is refused
    for key, value, needle in (
        ("promoter", {**recorded["promoter"], "promoter.max_unknown_fraction": 0.1},
         "promoter.max_unknown_fraction is 0.0 in the bundle but 0.1"),
        ("genotypes", {**recorded["genotypes"], "genotypes.missing": "reference"},
         "genotypes.missing is 'mean' in the bundle but 'reference'"),
        ("genotypes", {**recorded["genotypes"], "context.genetic_shrinkage": 10.0},
         "context.genetic_shrinkage is None in the bundle but 10.0"),
        ("family_shrinkage", 10.0, "context.family_shrinkage is 3.0 in the bundle but 10.0"),
    ):
        with pytest.raises(GeximputeError, match=re.escape(needle)):
            check_compatible(recorded, {**recorded, key: value}, tmp_path, "the data")
    # a model without genomes (or data without them) is not judged on how genomes are read; an older bundle's
    # record without these keys is not judged on them
    check_compatible({**recorded, "genotypes": None}, {**recorded, "genotypes": {"genotypes.missing": "error"}},
                     tmp_path, "the data")
    # a strict policy (`error`) reads data with nothing to fill in: it matches a model of any policy, both ways;
    # networks that do not read the family level (recorded null) take any prior
    strict = {**recorded["genotypes"], "genotypes.missing": "error", "genotypes.unphased": "error"}
    check_compatible(recorded, {**recorded, "genotypes": strict}, tmp_path, "the data")
    check_compatible({**recorded, "genotypes": strict}, recorded, tmp_path, "the data")
    check_compatible({**recorded, "family_shrinkage": None}, {**recorded, "family_shrinkage": 10.0}, tmp_path, "x")
    old = {k: v for k, v in recorded.items() if k not in ("promoter", "family_shrinkage")}
    check_compatible(old, {**recorded, "family_shrinkage": 10.0}, tmp_path, "the data")
    for key, value, needle in (
        ("tissues", ["Lung", "Liver"], "the same tissue names in another order"),
        ("tissues", ["Liver", "Heart"], "['Lung'] only in the model and ['Heart'] only in the data"),
        ("scale", "counts", "scale is 'tpm' in the bundle but 'counts'"),
        ("k_neighbours", 8, "k_neighbours is 16 in the bundle but 8"),
        ("genes_sha256", "b" * 64, "gene set"),
        ("genome_contigs", {"chr1": 2000}, "genome build is 'chr1 of 1,000 bp' in the bundle but 'chr1 of 2,000 bp'"),
    ):
        with pytest.raises(GeximputeError, match=re.escape(needle)):
            check_compatible(recorded, {**recorded, key: value}, tmp_path, "the data")
    check_compatible(None, {**recorded, "scale": "counts"}, tmp_path, "the data")  # an older bundle: no record


def test_impute_refuses_data_the_bundle_was_not_trained_for(first_run, data, bundle, tmp_path):
    import shutil

    from geximpute.config import load_config

    out = tmp_path / "refused"
    other = load_config(data / "config.yaml", [f"output_dir={tmp_path}", "context.k_neighbours=12"])
    with pytest.raises(GeximputeError, match="k_neighbours is 16 in the bundle but 12 in the data"):
        impute(other, model=bundle, out_dir=out)
    # the plan refuses it as the run would (it planned a run that could not start)
    from geximpute.steps.impute import impute_plan
    with pytest.raises(GeximputeError, match="k_neighbours is 16 in the bundle but 12 in the data"):
        impute_plan(other, model=bundle, out_dir=out)
    # the same number of tissues under other names: refused, not predicted with the wrong embeddings
    renamed = tmp_path / "renamed"
    shutil.copytree(data, renamed)
    samples = (renamed / "samples.tsv").read_text()
    (renamed / "samples.tsv").write_text(samples.replace("Whole Blood", "Blood (whole)"))
    with pytest.raises(GeximputeError, match=r"tissues is .* \(tissues \['Whole Blood'\] only in the model"):
        impute(load_config(renamed / "config.yaml", [f"output_dir={tmp_path}"]), model=bundle, out_dir=out)
    assert not out.exists() and not store_of(out).exists()


def test_plan_counts_the_run_s_entries_and_projects_from_its_measured_rate(first_run, data, bundle, tmp_path,
                                                                          capfd, monkeypatch):
    import geximpute.steps.impute as impute_module
    from geximpute.apps.cli import main
    from geximpute.steps.impute import impute_plan

    config, result = first_run
    matrices = []
    plan_of = impute_module._plan
    monkeypatch.setattr(impute_module, "_plan", lambda *a: matrices.append(a[-1]) or plan_of(*a))
    plan = impute_plan(config, model=bundle, out_dir=result.out_dir, workers=4)
    monkeypatch.undo()
    # its matrix on disk where `impute` keeps it, beside the output (not in $TMPDIR), and gone after
    assert matrices[0].parent.parent == Path(result.out_dir).absolute().parent
    assert not list(Path(result.out_dir).parent.glob(f".{Path(result.out_dir).name}.matrix-*"))
    assert plan["entries"] == result.n_rows == sum(shard["entries"] for shard in plan["shards"])
    # each shard is a run of genes of one chromosome x a range of donors; together they tile the run's entries
    assert all(0 <= shard["genes"][0] < shard["genes"][1] <= plan["genes"]
               and 0 <= shard["donors"][0] < shard["donors"][1] <= plan["donors"] for shard in plan["shards"])
    # the shard, baseline, haplotype and record files were removed before the commit
    assert not [p for p in result.out_dir.iterdir()
                if p.name in ("_shards", "_baselines", "_haplotypes", "_records")]
    assert plan["baseline_ranges"] == [[0, plan["genes"]]]  # small data: the stacked baselines in one task
    assert plan["missing_profiles"] == result.n_missing_profiles
    assert plan["bundle"]["stacked"] and plan["bundle"]["model_version"] == result.model_version
    measured = plan["measured"]  # the run's own manifest: its rate per predictor actor
    assert measured["entries"] == result.n_rows and measured["predictors"] >= 1
    rate = measured["entries_per_second_per_predictor"]
    assert plan["projected_seconds"] == pytest.approx(result.n_rows / (rate * 4), rel=1e-2, abs=0.06)  # 0.1 s
    assert set(plan["peak_memory_mb"]) == {"driver", "context", "predictor", "writer", "baselines"}
    assert all(mb > 0 for mb in plan["peak_memory_mb"].values())
    # on the command line, into a folder with no run yet: the plan, and that no rate was measured there
    rc = main(["-q", "impute", "--config", str(data / "config.yaml"), "--model", str(bundle), "--out",
               str(tmp_path / "new"), "--plan"])
    out, err = capfd.readouterr()  # the console writes to the terminal's file descriptor
    assert rc == 0 and f"impute plan: {result.n_rows:,} entries" in out and "no measured rate yet" in out
    assert "failed" not in err, err
    assert "stacked baselines fitted on 1 gene range(s)" in out
    # with --include-observed the plan counts the measured entries too, as the run would write them
    rc = main(["-q", "impute", "--config", str(data / "config.yaml"), "--model", str(bundle), "--out",
               str(tmp_path / "new"), "--plan", "--include-observed", "--json"])
    every, _ = capfd.readouterr()
    assert rc == 0 and json.loads(every)["entries"] > result.n_rows
    # without --workers, the pool impute starts: one actor per 50,000 entries, up to impute.predictors
    assert json.loads(every)["predictors"] == min(config.impute.predictors, -(-json.loads(every)["entries"] // 50_000))
    # the stream's object-store budget: impute.blocks_in_flight blocks of the largest block's records
    from geximpute.steps.impute import imputation_problem, record_bytes
    largest = max(shard["entries"] for shard in plan["shards"])
    problem, targets, _ = imputation_problem(config)
    per_record = record_bytes(config, problem, targets, len(plan["bundle"]["baselines"]))
    assert plan["stream_budget_mb"] == round(config.impute.blocks_in_flight * largest * per_record / 2**20)
    assert f"at most {plan['stream_budget_mb']:,} MB" in out
    assert not (tmp_path / "new").exists()  # a plan writes nothing: no output, no log file beside it either
    assert not list(tmp_path.glob(".new.*")), list(tmp_path.iterdir())


def test_haplotypes_are_encoded_once_per_run_and_predict_as_the_table_does(tiny_model, ray_local, monkeypatch,
                                                                            tmp_path):
    """The run's encode tasks give each network the embeddings of every donor haplotype, in parts of consecutive
    rows; a predictor fetches only the parts its records read, and predicting with them runs no CNN and gives the
    predictions of the one-hot table path. Tasks are capped in rows (more haplotypes make more tasks) and one-hot
    encode a slice at a time, with the embeddings of one whole-table pass."""
    import ray

    from geximpute.apps.benchmark import EncoderCounter
    from geximpute.fit.bundle import load_bundle
    from geximpute.science.context import ContextIndex, build_context
    from geximpute.steps import impute as impute_module
    from geximpute.steps.impute import (
        EncodedHaplotypes,
        PartEmbeddings,
        PartEncoder,
        donor_promoter_inputs,
        donor_promoter_sequences,
        encoded_haplotypes,
        imputation_problem,
        load_bundle_from,
    )

    def every_row(encoded: EncodedHaplotypes) -> list[np.ndarray]:
        parts = ray.get(encoded.parts)
        return [np.concatenate([part[k] for part in parts]) for k in range(len(parts[0]))]

    config = tiny_model.config
    problem, targets, _ = imputation_problem(config)
    sequences, lookup = donor_promoter_sequences(problem)
    bundle = load_bundle(tiny_model.folder)
    assert bundle.reads_promoters and len(bundle.models.networks()) == config.train.folds == 2
    # an entries fold's records have every evidence group: nothing is hidden at prediction
    assert all(network.features.absent == () for network in bundle.models.networks())
    length = config.promoter.length
    encoded = encoded_haplotypes((sequences, lookup), load_bundle_from, tiny_model.folder, 3, {"num_cpus": 0.5},
                                 tmp_path / "three", length)
    assert isinstance(encoded, EncodedHaplotypes) and len(encoded.parts) == 3
    assert len(list((tmp_path / "three").glob("chunk-*.npy"))) == 3  # the sequences go through files, not refs
    assert encoded.starts[0] == 0 and encoded.starts[-1] == len(sequences)
    embeddings = every_row(encoded)
    assert len(embeddings) == 2 and all(e.shape[0] == len(sequences) for e in embeddings)
    whole = bundle.encode_promoters(donor_promoter_inputs(problem, config.promoter.length)[0])
    monkeypatch.setattr(impute_module, "ENCODE_TASK_ROWS", -(-len(sequences) // 5))
    monkeypatch.setattr(impute_module, "ENCODE_SLICE_ROWS", 7)
    capped = encoded_haplotypes((sequences, lookup), load_bundle_from, tiny_model.folder, 3, {"num_cpus": 0.5},
                                tmp_path / "capped", length)
    assert len(capped.parts) == 5  # the cap, not the 3 asked for
    for ours, theirs in zip(every_row(capped), whole, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)

    # chunks as the driver hands them over while it builds them (personal_haplotypes), 10 genes in two shares:
    # consecutive chunks make one task until it has ENCODE_TASK_ROWS rows or a share of the genes ends
    chunk = -(-len(sequences) // 6)
    monkeypatch.setattr(impute_module, "ENCODE_TASK_ROWS", 2 * chunk)
    grouped = PartEncoder(load_bundle_from, tiny_model.folder, {"num_cpus": 0.5}, tmp_path / "grouped", length,
                          n_genes=10, shares=2)
    for i, lo in enumerate(range(0, len(sequences), chunk)):
        grouped(sequences[lo : lo + chunk], next_gene=(i + 1) * 10 // 6)  # genes 1, 3, 5, 6, 8, 10
    encoded_grouped = grouped.encoded(lookup)
    # [0, 1] (rows), [2] (gene 5 ends the first share), [3, 4] (rows), [5] (the end)
    np.testing.assert_array_equal(encoded_grouped.starts, [0, 2 * chunk, 3 * chunk, 5 * chunk, len(sequences)])
    assert len(list((tmp_path / "grouped").glob("chunk-*.npy"))) == 6
    for ours, theirs in zip(every_row(encoded_grouped), whole, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)

    # the predictions of some target entries: with the one-hot table (encoded as met), and with the embeddings
    gi, si = np.nonzero(targets)
    pick = np.linspace(0, len(gi) - 1, 200).round().astype(int)
    index = ContextIndex(problem, config.context.genetic_shrinkage)
    records = build_context(index, gi[pick], si[pick], np.zeros(len(pick), bool), config.context.k_neighbours,
                            config.context.max_distance)
    grids = bundle.baseline_grids(problem, targets)
    table_path = load_bundle(tiny_model.folder).predict(records, problem.gene_ids,
                                                         donor_promoter_inputs(problem, config.promoter.length),
                                                         baselines=grids)
    empty = np.zeros((0, 4, config.promoter.length), np.uint8)
    with EncoderCounter() as counter:
        shipped = bundle.predict(records, problem.gene_ids, (empty, lookup), baselines=grids, embeddings=embeddings)
        held = PartEmbeddings(capped, keep=2)
        subset, gathered = held.inputs(records)
        parted = bundle.predict(records, problem.gene_ids, (empty, subset), baselines=grids, embeddings=gathered)
    assert counter.sequences == 0  # nothing encoded where the predictions are made
    for ours, theirs in zip(shipped, table_path, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(parted, table_path, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert len(held.held) <= 2 and held.fetched == 5  # the records read every part; two are kept
    assert len(subset.rows) == len(gathered[0]) < len(sequences)  # only the rows the records read

    # the records of one gene read one part, and a predictor holds no more than it
    first = int(np.flatnonzero(lookup.for_records(records)[0] >= 0)[0])  # a record of a gene with a window
    one = records.filter(pc.equal(records["gene_index"], records["gene_index"][first]))
    alone = PartEmbeddings(capped)
    subset, gathered = alone.inputs(one)
    assert alone.fetched == 1 and len(alone.held) == 1
    a, b = subset.for_records(one)
    rows_a, rows_b = lookup.for_records(one)
    for ours, theirs in zip(gathered, every_row(capped), strict=True):
        np.testing.assert_array_equal(ours[a], theirs[rows_a])
        np.testing.assert_array_equal(ours[b], theirs[rows_b])


def test_stacked_baselines_are_fitted_per_gene_range_in_ray_tasks(tiny_model, ray_local, tmp_path, monkeypatch):
    """The stacked head's baselines are fitted in Ray tasks, one gene range each (``baselines.block_cells``),
    never in the driver; their estimates, read back range by range in any order, are those of the in-process
    fit (the bundle's own with one range)."""
    import dataclasses

    from geximpute.fit.bundle import load_bundle
    from geximpute.fit.models import baseline_column
    from geximpute.science import baselines as baselines_module
    from geximpute.science.baselines import baseline_estimates
    from geximpute.steps.impute import baseline_columns, head_baselines, imputation_problem

    problem, targets, _ = imputation_problem(tiny_model.config)
    bundle = load_bundle(tiny_model.folder)
    stacked = head_baselines(bundle, problem)
    assert stacked is not None and {"pairwise_regression", "iterative_ridge"} <= set(stacked.names)
    gi, si = np.nonzero(targets)
    n = len(gi)
    # one range at the default size: the bundle's own estimates
    whole = baseline_columns(stacked, problem, targets, tmp_path / "whole", 0.5, 2)
    assert len(whole.files) == 1
    entries = bundle.baseline_entries(problem, targets)
    got = whole.take(np.arange(n))
    for name in bundle.baseline_names:
        np.testing.assert_allclose(got[baseline_column(name)], entries[name], rtol=1e-6, err_msg=name)
    # three ranges
    monkeypatch.setattr(baselines_module, "MIN_FIT_GENES", 4)
    cells = max(problem.n_samples, len(problem.donors) * len(problem.tissues))
    small = dataclasses.replace(stacked, settings=dataclasses.replace(
        stacked.settings, block_cells=cells * -(-problem.n_genes // 3)))
    ranged = baseline_columns(small, problem, targets, tmp_path / "ranged", 0.5, 2)
    assert len(ranged.files) == 3 and len(ranged.starts) == 4 and ranged.starts[-1] == n
    expected = baseline_estimates(problem, gi, si, small.names, small.settings, seed=small.seed,
                                  composition=small.composition)
    order = np.random.default_rng(0).permutation(n)  # positions across every range, in any order
    got = ranged.take(order)
    for name in small.names:
        np.testing.assert_allclose(got[baseline_column(name)], expected[name][order], rtol=1e-6, err_msg=name)
    # the ranges were fitted apart: a regression across genes differs from the whole problem's
    assert not np.allclose(got[baseline_column("iterative_ridge")], entries["iterative_ridge"][order])


def test_gene_family_ranges_in_ray_tasks_read_the_whole_problems_families(ray_local, tmp_path, monkeypatch):
    """Imputation's baseline tasks, one gene range each, give ``gene_family`` the whole problem's families (put
    once in the object store, sliced in each task): the estimates of the in-process fit of one range."""
    import dataclasses

    from geximpute.config import BaselinesConfig
    from geximpute.fit.models import baseline_column
    from geximpute.science import baselines as baselines_module
    from geximpute.science.baselines import baseline_estimates
    from geximpute.steps.impute import StackedBaselines, baseline_columns

    rng = np.random.default_rng(4)
    n_genes, n_samples = 40, 5
    tss = np.arange(n_genes, dtype=np.int64) * 10_000 + 1
    values = np.array([8.0, 0.5, 3.0, 5.0])[np.arange(n_genes) % 4, None] + rng.normal(size=(n_genes, n_samples))
    targets = np.zeros((n_genes, n_samples), bool)
    targets[::3] = True
    values[targets] = np.nan
    problem = VisibleProblem(
        gene_ids=np.array([f"G{i}" for i in range(n_genes)], dtype=object),
        chroms=np.array(["chr1"] * 20 + ["chr2"] * 20, dtype=object), tss=tss, start=tss, end=tss + 100,
        strand=np.ones(n_genes, np.int8), split=np.zeros(n_genes, np.int8),
        sample_ids=np.array([f"S{i}" for i in range(n_samples)], dtype=object),
        donor_index=np.zeros(n_samples, np.int32), tissue_index=np.arange(n_samples, dtype=np.int32),
        donors=["D0"], tissues=[f"T{i}" for i in range(n_samples)], values=values.astype(np.float32),
        tissue_corr=np.eye(n_samples, dtype=np.float32),
        gene_names=np.asarray([f"{'ABCD'[g % 4]}FAM{g % 7 + 1}" for g in range(n_genes)], dtype=object))
    monkeypatch.setattr(baselines_module, "MIN_FIT_GENES", 4)
    settings = BaselinesConfig(tune=False, block_cells=n_samples * 10)  # four ranges of ten genes
    stacked = StackedBaselines(("gene_family",), ("gene_family",), settings, 0, np.zeros((n_genes, 5)))
    columns = baseline_columns(stacked, problem, targets, tmp_path / "ranges", 0.5, 2)
    assert len(columns.files) == 4
    gi, si = np.nonzero(targets)
    whole = baseline_estimates(problem, gi, si, ("gene_family",), dataclasses.replace(settings, block_cells=10**9))
    got = columns.take(np.arange(len(gi)))[baseline_column("gene_family")]
    np.testing.assert_allclose(got, whole["gene_family"], rtol=1e-6)
    # the values and the targets in files (impute's), each task reading its range; the family levels the caller
    # built already (the networks' family input) are used, not built again
    from geximpute.io.matrixfile import MatrixFile

    levels = baselines_module.family_levels(problem)
    on_disk = dataclasses.replace(problem, values=MatrixFile.from_array(tmp_path / "values.f32", problem.values))
    mask = MatrixFile.from_array(tmp_path / "targets.bool", targets)
    monkeypatch.setattr(baselines_module, "family_levels", lambda p: pytest.fail("the family levels built again"))
    in_files = baseline_columns(stacked, on_disk, mask, tmp_path / "ranges-files", 0.5, 2, levels)
    np.testing.assert_array_equal(in_files.take(np.arange(len(gi)))[baseline_column("gene_family")], got)


def test_record_bytes_estimate_the_records_the_stream_carries(tiny_model):
    """The record size behind the stream's budget (and the plan's memory) is about that of real records."""
    from geximpute.science.context import ContextIndex, build_context
    from geximpute.steps.impute import imputation_problem, record_bytes

    config = tiny_model.config
    problem, targets, _ = imputation_problem(config)
    gi, si = np.nonzero(targets)
    pick = np.linspace(0, len(gi) - 1, 2000).round().astype(int)
    records = build_context(ContextIndex(problem, config.context.genetic_shrinkage), gi[pick], si[pick],
                            np.zeros(len(pick), bool), config.context.k_neighbours, config.context.max_distance)
    actual = records.nbytes / records.num_rows
    estimate = record_bytes(config, problem, targets)
    assert 0.8 <= estimate / actual <= 1.5, (estimate, actual)
    assert record_bytes(config, problem, targets, 6) == estimate + 24  # six float32 baseline columns


def test_spilled_records_wait_for_their_reader_and_read_back_whole(tmp_path):
    import threading

    import pyarrow as pa

    from geximpute.steps.prepare import read_spilled, spill_records

    records = pa.table({"gene_index": pa.array(np.arange(10, dtype=np.int32)), "target": pa.array(np.ones(10))})
    first = spill_records(records, tmp_path, "block-000000", max_spilled=2, batch_rows=4)
    spill_records(records.slice(0, 3), tmp_path, "block-000001", max_spilled=2, batch_rows=4)
    parts = list(read_spilled(first))
    assert [p.num_rows for p in parts] == [4, 4, 2]  # record batches of at most batch_rows
    assert pa.concat_tables(parts).equals(records)
    # a third block waits while two are unread, and goes once a reader deletes one
    done = threading.Event()
    writer = threading.Thread(target=lambda: (spill_records(records, tmp_path, "block-000002", 2, 4), done.set()))
    writer.start()
    assert not done.wait(0.3)
    Path(first).unlink()
    assert done.wait(5)
    writer.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block-000001.arrow", "block-000002.arrow"]


def test_a_taken_block_frees_its_place_and_survives_for_a_retry_until_the_next_block(tmp_path):
    import pyarrow as pa

    from geximpute.steps.prepare import SpilledBlocks, spill_records

    records = pa.table({"gene_index": pa.array(np.arange(6, dtype=np.int32))})
    first = spill_records(records, tmp_path, "block-000000", max_spilled=1, batch_rows=4)
    reader = SpilledBlocks()
    assert pa.concat_tables(reader.read(first)).equals(records)
    # taken: no longer counted against max_spilled, so the context stage may write the next block at once
    second = spill_records(records.slice(0, 2), tmp_path, "block-000001", max_spilled=1, batch_rows=4)
    # a retry of the first block (its reader died before the predictions left) still reads it
    assert pa.concat_tables(SpilledBlocks().read(first)).equals(records)
    # the reader's next block deletes the one before
    assert pa.concat_tables(reader.read(second)).num_rows == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block-000001.arrow.read"]


def test_gpu_predictors_ask_the_autoscaler_for_gpus_and_wait(monkeypatch):
    """An autoscaling cluster whose GPU nodes start at zero (the KubeRay and ray-up files): counting the GPUs there
    are at the start found none, so the GPU groups were never used (or a run that asked for GPUs stopped). With
    impute.gpus and impute.gpu_wait_seconds the run asks the autoscaler for them, waits, and withdraws the request."""
    import time as time_module

    import ray
    import ray.autoscaler.sdk as sdk

    from geximpute.config import config_from_dict
    from geximpute.errors import ConfigError
    from geximpute.steps.impute import gpus_to_use

    gpus = iter([0, 0, 1, 3])  # the cluster's GPUs at each look: nodes joining
    requests: list = []
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": float(next(gpus, 3))})
    monkeypatch.setattr(sdk, "request_resources", lambda bundles=None, num_cpus=None: requests.append(bundles))
    # impute's own `time` alone: patched on the module, every thread of the session spun without sleeping
    from types import SimpleNamespace

    from geximpute.steps import impute as impute_module

    monkeypatch.setattr(impute_module, "time", SimpleNamespace(sleep=lambda _s: None, monotonic=time_module.monotonic,
                                                               perf_counter=time_module.perf_counter))

    def config(**impute):
        return config_from_dict({"inputs": {"genes": "g.tsv", "expression": "e.tsv"}, "impute": impute})

    assert gpus_to_use(config(use_gpu=True, gpus=3, gpu_wait_seconds=60)) == 3
    assert requests == [[{"GPU": 1}] * 3, []]  # asked for three, then withdrawn
    # without a wait: the GPUs there are (none): a clear refusal that names the settings
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    with pytest.raises(ConfigError, match="impute.gpus and impute.gpu_wait_seconds"):
        gpus_to_use(config(use_gpu=True))
    assert gpus_to_use(config()) == 0  # not asked for, none there: CPU predictors
    # a wait that ends without any: refused, naming the wait
    with pytest.raises(ConfigError, match=r"none came in impute.gpu_wait_seconds=0.01"):
        gpus_to_use(config(use_gpu=True, gpu_wait_seconds=0.01))


def test_a_run_id_hashes_what_a_selection_selects_not_how_it_is_written():
    """The same donors listed in another order, twice, or every tissue named instead of none: the same rows, so
    the same run id (before, each spelling was a new run id and a re-run was not recognised as the same)."""
    from geximpute.steps.impute import selection_key

    names = ["a", "b", "c"]
    assert selection_key(names, ["c", "a"]) == selection_key(names, ["a", "c", "a"]) == ["a", "c"]
    assert selection_key(names, []) == selection_key(names, ["b", "c", "a"]) == []


def test_a_slow_measured_rate_projects_without_dividing_by_zero(tmp_path):
    """A run of 0.3 entries/s over 8 predictors rounds to 0.0 a predictor: the projection uses the exact rate (it
    divided by the rounded one: ZeroDivisionError); a manifest without a positive rate is no measured rate."""
    from geximpute.steps.impute import _measured_rate

    (tmp_path / "_manifest.json").write_text(json.dumps({"entries_per_second": 0.3, "n_rows": 30, "seconds": 100,
                                                         "ray": {"predictors": 8}}))
    measured = _measured_rate(tmp_path)
    assert measured["entries_per_second_per_predictor"] == 0.0 and measured["rate_per_predictor"] == 0.3 / 8
    for bad in (0, -1.0, None, "fast"):
        (tmp_path / "_manifest.json").write_text(json.dumps({"entries_per_second": bad, "ray": {"predictors": 8}}))
        assert _measured_rate(tmp_path) is None


def test_plan_workers_must_be_positive(capsys):
    from geximpute.apps.cli import main

    with pytest.raises(SystemExit):
        main(["impute", "--config", "c.yaml", "--plan", "--workers", "0"])
    assert "--workers 0: expected a number of predictor actors >= 1" in capsys.readouterr().err

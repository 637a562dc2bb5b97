"""The expression store (`geximpute ingest`, :mod:`geximpute.io.store`): read back, it is its source, value for
value and row for row; each run reading it does what it does with the source; a damaged store is refused, naming
the file."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from helpers import read_output

from geximpute.apps.cli import main
from geximpute.config import load_config
from geximpute.errors import ConfigError, InputError
from geximpute.io.checks import sha256_file
from geximpute.io.dataset import load_dataset
from geximpute.io.expression import read_expression
from geximpute.io.matrixfile import MatrixFile
from geximpute.io.store import STORE_FILE, UNANNOTATED, is_store
from geximpute.runtime.atomic import OutputRefused
from geximpute.runtime.provenance import input_fingerprints
from geximpute.science.problem import make_problem
from geximpute.steps.impute import impute
from geximpute.steps.ingest import ingest

GTF = """chr2\tt\tgene\t500\t900\t.\t+\t.\tgene_id "G4"; gene_type "protein_coding"; gene_name "DDD";
chr1\tt\tgene\t100\t400\t.\t+\t.\tgene_id "G1"; gene_type "protein_coding"; gene_name "AAA";
chr1\tt\tgene\t800\t990\t.\t-\t.\tgene_id "ENSG3"; gene_type "protein_coding"; gene_name "CCC";
"""
# rows out of the annotation's order, a versioned id, a gene the annotation lacks (G2), empty cells
GCT = """#1.2
4\t3
Name\tDescription\tS1\tS2\tS3
ENSG3.5\tCCC\t1.5\t\t7
G2\tBBB\t0\t2\t3
G1\tAAA\t4\t5\t
G4\tDDD\t10\t11\t12
"""


def _config(write, expression: str = "expression.gct", scale: str = "counts", **extra: str):
    write("genes.gtf", GTF)
    text = f"name: t\ninputs:\n  genes: genes.gtf\n  expression: {expression}\n  scale: {scale}\n"
    return load_config(write("config.yaml", text), [f"{k}={v}" for k, v in extra.items()])


@pytest.fixture
def small(write, tmp_path):
    """(config, the store ingested from its GCT)."""
    write("expression.gct", GCT)
    config = _config(write)
    return config, ingest(config, tmp_path / "store").out_dir


def _same(a, b) -> None:
    assert a.gene_ids == b.gene_ids and a.sample_ids == b.sample_ids and a.gene_names == b.gene_names
    left = a.values.read() if isinstance(a.values, MatrixFile) else a.values
    right = b.values.read() if isinstance(b.values, MatrixFile) else b.values
    assert left.dtype == right.dtype == np.float32
    assert np.array_equal(left, right, equal_nan=True)


def test_a_store_reads_as_its_source_row_for_row(small, tmp_path):
    config, store = small
    source = read_expression(config.inputs.expression, scale="counts")
    assert is_store(store)
    _same(read_expression(store, scale="counts"), source)
    in_file = read_expression(store, scale="counts", matrix=tmp_path / "m.f32")
    assert isinstance(in_file.values, MatrixFile)
    _same(in_file, source)
    assert in_file.report["format"] == "store" and in_file.report["n_measured"] == source.report["n_measured"] == 10
    # any Parquet reader: one partition per chromosome (sorted as the annotation table is), the unannotated gene apart
    table = pads.dataset(store, format="parquet", partitioning="hive").to_table().to_pandas()
    chrom = dict(zip(table["gene_id"], table["chrom"], strict=True))
    assert chrom["G1"] == chrom["ENSG3"] == "chr1" and chrom["G4"] == "chr2" and pd.isna(chrom["G2"])
    meta = json.loads((store / STORE_FILE).read_text())
    assert [p["chrom"] for p in meta["partitions"]] == ["chr1", "chr2", None]
    assert meta["partitions"][2]["path"] == f"chrom={UNANNOTATED}/part-0.parquet"
    assert meta["source"]["format"] == "gct" and meta["scale"] == "counts"
    # within a partition, the source's row order
    chr1 = pq.read_table(store / meta["partitions"][0]["path"])
    assert chr1["gene_id"].to_pylist() == ["ENSG3", "G1"] and chr1["row"].to_pylist() == [0, 2]


def test_a_long_table_ingested_reads_as_it_does(write, tmp_path):
    rows = ["G1\tS2\t5", "G4\tS1\t10", "ENSG3\tS1\t1.5", "G1\tS1\t4", "G4\tS3\t12"]
    write("long.tsv", "gene_id\tsample_id\tvalue\n" + "\n".join(rows) + "\n")
    config = _config(write, "long.tsv", scale="tpm")
    store = ingest(config, tmp_path / "store").out_dir
    _same(read_expression(store, scale="tpm"), read_expression(config.inputs.expression, scale="tpm"))


def test_the_inputs_of_a_run_from_a_store_are_the_sources(synth_small, tmp_path):
    config = load_config(synth_small / "config.yaml")
    store = ingest(config, tmp_path / "store").out_dir
    from_store = load_config(synth_small / "config.yaml", [f"inputs.expression={store}"])
    a, _ = make_problem(load_dataset(config, with_variants=False))
    b, _ = make_problem(load_dataset(from_store, with_variants=False))
    assert list(a.gene_ids) == list(b.gene_ids) and list(a.sample_ids) == list(b.sample_ids)
    assert np.array_equal(a.values, b.values, equal_nan=True)
    # a run's manifest names the store by its description, not by hashing its partitions
    fingerprint = input_fingerprints(from_store)["expression"]
    assert fingerprint["store"] is True and fingerprint["bytes"] > 0


@pytest.mark.slow  # an imputation of its own (8 s); the default suite checks the run's inputs above
def test_impute_from_a_store_writes_the_same_predictions(tiny_model, tiny_imputation, tmp_path):
    config, first = tiny_imputation
    store = ingest(config, tmp_path / "store").out_dir
    again = load_config(tiny_model.data / "config.yaml",
                        [f"output_dir={tmp_path}", f"inputs.expression={store}"])
    second = impute(again, model=tiny_model.folder, out_dir=tmp_path / "predictions")
    keys = ["donor_id", "tissue", "gene_id"]
    columns = keys + ["predicted", "predicted_lower", "predicted_upper", "observed"]
    a = read_output(first.out_dir)[columns].astype({"tissue": str}).sort_values(keys).reset_index(drop=True)
    b = read_output(second.out_dir)[columns].astype({"tissue": str}).sort_values(keys).reset_index(drop=True)
    assert len(a) == len(b) > 0
    pd.testing.assert_frame_equal(a, b)


def _edit(store, fn) -> None:
    path = store / STORE_FILE
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def test_a_damaged_store_is_refused_naming_the_file(small, tmp_path):
    config, committed = small
    store = tmp_path / "copy"
    shutil.copytree(committed, store)  # the committed version is read-only to others; edit a copy
    with pytest.raises(InputError, match=r"_store\.json: the store holds values on the 'counts' scale"):
        read_expression(store, scale="tpm")
    part = store / "chrom=chr1" / "part-0.parquet"
    moved = tmp_path / "moved.parquet"
    part.rename(moved)
    with pytest.raises(InputError, match=r"chrom=chr1/part-0\.parquet: expression store partition missing"):
        read_expression(store, scale="counts")
    moved.rename(part)
    with open(part, "ab") as fh:  # written to since it was ingested
        fh.write(b"x")
    with pytest.raises(InputError, match=r"part-0\.parquet: expression store partition of \d+ bytes"):
        read_expression(store, scale="counts")
    # values of another width, its size recorded as if it had been ingested so
    table = pq.read_table(store / "chrom=chr2" / "part-0.parquet")
    narrow = table.set_column(3, "values", pa.FixedSizeListArray.from_arrays(pa.array([1.0, 2.0], pa.float32()), 2))
    other = store / "chrom=chr2" / "part-0.parquet"
    pq.write_table(narrow, other)
    shutil.copyfile(committed / "chrom=chr1" / "part-0.parquet", part)

    def sizes(meta):  # the description of the files as they are now (as if they had been ingested so)
        for p in meta["partitions"]:
            p["bytes"] = (store / p["path"]).stat().st_size
            p["sha256"] = sha256_file(store / p["path"])

    _edit(store, sizes)
    with pytest.raises(InputError, match=r"chrom=chr2/part-0\.parquet: expression store partition of schema"):
        read_expression(store, scale="counts")
    shutil.copyfile(committed / "chrom=chr2" / "part-0.parquet", other)
    _edit(store, sizes)
    read_expression(store, scale="counts")  # whole again
    _edit(store, lambda meta: meta["partitions"].append(meta["partitions"][1]))
    with pytest.raises(InputError, match=r"chrom=chr2/part-0\.parquet: row 3 named twice; at gene G4"):
        read_expression(store, scale="counts")
    _edit(store, lambda meta: meta["partitions"].pop() and meta["partitions"].pop(1))
    with pytest.raises(InputError, match=r"_store\.json: 1 of 4 rows in no partition; at row 3"):
        read_expression(store, scale="counts")
    shutil.copyfile(committed / STORE_FILE, store / STORE_FILE)  # the description as ingested
    # changed in place, its size kept (a byte of its data edited)
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"chrom=chr1/part-0\.parquet: expression store partition changed since it "
                       r"was written: its SHA-256"):
        read_expression(store, scale="counts")
    shutil.copyfile(committed / "chrom=chr1" / "part-0.parquet", part)
    read_expression(store, scale="counts")
    # a damaged description names itself and the partition
    for damage, said in ((lambda p: p.pop("bytes"), "lacks bytes"),
                         (lambda p: p.update(bytes="12"), "bytes '12' is not a count"),
                         (lambda p: p.update(path="/etc/passwd"), "path '/etc/passwd' is not a file inside"),
                         (lambda p: p.update(path="../x/part-0.parquet"), "path '../x/part-0.parquet' is not a file"),
                         (lambda p: p.update(sha256="abc"), "sha256 'abc' is not a SHA-256 digest")):
        _edit(store, lambda meta, damage=damage: damage(meta["partitions"][1]))
        with pytest.raises(InputError, match=rf"_store\.json: expression store description: {said}.*; at partition 2"):
            read_expression(store, scale="counts")
        shutil.copyfile(committed / STORE_FILE, store / STORE_FILE)
    # counts and ids of the description: a TypeError or numpy's "negative dimensions" before, and "s1" read as the
    # sample ids "s" and "1"
    for damage, said in ((lambda m: m.update(n_genes=None), "n_genes None is not a count"),
                         (lambda m: m.update(n_genes=-1), "n_genes -1 is not a count"),
                         (lambda m: m.update(n_samples="3x"), "n_samples '3x' is not a count"),
                         (lambda m: m.update(sample_ids="S12", n_samples=3), "sample_ids is not a list of names")):
        _edit(store, damage)
        with pytest.raises(InputError, match=rf"_store\.json: expression store description: {said}"):
            read_expression(store, scale="counts")
        shutil.copyfile(committed / STORE_FILE, store / STORE_FILE)
    _edit(store, lambda meta: meta.update(version=99))
    with pytest.raises(InputError, match="expression store version 99"):
        read_expression(store, scale="counts")
    with pytest.raises(InputError, match="not a folder; an expression store is the folder"):
        read_expression(config.inputs.expression, "store", scale="counts")
    (store / STORE_FILE).unlink()
    with pytest.raises(InputError, match=r"is a folder: not a regular file, nor an expression store \(no _store"):
        read_expression(store, scale="counts")


def test_a_store_ingested_again_while_it_is_read_is_read_as_one_version(small, write, tmp_path, monkeypatch):
    """The reader followed the link at every file: an `ingest` committing between two partitions gave a matrix of
    chromosome 1 from one version and chromosome 2 from the other, without an error."""
    from geximpute.io import store as module

    config, store = small
    before = read_expression(store, scale="counts")
    write("expression.gct", GCT.replace("\t10\t11\t12", "\t20\t21\t22"))  # G4, on chr2: other values
    reading = module._read_partition
    committed = []

    def read_then_reingest(path, part, *args):
        out = reading(path, part, *args)
        if not committed:  # after the first partition, a new version is committed onto the same link
            committed.append(ingest(config, store, force=True).out_dir)
        return out

    first = os.path.realpath(store)
    monkeypatch.setattr(module, "_read_partition", read_then_reingest)
    during = read_expression(store, scale="counts")
    _same(during, before)
    monkeypatch.setattr(module, "_read_partition", reading)
    after = read_expression(store, scale="counts")
    assert after.values[after.gene_ids.index("G4")].tolist() == [20, 21, 22]
    assert module.fingerprint(store)["version"] == os.path.realpath(store) != first
    # the run's manifest and run id name the version it read, not the one the link names by the time they are
    # written (they named the new one: another run reading it would have had the same run id)
    from geximpute.runtime.provenance import read_versions

    assert during.report["store"]["version"] == first
    read = read_versions(SimpleNamespace(expression=during))
    read_print = module.fingerprint(store, read["expression"])
    assert read_print["version"] == first and read_print["sha256"] != module.fingerprint(store)["sha256"]
    assert read_print["path"] == str(store)
    from_store = dataclasses.replace(config, inputs=dataclasses.replace(config.inputs, expression=str(store)))
    assert input_fingerprints(from_store, read)["expression"] == read_print
    # taken as the run reads, they are what its manifest says at the end, even once the version is pruned (read
    # again at the end, a long run's commit failed after all the work)
    from geximpute.runtime.provenance import manifest

    taken = input_fingerprints(from_store, read)
    shutil.rmtree(first)
    assert manifest(from_store, inputs=taken, step="impute")["inputs"]["expression"] == read_print


def test_ingest_writes_only_where_it_may(small, write, tmp_path, monkeypatch):
    from geximpute.steps import ingest as module

    config, store = small
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.csv").write_text("keep me\n")
    reading = module.read_expression
    monkeypatch.setattr(module, "read_expression", lambda *a, **k: pytest.fail("read before the refusal"))
    with pytest.raises(OutputRefused):  # before the source is read (it was refused only at the commit)
        ingest(config, theirs)
    monkeypatch.setattr(module, "read_expression", reading)
    assert (theirs / "results.csv").read_text() == "keep me\n"
    assert ingest(config, store).n_genes == 4  # its own earlier store is replaced
    with pytest.raises(ConfigError, match="is an expression store already"):
        ingest(load_config(write("again.yaml", f"name: t\ninputs:\n  genes: genes.gtf\n  expression: {store}\n"
                                               "  scale: counts\n")), tmp_path / "other")


def test_ingest_on_the_command_line(write, tmp_path, capsys):
    write("expression.gct", GCT)
    _config(write)
    out = tmp_path / "cli-store"
    assert main(["ingest", "--config", str(tmp_path / "config.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 genes x 3 samples in 3 chromosome partitions" in printed
    assert f"set inputs.expression: {out}" in printed
    assert main(["inspect", "--config", str(tmp_path / "config.yaml"), "--set", f"inputs.expression={out}"]) == 0
    # a missing input is named as every run names it, before anything is read (it was a bare FileNotFoundError)
    for key, what in (("inputs.expression=missing.gct", "expression file not found"),
                      ("inputs.genes=missing.gtf", "gene annotation not found")):
        capsys.readouterr()
        assert main(["ingest", "--config", str(tmp_path / "config.yaml"), "--set", key, "--out",
                     str(tmp_path / "none")]) == 2
        err = capsys.readouterr().err
        assert what in err and "missing." in err and "FileNotFoundError" not in err, err


def test_a_store_whose_source_changed_says_so(small, caplog):
    """The store serves what was ingested; a run whose store's source file changed since is told to ingest again."""
    import logging
    import os

    config, store = small
    with caplog.at_level(logging.WARNING, logger="geximpute.io.expression"):
        read_expression(store, scale="counts")
    assert not caplog.records
    source = config.inputs.expression
    os.utime(source, ns=(1, 1))  # the source touched after its ingest
    with caplog.at_level(logging.WARNING, logger="geximpute.io.expression"):
        again = read_expression(store, scale="counts")
    assert again.gene_ids == ["ENSG3", "G2", "G1", "G4"]
    assert any("changed since it was ingested" in r.getMessage() and "geximpute ingest" in r.getMessage()
               for r in caplog.records)


def test_ingest_refuses_a_source_that_changes_while_it_is_read(small, tmp_path, monkeypatch):
    """A source rewritten while ingest reads it (a delivery still being copied) leaves nothing: not a store of
    values of neither version under the new file's fingerprint."""
    from geximpute.steps import ingest as ingest_step

    config, _ = small
    source = config.inputs.expression

    def read_then_grow(*args, **kwargs):
        expr = read_expression(*args, **kwargs)
        with open(source, "a") as fh:  # the writer appends a gene meanwhile
            fh.write("G5\tEEE\t1\t2\t3\n")
        return expr

    monkeypatch.setattr(ingest_step, "read_expression", read_then_grow)
    out = tmp_path / "late"
    with pytest.raises(InputError, match=r"expression\.gct: the file changed while it was being ingested; nothing "
                       "was written"):
        ingest(config, out)
    assert not out.exists() and not list(tmp_path.glob(".late*"))


def test_genes_of_another_type_are_in_their_chromosome_s_partition(write, tmp_path):
    """`inputs.gene_types` chooses among the genes when a run reads them; ingest files every gene of the annotation
    under its chromosome (a lncRNA is not 'unannotated'), and a run with the filter reads what it reads from the
    source."""
    write("expression.gct", GCT)
    config = _config(write, **{"inputs.gene_types": "[protein_coding]"})
    write("genes.gtf", GTF + 'chr2\tt\tgene\t950\t990\t.\t+\t.\tgene_id "G2"; gene_type "lncRNA"; gene_name "BBB";\n')
    done = ingest(config, tmp_path / "typed")
    assert done.unannotated == 0 and done.partitions == 2
    chr2 = pq.read_table(done.out_dir / "chrom=chr2" / "part-0.parquet")
    assert sorted(chr2["gene_id"].to_pylist()) == ["G2", "G4"]
    assert not (done.out_dir / f"chrom={UNANNOTATED}").exists()
    from_store = load_dataset(load_config(tmp_path / "config.yaml", ["inputs.gene_types=[protein_coding]",
                                                                     f"inputs.expression={done.out_dir}"]),
                              with_variants=False)
    from_source = load_dataset(config, with_variants=False)
    assert from_store.expression.gene_ids == from_source.expression.gene_ids

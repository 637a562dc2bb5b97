"""Nightly imputation of an inbox of new genomes on a real local Ray with a tiny real bundle (trained once per
module): each donor once, a partition per run date, the ledger, quarantine of malformed inputs, the lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pytest
from test_impute import TISSUE_NAMES, assert_keys_unique, build_bundle, gtex_named_copy

from engine.config import load_config
from engine.steps.nightly import LockBusy, RunLock, ledger_path, lock_path, nightly, output_root, scan_inbox


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


def donor_expression(data: Path, donor: str, tissues: list[str], out: Path) -> tuple[Path, int]:
    """``donor``'s measured tissues as a wide genes x tissues TSV (measured genes only); returns the file and the
    number of (gene, tissue) entries it leaves unmeasured."""
    expr = pd.read_csv(data / "expression.gct", sep="\t", skiprows=2).set_index("Name").drop(columns="Description")
    samples = pd.read_csv(data / "samples.tsv", sep="\t")
    mine = samples[(samples["donor_id"] == donor) & samples["tissue"].isin(tissues)]
    assert len(mine) == len(tissues), f"{donor} lacks one of {tissues}"
    table = expr[mine["sample_id"].tolist()].set_axis(mine["tissue"].tolist(), axis=1)
    table = table.dropna(how="all")
    table.index.name = "gene_id"
    table.to_csv(out, sep="\t", na_rep="")
    return out, int(table.isna().to_numpy().sum()) + (len(expr) - len(table)) * len(tissues)


@pytest.fixture(scope="module")
def data(synth_small, tmp_path_factory) -> Path:
    return gtex_named_copy(synth_small, tmp_path_factory.mktemp("nightly-data")).parent


@pytest.fixture(scope="module")
def bundle(ray_local, data, tmp_path_factory) -> Path:
    return build_bundle(data / "config.yaml", tmp_path_factory.mktemp("nightly-model"))


def n_genes(data: Path) -> int:
    return len(pd.read_csv(data / "expression.gct", sep="\t", skiprows=2))


def make_config(data: Path, bundle: Path, work: Path, *extra: str):
    return load_config(data / "config.yaml", [f"output_dir={work}", f"nightly.inbox={work / 'inbox'}",
                                              f"impute.model_dir={bundle}", *extra])


def read_all(root: Path) -> pd.DataFrame:
    frame = pads.dataset(root, format="parquet", partitioning="hive").to_table().to_pandas()
    frame["tissue"] = frame["tissue"].astype(str)
    frame["run_date"] = frame["run_date"].astype(str)
    return frame


def test_lock_is_exclusive_and_a_dead_holder_is_stale(tmp_path):
    path = tmp_path / "out.lock"
    with RunLock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(LockBusy, match="another nightly run holds the lock"):
            RunLock(path).__enter__()
    assert not path.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "started": "then"}))
    with RunLock(path):  # the holder is gone: the lock is broken and taken
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_inbox_pairs_genomes_with_their_expression(tmp_path):
    for name in ("A.vcf.gz", "A.expression.tsv", "B.bcf", "C.expression.tsv", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "quarantine").mkdir()
    items = {i.donor: i for i in scan_inbox(tmp_path)}
    assert sorted(items) == ["A", "B"]
    assert items["A"].expression.name == "A.expression.tsv" and items["B"].expression is None


def test_nightly_imputes_each_new_donor_once_and_quarantines_bad_inputs(data, bundle, tmp_path):
    config = make_config(data, bundle, tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    vcf = data / "variants.vcf"
    tissues = sorted(TISSUE_NAMES.values())
    donor_vcf(vcf, "SYN-D0001", "NEW-001", inbox / "NEW-001.vcf")
    donor_vcf(vcf, "SYN-D0003", "NEW-002", inbox / "NEW-002.vcf")
    # NEW-002 brings two measured tissues (those of SYN-D0003): they are context, not predicted
    samples = pd.read_csv(data / "samples.tsv", sep="\t")
    measured = sorted(samples.loc[samples["donor_id"] == "SYN-D0003", "tissue"])[:2]
    _, unmeasured = donor_expression(data, "SYN-D0003", measured, inbox / "NEW-002.expression.tsv")
    # malformed: not a VCF at all; a VCF whose sample is someone else; an expression file with an unknown tissue
    (inbox / "NEW-JUNK.vcf.gz").write_text("this is not a VCF\n")
    donor_vcf(vcf, "SYN-D0004", "SOMEONE-ELSE", inbox / "NEW-BAD.vcf")
    donor_vcf(vcf, "SYN-D0005", "NEW-TIS", inbox / "NEW-TIS.vcf")
    (inbox / "NEW-TIS.expression.tsv").write_text("gene_id\tNo Such Tissue\nSYNG00000001\t3.0\n")

    result = nightly(config, run_date="2026-01-01")
    genes = n_genes(data)
    assert sorted(result.done) == ["NEW-001", "NEW-002"]
    assert sorted(result.quarantined) == ["NEW-BAD.vcf", "NEW-JUNK.vcf.gz", "NEW-TIS.vcf"]
    quarantine = inbox / "quarantine"
    for name in ("NEW-BAD.vcf", "NEW-JUNK.vcf.gz", "NEW-TIS.vcf", "NEW-TIS.expression.tsv"):
        assert (quarantine / name).is_file() and not (inbox / name).exists()
        assert (quarantine / f"{name}.error.txt").read_text().strip()
    assert "No Such Tissue" in (quarantine / "NEW-TIS.vcf.error.txt").read_text()
    assert "SOMEONE-ELSE" in (quarantine / "NEW-BAD.vcf.error.txt").read_text() or \
        "NEW-BAD" in (quarantine / "NEW-BAD.vcf.error.txt").read_text()

    root = output_root(config)
    frame = read_all(root)
    counts = frame.groupby("donor_id").size().to_dict()
    assert counts == {"NEW-001": genes * len(tissues), "NEW-002": genes * (len(tissues) - 2) + unmeasured}
    assert result.rows == len(frame)
    assert_keys_unique(frame)
    assert set(frame["run_date"]) == {"2026-01-01"}
    assert frame["sample_id"].isna().sum() == len(frame) - unmeasured
    ledger = json.loads(ledger_path(config).read_text())["donors"]
    assert sorted(ledger) == ["NEW-001", "NEW-002"] and ledger["NEW-001"]["rows"] == counts["NEW-001"]
    assert not lock_path(config).exists()
    manifest = json.loads((root / "run_date=2026-01-01" / "_manifest.json").read_text())
    assert sorted(manifest["donors"]) == ["NEW-001", "NEW-002"] and sum(manifest["rows"].values()) == len(frame)

    # twice in a row: nothing the second time (no rows, no new partition, the ledger untouched)
    files = sorted(p.relative_to(root) for p in root.rglob("*"))
    stamp = ledger_path(config).stat().st_mtime_ns
    again = nightly(config, run_date="2026-01-02")
    assert again.done == [] and again.rows == 0 and sorted(again.already_done) == ["NEW-001", "NEW-002"]
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == files
    assert ledger_path(config).stat().st_mtime_ns == stamp

    # a genome arriving later goes into that day's partition, alone
    donor_vcf(vcf, "SYN-D0006", "NEW-003", inbox / "NEW-003.vcf")
    later = nightly(config, run_date="2026-01-03")
    assert later.done == ["NEW-003"]
    frame = read_all(root)
    assert_keys_unique(frame)
    assert frame.groupby("run_date")["donor_id"].unique().map(sorted).to_dict() == {
        "2026-01-01": ["NEW-001", "NEW-002"], "2026-01-03": ["NEW-003"]}
    assert len(frame) == sum(counts.values()) + genes * len(tissues)


def test_a_held_lock_stops_a_second_run(data, bundle, tmp_path):
    config = make_config(data, bundle, tmp_path)
    (tmp_path / "inbox").mkdir()
    lock = lock_path(config)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "started": "now"}))
    with pytest.raises(LockBusy, match=str(lock)):
        nightly(config, run_date="2026-01-01")
    assert lock.exists()  # someone else's lock is left alone
    lock.unlink()

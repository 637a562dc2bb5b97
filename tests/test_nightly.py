"""Nightly imputation of an inbox of new genomes on a real local Ray with the session's tiny real bundle: each
donor once, a partition per run date, the ledger, quarantine of malformed inputs, the lock."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import TISSUE_NAMES, assert_keys_unique, donor_vcf, nightly_config, read_nightly

import geximpute.steps.nightly as nightly_step
from geximpute.runtime.atomic import Lease
from geximpute.steps.nightly import LockBusy, ledger_path, lock_path, nightly, output_root, scan_inbox


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
def data(tiny_data) -> Path:
    return tiny_data


@pytest.fixture(scope="module")
def bundle(tiny_model) -> Path:
    return tiny_model.folder


def n_genes(data: Path) -> int:
    return len(pd.read_csv(data / "expression.gct", sep="\t", skiprows=2))


def test_lock_is_an_exclusive_lease_and_an_expired_one_of_another_pod_is_taken_over(tmp_path):
    path = tmp_path / "out.lock"
    with Lease(path, what="nightly run"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(LockBusy, match="another nightly run holds the lease"):
            Lease(path, what="nightly run").acquire()
    assert not path.exists()
    # the run of last night's head pod was killed: its lease names another host and has expired
    path.write_text(json.dumps({"owner": "head-pod-1-1-aa", "host": "head-pod-1", "pid": os.getpid(),
                                "expires": time.time() - 5}))
    with Lease(path, what="nightly run"):  # taken over without comparing hosts or pids
        assert json.loads(path.read_text())["host"] != "head-pod-1"
    assert not path.exists()


def test_inbox_pairs_genomes_with_their_expression(tmp_path):
    for name in ("A.vcf.gz", "A.expression.tsv", "B.bcf", "C.expression.tsv", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "quarantine").mkdir()
    items = {i.donor: i for i in scan_inbox(tmp_path)}
    assert sorted(items) == ["A", "B"]
    assert items["A"].expression.name == "A.expression.tsv" and items["B"].expression is None


def test_nightly_imputes_each_new_donor_once_and_quarantines_bad_inputs(data, bundle, tmp_path):
    config = nightly_config(data, bundle, tmp_path)
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
    # the reason, not only the file's name (which every note starts with)
    assert "requested donors are not in the VCF" in (quarantine / "NEW-BAD.vcf.error.txt").read_text()

    root = output_root(config)
    frame = read_nightly(root)
    counts = frame.groupby("donor_id").size().to_dict()
    assert counts == {"NEW-001": genes * len(tissues), "NEW-002": genes * (len(tissues) - 2) + unmeasured}
    assert result.rows == len(frame)
    assert_keys_unique(frame)
    assert set(frame["run_date"]) == {"2026-01-01"}
    assert frame["sample_id"].isna().sum() == len(frame) - unmeasured
    ledger = json.loads(ledger_path(config).read_text())["donors"]
    assert sorted(ledger) == ["NEW-001", "NEW-002"] and ledger["NEW-001"]["rows"] == counts["NEW-001"]
    assert not lock_path(config).exists()
    assert not list(root.parent.glob(f".{root.name}.matrix-*"))  # the run's matrix on disk: gone with the run
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
    # (its date from the config, as `--set nightly.run_date=...` gives a job on a cluster, where no flag reaches)
    later = nightly(dataclasses.replace(config, nightly=dataclasses.replace(config.nightly, run_date="2026-01-03")))
    assert later.done == ["NEW-003"] and later.run_date == "2026-01-03"
    frame = read_nightly(root)
    assert_keys_unique(frame)
    assert frame.groupby("run_date")["donor_id"].unique().map(sorted).to_dict() == {
        "2026-01-01": ["NEW-001", "NEW-002"], "2026-01-03": ["NEW-003"]}
    assert len(frame) == sum(counts.values()) + genes * len(tissues)


def test_a_held_lock_stops_a_second_run(data, bundle, tmp_path):
    config = nightly_config(data, bundle, tmp_path)
    (tmp_path / "inbox").mkdir()
    lock = lock_path(config)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"owner": "head-pod-2-7-bb", "host": "head-pod-2", "pid": 7,
                                "expires": time.time() + 600}))
    with pytest.raises(LockBusy, match=f"{lock}: another nightly run holds the lease: head-pod-2-7-bb"):
        nightly(config, run_date="2026-01-01")
    assert lock.exists()  # someone else's lock is left alone
    lock.unlink()


def test_duplicates_redelivered_genomes_and_any_error_are_one_donor_s_business(data, bundle, tmp_path, monkeypatch,
                                                                             caplog):
    import geximpute.steps.nightly as nightly_module

    config = nightly_config(data, bundle, tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    vcf = data / "variants.vcf"
    genes, tissues = n_genes(data), len(TISSUE_NAMES)
    donor_vcf(vcf, "SYN-D0001", "NEW-A", inbox / "NEW-A.vcf")
    donor_vcf(vcf, "SYN-D0002", "DUP", inbox / "DUP.vcf")
    donor_vcf(vcf, "SYN-D0002", "DUP", inbox / "DUP.vcf.gz")  # the same donor under two extensions
    donor_vcf(vcf, "SYN-D0003", "ODD", inbox / "ODD.vcf")
    donor_vcf(vcf, "SYN-D0005", "TWO", inbox / "TWO.vcf")  # with two expression files: which one is meant?
    (inbox / "TWO.expression.tsv").write_text("gene_id\n")
    (inbox / "TWO.expression.csv").write_text("gene_id\n")
    real_read = nightly_module.read_variants

    def read_variants(path, *args, **kwargs):  # an error no reader anticipated, for one donor only
        if Path(path).name == "ODD.vcf":
            raise KeyError("an unexpected failure")
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(nightly_module, "read_variants", read_variants)
    first = nightly(config, run_date="2026-02-01")
    assert first.done == ["NEW-A"]
    assert sorted(first.quarantined) == ["DUP.vcf", "ODD.vcf", "TWO.vcf"]
    quarantine = inbox / "quarantine"
    assert (quarantine / "DUP.vcf").is_file() and (quarantine / "DUP.vcf.gz").is_file()
    assert "2 genome files claim donor 'DUP' (DUP.vcf, DUP.vcf.gz)" in (quarantine / "DUP.vcf.error.txt").read_text()
    assert "KeyError" in (quarantine / "ODD.vcf.error.txt").read_text()
    assert "2 expression files claim donor 'TWO' (TWO.expression.csv, TWO.expression.tsv)" in (
        quarantine / "TWO.vcf.error.txt").read_text()
    assert not list(inbox.glob("TWO*")) and (quarantine / "TWO.expression.tsv").is_file()
    assert oct((quarantine / "ODD.vcf").stat().st_mode & 0o777) == oct(0o640)

    # NEW-A's genome is delivered again, changed: not re-imputed the same day, then into the next run date
    donor_vcf(vcf, "SYN-D0004", "NEW-A", inbox / "NEW-A.vcf")
    same_day = nightly(config, run_date="2026-02-01")
    assert same_day.done == [] and same_day.deferred == ["NEW-A"]
    later = nightly(config, run_date="2026-02-02")
    assert later.done == ["NEW-A"] and later.reimputed == ["NEW-A"]
    frame = read_nightly(output_root(config))
    per_day = frame.groupby("run_date").size().to_dict()
    assert per_day == {"2026-02-01": genes * tissues, "2026-02-02": genes * tissues}
    for _, day in frame.groupby("run_date"):
        assert_keys_unique(day)
    ledger = json.loads(ledger_path(config).read_text())["donors"]
    assert ledger["NEW-A"]["run_date"] == "2026-02-02"
    # measured tissues delivered after the genome was imputed: the donor imputed again with them, said so, once
    samples = pd.read_csv(data / "samples.tsv", sep="\t")
    measured = sorted(samples.loc[samples["donor_id"] == "SYN-D0004", "tissue"])[:1]
    donor_expression(data, "SYN-D0004", measured, inbox / "NEW-A.expression.tsv")
    with caplog.at_level(logging.WARNING, logger="geximpute.steps.nightly"):
        late = nightly(config, run_date="2026-02-03")
    assert late.done == ["NEW-A"] and late.reimputed == ["NEW-A"]
    assert any("NEW-A.expression.tsv new since donor NEW-A was imputed on 2026-02-02" in r.getMessage()
               for r in caplog.records)
    ledger = json.loads(ledger_path(config).read_text())["donors"]
    assert ledger["NEW-A"]["run_date"] == "2026-02-03" and ledger["NEW-A"]["expression_sha256"]
    assert ledger["NEW-A"]["rows"] < genes * tissues  # its measured tissue is context now, not predicted
    assert nightly(config, run_date="2026-02-04").done == []  # the checksum is recorded: once only

    # a partition manifest torn by a volume that lost it: its donors are read from its rows, and the night goes on
    from geximpute.runtime.atomic import resolve
    from geximpute.runtime.partitions import committed_donors

    (resolve(output_root(config) / "run_date=2026-02-03") / "_manifest.json").write_text("")
    found = committed_donors(output_root(config))
    assert found["NEW-A"]["run_date"] == "2026-02-03" and found["NEW-A"]["rows"] == ledger["NEW-A"]["rows"]
    assert nightly(config, run_date="2026-02-05").done == []


def test_quarantine_writes_the_note_first_moves_indexes_and_never_touches_a_link_s_target(tmp_path, monkeypatch):
    """A quarantined donor's files (its genome's index too: a corrected genome put back must not be read through
    the old index) move with a note each, written before the file moves; a delivered symbolic link moves as a link
    (the archive file it points at keeps its mode); a file that cannot be moved stays in the inbox, without a note,
    and the call says so instead of stopping the night."""

    from geximpute.steps.nightly import InboxItem, quarantine

    inbox, folder, archive = tmp_path / "inbox", tmp_path / "inbox" / "quarantine", tmp_path / "archive"
    inbox.mkdir()
    archive.mkdir()
    original = archive / "A.vcf.gz"
    original.write_text("genome")
    original.chmod(0o644)
    (inbox / "A.vcf.gz").symlink_to(original)
    (inbox / "A.vcf.gz.tbi").write_text("index")
    (inbox / "A.expression.tsv").write_text("gene_id\n")
    item = scan_inbox(inbox)[0]
    assert [p.name for p in item.files] == ["A.vcf.gz", "A.vcf.gz.tbi", "A.expression.tsv"]
    seen_notes = []
    real_move = nightly_step._move_whole

    def move(src, dst):  # the note is there before its file moves
        seen_notes.append(Path(str(dst) + ".error.txt").is_file())
        return real_move(src, dst)

    monkeypatch.setattr(nightly_step, "_move_whole", move)
    assert quarantine(item, ValueError("bad genome"), folder)
    assert seen_notes == [True, True, True] and not list(inbox.glob("A*"))
    assert (folder / "A.vcf.gz").is_symlink() and (original.stat().st_mode & 0o777) == 0o644
    assert (folder / "A.vcf.gz.tbi").is_file() and "bad genome" in (folder / "A.vcf.gz.error.txt").read_text()

    (inbox / "B.vcf").write_text("genome")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", src)

    monkeypatch.setattr(nightly_step, "_move_whole", refuse)
    assert not quarantine(InboxItem("B", inbox / "B.vcf"), ValueError("bad"), folder)
    assert (inbox / "B.vcf").is_file() and not (folder / "B.vcf.error.txt").exists()


def test_quarantine_keeps_a_donor_together_and_never_names_part_of_a_file(tmp_path, monkeypatch):
    """A genome that cannot be moved keeps its index and expression file in the inbox with it (before, they were
    quarantined without it: the genome delivered again was imputed without the donor's measured tissues); across
    file systems a file is copied under a temporary name and renamed into place, so a full disk (or a kill) never
    leaves the genome's own name on part of it in the quarantine."""
    import errno

    from geximpute.steps.nightly import InboxItem, quarantine

    inbox, folder = tmp_path / "inbox", tmp_path / "inbox" / "quarantine"
    inbox.mkdir()
    (inbox / "C.vcf").write_text("genome")
    (inbox / "C.expression.tsv").write_text("gene_id\n")
    item = InboxItem("C", inbox / "C.vcf", expression=inbox / "C.expression.tsv")
    real_move = nightly_step._move_whole

    def genome_stuck(src, dst):
        if Path(src).name == "C.vcf":
            raise PermissionError(13, "Permission denied", str(src))
        return real_move(src, dst)

    monkeypatch.setattr(nightly_step, "_move_whole", genome_stuck)
    assert not quarantine(item, ValueError("bad"), folder)
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == ["C.expression.tsv", "C.vcf"]
    assert not list(folder.iterdir())
    # a duplicate genome that cannot move: the same (the first genome moved; the rest wait with the duplicate)
    (inbox / "C.vcf.gz").write_text("genome again")

    def duplicate_stuck(src, dst):
        if Path(src).name == "C.vcf.gz":
            raise PermissionError(13, "Permission denied", str(src))
        return real_move(src, dst)

    monkeypatch.setattr(nightly_step, "_move_whole", duplicate_stuck)
    item = InboxItem("C", inbox / "C.vcf", expression=inbox / "C.expression.tsv", duplicates=[inbox / "C.vcf.gz"])
    assert not quarantine(item, ValueError("two genomes"), folder)
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == ["C.expression.tsv", "C.vcf.gz"]
    for name in list(folder.iterdir()):
        name.unlink()
    monkeypatch.undo()

    # another file system: rename fails with EXDEV; the copy fills the disk part-way
    (inbox / "D.vcf.gz").write_bytes(b"x" * 100_000)
    real_rename, real_copy = os.rename, shutil.copy2

    def rename(src, dst):
        if Path(dst).parent == folder and not Path(src).name.startswith("."):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst)

    def copy_part(src, dst, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:30_000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "copy2", copy_part)
    assert not quarantine(InboxItem("D", inbox / "D.vcf.gz"), ValueError("bad"), folder)
    assert (inbox / "D.vcf.gz").stat().st_size == 100_000 and not list(folder.iterdir())
    monkeypatch.setattr(shutil, "copy2", real_copy)
    assert quarantine(InboxItem("D", inbox / "D.vcf.gz"), ValueError("bad"), folder)
    assert not (inbox / "D.vcf.gz").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["D.vcf.gz", "D.vcf.gz.error.txt"]
    assert (folder / "D.vcf.gz").stat().st_size == 100_000


def test_a_damaged_ledger_and_a_back_filled_date_are_handled(tmp_path):
    """A ledger that is JSON but not one of donors is refused naming it (not an AttributeError); a genome
    re-delivered after being imputed on a later run date than this run's waits for a later run date (re-imputed
    into an earlier partition, its old rows would stay the latest a reader sees)."""
    from geximpute.errors import GeximputeError
    from geximpute.steps.nightly import InboxItem, _redelivered, read_ledger

    ledger = tmp_path / "ledger.json"
    for bad in ("[]", "null", '{"donors": []}', '{"donors": {"X": 3}}'):
        ledger.write_text(bad)
        with pytest.raises(GeximputeError, match=r"ledger\.json: the nightly ledger is not an object of donors"):
            read_ledger(ledger)
    vcf = tmp_path / "X.vcf"
    vcf.write_text("new genome")
    done = {"X": {"run_date": "2024-01-05", "run_id": "r", "rows": 1, "vcf_sha256": "0" * 64}}
    for day, again, deferred in (("2024-01-03", [], ["X"]), ("2024-01-05", [], ["X"]), ("2024-01-06", ["X"], [])):
        items, later, waiting = _redelivered([InboxItem("X", vcf)], done, day, "reimpute")
        assert [i.donor for i in items] == again and later == deferred and waiting == [], day


def test_a_done_donors_files_that_vanish_or_gain_an_expression_file(tmp_path, caplog):
    """A done donor's genome removed after the inbox was listed leaves it for the next run (it stopped the whole
    night with a FileNotFoundError); an expression file that comes after the genome, or changes, re-imputes the
    donor as a changed genome does (it was reported every night and never read, whatever was delivered again)."""
    from geximpute.runtime.provenance import fingerprint
    from geximpute.steps.nightly import InboxItem, _redelivered

    vcf, expr = tmp_path / "X.vcf", tmp_path / "X.expression.tsv"
    vcf.write_text("genome")
    sha = fingerprint(vcf)["sha256"]
    done = {"X": {"run_date": "2024-01-05", "run_id": "r", "rows": 1, "vcf_sha256": sha, "expression_sha256": None}}
    assert _redelivered([InboxItem("X", vcf)], done, "2024-01-06", "reimpute") == ([], [], [])
    expr.write_text("gene_id\tLiver\nG1\t3.0\n")
    with caplog.at_level("WARNING", logger="geximpute.steps.nightly"):
        again, later, waiting = _redelivered([InboxItem("X", vcf, expr)], done, "2024-01-06", "reimpute")
    assert [i.donor for i in again] == ["X"] and later == waiting == []
    assert "X.expression.tsv new since donor X was imputed on 2024-01-05: imputing it again" in caplog.text
    done["X"]["expression_sha256"] = fingerprint(expr)["sha256"]
    assert _redelivered([InboxItem("X", vcf, expr)], done, "2024-01-06", "reimpute") == ([], [], [])
    expr.write_text("gene_id\tLiver\nG1\t4.0\n")  # changed
    assert _redelivered([InboxItem("X", vcf, expr)], done, "2024-01-06", "ignore") == ([], [], [])
    assert [i.donor for i in _redelivered([InboxItem("X", vcf, expr)], done, "2024-01-06", "reimpute")[0]] == ["X"]
    vcf.unlink()  # gone since the inbox was listed
    assert _redelivered([InboxItem("X", vcf, expr)], done, "2024-01-06", "reimpute") == ([], [], ["X"])
    # a ledger written before expression checksums were recorded: the expression file is not compared
    vcf.write_text("genome")
    del done["X"]["expression_sha256"]
    assert _redelivered([InboxItem("X", vcf, expr)], done, "2024-01-06", "reimpute") == ([], [], [])


def test_recover_restores_only_what_the_old_protocol_named(tmp_path):
    """`.<root>.old-<day>-<pid>` (a partition the previous protocol moved aside) is put back; a user's
    `.nightly.old-backup`, `.nightly.old-2024-01-01-keep`, a plain file or a link of that shape is never moved or
    removed (every `.nightly.old-*` was: moved into the dataset as `run_date=backup`, or deleted)."""
    import json as json_module

    from geximpute.steps.nightly import recover

    root = tmp_path / "nightly"
    root.mkdir()
    legacy = tmp_path / ".nightly.old-2024-01-01-4242"
    legacy.mkdir()
    (legacy / "_manifest.json").write_text(json_module.dumps({"donors": {}}))
    mine = [tmp_path / ".nightly.old-backup", tmp_path / ".nightly.old-2024-01-01-keep"]
    for folder in mine:
        folder.mkdir()
        (folder / "precious.txt").write_text("keep me")
    (tmp_path / ".nightly.old-2024-02-02-7").write_text("a file, not a folder")
    (tmp_path / ".nightly.old-2024-03-03-8").symlink_to(mine[0])
    stale = tmp_path / ".nightly.staging-99"
    stale.mkdir()
    os.utime(stale, (0, 0))
    recover(root, {})
    assert (root / "run_date=2024-01-01" / "_manifest.json").is_file() and not legacy.exists()
    assert all((folder / "precious.txt").read_text() == "keep me" for folder in mine)
    assert (tmp_path / ".nightly.old-2024-02-02-7").is_file() and (tmp_path / ".nightly.old-2024-03-03-8").is_symlink()
    assert sorted(p.name for p in root.iterdir()) == ["run_date=2024-01-01"]
    assert not stale.exists()  # the old protocol's staging, older than a lease


def test_a_genome_that_changes_while_read_or_cannot_be_read_yet_stays_in_the_inbox(data, tmp_path, monkeypatch):
    """A genome still being copied when the night reads it is neither imputed from its first part nor quarantined:
    it is left for the next run; so is one that cannot be read for a passing reason (permissions the delivery has
    not set yet, a network file system's error)."""
    import errno

    import geximpute.steps.nightly as nightly_module
    from geximpute.config import load_config
    from geximpute.io.dataset import load_dataset
    from geximpute.science.problem import make_problem
    from geximpute.steps.nightly import InboxItem, StillArriving, _transient, read_new_donor

    config = load_config(data / "config.yaml")
    dataset = load_dataset(config)
    problem, _ = make_problem(dataset, hidden_mask=False)
    vcf = tmp_path / "NEW-001.vcf"
    donor_vcf(data / "variants.vcf", "SYN-D0001", "NEW-001", vcf)
    assert read_new_donor(InboxItem("NEW-001", vcf), config, problem, dataset.genome).variants.sites.num_rows > 0
    real = nightly_module.read_variants

    def read_while_copied(path, *args, **kwargs):
        out = real(path, *args, **kwargs)
        with open(path, "a") as fh:  # the copy goes on
            fh.write("\n")
        return out

    monkeypatch.setattr(nightly_module, "read_variants", read_while_copied)
    with pytest.raises(StillArriving, match=r"NEW-001\.vcf: the file changed while it was read"):
        read_new_donor(InboxItem("NEW-001", vcf), config, problem, dataset.genome)

    def cut_short(path, *args, **kwargs):  # a copy cut mid-record fails to parse, and the copy goes on
        with open(path, "a") as fh:
            fh.write("\n")
        raise ValueError(f"{path}: line 12: expected 10 columns")

    monkeypatch.setattr(nightly_module, "read_variants", cut_short)
    with pytest.raises(StillArriving, match=r"NEW-001\.vcf: the file changed while it was read .* did not read"):
        read_new_donor(InboxItem("NEW-001", vcf), config, problem, dataset.genome)
    monkeypatch.setattr(nightly_module, "read_variants", real)
    donor_vcf(data / "variants.vcf", "SYN-D0001", "NEW-001", vcf)  # whole again
    # the expression file too: one cut at a line's end parses (40 of 100 genes), and was recorded as final
    samples = pd.read_csv(data / "samples.tsv", sep="\t")
    measured = sorted(samples.loc[samples["donor_id"] == "SYN-D0001", "tissue"])[:1]
    expr, _ = donor_expression(data, "SYN-D0001", measured, tmp_path / "NEW-001.expression.tsv")
    real_expression = nightly_module.read_expression

    def expression_while_copied(path, *args, **kwargs):
        out = real_expression(path, *args, **kwargs)
        with open(path, "a") as fh:
            fh.write("\n")
        return out

    monkeypatch.setattr(nightly_module, "read_expression", expression_while_copied)
    with pytest.raises(StillArriving, match=r"NEW-001\.expression\.tsv: the file changed while it was read"):
        read_new_donor(InboxItem("NEW-001", vcf, expr), config, problem, dataset.genome)
    assert _transient(PermissionError(errno.EACCES, "Permission denied")) and _transient(MemoryError())
    assert not _transient(FileNotFoundError(errno.ENOENT, "gone")) and not _transient(ValueError("bad VCF"))


def test_new_donors_measured_samples_extend_a_problem_of_counts(synth_small):
    """A problem of counts keeps its count scaling (for training folds); new donors' measured samples, normalised
    from their own files, extend it without it (an IndexError before: the factors stayed as long as the samples
    were before the donors came)."""
    import numpy as np

    from geximpute.config import load_config
    from geximpute.io.dataset import load_dataset
    from geximpute.science.problem import make_problem
    from geximpute.steps.nightly import InboxItem, NewDonor, extend_problem

    config = load_config(synth_small / "config.yaml", ["inputs.scale=counts", "expression.counts_normalisation=cpm"])
    problem, _ = make_problem(load_dataset(config, with_variants=False), hidden_mask=False)
    assert problem.scaling is not None
    new = NewDonor(InboxItem("NEW-1", synth_small / "none.vcf"), None, tissues=[problem.tissues[0]],
                   values=np.full((problem.n_genes, 1), 2.5, np.float32))
    extended, virtual = extend_problem(problem, [new], ())
    assert extended.scaling is None and extended.values.shape[1] == len(virtual) > problem.n_samples
    assert "inbox:NEW-1:" + problem.tissues[0] in set(extended.sample_ids)


@pytest.mark.parametrize("method", ["median_ratio", "cpm"])
def test_a_new_donors_counts_are_normalised_on_the_cohorts_scale(data, tmp_path, method):
    """A new donor's measured counts are put on the scale of the reference donors': a donor whose two tissues are
    a reference donor's counts gets that donor's values. Under median-of-ratios they were normalised against their
    own two columns' pseudo-reference (a lone column is then plain CPM), a scale the model never saw."""
    import numpy as np

    from geximpute.config import load_config
    from geximpute.io.dataset import load_dataset
    from geximpute.science.problem import make_problem
    from geximpute.steps.nightly import InboxItem, read_new_donor

    config = load_config(data / "config.yaml", ["inputs.scale=counts",
                                                f"expression.counts_normalisation={method}"])
    dataset = load_dataset(config)
    problem, _ = make_problem(dataset, hidden_mask=False)
    assert problem.scaling is not None and problem.scaling.method == method
    samples = pd.read_csv(data / "samples.tsv", sep="\t")
    tissues = sorted(samples.loc[samples["donor_id"] == "SYN-D0003", "tissue"])[:2]
    vcf = tmp_path / "NEW-002.vcf"
    donor_vcf(data / "variants.vcf", "SYN-D0003", "NEW-002", vcf)
    table, _ = donor_expression(data, "SYN-D0003", tissues, tmp_path / "NEW-002.expression.tsv")
    new = read_new_donor(InboxItem("NEW-002", vcf, table), config, problem, dataset.genome)
    column = {s: i for i, s in enumerate(problem.sample_ids)}
    mine = samples[(samples["donor_id"] == "SYN-D0003") & samples["tissue"].isin(tissues)].set_index("tissue")
    expected = problem.values[:, [column[mine.loc[t, "sample_id"]] for t in new.tissues]]
    seen = ~np.isnan(expected)
    assert seen.sum() > 50
    # the cohort's factors of these two samples, read back through the new path (the same counts, the same genes)
    np.testing.assert_allclose(new.values[seen], expected[seen], rtol=0, atol=0.02)
    if method == "median_ratio":  # their own two columns' pseudo-reference put them elsewhere
        from geximpute.config import ExpressionConfig
        from geximpute.io.expression import read_expression, to_model_scale

        own = to_model_scale(read_expression(table, "wide", "counts"), ExpressionConfig(counts_normalisation=method))
        assert np.abs(np.nanmedian(own, axis=0) - np.nanmedian(new.values, axis=0)).max() > 0.05


def test_a_genome_gone_before_it_is_read_waits_for_the_next_run(tmp_path):
    """A genome removed (or being replaced) between the inbox scan and its read is left for the next run
    (StillArriving); before, a bare FileNotFoundError had the donor quarantined: its expression file and index went
    to the quarantine without the genome."""
    from geximpute.steps.nightly import InboxItem, StillArriving, read_new_donor

    expression = tmp_path / "E.expression.tsv"
    expression.write_text("gene_id\n")
    item = InboxItem("E", tmp_path / "E.vcf.gz", expression=expression)
    with pytest.raises(StillArriving, match=r"E\.vcf\.gz: gone since the inbox was read"):
        read_new_donor(item, None, None, None)


def test_a_partition_whose_manifest_and_rows_are_damaged_is_named(tmp_path):
    """A torn manifest falls back to the partition's rows; rows that do not read either are an error naming the
    partition (before, pyarrow's ArrowInvalid escaped as a traceback)."""
    from geximpute.errors import GeximputeError
    from geximpute.runtime.partitions import committed_donors

    partition = tmp_path / "run_date=2024-01-05"
    (partition / "tissue=Lung").mkdir(parents=True)
    (partition / "_manifest.json").write_bytes(b"\xff\xfe torn")
    (partition / "tissue=Lung" / "part-0.parquet").write_bytes(b"PAR1 not a parquet file")
    with pytest.raises(GeximputeError, match=r"run_date=2024-01-05: its manifest is unreadable and its rows do not"):
        committed_donors(tmp_path)

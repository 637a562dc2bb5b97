"""The commit protocol and leases of :mod:`geximpute.runtime.atomic`, with real processes and real files (no Ray).

Each writer below writes ``N_FILES`` files that all carry the writer's label, so a reader can tell a complete
version (N files, one label) from a mix or a partial one.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from geximpute.errors import GeximputeError
from geximpute.runtime import atomic
from geximpute.runtime.atomic import (
    COMMIT_POINTS,
    Lease,
    LeaseBusy,
    LeaseLost,
    OutputRefused,
    discard,
    resolve,
    staged_output,
    store_of,
)

REPO = Path(__file__).resolve().parents[1]
N_FILES = 20

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from geximpute.runtime.atomic import staged_output
    out, label, pause, n_files = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    with staged_output(out, step="test") as staging:
        for i in range(n_files):
            (staging / f"part-{i:03d}.txt").write_text(label)
        time.sleep(pause)
    print("committed", label)
""")


def write_version(out: Path, label: str, **kwargs) -> None:
    with staged_output(out, step="test", **kwargs) as staging:
        for i in range(N_FILES):
            (staging / f"part-{i:03d}.txt").write_text(label)


def read_version(out: Path) -> str:
    """The label of the version ``out`` names; fails on a partial or mixed version."""
    folder = resolve(out)
    labels = [p.read_text() for p in sorted(folder.glob("part-*.txt"))]
    assert len(labels) == N_FILES, f"{len(labels)} files in {folder}"
    assert len(set(labels)) == 1, f"a mix of versions in {folder}: {sorted(set(labels))}"
    return labels[0]


def run_writer(out: Path, label: str, pause: float = 0.0, env: dict | None = None, wait: bool = True):
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    argv = [sys.executable, "-c", WRITER, str(out), label, str(pause), str(N_FILES)]
    proc = subprocess.Popen(argv, env=full, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        proc.wait(timeout=120)
    return proc


def test_commit_is_a_link_to_a_private_durable_version_and_old_versions_are_kept_then_pruned(tmp_path):
    out = tmp_path / "out"
    write_version(out, "one")
    assert out.is_symlink() and read_version(out) == "one"
    first = resolve(out)
    assert first.parent == store_of(out) and first.name.startswith("v-")
    marker = json.loads((first / atomic.MARKER).read_text())
    assert marker["step"] == "test" and marker["version"] == first.name
    for path in [first, *first.iterdir()]:
        assert not os.stat(path).st_mode & stat.S_IRWXO, f"{path} is readable by others"
    write_version(out, "two")  # the first version stays for its readers
    assert read_version(out) == "two" and first.is_dir() and (first / atomic.SUPERSEDED).exists()
    assert {p.read_text() for p in first.glob("part-*")} == {"one"}
    write_version(out, "three", keep=0)  # superseded versions older than `keep` go
    assert read_version(out) == "three"
    assert sorted(p.name for p in store_of(out).iterdir()) == [resolve(out).name]  # no lease, staging or version


def test_a_folder_that_is_not_ours_is_refused_and_left_whole(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "expression.tsv").write_text("gene_id\tliver\n")
    with pytest.raises(OutputRefused, match=r"data: is a folder that is not a geximpute output"):
        write_version(data, "x")
    assert sorted(p.name for p in data.iterdir()) == ["expression.tsv"] and not data.is_symlink()
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    with pytest.raises(OutputRefused, match="is a file"):
        write_version(a_file, "x")
    assert a_file.read_text() == "keep me"
    other = tmp_path / "bundle"
    with staged_output(other, step="bundle") as staging:
        (staging / "manifest.json").write_text("{}")
    with pytest.raises(OutputRefused, match="holds the output of `bundle`, not of `test`"):
        write_version(other, "x")
    assert (resolve(other) / "manifest.json").exists()
    assert not list(store_of(data).glob("staging-*")) if store_of(data).exists() else True


def test_force_replaces_a_foreign_folder_but_keeps_it_as_a_superseded_version(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.tsv").write_text("precious")
    write_version(data, "forced", force=True)
    assert read_version(data) == "forced"
    kept = [v for v in store_of(data).glob("v-*") if (v / "x.tsv").exists()]
    assert len(kept) == 1 and (kept[0] / "x.tsv").read_text() == "precious"


def test_an_empty_folder_and_an_output_of_the_old_layout_are_replaced_without_a_gap(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    write_version(empty, "new")
    assert read_version(empty) == "new"
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "_manifest.json").write_text(json.dumps({"step": "test", "versions": {"geximpute": "0.1"}}))
    (legacy / "part-000.txt").write_text("old")
    write_version(legacy, "new")
    assert read_version(legacy) == "new"
    assert any((v / "_manifest.json").exists() for v in store_of(legacy).glob("v-*"))  # kept for its readers


def test_two_writers_on_one_output_from_two_hosts_one_wins_the_other_refuses(tmp_path):
    out = tmp_path / "out"
    write_version(out, "before")
    first = run_writer(out, "host-a", pause=3, env={"GEXIMPUTE_HOST": "pod-a"}, wait=False)
    lease = store_of(out) / "lease.json"
    deadline = time.time() + 60
    while not lease.exists() and time.time() < deadline:
        time.sleep(0.05)
    second = run_writer(out, "host-b", env={"GEXIMPUTE_HOST": "pod-b"})
    assert second.returncode != 0
    err = second.stderr.read()
    assert "LeaseBusy" in err and "pod-a" in err, err
    assert first.wait(timeout=120) == 0, first.stderr.read()
    assert read_version(out) == "host-a"
    assert not list(store_of(out).glob("staging-*"))


def test_a_reader_during_commits_sees_one_complete_version(tmp_path):
    out = tmp_path / "out"
    write_version(out, "v0")
    seen: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(read_version(out))  # through the link, as any reader of <out>/ does
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(1, 9):
        proc = run_writer(out, f"v{i}")
        assert proc.returncode == 0, proc.stderr.read()
    stop.set()
    thread.join()
    assert not errors, errors[0]
    assert len(seen) > 8 and set(seen) <= {f"v{i}" for i in range(9)}
    assert read_version(out) == "v8"


@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_a_run_killed_at_each_step_of_the_commit_leaves_a_readable_version(tmp_path, point):
    out = tmp_path / "out"
    write_version(out, "previous")
    killed = run_writer(out, "killed", env={"GEXIMPUTE_KILL_AT": point, "GEXIMPUTE_LEASE_SECONDS": "1"})
    assert killed.returncode == -9, killed.stderr.read()
    # the commit is visible from "linked" on; before it the previous version is
    assert read_version(out) == ("killed" if point in ("linked", "pruned") else "previous")
    assert (store_of(out) / "lease.json").exists()  # the dead run's lease ...
    time.sleep(1.2)  # ... expires, and the next run takes over and tidies
    after = run_writer(out, "after")
    assert after.returncode == 0, after.stderr.read()
    assert read_version(out) == "after"
    assert not list(store_of(out).glob("staging-*"))
    assert not list(out.parent.glob(f".{out.name}.link-*"))


def test_an_expired_lease_of_another_host_is_taken_over_and_a_live_one_is_not(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"owner": "pod-x-7-abc", "host": "pod-x", "pid": 7, "expires": time.time() - 1}))
    with Lease(path, what="nightly run") as lease:
        assert json.loads(path.read_text())["owner"] == lease.owner
        with pytest.raises(LeaseBusy, match=r"another nightly run holds the lease: .* on "):
            Lease(path, what="nightly run").acquire()
    assert not path.exists()
    path.write_text(json.dumps({"owner": "pod-y-8-def", "host": "pod-y", "pid": 8, "expires": time.time() + 60}))
    with pytest.raises(LeaseBusy, match="pod-y"):
        Lease(path).acquire()
    assert json.loads(path.read_text())["owner"] == "pod-y-8-def"  # someone else's lease is left alone
    path.write_text("")  # torn by a crash: expired once older than 30 s
    old = time.time() - 60
    os.utime(path, (old, old))
    with Lease(path):
        pass


def test_a_retry_waits_out_a_dead_holder_and_is_refused_by_a_live_one(tmp_path):
    """`train` holds a lease on its folder; a retry after a crash (a killed process, a replaced pod) must wait for
    the dead run's lease to expire and resume, not fail at once; a run whose lease is renewed is alive."""
    path = tmp_path / "lease.json"
    expires = time.time() + 1.5
    path.write_text(json.dumps({"owner": "pod-z-9-ghi", "host": "pod-z", "pid": 9, "expires": expires}))
    lease = Lease(path, what="`train` run").acquire_after_the_dead(poll=0.2)  # not renewed: taken over
    assert time.time() >= expires and json.loads(path.read_text())["owner"] == lease.owner  # once it expired
    lease.release()
    with Lease(path, ttl=0.9):  # alive: renewed every 0.3 s
        with pytest.raises(LeaseBusy, match="another `train` run holds the lease"):
            Lease(path, what="`train` run").acquire_after_the_dead(poll=0.4)


def test_the_heartbeat_renews_and_a_lost_lease_commits_nothing(tmp_path):
    path = tmp_path / "lease.json"
    with Lease(path, ttl=0.6) as lease:
        first = json.loads(path.read_text())["expires"]
        time.sleep(1.5)
        lease.check()  # still ours, well after the first expiry time
        assert json.loads(path.read_text())["expires"] > first + 0.5
    out = tmp_path / "out"
    write_version(out, "kept")
    with pytest.raises(LeaseLost, match="no longer holds"):
        with staged_output(out, step="test") as staging:
            (staging / "part-000.txt").write_text("lost")
            lease_file = store_of(out) / "lease.json"
            holder = json.loads(lease_file.read_text())
            lease_file.write_text(json.dumps({**holder, "owner": "someone-else"}))  # taken over meanwhile
    assert read_version(out) == "kept"
    assert not list(store_of(out).glob("staging-*"))


def test_a_renewal_never_overwrites_a_lease_another_run_took(tmp_path, monkeypatch):
    """A renewal is a compare-and-swap: a run that takes the lease while its holder renews it keeps it, whichever
    side of the holder's steps it lands on, and the holder learns it lost (before, a holder paused between reading
    its lease and writing the renewal overwrote a takeover made in between: two runs held the lease)."""
    path = tmp_path / "lease.json"

    def stopped(lease: Lease) -> Lease:  # a holder whose heartbeat is paused (a stalled process)
        lease._stop.set()
        lease._thread.join()
        return lease

    # 1. another run starts while the holder has set its own lease aside to renew it: the name is free, the starter
    # links its lease there, finds the holder's set aside and live, gives the name back and is refused; the renewal
    # lands (before, the starter kept the lease and the live holder lost it: "the second is refused" did not hold)
    holder, starter = stopped(Lease(path, ttl=60).acquire()), Lease(path, ttl=60)
    real_link = os.link
    refused = []

    def racing_link(src, dst, *args, **kwargs):
        if Path(dst) == path and f".new-{holder.owner}" in str(src) and not refused:
            with pytest.raises(LeaseBusy, match=f"another output holds the lease: {holder.owner}") as info:
                starter.acquire()
            refused.append(info.value)
            assert not path.exists() and starter._thread is None
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", racing_link)
    holder.renew()
    monkeypatch.undo()
    assert refused and json.loads(path.read_text())["owner"] == holder.owner
    holder.check()
    holder.release()
    assert not path.exists() and sorted(p.name for p in tmp_path.iterdir()) == []

    # 1b. a starter that keeps the name (a run of code without that step) holds it; the renewal waits for it
    # (RENEW_WAIT_SECONDS), then this run has lost
    holder = stopped(Lease(path, ttl=60).acquire())
    squatter = tmp_path / "squatter.json"
    squatter.write_text(json.dumps({"owner": "squatter", "expires": time.time() + 60}))

    def squatting_link(src, dst, *args, **kwargs):
        if Path(dst) == path and f".new-{holder.owner}" in str(src) and not os.path.lexists(path):
            real_link(squatter, path)
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", squatting_link)
    monkeypatch.setattr(atomic, "RENEW_WAIT_SECONDS", 0.1)
    monkeypatch.setattr(Lease._link_renewed, "__defaults__", (0.1,))
    with pytest.raises(LeaseLost, match="another run took the .* lease while"):
        holder.renew()
    monkeypatch.undo()
    assert json.loads(path.read_text())["owner"] == "squatter"
    with pytest.raises(LeaseLost):
        holder.check()
    holder.release()  # not its lease: left as it is
    assert json.loads(path.read_text())["owner"] == "squatter"
    path.unlink()
    squatter.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    # 2. the holder's lease expired and another run took it over before the holder's renewal
    holder = stopped(Lease(path, ttl=0.2).acquire())
    time.sleep(0.4)
    with Lease(path, ttl=60) as other:
        with pytest.raises(LeaseLost, match=f"taken over by {other.owner}"):
            holder.renew()
        assert json.loads(path.read_text())["owner"] == other.owner  # put back, untouched
        other.check()
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    # 3. an ordinary renewal: the same owner and acquisition time, a later expiry, nothing left beside it
    with Lease(path, ttl=60) as lease:
        before = json.loads(path.read_text())
        lease.renew()
        after = json.loads(path.read_text())
        assert (after["owner"], after["acquired"]) == (before["owner"], before["acquired"])
        assert after["expires"] >= before["expires"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["lease.json"]



def test_a_renewal_leaves_the_name_free_only_between_a_rename_and_a_link_and_survives_an_io_error(tmp_path,
                                                                                                  monkeypatch):
    """The renewed lease is written and synced before the lease is set aside (the name free for a write and an
    fsync let a run starting then take a live lease); an I/O error linking it (a network volume's EIO) puts the
    lease back, and an error putting it back leaves it for the next renewal to restore: the lease is never lost."""
    import errno

    path = tmp_path / "lease.json"
    lease = Lease(path, ttl=60).acquire()
    lease._stop.set()
    lease._thread.join()
    real_rename, real_link, seen = os.rename, os.link, []

    def rename(src, dst, *args, **kwargs):
        if Path(src) == path:  # the lease set aside: its renewal is already on disk
            seen.append([p.name for p in tmp_path.iterdir() if ".new-" in p.name])
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    lease.renew()
    assert seen == [[f".lease.json.new-{lease.owner}"]]
    failures = {"renewed": 1, "restore": 0}

    def flaky_link(src, dst, *args, **kwargs):
        kind = "renewed" if ".new-" in str(src) else "restore"
        if Path(dst) == path and failures[kind] > 0:
            failures[kind] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", flaky_link)
    with pytest.raises(OSError, match="Input/output"):
        lease.renew()
    lease.check()  # put back: still this run's
    failures.update(renewed=1, restore=1)  # and when putting it back fails too
    with pytest.raises(OSError, match="Input/output"):
        lease.renew()
    assert not path.exists() and (tmp_path / f"lease.json.renew-{lease.owner}").exists()
    lease.renew()  # the next beat puts it back and renews
    lease.check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lease.json"]
    monkeypatch.undo()
    lease.release()

def test_discard_removes_an_output_and_its_versions_but_refuses_others(tmp_path):
    out = tmp_path / "out"
    write_version(out, "one")
    write_version(out, "two")
    discard(out, step="test")
    assert sorted(tmp_path.iterdir()) == []
    data = tmp_path / "data"
    data.mkdir()
    (data / "keep.txt").write_text("x")
    with pytest.raises(OutputRefused):
        discard(data, step="test")
    assert (data / "keep.txt").read_text() == "x"


def test_discard_leaves_the_store_of_a_run_that_took_the_lease_after_it(tmp_path, monkeypatch):
    """discard empties the store under its lease and removes it after releasing it only while empty: a run that
    took the lease in between keeps its lease and staging (the store was removed whole before)."""
    out = tmp_path / "out"
    write_version(out, "one")
    store = store_of(out)
    racer = {}
    release = atomic.Lease.release

    def release_then_race(self):
        release(self)
        if not racer:  # the next run, right after discard lets go
            racer["lease"] = atomic.Lease(store / "lease.json", what="racer").acquire()
            (store / "staging-racer-1-0123abcd").mkdir()

    monkeypatch.setattr(atomic.Lease, "release", release_then_race)
    discard(out, step="test")
    assert not os.path.lexists(out)
    assert sorted(p.name for p in store.iterdir()) == ["lease.json", "staging-racer-1-0123abcd"]
    assert json.loads((store / "lease.json").read_text())["owner"] == racer["lease"].owner
    racer["lease"].release()


def test_a_scratch_folder_is_removed_with_its_run_and_a_dead_runs_after_it(tmp_path):
    target = tmp_path / "out"
    host = atomic.run_tag().rsplit("-", 2)[0]
    dead = tmp_path / f".out.matrix-{host}-{2**22 + 12345}-0000"  # no such process
    other_host = tmp_path / ".out.matrix-elsewhere-1-0000"  # another host's: never judged from here
    live = tmp_path / f".out.matrix-{host}-{os.getppid()}-0000"  # a live process's
    for folder in (dead, other_host, live):
        folder.mkdir()
    with atomic.scratch_folder(target, "matrix") as folder:
        assert folder.parent == tmp_path and folder.name.startswith(f".out.matrix-{host}-{os.getpid()}-")
        (folder / "expression.f32").write_bytes(b"x")
        assert not dead.exists() and other_host.exists() and live.exists()
    assert not folder.exists()
    with pytest.raises(RuntimeError), atomic.scratch_folder(target, "matrix") as folder:
        raise RuntimeError("the run failed")
    assert not folder.exists() and not target.exists()


def test_a_scratch_folder_is_judged_by_its_owner_record_never_a_live_runs(tmp_path, monkeypatch):
    """Each scratch folder names its process (host, boot, pid namespace, start time) and renews that record while
    its run lasts. A folder of this host, boot and namespace whose pid is gone or is another process now (a pid
    used again after a container restart) is removed; one of another namespace or host only once its record went
    two leases without renewal (a replaced pod), never while it is renewed (a live run in another container with
    the same host name). Output names with dashes and glob characters find their own folders only."""
    import json
    import time

    monkeypatch.setenv("GEXIMPUTE_LEASE_SECONDS", "0.4")  # renewed every 0.1 s; stale after 0.8 s
    target = tmp_path / "run[1]-v8"
    me = atomic._process_identity(os.getpid())
    parent = atomic._process_identity(os.getppid())
    host = me["host"]

    def left(name: str, owner: dict | None, age: float = 0.0) -> Path:
        folder = tmp_path / f".{target.name}.matrix-{name}"
        folder.mkdir()
        if owner is not None:
            (folder / atomic.OWNER_FILE).write_text(json.dumps(owner))
            then = time.time() - age
            os.utime(folder / atomic.OWNER_FILE, (then, then))
        return folder

    dead_pid = 2**22 + 12345
    gone = left(f"{host}-{dead_pid}-0001", {**me, "pid": dead_pid, "start": 1})
    reused = left(f"{host}-{os.getppid()}-0002", {**parent, "start": (parent["start"] or 0) + 1})
    alive = left(f"{host}-{os.getppid()}-0003", parent)
    other_ns = left(f"{host}-{dead_pid}-0004", {**me, "pid": dead_pid, "pid_ns": -1})  # renewed just now
    stale_ns = left(f"{host}-{dead_pid}-0005", {**me, "pid": dead_pid, "pid_ns": -1}, age=5.0)
    elsewhere = left(f"otherhost-{dead_pid}-0006", {**me, "host": "otherhost", "pid": dead_pid})
    slow_renewer = left(f"otherhost-{dead_pid}-0009", {**me, "host": "otherhost", "pid": dead_pid,
                                                        "renew_seconds": 3.0}, age=5.0)  # renews every 3 s: alive
    replaced = left(f"otherhost-{dead_pid}-0007", {**me, "host": "otherhost", "pid": dead_pid}, age=5.0)
    neighbour = tmp_path / f".run1-v8.matrix-{host}-{dead_pid}-0008"  # another output's, which the glob must miss
    neighbour.mkdir()
    with atomic.scratch_folder(target, "matrix") as folder:
        assert not gone.exists() and not reused.exists() and not stale_ns.exists() and not replaced.exists()
        assert alive.exists() and other_ns.exists() and elsewhere.exists() and neighbour.exists()
        assert slow_renewer.exists()  # a host with a longer lease renews less often: judged by its own period
        record = folder / atomic.OWNER_FILE
        assert json.loads(record.read_text()) == {**me, "renew_seconds": 0.1}
        first = record.stat().st_mtime_ns
        time.sleep(0.35)
        assert record.stat().st_mtime_ns > first  # renewed while the run lasts
    assert not folder.exists()


def test_a_folder_filled_during_the_run_is_refused_at_commit_and_a_users_lookalikes_are_left(tmp_path, monkeypatch):
    """The output is checked again just before it is switched: a folder that was empty when the run started and
    that someone wrote into meanwhile is refused (it was swapped into the store and pruned with what it held).
    Folders beside the output that only look like the old protocol's leftovers (`.out.old-backup`) are a user's:
    never restored onto the output nor removed. A failure to sync after the switch is a warning, the commit done."""
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputRefused, match=r"out: is a folder that is not a geximpute output") as refused:
        with staged_output(out, step="test", keep=0) as staging:
            (staging / "part.txt").write_text("new")
            (out / "thesis.txt").write_text("a user's")  # written while the run works
    assert (out / "thesis.txt").read_text() == "a user's" and not out.is_symlink()
    # the finished output is named, not left unlinked in the store for the next run to prune unsaid
    kept = re.search(r"This run's output is complete in (\S+): move it out", str(refused.value))
    assert kept and (Path(kept.group(1)) / "part.txt").read_text() == "new"

    fresh = tmp_path / "fresh"
    backup = tmp_path / ".fresh.old-backup"
    backup.mkdir()
    (backup / "notes.txt").write_text("mine")
    os.utime(backup, (0, 0))  # older than any lease
    write_version(fresh, "v1")
    assert (backup / "notes.txt").read_text() == "mine" and read_version(fresh) == "v1"

    real_sync = atomic.fsync_dir

    def refused(path):  # the output's parent: a drop box this user may write into but not open
        if Path(path) == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        real_sync(path)

    monkeypatch.setattr(atomic, "fsync_dir", refused)
    write_version(fresh, "v2")  # committed; the sync's failure is said, not raised as "nothing committed"
    assert read_version(fresh) == "v2"


def test_what_the_engine_did_not_name_in_a_store_is_never_removed(tmp_path):
    """Only what the engine names in a store (its versions, staging folders, lease files) is ever removed from it:
    a `staging-notes` or `v-draft` folder someone put there survives runs and pruning, and `discard` refuses to
    remove such a store with the output's versions."""
    out = tmp_path / "out"
    write_version(out, "v1")
    store = store_of(out)
    for name in ("staging-notes", "v-draft"):
        (store / name).mkdir()
        (store / name / "mine.txt").write_text("keep")
    write_version(out, "v2", keep=0)
    write_version(out, "v3", keep=0)  # prunes every superseded version it wrote
    assert read_version(out) == "v3"
    assert [p.name for p in sorted(store.glob("v-*")) if p.name != "v-draft"] == [resolve(out).name]
    for name in ("staging-notes", "v-draft"):
        assert (store / name / "mine.txt").read_text() == "keep"
    with pytest.raises(OutputRefused, match=r"holds staging-notes, v-draft, which this engine did not write"):
        discard(out, step="test")
    assert read_version(out) == "v3" and (store / "v-draft" / "mine.txt").exists()


def test_a_check_during_a_renewal_waits_for_it(tmp_path, monkeypatch):
    """The committer's check and the heartbeat's renewal never interleave: a check between the renewal's rename
    aside and its link found no lease (LeaseLost, the run's commit refused although nobody else held it), or put the
    set-aside lease back so that the renewal's link failed and the run lost its lease for good."""
    path = tmp_path / "lease.json"
    lease = Lease(path, ttl=60).acquire()
    lease._stop.set()
    lease._thread.join()
    swap = Lease._swap
    outcome = []

    def check_meanwhile(self, aside, renewed):
        def check():
            try:
                self.check()
                outcome.append("held")
            except LeaseLost as exc:
                outcome.append(str(exc))

        thread = threading.Thread(target=check)
        thread.start()
        thread.join(0.3)  # with the renewal holding the lease's lock, the check waits for it
        swap(self, aside, renewed)
        return thread

    monkeypatch.setattr(Lease, "_swap", check_meanwhile)
    lease.renew()
    monkeypatch.undo()
    deadline = time.time() + 5
    while not outcome and time.time() < deadline:
        time.sleep(0.01)
    assert outcome == ["held"]
    lease.check()
    lease.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_release_leaves_a_lease_taken_over_after_it_read_it(tmp_path, monkeypatch):
    """A run whose lease expired and was taken over between release's read and its removal left the new holder's
    lease in place (before, it unlinked the name: the new holder's lease, and a third run could start beside it)."""
    path = tmp_path / "lease.json"
    mine = Lease(path, ttl=60).acquire()
    mine._stop.set()
    mine._thread.join()
    text, holder = mine.read()
    other = Lease(path, ttl=60)

    def read_then_taken_over():
        path.unlink()  # expired here, and taken over by another run just after this read
        other.acquire()
        return text, holder

    monkeypatch.setattr(mine, "read", read_then_taken_over)
    mine.release()
    assert json.loads(path.read_text())["owner"] == other.owner
    other.check()
    other.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_torn_json_of_undecodable_bytes_is_named(tmp_path):
    """Stale blocks of a torn write (not UTF-8) are an error naming the file, as a torn JSON is, and a lease file
    holding them reads as torn; before, UnicodeDecodeError escaped as a traceback."""
    manifest = tmp_path / "_manifest.json"
    manifest.write_bytes(b'{"donors": \xff\xfe\x00')
    with pytest.raises(GeximputeError, match=r"_manifest.json: the partition manifest is not valid JSON"):
        atomic.read_json(manifest, "partition manifest")
    lease_file = tmp_path / "lease.json"
    lease_file.write_bytes(b"\xff\xfe torn")
    text, holder = Lease(lease_file).read()
    assert holder is None and text
    # once old, it is taken over like any torn lease (the comparison after setting it aside decoded strictly: a
    # UnicodeDecodeError escaped, leaving a `lease.json.expired-*` file behind)
    old = time.time() - 120
    os.utime(lease_file, (old, old))
    with Lease(lease_file, ttl=60):
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("lease")] == ["lease.json"]
    assert not any(p.name.startswith("lease.json.expired-") for p in tmp_path.iterdir())


def test_a_durable_commit_whose_folder_does_not_sync_is_not_recorded_as_done(tmp_path, monkeypatch):
    """With ``durable`` (nightly, which writes its ledger after each commit), a commit whose folder cannot be synced
    raises instead of warning: the ledger is not written ahead of a switch that a power loss could take back. The
    commit itself stands (the output is the new version)."""
    out = tmp_path / "out"
    write_version(out, "old")
    real_sync = atomic.fsync_dir

    def failing_sync(path):
        if Path(path) == out.parent:
            raise OSError(5, "Input/output error")
        return real_sync(path)

    monkeypatch.setattr(atomic, "fsync_dir", failing_sync)
    with pytest.raises(atomic.CommitNotSynced, match=r"out: committed as v-.*could not be synced.*nothing records"):
        write_version(out, "new", durable=True)
    assert read_version(out) == "new"
    write_version(out, "newer")  # without durable: a warning, the commit stands
    assert read_version(out) == "newer"


def test_a_set_aside_lease_is_judged_by_its_own_age_and_a_renewal_that_lost_it_stops(tmp_path):
    """A ``.renew-*`` file left by a renewer that died (torn, or without an expiry) is judged by its own age, not by
    the starter's lease just linked (which made it live forever: every start refused); a renewer paused past its
    expiry whose set-aside lease a starter removed learns it lost (a FileNotFoundError before, taken for a passing
    error: its next beat set the new holder's lease aside)."""
    path = tmp_path / "lease.json"
    stale = tmp_path / "lease.json.renew-ghost-1-0000abcd"
    stale.write_bytes(b"\x00\x00 torn")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    with Lease(path, ttl=60) as lease:  # taken; the stale set-aside file removed
        lease.check()
    assert not stale.exists()
    stale.write_bytes(b"\x00\x00 torn")  # a young one: a renewal in progress
    with pytest.raises(LeaseBusy, match="a run that is writing it now"):
        Lease(path, ttl=60).acquire()
    stale.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    holder = Lease(path, ttl=60).acquire()
    holder._stop.set()
    holder._thread.join()
    swap = Lease._swap

    def starter_removed_it(self, aside, renewed):
        aside.unlink()  # expired while this renewal paused: removed by a run that took the name
        return swap(self, aside, renewed)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Lease, "_swap", starter_removed_it)
        with pytest.raises(LeaseLost, match="expired while it was being renewed"):
            holder.renew()
    assert holder._lost


def test_a_partition_of_a_root_that_is_a_link_elsewhere_points_at_its_version(tmp_path):
    """nightly's partitions live in a root that may be a link (``/data/nightly -> /mnt/big/nightly``), their store
    beside the link (``/data/.nightly.geximpute``). A relative link's ``..`` is the real folder's parent: the
    partition's link pointed at nothing (the night exited 0 with its rows unreadable), and the next commit of the
    day was refused as a link that is not a version of this output."""
    real = tmp_path / "big" / "nightly"
    real.mkdir(parents=True)
    (tmp_path / "data").mkdir()
    root = tmp_path / "data" / "nightly"
    root.symlink_to(real)
    partition = root / "run_date=2024-01-05"
    store = store_of(root) / partition.name
    assert store.parent.parent == tmp_path / "data"
    write_version(partition, "first", store=store)
    assert partition.exists() and read_version(partition) == "first"
    write_version(partition, "second", store=store)  # the day's next commit
    assert read_version(partition) == "second"
    assert Path(os.path.realpath(partition)).parent == Path(os.path.realpath(store))

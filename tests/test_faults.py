"""Faults caused on purpose, and what survives them. Each test asserts row counts and unique (donor, tissue, gene)
keys afterwards.

- a Ray Train worker SIGKILLed in the second of a run's two networks: the run resumes from its last checkpoint,
  keeps the first network and finishes the second;
- an ``impute`` process SIGKILLed while writing: the previous output is intact, the rerun writes every row once;
- a ``nightly`` process SIGKILLed after some donors: the next run does the rest, none twice;
- an output folder that cannot be written, and a full disk (OSError ENOSPC injected through the writer seam):
  a clear error naming the path, nothing committed, no staging left.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY, assert_keys_unique, donor_vcf, expected_missing, nightly_config, read_nightly, read_output

from geximpute.config import load_config
from geximpute.fit.train import NetworkRun, fold_dirs, train_networks
from geximpute.runtime.atomic import Lease, LeaseBusy, resolve, store_of
from geximpute.runtime.console import LOG_NAME
from geximpute.steps.impute import OutputError, impute
from geximpute.steps.nightly import ledger_path, lock_path, nightly, output_root
from geximpute.steps.prepare import read_problem_index

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2


class WorkerKiller:
    """SIGKILLs this test's Ray Train worker (found among this process's descendants by its process title) once the
    run has registered a checkpoint of network ``network`` (in Ray Train's checkpoint manager snapshot), and records
    the (network, epoch) of every checkpoint the run registers, in order."""

    def __init__(self, run_dir: Path, network: str) -> None:
        self.snapshot = run_dir / "checkpoint_manager_snapshot.json"
        self.network = network
        self.killed: list[int] = []
        self.at_kill: tuple[str, int] | None = None
        self.reports: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def read(self) -> dict | None:
        try:
            return json.loads(self.snapshot.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _record(self) -> tuple[str, int] | None:
        latest = (self.read() or {}).get("latest_checkpoint_result")
        if not latest:
            return None
        report = (latest["metrics"]["network"], latest["metrics"]["epoch"])
        if not self.reports or self.reports[-1] != report:
            self.reports.append(report)
        return report

    def _watch(self) -> None:
        while not self._stop.is_set():
            report = self._record()
            if report and report[0] == self.network and not self.killed:
                for proc in psutil.Process().children(recursive=True):
                    try:
                        if "RayTrainWorker" in " ".join(proc.cmdline()):
                            os.kill(proc.pid, signal.SIGKILL)
                            self.killed.append(proc.pid)
                    except psutil.Error:
                        continue
                self.at_kill = report
            self._stop.wait(0.05)

    def __enter__(self) -> WorkerKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._record()


@pytest.fixture(scope="module")
def data(tiny_data) -> Path:
    return tiny_data


@pytest.fixture(scope="module")
def killed_training(tiny_model, tmp_path_factory):
    """Two networks trained one after the other in one Ray Train run on the session's tiny records (one per training
    fold), the worker killed after the second network's first checkpoint: (networks, killer)."""
    work = tmp_path_factory.mktemp("faults-train")
    # few examples per epoch: the epochs are short, the worker is killed in the second network's second one
    config = load_config(tiny_model.data / "config.yaml", [f"output_dir={work}", *TINY, f"train.epochs={EPOCHS}",
                                                           f"train.patience={EPOCHS}", "train.max_failures=2",
                                                           "train.max_examples_per_epoch=512"])
    gene_ids, tissues = read_problem_index(tiny_model.records)
    runs = [NetworkRun(f"fold{k}", fold_dirs(tiny_model.records, [k])) for k in (0, 1)]
    with WorkerKiller(work / "runs" / "faults", network="fold1") as killer:
        networks = train_networks(config, runs, tiny_model.records, gene_ids, len(tissues), storage=work / "runs",
                                  name="faults")
    return networks, killer


@pytest.fixture(scope="module")
def bundle(tiny_model) -> Path:
    """The session's tiny bundle: the faults' imputations run with it."""
    return tiny_model.folder


@pytest.fixture(scope="module")
def previous(tiny_imputation, data, tmp_path_factory):
    """A committed impute output (the 'previous run' that faults must not damage): a copy of the session's
    imputation of the tiny data with the tiny bundle (its output folder, a relative link, and the versions store
    beside it), so that a fault that did damage it damages no other module's fixture."""
    import shutil

    _, result = tiny_imputation
    work = tmp_path_factory.mktemp("faults-out")
    out = work / result.out_dir.name
    version = resolve(result.out_dir)  # only the version it names (other modules may commit newer ones)
    shutil.copytree(version, store_of(out) / version.name)
    out.symlink_to(Path(store_of(out).name) / version.name)  # relative, as the engine links
    assert resolve(out) == store_of(out) / version.name and len(read_output(out)) == result.n_rows
    config = load_config(data / "config.yaml", [f"output_dir={work}"])
    return config, dataclasses.replace(result, out_dir=out)


def _fingerprint(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "geximpute.apps.cli", "-q", *args]


def _wait_for(condition, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            tail = proc.stderr.read()[-3000:]
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}: {tail}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_killed_training_worker_resumes_from_its_checkpoint(killed_training, tiny_model, previous, data):
    networks, killer = killed_training
    assert killer.killed, "the training worker was never killed"
    # killed once the second network's first epoch's checkpoint was registered, before its last epoch
    assert killer.at_kill is not None and killer.at_kill[0] == "fold1" and killer.at_kill[1] < EPOCHS - 1
    # the run finished every epoch of both networks ...
    for network in networks:
        assert network.metrics["epoch"] == EPOCHS - 1 and np.isfinite(network.metrics["val_loss"])
        # the kept epoch and its loss, carried through the restart (the last epoch's loss may be worse)
        assert 0 <= network.metrics["best_epoch"] <= EPOCHS - 1
        assert network.metrics["best_val"] <= network.metrics["val_loss"] + 1e-12
    # ... resuming from its checkpoint: each epoch reported once, in order (a restart from scratch would repeat the
    # first network, a restart of the network in progress its epoch 0)
    assert killer.reports == [(name, epoch) for name in ("fold0", "fold1") for epoch in range(EPOCHS)]
    assert killer.read()["current_report_index"] == 2 * EPOCHS
    # the two networks differ: each trained on its own fold
    assert any(not torch.equal(v, networks[1].state[k]) for k, v in networks[0].state.items())
    # each epoch was cut to train.max_examples_per_epoch (512, under half of the records, which are stored by
    # chromosome) and still reached every training chromosome: a seeded sample of all the records, not the first files
    for k, network in enumerate(networks):
        n_train = pq.ParquetDataset(fold_dirs(tiny_model.records, [k])[0]).read(columns=["target"]).num_rows
        m = network.metrics
        assert m["network"] == f"fold{k}"
        assert m["examples"] <= 512 < n_train / 2, (m["examples"], n_train)
        assert m["chroms_train"] >= 2
        assert m["chroms_unseen"] == [] and m["chroms_seen"] == m["chroms_train"], m
    # the tiny bundle imputes every missing entry once
    _, result = previous
    n_missing, missing_pairs, n_genes = expected_missing(data)
    frame = read_output(result.out_dir)
    assert len(frame) == result.n_rows == n_missing + len(missing_pairs) * n_genes
    assert_keys_unique(frame)


def test_impute_killed_mid_write_leaves_the_previous_output(bundle, previous, data, tmp_path):
    import shutil

    import ray

    config, result = previous
    out = tmp_path / "predictions"  # a copy: the other tests keep the fixture's output as it is
    shutil.copytree(result.out_dir, out)
    before = _fingerprint(out)
    manifest = json.loads((out / "_manifest.json").read_text())
    address = ray.get_runtime_context().gcs_address
    # with every observed entry too and small batches, the write takes a while: the kill lands in the middle
    proc = subprocess.Popen(
        _cli("impute", "--config", str(data / "config.yaml"), "--model", str(bundle), "--out", str(out),
             "--include-observed", "--set", f"ray.address={address}", "--set", "impute.batch_size=40",
             "--set", "impute.predictors=1"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "GEXIMPUTE_LEASE_SECONDS": "3"},  # the dead run's lease expires soon after the kill
    )
    store = store_of(out)

    def staged() -> list[Path]:  # the run's own staging folder: named by host, pid and a random part
        return list(store.glob(f"staging-*-{proc.pid}-*"))

    _wait_for(lambda: any(f for d in staged() for f in d.glob("tissue=*/*.parquet")), proc, 300,
              "the first Parquet file in staging")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert staged(), "the run had already committed: the kill came too late"
    # the previous output is untouched and whole
    assert _fingerprint(out) == before
    assert json.loads((out / "_manifest.json").read_text()) == manifest
    frame = read_output(out)
    assert len(frame) == result.n_rows
    assert_keys_unique(frame)

    # the dead run's lease stops another writer until it expires; then the rerun takes over, cleans up after the
    # killed run and writes every row exactly once
    lease = store / "lease.json"
    assert json.loads(lease.read_text())["pid"] == proc.pid
    with pytest.raises(LeaseBusy, match="holds the lease"):
        Lease(lease).acquire()
    time.sleep(max(0.0, json.loads(lease.read_text())["expires"] - time.time()) + 0.2)
    again = impute(config, model=bundle, out_dir=out, include_observed=True)
    frame = read_output(out)
    _, missing_pairs, n_genes = expected_missing(data)
    n_samples = len(pd.read_csv(data / "samples.tsv", sep="\t"))
    assert len(frame) == again.n_rows == n_genes * (n_samples + len(missing_pairs))
    assert_keys_unique(frame)
    assert frame["observed"].notna().sum() > 0
    beside = [p.name for p in out.parent.iterdir() if f".{LOG_NAME}-" not in p.name]  # the killed CLI's log
    assert sorted(beside) == sorted([out.name, store.name])
    assert not list(store.glob("staging-*")) and resolve(out).parent == store


def test_nightly_killed_after_some_donors_is_finished_by_the_next_run(bundle, data, tmp_path):
    import ray

    # the killed run commits a donor at a time (its own --set below); the next one commits what is left at once
    config = nightly_config(data, bundle, tmp_path, "nightly.donors_per_commit=3", "nightly.lease_seconds=5")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    donors = [f"NEW-{i:03d}" for i in range(1, 4)]
    for i, donor in enumerate(donors):
        donor_vcf(data / "variants.vcf", f"SYN-D{i + 1:04d}", donor, inbox / f"{donor}.vcf")
    ledger = ledger_path(config)

    def recorded() -> list[str]:
        try:
            return sorted(json.loads(ledger.read_text())["donors"])
        except (FileNotFoundError, ValueError):
            return []

    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        _cli("nightly", "--config", str(data / "config.yaml"), "--run-date", "2026-02-01",
             "--set", f"output_dir={tmp_path}", "--set", f"nightly.inbox={inbox}",
             "--set", f"impute.model_dir={bundle}", "--set", "nightly.donors_per_commit=1",
             "--set", "nightly.lease_seconds=5", "--set", f"ray.address={address}"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _wait_for(lambda: len(recorded()) >= 1, proc, 300, "the first donor in the ledger")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = recorded()
    assert 1 <= len(first) < len(donors), f"the kill came too late: {first}"
    assert lock_path(config).exists()  # the dead run's lease is still there, and holds until it expires
    with pytest.raises(LeaseBusy, match="another nightly run holds the lease"):
        nightly(config, run_date="2026-02-02")
    time.sleep(max(0.0, json.loads(lock_path(config).read_text())["expires"] - time.time()) + 0.2)

    result = nightly(config, run_date="2026-02-02")  # a new pod (host) needs no pid or host check
    # the rest (a donor committed just before the kill but not yet in the ledger is recovered, not redone)
    assert result.done and set(result.done) <= set(donors) - set(first)
    assert not lock_path(config).exists()
    frame = read_nightly(output_root(config))
    genes = len(pd.read_csv(data / "expression.gct", sep="\t", skiprows=2))
    n_tissues = pd.read_csv(data / "samples.tsv", sep="\t")["tissue"].nunique()
    assert frame.groupby("donor_id").size().to_dict() == {d: genes * n_tissues for d in donors}
    assert_keys_unique(frame)
    assert recorded() == donors
    # and once more: nothing left to do
    assert nightly(config, run_date="2026-02-03").done == []


def test_unwritable_output_folder_is_a_clear_error(bundle, previous, tmp_path):
    config, result = previous
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        writable = os.access(locked, os.W_OK)  # root may write anywhere
        # a folder nobody may create anything in, root included
        out = (Path("/sys/fs/geximpute-test") if writable else locked) / "predictions"
        with pytest.raises(OutputError) as caught:
            impute(config, model=bundle, out_dir=out)
        message = str(caught.value)
        assert str(out) in message and "Nothing was committed" in message
        assert not out.exists()
    finally:
        locked.chmod(stat.S_IRWXU)
    assert sorted(p.name for p in locked.iterdir()) == []
    assert len(read_output(result.out_dir)) == result.n_rows


def test_no_room_for_the_runs_matrix_is_a_clear_error_and_leaves_nothing(bundle, previous, monkeypatch):
    """A file system without room for the run's matrix beside the output: refused before it is written, naming
    the folder and what it needs; the previous output untouched, the matrix's folder removed."""
    import collections
    import shutil

    from geximpute.io import matrixfile

    config, result = previous
    out = result.out_dir
    before, version = _fingerprint(out), resolve(out)
    real = shutil.disk_usage

    def full(path):  # the output's file system, as full as can be
        usage = real(path)
        return collections.namedtuple("usage", "total used free")(usage.total, usage.total, 0)

    monkeypatch.setattr(matrixfile.shutil, "disk_usage", full)
    with pytest.raises(OutputError) as caught:
        impute(config, model=bundle, out_dir=out)
    message = str(caught.value)
    assert "expression matrix" in message and "ENOSPC" in message and "GiB" in message and str(out) in message
    assert not list(out.parent.glob(f".{out.name}.matrix-*"))
    assert resolve(out) == version and _fingerprint(out) == before


def test_disk_full_while_writing_commits_nothing(bundle, previous, monkeypatch):
    import geximpute.steps.impute as impute_module

    config, result = previous
    out = result.out_dir
    before, version = _fingerprint(out), resolve(out)
    real_write = impute_module.write_predictions

    def full_disk(dataset, folder: Path, num_cpus: float) -> None:
        real_write(dataset, folder, num_cpus)  # the files are there, half a run's worth as far as anyone knows
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "tissue=x" / "part-0.parquet"))

    monkeypatch.setattr(impute_module, "write_predictions", full_disk)
    with pytest.raises(OutputError, match="No space left on device") as caught:
        impute(config, model=bundle, out_dir=out, include_observed=True)  # a different run: it would replace
    assert str(out) in str(caught.value)
    assert _fingerprint(out) == before and resolve(out) == version
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, store_of(out).name])
    assert sorted(p.name for p in store_of(out).iterdir()) == [version.name]  # no staging, no lease left
    frame = pads.dataset(out, format="parquet", partitioning="hive").to_table().to_pandas()
    assert len(frame) == result.n_rows
    assert_keys_unique(frame)

"""A Ray worker whose geximpute is not its driver's code stops at import, naming both (issue: the tree changed under
a running evaluation and a worker failed with a ``KeyError`` far from the cause)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from geximpute import code_version


def test_the_fingerprint_follows_the_sources(tmp_path):
    """The same sources in a wheel's layout (``geximpute.jobs`` inside the package) and in a checkout's (``jobs/``
    beside ``engine/``) are the same code; an edit anywhere, ``jobs/`` included, is other code."""
    import geximpute.jobs

    jobs = Path(geximpute.jobs.__file__).parent
    copy = tmp_path / "geximpute"
    shutil.copytree(code_version.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(jobs, copy / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    assert code_version.fingerprint(copy) == code_version.THIS_PROCESS  # the same files elsewhere: the same code
    module = copy / "fit" / "train.py"
    module.write_text(module.read_text() + "\n# edited\n")
    assert code_version.fingerprint(copy) != code_version.THIS_PROCESS
    checkout = tmp_path / "checkout"
    shutil.copytree(code_version.PACKAGE, checkout / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(jobs, checkout / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    assert code_version.fingerprint(checkout / "engine") == code_version.THIS_PROCESS
    entry = sorted((checkout / "jobs").glob("*.py"))[-1]
    entry.write_text(entry.read_text() + "\n# edited\n")
    assert code_version.fingerprint(checkout / "engine") != code_version.THIS_PROCESS


def test_a_driver_gives_its_fingerprint_to_its_workers(ray_local):
    import os

    import ray

    # a worker of the local Ray inherits the driver's fingerprint, imports geximpute, checks it and runs
    seen = ray.get(ray.remote(lambda: (os.environ.get(code_version.ENV), code_version.fingerprint())).remote())
    assert seen == (code_version.THIS_PROCESS, code_version.THIS_PROCESS)
    assert code_version.ENV not in os.environ  # only Ray's processes carry it, not what this process starts later
    assert code_version.runtime_env() == {"env_vars": {code_version.ENV: code_version.THIS_PROCESS}}  # for a cluster


def test_a_worker_with_other_code_stops_naming_both(ray_local):
    import ray

    other = "0" * 16  # what a driver started before an upgrade or an edit would carry
    task = ray.remote(code_version.fingerprint).options(
        runtime_env={"env_vars": {code_version.ENV: other}}, max_retries=0
    )
    with pytest.raises(Exception) as caught:
        ray.get(task.remote())
    message = str(caught.value)
    assert "not the code the Ray job's driver started with" in message
    assert other in message and code_version.THIS_PROCESS in message


def test_outside_a_job_nothing_is_checked(monkeypatch):
    monkeypatch.delenv(code_version.ENV, raising=False)
    code_version.check_driver_code()
    monkeypatch.setenv(code_version.ENV, code_version.THIS_PROCESS)
    code_version.check_driver_code()
    monkeypatch.setenv(code_version.ENV, "f" * 16)
    with pytest.raises(code_version.CodeMismatchError, match="fingerprint f{16}"):
        code_version.check_driver_code()


def test_a_manifest_names_the_code_and_libraries_the_run_started_with(monkeypatch):
    """A run of hours writes its manifest at the end: a checkout switched to another commit, or a library upgraded
    meanwhile, was recorded although the process ran what it had imported."""
    from geximpute.runtime import provenance

    first = provenance.versions()
    monkeypatch.setattr(provenance.metadata, "version", lambda dist: "99.0")
    monkeypatch.setattr(provenance, "source_commit", lambda: "0123456789ab")
    assert provenance.versions() == first
    provenance.versions()["torch"] = "edited"  # each caller gets its own copy
    assert provenance.versions() == first

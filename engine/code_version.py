"""The engine's code as this process loaded it, and a check that Ray's workers run the driver's code.

A Ray job's workers import geximpute when their first task or actor arrives, which can be long after the driver
started. If the package changes in between (upgraded with pip, a checkout edited or switched to another commit, or
the nodes of a cluster holding different versions), the driver and its workers run different code, and what fails
is far from the cause: a missing config key, a changed record layout or a model that loads with other shapes.
The driver's fingerprint travels to every worker of its job in an environment variable (:data:`ENV`): a local Ray
that the driver starts inherits it from the driver's environment (:func:`exported_for_local_ray`); a driver that joins a
cluster gives it in the job's runtime environment (:func:`runtime_env`; both by
:func:`geximpute.runtime.raytools.ensure_ray`). A worker whose own code differs stops at ``import geximpute`` with
:class:`CodeMismatchError`, naming both. (A runtime environment on a local Ray would cost each new worker about a
second through Ray's runtime-env agent; the inherited variable costs nothing.)

The fingerprint is a hash of the package's Python sources as read when the package is imported: the same files
installed in two places agree; an edited file, another commit or another version differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

#: the environment variable that carries the driver's fingerprint to the workers of its Ray job
ENV = "GEXIMPUTE_DRIVER_CODE"

#: the package's directory (``geximpute`` as installed; ``engine/`` in a checkout)
PACKAGE = Path(__file__).resolve().parent


class CodeMismatchError(ImportError):
    """A Ray worker's geximpute differs from the code its job's driver started with."""


def fingerprint(root: Path = PACKAGE) -> str:
    """A short hash of every ``*.py`` file of the package at ``root``: its path relative to the package and its
    bytes. ``geximpute.jobs`` counts as ``jobs/`` in both layouts: inside the package as a wheel installs it, the
    ``jobs/`` folder beside ``engine/`` in a checkout (the same sources hashed differently made a wheel's workers
    refuse an editable checkout's driver of the same commit, and an edit to ``jobs/`` in a checkout went unseen)."""
    files = [(path.relative_to(root).as_posix(), path) for path in root.rglob("*.py")]
    jobs = root.parent / "jobs"
    if not (root / "jobs").is_dir() and (jobs / "__init__.py").is_file():
        files += [("jobs/" + path.relative_to(jobs).as_posix(), path) for path in jobs.rglob("*.py")]
    digest = hashlib.blake2b(digest_size=8)
    for name, path in sorted(files):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


#: the fingerprint of the code this process imported (taken once, when geximpute is first imported)
THIS_PROCESS = fingerprint()


def runtime_env() -> dict:
    """The runtime environment a driver that joins a cluster gives its job, so that each worker checks its code."""
    return {"env_vars": {ENV: THIS_PROCESS}}


@contextlib.contextmanager
def exported_for_local_ray() -> Iterator[None]:
    """Around the ``ray.init`` that starts a local Ray: the fingerprint in this process's environment, which Ray's
    processes (and so every worker of the local cluster) inherit; taken out again after, so that other processes
    this one starts later (a ``ray start``, a command of another install) do not carry it."""
    before = os.environ.get(ENV)
    os.environ[ENV] = THIS_PROCESS
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def check_driver_code() -> None:
    """In a worker of a Ray job started by a geximpute driver: stop unless this process's code is the driver's.

    Raises:
        CodeMismatchError: the fingerprints differ; the message says where this process's package lives and what to
            do. Outside such a worker (no :data:`ENV` set) it does nothing.
    """
    expected = os.environ.get(ENV)
    if expected and expected != THIS_PROCESS:
        raise CodeMismatchError(
            f"this process (pid {os.getpid()} on {socket.gethostname()}) imports geximpute from {PACKAGE}, whose code "
            f"(fingerprint {THIS_PROCESS}) is not the code the Ray job's driver started with (fingerprint {expected}): "
            "geximpute was upgraded or edited while the job ran, or the cluster's nodes hold different versions of "
            "it. Start the job again; on a cluster, install the same geximpute on every node (or ship it in the "
            "job's runtime_env)."
        )

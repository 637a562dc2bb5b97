"""Outputs that never lose data: leases, staging folders and commits by one atomic pointer switch.

Every folder the engine writes (prepare's records, a model bundle, impute's predictions, evaluate's and
variant-effects' results, each nightly partition) goes through :func:`staged_output`. Beside the output ``<out>``::

    <out>                                   a symbolic link to the committed version (relative), the pointer
    .<out>.geximpute/                       the output's store, on the same file system as <out>
        lease.json                          the writer's lease: owner, host, pid and an expiry time, renewed
        staging-<host>-<pid>-<random>/      a run in progress (named by run, never reused)
        v-<utc time>-<host>-<pid>-<random>/ committed versions; the newest is the one <out> names
            .geximpute.json                 the marker: step, version, commit time (what makes a folder ours)

The commit protocol (each step is a fault-injection point, see :func:`fault_point`)::

    write into staging -> "written"
    marker, permissions, fsync of every file and folder -> "synced"
    rename staging to v-... (atomic), fsync of the store -> "versioned"
    the lease is checked, a new link renamed onto <out> (atomic), fsync of <out>'s folder -> "linked"
    versions superseded more than ``keep_seconds`` ago are removed -> "pruned"

A reader that opens ``<out>`` sees the old version or the new one, complete, never a mix and never nothing; a
reader that resolved ``<out>`` (:func:`resolve`) keeps its version for ``keep_seconds`` after it was superseded. A
run killed at any point leaves the previous version readable; what it left (a staging folder, a version never
linked) is removed by a later run, once the lease of the dead run has expired.

``<out>`` is replaced only when it is ours (a link into its store, a folder holding our marker or manifest, or an
empty folder) and was written by the same step; anything else (``--out /data``, the config's ``output_dir``, a
bundle given as an impute output) is refused unless ``force``.

Leases (:class:`Lease`) replace pid files: the holder renews the expiry time written inside the lease from a
heartbeat thread; anyone, on any host, may take over a lease whose expiry time has passed, without comparing host
names or process ids. The nightly lock is such a lease; so is the lease of every output above.

Settings (environment): ``GEXIMPUTE_HOST`` (the host name written in leases and run names; default the machine's),
``GEXIMPUTE_LEASE_SECONDS`` (a lease's time to live, default 600; renewed every third of it),
``GEXIMPUTE_KEEP_SECONDS`` (how long a superseded version is kept for its readers, default 3600).
Files and folders of a committed output are made unreadable to others (mode ``o-rwx``), whatever the umask of the
processes that wrote them, since they hold per-donor genomic data.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import glob
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from geximpute.config import OUTPUT_STORE_SUFFIX
from geximpute.errors import GeximputeError

log = logging.getLogger(__name__)

MARKER = ".geximpute.json"
SUPERSEDED = ".geximpute-superseded"
MANIFESTS = ("_manifest.json", "manifest.json")
STORE_SUFFIX = OUTPUT_STORE_SUFFIX
#: the points of the commit protocol, in order, where :func:`fault_point` may kill the process in fault tests
COMMIT_POINTS = ("written", "synced", "versioned", "linked", "pruned")
FAULT_ENV = "GEXIMPUTE_KILL_AT"
#: permission bits removed from every committed file and folder (others get nothing; owner and group keep theirs)
PRIVATE_MASK = stat.S_IRWXO


class OutputRefused(GeximputeError):
    """The output path names something that is not an earlier output of this step."""


class LeaseBusy(GeximputeError):
    """Another run holds a lease that has not expired."""


class CommitNotSynced(GeximputeError):
    """A commit made (the output switched to the new version) whose folder could not be synced to disk: raised where
    the caller asked for a durable commit, so that it records nothing as done that a power loss could take back."""


class LeaseLost(GeximputeError):
    """A run's lease expired or was taken over before it could commit; nothing was committed."""


# Settings -----------------------------------------------------------------------------------------------------


def host_name() -> str:
    """The host written in leases and run names: ``$GEXIMPUTE_HOST`` or the machine's host name."""
    return os.environ.get("GEXIMPUTE_HOST") or socket.gethostname()


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise GeximputeError(f"environment variable {name} has value {raw!r}; expected a number of seconds") from None
    if value < 0:
        raise GeximputeError(f"environment variable {name} has value {raw!r}; expected a number of seconds >= 0")
    return value


def lease_seconds() -> float:
    """A lease's time to live: ``$GEXIMPUTE_LEASE_SECONDS`` or 600."""
    return _env_seconds("GEXIMPUTE_LEASE_SECONDS", 600.0)


def keep_seconds() -> float:
    """How long a superseded version is kept: ``$GEXIMPUTE_KEEP_SECONDS`` or 3600."""
    return _env_seconds("GEXIMPUTE_KEEP_SECONDS", 3600.0)


def run_tag() -> str:
    """A name unique to this run: ``<host>-<pid>-<random>`` (the host made safe for a file name)."""
    host = re.sub(r"[^A-Za-z0-9_.]+", "_", host_name())[:64] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def fault_point(name: str) -> None:
    """Kill this process (SIGKILL, as a node failure would) when ``$GEXIMPUTE_KILL_AT`` names this point.

    The seam through which the fault tests stop a run between two steps of the commit protocol.
    """
    if os.environ.get(FAULT_ENV) == name:
        log.warning("fault injection: killing the process at %r", name)
        os.kill(os.getpid(), signal.SIGKILL)


# Durable files ------------------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that the names created or renamed in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (folders after their contents), and ``root`` itself."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def make_private(root: Path) -> None:
    """Remove every permission of others from the files and folders under ``root`` (not following links)."""
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode) and mode & PRIVATE_MASK:
                os.chmod(path, stat.S_IMODE(mode) & ~PRIVATE_MASK)
    mode = os.stat(root).st_mode
    if mode & PRIVATE_MASK:
        os.chmod(root, stat.S_IMODE(mode) & ~PRIVATE_MASK)


def write_durable(path: Path, text: str, mode: int = 0o640) -> None:
    """Write a small file atomically and durably: a unique temporary file beside it, fsynced, renamed onto it,
    the folder fsynced. A reader sees the old content or the new, never an empty or torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{run_tag()}")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_json(path: Path, what: str) -> Any:
    """A JSON file written by the engine; an empty or torn one is an error naming the file and what to do."""
    path = Path(path)
    text = path.read_bytes().decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise GeximputeError(
            f"{path}: the {what} is {'empty' if not text.strip() else 'not valid JSON'} ({exc}); it was torn by a "
            f"crash of a writer that did not sync it. Move it aside and run again"
        ) from exc


# Leases -------------------------------------------------------------------------------------------------------

#: how long a renewal waits for a run that linked its lease in the renewal's instant to give the name back
RENEW_WAIT_SECONDS = 2.0


def _read_lease(path: Path) -> tuple[str, dict | None]:
    """(raw text, parsed holder or None when empty or torn) of a lease file; undecodable bytes (blocks of a torn
    write) read as torn, not as an escaping UnicodeDecodeError.

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    text = path.read_bytes().decode("utf-8", errors="replace")
    try:
        holder = json.loads(text)
    except ValueError:
        return text, None
    return text, holder if isinstance(holder, dict) else None


class Lease:
    """An exclusive lease on a file: valid across hosts, expiring unless its holder renews it.

    The lease file holds ``{owner, host, pid, acquired, renewed, expires, ttl}`` (``expires`` in seconds since the
    epoch). It is created whole (written to a unique file, fsynced, hard-linked to its name, which fails when the name
    exists); one whose ``expires`` has passed (or that is torn and older
    than a lease's time to live) is taken over by whoever finds it first, on any host: the taker renames it aside
    (one rename wins), checks that it is the lease it judged expired, and creates its own. While held, a daemon
    thread renews ``expires`` every third of the time to live; :meth:`check` tells a committer that it still holds
    the lease.

    Args:
        path: the lease file.
        what: what the lease protects, in error messages (``"nightly run"``, ``"output"``).
        ttl: time to live in seconds (default :func:`lease_seconds`).
    """

    def __init__(self, path: str | Path, what: str = "output", ttl: float | None = None) -> None:
        self.path = Path(path)
        self.what = what
        self.ttl = lease_seconds() if ttl is None else float(ttl)
        self.owner = run_tag()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False
        # the heartbeat's renewal and the committing thread's check or release never interleave: a check between a
        # renewal's rename and its link found no lease (or put the set-aside one back, failing the renewal)
        self._lock = threading.RLock()

    # reading ---------------------------------------------------------------------------------------------------

    def read(self) -> tuple[str, dict | None]:
        """(raw text, parsed holder or None when absent, empty or torn)."""
        try:
            return _read_lease(self.path)
        except FileNotFoundError:
            return "", None

    def _expired(self, text: str, holder: dict | None, path: Path | None = None) -> bool:
        """Whether the lease read from ``path`` (default: the lease file) has expired; one without a readable
        expiry is judged by that file's age."""
        path = self.path if path is None else path
        if holder is None:  # torn (a holder died while writing it) unless it is being written right now
            try:
                return time.time() - path.stat().st_mtime > min(self.ttl, 30.0)
            except FileNotFoundError:
                return True
        try:
            return float(holder["expires"]) < time.time()
        except (KeyError, TypeError, ValueError):  # a pid lock of the previous protocol: judged by its age
            try:
                return time.time() - path.stat().st_mtime > self.ttl
            except FileNotFoundError:
                return True

    def _content(self, acquired: str | None = None) -> str:
        now = time.time()
        return json.dumps({
            "owner": self.owner, "host": host_name(), "pid": os.getpid(),
            "acquired": acquired or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "renewed": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds"),
            "expires": now + self.ttl, "ttl": self.ttl,
        })

    # taking and giving back ------------------------------------------------------------------------------------

    def acquire_after_the_dead(self, poll: float = 5.0) -> Lease:
        """:meth:`acquire`, waiting out a holder that does not renew its lease (it died: a killed process, a replaced
        pod; its lease expires within a time to live and is taken over then) instead of refusing at once; a holder
        that renews it while this waits is alive: :class:`LeaseBusy`. For a step whose retry after a crash should
        resume, not fail (`train`, whose Ray Train run resumes in its folder).

        Raises:
            LeaseBusy: a live holder (its lease renewed while this waited).
        """
        seen = None
        while True:
            try:
                return self.acquire()
            except LeaseBusy:
                text, holder = self.read()
                if seen is not None and text != seen:
                    raise  # renewed (or taken by another) meanwhile: a live run holds it
                if seen is None:
                    expires = (holder or {}).get("expires")
                    left = f"{max(float(expires) - time.time(), 0):.0f} s" if isinstance(expires, (int, float)) \
                        else "up to a lease's time to live"
                    log.warning("%s: held by %s; waiting for it to be renewed (a live run: refused) or to expire "
                                "(a run that died: taken over), %s", self.path,
                                "a run being written" if holder is None else
                                f"{holder.get('owner', '?')} (pid {holder.get('pid', '?')} on "
                                f"{holder.get('host', '?')})", left)
                seen = text
                time.sleep(poll)

    def acquire(self) -> Lease:
        """Take the lease, taking over an expired one; start the heartbeat.

        Raises:
            LeaseBusy: a holder's lease has not expired.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            content = self._content()
            tmp = self.path.with_name(f".{self.path.name}.new-{self.owner}")
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
            with os.fdopen(fd, "w") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
            try:  # a hard link is created whole or not at all: the lease is never seen empty
                os.link(tmp, self.path)
            except FileExistsError:
                text, holder = self.read()
                if not self._expired(text, holder):
                    raise LeaseBusy(self._busy_message(holder)) from None
                self._take_over(text, holder)
                continue
            finally:
                tmp.unlink(missing_ok=True)
            renewing = self._renewing_holder()
            if renewing is not None:
                # the name was free only because its holder is renewing it (between its rename aside and its link):
                # give it back, so that the live holder's renewal lands and this run is refused
                self._give_back()
                raise LeaseBusy(self._busy_message(renewing[0]))
            fsync_dir(self.path.parent)
            self._acquired = json.loads(content)["acquired"]
            self._stop.clear()
            self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.path.name}", daemon=True)
            self._thread.start()
            return self
        raise LeaseBusy(f"{self.path}: could not take the {self.what} lease (other runs keep taking it); try again")

    def _renewing_holder(self) -> tuple[dict | None] | None:
        """(holder,) of a live lease that another run has set aside to renew it (:meth:`renew`; the holder None
        where it does not parse), or None; a set-aside lease that has expired (its holder died renewing it, or it
        is torn and older than a lease's time to live, judged by its own age) is removed."""
        for aside in self.path.parent.glob(f"{glob.escape(self.path.name)}.renew-*"):
            if aside == self._aside():
                continue
            try:
                text, holder = _read_lease(aside)
            except FileNotFoundError:  # renewed meanwhile
                continue
            if not self._expired(text, holder, aside):
                return (holder,)
            with contextlib.suppress(OSError):
                aside.unlink()
        return None

    def _give_back(self) -> None:
        """Remove this run's lease from the name if it is still this run's (set aside, checked, unlinked; another
        run's found there goes back)."""
        aside = self._aside()
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        _, again = _read_lease(aside)
        if again is not None and again.get("owner") == self.owner:
            aside.unlink(missing_ok=True)
        else:
            self._restore_aside()

    def _busy_message(self, holder: dict | None) -> str:
        if holder is None:
            who = "a run that is writing it now"
        else:
            until = dt.datetime.fromtimestamp(float(holder.get("expires", 0)), dt.UTC)
            who = (f"{holder.get('owner', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}), "
                   f"lease valid until {until.isoformat(timespec='seconds')} unless renewed")
        return (f"{self.path}: another {self.what} holds the lease: {who}; wait for it to finish. A run that died "
                f"loses its lease when it expires, and the next run takes over")

    def _take_over(self, text: str, holder: dict | None) -> None:
        aside = self.path.with_name(f"{self.path.name}.expired-{self.owner}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # someone else took it over first
            return
        if _read_lease(aside)[0] != text:  # a holder renewed (or another run took it) in between: give it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink()
            raise LeaseBusy(f"{self.path}: another {self.what} took the lease; wait for it to finish")
        aside.unlink()
        log.warning("%s: took over the expired lease of %s", self.path,
                    f"{holder.get('owner')} (expired {holder.get('expires')})" if holder else "a torn lease file")

    def _aside(self) -> Path:
        """Where :meth:`renew` sets the lease aside while it swaps it."""
        return self.path.with_name(f"{self.path.name}.renew-{self.owner}")

    def _restore_aside(self) -> None:
        """Put back a lease that a renewal set aside and could not put back (an I/O error linking it): this run's
        own, or another run's it found there. Where the name is taken meanwhile, the set-aside copy is dropped; an
        error again leaves it for the next call (every renewal, check and release tries)."""
        aside = self._aside()
        if not os.path.lexists(aside):
            return
        try:
            os.link(aside, self.path)
        except FileExistsError:  # the name is another run's now
            pass
        except OSError as exc:
            log.error("%s: could not put the set-aside lease back (%s); tried again at the next renewal", self.path,
                      exc)
            return
        aside.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLost as exc:
                log.error("%s", exc)
                with self._lock, contextlib.suppress(OSError):
                    self._restore_aside()  # another run's lease, set aside by this renewal, goes back
                return
            except OSError as exc:  # a transient error of the volume: the next beat tries again
                log.warning("%s: could not renew the lease: %s", self.path, exc)

    def renew(self) -> None:
        """Push the expiry time forward; raises :class:`LeaseLost` when the lease is no longer ours.

        A compare-and-swap made of a rename and a hard link, as a takeover is: the lease file is renamed aside (one
        rename wins), its content checked to be this run's, and the renewed lease created at the name by a hard
        link, which fails when another run created one meanwhile. A read, a check and a write (what this did
        before) let a holder paused between its check and its write overwrite the lease of a run that had taken it
        over in between: two runs then held it. Here a takeover that lands first is put back and this run has lost.
        A run starting while the name is free (between the rename and the link) finds this run's set-aside lease
        live, gives the name back and is refused (:meth:`acquire`), while this renewal waits up to
        :data:`RENEW_WAIT_SECONDS` for the name; a starter that does not give it back keeps it and this run has
        lost. Either way one holder.
        """
        with self._lock:
            self._renew()

    def _renew(self) -> None:
        aside = self._aside()
        self._restore_aside()
        # the renewed lease written and synced before the name is set aside: the name stays free only between a
        # rename and a link, never for a write and an fsync (milliseconds on a network volume), so a run starting
        # then does not find it free
        tmp = self.path.with_name(f".{self.path.name}.new-{self.owner}")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(self._content(self._acquired))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                self._lost = True
                raise LeaseLost(f"{self.path}: the {self.what} lease of {self.owner} is gone (removed, or taken over "
                                "and given back); this run stops without committing") from None
            self._swap(aside, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.path.parent)

    def _swap(self, aside: Path, renewed: Path) -> None:
        """The second half of :meth:`renew`, the lease set aside at ``aside``: link ``renewed`` at the name if the
        set-aside lease is this run's; otherwise, or on any error but another run's lease at the name, the name
        gets back what it held. An error putting it back leaves ``aside`` for the next renewal to put back."""
        restore = True
        try:
            try:
                _, holder = _read_lease(aside)
            except FileNotFoundError:  # removed as expired by a starting run while this renewal was paused
                restore = False
                self._lost = True
                raise LeaseLost(f"{self.path}: the {self.what} lease of {self.owner} expired while it was being "
                                "renewed and another run took it; this run stops without committing") from None
            if not isinstance(holder, dict) or holder.get("owner") != self.owner:
                self._lost = True
                raise LeaseLost(f"{self.path}: the {self.what} lease of {self.owner} was taken over by "
                                f"{holder.get('owner') if isinstance(holder, dict) else 'nobody'}; this run stops "
                                "without committing")
            if not self._link_renewed(renewed):  # the name is another run's: nothing to put back
                restore = False
                self._lost = True
                raise LeaseLost(f"{self.path}: another run took the {self.what} lease while {self.owner} renewed "
                                "it; this run stops without committing")
            restore = False  # renewed
        finally:
            if restore:  # not renewed (another run's lease set aside, or an error): the name gets back what it held
                self._restore_aside()
            else:
                aside.unlink(missing_ok=True)

    def _link_renewed(self, renewed: Path, wait: float = RENEW_WAIT_SECONDS) -> bool:
        """Link the renewed lease at the name; where a starting run linked its own there meanwhile, wait up to
        ``wait`` seconds for it to see this renewal's set-aside lease and give the name back (:meth:`acquire`).
        Returns False where the name stays another run's."""
        deadline = time.monotonic() + wait
        while True:
            try:
                os.link(renewed, self.path)
                return True
            except FileExistsError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this run holds the lease and it has not expired."""
        with self._lock:
            self._restore_aside()
            _, holder = self.read()
        if self._lost or holder is None or holder.get("owner") != self.owner:
            raise LeaseLost(f"{self.path}: this run ({self.owner}) no longer holds the {self.what} lease (held by "
                            f"{holder.get('owner') if holder else 'nobody'}); nothing was committed")
        if float(holder.get("expires", 0)) < time.time():
            raise LeaseLost(f"{self.path}: the {self.what} lease of this run ({self.owner}) expired before the "
                            f"commit (renewals failed or the process was paused); nothing was committed")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._restore_aside()
            _, holder = self.read()
            if holder is None or holder.get("owner") != self.owner:
                return
            # removed only if it is still this run's as it goes: a lease that expired here can be taken over between
            # the read and an unlink, which would remove the new holder's
            self._give_back()

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# Ownership ----------------------------------------------------------------------------------------------------


#: what the engine names in a store (a version, a staging folder, the lease and its temporary and set-aside
#: files): only these are ever removed from it, and a store holding anything else is not removed as a whole
_TAG = r"[A-Za-z0-9_.]+-\d+-[0-9a-f]{8}"
STORE_ENTRY = re.compile(rf"v-\d{{8}}T\d{{6}}-(?:replaced-)?{_TAG}|staging-{_TAG}|lease\.json"
                         rf"|lease\.json\.(?:expired|renew)-{_TAG}|\.lease\.json\.(?:new|tmp)-{_TAG}")


def foreign_entries(store: Path) -> list[str]:
    """The entries of ``store`` that the engine did not name (sorted; empty for a store of ours)."""
    try:
        return sorted(p.name for p in store.iterdir() if not STORE_ENTRY.fullmatch(p.name))
    except FileNotFoundError:
        return []


def store_of(target: Path) -> Path:
    """The default store of ``target``: ``.<name>.geximpute`` beside it."""
    target = Path(target)
    return target.parent / f".{target.name}{STORE_SUFFIX}"


def marker_of(folder: Path) -> dict | None:
    """What makes ``folder`` a geximpute output: its marker, or an engine manifest (outputs written before the
    marker existed). None when neither is there."""
    folder = Path(folder)
    try:
        data = json.loads((folder / MARKER).read_text())
        if isinstance(data, dict) and data.get("format") == "geximpute-output":
            return data
    except (OSError, ValueError):
        pass
    for name in MANIFESTS:
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "geximpute" in (data.get("versions") or {}):
            return {"format": "geximpute-output", "step": data.get("step"), "legacy": True}
    return None


def check_replaceable(target: Path, step: str, store: Path, force: bool = False) -> None:
    """Refuse to replace ``target`` unless it is absent, an empty folder or an earlier output of ``step``.

    Raises:
        OutputRefused: ``target`` is another file or folder (``force`` replaces it: a folder is kept in the store
            as a superseded version for ``keep_seconds``, then removed).
    """
    target = Path(target)
    if not os.path.lexists(target):
        return
    hint = ("choose an output path of its own (absent, empty, or an earlier output of this step), or pass --force "
            "to replace it")
    if target.is_symlink():
        resolved = Path(os.path.realpath(target))
        if resolved.parent != Path(os.path.realpath(store)):
            if force:
                return
            raise OutputRefused(f"{target}: is a link to {resolved}, not a version of this output; {hint}")
        marker = marker_of(resolved) or {}
    elif target.is_dir():
        if not any(target.iterdir()):
            return
        marker = marker_of(target)
        if marker is None:
            if force:
                return
            raise OutputRefused(
                f"{target}: is a folder that is not a geximpute output (no {MARKER} or manifest of ours in it); "
                f"refusing to replace it, which would delete what it holds; {hint}")
    else:
        if force:
            return
        raise OutputRefused(f"{target}: is a file, not a geximpute output folder; {hint}")
    found = marker.get("step")
    if found and found != step and not force:
        raise OutputRefused(f"{target}: holds the output of `{found}`, not of `{step}`; refusing to replace it; {hint}")


def resolve(target: str | Path) -> Path:
    """The committed version folder that ``target`` names now: a reader that reads through it keeps reading one
    version, complete, for ``keep_seconds`` after a newer one is committed."""
    return Path(os.path.realpath(target))


# Committing ---------------------------------------------------------------------------------------------------


_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _switch(target: Path, version: Path, tag: str) -> Path | None:
    """Point ``target`` at ``version`` in one atomic rename. Returns a folder that ``target`` was before (now in the
    store's care), if it was a real folder."""
    link = target.parent / f".{target.name}.link-{tag}"
    # relative between the real folders: ``..`` in a link names the parent of the folder it sits in, which is not
    # the textual parent where that folder is itself a link (a nightly root linked elsewhere, its store beside the
    # link: the partitions' links pointed at nothing)
    os.symlink(os.path.relpath(os.path.realpath(version), os.path.realpath(target.parent)), link)
    if target.is_dir() and not target.is_symlink():
        # a folder (written before the pointer layout, or forced): swapped for the link atomically where possible
        aside = version.parent / f"v-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-replaced-{tag}"
        if exchange(link, target):
            os.rename(link, aside)  # `link` now names the previous folder
        else:
            log.warning("%s: this file system cannot swap a folder for a link atomically; the output is absent for "
                        "the time of two renames", target)
            os.rename(target, aside)
            os.rename(link, target)
        return aside
    os.replace(link, target)
    return None


def _mark_superseded(store: Path, current: Path) -> None:
    for version in store.glob("v-*"):
        if version != current and version.is_dir() and not (version / SUPERSEDED).exists():
            try:
                (version / SUPERSEDED).touch()
            except OSError as exc:
                log.warning("%s: cannot mark as superseded: %s", version, exc)


def prune(store: Path, current: Path | None, keep: float | None = None) -> list[Path]:
    """Remove the versions of ``store`` superseded more than ``keep`` seconds ago (never ``current``).

    A version that is not current is marked superseded the first time a run sees it, and removed ``keep`` seconds
    after that, so a reader that resolved it has that long to finish.
    """
    keep = keep_seconds() if keep is None else keep
    removed = []
    now = time.time()
    for version in sorted(store.glob("v-*")):
        if current is not None and version.resolve() == current.resolve():
            continue
        if not STORE_ENTRY.fullmatch(version.name) or not version.is_dir() or version.is_symlink():
            continue  # not a version the engine wrote: never removed
        mark = version / SUPERSEDED
        try:
            since = mark.stat().st_mtime
        except FileNotFoundError:
            since = now
            try:
                mark.touch()
            except OSError:
                continue
        if now - since >= keep:
            shutil.rmtree(version, ignore_errors=True)
            removed.append(version)
    return removed


def clean_staging(store: Path, own: Path | None = None) -> None:
    """Remove the staging folders of ``store`` other than ``own``: called under the lease that protects them, so
    they belong to runs whose lease expired (dead, or stopped for longer than a lease lives)."""
    for path in store.glob("staging-*"):
        if (own is not None and path == own) or not STORE_ENTRY.fullmatch(path.name) or path.is_symlink():
            continue
        log.info("%s: removing the staging folder of a run that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)


def _clean_links(target: Path) -> None:
    """Remove temporary links that a run killed during :func:`_switch` left beside ``target``."""
    for path in target.parent.glob(f".{target.name}.link-*"):
        if path.is_symlink():
            path.unlink(missing_ok=True)


def new_staging(store: Path) -> Path:
    """A fresh staging folder in ``store``, named by host, pid and a random part."""
    store.mkdir(parents=True, exist_ok=True)
    staging = store / f"staging-{run_tag()}"
    staging.mkdir()
    return staging


def commit(staging: Path, target: Path, store: Path, *, step: str, lease: Lease | None = None,
           keep: float | None = None, extra: dict | None = None, force: bool = False, durable: bool = False) -> Path:
    """Make ``staging`` the committed version of ``target`` (the protocol of this module). Returns the version.

    ``target`` is checked again just before it is switched (:func:`check_replaceable`, ``force`` as the run was
    given it): a folder that was empty when the run started and that someone filled meanwhile is refused, not
    swapped into the store and pruned with what it holds.

    Raises:
        LeaseLost: ``lease`` is no longer held; the staging folder is left for the next holder to remove.
        OutputRefused: ``target`` is no longer replaceable; the new version stays in the store, unlinked.
        CommitNotSynced: with ``durable``, committed but its folder could not be synced to disk (without
            ``durable`` a warning says so and the commit stands).
    """
    fault_point("written")
    version = store / f"v-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{staging.name.removeprefix('staging-')}"
    marker = {"format": "geximpute-output", "step": step, "version": version.name, "host": host_name(),
              "pid": os.getpid(), "committed": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              **(extra or {})}
    (staging / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    make_private(staging)
    fsync_tree(staging)
    fault_point("synced")
    if lease is not None:
        lease.check()
    os.rename(staging, version)
    fsync_dir(store)
    fault_point("versioned")
    if lease is not None:
        lease.check()
    try:
        check_replaceable(target, step, store, force)
    except OutputRefused as exc:
        # the run is complete: say where, for the next run of this output prunes what it does not link
        raise OutputRefused(f"{exc}. This run's output is complete in {version}: move it out of {store} before "
                            "the next run of this output, which removes unlinked versions") from exc
    replaced = _switch(target, version, staging.name.removeprefix("staging-"))
    # committed: what fails from here on cannot undo it, and is said as such (not "nothing was committed")
    try:
        fsync_dir(target.parent)
        fault_point("linked")
        if replaced is not None:
            fsync_dir(store)
    except OSError as exc:
        if durable:
            raise CommitNotSynced(f"{target}: committed as {version.name}, but its folder could not be synced to "
                                  f"disk ({exc}); nothing records it as done (a power loss could take it back): the "
                                  f"next {step} run finds it committed, or makes it again") from exc
        log.warning("%s: committed as %s, but its folder could not be synced to disk (%s): the commit may not "
                    "survive a power loss", target, version.name, exc)
    _mark_superseded(store, version)
    prune(store, version, keep)
    fault_point("pruned")
    return version


@contextmanager
def staged_output(target: str | Path, *, step: str, force: bool = False, store: str | Path | None = None,
                  lease: Lease | None = None, keep: float | None = None, durable: bool = False) -> Iterator[Path]:
    """Write the folder ``target`` atomically: yields a staging folder, committed onto ``target`` on success.

    Takes the output's lease (unless the caller holds one that covers it, ``lease``), refuses a ``target`` that is
    not an earlier output of ``step`` (:func:`check_replaceable`), removes what dead runs left, and on success
    commits (:func:`commit`). A failure removes the staging folder and leaves the committed version as it was.

    Args:
        target: the output folder.
        step: the step writing it (recorded in the marker; an output of another step is not replaced).
        force: replace ``target`` even when it is not ours.
        store: where versions and staging live (default :func:`store_of`); on ``target``'s file system.
        lease: a lease the caller holds over this output (nightly's run lease); default: the output's own.
        keep: seconds a superseded version is kept (default :func:`keep_seconds`).
        durable: a commit whose folder cannot be synced to disk raises :class:`CommitNotSynced` instead of a
            warning (for a caller that records the commit elsewhere afterwards: nightly's ledger).

    Raises:
        OutputRefused: ``target`` is not ours. LeaseBusy: another run writes this output now.
    """
    target = Path(target).absolute()
    store = Path(store) if store is not None else store_of(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(target, step, store, force)
    own_lease = None
    if lease is None:
        store.mkdir(parents=True, exist_ok=True)
        own_lease = lease = Lease(store / "lease.json", what=f"`{step}` run on {target}").acquire()
    try:
        clean_staging(store)
        _clean_links(target)
        _restore_legacy(target)
        staging = new_staging(store)
        try:
            yield staging
            commit(staging, target, store, step=step, lease=lease, keep=keep, force=force, durable=durable)
        except CommitNotSynced:
            raise  # committed: the staging folder is the version now
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        if own_lease is not None:
            own_lease.release()


#: the file in a scratch folder naming the process that made it (:func:`scratch_folder`)
OWNER_FILE = "owner.json"


@contextmanager
def scratch_folder(target: str | Path, what: str = "scratch") -> Iterator[Path]:
    """A folder of this run's own beside ``target`` (``.<name>.<what>-<host>-<pid>-<random>``, on the output's file
    system, which every node of the cluster reads), removed when the block ends, however it ends.

    The folder holds :data:`OWNER_FILE`: the host, the pid, the machine's boot id, the pid namespace and the
    process's start time, renewed (its modification time) every quarter of a lease's time to live
    (:func:`lease_seconds`) while the run lasts. Before making it, the folders of the same name that dead runs left
    are removed: one of this host, boot and pid namespace whose process is gone or is another process now (a pid
    used again, after a container's restart); any other whose owner file was not renewed for two leases' time, or
    four of the renewal periods it records where its host has a longer lease (a pod that was replaced). A live
    run's folder is never removed, whichever host or container it runs in (another pid namespace's processes cannot
    be seen from here: its renewals tell). A folder without an owner file (an older version's) is judged by host
    and pid alone, on its own host only."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    me = _process_identity(os.getpid())
    prefix = f".{target.name}.{what}-"
    for path in target.parent.glob(f"{glob.escape(prefix)}*"):
        if path.is_dir() and _scratch_is_dead(path, path.name[len(prefix):], me):
            log.info("%s: removing what a run that did not finish left", path)
            shutil.rmtree(path, ignore_errors=True)
    folder = target.parent / f".{target.name}.{what}-{run_tag()}"
    folder.mkdir()
    owner = folder / OWNER_FILE
    stop = threading.Event()
    renewer = None
    try:
        owner.write_text(json.dumps({**me, "renew_seconds": lease_seconds() / 4}) + "\n")
        renewer = threading.Thread(target=_renew_owner, args=(owner, stop), name=f"scratch {folder.name}",
                                   daemon=True)
        renewer.start()
        yield folder
    finally:
        stop.set()
        if renewer is not None:
            renewer.join()
        shutil.rmtree(folder, ignore_errors=True)


def _renew_owner(owner: Path, stop: threading.Event) -> None:
    """Touch ``owner`` every quarter of a lease's time to live until ``stop``: the folder's run is alive."""
    while not stop.wait(lease_seconds() / 4):
        try:
            os.utime(owner)
        except OSError:  # the folder went (removed by the run's end, or by hand): nothing to renew
            return


def _process_identity(pid: int) -> dict[str, Any]:
    """What tells process ``pid`` of this host from any other: host tag, pid, boot id, pid namespace and start time
    (None where /proc does not say: another system than Linux)."""

    def read(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    try:
        namespace: int | None = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = None
    return {"host": run_tag().rsplit("-", 2)[0], "pid": pid, "boot_id": read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": namespace, "start": _start_time(pid)}


def _start_time(pid: int) -> int | None:
    """Process ``pid``'s start time in clock ticks since boot (None: no such process, or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22, after the command in parentheses (which may hold spaces)
    return int(stat.rsplit(")", 1)[1].split()[19])


def _scratch_is_dead(path: Path, tag: str, me: dict[str, Any]) -> bool:
    """Whether the scratch folder ``path`` (its name ending in the run tag ``tag``, ``<host>-<pid>-<random>``) was
    left by a run that is over (see :func:`scratch_folder`)."""
    try:
        host, pid_text, _ = tag.rsplit("-", 2)
        pid = int(pid_text)
    except ValueError:
        return False  # not named as this engine names them
    owner = path / OWNER_FILE
    try:
        recorded = json.loads(owner.read_text())
        renewed = owner.stat().st_mtime
    except FileNotFoundError:  # an older version's folder (or one made this instant): host and pid only
        return host == me["host"] and pid != me["pid"] and not _pid_alive(pid)
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict):
        return False
    same_system = all(recorded.get(k) == me[k] and me[k] is not None for k in ("host", "boot_id", "pid_ns"))
    if same_system and recorded.get("start") is not None:
        if recorded.get("pid") == me["pid"] and recorded.get("start") == me["start"]:
            return False  # this process's own
        owner_pid = int(recorded.get("pid", pid))
        return not _pid_alive(owner_pid) or _start_time(owner_pid) != recorded["start"]
    # stale after two of this host's leases, or four of the owner's renewal periods where it renews less often
    try:
        period = float(recorded.get("renew_seconds") or 0.0)
    except (TypeError, ValueError):
        period = 0.0
    return time.time() - renewed > max(2 * lease_seconds(), 4 * period)


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _restore_legacy(target: Path) -> None:
    """Tidy what the previous protocol (two renames, pid-named folders beside the output) left: if a run died
    between its renames, the previous output is put back; other leftovers older than a lease are removed."""
    # only what that protocol named (`.<name>.old-<pid>`, `.<name>.staging-<pid>`), and an old output only with our
    # marker in it: a user's `.<name>.old-backup` is never moved or removed
    legacy = re.compile(rf"\.{re.escape(target.name)}\.(old|staging)-\d+")
    for path in target.parent.glob(f".{glob.escape(target.name)}.old-*"):
        if not legacy.fullmatch(path.name) or not path.is_dir() or path.is_symlink() or marker_of(path) is None:
            continue
        if not os.path.lexists(target):
            log.warning("%s: restoring the previous output from %s (a run died while committing)", target, path)
            os.replace(path, target)
        elif time.time() - path.stat().st_mtime > lease_seconds():
            shutil.rmtree(path, ignore_errors=True)
    for path in target.parent.glob(f".{glob.escape(target.name)}.staging-*"):
        if not legacy.fullmatch(path.name) or not path.is_dir() or path.is_symlink():
            continue
        if time.time() - path.stat().st_mtime > lease_seconds():
            shutil.rmtree(path, ignore_errors=True)


def discard(target: str | Path, *, step: str) -> None:
    """Remove the output ``target`` of ``step`` as a whole: its link (or folder) and its store, under its lease.

    Raises:
        OutputRefused: ``target`` is not an output of ``step``. LeaseBusy: a run writes it now.
    """
    target = Path(target).absolute()
    store = store_of(target)
    if not os.path.lexists(target) and not store.exists():
        return
    check_replaceable(target, step, store)
    foreign = foreign_entries(store)
    if foreign:
        raise OutputRefused(f"{store}: holds {', '.join(foreign[:5])}, which this engine did not write; refusing to "
                            f"remove it with {target}'s versions (move them elsewhere first)")
    store.mkdir(parents=True, exist_ok=True)
    with Lease(store / "lease.json", what=f"`{step}` run on {target}"):
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        fsync_dir(target.parent)
        for path in store.iterdir():
            if path.name == "lease.json":
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    # the lease is released: the store is removed only while empty, so that a run that took the lease meanwhile
    # keeps what it began there (its lease and staging)
    with contextlib.suppress(OSError):
        store.rmdir()

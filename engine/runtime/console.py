"""What a person sees while a step runs: the engine's own lines and one progress display per stage.

A command line run opens a :func:`session`: file descriptors 1 and 2 of the process are pointed at a log file, so
that everything the engine did not write itself (Ray's Python and C++ logging, the output of Ray's worker processes
that Ray prints in the driver, Ray Data's progress logs, Python warnings, third-party libraries) lands there, while
the engine's log lines, its results (:func:`echo`) and the progress displays (:func:`stage`) go to the terminal the
command was started from. With ``verbose`` nothing is redirected and the log file receives the engine's lines only.

A stage shows ``name  done/total unit, rate, time left`` as a live ``tqdm`` bar on a terminal; where the output is
not a terminal (``CI`` set, ``ray job`` logs, a pipe) it prints one plain line every
``GEXIMPUTE_PROGRESS_SECONDS`` seconds (default 30) and one when the stage ends. Outside a session (library use,
tests) a stage displays nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from geximpute.runtime.raytools import progress_counter

#: the longest wait between two progress lines of a long stage away from a terminal (they double from 30 s up to it)
MAX_LINE_SECONDS = 600.0

#: name of the log file a command leaves in its output folder
#: "_" first, as for _manifest.json: Parquet readers of an output folder (pyarrow, Ray Data) skip it
LOG_NAME = "_geximpute.log"

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class _Session:
    out: TextIO  # the terminal's stdout (results)
    err: TextIO  # the terminal's stderr (engine lines, progress)
    interactive: bool
    log_path: Path | None
    verbose: bool
    redirected: bool
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: only warnings and errors on the terminal: progress lines go to the log alone (a nightly job run with -q
    #: printed a line per stage, where any output reads as an alert)
    quiet: bool = False
    #: stages shown and not closed yet: closed when the session ends (a stage made before its ``with``, or left
    #: by an error, kept its display thread redrawing over the error line, and raised once the session was gone)
    stages: list = field(default_factory=list)


_session: _Session | None = None


def interactive(stream: TextIO) -> bool:
    """True when ``stream`` is a terminal and the environment is not a CI runner (``CI`` unset or false)."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    try:
        return stream.isatty() and not ci
    except (AttributeError, ValueError):
        return False


def echo(*parts: Any, err: bool = False, end: str = "\n") -> None:
    """Print a result line to the terminal (stdout, or stderr with ``err``), even while fds 1 and 2 are redirected."""
    stream = (_session.err if err else _session.out) if _session else (sys.stderr if err else sys.stdout)
    with _session.lock if _session else _nolock():
        print(*parts, file=stream, end=end, flush=True)


@contextmanager
def _nolock() -> Iterator[None]:
    yield


class _EngineHandler(logging.Handler):
    """The engine's log lines on the terminal, short form, written between progress bar redraws.

    Below WARNING, only the step-level loggers (``geximpute.steps``, ``geximpute.apps``) reach the terminal unless
    ``verbose``: the layers underneath (reading inputs, Ray setup, each training run) are detail for the log file.
    """

    def __init__(self, level: int, verbose: bool) -> None:
        super().__init__(level)
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or self.verbose:
            return True
        return record.name.startswith(("geximpute.steps", "geximpute.apps", "geximpute.progress"))

    def emit(self, record: logging.LogRecord) -> None:
        if _session is None:
            return
        try:
            text = self.format(record)
            with _session.lock:
                if _session.interactive:
                    from tqdm import tqdm

                    tqdm.write(text, file=_session.err)
                else:
                    print(text, file=_session.err, flush=True)
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


@contextmanager
def session(log_path: str | Path | None, *, verbose: bool = False, quiet: bool = False) -> Iterator[_Session]:
    """Route output for one command: engine lines and progress to the terminal, the rest to ``log_path``.

    Args:
        log_path: the log file (appended to; its folder is created). None: no log file, nothing redirected.
        verbose: leave fds 1 and 2 alone (Ray's and third-party logging shown live) and log DEBUG lines.
        quiet: only the engine's warnings and errors on the terminal (progress hidden too).
    """
    global _session
    if _session is not None:  # nested: the outer session already routes everything
        yield _session
        return
    log_path = Path(log_path) if log_path is not None else None
    redirect = log_path is not None and not verbose
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    out = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    err = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    log_file = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in finally
    if redirect:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
    _session = _Session(out=out, err=err, interactive=interactive(err) and not quiet, log_path=log_path,
                        verbose=verbose, redirected=redirect, quiet=quiet)

    root, ours = logging.getLogger(), logging.getLogger("geximpute")
    saved_levels = (root.level, ours.level, ours.propagate)
    handlers: list[tuple[logging.Logger, logging.Handler]] = []
    terminal = _EngineHandler(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO, verbose)
    terminal.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    handlers.append((ours, terminal))
    if log_file is not None:
        to_file = logging.StreamHandler(log_file)
        to_file.setFormatter(logging.Formatter(_FORMAT))
        handlers.append((ours, to_file))
        handlers.append((root, to_file))
    if verbose:  # other libraries' logging and Python warnings live on the terminal as well
        live = logging.StreamHandler(err)
        live.setFormatter(logging.Formatter(_FORMAT))
        handlers.append((root, live))
    for logger, handler in handlers:
        logger.addHandler(handler)
    ours.setLevel(logging.DEBUG)  # the file holds the engine's DEBUG lines too
    ours.propagate = False  # the engine's lines reach the file through its own handler, once
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python warnings go through logging: to the file, or live with --verbose
    try:
        yield _session
    finally:
        for left in list(_session.stages):  # stages an error left open: their displays end before the routing
            try:
                left.close(failed=True)
            except Exception:  # noqa: BLE001 - ending a display must not hide the error that ended the command
                logging.getLogger(__name__).debug("closing the display of %s failed", left.name, exc_info=True)
        logging.captureWarnings(False)
        for logger, handler in handlers:
            logger.removeHandler(handler)
        root.level, ours.level, ours.propagate = saved_levels
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _session = None
        out.close()
        err.close()
        if log_file is not None:
            log_file.close()


def redirected() -> bool:
    """True while a session sends fds 1 and 2 to its log file (not ``verbose``)."""
    return _session is not None and _session.redirected


def current_log() -> Path | None:
    """The log file of the running session, if any."""
    return _session.log_path if _session else None


def _columns(stream: TextIO) -> int:
    """The terminal's width (100 where it reports none, as a fresh pseudo-terminal does)."""
    try:
        width = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        width = 0
    return width if width >= 40 else 100


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Stage:
    """One stage's progress: :meth:`advance` from the driver, or :meth:`counter` for work done in Ray processes."""

    def __init__(self, name: str, total: int | None, unit: str, every: float) -> None:
        self.name, self.total, self.unit, self.every = name, total, unit, every
        self.done = 0
        self.t0 = time.perf_counter()
        self._bar = None
        self._last_line = self.t0
        self._remote = None
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        if _session is not None and _session.interactive:
            from tqdm import tqdm

            with _session.lock:
                self._bar = tqdm(total=total, desc=name, unit=f" {unit}", file=_session.err, leave=True,
                                 ncols=_columns(_session.err), mininterval=0.5, smoothing=0.1,
                                 # nothing to count: the time it has taken
                                 bar_format=None if total is not None else "{desc}: {elapsed}")
        if _session is not None:
            self._session = _session
            _session.stages.append(self)
            self._thread = threading.Thread(target=self._tick, name=f"progress {name}", daemon=True)
            self._thread.start()

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)

    def advance(self, n: int = 1) -> None:
        """``n`` more units done."""
        self._set(self.done + n)

    def counter(self):
        """A Ray actor handle that Ray processes call ``.add.remote(n)`` on; polled by this stage (None outside a
        session, so that callers can pass it along unconditionally)."""
        if _session is None:
            return None
        if self._remote is None:
            self._remote = progress_counter()
        return self._remote

    def _set(self, done: int) -> None:
        if done == self.done:
            return
        self.done = done
        if self._bar is not None:
            with _session.lock:
                self._bar.n = done
                self._bar.refresh()

    def _poll(self) -> None:
        if self._remote is not None:
            import ray

            try:
                self._set(ray.get(self._remote.value.remote(), timeout=5))
            except Exception:  # noqa: BLE001 - a missed poll only delays the display
                pass

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self._poll()
            if self._bar is not None:
                with _session.lock:
                    self._bar.refresh()  # elapsed time moves even when nothing finished
            elif time.perf_counter() - self._last_line >= self.every:
                self._last_line = time.perf_counter()
                # 30 s, 1, 2, 4, 8, then every 10 min: a long stage stays a few lines, and a job's log (`kubectl
                # logs`, `submit`) never goes hours without one, which would read as a hung job
                self.every = min(self.every * 2, MAX_LINE_SECONDS)
                self._line()

    def _line(self, final: bool = False) -> None:
        elapsed = time.perf_counter() - self.t0
        of = f"/{self.total}" if self.total is not None else ""
        text = f"{self.name}: {self.done}{of} {self.unit}"
        if final:
            text = f"{self.name}: done in " if self.total is None and not self.done else text + " in "
            text += _fmt_seconds(elapsed)
        else:
            rate = self.done / elapsed if elapsed > 0 else 0.0
            text += f", {rate:.2f} {self.unit}/s, {_fmt_seconds(elapsed)} elapsed"
            if self.total and self.done and self.done < self.total:
                text += f", ~{_fmt_seconds((self.total - self.done) / rate)} left"
        if _session.quiet:
            logging.getLogger("geximpute.progress").info(text)  # the log file's, under -q
            return
        with _session.lock:
            print(time.strftime("%H:%M:%S ") + text, file=_session.err, flush=True)

    def close(self, failed: bool = False) -> None:
        """End the display (a final line where the output is not a terminal); a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            if self in self._session.stages:
                self._session.stages.remove(self)
        self._poll()
        # the last counts are sent by other processes without waiting: give them a moment to arrive
        deadline = time.perf_counter() + 2.0
        while (self._remote is not None and not failed and self.total is not None and self.done < self.total
               and time.perf_counter() < deadline):
            time.sleep(0.1)
            self._poll()
        if self._remote is not None:
            import ray

            ray.kill(self._remote)
        if self._bar is not None:
            with _session.lock:
                if not failed and self.total is not None:
                    self._bar.n = max(self.done, 0)
                self._bar.close()
        elif _session is not None:
            self._line(final=True)
        logging.getLogger("geximpute.progress").debug("%s: %s %s in %.1f s", self.name, self.done, self.unit,
                                                   time.perf_counter() - self.t0)


def stage(name: str, total: int | None = None, unit: str = "steps") -> Stage:
    """Show the progress of one stage of a step: use as ``with stage(...) as progress:``.

    The display starts when this is called and ends when the ``with`` block does, so a stage can be made first and
    entered later, e.g. when its :meth:`Stage.counter` has to go into a trainer's constructor.

    Args:
        name: what the stage does, e.g. ``prepare: context records``.
        total: units of work, when known (done/total, rate and time left are then shown).
        unit: the unit's name, plural (``blocks``, ``epochs``).
    """
    every = float(os.environ.get("GEXIMPUTE_PROGRESS_SECONDS", "30"))
    return Stage(name, total, unit, every)

"""Starting or joining Ray according to the config."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from geximpute import code_version
from geximpute.config import RayConfig

log = logging.getLogger(__name__)


#: how often Ray Train's controller polls its workers, in seconds, in a local Ray this process starts (Ray's default
#: is 2 s: every run's start, each epoch's report and every run's end wait up to that long; on one machine polling is
#: cheap, and a short run of a few epochs finishes 4-5 s sooner). A value already in the environment wins.
TRAIN_POLL_SECONDS = "0.25"


def local_train_polling() -> None:
    """Set Ray Train's controller poll interval (:data:`TRAIN_POLL_SECONDS`) for a local Ray about to start: its
    processes inherit this process's environment. A cluster keeps its own setting."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_SECONDS)


def fit_trainer(trainer):
    """``trainer.fit()``, with this process's Ctrl-C handler as it was before: Ray Train installs its own for the
    run (the first Ctrl-C aborts the run gracefully) and leaves it there after the run, where every later Ctrl-C of
    the command (an evaluation's baselines, an imputation) was swallowed and a third exited with status 0."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    before = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    except SystemExit as exc:
        # Ray Train's handler ends a run interrupted by Ctrl-C with sys.exit(0): an interruption (status 130), not
        # a success (`train && fit-head` went on after the user stopped the training)
        raise KeyboardInterrupt("Ray Train's run was interrupted") from exc
    finally:
        signal.signal(signal.SIGINT, before)


def token_file() -> Path:
    """Where a local Ray writes the authentication token it generates when the user has none."""
    return Path.home() / ".ray" / "auth_token"


def private_token(path: Path) -> None:
    """The token a local Ray has just generated (``path`` was not there before ``ray.init``) made readable by its
    owner alone: Ray 2.60 writes it under the process's umask, 0644 on most systems, so every account on the
    machine could read it and run code on the cluster. A token the user made, or a link, is left as it is."""
    try:
        status = path.lstat()
        if stat.S_ISREG(status.st_mode) and status.st_mode & 0o077 and status.st_uid == os.getuid():
            os.chmod(path, 0o600)
            log.info("ray: %s made readable by its owner alone (it was %s)", path, oct(status.st_mode & 0o777))
    except OSError:
        return


def ensure_ray(config: RayConfig) -> bool:
    """Connect to Ray if this process is not connected yet.

    With ``address: null`` a local single-node Ray starts in this process (``num_cpus`` and
    ``object_store_mb`` from the config); otherwise the process joins the given cluster.

    Returns:
        True when this call started or joined Ray (the caller may then shut it down), False if already connected.
    """
    import ray

    data_budget(config)
    if ray.is_initialized():
        return False
    from geximpute.runtime.console import redirected

    if redirected():
        # the engine shows one display per stage; Ray Data's own bars (and their logged form off a terminal) would
        # only fill the log file, and bars drawn in workers are flushed by the driver at exit, after the session
        os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    else:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True}
    # every worker of the job checks that it imports the driver's code (geximpute.code_version)
    if config.address:
        ray.init(address=config.address, runtime_env=code_version.runtime_env(), **kwargs)
    else:
        local_train_polling()
        token = token_file()
        had_token = os.path.lexists(token)
        with code_version.exported_for_local_ray():
            ray.init(
                # "local": without an address Ray joins $RAY_ADDRESS (a Jobs API address that `geximpute submit`
                # reads fails there as an invalid Ray Client address) or the cluster a `ray start` on this machine
                # recorded, where the config's resources are refused and the code check is not exported
                address="local",
                num_cpus=config.num_cpus,
                object_store_memory=config.object_store_mb * 1024 * 1024 if config.object_store_mb else None,
                **kwargs,
            )
        if not had_token:
            private_token(token)
    log.info("ray: %s", ray.cluster_resources())
    return True


#: the object-store budget Ray Data had before :func:`data_budget` first set one in this process (a later config
#: that asks for none gets it back)
_ray_data_default: list = []


def data_budget(config: RayConfig) -> None:
    """Cap the object store memory of this process's Ray Data executions at ``ray.data_object_store_mb``; with
    ``None``, Ray Data's own budget (the one it had before a cap set here by an earlier config of this process)."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    if config.data_object_store_mb is None:
        if _ray_data_default and options.resource_limits.object_store_memory != _ray_data_default[0]:
            options.resource_limits = options.resource_limits.copy(object_store_memory=_ray_data_default[0])
            log.info("ray data: Ray Data's own object store budget per execution")
        return
    limit = config.data_object_store_mb * 1024 * 1024
    if options.resource_limits.object_store_memory != limit:
        if not _ray_data_default:
            _ray_data_default.append(options.resource_limits.object_store_memory)
        options.resource_limits = options.resource_limits.copy(object_store_memory=limit)
        log.info("ray data: at most %d MiB of object store per execution", config.data_object_store_mb)


@contextlib.contextmanager
def execution_budget(config: RayConfig, nbytes: int | None) -> Iterator[None]:
    """For the Ray Data datasets created inside (a dataset takes a copy of the settings when it is made): an
    object-store budget of ``nbytes`` per execution, unless ``ray.data_object_store_mb`` sets a cap (that wins) or
    ``nbytes`` is None. Ray Data never uses more than its own budget (it takes the smaller); the setting before is
    restored on the way out."""
    from ray.data import DataContext

    if nbytes is None or config.data_object_store_mb is not None:
        yield
        return
    options = DataContext.get_current().execution_options
    before = options.resource_limits
    options.resource_limits = before.copy(object_store_memory=int(nbytes))
    log.info("ray data: at most %.0f MiB of object store for this execution", nbytes / 2**20)
    try:
        yield
    finally:
        options.resource_limits = before


def progress_counter():
    """A Ray actor that counts units of work done in Ray processes, for :func:`geximpute.runtime.console.stage`.

    It takes no CPU, so it never competes with the work it counts. Callers add with ``.add.remote(n)``; the driver
    polls ``.value.remote()``.
    """
    import ray

    @ray.remote(num_cpus=0)
    class ProgressCounter:
        def __init__(self) -> None:
            self.n = 0

        def add(self, n: int = 1) -> None:
            self.n += n

        def value(self) -> int:
            return self.n

    return ProgressCounter.remote()


def progress_callbacks(counter) -> list:
    """Ray Train callbacks that count each ``ray.train.report`` (one per epoch) on ``counter``; [] without one.

    The callback runs in Ray Train's controller, so it holds the counter's actor handle, not the driver's display.
    """
    if counter is None:
        return []
    from ray.train import UserCallback

    class ReportCounter(UserCallback):
        def __init__(self, handle) -> None:
            self.handle = handle

        def after_report(self, run_context, metrics, checkpoint) -> None:
            self.handle.add.remote(1)

    return [ReportCounter(counter)]

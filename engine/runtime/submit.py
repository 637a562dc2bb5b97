"""Submitting a step to a Ray cluster as a Ray job (``geximpute submit``).

The job runs ``python -m geximpute.jobs.STEP --config geximpute-job.yaml`` on the cluster. Its ``working_dir`` is a
small folder staged on this machine and uploaded by the Ray Jobs SDK: the local ``geximpute`` sources (the
repository's ``engine/`` and ``jobs/``, laid out as ``geximpute/`` and ``geximpute/jobs/``), so that the cluster runs
exactly the code that submitted it over the dependencies installed on its nodes, and the config,
resolved here. Resolving means the ``--set`` overrides are applied, relative paths are made absolute against the
config file's folder (the data is never shipped: the paths must be readable on the cluster, as on a local cluster or
a shared mount) and ``ray.address`` is set to ``auto`` so that the job joins the cluster it runs on.

Token authentication: the cluster's token is read from Ray's usual places, in Ray's order (the ``RAY_AUTH_TOKEN``
environment variable, the file named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``) and sent as an
``Authorization: Bearer`` header, unless ``RAY_AUTH_MODE=disabled``. It is never printed, logged, or written into
the config, the ``runtime_env`` or the job's metadata; the cluster's own nodes hold the token the job itself uses.
It is not sent in clear across a network: plain ``http://`` is refused unless the address is this machine (a
port-forward) or ``--allow-insecure`` is given (:func:`check_transport`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from geximpute import __version__
from geximpute.config import dump_config, load_config
from geximpute.errors import GeximputeError

log = logging.getLogger(__name__)

#: steps that can be submitted, as ``geximpute`` names them, with the ``jobs`` module that runs each
STEPS: dict[str, str] = {
    "ingest": "ingest",
    "prepare": "prepare",
    "train": "train",
    "fit-head": "fit_head",
    "impute": "impute",
    "nightly": "nightly",
    "build": "build",
    "pipeline": "pipeline",
}
#: the exit status of `geximpute submit` when it stopped following a job that may still run (as a shell's Ctrl-C)
DETACHED_STATUS = 130
#: how long the job server may be out of reach while a job is followed before `submit` stops following it
GONE_SECONDS = 300.0
#: a status request that has not answered in this many seconds counts as the job server out of reach (the Jobs
#: SDK's requests carry no timeout: a tunnel whose far end died held one for hours)
ANSWER_SECONDS = 30.0
#: a log stream silent this long has the job's status asked (a stream over a dead tunnel never ends by itself)
QUIET_SECONDS = 60.0
#: the config's name inside the job's working_dir
JOB_CONFIG = "geximpute-job.yaml"
#: overrides every submitted config gets last: the job joins the cluster it runs on, with that cluster's resources
CLUSTER_OVERRIDES = ("ray.address=auto", "ray.num_cpus=null", "ray.object_store_mb=null")
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
#: where the Ray Jobs CLI and SDK look for the cluster's address when none is given, in order
ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TOKEN_HELP = (
    "Provide the cluster's token the way Ray reads it: `export RAY_AUTH_TOKEN_PATH=/path/to/token` (a file holding "
    "only the token), `export RAY_AUTH_TOKEN=...`, or the file ~/.ray/auth_token; `ray get-auth-token` prints the "
    "token on a machine that has it (e.g. the head node), and a KubeRay cluster keeps it in the Secret its "
    "authOptions name."
)


@dataclass(frozen=True)
class Token:
    """An authentication token and where it came from (the source is safe to show; the value is not)."""

    value: str
    source: str

    def __repr__(self) -> str:  # keep the value out of tracebacks and debug logs
        return f"Token(source={self.source!r})"


@dataclass(frozen=True)
class JobResult:
    """What became of a submitted job.

    Attributes:
        submission_id: the Ray job's submission id.
        address: the job server it was submitted to.
        status: the last status seen (``SUCCEEDED``, ``FAILED``, ``STOPPED``; ``PENDING``/``RUNNING`` without wait).
        message: the job server's message about that status, if any.
        detached: this process stopped following the job (Ctrl-C, or the job server out of reach) while it ran.
    """

    submission_id: str
    address: str
    status: str
    message: str = ""
    detached: bool = False


def find_token(environ: dict[str, str] | None = None, home: Path | None = None) -> Token | None:
    """The Ray authentication token from Ray's usual places, in Ray's order of precedence.

    Args:
        environ: environment to read (default ``os.environ``).
        home: home folder for ``~/.ray/auth_token`` (default the user's).

    Returns:
        The token, or ``None`` when no place holds one or ``RAY_AUTH_MODE=disabled``.

    Raises:
        GeximputeError: ``RAY_AUTH_TOKEN_PATH`` names a file that cannot be read or is empty (Ray itself treats that
            as a fatal misconfiguration), or ``RAY_AUTH_MODE=token`` and no token is found.
    """
    env = os.environ if environ is None else environ
    mode = env.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return None
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return Token(env["RAY_AUTH_TOKEN"].strip(), "the RAY_AUTH_TOKEN environment variable")
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise GeximputeError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file ({exc.strerror})") from None
        if not value:
            raise GeximputeError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return Token(value, f"the file {path} (RAY_AUTH_TOKEN_PATH)")
    default = (home / ".ray" / "auth_token") if home else DEFAULT_TOKEN_FILE.expanduser()
    if default.is_file():
        value = default.read_text().strip()
        if value:
            return Token(value, f"the file {default}")
    if mode == "token":
        raise GeximputeError(f"RAY_AUTH_MODE=token but no authentication token was found. {TOKEN_HELP}")
    return None


def stage_job_dir(dest: Path, config_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Write the job's working_dir: a copy of the ``geximpute`` package (``geximpute.jobs`` included) and the resolved
    config.

    Args:
        dest: an empty or absent folder.
        config_path: the config file on this machine.
        overrides: ``--set`` overrides, applied before :data:`CLUSTER_OVERRIDES`.

    Returns:
        ``dest``.

    Raises:
        ConfigError: the config cannot be read or holds a bad value (checked here, before anything is submitted).
    """
    # the sources of the installed package: ``geximpute`` is the repository's engine/ folder and ``geximpute.jobs``
    # its jobs/ folder (pyproject.toml maps them); in the job's working_dir they become geximpute/ and geximpute/jobs/
    import geximpute

    config = load_config(config_path, [*overrides, *CLUSTER_OVERRIDES])
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    package = Path(geximpute.__file__).resolve().parent
    jobs_spec = importlib.util.find_spec("geximpute.jobs")  # found, not imported: the engine does not import jobs
    if jobs_spec is None or jobs_spec.origin is None:
        raise GeximputeError("the geximpute.jobs package is not installed; reinstall geximpute (bash scripts/setup.sh)")
    shutil.copytree(package, dest / "geximpute", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "jobs"))
    shutil.copytree(Path(jobs_spec.origin).parent, dest / "geximpute" / "jobs", ignore=ignore)
    (dest / JOB_CONFIG).write_text(
        f"# resolved by geximpute {__version__} submit from {Path(config_path).resolve()}\n" + dump_config(config)
    )
    return dest


def entrypoint(step: str) -> str:
    """The shell command the job runs, relative to its working_dir."""
    return f"python -m geximpute.jobs.{STEPS[step]} --config {JOB_CONFIG}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(address: str, token: Token | None, allow_insecure: bool = False) -> None:
    """Refuse an address that is not a job server's (``ray://``: Ray Client), and refuse to send ``token`` in
    clear: over plain ``http://`` to an address that is not this machine.

    A port-forward (``kubectl port-forward``, ``ray dashboard``) listens on 127.0.0.1 and is fine; a head reached
    across a network needs ``https://`` (a TLS-terminating ingress or proxy in front of the dashboard), or
    ``allow_insecure`` on a network the user trusts, with a warning.

    Raises:
        GeximputeError: a ``ray://`` address; a token would cross the network unencrypted and ``allow_insecure``
            is not set.
    """
    parsed = urllib.parse.urlsplit(address if "://" in address else f"http://{address}")
    if parsed.scheme.lower() not in ("http", "https"):
        # ray:// goes through Ray Client, which then reaches the dashboard over plain http on the head's own
        # address: neither this check nor the job server's address is what the user named
        raise GeximputeError(
            f"--address {address}: expected the address of the cluster's job server (its dashboard), "
            "http(s)://HEAD:8265; a ray:// (Ray Client) address is not one. Forward the dashboard "
            "(`ray dashboard CLUSTER.yaml`, `kubectl port-forward`) and use http://127.0.0.1:8265, or an https:// "
            "address in front of it")
    if token is None:
        return
    if parsed.scheme.lower() == "https" or is_loopback(parsed.hostname or ""):
        return
    if not allow_insecure:
        raise GeximputeError(
            f"refusing to send the Ray token (from {token.source}) in clear to {address}: plain http to a host that "
            "is not this machine. Use an https:// address (a TLS proxy or ingress in front of the dashboard), a "
            "port-forward to 127.0.0.1, or pass --allow-insecure on a network you trust")
    log.warning("submit: sending the Ray token in clear over plain http to %s (--allow-insecure)", address)


def _client(address: str, token: Token | None):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token.value}"} if token else None
    # the Jobs SDK lets these variables override its address argument: hide them while it resolves an explicit one
    hidden = {var: os.environ.pop(var) for var in ADDRESS_VARS if var in os.environ}
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        raise _refused(address, token, exc) from None
    except _server_errors() as exc:
        # refused or unresolved (ConnectionError), or something answered that is not a Ray job server: a 404 of the
        # version check (RuntimeError), a 502 of an ingress whose cluster is down (an HTTPError)
        raise GeximputeError(
            f"cannot reach a Ray job server at {address}: {exc}. Is the cluster up, and is this the address of its "
            "dashboard (http://HEAD:8265 by default; `ray dashboard CLUSTER.yaml` or `kubectl port-forward` "
            "forwards it)?"
        ) from None
    finally:
        os.environ.update(hidden)


def _server_errors() -> tuple[type[BaseException], ...]:
    """What the Jobs SDK raises when the job server does not answer as one (imported here: the SDK's own
    dependencies, loaded only by a command that talks to a cluster)."""
    import aiohttp
    import requests

    return RuntimeError, OSError, requests.RequestException, aiohttp.ClientError


def _refused(address: str, token: Token | None, exc: Exception) -> GeximputeError:
    body = str(getattr(exc, "message", exc)).splitlines()[0]
    if token is None:
        why = "no authentication token was sent, and the cluster requires one"
    else:
        why = f"it did not accept the token from {token.source}"
    return GeximputeError(f"the Ray cluster at {address} refused the request ({body}): {why}. {TOKEN_HELP}")


async def _follow(client, submission_id: str, out: TextIO, quiet_s: float, answer_s: float) -> str:
    """Write the job's log stream to ``out`` until it ends ("ended"); where it stays silent ``quiet_s``, the job's
    status is asked (in a thread, at most ``answer_s``): a job that has finished ("finished") or a server that does
    not answer ("silent") ends the following here, for :func:`wait_for`'s polling."""
    stream = client.tail_job_logs(submission_id).__aiter__()
    loop = asyncio.get_running_loop()
    pending = asyncio.ensure_future(stream.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=quiet_s)
            if done:
                try:
                    lines = pending.result()
                except StopAsyncIteration:
                    return "ended"
                out.write(lines)
                out.flush()
                pending = asyncio.ensure_future(stream.__anext__())
                continue
            try:
                status = await loop.run_in_executor(None, _answer, answer_s, client.get_job_status, submission_id)
            except _server_errors():
                return "silent"
            if status.is_terminal():
                return "finished"
    finally:
        pending.cancel()


def _answer(timeout_s: float, call, *args):
    """``call(*args)`` in a daemon thread, waited for at most ``timeout_s`` (TimeoutError after it: the request
    is left to its thread, which never holds up the process's exit)."""
    box: dict[str, Any] = {}

    def ask() -> None:
        try:
            box["value"] = call(*args)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=ask, name="job-status", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer in {timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def wait_for(client, submission_id: str, address: str, out: TextIO, poll_s: float = 2.0,
             patience_s: float = GONE_SECONDS, answer_s: float = ANSWER_SECONDS,
             quiet_s: float = QUIET_SECONDS) -> JobResult:
    """Stream the job's logs to ``out`` until it ends, then return its final status.

    A log stream that breaks off (a port-forward or tunnel that dropped, the head restarting), or that stays silent
    ``quiet_s`` while the job server does not answer, is followed by polling the job's status; a status request
    that does not answer within ``answer_s`` counts as the server out of reach, and out of reach for
    ``patience_s`` in a row ends the wait with the job detached (it still runs on the cluster), never with a
    traceback and never waiting on a dead connection.
    """
    from ray.job_submission import JobStatus

    how = None
    try:
        how = asyncio.run(_follow(client, submission_id, out, quiet_s, answer_s))
    except _server_errors() as exc:  # OSError takes in timeouts and refused connections
        log.warning("submit: the log stream of %s broke off (%s); waiting for the job to finish (its logs: `ray job "
                    "logs %s --address %s`)", submission_id, exc or type(exc).__name__, submission_id, address)
    if how == "silent":
        log.warning("submit: the log stream of %s is silent and the job server at %s does not answer; waiting for "
                    "it (at most %.0f s)", submission_id, address, patience_s)
    unreachable_since = None
    while True:
        try:
            status = _answer(answer_s, client.get_job_status, submission_id)
            if status.is_terminal():
                message = _answer(answer_s, client.get_job_info, submission_id).message or ""
                return JobResult(submission_id, address, JobStatus(status).value, message)
            if how == "ended":  # closed by the server or a proxy with the job still running: said, once
                log.warning("submit: the log stream of %s ended before the job (a proxy's timeout?); waiting for the "
                            "job to finish (its logs: `ray job logs --follow %s --address %s`)", submission_id,
                            submission_id, address)
                how = None
            unreachable_since = None
        except _server_errors() as exc:
            now = time.monotonic()
            unreachable_since = unreachable_since or now
            if now - unreachable_since >= patience_s:
                log.error("submit: the job server at %s has been out of reach for %.0f s (%s); job %s may still "
                          "be running", address, now - unreachable_since, exc, submission_id)
                return JobResult(submission_id, address, "UNKNOWN", f"job server out of reach: {exc}",
                                 detached=True)
        time.sleep(poll_s)


def submit(
    step: str,
    config_path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    address: str | None = None,
    wait: bool = True,
    out: TextIO = sys.stdout,
    allow_insecure: bool = False,
) -> JobResult:
    """Submit ``python -m geximpute.jobs.STEP`` to a Ray cluster and, with ``wait``, stream its logs until it ends.

    Args:
        step: one of :data:`STEPS`.
        config_path: the config file on this machine; resolved and shipped with the job.
        overrides: ``--set`` overrides, baked into the shipped config.
        address: the cluster's job server (``http://HEAD:8265``); ``None`` uses ``RAY_API_SERVER_ADDRESS`` or
            ``RAY_ADDRESS``. An explicit address wins over those variables.
        wait: follow the job's logs until it ends.
        out: where the job's logs go.
        allow_insecure: send the token over plain http to a host that is not this machine (with a warning);
            refused otherwise (:func:`check_transport`).

    Returns:
        The job's submission id and its last status.

    Raises:
        GeximputeError: unknown step, bad config, unreachable cluster, or a refused token (the message says how to
            provide one).
    """
    from ray.exceptions import AuthenticationError

    if step not in STEPS:
        raise GeximputeError(f"unknown step {step!r}; choose one of {', '.join(STEPS)}")
    address = address or next((os.environ[v] for v in ADDRESS_VARS if os.environ.get(v)), None)
    if not address:
        raise GeximputeError("no cluster address: pass --address http://HEAD:8265 (the cluster's job server)")
    token = find_token()
    check_transport(address, token, allow_insecure)
    log.info("submit: %s", f"token authentication, token from {token.source}" if token else "no token sent")
    submission_id = f"geximpute-{step}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory(prefix="geximpute-job-") as tmp:
        job_dir = stage_job_dir(Path(tmp) / "job", config_path, overrides)
        client = _client(address, token)
        try:
            client.submit_job(  # uploads job_dir before it returns
                entrypoint=entrypoint(step),
                submission_id=submission_id,
                runtime_env={"working_dir": str(job_dir)},
                metadata={"geximpute_step": step, "geximpute_version": __version__,
                          "config": str(Path(config_path).resolve())},
            )
        except AuthenticationError as exc:
            raise _refused(address, token, exc) from None
        except _server_errors() as exc:
            raise GeximputeError(f"the Ray job server at {address} did not take the job: {exc}") from None
    log.info("submit: job %s submitted to %s: %s", submission_id, address, entrypoint(step))
    if not wait:
        return JobResult(submission_id, address, client.get_job_status(submission_id).value)
    try:
        return wait_for(client, submission_id, address, out)
    except AuthenticationError as exc:
        raise _refused(address, token, exc) from None
    except KeyboardInterrupt:  # stop following, not the job: it runs on the cluster
        try:
            status = client.get_job_status(submission_id).value
        except _server_errors():
            status = "UNKNOWN"
        return JobResult(submission_id, address, status, detached=True)


def report(result: JobResult) -> int:
    """Print a one-line outcome to stderr; returns the exit status: 0 on success or when not waiting,
    :data:`DETACHED_STATUS` when this process stopped following a job that may still run (Ctrl-C, or the job
    server out of reach: a script or cron cannot take it for success), else 1."""
    job = result.submission_id
    if result.status == "SUCCEEDED":
        print(f"geximpute submit: job {job} succeeded", file=sys.stderr)
        return 0
    if result.status in ("PENDING", "RUNNING", "UNKNOWN"):
        what = "is " + result.status if result.status != "UNKNOWN" else "may still be running (" + result.message + ")"
        print(f"geximpute submit: job {job} {what}; follow it with `ray job logs --follow {job} --address "
              f"{result.address}`, stop it with `ray job stop {job} --address {result.address}`", file=sys.stderr)
        return DETACHED_STATUS if result.detached else 0
    # the first line only: the server's message repeats the tail of the logs that were just streamed
    detail = f": {result.message.splitlines()[0]}" if result.message else ""
    print(f"geximpute submit: job {job} {result.status}{detail}", file=sys.stderr)
    return 1

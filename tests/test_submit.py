"""``geximpute submit`` against a real two-node Ray cluster started here (``ray start --head`` and ``ray start
--address`` for a second node, with token authentication), and the token and working_dir handling on their own.

The cluster is this module's own: its own temp dirs (one per node), ports and token file, each node started in a new
session and stopped by its process ids; other Ray instances on the machine (the in-process ``ray_local`` fixture,
other users' clusters) are never touched. The user side runs the CLI in a subprocess with the token given as a user
would (``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``) and a home folder without ``~/.ray/auth_token``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import TINY as TINY_BASE

from geximpute.errors import GeximputeError
from geximpute.runtime.submit import JOB_CONFIG, STEPS, Token, entrypoint, find_token, stage_job_dir

BIN = Path(sys.executable).parent
GEXIMPUTE = str(BIN / "geximpute")
#: a few minutes of work on 2 cores: tiny network, few boosting rounds, the entries task
TINY = [*TINY_BASE, "train.epochs=1", "head.num_boost_round=10"]
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray address or token setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in a job entrypoint is this venv's
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra)
    return env


@dataclass
class Head:
    """A running Ray cluster started by this module: its head and, once joined, a second node."""

    address: str
    token: str
    token_path: Path
    temp_dir: Path
    proc: subprocess.Popen
    worker: subprocess.Popen | None = None

    def api(self, path: str) -> dict:
        """GET a dashboard endpoint (the state API's ``/api/v0/...``) with the cluster's token."""
        import json

        request = urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def user_env(self, home: Path, **extra: str) -> dict[str, str]:
        """A user's environment for the CLI: the token from ``RAY_AUTH_TOKEN_PATH``, a home without a token."""
        return _clean_env(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path), **extra)

    def own_processes(self) -> list[int]:
        """Live processes of this cluster: in the session ``ray start`` led, naming its temp dir or running in it
        (a job's driver runs in its working_dir, under the temp dir)."""
        import psutil

        found = []
        mine = str(self.temp_dir)
        sessions = {self.proc.pid} | ({self.worker.pid} if self.worker is not None else set())
        for p in psutil.process_iter(["pid", "cmdline"]):
            if p.pid == os.getpid():
                continue
            try:
                if (os.getsid(p.pid) in sessions or mine in " ".join(p.info["cmdline"] or ())
                        or (p.cwd() + os.sep).startswith(mine + os.sep)):
                    found.append(p.pid)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return found


def _wait_for_dashboard(address: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ray start exited with {proc.returncode}"
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError as exc:  # 401: up, and asking for the token
            if exc.code in (401, 403):
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the Ray dashboard at {address} did not come up in {timeout_s:.0f} s")


def _stop(head: Head) -> None:
    """Stop only this cluster, by pid: SIGTERM to every process of it (``ray start --block`` alone can wait long on
    the actors a finished job left behind), SIGKILL to what is left after a grace period."""
    for sig, grace_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        for pid in head.own_processes():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        procs = [head.proc, *([head.worker] if head.worker is not None else [])]
        while (any(p.poll() is None for p in procs) or head.own_processes()) and time.monotonic() < deadline:
            time.sleep(0.5)  # poll() also reaps `ray start`


@pytest.fixture(scope="module")
def ray_head():
    """A real two-node Ray cluster on 127.0.0.1 with token authentication: a head with 2 CPUs and a second node with
    2 CPUs, each with its own ports and temp dir (the state API must list both alive before a test runs)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="gxray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    token = secrets.token_hex(32)
    token_path = temp_dir / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    gcs, dash, client, agent, agent_grpc, metrics, env_agent, node_mgr, obj_mgr, *second = _free_ports(15)
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--temp-dir", str(temp_dir / "ray"),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(env_agent),
        "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
        "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(300 * 1024 * 1024),
    ]
    env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    log = (temp_dir / "ray-start.log").open("w")
    # a new session: every process of this cluster shares its id, so the teardown can find them all
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dash}", token, token_path, temp_dir, proc)
    try:
        _wait_for_dashboard(head.address, proc)
        # the second node: the same machine, its own temp dir, ports and resources, the cluster's token
        w_agent, w_agent_grpc, w_metrics, w_env_agent, w_node_mgr, w_obj_mgr = second
        worker_cmd = [
            str(BIN / "ray"), "start", "--address", f"127.0.0.1:{gcs}", "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir / "node2"),
            "--dashboard-agent-listen-port", str(w_agent), "--dashboard-agent-grpc-port", str(w_agent_grpc),
            "--metrics-export-port", str(w_metrics), "--runtime-env-agent-port", str(w_env_agent),
            "--node-manager-port", str(w_node_mgr), "--object-manager-port", str(w_obj_mgr),
            "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(200 * 1024 * 1024),
        ]
        head.worker = subprocess.Popen(worker_cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        deadline = time.monotonic() + 120
        while len(head.alive_nodes()) < 2:
            assert head.worker.poll() is None, f"the second node's ray start exited with {head.worker.returncode}"
            assert time.monotonic() < deadline, "the second node did not join the cluster in 120 s"
            time.sleep(1)
        yield head
    finally:
        _stop(head)
        log.close()
        assert head.own_processes() == [], "processes of the test cluster survived its stop"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{head.address}/api/version", timeout=2)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _jobs(head: Head) -> list:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"}).list_jobs()


def _submit(head: Head, env: dict[str, str], cwd: Path, *args: str, timeout: float = 600):
    """Run ``geximpute submit ARGS --address HEAD`` as a user would, in ``cwd``; returns the finished process."""
    return subprocess.run([GEXIMPUTE, "submit", *args, "--address", head.address], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def test_submission_without_the_token_is_refused(ray_head, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"inputs": {"genes": "g.gtf", "expression": "e.gct"}}))
    before = len(_jobs(ray_head))
    home = tmp_path / "home"
    home.mkdir()

    missing = _submit(ray_head, _clean_env(HOME=str(home)), tmp_path, "prepare", "--config", str(config), timeout=120)
    assert missing.returncode == 2, missing.stderr
    assert "refused" in missing.stderr and "no authentication token was sent" in missing.stderr
    assert "RAY_AUTH_TOKEN_PATH" in missing.stderr and "ray get-auth-token" in missing.stderr

    wrong = _submit(ray_head, _clean_env(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token"),
                    tmp_path, "prepare", "--config", str(config), timeout=120)
    assert wrong.returncode == 2, wrong.stderr
    assert "did not accept the token from the RAY_AUTH_TOKEN environment variable" in wrong.stderr
    assert "not-the-token" not in wrong.stderr + wrong.stdout

    assert len(_jobs(ray_head)) == before  # nothing was submitted


def _succeeded(head: Head, run, step: str):
    """The finished job of ``step``, checked: the submission succeeded and the token reached the cluster and nothing
    else (not the output, not the job's record)."""
    assert run.returncode == 0, run.stderr
    assert "succeeded" in run.stderr
    assert head.token not in run.stdout + run.stderr
    (job,) = [j for j in _jobs(head) if j.metadata.get("geximpute_step") == step]
    assert job.status == "SUCCEEDED" and job.entrypoint == entrypoint(step)
    assert head.token not in repr(job.runtime_env) + repr(job.metadata) + job.entrypoint
    return job


def _assert_on_both_nodes(head: Head, job) -> None:
    """The job's tasks and actors ran on both nodes of the cluster (the state API)."""
    nodes = {n["node_id"] for n in head.alive_nodes()}
    assert len(nodes) == 2
    tasks = head.api("/api/v0/tasks?limit=10000&detail=true")["data"]["result"]["result"]
    placed = {t["node_id"] for t in tasks if t.get("job_id") == job.job_id and t.get("node_id")}
    assert placed == nodes, f"the job's {len(tasks)} tasks ran on {len(placed)} of the 2 nodes"


def _assert_same_predictions(cluster_dir: Path, single) -> None:
    """The cluster's Parquet (partitioned by tissue, one row per (donor, tissue, gene)) holds the rows, run_id and
    values of the single-node run ``single`` (an ImputeResult)."""
    import numpy as np
    import pyarrow.dataset as pads

    assert list(cluster_dir.glob("tissue=*/*.parquet"))
    keys = ["donor_id", "tissue", "gene_id"]
    cluster, alone = (
        pads.dataset(folder, format="parquet", partitioning="hive").to_table().to_pandas()
        .pipe(lambda f: f.assign(tissue=f["tissue"].astype(str)).sort_values(keys, ignore_index=True))
        for folder in (cluster_dir, single.out_dir))
    assert len(cluster) == single.n_rows > 0
    assert not cluster.duplicated(keys).any()
    assert cluster[keys].equals(alone[keys])
    assert set(cluster["run_id"]) == set(alone["run_id"]) == {single.run_id}
    for column in ("predicted", "predicted_lower", "predicted_upper"):
        np.testing.assert_allclose(cluster[column], alone[column], rtol=1e-5, atol=1e-5, err_msg=column)


def test_impute_job_on_two_nodes_writes_what_one_node_writes(ray_head, tiny_model, tiny_imputation, tmp_path):
    """The impute job of the session's tiny bundle on the two-node cluster: its tasks are placed on both nodes
    (Ray's state API) and it writes the rows, run_id and values that the single-node imputation of the same bundle
    and data (``tiny_imputation``, this process's local Ray) wrote."""
    _, single = tiny_imputation
    out = tmp_path / "out"
    home = tmp_path / "home"
    home.mkdir()
    sets = [arg for item in [f"output_dir={out}", f"impute.model_dir={tiny_model.folder}"] for arg in ("--set", item)]
    started = time.monotonic()
    run = _submit(ray_head, ray_head.user_env(home), tmp_path, "impute", "--config",
                  str(tiny_model.data / "config.yaml"), *sets)
    print(f"impute job: {time.monotonic() - started:.0f} s\n{run.stderr[-3000:]}")

    job = _succeeded(ray_head, run, "impute")
    _assert_on_both_nodes(ray_head, job)
    _assert_same_predictions(out / "predictions", single)


@pytest.mark.slow
def test_pipeline_job_on_a_real_cluster(ray_head, ray_local, tmp_path):
    """The pipeline job on the two-node cluster: every step runs, its tasks are placed on both nodes (Ray's state
    API), and its imputation is the one a single-node run of the same bundle writes."""
    from geximpute.apps.synth import SynthSpec, generate
    from geximpute.config import load_config
    from geximpute.steps.impute import impute

    data = generate(tmp_path / "data", SynthSpec(seed=5, n_genes=48, n_donors=10, n_tissues=3))
    out = tmp_path / "out"
    home = tmp_path / "home"
    home.mkdir()
    # one network and a head on its fold (train.folds=1): the job's steps, not the stacked model, are under test
    sets = [arg for item in [f"output_dir={out}", *TINY, "train.folds=1"] for arg in ("--set", item)]
    started = time.monotonic()
    run = _submit(ray_head, ray_head.user_env(home), tmp_path, "pipeline", "--config", str(data.config_path), *sets)
    seconds = time.monotonic() - started
    print(f"pipeline job: {seconds:.0f} s\n{run.stderr[-3000:]}")

    job = _succeeded(ray_head, run, "pipeline")
    # the job's logs were streamed to stdout: every step ran, on the cluster
    for step in ("prepare --training", "train", "fit-head", "impute"):
        assert f"pipeline: geximpute {step}" in run.stdout
    assert "pipeline: all steps succeeded" in run.stdout
    _assert_on_both_nodes(ray_head, job)

    # the same bundle imputed on a single node (this process's local Ray) writes the same rows and values
    config = load_config(data.config_path, [f"output_dir={out}", *TINY, "train.folds=1"])
    _assert_same_predictions(out / "predictions", impute(config, model=out / "model", out_dir=tmp_path / "single-node"))


# --- token and working_dir handling, without a cluster -------------------------------------------------------


def test_token_comes_from_rays_places_in_rays_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path = tmp_path / "token"
    path.write_text("  from-path\n")

    assert find_token({}, home).value == "from-home"
    assert find_token({"RAY_AUTH_TOKEN_PATH": str(path)}, home).value == "from-path"
    both = find_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path)}, home)
    assert both.value == "from-env" and "RAY_AUTH_TOKEN" in both.source
    assert find_token({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}, home) is None
    assert find_token({}, tmp_path / "nobody") is None
    assert "from-env" not in repr(both)  # a token never shows in a repr, a traceback or a log line


def test_token_misconfiguration_is_a_clear_error(tmp_path):
    with pytest.raises(GeximputeError, match="RAY_AUTH_TOKEN_PATH=.*cannot read"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "absent")}, tmp_path)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(GeximputeError, match="token file is empty"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")}, tmp_path)
    with pytest.raises(GeximputeError, match="RAY_AUTH_MODE=token but no authentication token"):
        find_token({"RAY_AUTH_MODE": "token"}, tmp_path)


def test_the_token_never_travels_in_clear_to_another_host(capfd, monkeypatch, caplog):
    from geximpute.apps.cli import main
    from geximpute.runtime.submit import check_transport

    token = Token("s3cret-value", "RAY_AUTH_TOKEN")
    for local in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265", "https://head.example:443",
                  "127.0.0.1:8265"):
        check_transport(local, token)
    check_transport("http://10.0.0.5:8265", None)  # no token, nothing to protect
    # Ray Client addresses reach the dashboard over plain http on the head's own address: refused, token or not
    for client in ("ray://10.0.0.5:10001", "RAY://head.corp:10001", "ray://127.0.0.1:10001"):
        for with_token in (token, None):
            with pytest.raises(GeximputeError, match=r"expected the address of the cluster's job server .* ray://"):
                check_transport(client, with_token)
    with pytest.raises(GeximputeError, match=r"refusing to send the Ray token .* in clear to http://10\.0\.0\.5"):
        check_transport("http://10.0.0.5:8265", token)
    with caplog.at_level("WARNING"):
        check_transport("http://head.example:8265", token, allow_insecure=True)
    assert "in clear over plain http" in caplog.text and "s3cret" not in caplog.text
    # through the CLI: exit 2, before any connection, the token not printed
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret-value")
    code = main(["submit", "impute", "--address", "http://10.0.0.5:8265", "--config", "absent.yaml"])
    output = "".join(capfd.readouterr())
    assert code == 2 and "--allow-insecure" in output and "s3cret" not in output and "Traceback" not in output


def test_job_dir_holds_the_packages_and_the_resolved_config(tmp_path):
    from geximpute.config import config_from_dict

    data = tmp_path / "data"
    data.mkdir()
    (data / "config.yaml").write_text(yaml.safe_dump({
        "inputs": {"genes": "genes.gtf", "expression": "expr.gct"},
        "output_dir": "out",
        "ray": {"num_cpus": 2},
    }))
    job = stage_job_dir(tmp_path / "job", data / "config.yaml", ["train.epochs=3"])

    assert (job / "geximpute" / "runtime" / "submit.py").is_file()
    assert (job / "geximpute" / "jobs" / "pipeline.py").is_file()
    assert not (job / "engine").exists() and not (job / "jobs").exists()  # only the import name ships
    assert not list(job.rglob("__pycache__"))
    shipped = yaml.safe_load((job / JOB_CONFIG).read_text())
    # relative paths are made absolute here, overrides are baked in, and the job joins its cluster
    assert shipped["inputs"]["genes"] == str((data / "genes.gtf").resolve())
    assert shipped["output_dir"] == str((data / "out").resolve())
    assert shipped["train"]["epochs"] == 3
    assert shipped["ray"]["address"] == "auto" and shipped["ray"]["num_cpus"] is None
    config_from_dict(shipped, base_dir="/elsewhere")  # still a valid config wherever it lands


def test_every_step_has_a_job_module():
    import importlib

    for step, module in STEPS.items():
        assert callable(importlib.import_module(f"geximpute.jobs.{module}").main), step
        assert entrypoint(step) == f"python -m geximpute.jobs.{module} --config {JOB_CONFIG}"
    assert repr(Token("secret", "somewhere")) == "Token(source='somewhere')"


def test_the_outcome_line_and_exit_status(capsys):
    from geximpute.runtime.submit import JobResult, report

    assert report(JobResult("j1", "http://h:8265", "SUCCEEDED")) == 0
    assert report(JobResult("j2", "http://h:8265", "FAILED", "Job entrypoint command failed with exit code 2, "
                            "last available logs:\nTraceback ...\n")) == 1
    assert report(JobResult("j3", "http://h:8265", "RUNNING")) == 0  # --no-wait, or Ctrl-C while following
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "geximpute submit: job j1 succeeded"
    # the first line of the server's reason only: the logs it repeats were streamed already
    assert lines[1].endswith("job j2 FAILED: Job entrypoint command failed with exit code 2, last available logs:")
    assert "ray job logs --follow j3 --address http://h:8265" in lines[2] and "ray job stop j3" in lines[2]


def test_a_detached_job_is_not_reported_as_success(capsys):
    """Ctrl-C while following, or a job server gone for good: the job may still run, and the exit status says so
    (0 would read as success to cron or a script)."""
    from geximpute.runtime.submit import DETACHED_STATUS, JobResult, report

    assert report(JobResult("j4", "http://h:8265", "RUNNING", detached=True)) == DETACHED_STATUS
    assert report(JobResult("j5", "http://h:8265", "UNKNOWN", "job server out of reach: gone", detached=True)) \
        == DETACHED_STATUS
    err = capsys.readouterr().err
    assert "job j5 may still be running (job server out of reach: gone)" in err and "ray job logs --follow j5" in err


class _FlakyClient:
    """A job server whose log stream breaks off and whose status answers fail ``fails`` times (``None``: always)."""

    def __init__(self, fails: int | None, status: str = "SUCCEEDED") -> None:
        self.fails, self.status, self.calls = fails, status, 0

    async def tail_job_logs(self, _id):
        import aiohttp

        yield "first lines\n"
        raise aiohttp.ServerDisconnectedError()

    def get_job_status(self, _id):
        import requests
        from ray.job_submission import JobStatus

        self.calls += 1
        if self.fails is None or self.calls <= self.fails:
            raise requests.ConnectionError("connection refused (the port-forward died)")
        return JobStatus(self.status)

    def get_job_info(self, _id):
        return type("Info", (), {"message": "done"})()


def test_following_survives_a_broken_stream_and_stops_when_the_server_is_gone(caplog):
    import io

    from geximpute.runtime.submit import wait_for

    out = io.StringIO()
    result = wait_for(_FlakyClient(fails=2), "j6", "http://127.0.0.1:1", out, poll_s=0.01, patience_s=60)
    assert (result.status, result.detached) == ("SUCCEEDED", False) and out.getvalue() == "first lines\n"
    assert "log stream of j6 broke off" in caplog.text
    gone = wait_for(_FlakyClient(fails=None), "j7", "http://127.0.0.1:1", io.StringIO(), poll_s=0.01, patience_s=0.2)
    assert (gone.status, gone.detached) == ("UNKNOWN", True) and "out of reach" in gone.message


@pytest.mark.parametrize("answer", [404, 502])
def test_an_address_that_is_not_a_ray_job_server_is_a_clear_error(answer, monkeypatch):
    """A web server that answers 404 (not a dashboard) or 502 (an ingress whose cluster is down): a clear error,
    not the Jobs SDK's traceback."""
    import http.server
    import threading

    from geximpute.runtime.submit import _client

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server API)
            self.send_response(answer)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            monkeypatch.delenv(var, raising=False)
        with pytest.raises(GeximputeError, match=r"cannot reach a Ray job server at http://127\.0\.0\.1:\d+"):
            _client(f"http://127.0.0.1:{server.server_address[1]}", None)
    finally:
        server.shutdown()


class _DeadTunnelClient:
    """A job server behind a tunnel whose far end died: the log stream says nothing more and never ends, and every
    status request hangs (until ``released``)."""

    def __init__(self) -> None:
        import threading

        self.released = threading.Event()
        self.asked = 0
        self.waited_out = False  # a status request held for its whole 30 s: the caller waited on it

    async def tail_job_logs(self, _id):
        import asyncio

        yield "first lines\n"
        await asyncio.Event().wait()  # silent for ever

    def get_job_status(self, _id):
        self.asked += 1
        if not self.released.wait(30):
            self.waited_out = True
        raise AssertionError("a hung request was waited for")

    def get_job_info(self, _id):
        raise AssertionError("no status, no info")


def test_following_ends_when_the_stream_is_silent_and_requests_hang():
    """A silent log stream has the job's status asked; requests that hang count as the server out of reach, and
    ``patience_s`` of that ends the wait (detached). Before, a dead SSH tunnel held the stream's read and then a
    status request without a timeout for hours, whatever the 5-minute patience said."""
    import io

    from geximpute.runtime.submit import wait_for

    client, out = _DeadTunnelClient(), io.StringIO()
    try:
        result = wait_for(client, "j8", "http://127.0.0.1:1", out, poll_s=0.01, patience_s=0.3, answer_s=0.1,
                          quiet_s=0.2)
    finally:
        client.released.set()
    assert (result.status, result.detached) == ("UNKNOWN", True) and "out of reach" in result.message
    assert out.getvalue() == "first lines\n" and client.asked >= 2 and not client.waited_out

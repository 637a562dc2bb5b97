"""The cluster files under ``cluster/`` and the ``jobs`` entry points they name.

Every YAML loads; every ``python -m geximpute.jobs.X`` it names is a module with a ``main()``; the Ray and Python
versions of the
images match ``pyproject.toml``; ``cluster/ray-cluster.yaml`` passes the schema ``ray up`` checks (shipped inside the
``ray`` package); every KubeRay manifest passes the KubeRay v1.7.0 CRD schema in ``../shared/schemas``, strictly (an
unknown field is an error, as with ``kubectl apply --validate=strict``); GPUs are asked for as ``nvidia.com/gpu``
limits; token authentication is on everywhere and no token is written down.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import yaml

from geximpute import __version__

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRDS = REPO.parent / "shared" / "schemas" / "kuberay-v1.7.0"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
ENTRY = re.compile(r"python -m geximpute\.jobs\.(\w+)((?:\s+--\S+(?:\s+[^-\s&|;]\S*)?)*)")


def _pins() -> tuple[str, str]:
    """(Ray version, Python tag like ``py311``) from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (ray,) = [m.group(1) for d in project["dependencies"] if (m := re.fullmatch(r"ray\[[^]]*\]==([\d.]+)", d))]
    low = re.search(r">=\s*3\.(\d+)", project["requires-python"]).group(1)
    high = re.search(r"<\s*3\.(\d+)", project["requires-python"]).group(1)
    assert int(high) == int(low) + 1, "requires-python must pin one Python minor version for the images to match"
    return ray, f"py3{low}"


RAY, PY = _pins()


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _walk(node, path: str = "") -> Iterator[tuple[str, object]]:
    """Every (dotted path, value) in a YAML document, leaves and inner nodes."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _strings(doc) -> Iterator[str]:
    return (v for _, v in _walk(doc) if isinstance(v, str))


def _ray_cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster specs in a KubeRay manifest (the cluster's own, or the one its RayJob creates)."""
    spec = doc["spec"]
    if doc["kind"] == "RayCronJob":
        spec = spec["jobTemplate"]
    found = spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec")
    assert found, f"{doc['kind']} {doc['metadata']['name']}: no Ray cluster spec (clusterSelector is not used here)"
    return [found]


def _containers(cluster_spec: dict) -> Iterator[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster_spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        for container in group["template"]["spec"]["containers"]:
            yield name, container


def _kuberay_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAMLS for d in _docs(p) if str(d.get("apiVersion", "")).startswith("ray.io/")]


def test_the_cluster_files_are_there():
    names = {str(p.relative_to(CLUSTER)) for p in YAMLS}
    assert {"ray-cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml",
            "kuberay/rayjob-impute.yaml", "kuberay/raycronjob-nightly.yaml"} <= names
    assert {d["kind"] for _, d in _kuberay_docs()} == {"RayCluster", "RayJob", "RayCronJob"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_entry_point_exists_and_takes_a_config(path):
    for doc in _docs(path):
        for text in _strings(doc):
            for module, args in ENTRY.findall(text):
                job = importlib.import_module(f"geximpute.jobs.{module}")
                assert callable(getattr(job, "main", None)), f"{path.name}: geximpute.jobs.{module} has no main()"
                assert "--config " in args, f"{path.name}: `python -m geximpute.jobs.{module}` without --config"
                with pytest.raises(SystemExit) as exit_:
                    job.main(["--help"])
                assert exit_.value.code == 0


def test_the_kuberay_jobs_cover_every_step():
    named = {m for _, d in _kuberay_docs() for text in _strings(d) for m, _ in ENTRY.findall(text)}
    assert {"build", "impute", "nightly"} <= named  # build: prepare, train and fit-head in one job


def test_ray_and_python_versions_match_pyproject():
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    images = [v for k, v in _walk(launcher) if re.search(r"(^|\.)docker\.(image|head_image|worker_image)$", k)]
    assert images, "ray-cluster.yaml names no Ray image"
    for image in images:
        assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY)}-{PY}-(cpu|gpu)", image), image

    for path, doc in _kuberay_docs():
        for spec in _ray_cluster_specs(doc):
            assert spec["rayVersion"] == RAY, f"{path.name}: rayVersion {spec['rayVersion']} is not {RAY}"
            for group, container in _containers(spec):
                tag = container["image"].rsplit(":", 1)[1]
                assert re.fullmatch(rf"{re.escape(__version__)}-ray{re.escape(RAY)}-{PY}-(cpu|gpu)", tag), (
                    f"{path.name}: {group} runs {container['image']}; expected geximpute {__version__} on Ray {RAY}, "
                    f"{PY}")

    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY)}-{PY}-\$\{{VARIANT\}}$", dockerfile, re.M)


def test_ray_up_config_passes_rays_own_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    # what Ray checks after the schema, and the shape this file promises: a head, CPU and GPU worker types
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert sum(t.get("max_workers", 0) for t in workers.values()) <= config["max_workers"]
    assert all(t.get("min_workers", 0) < t["max_workers"] for t in workers.values()), "every worker type autoscales"
    gpu = {n for n, t in workers.items() if "gpu" in t.get("docker", {}).get("worker_image", "")}
    assert gpu and gpu != set(workers), "one GPU worker type (its own CUDA image) beside CPU worker types"
    for name, node_type in types.items():  # the install matches the hardware: the `gpu` extra only with CUDA
        commands = node_type.get("worker_setup_commands") or config["head_setup_commands"]
        extra = "gpu" if name in gpu else "cpu"
        assert any(f"geximpute[{extra}]" in c for c in commands), name
        assert any("torch==2.13.0" in c for c in commands), name
        assert ("download.pytorch.org/whl/cpu" in " ".join(commands)) == (extra == "cpu"), name
    # the head offers no CPU to tasks (the control plane and the drivers run there), and a node whose shared
    # volume did not mount stops instead of writing to a folder of its own
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    mount = next(c for c in config["initialization_commands"] if "mount -t" in c)
    assert mount.rstrip().endswith("exit 1; }") and "|| echo" not in mount


def _strict(schema):
    """A copy of a CRD schema in which an object with declared properties rejects any other key."""
    schema = copy.deepcopy(schema)
    for _, node in _walk(schema):
        if (isinstance(node, dict) and "properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
    return schema


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict]:
    """kind -> the strict openAPIV3Schema of its ``ray.io/v1`` version in KubeRay v1.7.0."""
    assert CRDS.is_dir(), f"KubeRay CRDs {CRDS} not found: ../shared must sit beside the checkout"
    schemas = {}
    for path in CRDS.glob("ray.io_*.yaml"):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 3 MB of YAML
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[crd["spec"]["names"]["kind"]] = _strict(v1["schema"]["openAPIV3Schema"])
    return schemas


@pytest.mark.parametrize("path", [p for p in YAMLS if p.parent.name == "kuberay"], ids=lambda p: p.name)
def test_kuberay_manifests_pass_the_v1_7_crd_schemas(path, crd_schemas):
    for doc in _docs(path):
        if not str(doc.get("apiVersion", "")).startswith("ray.io/"):
            assert doc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in doc["spec"]["accessModes"]
            continue
        assert doc["apiVersion"] == "ray.io/v1"
        errors = sorted(jsonschema.Draft7Validator(crd_schemas[doc["kind"]]).iter_errors(doc), key=str)
        assert not errors, "\n".join(f"{path.name}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_gpus_are_kubernetes_limits_on_gpu_images():
    for path, doc in _kuberay_docs():
        for spec in _ray_cluster_specs(doc):
            gpu_groups = set()
            for group, container in _containers(spec):
                resources = container.get("resources", {})
                wants_gpu = "nvidia.com/gpu" in resources.get("requests", {}) | resources.get("limits", {})
                if wants_gpu:
                    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, f"{path.name}: {group}"
                    gpu_groups.add(group)
                assert container["image"].endswith("-gpu") == wants_gpu, f"{path.name}: {group} {container['image']}"
            assert gpu_groups, f"{path.name}: no GPU worker group"
            assert "num-gpus" not in str(spec), f"{path.name}: GPUs come from the limits, not rayStartParams"


def test_token_authentication_stays_on_and_no_token_is_written_down():
    for path, doc in _kuberay_docs():
        for spec in _ray_cluster_specs(doc):
            assert spec["authOptions"]["mode"] == "token", path.name
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for path in YAMLS:
        for doc in _docs(path):
            for key, value in _walk(doc):
                if isinstance(value, dict) and value.get("name") in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
                    assert "value" not in value, f"{path.name}: {key} writes a token into the manifest"
            assert not any(re.search(r"RAY_AUTH_TOKEN=\S", s) for s in _strings(doc)), path.name


# --- the jobs entry points ------------------------------------------------------------------------------------------


@pytest.fixture
def calls(monkeypatch):
    """Record every ``geximpute`` command a job runs; ``fail`` names the subcommands that exit with status 2."""
    from geximpute.apps import cli

    seen: list[list[str]] = []
    fail: set[str] = set()

    def fake_main(argv):
        seen.append(list(argv))
        return 2 if argv[0] in fail else 0

    monkeypatch.setattr(cli, "main", fake_main)
    return seen, fail


@pytest.mark.parametrize(("module", "command"), [
    ("ingest", ["ingest"]), ("prepare", ["prepare", "--training", "--targets", "none"]), ("train", ["train"]),
    ("fit_head", ["fit-head"]),
    ("impute", ["impute"]), ("nightly", ["nightly"]),
])
def test_each_job_is_its_geximpute_step(calls, module, command):
    seen, _ = calls
    job = importlib.import_module(f"geximpute.jobs.{module}")
    assert job.main(["--config", "c.yaml", "--set", "a.b=1", "--set", "c=2"]) == 0
    assert seen == [[*command, "--config", "c.yaml", "--set", "a.b=1", "--set", "c=2"]]


def test_every_job_ends_its_process_as_the_geximpute_command_does():
    """A job's ``__main__`` ends through ``cli.run`` (its status once the atexit handlers ran, without the
    interpreter's teardown of native libraries that at times aborted with 134 instead of the step's status), as
    ``geximpute`` does; a step's error is its status."""
    import subprocess
    import sys

    for path in sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.py")):
        if path.name == "__init__.py":
            continue
        tail = path.read_text().split('if __name__ == "__main__":', 1)[-1]
        assert "cli.run(main)" in tail and "sys.exit" not in tail, path.name
    done = subprocess.run([sys.executable, "-m", "geximpute.jobs.impute", "--config", "absent.yaml"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "absent.yaml: config file not found" in done.stderr, done.stderr


def test_every_entrypoint_is_one_command_without_shell_operators():
    """KubeRay's K8sJobMode submitter pastes ``spec.entrypoint`` into its own ``bash -c`` line (``ray job submit ...
    -- ENTRYPOINT ; ray job logs ...``): a ``&&``, ``;`` or ``|`` in it would end the Ray job's command there and run
    the rest in the submitter's pod (a training RayJob ran only ``prepare`` and reported success)."""
    for path, doc in _kuberay_docs():
        spec = doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]
        if "entrypoint" not in spec:
            continue
        entry = spec["entrypoint"]
        assert not re.search(r"&&|\|\||[;|&`]|\$\(", entry), f"{path.name}: entrypoint {entry!r} is several commands"
        assert len(ENTRY.findall(entry)) == 1 and entry.startswith("python -m geximpute.jobs."), (path.name, entry)


def test_build_runs_the_model_steps_in_order(calls):
    from geximpute.jobs import build

    seen, fail = calls
    assert build.main(["--config", "c.yaml", "--set", "train.use_gpu=true"]) == 0
    assert [argv[0] for argv in seen] == ["prepare", "train", "fit-head"]
    assert seen[0][:4] == ["prepare", "--training", "--targets", "none"]
    assert all(argv[-4:] == ["--config", "c.yaml", "--set", "train.use_gpu=true"] for argv in seen)
    seen.clear()
    fail.add("prepare")
    assert build.main(["--config", "c.yaml"]) == 2 and [argv[0] for argv in seen] == ["prepare"]


def test_pipeline_runs_the_steps_in_order_and_stops_at_the_first_failure(calls):
    from geximpute.jobs import pipeline

    seen, fail = calls
    assert pipeline.main(["--config", "c.yaml"]) == 0
    assert [argv[0] for argv in seen] == ["prepare", "train", "fit-head", "impute"]
    assert seen[0][:4] == ["prepare", "--training", "--targets", "none"]
    assert all(argv[-2:] == ["--config", "c.yaml"] for argv in seen)

    seen.clear()
    fail.add("train")
    assert pipeline.main(["--config", "c.yaml"]) == 2
    assert [argv[0] for argv in seen] == ["prepare", "train"]


def test_a_local_ray_is_started_here_whatever_ray_address_says(monkeypatch, tmp_path):
    """``ray.address: null`` starts a Ray of its own: without an address, ``ray.init`` joins ``$RAY_ADDRESS`` (the
    Jobs API address `geximpute submit` reads failed there as an invalid Ray Client address) or the cluster a
    `ray start` on this machine recorded (where the config's CPUs are refused)."""
    import os

    import ray

    from geximpute.config import RayConfig
    from geximpute.runtime import raytools

    seen = {}
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    # what ensure_ray sets for a local Ray, restored after the test (later subprocesses inherited them)
    for name in ("RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    token = tmp_path / ".ray" / "auth_token"
    monkeypatch.setattr(raytools.Path, "home", classmethod(lambda cls: tmp_path))

    def init(**kwargs):  # Ray 2.60 writes the token it generates under the umask: 0644 on most systems
        seen.update(kwargs)
        if not token.exists():
            token.parent.mkdir(exist_ok=True)
            token.write_text("secret")
            token.chmod(0o644)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert raytools.ensure_ray(RayConfig(num_cpus=2)) is True
    assert seen["address"] == "local" and seen["num_cpus"] == 2
    assert token.stat().st_mode & 0o777 == 0o600  # the generated token readable by its owner alone
    token.chmod(0o640)  # the user's own token (a group's, say): left as it is
    raytools.ensure_ray(RayConfig(num_cpus=2))
    assert token.stat().st_mode & 0o777 == 0o640
    seen.clear()
    assert raytools.ensure_ray(RayConfig(address="ray://head:10001")) is True
    assert seen["address"] == "ray://head:10001" and "num_cpus" not in seen

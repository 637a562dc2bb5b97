"""``geximpute benchmark`` at a tiny scale on the session's local Ray: bench.json's keys and sanity (one point in
the default suite, the genes and donors series in the slow one; each point imputed by a driver process of its own,
peak memory per process kind), the plot, and the promoter-encoder cache against the network's own per-batch
encoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_NETWORK

from geximpute.apps.cli import main
from geximpute.model.features import FeatureSpec
from geximpute.model.network import HybridNet, NetworkSpec
from geximpute.science.promoters import PromoterLookup

TINY = [
    *TINY_NETWORK,
    "train.batch_size=32",
    "train.fold_fraction=0.3",
    "train.folds=1",  # one network (the encoder counts below are per network), the head on its fold
    "head.num_boost_round=10",
    "impute.predictors=1",  # one predictor actor to start per imputation run
]


def run_bench(out: Path, scales: tuple[str, ...], gene_scales: tuple[str, ...]) -> dict:
    argv = ["-q", "benchmark", "--out", str(out), "--genes", "40", "--donors", "4", "--tissues", "3",
            "--scales", *scales, "--gene-scales", *gene_scales, "--epochs", "1", "--max-examples", "256",
            "--encoder-entries", "100"]
    for item in TINY:
        argv += ["--set", item]
    assert main(argv) == 0
    return json.loads((out / "bench.json").read_text())


@pytest.fixture(scope="module")
def bench(ray_local, tmp_path_factory) -> tuple[dict, Path]:
    """One point (40 genes x 4 donors), measured as every point of a series is. The series themselves (twice the
    donors; twice the genes, with a second bundle: 20-35 s more) run in the slow suite
    (test_the_genes_and_donors_series_grow_with_a_driver_per_point): the default suite stays within its 9 minutes."""
    out = tmp_path_factory.mktemp("bench")
    return run_bench(out, ("1",), ("1",)), out


def test_bench_json_has_the_comparable_keys_and_sane_figures(bench):
    data, out = bench
    for key in ("impute_entries_per_min", "encoder_calls_per_entry", "device", "series", "scaling", "stages",
                "targets"):
        assert key in data
    assert data["device"].startswith(("cpu: ", "gpu: "))
    assert data["impute_entries_per_min"] > 0
    assert 0 < data["encoder_calls_per_entry"] < 1
    # the scaling series of issue 8 (the donors series): one point here
    scaling = data["scaling"]
    assert [s["donors"] for s in scaling] == [4] and scaling[0]["entries"] > 0
    for step in scaling:
        assert step["seconds"] > 0 and step["peak_rss_mb"] > 0
        assert set(step) >= {"entries", "seconds", "peak_rss_mb"}
    for name in ("prepare", "train", "fit_head", "impute"):
        assert data["stages"][name]["seconds"] > 0
    assert data["stages"]["train"]["samples_per_second"] > 0
    assert (out / "bench.png").stat().st_size > 0
    assert not (out / "work").exists()  # scratch removed


def test_a_point_measures_peak_memory_per_process_kind_in_a_driver_of_its_own(bench):
    points = bench[0]["series"]
    assert [(p["genes"], p["donors"]) for p in points] == [(40, 4)]
    check_points(points)
    assert bench[0]["series_growth"] == {}


@pytest.mark.slow
def test_the_genes_and_donors_series_grow_with_a_driver_per_point(ray_local, tmp_path):
    data = run_bench(tmp_path / "bench", ("1", "2"), ("1", "2"))
    check_series(data)
    assert data["stages"]["bundle_genes_x2"]["seconds"] > 0
    scaling = data["scaling"]
    assert [s["donors"] for s in scaling] == [4, 8]
    assert all(s["time_ratio"] > 0 for s in scaling[1:])


def check_points(points: list[dict]) -> None:
    """Each point measured in a driver of its own, with its context and predictor actors."""
    for point in points:
        assert point["tissues"] == 3 and point["entries"] > 0 and point["seconds"] > 0
        # the imputation's own driver process, its context and predictor actors, each measured
        assert {"driver", "context", "predictor"} <= set(point["peak_rss_mb"]), point["peak_rss_mb"]
        assert all(mb > 0 for mb in point["peak_rss_mb"].values())
        # the driver is a new process per point, not the benchmark's (which trained the networks)
        assert point["peak_rss_mb"]["driver"] < point["peak_rss_detail_mb"]["all"]
        # the heap leaves out shared pages (the object store a process has read, shared libraries)
        assert set(point["peak_heap_mb"]) == set(point["peak_rss_mb"])
        for kind in ("driver", "context", "predictor"):
            assert 0 < point["peak_heap_mb"][kind] < point["peak_rss_mb"][kind], (kind, point)


def check_series(data: dict) -> None:
    """bench.json's genes and donors series: each point, each series' growth and targets."""
    points = {(p["genes"], p["donors"]): p for p in data["series"]}
    assert set(points) == {(40, 4), (40, 8), (80, 4)}
    check_points(list(points.values()))
    assert points[(80, 4)]["entries"] > points[(40, 4)]["entries"]  # twice the genes
    assert points[(40, 8)]["entries"] > points[(40, 4)]["entries"]  # twice the donors
    growth = data["series_growth"]
    assert set(growth) == {"genes", "donors"}
    assert growth["genes"]["from"]["genes"] == 40 and growth["genes"]["to"]["genes"] == 80
    assert growth["donors"]["to"]["donors"] == 8
    for g in growth.values():
        assert g["entries_ratio"] > 1 and g["time_ratio"] > 0
        assert {"driver", "context", "predictor"} <= set(g["peak_rss_ratio"])
        assert set(g["peak_heap_ratio"]) == set(g["peak_rss_ratio"])
    # the targets are for 4x: judged only where the entries grew at least 3.5x (the donors series grows
    # the missing profiles too), else left open
    for name, g in growth.items():
        for target in (f"series_{name}_memory", f"series_{name}_heap", f"series_{name}_time"):
            met = data["targets"][target]["met"]
            assert met is None if g["entries_ratio"] < 3.5 else isinstance(met, bool), (target, g)


def test_sharing_encodes_each_haplotype_once_and_beats_a_copy_per_entry(bench):
    enc = bench[0]["encoder"]
    assert enc["shared"]["encoded_sequences"] == enc["distinct_haplotype_rows"]
    assert enc["per_entry"]["encoded_sequences"] == 2 * enc["entries"]
    assert enc["per_entry"]["encoder_calls_per_entry"] == 2.0
    assert enc["shared"]["encoder_calls_per_entry"] < enc["per_entry"]["encoder_calls_per_entry"]


def test_cached_encoder_gives_the_network_its_own_predictions():
    """run_network's promoter cache (one CNN pass per unique row, kept across batches) changes no prediction."""
    import pyarrow as pa

    from geximpute import schema as S
    from geximpute.model.features import featurize, to_tensors
    from geximpute.model.inference import PromoterEncoderCache, TrainedNetwork, run_network

    torch.manual_seed(0)
    spec = NetworkSpec(n_tissues=3, promoter_length=40, d_model=8, n_heads=2, n_layers=1, cnn_channels=8,
                       cnn_kernel=5, cnn_layers=2)
    net = HybridNet(spec).eval()
    network = TrainedNetwork(spec, FeatureSpec(k_neighbours=4, n_tissues=3, promoter_length=40),
                             net.state_dict(), {})
    rng = np.random.default_rng(0)
    table = np.eye(4, dtype=np.uint8)[rng.integers(0, 4, size=(5, 40))].transpose(0, 2, 1).copy()  # (5, 4, 40)
    n = 50
    empty = pa.array([[]] * n, pa.list_(pa.float32()))
    columns = {name: pa.nulls(n, field.type) for name, field in zip(S.CONTEXT.names, S.CONTEXT, strict=True)}
    columns.update({
        "gene_index": pa.array(rng.integers(0, 6, n).astype(np.int32)),
        "sample_index": pa.array(rng.integers(0, 4, n).astype(np.int32)),
        "tissue_index": pa.array(rng.integers(0, 3, n).astype(np.int16)),
        "tissue_mean": pa.array(rng.normal(size=n).astype(np.float32)),
        "gene_mean": pa.array(rng.normal(size=n).astype(np.float32)),
        "tissue_offset": pa.array(np.zeros(n, np.float32)),
        "nb_value": empty, "nb_logdist": empty, "nb_gene_mean": empty, "tis_value": empty, "tis_corr": empty,
        "tis_mean": empty, "nb_orient": pa.array([[]] * n, pa.list_(pa.int8())),
        "nb_overlap": pa.array([[]] * n, pa.list_(pa.bool_())), "tis_index": pa.array([[]] * n, pa.list_(pa.int16())),
    })
    records = pa.table(columns)
    # genes 0-4 read rows 0-4, gene 5 has none; donor 1's gene 2 carries rows (3, 4)
    lookup = PromoterLookup(np.array([0, 1, 2, 3, 4, -1]), np.array([0, 1, 0, 1]), np.array([2 * 2 + 1]),
                            np.array([[3, 4]]), 2)
    batch = featurize(records, network.features, lookup.for_records(records))
    with torch.no_grad():
        direct, direct_emb = net(to_tensors(batch), torch.as_tensor(table))
    cached, cached_emb = run_network(network, records, table, lookup, batch_size=7)
    np.testing.assert_allclose(cached, network.features.unstandardise(direct.numpy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cached_emb, direct_emb.numpy(), rtol=1e-5, atol=1e-6)
    cache = network._inference[0].promoter_cnn
    assert isinstance(cache, PromoterEncoderCache)
    used = int((np.unique(np.concatenate(lookup.for_records(records))) >= 0).sum())
    assert cache.encoded == used  # each row the records read, once
    run_network(network, records, table, lookup)
    assert cache.encoded == used  # the same table again: nothing re-encoded
    run_network(network, records, table, lookup, device="cpu:0")
    assert network._inference[0].promoter_cnn is cache  # one device however named (cuda is cuda:0 on a GPU)
    run_network(network, records, table, lookup, precision="bf16")
    assert network._inference[0].promoter_cnn is not cache  # embeddings of another precision: a cache of its own
    run_network(network, records, table, lookup)  # back to full precision: encoded again, not bf16's reused
    assert network._inference[0].promoter_cnn.encoded == used

    # a GPU predictor's code path (bf16 autocast, batches copied to the device, float32 back) run on the CPU
    from geximpute.model.inference import autocast_dtype

    low_precision = TrainedNetwork(network.spec, network.features, network.state, {})
    low, low_emb = run_network(low_precision, records, table, lookup, batch_size=7, device="cpu", precision="bf16")
    assert low.dtype == np.float32 and low_emb.dtype == np.float32
    assert low_precision._inference[0].promoter_cnn.embeddings.dtype == torch.float32
    assert not np.array_equal(low, cached)  # bf16 really ran
    np.testing.assert_allclose(low, cached, rtol=0.05, atol=0.05)
    assert autocast_dtype(torch.device("cuda")) == torch.bfloat16 and autocast_dtype(torch.device("cpu")) is None
    assert autocast_dtype(torch.device("cuda"), "fp32") is None
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype(torch.device("cpu"), "fp16")

    # every row encoded once beforehand (imputation: once per run, shipped to the predictors): the same
    # predictions, with no CNN pass and no one-hot table where they are made
    import pickle

    from geximpute.apps.benchmark import EncoderCounter
    from geximpute.model.inference import encode_promoters

    embeddings = encode_promoters(network, table)
    assert embeddings.shape[0] == len(table) and embeddings.dtype == np.float32
    shipped = TrainedNetwork(network.spec, network.features, network.state, {})
    with EncoderCounter() as counter:
        pre, pre_emb = run_network(shipped, records, np.zeros((0, 4, 40), np.uint8), lookup, batch_size=7,
                                   embeddings=embeddings)
    assert counter.sequences == 0
    np.testing.assert_allclose(pre, cached, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pre_emb, cached_emb, rtol=1e-5, atol=1e-6)
    # a network sent to another process leaves its built network and promoter cache behind
    assert shipped._inference is not None and pickle.loads(pickle.dumps(shipped))._inference is None


def test_peak_rss_of_a_subprocess_driver_is_the_subprocess_s_own():
    """The driver kind is the subprocess's memory from the first sample on, never the (larger) measuring process."""
    import os
    import sys

    import psutil

    from geximpute.apps.benchmark import measured_subprocess

    ballast = np.ones(64 * 2**20 // 8)  # this process: well above a bare interpreter
    proc, _, peak, seconds = measured_subprocess([sys.executable, "-c", "import time; time.sleep(0.5)"],
                                                 dict(os.environ))
    mine = psutil.Process().memory_info().rss
    assert proc.returncode == 0 and seconds >= 0.5
    assert 0 < peak.kinds["driver"] < 64 * 2**20 < mine, (peak.kinds, mine)
    del ballast


def test_a_driver_s_peak_between_samples_is_its_peak_and_ray_s_agents_are_not_workers():
    """The driver's peak is its high-water mark (the kernel's ``VmHWM``, read at each sample), not the largest of
    the samples' RSS: a brief 300 MiB peak between two samples is not missed. Ray 2.60's agents title themselves
    ``ray::...``: Ray's own, not a worker of the run."""
    import os
    import sys

    from geximpute.apps.benchmark import measured_subprocess, process_kind

    code = "import time; time.sleep(0.3); b = b'x' * (300 * 2**20); del b; time.sleep(0.8)"
    proc, _, peak, _ = measured_subprocess([sys.executable, "-c", code], dict(os.environ))
    assert proc.returncode == 0 and peak.kinds["driver"] >= 300 * 2**20, peak.kinds
    for title in ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::IDLE_SpillWorker"):
        assert process_kind(title, "python") == "ray_system", title
    assert process_kind("ray::MapWorker(MapBatches(Predictor))", "python") == "predictor"


def test_a_kind_seen_at_one_end_of_a_series_leaves_its_memory_target_unjudged():
    """A kind at one end only (a chromosome's cutting task runs only above CUT_TASK_CELLS) has no ratio: it is
    named, and the series' memory target is not read as met without it."""
    from geximpute.apps.benchmark import series_growth

    first = {"genes": 1, "donors": 1, "entries": 100, "seconds": 10.0, "peak_rss_mb": {"driver": 500, "writer": 300},
             "peak_heap_mb": {"driver": 400, "writer": 200}}
    last = {"genes": 4, "donors": 1, "entries": 400, "seconds": 30.0,
            "peak_rss_mb": {"driver": 550, "writer": 310, "cut": 2400}, "peak_heap_mb": {"driver": 420}}
    growth = series_growth([first, last])
    assert growth["kinds_at_one_end"] == ["cut"] and set(growth["peak_rss_ratio"]) == {"driver", "writer"}


def test_a_reused_worker_s_peak_goes_to_the_kind_it_ran(tmp_path):
    """A worker's high-water mark is read and reset at each sample: a peak reached while it ran one kind counts
    for that kind (and for the next one only within the interval of the switch), not for every later kind it runs
    (a reused task worker's baseline peak was the writer's and the encoder's). A worker started before the sampler
    has its earlier mark dropped."""
    import subprocess
    import sys

    import psutil

    from geximpute.apps.benchmark import PeakRSS

    code = ("import sys\nheld = None\nfor line in sys.stdin:\n"
            "    held = b'x' * (int(line) * 2**20) if int(line) else None\n    held = None\n"
            "    print('ok', flush=True)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        def spike(mib: int) -> None:
            child.stdin.write(f"{mib}\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "ok"

        spike(400)  # before the sampler: an earlier stage's peak
        peak = PeakRSS(driver_pid=-1)
        proc = psutil.Process(child.pid)
        peak._worker_kind(proc, "baselines", proc.memory_info())
        assert peak.kinds["baselines"] < 300 * 2**20  # the earlier peak dropped
        spike(300)  # while it runs baselines
        peak._worker_kind(proc, "baselines", proc.memory_info())
        assert peak.kinds["baselines"] >= 300 * 2**20
        spike(0)
        peak._worker_kind(proc, "baselines", proc.memory_info())
        peak._worker_kind(proc, "writer", proc.memory_info())  # now it writes: baselines' peak is not the writer's
        assert peak.kinds["writer"] < 200 * 2**20, peak.kinds
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def test_the_benchmark_refuses_a_work_folder_it_did_not_make(tmp_path):
    """``<out>/work`` is removed when the benchmark ends: a user's ``work/`` under ``--out`` was deleted with exit
    status 0. Refused before anything is written; a benchmark's own (kept with --keep-work) is reused."""
    from geximpute.apps.benchmark import WORK_MARKER, check_work_folder, run_benchmark
    from geximpute.errors import GeximputeError

    mine = tmp_path / "project" / "work"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(GeximputeError, match=r"project/work: not a work folder of geximpute benchmark"):
        run_benchmark(tmp_path / "project")
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    kept = tmp_path / "kept" / "work"
    kept.mkdir(parents=True)
    (kept / WORK_MARKER).write_text("")
    (kept / "data-g40-d4").mkdir()
    check_work_folder(kept)  # a benchmark's own
    check_work_folder(tmp_path / "absent" / "work")
    (tmp_path / "empty" / "work").mkdir(parents=True)
    check_work_folder(tmp_path / "empty" / "work")

"""``geximpute benchmark``: every stage of the engine timed on synthetic data of a chosen scale.

One run::

    synth (every point of both series)
      -> prepare --training -> train (short) -> fit-head + bundle        (1x genes)
      -> prepare --training -> fit-head over the same networks + bundle  (each larger gene set)
      -> impute at every point, each in a driver process of its own      (the series)
      -> promoter-encoder comparison

and writes ``<out>/bench.json`` and ``<out>/bench.png``. Every stage records its wall time, its throughput (entries
or records per second; training samples per second) and the peak resident memory of the driver and of the Ray
worker processes (:class:`PeakRSS`).

The series (issue 15) grow the genes with the donors fixed (``gene_scales``) and the donors with the genes fixed
(``scales``). Each point is one ``geximpute impute`` end to end into Parquet, run as a new driver process (``python
-m geximpute.apps.cli impute``) that joins the benchmark's Ray, so that the driver's memory is the imputation's own
and not what training left in the benchmark's process. Every point records its peak RSS per process kind
(:data:`PROCESS_KINDS`: the driver, the context actors, the predictor actors, the Parquet writers, the encode, the
baseline and the chromosome-cutting tasks; the largest single process of each kind) and the growth between the first
and the last point of each series. A bundle is tied to its gene set (:func:`geximpute.fit.bundle.check_compatible`),
so each larger gene set gets its own bundle: prepare with training folds and a head fitted over the 1x networks
(:func:`geximpute.steps.pipeline.fit_head_and_save`).

The promoter-encoder comparison replays the imputation's prediction call (``Bundle.predict``, what
:class:`geximpute.steps.impute.Predictor` calls) in this process on every entry of a few genes (all their donors and
tissues, so their haplotype sharing is the whole run's), counting the sequences that go through the network's
``PromoterCNN`` with a forward hook. It runs twice on the same entries: as imputation does (each unique promoter
haplotype encoded once, :class:`geximpute.model.inference.PromoterEncoderCache`) and with a per-entry copy of every
entry's two promoter haplotypes, so that nothing is shared; the ratio of their times is the speed-up of sharing.

``bench.json`` carries at least ``impute_entries_per_min``, ``encoder_calls_per_entry``, ``device``, ``series``
(``[{"genes", "donors", "tissues", "entries", "seconds", "peak_rss_mb": {kind: MiB}}, ...]``) and ``scaling`` (the
donors series as issue 8 recorded it: ``[{"entries", "seconds", "peak_rss_mb"}, ...]``) so that runs can be
compared by script.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa

from geximpute import __version__
from geximpute.apps.synth import SynthSpec, generate
from geximpute.config import load_config
from geximpute.errors import GeximputeError
from geximpute.fit.bundle import load_bundle
from geximpute.model.network import PromoterCNN
from geximpute.runtime.atomic import discard
from geximpute.runtime.provenance import versions, write_json
from geximpute.runtime.raytools import ensure_ray
from geximpute.science.context import ContextIndex, build_context
from geximpute.steps.impute import BLOCK_ENTRIES, donor_promoter_inputs, donor_promoter_sequences, imputation_problem
from geximpute.steps.pipeline import Progress, build_bundle, fit_head_and_save
from geximpute.steps.prepare import prepare, sample_blocks

log = logging.getLogger(__name__)

#: the targets of issue 8, checked in ``bench.json`` (``targets``)
TARGET_ENTRIES_PER_MIN = 1_000_000
TARGET_DOUBLING_RATIO = 2.2
TARGET_MEMORY_GROWTH_4X = 0.20
TARGET_ENCODER_CALLS = 0.05
#: the targets of issue 15 for 4x genes or 4x donors: peak RSS of each process kind, wall time
TARGET_SERIES_MEMORY_GROWTH = 1.2
TARGET_SERIES_TIME_GROWTH = 4.4

#: process kinds of an imputation run, by the Ray worker's title (``ray::MapWorker(MapBatches(Predictor))``...):
#: the first kind whose marker the title contains; other Ray workers are ``other_ray_workers``
PROCESS_KINDS = (("context", ("ContextBuilder",)), ("predictor", ("Predictor",)), ("writer", ("Write",)),
                 ("encoder", ("encode_haplotypes",)), ("baselines", ("baseline_range",)), ("cut", ("cut_chromosome",)))
#: Ray's own processes (not workers), reported together as ``ray_system``
RAY_SYSTEM = ("raylet", "gcs_server", "dashboard", "agent", "log_monitor", "monitor", "runtime_env")
#: Ray's own processes that title themselves ``ray::...`` as workers do (Ray 2.60's agents, its spill/restore IO
#: workers): ``ray_system``, not a worker of the run
RAY_SYSTEM_TITLES = ("DashboardAgent", "RuntimeEnvAgent", "SpillWorker", "RestoreWorker", "DeleteWorker",
                     "IO_WORKER")

#: settings of the short training that makes the benchmark's bundle (the network keeps the default size)
TRAINING_OVERRIDES = (
    "evaluation.task=entries",
    "train.fold_fraction=0.1",
    "train.patience=100",
)


def process_kind(title: str, name: str) -> str:
    """The kind of a process of a run: a Ray worker by its title (``ray::...``, :data:`PROCESS_KINDS`), Ray's own
    daemons as ``ray_system``, anything else as ``other``."""
    if title.startswith("ray::") and any(marker in title for marker in RAY_SYSTEM_TITLES):
        return "ray_system"
    if title.startswith("ray::"):
        for kind, markers in PROCESS_KINDS:
            if any(marker in title for marker in markers):
                return kind
        return "other_ray_workers"
    if any(part in name for part in RAY_SYSTEM):
        return "ray_system"
    return "other"


class PeakRSS:
    """Samples resident memory and CPU time every ``interval`` seconds (less often in a long run:
    :attr:`SLOWDOWN`): this process, the Ray workers among its descendants (processes named ``ray::...``) and all
    its descendants (raylet and GCS too).

    With a local Ray started by this process, its workers are descendants; when Ray runs elsewhere (a cluster
    address) only the driver is seen. Shared memory (the object store) counts in every process that maps it. CPU
    time is what the processes used between the first and the last sample (a process that appears in between
    counts from its start), attributed to the process's name at each sample (``ray::MapWorker(...)``, ``raylet``);
    unlike wall time it hardly depends on what else the machine runs.

    Beside RSS each process's *heap* is sampled: RSS minus its shared pages (``top``'s SHR), the measure Ray's
    memory-management guide recommends for a worker's own memory, since every object-store page a process has read
    (a zero-copy ``ray.get`` of a numpy array, a Ray Data block) counts in its RSS and in the RSS of every other
    process that read it. Shared library code counts in SHR too, so the heap of a process is not less than what it
    allocated itself.

    The driver is this process, or the descendant whose pid is set in ``driver_pid`` (a driver started as a
    subprocess: then this process itself counts as ``other``). Processes in ``exclude`` (the idle Ray workers of
    this process's own Ray job, when a subprocess's job is measured) count in no kind.

    Attributes:
        driver: peak RSS of the driver, bytes.
        workers: peak of the summed RSS of the Ray worker processes.
        driver_workers: peak of driver + workers (sampled together).
        total: peak of this process and all its descendants.
        kinds: peak RSS of the largest single process of each kind (:func:`process_kind`, and ``driver``), bytes.
        heap_kinds: the same for the heap (RSS minus shared pages).
        cpu: CPU seconds per process name.
    """

    def __init__(self, interval: float = 0.2, driver_pid: int | None = None, exclude: set[int] = frozenset()) -> None:
        self.interval = interval
        self.driver_pid = driver_pid
        self.exclude = set(exclude)
        self.driver = self.workers = self.driver_workers = self.total = 0
        self.kinds: dict[str, int] = {}
        self.heap_kinds: dict[str, int] = {}
        self.cpu: dict[str, float] = {}
        self._last_cpu: dict[tuple[int, float], float] = {}
        self._worker_kinds: dict[int, str] = {}
        self._resettable: dict[int, bool] = {}
        self._started = time.time()
        self._own_mark = False
        self._first = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _account(self, proc: Any, name: str) -> None:
        times = proc.cpu_times()
        now = times.user + times.system
        key = (proc.pid, proc.create_time())
        before = self._last_cpu.get(key, now if self._first else 0.0)
        self._last_cpu[key] = now
        self.cpu[name] = self.cpu.get(name, 0.0) + max(now - before, 0.0)

    def _kind(self, kind: str, memory: Any, peak: int = 0) -> None:
        """Raise ``kind``'s peaks to this sample's RSS and heap (``memory``; None: none) and to ``peak``."""
        rss = 0 if memory is None else memory.rss
        self.kinds[kind] = max(self.kinds.get(kind, 0), rss, peak)
        if memory is not None:
            heap = memory.rss - getattr(memory, "shared", 0)
            self.heap_kinds[kind] = max(self.heap_kinds.get(kind, 0), heap)

    def _worker_kind(self, proc: Any, kind: str, memory: Any) -> None:
        """A Ray worker's sample: its RSS, and the kernel's high-water mark of it since the last reset (``VmHWM``:
        a peak between two samples is not missed), to its kind now; the mark is reset after each sample, so each
        sample reads its own interval's. A worker started before this sampler (one of an earlier stage) has its
        mark reset when first seen; a reused worker whose kind changes (a task worker that ran ``baseline_range``
        and now writes) has the interval's mark given to both kinds (the switch lies somewhere in it; an idle
        worker's kind gets none), so that the new kind is not given the old one's earlier peak. What a worker still
        holds from before stays in its RSS (a reused worker's memory is not the new task's alone). Where the mark
        cannot be reset (``clear_refs`` not writable), the worker's plain RSS is taken instead."""
        pid = proc.pid
        before = self._worker_kinds.get(pid)
        if before is None and proc.create_time() < self._started:
            self._resettable[pid] = _reset_high_water(pid)
        use_mark = self._resettable.get(pid, True)
        peak = _high_water(pid) if use_mark else 0
        if before is not None and before != kind and before != "other_ray_workers":
            self._kind(before, None, peak)
        self._worker_kinds[pid] = kind
        self._kind(kind, memory, peak)
        if use_mark:  # the next sample reads the mark of its own interval
            self._resettable[pid] = _reset_high_water(pid)

    def sample(self) -> None:
        """Take one sample now."""
        me = psutil.Process()
        driver_pid = self.driver_pid or me.pid
        try:
            own_memory = me.memory_info()
            own = own_memory.rss
            self._account(me, "driver" if driver_pid == me.pid else "benchmark")
            children = me.children(recursive=True)
        except psutil.Error:
            return
        driver = own if driver_pid == me.pid else 0
        driver_memory = own_memory if driver_pid == me.pid else None
        workers = 0
        others = 0 if driver_pid == me.pid else own
        for child in children:
            try:
                memory = child.memory_info()
                rss = memory.rss
                title = _title(child)
                if child.pid == driver_pid:
                    driver, driver_memory, name = rss, memory, "driver"
                elif child.pid in self.exclude:
                    others += rss
                    name = "benchmark_workers"
                elif title.startswith("ray::") and process_kind(title, child.name()) != "ray_system":
                    workers += rss
                    name = title.split(" ")[0]
                    self._worker_kind(child, process_kind(title, child.name()), memory)
                else:
                    others += rss
                    name = child.name()
                    self._kind(process_kind(title, name), memory)
                self._account(child, name)
            except psutil.Error:
                continue
        self._first = False
        if driver_memory is not None:
            # a driver started for this measurement (a series point): its whole life's high-water mark, a peak
            # between samples included; this process's own is not (it spans earlier stages)
            mark = _high_water(driver_pid) if driver_pid != me.pid or self._own_mark else 0
            self._kind("driver", driver_memory, mark)
        self.driver = max(self.driver, driver)
        self.workers = max(self.workers, workers)
        self.driver_workers = max(self.driver_workers, driver + workers)
        self.total = max(self.total, driver + workers + others)

    #: a long run is sampled less often: every ``elapsed / SLOWDOWN`` seconds once that exceeds ``interval``, at
    #: most every :attr:`MAX_INTERVAL` (each sample reads every process's memory: at 0.2 s the sampler alone took
    #: 200 CPU s of a 47-minute run on 2 cores; a peak shorter than the interval can be missed)
    SLOWDOWN = 600.0
    MAX_INTERVAL = 2.0

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            self.sample()
            elapsed = time.monotonic() - start
            self._stop.wait(min(max(self.interval, elapsed / self.SLOWDOWN), max(self.interval, self.MAX_INTERVAL)))

    def __enter__(self) -> PeakRSS:
        self._started = time.time()
        if self.driver_pid is None:  # this process is the driver: its mark from here on, not its earlier stages'
            self._own_mark = _reset_high_water(os.getpid())
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def report(self) -> dict[str, int]:
        """Peaks in MiB: ``driver``, ``workers``, ``driver_workers``, ``all`` (with raylet and GCS)."""
        mib = 2**20
        return {"driver": round(self.driver / mib), "workers": round(self.workers / mib),
                "driver_workers": round(self.driver_workers / mib), "all": round(self.total / mib)}

    def kinds_report(self, heap: bool = False) -> dict[str, int]:
        """Peak RSS (``heap``: RSS minus shared pages) in MiB of the largest process of each kind seen (``driver``
        first, then :data:`PROCESS_KINDS`, then the rest)."""
        order = ["driver", *(kind for kind, _ in PROCESS_KINDS), "other_ray_workers", "ray_system", "other"]
        peaks = self.heap_kinds if heap else self.kinds
        return {kind: round(peaks[kind] / 2**20) for kind in order if peaks.get(kind)}

    def cpu_report(self, top: int = 8) -> dict[str, float]:
        """CPU seconds of the ``top`` busiest process names, the rest summed as ``other``."""
        ranked = sorted(self.cpu.items(), key=lambda kv: -kv[1])
        out = {name: round(sec, 2) for name, sec in ranked[:top] if sec >= 0.01}
        rest = sum(sec for _, sec in ranked[top:])
        if rest >= 0.01:
            out["other"] = round(rest, 2)
        return out


def _high_water(pid: int) -> int:
    """The process's peak resident memory since it started or since :func:`_reset_high_water` (``VmHWM`` of
    ``/proc/PID/status``), bytes; 0 where it cannot be read (not Linux, gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _reset_high_water(pid: int) -> bool:
    """Reset the process's ``VmHWM`` to its resident memory now (``5`` to ``/proc/PID/clear_refs``); False where
    that cannot be written (another user's process, a kernel without it)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _title(proc: Any) -> str:
    """A process's title: the first word of its command line (``ray::Predictor...`` for a Ray worker)."""
    return " ".join(proc.cmdline()[:1])


def ray_worker_pids() -> set[int]:
    """Pids of the Ray workers among this process's descendants now (``ray::...`` titles)."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if _title(child).startswith("ray::"):
                pids.add(child.pid)
        except psutil.Error:
            continue
    return pids


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_description() -> dict[str, str]:
    """Where the benchmark's network ran, and what GPU there was.

    The benchmark's Ray has CPU predictor actors unless it has GPUs (then imputation's predictor actors each hold
    one and run the networks on it, :func:`geximpute.model.inference.inference_device`); ``device`` names the CPU,
    ``gpu`` says whether a GPU was present.
    """
    import torch

    device = f"cpu: {cpu_model()}, {usable_cores()} cores"
    if torch.cuda.is_available():
        gpu = (f"{torch.cuda.get_device_name(0)} present: predictor actors run the networks on it when Ray lists "
               "GPUs; the series' figures are end to end, not the GPU's alone")
    else:
        gpu = "none: no GPU on this machine (torch.cuda.is_available() is False); GPU figures not measured"
    return {"device": device, "gpu": gpu}


@dataclass(frozen=True)
class BenchSpec:
    """What one benchmark run measures. Checked on construction: a bad value raises ``ValueError``.

    Attributes:
        genes: genes at gene scale 1 (fixed over the donors series).
        donors: donors at donor scale 1 (fixed over the genes series).
        tissues: tissues.
        observed_fraction: share of (donor, tissue) cells with a sample (``SynthSpec.observed_cell_fraction``);
            the rest are missing profiles that imputation fills in.
        variant_density: variant sites per promoter window (``SynthSpec.variants_per_promoter``).
        scales: donor multipliers of the donors series, increasing; the first one trains the networks.
        gene_scales: gene multipliers of the genes series (at the first donor scale), increasing; the first one
            trains the networks, each other one gets a head over them.
        epochs: training epochs of the network.
        max_examples: training examples per epoch (``train.max_examples_per_epoch``).
        encoder_entries: entries of the promoter-encoder comparison (every entry of as many genes as it takes).
        seed: seed of the synthetic data and of the config.
        overrides: ``KEY=VALUE`` config overrides applied last (e.g. ``model.d_model=16``).
    """

    genes: int = 1000
    donors: int = 100
    tissues: int = 10
    observed_fraction: float = 0.6
    variant_density: int = 3
    scales: tuple[int, ...] = (1, 2, 4)
    gene_scales: tuple[int, ...] = (1, 2, 4)
    epochs: int = 1
    max_examples: int = 20_000
    encoder_entries: int = 8192
    seed: int = 0
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("genes", "donors", "tissues", "epochs", "max_examples", "encoder_entries"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"BenchSpec.{name}: expected an integer >= 1, got {value!r}")
        if self.donors < 3:
            raise ValueError(f"BenchSpec.donors: expected at least 3 (every tissue keeps 3 donors), got {self.donors}")
        if not isinstance(self.variant_density, int | np.integer) or self.variant_density < 0:
            raise ValueError(f"BenchSpec.variant_density: expected an integer >= 0, got {self.variant_density!r}")
        if not 0 < self.observed_fraction <= 1:
            raise ValueError(f"BenchSpec.observed_fraction: expected a number in (0, 1], got {self.observed_fraction}")
        for name in ("scales", "gene_scales"):
            scales = list(getattr(self, name))
            if not scales or any(not isinstance(s, int | np.integer) or s < 1 for s in scales) or scales != sorted(
                    set(scales)):
                raise ValueError(f"BenchSpec.{name}: expected increasing integers >= 1, got {getattr(self, name)!r}")

    def points(self) -> list[tuple[int, int]]:
        """(gene scale, donor scale) of every imputation run: the donors series, then the rest of the genes series
        (the first point is in both)."""
        g0, d0 = self.gene_scales[0], self.scales[0]
        return [(g0, d) for d in self.scales] + [(g, d0) for g in self.gene_scales[1:]]

    def synth_spec(self, gene_scale: int, donor_scale: int) -> Any:
        """The :class:`geximpute.apps.synth.SynthSpec` of one point (genes x ``gene_scale``, donors x
        ``donor_scale``)."""
        genes = self.genes * gene_scale
        # ~3.4 kb of chromosome per gene, as `geximpute synth` lays them out
        length = max(SynthSpec.chrom_length, genes * 3_400 // SynthSpec.n_chroms)
        return SynthSpec(seed=self.seed, n_genes=genes, n_donors=self.donors * donor_scale, n_tissues=self.tissues,
                         observed_cell_fraction=self.observed_fraction, variants_per_promoter=self.variant_density,
                         chrom_length=length)


@contextmanager
def measured(stages: dict[str, dict], name: str) -> Iterator[dict]:
    """Time a stage and sample its peak memory; the stage's dict (yielded, for the caller's figures) goes into
    ``stages[name]`` with ``seconds`` and ``peak_rss_mb``."""
    figures: dict[str, Any] = {}
    log.info("benchmark: %s ...", name)
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        yield figures
        seconds = time.perf_counter() - t0
    figures["seconds"] = round(seconds, 2)
    figures["cpu_seconds"] = round(sum(peak.cpu.values()), 2)
    figures["peak_rss_mb"] = peak.report()
    stages[name] = figures
    log.info("benchmark: %s done in %.1f s", name, seconds)


def _rate(count: float, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("nan")


# The model ---------------------------------------------------------------------------------------------------


def measured_bundle(config: Any, work: Path, stages: dict[str, dict]) -> Path:
    """:func:`geximpute.steps.pipeline.build_bundle` on every measured entry (prepare with training folds -> train ->
    fit-head -> bundle), each of its stages timed and memory-sampled by :func:`measured` into ``stages``.

    Returns:
        the bundle folder.
    """
    class Measured(Progress):
        def stage(self, name: str):  # type: ignore[override]
            return measured(self.stages, name)

    bundle = work / "model"
    build_bundle(config, targets="all", records_dir=work / "records", network_dir=work / "network", out=bundle,
                 progress=Measured(stages))
    fig = stages["prepare"]
    fig["records_per_second"] = _rate(fig["records"], fig["seconds"])
    fig = stages["train"]
    fig.pop("examples_per_epoch")  # the first network's: ``samples`` counts every fold network's epochs
    fig["samples_per_second"] = _rate(fig["samples"], fig["seconds"])
    fig = stages["fit_head"]
    fig["records_per_second"] = _rate(fig["records"], fig["seconds"])
    return bundle


# Imputation --------------------------------------------------------------------------------------------------


def distinct_promoter_rows(problem: Any, targets: np.ndarray) -> int:
    """Distinct promoter-table rows (haplotypes A and B) that the ``targets`` entries read: the sequences one
    predictor encodes if it sees every entry."""
    haplotypes = donor_promoter_sequences(problem)
    if haplotypes is None:
        return 0
    _, lookup = haplotypes
    gene, sample = np.nonzero(targets)
    a, b = lookup.rows(gene, sample)
    rows = np.unique(np.concatenate([a, b]))
    return int((rows >= 0).sum())


def gene_set_bundle(config: Any, work: Path, network_dir: Path) -> dict[str, Any]:
    """A bundle for another gene set over the networks in ``network_dir``: prepare with training folds, then the
    head (and the stacked baselines' settings) fitted on this data's folds; into ``work/model``."""
    t0 = time.perf_counter()
    prepared = prepare(config, work / "records", targets="hidden", training=True, matrix_file=False)
    # the networks learned from the first gene set's records, on purpose: not these records
    _, version, n_head = fit_head_and_save(config, work / "records", network_dir, work / "model",
                                           problem=prepared.problem, check_records=False)
    return {"seconds": round(time.perf_counter() - t0, 1), "head_records": n_head, "model_version": version}


def measured_subprocess(cmd: list[str], env: dict[str, str], exclude: set[int] = frozenset(),
                        ) -> tuple[subprocess.Popen, str, PeakRSS, float]:
    """Run ``cmd`` to its end with its memory sampled as the driver's (:class:`PeakRSS`, from the first sample on:
    sampled before its pid is known, this measuring process would count as the driver).

    Returns:
        (the finished process, its stderr, the peaks, seconds from start to end).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakRSS(driver_pid=proc.pid, exclude=exclude) as peak:
        _, stderr = proc.communicate()
    return proc, stderr, peak, time.perf_counter() - t0


def impute_point(config_path: Path, overrides: list[str], bundle: Path, out: Path, address: str) -> dict[str, Any]:
    """One ``geximpute impute`` end to end into Parquet (commit included) in a new driver process that joins the
    Ray at ``address``; its time, rate and peak memory per process kind."""
    cmd = [sys.executable, "-m", "geximpute.apps.cli", "-q", "impute", "--config", str(config_path),
           "--model", str(bundle), "--out", str(out)]
    for item in [*overrides, f"ray.address={address}"]:
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # the benchmark's own Ray workers (they trained and prepared, and stay up idle) are not the imputation's
    proc, stderr, peak, process_seconds = measured_subprocess(cmd, env, exclude=ray_worker_pids())
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark: impute of {config_path} failed (exit {proc.returncode}): {stderr[-2000:]}")
    manifest = json.loads((out / "_manifest.json").read_text())
    entries, seconds = int(manifest["n_rows"]), float(manifest["seconds"])
    cpu = sum(sec for name, sec in peak.cpu.items() if name not in ("benchmark", "benchmark_workers"))
    return {"entries": entries, "seconds": round(seconds, 2), "process_seconds": round(process_seconds, 2),
            "peak_rss_mb": peak.kinds_report(), "peak_heap_mb": peak.kinds_report(heap=True),
            "peak_rss_detail_mb": peak.report(),
            "missing_profiles": manifest.get("missing_profiles"), "entries_per_second": _rate(entries, seconds),
            "cpu_seconds": round(cpu, 2), "entries_per_cpu_second": _rate(entries, cpu),
            "cpu_by_process": peak.cpu_report()}


# Promoter encoder --------------------------------------------------------------------------------------------


class EncoderCounter:
    """Counts the sequences passed through any :class:`geximpute.model.network.PromoterCNN` while active (a global
    forward hook; the network's code is not touched)."""

    def __init__(self) -> None:
        self.sequences = 0
        self.calls = 0
        self._handle = None

    def _hook(self, module: Any, args: tuple, output: Any) -> None:
        if isinstance(module, PromoterCNN):
            self.sequences += int(args[0].shape[0])
            self.calls += 1

    def __enter__(self) -> EncoderCounter:
        import torch

        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()


class PerEntryLookup:
    """A promoter lookup that gives every record its own rows: (``bench_row``, n + ``bench_row``) of a table that
    holds a copy of each record's haplotypes A and B (-1 stays -1: no promoter)."""

    def __init__(self, has_a: np.ndarray, has_b: np.ndarray) -> None:
        self.has_a, self.has_b, self.n = has_a, has_b, len(has_a)

    def for_records(self, records: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        row = records["bench_row"].to_numpy().astype(np.int64)
        a = np.where(self.has_a[row], row, -1)
        b = np.where(self.has_b[row], self.n + row, -1)
        return a, b


def encoder_genes(targets: np.ndarray, entries: int) -> np.ndarray:
    """Genes spread evenly over the genome whose target entries add up to at least ``entries`` (all when fewer)."""
    per_gene = targets.sum(axis=1)
    with_entries = np.flatnonzero(per_gene > 0)
    if len(with_entries) == 0:
        return with_entries
    k = min(len(with_entries), math.ceil(entries / per_gene[with_entries].mean()))
    return with_entries[np.unique(np.linspace(0, len(with_entries) - 1, k).round().astype(np.int64))]


def encoder_comparison(config: Any, bundle_dir: Path, entries: int) -> dict[str, Any]:
    """Promoter-encoder work per entry with sharing (as imputation runs) and without (a per-entry copy).

    Both paths predict the same records with ``Bundle.predict`` in batches of ``impute.batch_size``, with a cold
    encoder each. The records are every target entry of a few genes, so their haplotype sharing is the run's.
    """
    import torch

    problem, targets, _ = imputation_problem(config)
    genes = encoder_genes(targets, entries)
    chosen = np.zeros(len(targets), bool)
    chosen[genes] = True
    sub = targets & chosen[:, None]
    index = ContextIndex(problem, config.context.genetic_shrinkage)
    parts = []
    for block in sample_blocks(sub, BLOCK_ENTRIES):
        gi, si = np.nonzero(sub[:, block["lo"] : block["hi"]])
        parts.append(build_context(index, gi, si + block["lo"], np.zeros(len(gi), bool), config.context.k_neighbours,
                                   config.context.max_distance))
    records = pa.concat_tables(parts)
    n = records.num_rows
    records = records.append_column("bench_row", pa.array(np.arange(n, dtype=np.int64)))
    batch = config.impute.batch_size
    loaded = load_bundle(bundle_dir)
    length = loaded.models.network.spec.promoter_length
    grids = loaded.baseline_grids(problem, sub) if loaded.stacked else None  # as impute computes them, once
    shared_inputs = donor_promoter_inputs(problem, length)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one predictor actor holds one CPU thread (Ray sets OMP_NUM_THREADS)
    try:
        def run(per_entry: bool) -> dict[str, Any]:
            bundle = load_bundle(bundle_dir)  # fresh: a cold encoder cache
            with EncoderCounter() as counter:
                t0 = time.perf_counter()
                c0 = time.process_time()
                for start in range(0, n, batch):
                    part = records.slice(start, batch)
                    inputs = shared_inputs
                    if inputs is not None and per_entry:
                        table, lookup = inputs
                        a, b = lookup.for_records(part)
                        copy = table[np.concatenate([np.maximum(a, 0), np.maximum(b, 0)])]
                        rows = part["bench_row"].to_numpy() - start
                        inputs = (copy, PerEntryLookup(a >= 0, b >= 0))
                        part = part.set_column(part.schema.get_field_index("bench_row"), "bench_row",
                                               pa.array(rows, pa.int64()))
                    bundle.predict(part, problem.gene_ids, inputs, baselines=grids)
                seconds = time.perf_counter() - t0
                cpu = time.process_time() - c0
            return {"encoded_sequences": counter.sequences, "encoder_calls_per_entry": counter.sequences / max(n, 1),
                    "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                    "entries_per_second": _rate(n, seconds)}

        shared = run(per_entry=False)
        per_entry = run(per_entry=True)
    finally:
        torch.set_num_threads(threads)
    return {
        "entries": n,
        "genes": len(genes),
        "samples": int(sub.any(axis=0).sum()),
        "batch_size": batch,
        "distinct_haplotype_rows": distinct_promoter_rows(problem, sub),
        "shared": shared,
        "per_entry": per_entry,
        "speedup": round(per_entry["seconds"] / shared["seconds"], 2) if shared["seconds"] > 0 else None,
        "cpu_speedup": round(per_entry["cpu_seconds"] / shared["cpu_seconds"], 2) if shared["cpu_seconds"] else None,
    }


# The report --------------------------------------------------------------------------------------------------


def scaling_ratios(scaling: list[dict]) -> None:
    """Add ``entries_ratio`` and ``time_ratio`` (against the previous step) to each step, in place."""
    for prev, step in zip(scaling, scaling[1:], strict=False):
        step["entries_ratio"] = round(step["entries"] / max(prev["entries"], 1), 3)
        step["time_ratio"] = round(step["seconds"] / max(prev["seconds"], 1e-9), 3)
        step["memory_ratio"] = round(step["peak_rss_mb"] / max(prev["peak_rss_mb"], 1), 3)


def series_growth(points: list[dict]) -> dict[str, Any]:
    """From the first to the last point of one series: how much the entries, the wall time and each process kind's
    peak RSS grew (kinds seen at both ends)."""
    first, last = points[0], points[-1]
    kinds = [k for k in first["peak_rss_mb"] if k in last["peak_rss_mb"] and k not in ("other", "ray_system")]
    # a kind seen at one end only (a chromosome's cutting task runs only above CUT_TASK_CELLS) has no ratio: named,
    # so that no target reads "met" without it
    one_end = sorted((set(first["peak_rss_mb"]) ^ set(last["peak_rss_mb"]))
                     - {"other", "ray_system", "other_ray_workers"})  # idle workers come and go with the timing
    return {
        "from": {k: first[k] for k in ("genes", "donors", "entries")},
        "to": {k: last[k] for k in ("genes", "donors", "entries")},
        "entries_ratio": round(last["entries"] / max(first["entries"], 1), 3),
        "time_ratio": round(last["seconds"] / max(first["seconds"], 1e-9), 3),
        "kinds_at_one_end": one_end,
        "peak_rss_ratio": {k: round(last["peak_rss_mb"][k] / max(first["peak_rss_mb"][k], 1), 3) for k in kinds},
        "peak_heap_ratio": {k: round(last["peak_heap_mb"][k] / max(first["peak_heap_mb"][k], 1), 3) for k in kinds
                            if k in first.get("peak_heap_mb", {}) and k in last.get("peak_heap_mb", {})},
    }


def check_targets(bench: dict) -> dict[str, Any]:
    """The issues' targets against the measured figures (``met`` is None where not measured)."""
    scaling = bench["scaling"]
    doubling = [s["time_ratio"] / s["entries_ratio"] * 2 for s in scaling[1:] if s.get("entries_ratio")]
    first, last = scaling[0], scaling[-1]
    grow = last["entries"] / max(first["entries"], 1)
    memory = last["peak_rss_mb"] / max(first["peak_rss_mb"], 1) - 1 if len(scaling) > 1 else None
    targets = {
        "impute_entries_per_min": {"target": f">= {TARGET_ENTRIES_PER_MIN:,}",
                                   "met": bench["impute_entries_per_min"] >= TARGET_ENTRIES_PER_MIN},
        "time_per_doubling": {"target": f"<= {TARGET_DOUBLING_RATIO}x", "value": [round(d, 3) for d in doubling],
                              "met": all(d <= TARGET_DOUBLING_RATIO for d in doubling) if doubling else None},
        "memory_growth": {"target": f"<= {TARGET_MEMORY_GROWTH_4X:.0%} for 4x entries",
                          "entries_growth": round(grow, 2),
                          "value": None if memory is None else round(memory, 3),
                          "met": None if memory is None or grow < 3.5 else memory <= TARGET_MEMORY_GROWTH_4X},
        "encoder_calls_per_entry": {"target": f"< {TARGET_ENCODER_CALLS}", "value": bench["encoder_calls_per_entry"],
                                    "met": bench["encoder_calls_per_entry"] < TARGET_ENCODER_CALLS},
        "gpu": {"target": ">= 1e9 entries per hour on one GPU", "met": None, "why": bench["gpu"]},
    }
    for name, growth in bench["series_growth"].items():
        fourfold = growth["entries_ratio"] >= 3.5
        worst = max(growth["peak_rss_ratio"].values(), default=None)
        partial = bool(growth.get("kinds_at_one_end"))  # a kind without a ratio: not judged
        targets[f"series_{name}_memory"] = {
            "target": f"peak RSS of every process kind <= {TARGET_SERIES_MEMORY_GROWTH}x for 4x {name}",
            "value": growth["peak_rss_ratio"], "kinds_at_one_end": growth.get("kinds_at_one_end", []),
            "met": None if not fourfold or worst is None or partial else worst <= TARGET_SERIES_MEMORY_GROWTH}
        worst_heap = max(growth["peak_heap_ratio"].values(), default=None)
        targets[f"series_{name}_heap"] = {
            "target": f"heap (RSS minus shared pages) of every process kind <= {TARGET_SERIES_MEMORY_GROWTH}x for 4x "
                      f"{name}",
            "value": growth["peak_heap_ratio"], "met": None if not fourfold or worst_heap is None or partial
            else worst_heap <= TARGET_SERIES_MEMORY_GROWTH}
        targets[f"series_{name}_time"] = {
            "target": f"wall time <= {TARGET_SERIES_TIME_GROWTH}x for 4x entries", "value": growth["time_ratio"],
            "entries_ratio": growth["entries_ratio"],
            "met": None if not fourfold else growth["time_ratio"] <= TARGET_SERIES_TIME_GROWTH}
    return targets


def plot_bench(bench: dict, path: Path) -> None:
    """Four panels: stage throughput, the series' time, the series' memory per process kind, promoter-encoder
    work."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    stages = bench["stages"]
    names, rates = [], []
    for name, key in (("prepare", "records_per_second"), ("train", "samples_per_second"),
                      ("fit_head", "records_per_second"), ("impute", "entries_per_second")):
        if name in stages and stages[name].get(key):
            names.append(f"{name}\n({key.split('_per')[0]}/s)")
            rates.append(stages[name][key])
    ax = axes[0, 0]
    ax.bar(names, rates, color="tab:blue")
    ax.set_yscale("log")
    ax.set_title("throughput per stage (wall time, 1x)")
    for i, r in enumerate(rates):
        ax.text(i, r, f"{r:,.0f}", ha="center", va="bottom", fontsize=8)

    by_name = {name: [p for p in bench["series"] if p["point"] in members]
               for name, members in bench["series_members"].items()}
    ax = axes[0, 1]
    for (name, points), style in zip(by_name.items(), ("o-", "s--"), strict=False):
        entries = np.array([p["entries"] for p in points], float)
        ax.plot(entries, [p["seconds"] for p in points], style, label=f"more {name}")
    ax.set_xlabel("entries imputed")
    ax.set_ylabel("seconds (impute, end to end)")
    ax.set_title("series: time")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    for (name, points), style in zip(by_name.items(), ("o-", "s--"), strict=False):
        entries = [p["entries"] for p in points]
        for i, kind in enumerate(k for k, _ in (("driver", 0), *PROCESS_KINDS)):
            values = [p["peak_rss_mb"].get(kind, np.nan) for p in points]
            ax.plot(entries, values, style, color=f"C{i}", label=f"{kind} ({name})")
    ax.set_xlabel("entries imputed")
    ax.set_ylabel("peak RSS of one process, MiB")
    ax.set_ylim(bottom=0)
    ax.set_title("series: peak memory per process kind")
    ax.legend(fontsize=7, ncol=2)

    ax = axes[1, 1]
    enc = bench["encoder"]
    labels = ["shared\n(unique haplotypes)", "per entry\n(no sharing)"]
    ax.bar(labels, [enc["shared"]["encoder_calls_per_entry"], enc["per_entry"]["encoder_calls_per_entry"]],
           color=["tab:green", "tab:red"])
    ax.set_ylabel("promoter-CNN sequences per entry")
    ax.set_ylim(0, 1.3 * max(enc["shared"]["encoder_calls_per_entry"], enc["per_entry"]["encoder_calls_per_entry"]))
    ax.set_title(f"promoter encoder: {enc['entries']:,} entries, speed-up x{enc['speedup']}")
    for i, key in enumerate(("shared", "per_entry")):
        ax.text(i, enc[key]["encoder_calls_per_entry"], f"{enc[key]['encoder_calls_per_entry']:.3f}\n"
                f"{enc[key]['seconds']:.1f} s", ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"geximpute benchmark: {bench['device']}; {bench['impute_entries_per_min']:,.0f} entries/min",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


#: the file that marks ``<out>/work`` as a benchmark's own (it is removed at the end, unless ``--keep-work``)
WORK_MARKER = ".geximpute-benchmark"


def check_work_folder(work: Path) -> None:
    """Refuse a ``<out>/work`` that a benchmark did not make: the benchmark writes its datasets there and removes
    the folder at the end (a user's ``work/`` under ``--out`` was deleted with exit status 0).

    Raises:
        GeximputeError: ``work`` exists, is not empty and holds no :data:`WORK_MARKER`.
    """
    if work.is_symlink() or (work.exists() and (not work.is_dir() or (
            any(work.iterdir()) and not (work / WORK_MARKER).is_file()))):
        raise GeximputeError(f"{work}: not a work folder of geximpute benchmark (it writes its datasets there and "
                             "removes the folder at the end); give --out a folder without a work/ of its own")


def run_benchmark(out: str | Path, spec: BenchSpec | None = None, *, keep_work: bool = False) -> dict[str, Any]:
    """Run every stage at the scales of ``spec``; write ``<out>/bench.json`` and ``<out>/bench.png``.

    Args:
        out: output folder (created; its ``work/`` holds the data, records, bundles and predictions meanwhile).
        spec: the scale and settings (default :class:`BenchSpec`).
        keep_work: keep ``<out>/work`` (default: removed at the end).

    Returns:
        what ``bench.json`` holds.
    """
    import ray

    spec = spec or BenchSpec()
    out = Path(out)
    work = out / "work"
    check_work_folder(work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    (work / WORK_MARKER).write_text("geximpute benchmark's work folder: removed when the benchmark ends\n")
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    stages: dict[str, dict] = {}
    points = spec.points()

    def folder(g: int, d: int) -> Path:
        return work / f"g{g}-d{d}"

    def overrides_of(g: int, d: int) -> list[str]:
        return [f"output_dir={folder(g, d)}", f"train.epochs={spec.epochs}",
                f"train.max_examples_per_epoch={spec.max_examples}", *TRAINING_OVERRIDES, *spec.overrides]

    def config_path(g: int, d: int) -> Path:
        return work / f"data-g{g}-d{d}" / "config.yaml"

    def config_of(g: int, d: int) -> Any:
        return load_config(config_path(g, d), overrides_of(g, d))

    with measured(stages, "synth") as fig:
        for g, d in points:
            generate(config_path(g, d).parent, spec.synth_spec(g, d), overwrite=True)
        fig["datasets"] = len(points)

    base = points[0]
    first = config_of(*base)
    started = ensure_ray(first.ray)
    try:
        resources = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
        address = ray.get_runtime_context().gcs_address
        bundles = {base[0]: measured_bundle(first, folder(*base), stages)}
        for g in spec.gene_scales[1:]:
            with measured(stages, f"bundle_genes_x{g}") as fig:
                fig.update(gene_set_bundle(config_of(g, base[1]), folder(g, base[1]), folder(*base) / "network"))
            bundles[g] = folder(g, base[1]) / "model"
        series = []
        for g, d in points:
            config = config_of(g, d)
            predictions = folder(g, d) / "predictions"
            log.info("benchmark: impute %d genes x %d donors ...", spec.genes * g, spec.donors * d)
            point = {"point": f"g{g}-d{d}", "genes": spec.genes * g, "donors": spec.donors * d,
                     "tissues": spec.tissues, "gene_scale": g, "donor_scale": d,
                     **impute_point(config_path(g, d), overrides_of(g, d), bundles[g], predictions, address)}
            discard(predictions, step="impute")  # the link and its versions
            # the run encodes every haplotype of its table once per network (run_pipeline's encode tasks)
            problem, targets, _ = imputation_problem(config)
            haplotypes = donor_promoter_sequences(problem)
            point["distinct_haplotype_rows"] = distinct_promoter_rows(problem, targets)
            # train_and_save trained train.folds networks, one for every gene set's bundle
            point["haplotypes_encoded"] = 0 if haplotypes is None else len(haplotypes[0]) * first.train.folds
            point["encoder_calls_per_entry_run"] = round(point["haplotypes_encoded"] / max(point["entries"], 1), 5)
            del problem, targets, haplotypes
            series.append(point)
        with measured(stages, "encoder") as fig:
            encoder = encoder_comparison(first, bundles[base[0]], spec.encoder_entries)
    finally:
        if started:
            ray.shutdown()

    members = {"donors": [f"g{base[0]}-d{d}" for d in spec.scales],
               "genes": [f"g{g}-d{base[1]}" for g in spec.gene_scales]}
    growth = {name: series_growth([p for p in series if p["point"] in names])
              for name, names in members.items() if len(names) > 1}
    # issue 8's view: the donors series, with the driver + Ray workers' summed peak as its memory
    scaling = [{**{k: v for k, v in p.items() if k not in ("peak_rss_mb",)}, "scale": p["donor_scale"],
                "peak_rss_mb": p["peak_rss_detail_mb"]["driver_workers"]}
               for p in series if p["point"] in members["donors"]]
    scaling_ratios(scaling)
    stages["impute"] = dict(scaling[0])
    top = max(series, key=lambda p: p["entries"])
    bench: dict[str, Any] = {
        **device_description(),
        "impute_entries_per_min": round(top["entries"] / top["seconds"] * 60, 1),
        "impute_entries_per_second": round(top["entries"] / top["seconds"], 1),
        # what the run's CPU time allows if the machine's cores did nothing else (wall time depends on the load)
        "impute_entries_per_min_cpu_bound": round(top["entries_per_cpu_second"] * usable_cores() * 60, 1),
        "encoder_calls_per_entry": round(encoder["shared"]["encoder_calls_per_entry"], 5),
        "encoder_speedup": encoder["speedup"],
        "series": series,
        "series_members": members,
        "series_growth": growth,
        "scaling": scaling,
        "stages": stages,
        "encoder": encoder,
        "spec": {**dataclasses.asdict(spec), "scales": list(spec.scales), "gene_scales": list(spec.gene_scales),
                 "overrides": list(spec.overrides)},
        "model": dataclasses.asdict(first.model),
        "impute_settings": {"batch_size": first.impute.batch_size, "predictors": first.impute.predictors,
                            "cpus_per_task": first.ray.cpus_per_task},
        "ray": resources,
        "cores": usable_cores(),
        "load_average": {"start": [round(x, 1) for x in load_start],
                         "end": [round(x, 1) for x in os.getloadavg()]},
        "seconds": round(time.perf_counter() - t_start, 1),
        "versions": {**versions(), "geximpute": __version__},
    }
    bench["targets"] = check_targets(bench)
    write_json(out / "bench.json", bench)
    plot_bench(bench, out / "bench.png")
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return bench


def summary(bench: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"device: {bench['device']} (load average {bench['load_average']['start'][0]} at start)",
             f"impute: {bench['impute_entries_per_min']:,.0f} entries/min at "
             f"{max(p['entries'] for p in bench['series']):,} entries; promoter encoder "
             f"{bench['encoder_calls_per_entry']:.4f} calls/entry, x{bench['encoder_speedup']} faster than encoding "
             "every entry"]
    for p in bench["series"]:
        heap = p.get("peak_heap_mb", {})
        rss = ", ".join(f"{k} {v:,}" + (f" (heap {heap[k]:,})" if k in heap else "")
                        for k, v in p["peak_rss_mb"].items() if k not in ("other", "ray_system"))
        lines.append(f"  {p['genes']:>6,} genes x {p['donors']:>5,} donors: {p['entries']:>10,} entries "
                     f"{p['seconds']:7.1f} s; peak MiB {rss}")
    for name, g in bench["series_growth"].items():
        worst = max(g["peak_rss_ratio"].items(), key=lambda kv: kv[1], default=("-", float("nan")))
        worst_heap = max(g.get("peak_heap_ratio", {}).items(), key=lambda kv: kv[1], default=("-", float("nan")))
        lines.append(f"  {name} x{g['entries_ratio']:.2f} entries: time x{g['time_ratio']:.2f}, largest memory "
                     f"growth x{worst[1]:.2f} ({worst[0]}), of the heap x{worst_heap[1]:.2f} ({worst_heap[0]})")
    for name, st in bench["stages"].items():
        lines.append(f"  stage {name:<16} {st['seconds']:7.1f} s")
    return "\n".join(lines)

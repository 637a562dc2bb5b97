"""``geximpute benchmark``: every stage of the engine timed on synthetic data of a chosen scale.

One run::

    synth (1x, 2x, 4x donors)  -> prepare --training (1x)  -> train (short)  -> fit-head + bundle
                               -> impute at 1x, 2x, 4x (the scaling series)  -> promoter-encoder comparison

and writes ``<out>/bench.json`` and ``<out>/bench.png``. Every stage records its wall time, its throughput (entries
or records per second; training samples per second) and the peak resident memory of the driver and of the Ray
worker processes (:class:`PeakRSS`). The scaling series multiplies the donors, so entries grow while genes stay
fixed, and records the time ratio between consecutive steps.

The promoter-encoder comparison replays the imputation's prediction call (``Bundle.predict``, what
:class:`geximpute.steps.impute.Predictor` calls) in this process on every entry of a few genes (all their donors and
tissues, so their haplotype sharing is the whole run's), counting the sequences that go through the network's
``PromoterCNN`` with a forward hook. It runs twice on the same entries: as imputation does (each unique promoter
haplotype encoded once, :class:`geximpute.model.inference.PromoterEncoderCache`) and with a per-entry copy of every
entry's two promoter haplotypes, so that nothing is shared; the ratio of their times is the speed-up of sharing.

``bench.json`` carries at least ``impute_entries_per_min``, ``encoder_calls_per_entry``, ``device`` and
``scaling`` (``[{"entries", "seconds", "peak_rss_mb"}, ...]``) so that runs can be compared by script.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import shutil
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
from geximpute.fit.bundle import load_bundle
from geximpute.model.network import PromoterCNN
from geximpute.runtime.atomic import discard
from geximpute.runtime.provenance import versions
from geximpute.runtime.raytools import ensure_ray
from geximpute.science.context import ContextIndex, build_context
from geximpute.steps.impute import BLOCK_ENTRIES, donor_promoter_inputs, imputation_problem, impute
from geximpute.steps.pipeline import Progress, build_bundle
from geximpute.steps.prepare import sample_blocks

log = logging.getLogger(__name__)

#: the targets of issue 8, checked in ``bench.json`` (``targets``)
TARGET_ENTRIES_PER_MIN = 1_000_000
TARGET_DOUBLING_RATIO = 2.2
TARGET_MEMORY_GROWTH_4X = 0.20
TARGET_ENCODER_CALLS = 0.05

#: settings of the short training that makes the benchmark's bundle (the network keeps the default size)
TRAINING_OVERRIDES = (
    "evaluation.task=entries",
    "train.fold_fraction=0.1",
    "train.patience=100",
)


class PeakRSS:
    """Samples resident memory and CPU time every ``interval`` seconds: this process, the Ray workers among its
    descendants (processes named ``ray::...``) and all its descendants (raylet and GCS too).

    With a local Ray started by this process, its workers are descendants; when Ray runs elsewhere (a cluster
    address) only the driver is seen. Shared memory (the object store) counts in every process that maps it. CPU
    time is what the processes used between the first and the last sample (a process that appears in between
    counts from its start), attributed to the process's name at each sample (``ray::MapWorker(...)``, ``raylet``);
    unlike wall time it hardly depends on what else the machine runs.

    Attributes:
        driver: peak RSS of this process, bytes.
        workers: peak of the summed RSS of the Ray worker processes.
        driver_workers: peak of driver + workers (sampled together).
        total: peak of this process and all its descendants.
        cpu: CPU seconds per process name.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.driver = self.workers = self.driver_workers = self.total = 0
        self.cpu: dict[str, float] = {}
        self._last_cpu: dict[tuple[int, float], float] = {}
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

    def sample(self) -> None:
        """Take one sample now."""
        me = psutil.Process()
        try:
            own = me.memory_info().rss
            self._account(me, "driver")
            children = me.children(recursive=True)
        except psutil.Error:
            return
        workers = others = 0
        for child in children:
            try:
                rss = child.memory_info().rss
                title = " ".join(child.cmdline()[:1])
                if title.startswith("ray::"):
                    workers += rss
                    name = title.split(" ")[0]
                else:
                    others += rss
                    name = child.name()
                self._account(child, name)
            except psutil.Error:
                continue
        self._first = False
        self.driver = max(self.driver, own)
        self.workers = max(self.workers, workers)
        self.driver_workers = max(self.driver_workers, own + workers)
        self.total = max(self.total, own + workers + others)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
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

    def cpu_report(self, top: int = 8) -> dict[str, float]:
        """CPU seconds of the ``top`` busiest process names, the rest summed as ``other``."""
        ranked = sorted(self.cpu.items(), key=lambda kv: -kv[1])
        out = {name: round(sec, 2) for name, sec in ranked[:top] if sec >= 0.01}
        rest = sum(sec for _, sec in ranked[top:])
        if rest >= 0.01:
            out["other"] = round(rest, 2)
        return out


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

    The network of ``run_network`` (training's embeddings, fit-head and imputation) runs on the CPU, so ``device``
    names the CPU; ``gpu`` says whether a GPU was present and measured.
    """
    import torch

    device = f"cpu: {cpu_model()}, {usable_cores()} cores"
    if torch.cuda.is_available():
        gpu = (f"{torch.cuda.get_device_name(0)} present but not measured: imputation's network "
               "(geximpute.model.inference.run_network) runs on the CPU")
    else:
        gpu = "none: no GPU on this machine (torch.cuda.is_available() is False); GPU figures not measured"
    return {"device": device, "gpu": gpu}


@dataclass(frozen=True)
class BenchSpec:
    """What one benchmark run measures. Checked on construction: a bad value raises ``ValueError``.

    Attributes:
        genes: genes of the synthetic data (fixed over the scaling series).
        donors: donors at scale 1.
        tissues: tissues.
        observed_fraction: share of (donor, tissue) cells with a sample (``SynthSpec.observed_cell_fraction``);
            the rest are missing profiles that imputation fills in.
        variant_density: variant sites per promoter window (``SynthSpec.variants_per_promoter``).
        scales: donor multipliers of the scaling series, increasing; the first one trains the bundle.
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
        scales = list(self.scales)
        if not scales or any(not isinstance(s, int | np.integer) or s < 1 for s in scales) or scales != sorted(
                set(scales)):
            raise ValueError(f"BenchSpec.scales: expected increasing integers >= 1, got {self.scales!r}")

    def synth_spec(self, scale: int) -> Any:
        """The :class:`geximpute.apps.synth.SynthSpec` of one step of the scaling series (donors x ``scale``)."""
        # ~3.4 kb of chromosome per gene, as `geximpute synth` lays them out
        length = max(SynthSpec.chrom_length, self.genes * 3_400 // SynthSpec.n_chroms)
        return SynthSpec(seed=self.seed, n_genes=self.genes, n_donors=self.donors * scale, n_tissues=self.tissues,
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
    samples = fig["epochs"] * fig.pop("examples_per_epoch")
    fig.update(samples=samples, samples_per_second=_rate(samples, fig["seconds"]))
    fig = stages["fit_head"]
    fig["records_per_second"] = _rate(fig["records"], fig["seconds"])
    return bundle


# Imputation --------------------------------------------------------------------------------------------------


def distinct_promoter_rows(problem: Any, targets: np.ndarray, length: int) -> int:
    """Distinct promoter-table rows (haplotypes A and B) that the ``targets`` entries read: the sequences one
    predictor encodes if it sees every entry."""
    inputs = donor_promoter_inputs(problem, length)
    if inputs is None:
        return 0
    _, lookup = inputs
    gene, sample = np.nonzero(targets)
    a, b = lookup.rows(gene, sample)
    rows = np.unique(np.concatenate([a, b]))
    return int((rows >= 0).sum())


def impute_step(config: Any, bundle: Path, out: Path) -> dict[str, Any]:
    """One measured ``impute`` run (end to end into Parquet, commit included)."""
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        result = impute(config, model=bundle, out_dir=out)
        seconds = time.perf_counter() - t0
    cpu = sum(peak.cpu.values())
    return {"entries": result.n_rows, "seconds": round(seconds, 2), "peak_rss_mb": peak.report()["driver_workers"],
            "peak_rss_detail_mb": peak.report(), "missing_profiles": result.n_missing_profiles,
            "entries_per_second": _rate(result.n_rows, seconds), "cpu_seconds": round(cpu, 2),
            "entries_per_cpu_second": _rate(result.n_rows, cpu), "cpu_by_process": peak.cpu_report()}


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
        "distinct_haplotype_rows": distinct_promoter_rows(problem, sub, length),
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


def check_targets(bench: dict) -> dict[str, Any]:
    """The issue's targets against the measured figures (``met`` is None where not measured)."""
    scaling = bench["scaling"]
    doubling = [s["time_ratio"] / s["entries_ratio"] * 2 for s in scaling[1:] if s.get("entries_ratio")]
    first, last = scaling[0], scaling[-1]
    grow = last["entries"] / max(first["entries"], 1)
    memory = last["peak_rss_mb"] / max(first["peak_rss_mb"], 1) - 1 if len(scaling) > 1 else None
    return {
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


def plot_bench(bench: dict, path: Path) -> None:
    """Four panels: stage throughput, scaling time, scaling memory, promoter-encoder work."""
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

    scaling = bench["scaling"]
    entries = np.array([s["entries"] for s in scaling], float)
    seconds = np.array([s["seconds"] for s in scaling], float)
    ax = axes[0, 1]
    ax.plot(entries, seconds, "o-", label="measured")
    ax.plot(entries, seconds[0] * entries / entries[0], "--", color="grey", label="linear from 1x")
    for s in scaling[1:]:
        ax.annotate(f"x{s['time_ratio']:.2f}", (s["entries"], s["seconds"]), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)
    ax.set_xlabel("entries imputed")
    ax.set_ylabel("seconds (impute, end to end)")
    ax.set_title("scaling: time")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    for key, label in (("driver_workers", "driver + Ray workers"), ("driver", "driver"), ("workers", "Ray workers")):
        ax.plot(entries, [s["peak_rss_detail_mb"][key] for s in scaling], "o-", label=label)
    ax.set_xlabel("entries imputed")
    ax.set_ylabel("peak RSS, MiB")
    ax.set_ylim(bottom=0)
    ax.set_title("scaling: peak memory")
    ax.legend(fontsize=8)

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


def run_benchmark(out: str | Path, spec: BenchSpec | None = None, *, keep_work: bool = False) -> dict[str, Any]:
    """Run every stage at the scales of ``spec``; write ``<out>/bench.json`` and ``<out>/bench.png``.

    Args:
        out: output folder (created; its ``work/`` holds the data, records, bundle and predictions meanwhile).
        spec: the scale and settings (default :class:`BenchSpec`).
        keep_work: keep ``<out>/work`` (default: removed at the end).

    Returns:
        what ``bench.json`` holds.
    """
    import ray

    spec = spec or BenchSpec()
    out = Path(out)
    work = out / "work"
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    stages: dict[str, dict] = {}

    def config_of(scale: int) -> Any:
        overrides = [f"output_dir={work / f'x{scale}'}", f"train.epochs={spec.epochs}",
                     f"train.max_examples_per_epoch={spec.max_examples}", *TRAINING_OVERRIDES, *spec.overrides]
        return load_config(work / f"data-x{scale}" / "config.yaml", overrides)

    with measured(stages, "synth") as fig:
        for scale in spec.scales:
            generate(work / f"data-x{scale}", spec.synth_spec(scale), overwrite=True)
        fig["datasets"] = len(spec.scales)

    first = config_of(spec.scales[0])
    started = ensure_ray(first.ray)
    try:
        resources = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
        bundle = measured_bundle(first, work / f"x{spec.scales[0]}", stages)
        scaling = []
        for scale in spec.scales:
            config = config_of(scale)
            step = {"scale": scale, "donors": spec.donors * scale,
                    **impute_step(config, bundle, work / f"x{scale}" / "predictions")}
            discard(work / f"x{scale}" / "predictions", step="impute")  # the link and its versions
            # each predictor actor encodes a haplotype at most once: the run's encoder work is at most this
            problem, targets, _ = imputation_problem(config)
            rows = distinct_promoter_rows(problem, targets, config.promoter.length)
            actors = min(config.impute.predictors, max(1, math.ceil(int(targets.sum()) / BLOCK_ENTRIES)))
            del problem, targets
            step["distinct_haplotype_rows"] = rows
            step["encoder_calls_per_entry_bound"] = round(actors * rows / max(step["entries"], 1), 5)
            scaling.append(step)
        scaling_ratios(scaling)
        stages["impute"] = dict(scaling[0])
        with measured(stages, "encoder") as fig:
            encoder = encoder_comparison(first, bundle, spec.encoder_entries)
    finally:
        if started:
            ray.shutdown()

    top = scaling[-1]
    bench: dict[str, Any] = {
        **device_description(),
        "impute_entries_per_min": round(top["entries"] / top["seconds"] * 60, 1),
        "impute_entries_per_second": round(top["entries"] / top["seconds"], 1),
        # what the run's CPU time allows if the machine's cores did nothing else (wall time depends on the load)
        "impute_entries_per_min_cpu_bound": round(top["entries_per_cpu_second"] * usable_cores() * 60, 1),
        "encoder_calls_per_entry": round(encoder["shared"]["encoder_calls_per_entry"], 5),
        "encoder_speedup": encoder["speedup"],
        "scaling": scaling,
        "stages": stages,
        "encoder": encoder,
        "spec": {**dataclasses.asdict(spec), "scales": list(spec.scales), "overrides": list(spec.overrides)},
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
    (out / "bench.json").write_text(json.dumps(bench, indent=2, default=str) + "\n")
    plot_bench(bench, out / "bench.png")
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return bench


def summary(bench: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"device: {bench['device']} (load average {bench['load_average']['start'][0]} at start)",
             f"impute: {bench['impute_entries_per_min']:,.0f} entries/min at {bench['scaling'][-1]['entries']:,} "
             f"entries; promoter encoder {bench['encoder_calls_per_entry']:.4f} calls/entry, "
             f"x{bench['encoder_speedup']} faster than encoding every entry"]
    for s in bench["scaling"]:
        ratio = f", x{s['time_ratio']:.2f} time for x{s['entries_ratio']:.2f} entries" if "time_ratio" in s else ""
        lines.append(f"  {s['entries']:>10,} entries  {s['seconds']:7.1f} s  {s['peak_rss_mb']:6,} MiB{ratio}")
    for name, st in bench["stages"].items():
        lines.append(f"  stage {name:<9} {st['seconds']:7.1f} s")
    return "\n".join(lines)

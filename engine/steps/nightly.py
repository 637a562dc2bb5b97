"""``geximpute nightly``: impute the new genomes of an inbox, each donor once, into a partition per run date.

Inbox (``nightly.inbox``)::

    <donor>.vcf | <donor>.vcf.gz | <donor>.bcf   the donor's genome; its sample column is named <donor>
    <donor>.expression.tsv (.csv, .tsv.gz)       optional: the donor's measured tissues, genes x tissues (gene_id and
                                                 one column per tissue of the data), on the scale of inputs.scale

Output (``nightly.output``, default ``<output_dir>/nightly``) and what sits beside it::

    <output>/run_date=YYYY-MM-DD/tissue=<t>/*.parquet  schema.PREDICTIONS rows of the donors done that day
    <output>/run_date=YYYY-MM-DD/_manifest.json       config, inputs, model_version, donors and run ids, rows
    <output>.ledger.json                              the donors done: run date, run id, rows, VCF fingerprint
    <output>.lock                                     held while a run works (its pid inside)
    <inbox>/quarantine/<file>, <file>.error.txt       malformed inputs and why

A run takes the lock (created with ``O_EXCL``; a lock whose process is gone is stale and is broken), validates each
new genome (a malformed one is quarantined and the others go on), and imputes the new donors ``donors_per_commit``
at a time. Each commit is one Ray Data job (:func:`engine.steps.impute.run_pipeline`) into a staging folder outside the
dataset, holding the day's partition so far plus the new rows, renamed onto ``run_date=<day>`` at once; the ledger is
rewritten atomically after that. If a run dies between the two, the next run finds the donors in the partition's
manifest and records them instead of imputing them again, so no donor is ever written twice. A run with nothing new
writes nothing.

How a donor's genome enters the model: each VCF is read and validated here, but the new donors' promoter haplotypes
are not built yet: :func:`donor_haplotypes` is the hook where they will be, and until then a donor's profiles are
predicted from its measured tissues when given, and from the gene, tissue and neighbour context otherwise, with the
reference promoter windows.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from engine import schema as S
from engine.config import Config
from engine.errors import ConfigError, GeximputeError, InputError
from engine.fit.bundle import load_bundle
from engine.io.dataset import load_dataset
from engine.io.expression import read_expression, to_model_scale
from engine.io.variants import read_variants
from engine.runtime.provenance import fingerprint, input_fingerprints, manifest, write_json
from engine.runtime.raytools import ensure_ray
from engine.science.problem import VisibleProblem, make_problem
from engine.steps.impute import (
    OutputError,
    add_missing_profiles,
    donor_promoter_inputs,
    make_run_id,
    model_dir,
    output_error,
    output_os_error,
    partition_rows,
    pid_alive,
    run_pipeline,
    target_mask,
)

log = logging.getLogger(__name__)

VCF_SUFFIXES = (".vcf.gz", ".vcf.bgz", ".vcf", ".bcf")
EXPRESSION_SUFFIXES = (".expression.tsv", ".expression.tsv.gz", ".expression.csv", ".expression.csv.gz")
RUN_DATE = S.RUN_DATE


class LockBusy(GeximputeError):
    """Another nightly run holds the lock."""


@dataclass
class InboxItem:
    """One new genome of the inbox: the donor, its VCF and its optional measured expression."""

    donor: str
    vcf: Path
    expression: Path | None = None

    @property
    def files(self) -> list[Path]:
        return [self.vcf] + ([self.expression] if self.expression else [])


@dataclass
class NewDonor:
    """A validated inbox donor: its genome and its measured tissues on the modelling scale."""

    item: InboxItem
    variants: Any
    tissues: list[str] = field(default_factory=list)
    values: np.ndarray | None = None  # (G, len(tissues)) float32 over the problem's genes, NaN where unmeasured
    vcf_sha256: str = ""


@dataclass
class NightlyResult:
    """What one nightly run did."""

    run_date: str
    done: list[str]
    quarantined: dict[str, str]
    already_done: list[str]
    rows: int
    partition: Path | None
    seconds: float


# Paths --------------------------------------------------------------------------------------------------------


def output_root(config: Config) -> Path:
    """``nightly.output`` or ``<output_dir>/nightly``."""
    return Path(config.nightly.output or Path(config.output_dir) / "nightly")


def ledger_path(config: Config) -> Path:
    """``nightly.ledger`` or ``<output>.ledger.json`` beside the output."""
    root = output_root(config)
    return Path(config.nightly.ledger or root.parent / f"{root.name}.ledger.json")


def lock_path(config: Config) -> Path:
    root = output_root(config)
    return root.parent / f"{root.name}.lock"


def quarantine_dir(config: Config) -> Path:
    return Path(config.nightly.quarantine or Path(config.nightly.inbox or ".") / "quarantine")


def _staging(root: Path) -> Path:
    # outside the dataset root, so that no reader of the root ever lists it
    return root.parent / f".{root.name}.staging-{os.getpid()}"


def _old(root: Path, day: str) -> Path:
    return root.parent / f".{root.name}.old-{day}-{os.getpid()}"


# Lock ---------------------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive lock file: created with ``O_CREAT | O_EXCL``, holding the owner's pid, host and start time.

    A lock whose process no longer runs on this host is stale: it is moved aside and taken. A lock held by a live
    process (or by another host, whose processes cannot be checked) raises :class:`LockBusy`.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.token = {"pid": os.getpid(), "host": socket.gethostname(), "started": dt.datetime.now().isoformat()}

    def _read(self) -> tuple[str, dict | None]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return "", None
        try:
            return text, json.loads(text)
        except ValueError:
            return text, None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                text, holder = self._read()
                if not self._stale(holder):
                    who = f"pid {holder['pid']} on {holder['host']}, since {holder['started']}" if holder else "?"
                    raise LockBusy(
                        f"{self.path}: another nightly run holds the lock ({who}); wait for it to finish. If no run "
                        f"is active, remove the lock file and run again"
                    ) from None
                self._break(text, holder)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self.token))
                fh.flush()
                os.fsync(fh.fileno())
            return self
        raise LockBusy(f"{self.path}: could not take the lock (other runs keep taking it); try again")

    def _stale(self, holder: dict | None) -> bool:
        if holder is None:  # unreadable: a run that died while writing it, unless it is being written right now
            try:
                return time.time() - self.path.stat().st_mtime > 30
            except FileNotFoundError:
                return True
        return holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1)))

    def _break(self, text: str, holder: dict | None) -> None:
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text() != text:  # another run took it in between: give it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink()
            raise LockBusy(f"{self.path}: another nightly run took the lock; wait for it to finish")
        aside.unlink()
        log.warning("nightly: broke the stale lock %s of pid %s (no longer running)", self.path,
                    holder.get("pid") if holder else "?")

    def __exit__(self, *exc: object) -> None:
        _, holder = self._read()
        if holder == self.token:
            self.path.unlink()


# Ledger -------------------------------------------------------------------------------------------------------


def read_ledger(path: Path) -> dict[str, dict]:
    """The ledger's donors: ``{donor: {run_date, run_id, rows, vcf_sha256}}`` (empty when there is none)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise GeximputeError(f"{path}: the nightly ledger is not valid JSON ({exc}); restore it from the partition "
                             f"manifests by moving it aside and running again") from exc
    return dict(data.get("donors", {}))


def write_ledger(path: Path, donors: dict[str, dict]) -> None:
    """Write the ledger atomically (a temporary file beside it, fsynced, renamed onto it)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(json.dumps({"donors": dict(sorted(donors.items()))}, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def committed_donors(root: Path) -> dict[str, dict]:
    """Donors recorded in the manifests of the committed partitions of ``root``."""
    found: dict[str, dict] = {}
    for manifest_file in sorted(root.glob(f"{RUN_DATE}=*/_manifest.json")):
        data = json.loads(manifest_file.read_text())
        for donor, info in data.get("donors", {}).items():
            found[donor] = {**info, RUN_DATE: data[RUN_DATE]}
    return found


def recover(root: Path, ledger: dict[str, dict]) -> dict[str, dict]:
    """Tidy what a killed run left (under the lock, so nothing else is running) and complete the ledger.

    Staging folders are removed; a partition moved aside by a commit that did not finish is put back; donors in a
    committed partition but not in the ledger (the run died before writing it) are added to the ledger.
    """
    for path in root.parent.glob(f".{root.name}.staging-*"):
        log.info("nightly: removing %s left by a run that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)
    for path in root.parent.glob(f".{root.name}.old-*"):
        day = path.name.split(".old-", 1)[1].rsplit("-", 1)[0]
        target = root / f"{RUN_DATE}={day}"
        if not target.exists():
            log.warning("nightly: restoring %s (a run died while committing it)", target)
            os.replace(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)
    missing = {d: info for d, info in committed_donors(root).items() if d not in ledger}
    if missing:
        log.warning("nightly: %d donors are committed but not in the ledger (a run died before recording them): "
                    "recorded now, not imputed again", len(missing))
    return {**ledger, **missing}


# Inbox --------------------------------------------------------------------------------------------------------


def _strip(name: str, suffixes: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def scan_inbox(inbox: Path) -> list[InboxItem]:
    """The genomes of the inbox (one per donor), each with its expression file when there is one."""
    if not inbox.is_dir():
        raise ConfigError(f"config key 'nightly.inbox' has value {str(inbox)!r}; expected an existing folder")
    files = {p.name: p for p in inbox.iterdir() if p.is_file()}
    expressions = {d: p for n, p in files.items() if (d := _strip(n, EXPRESSION_SUFFIXES))}
    items = []
    for name, path in sorted(files.items()):
        donor = _strip(name, VCF_SUFFIXES)
        if donor:
            items.append(InboxItem(donor, path, expressions.pop(donor, None)))
    for donor, path in expressions.items():
        log.warning("nightly: %s has no genome beside it (%s.vcf.gz); left in the inbox", path, donor)
    return items


def donor_haplotypes(problem: VisibleProblem, donors: list[NewDonor], dataset: Any) -> VisibleProblem:
    """HOOK (issue 5): the problem with per-donor promoter haplotypes that cover the new donors.

    Today it returns ``problem`` as it is, without personal genomes (``problem.genomes`` is None), so the new
    donors' profiles are predicted from the reference promoter windows. To make nightly genotype-aware, build the
    new donors' haplotypes here from ``donors[i].variants`` and ``dataset.genome`` (``engine.science.haplotypes``), merged
    into the reference donors' ``engine.science.genomes.DonorGenomes``; :func:`engine.steps.impute.donor_promoter_inputs` then
    turns them into the promoter inputs that the predictor passes to ``Bundle.predict``.
    """
    return problem


def read_new_donor(item: InboxItem, config: Config, problem: VisibleProblem, genome: Any) -> NewDonor:
    """Read and validate one inbox genome (and its expression file).

    Raises:
        InputError: the VCF or the expression file is malformed, the VCF lacks the donor's sample, or the
            expression names a tissue the model does not know.
    """
    variants = read_variants(item.vcf, genome, samples=[item.donor], genome_partial=config.inputs.genome_partial)
    new = NewDonor(item, variants, vcf_sha256=fingerprint(item.vcf)["sha256"])
    if item.expression is None:
        return new
    expr = read_expression(item.expression, "wide", config.inputs.scale)
    unknown = [t for t in expr.sample_ids if t not in problem.tissues]
    if unknown:
        raise InputError(item.expression, f"tissue column {unknown[0]!r} is not a tissue of the model",
                         record="the header", expected=f"tissue names among {problem.tissues}")
    values = to_model_scale(expr, config.expression)
    row_of = {g: i for i, g in enumerate(expr.gene_ids)}
    rows = np.array([row_of.get(g, -1) for g in problem.gene_ids])
    if not (rows >= 0).any():
        raise InputError(item.expression, "no gene of the model is in the file", record="the gene_id column",
                         expected=f"gene ids such as {problem.gene_ids[0]}")
    aligned = np.full((problem.n_genes, len(expr.sample_ids)), np.nan, np.float32)
    aligned[rows >= 0] = values[rows[rows >= 0]]
    new.tissues, new.values = list(expr.sample_ids), aligned
    return new


def quarantine(item: InboxItem, error: BaseException, folder: Path) -> None:
    """Move the item's files to ``folder``, each with ``<file>.error.txt`` saying why."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().isoformat(timespec="seconds")
    for path in item.files:
        target = folder / path.name
        if target.exists():
            target = folder / f"{path.name}.{stamp.replace(':', '')}"
        shutil.move(str(path), target)
        target.with_name(target.name + ".error.txt").write_text(f"{stamp} {item.vcf.name}: {error}\n")
    log.warning("nightly: quarantined %s: %s", item.vcf.name, error)


def extend_problem(problem: VisibleProblem, donors: list[NewDonor], tissues: tuple[str, ...]
                   ) -> tuple[VisibleProblem, np.ndarray]:
    """The reference problem with the new donors: their measured samples, then a virtual sample for each other
    selected tissue. A donor already in the data keeps its samples.

    Returns:
        (the extended problem, (S,) bool flag of the virtual samples).
    """
    names = list(problem.donors)
    sample_ids, donor_index, tissue_index, columns = [], [], [], []
    tissue_of = {t: i for i, t in enumerate(problem.tissues)}
    for new in donors:
        if new.item.donor not in names:
            names.append(new.item.donor)
        d = names.index(new.item.donor)
        for j, tissue in enumerate(new.tissues):
            sample_ids.append(f"inbox:{new.item.donor}:{tissue}")
            donor_index.append(d)
            tissue_index.append(tissue_of[tissue])
            columns.append(new.values[:, j])
    values = problem.values
    if columns:
        values = np.concatenate([values, np.stack(columns, axis=1).astype(np.float32)], axis=1)
    extended = dataclasses.replace(
        problem,
        donors=names,
        sample_ids=np.concatenate([problem.sample_ids, np.asarray(sample_ids, dtype=object)]),
        donor_index=np.concatenate([problem.donor_index, np.asarray(donor_index, np.int32)]).astype(np.int32),
        tissue_index=np.concatenate([problem.tissue_index, np.asarray(tissue_index, np.int32)]).astype(np.int32),
        values=values,
    )
    if getattr(extended, "genomes", None) is not None:  # per-donor genomes do not cover the new donors yet
        extended = dataclasses.replace(extended, genomes=None)
    return add_missing_profiles(extended, [d.item.donor for d in donors], tissues)


# The run ------------------------------------------------------------------------------------------------------


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file under ``src`` into ``dst`` (same tree; copies where links are not possible)."""
    for path in src.rglob("*"):
        if path.is_file() and path.name != "_manifest.json":
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)


def commit_partition(staging: Path, target: Path, old: Path) -> None:
    """Put ``staging`` in place of ``target`` (the previous partition is moved aside, then removed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def _commit_chunk(config: Config, root: Path, day: str, problem: VisibleProblem, virtual: np.ndarray,
                  chunk: list[NewDonor], bundle: Any, haplotypes: dict | None, fingerprints: dict) -> dict[str, dict]:
    """Impute ``chunk`` into the day's partition (atomic replace). Returns the chunk's ledger entries."""
    donors = [n.item.donor for n in chunk]
    run_id = make_run_id(model_version=bundle.model_version, inputs=fingerprints, run_date=day,
                         donors={n.item.donor: n.vcf_sha256 for n in chunk})
    targets = target_mask(problem, donors, config.impute.tissues, config.impute.include_observed)
    partition = root / f"{RUN_DATE}={day}"
    staging = _staging(root)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        previous = {}
        if (partition / "_manifest.json").is_file():
            previous = json.loads((partition / "_manifest.json").read_text()).get("donors", {})
            _link_tree(partition, staging)
        run_pipeline(config, problem, targets, virtual, model_dir(config), staging, run_id, haplotypes=haplotypes)
        # rows per donor of this chunk, from the new files only
        rows_by_donor = _rows_by_donor(staging, run_id)
        entries = {d: {"run_id": run_id, "rows": rows_by_donor.get(d, 0),
                       "vcf_sha256": next(n.vcf_sha256 for n in chunk if n.item.donor == d)} for d in donors}
        expected = int(targets.sum())
        if sum(e["rows"] for e in entries.values()) != expected:
            raise GeximputeError(f"{partition}: {sum(e['rows'] for e in entries.values())} rows written for "
                                 f"{expected} target entries; nothing committed")
        write_json(staging / "_manifest.json", manifest(
            config, step="nightly", run_date=day, model_version=bundle.model_version,
            donors={**previous, **entries}, rows=partition_rows(staging),
            inbox={n.item.donor: [str(p) for p in n.item.files] for n in chunk},
        ))
        commit_partition(staging, partition, _old(root, day))
    except GeximputeError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        err = output_os_error(exc) if isinstance(exc, Exception) else None
        if err is not None:
            raise output_error(partition, err) from exc
        raise
    return {d: {**e, RUN_DATE: day} for d, e in entries.items()}


def _rows_by_donor(folder: Path, run_id: str) -> dict[str, int]:
    table = pads.dataset(folder, format="parquet", partitioning="hive").to_table(
        columns=[S.DONOR_ID], filter=pads.field("run_id") == run_id)
    counts = pc.value_counts(table[S.DONOR_ID]).to_pylist()
    return {c["values"]: int(c["counts"]) for c in counts}


def nightly(config: Config, *, run_date: str | None = None) -> NightlyResult:
    """Impute the inbox's donors that are not in the ledger into ``run_date=<day>`` (default: today).

    Raises:
        ConfigError: ``nightly.inbox`` is not set or not a folder, or ``run_date`` is not a date.
        LockBusy: another run holds the lock.
        OutputError: the output cannot be written (nothing of the failing commit is kept).
    """
    if not config.nightly.inbox:
        raise ConfigError("config key 'nightly.inbox' is not set; expected the folder where new genomes arrive")
    day = run_date or dt.date.today().isoformat()
    try:
        dt.date.fromisoformat(day)
    except ValueError:
        raise ConfigError(f"run date {day!r}: expected YYYY-MM-DD") from None
    root = output_root(config)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{root}: cannot create the nightly output folder: {exc}") from exc
    with RunLock(lock_path(config)):
        return _run(config, root, day)


def _run(config: Config, root: Path, day: str) -> NightlyResult:
    """The body of :func:`nightly`, under the lock."""
    t0 = time.perf_counter()
    ledger_file = ledger_path(config)
    recorded = read_ledger(ledger_file)
    done = recover(root, recorded)
    if done != recorded:
        write_ledger(ledger_file, done)
    items = scan_inbox(Path(config.nightly.inbox))
    todo = [i for i in items if i.donor not in done]
    already = [i.donor for i in items if i.donor in done]
    if not todo:
        log.info("nightly: nothing new in %s (%d genomes already done)", config.nightly.inbox, len(already))
        return NightlyResult(day, [], {}, already, 0, None, time.perf_counter() - t0)

    try:
        bundle = load_bundle(model_dir(config))
    except FileNotFoundError as exc:
        raise GeximputeError(str(exc)) from exc
    dataset = load_dataset(config, with_variants=False)
    problem, _ = make_problem(dataset, hidden_mask=False)
    valid, quarantined = [], {}
    for item in todo:
        try:
            valid.append(read_new_donor(item, config, problem, dataset.genome))
        except (GeximputeError, OSError, ValueError) as exc:
            quarantine(item, exc, quarantine_dir(config))
            quarantined[item.vcf.name] = str(exc)
    if not valid:
        return NightlyResult(day, [], quarantined, already, 0, None, time.perf_counter() - t0)

    extended, virtual = extend_problem(problem, valid, config.impute.tissues)
    extended = donor_haplotypes(extended, valid, dataset)
    haplotypes = donor_promoter_inputs(extended, bundle.models.network.spec.promoter_length)
    fingerprints = {k: v["sha256"] for k, v in input_fingerprints(config).items()}
    ensure_ray(config.ray)
    rows, step = 0, config.nightly.donors_per_commit
    for start in range(0, len(valid), step):
        chunk = valid[start : start + step]
        entries = _commit_chunk(config, root, day, extended, virtual, chunk, bundle, haplotypes, fingerprints)
        done.update(entries)
        write_ledger(ledger_file, done)
        n_rows = sum(e["rows"] for e in entries.values())
        rows += n_rows
        log.info("nightly: committed %d donors (%d rows) to %s=%s; %d of %d done", len(chunk), n_rows, RUN_DATE, day,
                 start + len(chunk), len(valid))
    return NightlyResult(day, [n.item.donor for n in valid], quarantined, already, rows, root / f"{RUN_DATE}={day}",
                         time.perf_counter() - t0)

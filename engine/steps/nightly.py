"""``geximpute nightly``: impute the new genomes of an inbox, each donor once, into a partition per run date.

Inbox (``nightly.inbox``)::

    <donor>.vcf | <donor>.vcf.gz | <donor>.bcf   the donor's genome; its sample column is named <donor>
    <donor>.expression.tsv (.csv, .tsv.gz)       optional: the donor's measured tissues, genes x tissues (gene_id and
                                                 one column per tissue of the data), on the scale of inputs.scale

Output (``nightly.output``, default ``<output_dir>/nightly``) and what sits beside it::

    <output>/run_date=YYYY-MM-DD/tissue=<t>/*.parquet  schema.PREDICTIONS rows of the donors done that day
    <output>/run_date=YYYY-MM-DD/_manifest.json       config, inputs, model_version, donors and run ids, rows
    .<output>.geximpute/run_date=YYYY-MM-DD/          the partition's versions and staging (run_date=... links in)
    <output>.ledger.json                              the donors done: run date, run id, rows, VCF fingerprint
    <output>.lock                                     the run's lease: owner, host, pid, expiry time (renewed)
    <inbox>/quarantine/<file>, <file>.error.txt       inputs that failed and why

A run takes the lease (:class:`geximpute.runtime.atomic.Lease`: it expires unless renewed, so a run killed on one pod
never blocks the next night's pod, on another host), validates each new genome (any failure of one donor's input
quarantines that donor and the others go on; two genome files of one donor are both quarantined), and imputes the
new donors ``donors_per_commit`` at a time. A done donor whose genome file changed since (a new checksum), or whose
expression file is new or changed, is imputed again into the run's date (``nightly.redelivered``). Each commit is
one Ray Data job (:func:`geximpute.steps.impute.run_pipeline`) into a staging folder of the partition's store,
outside the dataset, holding the day's partition so far (hard links) plus the new rows, committed as a new version
of ``run_date=<day>`` by one atomic link switch (:func:`geximpute.runtime.atomic.staged_output`, under the run's
lease); the ledger is rewritten atomically and durably after that. If a run dies between the two, the next run finds
the donors in the partition's manifest and records them instead of imputing them again, so no donor is ever written
twice. A run with nothing new writes nothing.

How a donor's genome enters the model: each VCF is read in the windows the model reads (through its index when it has
one) and validated; :func:`donor_haplotypes` builds the new donors' promoter haplotypes and cis-site dosages from it
next to the reference donors' genomes, so that the predictor reads each donor's own promoters and the context its
cis-genetic score, exactly as in ``impute``. A VCF with no record in any of those windows is quarantined (it would
otherwise be predicted as the reference genome). A model trained without personal genomes (no ``inputs.variants``)
predicts every donor from the reference genome, the new ones too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import glob
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from geximpute import schema as S
from geximpute.config import Config
from geximpute.errors import ConfigError, GeximputeError, InputError
from geximpute.fit.bundle import load_bundle
from geximpute.io.checks import file_state
from geximpute.io.dataset import load_dataset, window_regions
from geximpute.io.expression import new_sample_factors, read_expression, to_model_scale
from geximpute.io.matrixfile import MatrixFile, append_columns, row_sums
from geximpute.io.variants import read_variants
from geximpute.runtime.atomic import (
    Lease,
    LeaseBusy,
    clean_staging,
    fsync_dir,
    lease_seconds,
    resolve,
    scratch_folder,
    staged_output,
    store_of,
    write_durable,
)
from geximpute.runtime.memory import release_unused_memory
from geximpute.runtime.partitions import committed_donors, partition_donors
from geximpute.runtime.provenance import fingerprint, input_fingerprints, manifest, read_versions, write_json
from geximpute.runtime.raytools import ensure_ray
from geximpute.science.genomes import add_donors, uncovered_chromosomes
from geximpute.science.problem import VisibleProblem, make_problem
from geximpute.steps.impute import (
    MATRIX_FOLDER,
    OutputError,
    add_missing_profiles,
    check_bundle,
    donor_promoter_sequences,
    genomes_the_model_reads,
    head_baselines,
    make_run_id,
    matrix_errors,
    model_dir,
    output_error,
    output_os_error,
    partition_rows,
    prediction_columns,
    run_pipeline,
    target_mask,
)

log = logging.getLogger(__name__)

VCF_SUFFIXES = (".vcf.gz", ".vcf.bgz", ".vcf", ".bcf")
#: a genome's index files, beside it (moved with it into quarantine: a corrected genome put back must not be read
#: through its predecessor's index)
INDEX_SUFFIXES = (".tbi", ".csi")
EXPRESSION_SUFFIXES = (".expression.tsv", ".expression.tsv.gz", ".expression.csv", ".expression.csv.gz")
RUN_DATE = S.RUN_DATE


#: another nightly run holds the run's lease (kept under its earlier name)
LockBusy = LeaseBusy


@dataclass
class InboxItem:
    """One new genome of the inbox: the donor, its VCF and its optional measured expression."""

    donor: str
    vcf: Path
    expression: Path | None = None
    duplicates: list[Path] = field(default_factory=list)  # other genome files of the same donor (quarantined)
    other_expressions: list[Path] = field(default_factory=list)  # more expression files of the donor (quarantined)

    @property
    def files(self) -> list[Path]:
        """The item's files: its genome(s) with their indexes (``.tbi``/``.csi`` beside them), its expression."""
        genomes = [self.vcf, *self.duplicates]
        indexes = [p.with_name(p.name + ext) for p in genomes for ext in INDEX_SUFFIXES]
        return (genomes + [p for p in indexes if p.is_file()] + ([self.expression] if self.expression else [])
                + self.other_expressions)


@dataclass
class NewDonor:
    """A validated inbox donor: its genome and its measured tissues on the modelling scale."""

    item: InboxItem
    variants: Any
    tissues: list[str] = field(default_factory=list)
    values: np.ndarray | None = None  # (G, len(tissues)) float32 over the problem's genes, NaN where unmeasured
    vcf_sha256: str = ""
    expression_sha256: str | None = None  # of the expression file read with the genome (None: none)


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
    reimputed: list[str] = field(default_factory=list)  # done donors whose genome changed, imputed again
    deferred: list[str] = field(default_factory=list)  # changed genomes of donors imputed today: next run date
    waiting: list[str] = field(default_factory=list)  # left in the inbox for the next run (still arriving, or a
    # passing error reading them): neither imputed nor quarantined


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


def partition_store(root: Path) -> Path:
    """Where the versions and staging folders of ``root``'s partitions live: ``.<root>.geximpute/`` beside the
    root, outside the dataset, so that no reader of the root ever lists them."""
    return store_of(root)


# Lock ---------------------------------------------------------------------------------------------------------


def run_lease(config: Config) -> Lease:
    """The nightly run's lease (:class:`geximpute.runtime.atomic.Lease`) on :func:`lock_path`: it expires unless
    renewed, so a run killed on one pod never blocks a run on another; ``nightly.lease_seconds`` long."""
    return Lease(lock_path(config), what="nightly run", ttl=config.nightly.lease_seconds)


class StillArriving(GeximputeError):
    """An inbox file changed while it was read: it is left for the next run."""


#: errors reading a donor's file that say nothing about the file (permissions not set yet by the delivery, a
#: network file system's hiccup, memory): the donor is left in the inbox for the next run, not quarantined
TRANSIENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EIO, errno.ESTALE, errno.EAGAIN, errno.EBUSY,
                              errno.ETIMEDOUT, errno.ENOMEM, errno.EINTR})


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError) and not isinstance(exc, GeximputeError)
                                            and exc.errno in TRANSIENT_ERRNOS)


# Ledger -------------------------------------------------------------------------------------------------------


def read_ledger(path: Path) -> dict[str, dict]:
    """The ledger's donors: ``{donor: {run_date, run_id, rows, vcf_sha256, expression_sha256}}`` (empty when there
    is none; ``expression_sha256`` None where no expression file came with the genome)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise GeximputeError(f"{path}: the nightly ledger is not valid JSON ({exc}); restore it from the partition "
                             f"manifests by moving it aside and running again") from exc
    donors = data.get("donors", {}) if isinstance(data, dict) else None
    if not isinstance(donors, dict) or not all(isinstance(v, dict) for v in donors.values()):
        raise GeximputeError(f"{path}: the nightly ledger is not an object of donors ({{\"donors\": {{donor: "
                             "{run_date, run_id, rows, vcf_sha256}}}}); restore it from the partition manifests by "
                             "moving it aside and running again")
    return dict(donors)


def write_ledger(path: Path, donors: dict[str, dict]) -> None:
    """Write the ledger atomically and durably (:func:`geximpute.runtime.atomic.write_durable`, mode 0640)."""
    write_durable(path, json.dumps({"donors": dict(sorted(donors.items()))}, indent=1) + "\n")


def recover(root: Path, ledger: dict[str, dict]) -> dict[str, dict]:
    """Tidy what a killed run left (under the run's lease, so no other run is active) and complete the ledger.

    Staging folders of the partitions' store are removed (their runs' lease expired, since this run holds it);
    donors committed but not in the ledger, or committed by a later run than the ledger says (the run died between
    the commit and the ledger), are recorded from the partitions.
    """
    for store in partition_store(root).glob(f"{RUN_DATE}=*"):
        clean_staging(store)
    # left by the previous protocol, and only what it named: `.<root>.staging-<pid>` and `.<root>.old-<day>-<pid>`
    # (a partition moved aside), real folders; a user's `.<root>.old-backup` or a link is never moved or removed
    legacy = re.compile(rf"\.{re.escape(root.name)}\.(?:staging-\d+|old-(\d{{4}}-\d{{2}}-\d{{2}})-\d+)")
    for path in sorted(root.parent.glob(f".{glob.escape(root.name)}.*")):
        match = legacy.fullmatch(path.name)
        if match is None or not path.is_dir() or path.is_symlink():
            if path.name.startswith(f".{root.name}.old-") and path.is_dir() and not path.is_symlink():
                log.info("nightly: %s is left as it is (not a name this engine gives a partition it moves aside, "
                         ".%s.old-YYYY-MM-DD-<pid>); if a run died committing it, move it back as %s/%s=<date>",
                         path, root.name, root, RUN_DATE)
            continue
        day = match.group(1)
        target = root / f"{RUN_DATE}={day}" if day else None
        if target is not None and not os.path.lexists(target):
            log.warning("nightly: restoring %s from %s (a run died while committing it)", target, path)
            os.replace(path, target)
        elif time.time() - path.stat().st_mtime > lease_seconds():
            log.info("nightly: removing %s left by a run that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)
    updated = {}
    for donor, info in committed_donors(root).items():
        known = ledger.get(donor)
        if known is None or (known.get("run_id") != info.get("run_id")
                             and str(info[RUN_DATE]) >= str(known.get(RUN_DATE, ""))):
            updated[donor] = info
    if updated:
        log.warning("nightly: %d donors are committed but not in the ledger (a run died before recording them): "
                    "recorded now, not imputed again", len(updated))
    return {**ledger, **updated}


# Inbox --------------------------------------------------------------------------------------------------------


def _strip(name: str, suffixes: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def scan_inbox(inbox: Path) -> list[InboxItem]:
    """The genomes of the inbox, one item per donor whatever the extension, each with its expression file when
    there is one; a donor claimed by two genome files (``X.vcf`` and ``X.vcf.gz``) has them in ``duplicates``, one
    with two expression files (``X.expression.tsv`` and ``X.expression.csv``) the others in ``other_expressions``."""
    if not inbox.is_dir():
        raise ConfigError(f"config key 'nightly.inbox' has value {str(inbox)!r}; expected an existing folder")
    files = {p.name: p for p in inbox.iterdir() if p.is_file()}
    expressions: dict[str, list[Path]] = {}
    for name, path in sorted(files.items()):
        if donor := _strip(name, EXPRESSION_SUFFIXES):
            expressions.setdefault(donor, []).append(path)
    by_donor: dict[str, InboxItem] = {}
    for name, path in sorted(files.items()):
        donor = _strip(name, VCF_SUFFIXES)
        if not donor:
            continue
        if donor in by_donor:
            by_donor[donor].duplicates.append(path)
        else:
            mine = expressions.pop(donor, [])
            by_donor[donor] = InboxItem(donor, path, mine[0] if mine else None, other_expressions=mine[1:])
    items = list(by_donor.values())
    for donor, paths in expressions.items():
        log.warning("nightly: %s has no genome beside it (%s.vcf.gz); left in the inbox",
                    ", ".join(map(str, paths)), donor)
    return items


def donor_haplotypes(problem: VisibleProblem, donors: list[NewDonor], dataset: Any,
                     reference: Any = None) -> VisibleProblem:
    """The extended problem with genomes that cover the new donors: their promoter haplotypes and cis-site dosages
    built from their own VCFs (:func:`geximpute.science.genomes.add_donors`) next to the reference donors'.

    With these, :func:`geximpute.steps.impute.donor_promoter_sequences` gives the predictors each new donor's own
    promoter haplotypes (encoded once per run), and the context's cis-genetic score (fitted on the reference donors'
    visible expression and genotypes) is evaluated on the new donor's genotypes, exactly as ``impute`` does for the
    data's donors.

    Args:
        problem: the problem extended with the new donors (:func:`extend_problem`).
        donors: the new donors, each with its validated VCF.
        dataset: the loaded reference inputs (its genome and its VCF).
        reference: the reference problem's genomes (``problem.genomes`` before the new donors were added); None
            when the model was trained without personal genomes (no ``inputs.variants``): the problem is then
            returned as it is and the new donors are predicted from the reference genome, like every donor of a
            reference-only model.
    """
    if reference is None or dataset.genome is None:
        if donors:
            log.info("nightly: the model uses no personal genomes (inputs.variants unset): %d new donors are "
                     "predicted from the reference genome", len(donors))
        return problem

    genomes = add_donors(reference, list(problem.donors), {d.item.donor: d.variants for d in donors},
                         dataset.variants, dataset.genome, problem, dataset.config)
    log.info("nightly: genomes of %d new donors: %d promoter sequences in all, %d (gene, donor) pairs differ from "
             "the reference", len(donors), len(genomes.sequences), len(genomes.personal_pairs()[0]))
    return dataclasses.replace(problem, genomes=genomes)


def read_new_donor(item: InboxItem, config: Config, problem: VisibleProblem, genome: Any) -> NewDonor:
    """Read and validate one inbox genome (and its expression file).

    Raises:
        InputError: the VCF or the expression file is malformed, the VCF lacks the donor's sample, or the
            expression names a tissue the model does not know.
        StillArriving: a file changed while it was read (or vanished): the donor waits for the next run.
    """
    # the files as they are before they are read: a delivery still being copied is not imputed from its first part
    # (and then recorded with the whole file's checksum, never to be redone), nor quarantined because its first
    # part does not parse (a gzip cut short, a line cut in two)
    try:
        states = {path: file_state(path) for path in (item.vcf, item.expression) if path is not None}
    except FileNotFoundError as exc:  # removed (or being replaced) since the inbox was scanned
        raise StillArriving(f"{exc.filename}: gone since the inbox was read (moved away, or being replaced?); the "
                            "donor is left for the next run") from exc
    try:
        new = _read_new_donor(item, config, problem, genome)
    except StillArriving:
        raise
    except Exception as exc:
        moved = _moved(states)
        if moved is not None:
            raise StillArriving(f"{moved}: the file changed while it was read (still being delivered?) and did not "
                                f"read ({type(exc).__name__}: {exc}); left in the inbox for the next run") from exc
        raise
    moved = _moved(states)
    if moved is not None:
        raise StillArriving(f"{moved}: the file changed while it was read (still being delivered?); left in the "
                            "inbox for the next run")
    return new


def _moved(states: dict[Path, tuple[int, int]]) -> Path | None:
    """The first file whose size or modification time is not what ``states`` recorded (gone counts), or None."""
    for path, state in states.items():
        try:
            if file_state(path) != state:
                return path
        except OSError:
            return path
    return None


def _read_new_donor(item: InboxItem, config: Config, problem: VisibleProblem, genome: Any) -> NewDonor:
    """:func:`read_new_donor` without the check that the files did not change while they were read."""
    sha = fingerprint(item.vcf)["sha256"]
    # only the windows the model reads, through the VCF's index when it has one
    regions = window_regions(problem.chroms, problem.tss, config)
    variants = read_variants(item.vcf, genome, samples=[item.donor], regions=regions,
                             genome_partial=config.inputs.genome_partial,
                             keep_filtered=config.genotypes.keep_filtered, filtered_as_missing=True)
    if config.inputs.variants:  # the model reads genomes: one that lacks the model's regions cannot be used
        absent = uncovered_chromosomes(variants, problem.chroms)
        filtered = variants.report.get("n_filtered", 0)
        if variants.sites.num_rows == filtered:  # none, or only records that failed a FILTER (unknown calls)
            raise InputError(
                item.vcf, f"none of its records lies in the {len(regions):,} windows the model reads around its "
                f"genes' TSSs (chromosomes {', '.join(sorted(set(map(str, problem.chroms)))[:6])})"
                + (f" but {filtered} that failed a FILTER, read as unknown calls (genotypes.keep_filtered)"
                   if filtered else ""),
                expected="the donor's genotypes on the chromosomes of the model's genes, in the genome build of "
                "inputs.genome", hint="Predicting this donor would silently use the reference genome; give the "
                "donor's VCF for these regions")
        if absent:
            log.warning("nightly: %s has no record on %s: the donor's genotypes there are unknown (their genetic "
                        "score counts them as missing; their promoters read the reference)", item.vcf.name,
                        ", ".join(absent[:6]))
    new = NewDonor(item, variants, vcf_sha256=sha)
    if item.expression is None:
        return new
    new.expression_sha256 = fingerprint(item.expression)["sha256"]
    expr = read_expression(item.expression, "wide", config.inputs.scale)
    unknown = [t for t in expr.sample_ids if t not in problem.tissues]
    if unknown:
        raise InputError(item.expression, f"tissue column {unknown[0]!r} is not a tissue of the model",
                         record="the header", expected=f"tissue names among {problem.tissues}")
    row_of = {g: i for i, g in enumerate(expr.gene_ids)}
    rows = np.array([row_of.get(g, -1) for g in problem.gene_ids])
    if not (rows >= 0).any():
        raise InputError(item.expression, "no gene of the model is in the file", record="the gene_id column",
                         expected=f"gene ids such as {problem.gene_ids[0]}")
    scaling = problem.scaling
    if expr.scale == "counts" and scaling is not None and scaling.method != "cpm":
        # on the cohort's scale: the median of ratios to the reference donors' pseudo-reference, not to these few
        # columns' own (a CPM factor is each sample's own total, which to_model_scale takes from the whole file)
        counts = np.full((problem.n_genes, len(expr.sample_ids)), np.nan)
        counts[rows >= 0] = expr.values[rows[rows >= 0]]
        factors = new_sample_factors(scaling, problem.values, counts)
        aligned = (np.log1p(counts / factors) if scaling.log1p else counts / factors).astype(np.float32)
    else:
        values = to_model_scale(expr, config.expression)
        aligned = np.full((problem.n_genes, len(expr.sample_ids)), np.nan, np.float32)
        aligned[rows >= 0] = values[rows[rows >= 0]]
    new.tissues, new.values = list(expr.sample_ids), aligned
    return new


def quarantine(item: InboxItem, error: BaseException, folder: Path) -> bool:
    """Move the item's files (its indexes too) to ``folder``, each with ``<file>.error.txt`` saying why, written
    before the file moves (a run killed in between leaves the note, never a file without one). A file of another
    owner keeps its mode (a symbolic link is moved as a link: its target is not touched). Returns whether every
    file moved; a file that cannot be moved stays in the inbox, reported, and the night goes on."""
    stamp = dt.datetime.now().isoformat(timespec="seconds")
    moved = True
    try:
        folder.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        log.error("nightly: cannot quarantine %s (%s: %s); left in the inbox", item.vcf.name, folder, exc)
        return False
    for path in item.files:
        target = folder / path.name
        if os.path.lexists(target):
            target = folder / f"{path.name}.{stamp.replace(':', '')}"
        note = target.with_name(target.name + ".error.txt")
        try:
            write_durable(note, f"{stamp} {item.vcf.name}: {error}\n")
            _move_whole(path, target)
        except OSError as exc:
            log.error("nightly: cannot quarantine %s (%s); left in the inbox", path, exc)
            note.unlink(missing_ok=True)
            moved = False
            if path in (item.vcf, *item.duplicates):
                # the genome stays: so do its indexes and expression files (quarantined without it, the donor's
                # measured tissues would be lost to a later delivery of the genome)
                break
            continue
        if not target.is_symlink():
            try:
                os.chmod(target, 0o640)
            except OSError:  # another user's file: its mode is theirs
                pass
    if moved:
        log.warning("nightly: quarantined %s: %s", item.vcf.name, error)
    else:
        log.error("nightly: %s could not be quarantined whole (%s); what did not move stays in the inbox and is "
                  "tried again next run", item.vcf.name, error)
    return moved


def _move_whole(source: Path, target: Path) -> None:
    """Move ``source`` to ``target`` (absent): a rename on one file system; across file systems a copy to a
    temporary name beside ``target``, synced and renamed into place, then ``source`` removed, so that ``target``
    never names part of a file (a full disk or a kill mid-copy leaves the source whole and the temporary removed or
    named as such). A symbolic link moves as a link."""
    try:
        os.rename(source, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        if source.is_symlink():
            os.symlink(os.readlink(source), partial)
        else:
            shutil.copy2(source, partial)
            with open(partial, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(partial, target)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    fsync_dir(target.parent)
    source.unlink()


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
    own = False  # whether `values` is a matrix of this call's (then widened in place)
    if columns:
        extra = np.stack(columns, axis=1).astype(np.float32)
        if isinstance(values, MatrixFile):  # a wider file beside it, a pass of rows at a time
            values, own = append_columns(values, extra, f"{values.path}.extended"), True
        else:
            values = np.concatenate([values, extra], axis=1)
    extended = dataclasses.replace(
        problem,
        donors=names,
        sample_ids=np.concatenate([problem.sample_ids, np.asarray(sample_ids, dtype=object)]),
        donor_index=np.concatenate([problem.donor_index, np.asarray(donor_index, np.int32)]).astype(np.int32),
        tissue_index=np.concatenate([problem.tissue_index, np.asarray(tissue_index, np.int32)]).astype(np.int32),
        values=values,
        # the new donors' samples were normalised on their own (their own files); nightly cuts no training fold,
        # which is all the count scaling is kept for
        scaling=None,
    )
    if getattr(extended, "genomes", None) is not None:  # per-donor genomes do not cover the new donors yet
        extended = dataclasses.replace(extended, genomes=None)
    return add_missing_profiles(extended, [d.item.donor for d in donors], tissues, in_place=own)


# The run ------------------------------------------------------------------------------------------------------


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every data file under ``src`` into ``dst`` (same tree; copies where links are not possible)."""
    for path in src.rglob("*"):
        if path.is_file() and not path.name.startswith(("_", ".")):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)


def _commit_chunk(config: Config, root: Path, day: str, problem: VisibleProblem, virtual: np.ndarray,
                  chunk: list[NewDonor], bundle: Any, haplotypes: dict | None, fingerprints: dict,
                  lease: Lease, inputs: dict | None = None) -> dict[str, dict]:
    """Impute ``chunk`` into the day's partition: a new version of it (the previous rows hard-linked, the new rows
    written) committed by :func:`geximpute.runtime.atomic.staged_output` under the run's lease. Returns the chunk's
    ledger entries. ``inputs``: the input fingerprints the run took as it read them, for the manifest."""
    donors = [n.item.donor for n in chunk]
    run_id = make_run_id(model_version=bundle.model_version, inputs=fingerprints, run_date=day,
                         donors={n.item.donor: n.vcf_sha256 for n in chunk})
    targets = target_mask(problem, donors, config.impute.tissues, config.impute.include_observed)
    partition = root / f"{RUN_DATE}={day}"
    try:
        with staged_output(partition, step="nightly", store=partition_store(root) / partition.name,
                           lease=lease, durable=True) as staging:
            previous = {}
            if partition.is_dir():
                current = resolve(partition)
                previous = partition_donors(current)
                _link_tree(current, staging)
            run_pipeline(config, problem, targets, virtual, bundle.folder, staging, run_id,
                         haplotypes=haplotypes, baselines=head_baselines(bundle, problem),
                         encode_once=bundle.reads_promoters, reads_family=bundle.reads_family,
                         own_value_free=config.impute.include_observed)
            # rows per donor of this chunk, from the new files only
            rows_by_donor = _rows_by_donor(staging, run_id)
            entries = {d: {"run_id": run_id, "rows": rows_by_donor.get(d, 0),
                           "vcf_sha256": next(n.vcf_sha256 for n in chunk if n.item.donor == d),
                           "expression_sha256": next(n.expression_sha256 for n in chunk if n.item.donor == d)}
                       for d in donors}
            expected = int(row_sums(targets).sum())
            if sum(e["rows"] for e in entries.values()) != expected:
                raise GeximputeError(f"{partition}: {sum(e['rows'] for e in entries.values())} rows written for "
                                     f"{expected} target entries; nothing committed")
            write_json(staging / "_manifest.json", manifest(
                config, inputs=inputs, step="nightly", run_date=day, model_version=bundle.model_version,
                columns=prediction_columns(bundle.models.config),
                donors={**previous, **entries}, rows=partition_rows(staging),
                inbox={n.item.donor: [str(p) for p in n.item.files] for n in chunk},
            ))
    except GeximputeError:
        raise
    except Exception as exc:
        err = output_os_error(exc)
        if err is not None:
            raise output_error(partition, err) from exc
        raise
    return {d: {**e, RUN_DATE: day} for d, e in entries.items()}


def _rows_by_donor(folder: Path, run_id: str) -> dict[str, int]:
    table = pads.dataset(folder, format="parquet", partitioning="hive").to_table(
        columns=[S.DONOR_ID], filter=pads.field("run_id") == run_id)
    counts = pc.value_counts(table[S.DONOR_ID]).to_pylist()
    return {c["values"]: int(c["counts"]) for c in counts}


def check_run_date(day: str) -> str:
    """``day`` if it is an ISO date written ``YYYY-MM-DD`` (``20240101`` would be a partition of its own)."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", day or ""):
        raise ConfigError(f"run date {day!r}: expected an ISO date written YYYY-MM-DD, e.g. 2024-01-31")
    try:
        dt.date.fromisoformat(day)
    except ValueError:
        raise ConfigError(f"run date {day!r}: not a calendar date; expected YYYY-MM-DD, e.g. 2024-01-31") from None
    return day


def nightly(config: Config, *, run_date: str | None = None) -> NightlyResult:
    """Impute the inbox's donors that are not in the ledger into ``run_date=<day>`` (default: today).

    Raises:
        ConfigError: ``nightly.inbox`` is not set or not a folder, or ``run_date`` is not a date.
        LockBusy: another run holds the run's lease.
        OutputError: the output cannot be written (nothing of the failing commit is kept).
    """
    if not config.nightly.inbox:
        raise ConfigError("config key 'nightly.inbox' is not set; expected the folder where new genomes arrive")
    day = check_run_date(run_date or config.nightly.run_date or dt.date.today().isoformat())
    root = output_root(config)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{root}: cannot create the nightly output folder: {exc}") from exc
    with run_lease(config) as lease, contextlib.ExitStack() as stack:
        try:  # the expression matrix's folder, beside the output root (as `impute`'s beside its output)
            scratch = stack.enter_context(scratch_folder(root, MATRIX_FOLDER))
        except OSError as exc:
            raise OutputError(f"{root}: cannot create the folder of the run's expression matrix beside it: {exc}"
                              ) from exc
        return _run(config, root, day, lease, scratch)


def _changed(item: InboxItem, before: dict) -> Path | None:
    """The file of a done donor's inbox item that differs from what its imputation read, or None: its genome (a
    new checksum), or an expression file new beside it or changed (a ledger that recorded no expression checksum,
    written before it did, is not compared).

    Raises:
        OSError: a file cannot be read now (gone since the inbox was listed, or a passing error).
    """
    if before.get("vcf_sha256") and fingerprint(item.vcf)["sha256"] != before["vcf_sha256"]:
        return item.vcf
    if "expression_sha256" in before and item.expression is not None:
        if fingerprint(item.expression)["sha256"] != before["expression_sha256"]:
            return item.expression
    return None


def _redelivered(items: list[InboxItem], done: dict[str, dict], day: str, policy: str
                 ) -> tuple[list[InboxItem], list[str], list[str]]:
    """Done donors whose genome or expression file changed since (a new checksum, or an expression file that came
    after the genome): (to re-impute today, deferred to a later date, left for the next run).

    With ``nightly.redelivered: reimpute`` a changed donor is imputed again into today's partition (its earlier
    rows stay in their run date; a reader takes each donor's latest run date), unless it was imputed today, in
    which case (or where this run's date is earlier than that one, a back-filled date) it waits for a later run date:
    a reader taking each donor's latest run date must see the new rows. With ``ignore`` it is only reported. A file
    that cannot be read now (removed since the inbox was listed, permissions, an I/O error) leaves its donor for
    the next run, reported; it never stops the night.
    """
    again, deferred, waiting = [], [], []
    for item in items:
        before = done.get(item.donor)
        if before is None:
            continue
        try:
            changed = _changed(item, before)
        except OSError as exc:
            log.warning("nightly: the files of donor %s, imputed on %s, could not be read to see whether they changed "
                        "(%s: %s); left for the next run", item.donor, before.get(RUN_DATE), type(exc).__name__, exc)
            waiting.append(item.donor)
            continue
        if changed is None:
            continue
        what = "new" if changed == item.expression and before.get("expression_sha256") is None else "changed"
        if policy == "ignore":
            log.warning("nightly: %s %s since donor %s was imputed on %s; not imputed again "
                        "(nightly.redelivered: ignore)", changed, what, item.donor, before.get(RUN_DATE))
        elif str(before.get(RUN_DATE)) >= day:  # ISO dates: the earlier rows would stay the latest
            log.warning("nightly: %s %s since donor %s was imputed on %s; re-imputed by a run date after it",
                        changed, what, item.donor, before.get(RUN_DATE))
            deferred.append(item.donor)
        else:
            log.warning("nightly: %s %s since donor %s was imputed on %s: imputing it again into %s=%s", changed,
                        what, item.donor, before.get(RUN_DATE), RUN_DATE, day)
            again.append(item)
    return again, deferred, waiting


def _run(config: Config, root: Path, day: str, lease: Lease, scratch: Path) -> NightlyResult:
    """The body of :func:`nightly`, under the run's lease; the reference expression matrix is kept in a file under
    ``scratch`` (:class:`~geximpute.io.matrixfile.MatrixFile`), read a pass of rows at a time."""
    t0 = time.perf_counter()
    ledger_file = ledger_path(config)
    recorded = read_ledger(ledger_file)
    done = recover(root, recorded)
    if done != recorded:
        write_ledger(ledger_file, done)
    items = scan_inbox(Path(config.nightly.inbox))
    quarantined: dict[str, str] = {}
    waiting: list[str] = []  # donors left in the inbox for the next run (still arriving, or a passing error)

    def set_aside(item: InboxItem, error: BaseException) -> None:
        """Quarantine the donor; where its files could not all be moved, it waits (named on stderr: never silent)."""
        if quarantine(item, error, quarantine_dir(config)):
            quarantined[item.vcf.name] = str(error)
        else:
            waiting.append(item.donor)

    for item in [i for i in items if i.other_expressions and not i.duplicates]:
        names = ", ".join(p.name for p in [item.expression, *item.other_expressions])
        error = InputError(item.expression, f"{len(item.other_expressions) + 1} expression files claim donor "
                           f"{item.donor!r} ({names})", expected="one expression file per donor in the inbox",
                           hint="keep the right one and put it back in the inbox with the genome")
        set_aside(item, error)
    for item in [i for i in items if i.duplicates]:
        names = ", ".join(p.name for p in [item.vcf, *item.duplicates])
        error = InputError(item.vcf, f"{len(item.duplicates) + 1} genome files claim donor {item.donor!r} ({names})",
                           expected="one genome file per donor in the inbox",
                           hint="keep the right one and put it back in the inbox")
        set_aside(item, error)
    items = [i for i in items if not i.duplicates and not i.other_expressions]
    again, deferred, unread = _redelivered([i for i in items if i.donor in done], done, day,
                                           config.nightly.redelivered)
    waiting.extend(unread)
    todo = [i for i in items if i.donor not in done] + again
    already = [i.donor for i in items if i.donor in done and i not in again and i.donor not in unread]
    if not todo:
        log.info("nightly: nothing new in %s (%d genomes already done)", config.nightly.inbox, len(already))
        return NightlyResult(day, [], quarantined, already, 0, None, time.perf_counter() - t0, deferred=deferred,
                             waiting=waiting)

    try:
        bundle = load_bundle(model_dir(config))
    except FileNotFoundError as exc:
        raise GeximputeError(str(exc)) from exc
    config, _ = genomes_the_model_reads(config, bundle, None, "nightly")
    # with the reference donors' genomes, which the genetic score is fitted on; the matrix written to a file as it
    # is read, then scaled there
    with matrix_errors(root, scratch / "expression.f32"):  # no room for it: a clear error, nothing written
        dataset = load_dataset(config, matrix=scratch / "expression.f32")
        problem, _ = make_problem(dataset, hidden_mask=False, consume=True)
    # fingerprinted as read (an `ingest` may commit another store version meanwhile, and prune this one)
    inputs = input_fingerprints(config, read_versions(dataset))
    dataset = dataclasses.replace(dataset, expression=None)  # the problem holds the values; the genome is kept
    release_unused_memory()  # what reading the inputs freed, back to the system
    check_bundle(bundle, bundle.folder, problem, config)
    valid = []
    for item in todo:
        try:
            valid.append(read_new_donor(item, config, problem, dataset.genome))
        except StillArriving as exc:
            log.warning("nightly: %s", exc)
            waiting.append(item.donor)
        except Exception as exc:  # any failure of one donor's input quarantines that donor, never the night
            if _transient(exc):  # the file may be fine: a delivery's permissions not set yet, a network hiccup
                log.error("nightly: %s could not be read (%s: %s); left in the inbox for the next run", item.vcf,
                          type(exc).__name__, exc)
                waiting.append(item.donor)
                continue
            if not isinstance(exc, (GeximputeError, OSError, ValueError)):
                log.exception("nightly: unexpected error reading %s", item.vcf)
                exc = GeximputeError(f"{item.vcf}: unexpected error while reading it: {type(exc).__name__}: {exc}")
            set_aside(item, exc)
    if not valid:
        return NightlyResult(day, [], quarantined, already, 0, None, time.perf_counter() - t0, deferred=deferred,
                             waiting=waiting)

    with matrix_errors(root, scratch / "expression.f32"):
        extended, virtual = extend_problem(problem, valid, config.impute.tissues)
    extended = donor_haplotypes(extended, valid, dataset, problem.genomes)
    haplotypes = donor_promoter_sequences(extended)
    fingerprints = {k: v["sha256"] for k, v in inputs.items()}
    ensure_ray(config.ray)
    rows, step = 0, config.nightly.donors_per_commit
    for start in range(0, len(valid), step):
        chunk = valid[start : start + step]
        entries = _commit_chunk(config, root, day, extended, virtual, chunk, bundle, haplotypes, fingerprints, lease,
                                inputs)
        done.update(entries)
        write_ledger(ledger_file, done)
        n_rows = sum(e["rows"] for e in entries.values())
        rows += n_rows
        log.info("nightly: committed %d donors (%d rows) to %s=%s; %d of %d done", len(chunk), n_rows, RUN_DATE, day,
                 start + len(chunk), len(valid))
    return NightlyResult(day, [n.item.donor for n in valid], quarantined, already, rows, root / f"{RUN_DATE}={day}",
                         time.perf_counter() - t0, reimputed=[i.donor for i in again], deferred=deferred,
                         waiting=waiting)

"""Genotypes from VCF, VCF.gz (gzip or bgzip) and BCF through cyvcf2, checked against the reference genome.

:func:`read_variants` returns the sites as an Arrow table in :data:`geximpute.schema.VARIANT_SITES` (chromosome
names harmonised to the FASTA's), the genotypes as an ``int8`` array of allele indices per haplotype and a
report of what was read, renamed, dropped and checked. Every problem with the input raises
:class:`~geximpute.errors.InputError` naming the file and the record.
"""

from __future__ import annotations

import bisect
import gzip
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cyvcf2
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from geximpute import schema
from geximpute.errors import ConfigError, InputError
from geximpute.io.checks import check_gzip_whole, check_readable, open_bytes, open_text
from geximpute.io.chroms import chrom_key, harmonise_chroms, renamed
from geximpute.io.fasta import Genome
from geximpute.io.tables import source

log = logging.getLogger(__name__)

#: columns of a sample map file
VCF_SAMPLE = "vcf_sample"

#: at most this many names or sites are listed in an error message
_SHOW = 5

_MAX_ALLELES = int(np.iinfo(np.int8).max)
_GT_HEADER_LINE = '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">'


@dataclass
class Variants:
    """The sites and genotypes of one VCF/BCF file.

    Attributes:
        path: the file read.
        sites: one row per site in :data:`geximpute.schema.VARIANT_SITES`: ``chrom`` (the FASTA's name),
            ``pos`` (1-based), ``variant_id`` (null for ``.``), ``ref``, ``alt`` (every ALT allele; empty
            for a monomorphic site with ALT ``.``).
        samples: donor ids, in the order of the ``samples`` argument or else of the file.
        genotypes: ``int8``, shape (n_sites, n_samples, 2): allele index per haplotype (0 = REF, k = k-th
            ALT), -1 where missing. A haploid call fills both haplotypes with its one allele.
        phased: ``bool``, shape (n_sites, n_samples): True where the call is phased (``|``) or haploid.
        phase_set: ``int32``, shape (n_sites, n_samples), the FORMAT ``PS`` of each call where the header declares
            it (calls phased relative to each other share one; -1 where a phased call gives none: the VCF
            specification puts all of those in one set); None when the header declares no ``PS``.
        report: counts: ``n_sites`` (kept), ``n_sites_read``, ``n_samples``, ``n_multiallelic``,
            ``n_indels`` (an ALT whose length differs from REF's; symbolic ALTs excluded),
            ``n_missing_calls`` (calls with at least one missing allele), ``n_unphased_calls`` (called,
            diploid and unphased), ``renamed_chroms`` ``{vcf name: FASTA name}``, ``n_ref_checked``,
            ``n_ref_mismatch`` (dropped), ``ref_mismatch_fraction``, ``ref_mismatch_examples``,
            ``n_sites_off_genome`` (chromosome absent from the FASTA or REF past the record's end; kept,
            unchecked), ``n_filtered`` (records dropped because their FILTER is neither ``PASS`` nor ``.``),
            ``filtered_examples`` and ``indexed`` (whether ``regions`` were read through the file's index).
    """

    path: Path
    sites: pa.Table
    samples: list[str]
    genotypes: np.ndarray
    phased: np.ndarray
    report: dict
    phase_set: np.ndarray | None = None

    def __post_init__(self) -> None:
        shape = (self.sites.num_rows, len(self.samples))
        if (self.genotypes.shape != (*shape, 2) or self.phased.shape != shape
                or (self.phase_set is not None and self.phase_set.shape != shape)):
            raise ValueError(
                f"{self.path}: genotypes {self.genotypes.shape}, phased {self.phased.shape} and phase sets "
                f"{None if self.phase_set is None else self.phase_set.shape} do not match "
                f"{shape[0]} sites x {shape[1]} samples"
            )


# Sample map -------------------------------------------------------------------------------------------------


def read_sample_map(path: str | Path) -> dict[str, str]:
    """Read a two-column table that maps VCF sample names to donor ids.

    The file is tab- or comma-separated (told apart by its header line), may be gzip-compressed and must have
    the columns ``vcf_sample`` and ``donor_id``; other columns are ignored.

    Args:
        path: the sample map file.

    Returns:
        ``{vcf_sample: donor_id}``.

    Raises:
        InputError: the file is missing or empty, lacks a column, has an empty value, or repeats a VCF
            sample or a donor id.
    """
    path = check_readable(path, "sample map")
    check_gzip_whole(path, "sample map")
    with open_text(path) as fh:
        header = fh.readline().rstrip("\r\n")
    delimiter = "\t" if "\t" in header else ","
    columns = [name.strip().strip('"') for name in header.split(delimiter)]
    missing = [name for name in (VCF_SAMPLE, schema.DONOR_ID) if name not in columns]
    if missing:
        raise InputError(
            path,
            f"sample map lacks column(s) {', '.join(missing)}",
            record=f"header line 1 (columns: {', '.join(repr(c) for c in columns[:10])})",
            expected=f"a header line with columns {VCF_SAMPLE} and {schema.DONOR_ID}, tab- or comma-separated",
        )
    try:
        table = pacsv.read_csv(
            source(path),  # gzip by its bytes (a .bgz name, or none), as the header was read
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(
                include_columns=[VCF_SAMPLE, schema.DONOR_ID],
                column_types={VCF_SAMPLE: pa.string(), schema.DONOR_ID: pa.string()},
                strings_can_be_null=False,
            ),
        )
    except (pa.ArrowException, OSError) as exc:
        raise InputError(path, f"cannot be read as a table ({exc})", expected="one value per column") from exc
    vcf_samples = [s.strip() for s in table.column(VCF_SAMPLE).to_pylist()]
    donors = [d.strip() for d in table.column(schema.DONOR_ID).to_pylist()]
    if not vcf_samples:
        raise InputError(path, "sample map has no rows", expected="one row per VCF sample after the header")
    for row, (sample, donor) in enumerate(zip(vcf_samples, donors, strict=True)):
        if not sample or not donor:
            raise InputError(path, "empty value", record=f"line {row + 2}", expected="a VCF sample and a donor id")
    for column, values in ((VCF_SAMPLE, vcf_samples), (schema.DONOR_ID, donors)):
        seen: dict[str, int] = {}
        for row, value in enumerate(values):
            if value in seen:
                raise InputError(
                    path,
                    f"{column} {value!r} appears twice",
                    record=f"lines {seen[value] + 2} and {row + 2}",
                    expected=f"each {column} once",
                )
            seen[value] = row
    return dict(zip(vcf_samples, donors, strict=True))


# Reading ----------------------------------------------------------------------------------------------------


def read_variants(
    path: str | Path,
    genome: Genome | None = None,
    *,
    sample_map: dict[str, str] | None = None,
    samples: list[str] | None = None,
    regions: list[tuple[str, int, int]] | None = None,
    genome_partial: bool = False,
    max_ref_mismatch: float = 0.01,
    keep_filtered: bool = False,
    filtered_as_missing: bool = False,
) -> Variants:
    """Read the sites and genotypes of a VCF, VCF.gz or BCF file and check them against the genome.

    Args:
        path: the VCF/BCF file; a ``.tbi``/``.csi`` index beside it is used for ``regions``.
        genome: the reference; when given, chromosome names are mapped to its record names and REF alleles
            are checked against it. Without it, names are mapped to the UCSC style (``chr17``).
        sample_map: ``{vcf_sample: donor_id}`` (see :func:`read_sample_map`); VCF samples absent from it are
            not read (logged; none in it is an error).
        samples: donor ids to keep, in this order; all samples of the file when None.
        regions: ``(chrom, start, end)`` intervals, 1-based and inclusive, in any chromosome naming; only
            sites whose POS lies in one are read. All sites when None.
        genome_partial: the FASTA holds only some chromosomes or only part of them: sites off it are kept
            unchecked and counted rather than refused.
        max_ref_mismatch: largest fraction of checked sites whose REF may disagree with the FASTA; those
            sites are dropped. A larger fraction raises, as it means the VCF and FASTA builds differ.
        keep_filtered: read records whose FILTER names a failed filter (``LowQual``) too; by default only
            records that passed (``PASS``) or were not filtered (``.``) are read, the others counted.
        filtered_as_missing: keep the records that failed a FILTER (unless ``keep_filtered``) with every call
            missing instead of dropping them: for one donor's genome, where a dropped record would read as REF
            (a single-sample VCF lists the sites where its donor differs), failed QC is an unknown call.

    Returns:
        The sites, samples, genotypes, phase flags and report (see :class:`Variants`).

    Raises:
        InputError: the file is missing, empty, truncated or not a VCF/BCF; has no samples or no GT field;
            is unsorted; lacks a requested sample or a sample of the map; has sites off the genome (unless
            ``genome_partial``) or none on it; or has too many REF alleles that disagree with the FASTA.
        ConfigError: ``samples``, ``regions`` or ``max_ref_mismatch`` are malformed.
    """
    if not 0.0 <= max_ref_mismatch <= 1.0:
        raise ConfigError(f"max_ref_mismatch must lie in [0, 1], got {max_ref_mismatch!r}")
    wanted = _check_regions(regions)
    path = check_readable(path, "VCF file")
    check_gzip_whole(path, "VCF file")
    vcf = _open_vcf(path)
    try:
        vcf_samples = list(vcf.samples)
        if not vcf_samples:
            raise InputError(
                path,
                "has no sample columns, so no genotypes",
                record="the #CHROM header line",
                expected="FORMAT and at least one sample column after INFO",
                hint="A sites-only VCF cannot be used; give the VCF with the donors' genotypes",
            )
        if not vcf.contains("GT"):
            raise InputError(
                path,
                "no GT field is declared in the header",
                record="the ## header lines",
                expected=f"a FORMAT GT line such as {_GT_HEADER_LINE}",
                hint="Genotypes are read from GT; if the records carry GT, add that header line "
                "(e.g. with `bcftools annotate --header-lines`)",
            )
        _check_sample_columns(path, len(vcf_samples))
        if genome is not None:
            check_contig_lengths(path, vcf, genome)
        used, donors = _select_samples(path, vcf_samples, sample_map, samples)
        if len(used) < len(vcf_samples):
            vcf.set_samples(used)
        # htslib keeps the file's sample order; `order` puts the columns in the order asked for
        position = {name: i for i, name in enumerate(vcf.samples)}
        order = np.array([position[name] for name in used], dtype=np.intp)
        index_file = _index_of(path) if wanted is not None else None
        records = _query(vcf, wanted) if index_file is not None else _stream(path, vcf, wanted)
        with_ps = vcf.contains("PS")
        raw = _collect(path, records, len(used), order, keep_filtered=keep_filtered, phase_sets=with_ps,
                       filtered_as_missing=filtered_as_missing)
    finally:
        vcf.close()

    mapping = harmonise_chroms(dict.fromkeys(raw["chrom"]), genome.chroms if genome is not None else None)
    sites = schema.check_table(
        pa.table(
            {
                schema.CHROM: pa.array([mapping[c] for c in raw["chrom"]], pa.string()),
                schema.POS: pa.array(raw["pos"], pa.int64()),
                schema.VARIANT_ID: pa.array(raw["id"], pa.string()),
                schema.REF: pa.array(raw["ref"], pa.string()),
                schema.ALT: pa.array(raw["alt"], pa.list_(pa.string())),
            }
        ),
        schema.VARIANT_SITES,
        f"{path}: sites",
    )
    n_sites = sites.num_rows
    genotypes = np.stack(raw["gt"]) if n_sites else np.full((0, len(used), 2), -1, dtype=np.int8)
    phased = np.stack(raw["phased"]) if n_sites else np.zeros((0, len(used)), dtype=bool)
    phase_set = None
    if with_ps:
        phase_set = np.stack(raw["ps"]) if n_sites else np.zeros((0, len(used)), dtype=np.int32)

    ref_report = {
        "n_ref_checked": 0,
        "n_ref_mismatch": 0,
        "ref_mismatch_fraction": 0.0,
        "ref_mismatch_examples": [],
    }
    n_off = 0
    if genome is not None and n_sites:
        on_genome = _on_genome(sites, genome)
        _check_off_genome(path, sites, genome, on_genome, genome_partial)
        n_off = int((~on_genome).sum())
        ref_report = check_ref_alleles(sites, genome, path, max_ref_mismatch)
        keep = ~ref_report.pop("mismatch_mask")
        if not keep.all():
            sites = sites.filter(pa.array(keep))
            genotypes = genotypes[keep]
            phased = phased[keep]
            phase_set = None if phase_set is None else phase_set[keep]

    report = {
        "n_sites": sites.num_rows,
        "n_sites_read": n_sites,
        "n_samples": len(donors),
        **_call_counts(sites, genotypes, phased),
        "renamed_chroms": renamed(mapping),
        **ref_report,
        "n_sites_off_genome": n_off,
        "n_filtered": raw["n_filtered"],
        "filtered_examples": raw["filtered_examples"],
        "indexed": index_file is not None,
    }
    if raw["n_filtered"]:
        log.info("%s: %d record(s) failed a FILTER and were not read (e.g. %s); set genotypes.keep_filtered to read "
                 "them", path, raw["n_filtered"], "; ".join(raw["filtered_examples"][:3]))
    return Variants(path=path, sites=sites, samples=donors, genotypes=genotypes, phased=phased, report=report,
                    phase_set=phase_set)


def _check_regions(regions: list[tuple[str, int, int]] | None) -> dict[str, list[tuple[int, int]]] | None:
    """Regions as ``{chromosome key: sorted, merged [(start, end)]}``; None when not given."""
    if regions is None:
        return None
    by_key: dict[str, list[tuple[int, int]]] = {}
    for region in regions:
        try:
            chrom, start, end = region
            start, end = int(start), int(end)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"regions: {region!r} is not (chrom, start, end)") from exc
        if start < 1 or end < start:
            raise ConfigError(f"regions: {region!r} needs 1 <= start <= end (1-based, inclusive)")
        by_key.setdefault(chrom_key(str(chrom)), []).append((start, end))
    for key, intervals in by_key.items():
        intervals.sort()
        merged = [intervals[0]]
        for start, end in intervals[1:]:
            if start <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        by_key[key] = merged
    return by_key


def _open_vcf(path: Path) -> cyvcf2.VCF:
    """Open with cyvcf2, turning htslib's refusals into an :class:`InputError` that says what is wrong."""
    try:
        return cyvcf2.VCF(str(path))
    except Exception as exc:  # cyvcf2 raises bare Exception for a bad header, OSError for an unknown format
        raise InputError(
            path,
            f"{_why_not_vcf(path)} (htslib: {exc})",
            expected="a VCF (plain, gzip or bgzip) or BCF file: '##' meta lines, then a '#CHROM POS ID REF "
            "ALT QUAL FILTER INFO FORMAT sample...' line, then one record per line",
        ) from exc


def _check_sample_columns(path: Path, n_samples: int) -> None:
    """Refuse a text VCF whose first record has another number of columns than the ``#CHROM`` line names (a sample
    name lost from the header: htslib reads the first columns by the names there, each donor a neighbour's
    genotypes, without a word). A BCF is binary and holds its samples itself."""
    with open_bytes(path) as fh:
        if fh.read(3) == b"BCF":
            return
        fh.seek(0)
        for number, line in enumerate(fh, start=1):
            if line.startswith(b"#"):
                continue
            columns = line.rstrip(b"\r\n").rstrip(b"\t").count(b"\t") + 1  # a trailing tab adds no sample
            if columns > 9 + n_samples:  # fewer: htslib refuses the record itself, naming it
                raise InputError(path, f"a record has {columns} columns where the #CHROM line names {n_samples} "
                                 f"sample(s)", record=f"line {number}",
                                 expected=f"{9 + n_samples} tab-separated columns: CHROM to FORMAT, then one per "
                                 "sample named in the #CHROM line",
                                 hint="A sample name may have been lost from the header line")
            return


def _why_not_vcf(path: Path) -> str:
    """Say in words why htslib could not open ``path``, reading its header lines (up to #CHROM)."""
    try:
        with open_bytes(path) as fh:
            if fh.read(3) == b"BCF":
                return "is a BCF file whose header cannot be read"
            fh.seek(0)
            first = fh.readline(1 << 16).decode("utf-8", errors="replace").rstrip("\r\n")
            if not first.startswith("##fileformat=VCF"):
                return f"is not a VCF: the first line is {first[:60]!r}, not '##fileformat=VCFv4.x'"
            chrom_line = None
            for raw in fh:  # a header of thousands of ##contig lines is read whole, never a record
                if not raw.startswith(b"#"):
                    break
                if raw.startswith(b"#CHROM"):
                    chrom_line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                    break
    except (OSError, EOFError, gzip.BadGzipFile):
        return "cannot be read"
    if chrom_line is None:
        return "is not a VCF: no '#CHROM' header line before the records"
    repeated = [name for name, n in Counter(chrom_line.split("\t")[9:]).items() if n > 1]
    if repeated:
        return (f"names sample(s) {_few(repeated)} twice in its #CHROM line: each sample column needs a name of its "
                "own (rename one, e.g. with `bcftools reheader --samples`)")
    return "has a VCF header that cannot be parsed"


def _select_samples(
    path: Path, vcf_samples: list[str], sample_map: dict[str, str] | None, samples: list[str] | None
) -> tuple[list[str], list[str]]:
    """The VCF samples to read and their donor ids, both in the order of ``samples`` (else of the file)."""
    if sample_map is None:
        donor_of = {s: s for s in vcf_samples}
        unmapped: list[str] = []
    else:
        donor_of = {s: sample_map[s] for s in vcf_samples if s in sample_map}
        unmapped = [s for s in vcf_samples if s not in sample_map]
    if samples is None:
        # a cohort VCF (1000 Genomes: 2,504 people) holds more people than were measured: the map links those
        # that were, and the others are not read (a map had to list every VCF sample, and no setting chose them)
        if unmapped and len(unmapped) == len(vcf_samples):
            raise InputError(
                path,
                f"none of its {len(vcf_samples)} VCF samples is in the sample map: {_few(unmapped)}",
                record="the #CHROM header line",
                expected="the VCF sample names in the sample map's vcf_sample column",
                hint="Check that the sample map was written for this VCF",
            )
        if unmapped:
            log.info("%s: %d of %d VCF samples are not in the sample map and are not read: %s", path.name,
                     len(unmapped), len(vcf_samples), _few(unmapped))
        used = [s for s in vcf_samples if s in donor_of]
    else:
        duplicated = [d for d, n in Counter(samples).items() if n > 1]
        if duplicated:
            raise ConfigError(f"samples: donor ids repeated: {_few(duplicated)}")
        vcf_of: dict[str, str] = {}
        for vcf_sample, donor in donor_of.items():
            vcf_of.setdefault(donor, vcf_sample)
        absent = [d for d in samples if d not in vcf_of]
        if absent:
            hint = "Check the donor ids against the VCF's sample names"
            if sample_map is not None:
                hint = "Check the sample map"
                if unmapped:
                    hint += f"; these VCF samples are not in it: {_few(unmapped)}"
            raise InputError(
                path,
                f"{len(absent)} of {len(samples)} requested donors are not in the VCF: {_few(absent)}",
                record="the #CHROM header line",
                expected="each requested donor as a VCF sample" + (" (through the sample map)" if sample_map else ""),
                hint=hint,
            )
        used = [vcf_of[d] for d in samples]
    donors = [donor_of[s] for s in used]
    duplicated = [d for d, n in Counter(donors).items() if n > 1]
    if duplicated:
        raise InputError(
            path,
            f"several VCF samples map to the same donor: {_few(duplicated)}",
            record="the #CHROM header line",
            expected="one VCF sample per donor",
            hint="Fix the sample map, or choose one sample per donor with `samples`",
        )
    return used, donors


def _index_of(path: Path) -> Path | None:
    """The ``.tbi``/``.csi`` index beside ``path``, if there is one."""
    for suffix in (".csi", ".tbi"):
        index = path.with_name(path.name + suffix)
        if index.is_file():
            return index
    return None


def _query(vcf: cyvcf2.VCF, wanted: dict[str, list[tuple[int, int]]]) -> Iterator[tuple[cyvcf2.Variant, int | None]]:
    """Records whose POS lies in ``wanted``, through the index, in the file's chromosome order."""
    for chrom in vcf.seqnames:
        for start, end in wanted.get(chrom_key(chrom), ()):
            # the index also returns records that start before `start` and overlap it
            for variant in vcf(f"{chrom}:{start}-{end}"):
                if start <= variant.POS <= end:
                    yield variant, None


def _stream(
    path: Path, vcf: cyvcf2.VCF, wanted: dict[str, list[tuple[int, int]]] | None
) -> Iterator[tuple[cyvcf2.Variant, int | None]]:
    """Every record with its number (1-based), checked to be sorted, less those outside ``wanted``."""
    done: set[str] = set()
    chrom, last_pos, number = None, 0, 0
    keys: dict[str, str] = {}
    iterator = iter(vcf)
    while True:
        try:
            variant = next(iterator)
        except StopIteration:
            if number == 0:
                raise InputError(path, "holds no variant records (a header only)", record="the lines after #CHROM",
                                 expected="at least one site with genotypes",
                                 hint="Check that the export or copy of the VCF finished") from None
            return
        except Exception as exc:  # htslib parse errors come as bare Exception
            where = f"record {number + 1}" + _line_of(path, number + 1)
            if chrom is not None:
                where += f", after {chrom}:{last_pos}"
            raise InputError(
                path,
                f"record cannot be parsed (htslib: {exc})",
                record=where,
                expected="tab-separated CHROM, POS, ID, REF, ALT, QUAL, FILTER, INFO, FORMAT and sample columns",
            ) from exc
        number += 1
        pos = variant.POS
        if variant.CHROM != chrom:
            if variant.CHROM in done:
                raise InputError(
                    path,
                    f"unsorted: chromosome {variant.CHROM} appears again after {chrom}",
                    record=_where(path, variant.CHROM, pos, number),
                    expected="all records of a chromosome together, sorted by position",
                    hint="Sort the file, e.g. `bcftools sort`",
                )
            if chrom is not None:
                done.add(chrom)
            chrom, last_pos = variant.CHROM, 0
        elif pos < last_pos:
            raise InputError(
                path,
                f"unsorted: position {pos} comes after {last_pos}",
                record=_where(path, chrom, pos, number),
                expected="records sorted by position within each chromosome",
                hint="Sort the file, e.g. `bcftools sort`",
            )
        last_pos = pos
        if wanted is not None:
            if chrom not in keys:
                keys[chrom] = chrom_key(chrom)
            if not _within(wanted.get(keys[chrom], ()), pos):
                continue
        yield variant, number


def _within(intervals: list[tuple[int, int]], pos: int) -> bool:
    i = bisect.bisect_right(intervals, (pos, float("inf"))) - 1
    return i >= 0 and intervals[i][0] <= pos <= intervals[i][1]


def _where(path: Path, chrom: str, pos: int, number: int | None) -> str:
    """``"chr17:1234 (record 5, line 31)"``: a record for an error message."""
    if number is None:  # read through the index: the record's number in the file is unknown
        return f"{chrom}:{pos}"
    return f"{chrom}:{pos} (record {number}{_line_of(path, number)})"


def _line_of(path: Path, number: int) -> str:
    """``", line N"`` for the ``number``-th record of a text VCF; ``""`` for BCF or when not found.

    Only called on the way to an error, so reading the file again costs nothing on the good path.
    """
    if number < 1:
        return ""
    try:
        with open_text(path) as fh:
            seen = 0
            for line_no, line in enumerate(fh, start=1):
                if line.startswith("#") or not line.strip():
                    continue
                seen += 1
                if seen == number:
                    return f", line {line_no}"
    except (OSError, UnicodeDecodeError, EOFError):
        return ""
    return ""


def _collect(
    path: Path, records: Iterator[tuple[cyvcf2.Variant, int | None]], n_samples: int, order: np.ndarray, *,
    keep_filtered: bool = False, phase_sets: bool = False, filtered_as_missing: bool = False,
) -> dict:
    """Site columns and per-site genotype rows (and phase sets) of ``records``, less those that failed a FILTER
    unless ``keep_filtered`` (with every call missing where ``filtered_as_missing``); ``n_filtered`` and
    ``filtered_examples`` count those."""
    raw: dict = {key: [] for key in ("chrom", "pos", "id", "ref", "alt", "gt", "phased", "ps", "filtered_examples")}
    raw["n_filtered"] = 0
    reorder = not np.array_equal(order, np.arange(len(order)))
    here: tuple[str, int] | None = None
    alleles_here: dict[tuple[str, tuple[str, ...]], int | None] = {}
    for variant, number in records:
        failed = variant.FILTER  # None for PASS and '.'
        if failed is not None and not keep_filtered:
            raw["n_filtered"] += 1
            if len(raw["filtered_examples"]) < _SHOW:
                raw["filtered_examples"].append(f"{variant.CHROM}:{variant.POS} FILTER={failed}")
            if not filtered_as_missing:
                continue
        alt = list(variant.ALT)
        if (variant.CHROM, variant.POS) != here:
            here, alleles_here = (variant.CHROM, variant.POS), {}
        key = (variant.REF, tuple(alt))
        if key in alleles_here:
            before = alleles_here[key]
            raise InputError(
                path,
                f"site {variant.CHROM}:{variant.POS} {variant.REF}>{','.join(alt)} appears twice"
                + (f" (records {before} and {number})" if before is not None and number is not None else ""),
                record=_where(path, variant.CHROM, variant.POS, number),
                expected="each site once (split multi-allelic records may share a position, not their alleles)",
                hint="Remove the duplicates, e.g. `bcftools norm --rm-dup exact`",
            )
        alleles_here[key] = number
        if len(alt) >= _MAX_ALLELES:
            raise InputError(
                path,
                f"{len(alt)} ALT alleles",
                record=_where(path, variant.CHROM, variant.POS, number),
                expected=f"fewer than {_MAX_ALLELES} ALT alleles per site",
            )
        gt, phased = _genotype(path, variant, number, n_samples)
        if reorder:
            gt, phased = gt[order], phased[order]
        if failed is not None and not keep_filtered:  # filtered_as_missing: kept, every call unknown
            gt, phased = np.full_like(gt, -1), np.zeros_like(phased)
        top = int(gt.max()) if gt.size else -1
        if top > len(alt):
            raise InputError(
                path,
                f"a GT names allele {top} but the site has {len(alt)} ALT allele(s)",
                record=_where(path, variant.CHROM, variant.POS, number),
                expected=f"allele indices 0..{len(alt)}",
            )
        raw["chrom"].append(variant.CHROM)
        raw["pos"].append(variant.POS)
        raw["id"].append(variant.ID)
        raw["ref"].append(variant.REF)
        raw["alt"].append(alt)
        raw["gt"].append(gt)
        raw["phased"].append(phased)
        if phase_sets:
            ps = _phase_set(variant, n_samples)
            raw["ps"].append(ps[order] if reorder else ps)
    return raw


def _phase_set(variant: cyvcf2.Variant, n_samples: int) -> np.ndarray:
    """(n_samples,) int32 FORMAT PS of one record; -1 where the record or the call gives none."""
    values = variant.format("PS") if "PS" in variant.FORMAT else None
    if values is None:
        return np.full(n_samples, -1, dtype=np.int32)
    ps = np.asarray(values).reshape(n_samples, -1)[:, 0].astype(np.int64)
    return np.where(ps < 0, -1, ps).astype(np.int32)  # htslib's missing integer is the most negative one


def _genotype(path: Path, variant: cyvcf2.Variant, number: int | None, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``(int8 (n_samples, 2) allele indices, bool (n_samples,) phased)`` of one record."""
    # cyvcf2 raises on `.genotype` of a record whose FORMAT leaves GT out (e.g. DS only): all calls missing
    if "GT" not in variant.FORMAT:
        return np.full((n_samples, 2), -1, dtype=np.int8), np.zeros(n_samples, dtype=bool)
    # int16 (n_samples, ploidy + 1): the alleles, then the phase flag; -2 pads calls shorter than the ploidy
    array = variant.genotype.array()
    ploidy = array.shape[1] - 1
    if ploidy == 1:
        first = array[:, 0]
        return np.stack([first, first], axis=1).astype(np.int8), np.ones(n_samples, dtype=bool)
    if ploidy != 2:
        raise InputError(
            path,
            f"ploidy {ploidy} genotypes",
            record=_where(path, variant.CHROM, variant.POS, number),
            expected="haploid or diploid GT",
        )
    first, second = array[:, 0], array[:, 1]
    haploid = second == -2
    second = np.where(haploid, first, second)
    return np.stack([first, second], axis=1).astype(np.int8), array[:, 2].astype(bool) | haploid


def _call_counts(sites: pa.Table, genotypes: np.ndarray, phased: np.ndarray) -> dict[str, int]:
    missing = (genotypes < 0).any(axis=2)
    ref = sites.column(schema.REF).to_pylist()
    alts = sites.column(schema.ALT).to_pylist()
    return {
        "n_multiallelic": sum(1 for alt in alts if len(alt) > 1),
        "n_indels": sum(
            1
            for r, alt in zip(ref, alts, strict=True)
            if any(len(a) != len(r) for a in alt if not a.startswith("<") and a not in ("*", "."))
        ),
        "n_missing_calls": int(missing.sum()),
        "n_unphased_calls": int((~phased & ~missing).sum()),
    }


# Genome checks ----------------------------------------------------------------------------------------------


def _on_genome(sites: pa.Table, genome: Genome) -> np.ndarray:
    """Bool per site: its chromosome is a FASTA record and its REF lies within that record."""
    chroms = sites.column(schema.CHROM).to_pylist()
    pos = sites.column(schema.POS).to_pylist()
    ref = sites.column(schema.REF).to_pylist()
    lengths = genome.lengths
    return np.array(
        [c in lengths and p + len(r) - 1 <= lengths[c] for c, p, r in zip(chroms, pos, ref, strict=True)],
        dtype=bool,
    )


def check_contig_lengths(path: Path, vcf: cyvcf2.VCF, genome: Genome) -> None:
    """Refuse a VCF whose header declares a chromosome shorter than the FASTA's record of it: the two cannot be of
    one build, and this check needs no REF base (a sparse FASTA knows few of them). A FASTA record shorter than the
    contig may be a piece of it (``genome_partial``, or a FASTA of chromosome prefixes); sites past its end are
    refused by the off-genome check and REF alleles by :func:`check_ref_alleles`. Contigs without a declared length
    are skipped.
    """
    try:
        names, lengths = list(vcf.seqnames), list(vcf.seqlens)
    except Exception:  # no ##contig lengths in the header (cyvcf2 raises a bare Exception)
        return
    if len(names) != len(lengths):
        return
    mapping = harmonise_chroms(dict.fromkeys(names), genome.chroms)
    for name, length in zip(names, lengths, strict=True):
        fasta = genome.lengths.get(mapping.get(name, name))
        if not length or fasta is None or fasta <= length:
            continue
        raise InputError(
            path,
            f"the header declares {name} {length:,} bp long but the FASTA {Path(genome.path).name} has it "
            f"{fasta:,} bp: the VCF and the FASTA are of different genome builds (e.g. chr22 is 50,818,468 bp in "
            "hg38 and 51,304,566 in hg19)",
            record=f"##contig=<ID={name},length={length}>",
            expected="the FASTA of the VCF's build, whose records are at most as long as the VCF's contigs",
            hint="Use the FASTA of the VCF's build, or lift the VCF over to the FASTA's build",
        )


def _check_off_genome(path: Path, sites: pa.Table, genome: Genome, on_genome: np.ndarray, partial: bool) -> None:
    """Refuse a VCF with no site on the genome, and (unless ``partial``) one with any site off it."""
    if on_genome.all():
        return
    chroms = sites.column(schema.CHROM).to_pylist()
    absent = Counter(c for c in chroms if c not in genome.lengths)
    listed = ", ".join(f"{c} ({n} sites)" for c, n in list(absent.items())[:_SHOW])
    fasta = f"the FASTA {genome.path.name} (records: {_few(genome.chroms)})"
    if not on_genome.any():
        raise InputError(
            path,
            f"none of its {len(chroms)} sites lies on {fasta}"
            + (f"; VCF chromosomes: {listed}" if absent else "; every site lies past the end of its record"),
            expected="a FASTA of the VCF's genome build holding its chromosomes",
            hint="Check that the VCF and the FASTA are of the same species and build",
        )
    if partial:
        return
    if absent:
        raise InputError(
            path,
            f"{sum(absent.values())} sites lie on chromosomes absent from {fasta}: {listed}",
            record=_site(sites, chroms.index(next(iter(absent)))),
            expected="every VCF chromosome in the FASTA",
            hint="Use a FASTA with these chromosomes, drop them from the VCF (e.g. `bcftools view -t "
            "^chrY`), or set genome_partial to keep them unchecked",
        )
    past = np.flatnonzero(~on_genome)
    examples = "; ".join(f"{_site(sites, i)} (record length {genome.lengths[chroms[i]]})" for i in past[:_SHOW])
    raise InputError(
        path,
        f"{len(past)} sites lie past the end of their chromosome in {fasta}",
        record=examples,
        expected="every site within its FASTA record",
        hint="The VCF and FASTA may be of different builds; if the FASTA holds only part of each chromosome, "
        "set genome_partial",
    )


def check_ref_alleles(sites: pa.Table, genome: Genome, path: str | Path, max_ref_mismatch: float) -> dict:
    """Compare each site's REF with the FASTA; refuse when too many disagree.

    Only sites whose chromosome is a FASTA record and whose REF lies within it are checked; the comparison
    ignores case (soft-masking) and treats ``N`` on either side as matching any base. A site whose FASTA bases are
    all ``N`` (sequence unknown, as in a sparse genome) is not counted as checked: it says nothing about the build,
    and counting it would let a VCF of another build pass against a mostly unknown genome.

    Args:
        sites: a table in :data:`geximpute.schema.VARIANT_SITES` with chromosome names of ``genome``.
        genome: the reference.
        path: the VCF the sites came from, for messages.
        max_ref_mismatch: largest fraction of checked sites allowed to disagree.

    Returns:
        ``n_ref_checked``, ``n_ref_mismatch``, ``ref_mismatch_fraction``, ``ref_mismatch_examples`` (up to 5
        ``"chr17:156665 REF=C FASTA=T"``) and ``mismatch_mask`` (bool per row of ``sites``).

    Raises:
        InputError: more than ``max_ref_mismatch`` of the checked sites disagree, which means the VCF and the
            FASTA are of different genome builds.
    """
    chroms = sites.column(schema.CHROM).to_pylist()
    positions = sites.column(schema.POS).to_pylist()
    refs = sites.column(schema.REF).to_pylist()
    mismatch = np.zeros(len(refs), dtype=bool)
    examples: list[str] = []
    checked = 0
    for i, (chrom, pos, ref) in enumerate(zip(chroms, positions, refs, strict=True)):
        end = pos + len(ref) - 1
        if chrom not in genome.lengths or end > genome.lengths[chrom]:
            continue
        fasta = genome.fetch(chrom, pos, end).upper()
        if set(fasta) <= {"N"}:
            continue
        checked += 1
        if not _same_bases(ref.upper(), fasta):
            mismatch[i] = True
            if len(examples) < _SHOW:
                examples.append(f"{chrom}:{pos} REF={ref} FASTA={fasta}")
    n_mismatch = int(mismatch.sum())
    fraction = n_mismatch / checked if checked else 0.0
    if fraction > max_ref_mismatch:
        raise InputError(
            path,
            f"REF alleles disagree with the FASTA {Path(genome.path).name} at {n_mismatch} of {checked} "
            f"sites ({100 * fraction:.1f}%): this looks like a genome-build mismatch (e.g. an hg19 VCF read "
            "with an hg38 FASTA)",
            record="; ".join(examples),
            expected=f"at most {100 * max_ref_mismatch:g}% of REF alleles (max_ref_mismatch) differing",
            hint="Use the FASTA of the VCF's build, or lift the VCF over to the FASTA's build "
            "(`bcftools norm --check-ref e -f FASTA` lists every mismatch)",
        )
    return {
        "n_ref_checked": checked,
        "n_ref_mismatch": n_mismatch,
        "ref_mismatch_fraction": fraction,
        "ref_mismatch_examples": examples,
        "mismatch_mask": mismatch,
    }


def _same_bases(ref: str, fasta: str) -> bool:
    return ref == fasta or (
        len(ref) == len(fasta) and all(a == b or a == "N" or b == "N" for a, b in zip(ref, fasta, strict=True))
    )


def _site(sites: pa.Table, row: int) -> str:
    return f"{sites.column(schema.CHROM)[row].as_py()}:{sites.column(schema.POS)[row].as_py()}"


def _few(names: list[str]) -> str:
    shown = ", ".join(str(n) for n in names[:_SHOW])
    return shown + (f" and {len(names) - _SHOW} more" if len(names) > _SHOW else "")

"""Reference genome access through pyfaidx: plain or bgzip FASTA, strand-aware promoter windows."""

from __future__ import annotations

import gzip
import logging
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import pyfaidx

from geximpute.errors import InputError
from geximpute.io.checks import check_readable

log = logging.getLogger(__name__)

_COMPLEMENT = str.maketrans("ACGTNacgtnRYKMSWBDHVrykmswbdhv", "TGCANtgcanYRMKSWVHDByrmkswvhdb")


def reverse_complement(seq: str) -> str:
    """Reverse complement, keeping case (soft-masking) and IUPAC codes."""
    return seq.translate(_COMPLEMENT)[::-1]


@dataclass(frozen=True)
class PromoterWindow:
    """One strand-oriented window around a TSS.

    Attributes:
        sequence: 5'->3' on the gene's strand, ``upstream + downstream`` long; positions off the record are ``N``.
        padded: number of positions that fell off the record's start or end (0 when the window is complete).
        soft_masked: number of soft-masked (lower-case) bases in the window before ``soft_mask`` handling.
        unknown: number of unknown bases (``N`` in the FASTA, padding included) before ``soft_mask`` handling.
    """

    sequence: str
    padded: int
    soft_masked: int
    unknown: int = 0

    @property
    def complete(self) -> bool:
        return self.padded == 0


def _stale_index(path: Path) -> bool:
    """Whether ``path``'s ``.fai`` is older than it and can be rebuilt (warned about where it cannot)."""
    fai = path.with_name(path.name + ".fai")
    try:
        if fai.stat().st_mtime >= path.stat().st_mtime:
            return False
    except FileNotFoundError:
        return False
    if _writable(fai):
        log.warning("%s: its index %s is older than the FASTA (the FASTA changed after it was indexed?): rebuilding "
                    "it", path, fai.name)
        return True
    log.warning("%s: its index %s is older than the FASTA and cannot be rebuilt there (read-only): it is used as it "
                "is. If the FASTA changed after it was indexed, sequences may be read at the wrong offsets: index it "
                "again (`samtools faidx %s`)", path, fai.name, path)
    return False


def _writable(fai: Path) -> bool:
    """Whether the index can be written again: its folder and it, and the bgzip index beside it (``.gzi``, which
    pyfaidx rewrites with it)."""
    gzi = fai.with_name(fai.name[: -len(".fai")] + ".gzi")
    return (os.access(fai.parent, os.W_OK) and os.access(fai, os.W_OK)
            and (not gzi.exists() or os.access(gzi, os.W_OK)))


class Genome:
    """A FASTA file opened through pyfaidx (plain ``.fa`` or bgzip ``.fa.gz`` with its ``.fai``/``.gzi``).

    Args:
        path: the FASTA file.

    An index (``.fai``) older than its FASTA may describe an earlier version of it, whose record offsets would
    fetch the wrong bases without an error: it is rebuilt where its folder can be written, and otherwise used
    with a warning that names both files.

    Raises:
        InputError: the file is missing or empty, is plain gzip rather than bgzip, or cannot be indexed.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        check_readable(self.path, "FASTA file")
        rebuild = _stale_index(self.path)
        index = self.path.with_name(self.path.name + ".fai")
        had_index = index.exists()
        try:
            with warnings.catch_warnings():  # pyfaidx's own word on an old index: ours above says more
                warnings.filterwarnings("ignore", message="Index file .* is older than FASTA file",
                                        category=RuntimeWarning)
                self._fasta = pyfaidx.Fasta(
                    str(self.path), as_raw=True, sequence_always_upper=False, rebuild=rebuild, build_index=True
                )
        except pyfaidx.UnsupportedCompressionFormat as exc:
            raise InputError(
                self.path,
                "compressed with plain gzip, which allows no random access",
                expected="a plain FASTA or a bgzip-compressed one",
                hint="Recompress with `bgzip` (htslib) or decompress it",
            ) from exc
        except (OSError, ValueError, EOFError, struct.error, pyfaidx.FastaIndexingError, gzip.BadGzipFile) as exc:
            if not had_index:  # the index pyfaidx began for a file it could not read: not left beside the input
                index.unlink(missing_ok=True)
            text = str(exc)
            if "Duplicate key" in text:
                hint = "each record name must be unique: rename or remove the repeated record"
            elif isinstance(exc, pyfaidx.FastaIndexingError):
                hint = ("each record's lines must have one length (its last may be shorter): rewrap it, e.g. "
                        "`seqkit seq -w 60`")
            else:  # struct.error / EOFError: Bio.bgzf on a bgzip file cut short (a copy that did not finish)
                hint = "a truncated copy? copy it again"
            raise InputError(self.path, f"cannot be read as FASTA ({type(exc).__name__}: {text})",
                             expected="'>name' records, a bgzip file whole", hint=hint) from exc
        self.lengths: dict[str, int] = {name: len(rec) for name, rec in self._fasta.records.items()}
        if not self.lengths:
            raise InputError(self.path, "holds no FASTA records", expected="at least one '>name' record")

    def __contains__(self, chrom: str) -> bool:
        return chrom in self.lengths

    @property
    def chroms(self) -> list[str]:
        return list(self.lengths)

    def fetch(self, chrom: str, start: int, end: int) -> str:
        """Bases ``start..end`` (1-based, inclusive) of ``chrom`` as stored (soft-masking kept).

        Positions before 1 or past the record's end are returned as ``N``, so the result is always
        ``end - start + 1`` long.
        """
        if chrom not in self.lengths:
            raise KeyError(f"{self.path}: no record {chrom!r}; records: {', '.join(self.chroms[:10])}")
        length = self.lengths[chrom]
        lo, hi = max(start, 1), min(end, length)
        left = min(max(1 - start, 0), end - start + 1)
        if lo > hi:
            return "N" * (end - start + 1)
        seq = self._fasta[chrom][lo - 1 : hi]
        right = end - start + 1 - left - len(seq)
        return "N" * left + seq + "N" * right

    def window(
        self,
        chrom: str,
        tss: int,
        strand: str,
        upstream: int,
        downstream: int,
        soft_mask: str = "upper",
    ) -> PromoterWindow:
        """The promoter window around ``tss`` (1-based), 5'->3' on ``strand``.

        The window covers ``upstream`` bases 5' of the TSS, the TSS itself and ``downstream - 1`` bases 3' of it.
        ``soft_mask="upper"`` upper-cases soft-masked bases; ``"n"`` turns them into ``N``.
        """
        if strand == "+":
            start, end = tss - upstream, tss + downstream - 1
        elif strand == "-":
            start, end = tss - downstream + 1, tss + upstream
        else:
            raise ValueError(f"strand must be '+' or '-', got {strand!r}")
        raw = self.fetch(chrom, start, end)
        length = self.lengths[chrom]
        padded = max(0, 1 - start) + max(0, end - length)
        padded = min(padded, end - start + 1)
        soft = sum(1 for c in raw if c.islower())
        unknown = raw.count("N") + raw.count("n")
        if soft_mask == "n" and soft:
            raw = "".join("N" if c.islower() else c for c in raw)
        seq = raw.upper()
        if strand == "-":
            seq = reverse_complement(seq)
        return PromoterWindow(sequence=seq, padded=padded, soft_masked=soft, unknown=unknown)

    def close(self) -> None:
        self._fasta.close()

    def __enter__(self) -> Genome:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

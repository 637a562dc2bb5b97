"""Checks shared by the readers: the file exists, is not empty, and a gzip file is whole."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import zlib
from pathlib import Path

from geximpute.errors import InputError

GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def check_readable(path: str | Path, what: str) -> Path:
    """Fail with an :class:`InputError` naming ``path`` unless it is a non-empty readable file."""
    path = Path(path)
    if not path.exists():
        raise InputError(
            path,
            f"{what} not found",
            hint="Check the path in the config (relative paths are resolved against the config file's folder)",
        )
    if not path.is_file():
        raise InputError(path, f"{what} is not a regular file")
    if path.stat().st_size == 0:
        raise InputError(path, f"{what} is empty")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputError(path, f"{what} cannot be opened ({exc.strerror})") from exc
    return path


def check_gzip_whole(path: str | Path, what: str) -> None:
    """Decompress a gzip/bgzip file to its end; fail if it is truncated or corrupt.

    Streams in 1 MiB chunks, so memory stays flat; cost is one pass over the file.
    """
    if is_gzip(Path(path)):
        count_lines(path, what)


def count_lines(path: str | Path, what: str) -> tuple[int, int]:
    """(lines, bytes of text) of a plain or gzip/bgzip text file (a last line without its newline counts), read in
    1 MiB chunks; a gzip file is decompressed to its end on the way, so this is also :func:`check_gzip_whole`'s pass.

    Raises:
        InputError: a truncated or corrupt gzip file.
    """
    path = Path(path)
    lines, size, last, gz = 0, 0, b"\n", is_gzip(path)
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            while chunk := fh.read(1 << 20):
                lines += chunk.count(b"\n")
                size += len(chunk)
                last = chunk[-1:]
    except (EOFError, zlib.error, OSError) as exc:
        if not gz:
            raise InputError(path, f"{what} cannot be read ({exc})") from exc
        raise InputError(
            path,
            f"{what} is a truncated or corrupt gzip file ({exc})",
            expected="a complete gzip/bgzip stream",
            hint="Download or copy the file again",
        ) from exc
    return lines + (last != b"\n"), size


def open_bytes(path: str | Path) -> io.BufferedIOBase:
    """Open a plain or gzip-compressed file for reading its bytes (gzip by the file's own bytes, not its name)."""
    path = Path(path)
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")  # noqa: SIM115 - the caller closes it


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a plain or gzip-compressed text file for reading (a leading byte-order mark, which spreadsheet programs
    write, is dropped: Arrow's readers drop it too)."""
    path = Path(path)
    if is_gzip(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


#: an Ensembl stable id with its version (any species' prefix: ENSG, ENSMUSG, ...), and GENCODE's PAR tag; the
#: synthetic data (geximpute synth) writes its ids in the same form (SYNG00000001.1)
_VERSIONED_ENSEMBL = re.compile(r"((?:ENS[A-Z]*[GTPE]|SYN[GT])\d+)\.\d+(_PAR_Y)?")


def format_name(path: Path) -> str:
    """A file's name in lower case without its compression suffix (``.gz``, bgzip's ``.bgz``): what its format is
    told by."""
    return path.name.lower().removesuffix(".gz").removesuffix(".bgz")


def strip_version(gene_id: str) -> str:
    """``ENSG00000141510.17`` -> ``ENSG00000141510``; ``ENSG00000141510.17_PAR_Y`` keeps its PAR tag. Only
    Ensembl ids carry a version after their dot: other ids keep it (GENCODE's clone names ``RP11-34P13.7`` and
    ``RP11-34P13.8`` are two genes)."""
    found = _VERSIONED_ENSEMBL.fullmatch(gene_id)
    if found is None:
        return gene_id
    return found.group(1) + (found.group(2) or "")


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, hex (streamed in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_state(path: str | Path) -> tuple[int, int]:
    """(size, modification time in ns) of ``path``: what a writer still writing it changes. Taken before a file is
    read and compared after, it tells a read of a file that changed meanwhile (a delivery still being copied)."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns

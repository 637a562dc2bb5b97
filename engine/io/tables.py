"""Delimited-text tables through pyarrow.csv, with errors that name the file and the line."""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from geximpute.errors import InputError
from geximpute.io.checks import (
    check_gzip_whole,
    check_readable,
    count_lines,
    format_name,
    is_gzip,
    open_bytes,
    open_text,
)

#: strings read as missing values in every table
NULL_VALUES = ["", "NA", "NaN", "nan", "NAN", "null", "NULL", "None", "."]
#: bytes of text Arrow parses at a time when a table is read whole
BLOCK_BYTES = 1 << 24
#: lines of text a block holds when a table is read a block at a time (:func:`csv_batches`), and the fewest bytes
BLOCK_ROWS = 256
MIN_BLOCK_BYTES = 1 << 20


def delimiter_for(path: Path) -> str:
    """``,`` for ``.csv``/``.csv.gz``, tab for ``.tsv``; any other name is read by its first line that is not a
    ``#`` comment: comma-separated when it holds a comma and no tab (``expression.txt`` written by
    ``DataFrame.to_csv``), tab-separated otherwise."""
    name = format_name(path)
    if name.endswith(".csv"):
        return ","
    if name.endswith(".tsv"):
        return "\t"
    try:
        with open_text(path) as fh:
            first = next((line for line in fh if not line.startswith("#")), "")
    except (OSError, UnicodeDecodeError, EOFError, zlib.error):
        return "\t"  # the reader that follows names what is wrong with the file
    return "," if "," in first and "\t" not in first else "\t"


def is_parquet(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PAR1"


def count_leading_comments(path: Path, prefix: str = "#") -> int:
    """Number of lines at the top of a (possibly gzip) text file that start with ``prefix``, lines ending in
    ``\\n``, ``\\r\\n`` or ``\\r`` as Arrow's reader ends them. Read as Latin-1, which decodes any byte: one
    that is not UTF-8 in a data line near the top is the table reader's to name (UTF-8 text decoded a block at a
    time failed on such a byte anywhere in the first 8 KB)."""
    n = 0
    with io.TextIOWrapper(open_bytes(path), encoding="latin-1", newline=None) as fh:
        for number, line in enumerate(fh):
            if number == 0 and line.startswith("\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as open_text drops it
                line = line[3:]
            if not line.startswith(prefix):
                break
            n += 1
    return n


def read_table(
    path: str | Path,
    what: str,
    *,
    column_names: Sequence[str] | None = None,
    column_types: dict[str, pa.DataType] | None = None,
    skip_rows: int = 0,
    delimiter: str | None = None,
    quoting: bool = True,
    null_values: Sequence[str] = NULL_VALUES,
    skip_comment_rows: bool = False,
    text_columns: dict[str, Sequence[str]] | None = None,
) -> pa.Table:
    """Read a TSV/CSV (plain or gzip) or Parquet file into an Arrow table.

    Args:
        path: the file.
        what: what the file is, for messages ("gene annotation").
        column_names: names for a file without a header row.
        column_types: types to force, by column name (others are inferred).
        skip_rows: lines to skip before the header (or the first row).
        delimiter: field separator; default from the extension (``.csv`` comma, else tab).
        quoting: whether ``"`` quotes fields (off for GTF/GFF3, whose attributes hold quotes).
        null_values: strings read as null.
        skip_comment_rows: drop rows starting with ``#`` anywhere in the file (GFF3 ``###`` directives).
        text_columns: columns read as text whatever they look like, as :func:`require_columns` names them
            (``{canonical_name: [accepted names, ...]}``, case-insensitive): ids, where a guessed type would change
            what was written (``001`` read as the number 1, two donors ``01`` and ``1`` as one).

    Raises:
        InputError: missing, empty or truncated file; rows with the wrong number of fields; values that do not
            fit a forced column type.
    """
    path = check_readable(path, what)
    if is_parquet(path):
        try:
            return pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(path, f"{what} is not a readable Parquet file ({exc})") from exc
    check_gzip_whole(path, what)
    read, parse, convert = _csv_options(path, column_names, column_types, skip_rows, delimiter, quoting, null_values,
                                        skip_comment_rows)
    if text_columns:
        names = {a.lower() for canonical, aliases in text_columns.items() for a in (canonical, *aliases)}
        try:
            with pacsv.open_csv(source(path), read_options=read, parse_options=parse,
                                convert_options=convert) as head:
                header = head.schema.names
        except (pa.ArrowInvalid, StopIteration):
            header = []  # read_csv below names what is wrong with the file
        except UnicodeDecodeError as exc:
            raise not_utf8(path, what, exc) from exc
        convert.column_types = {**{n: pa.string() for n in header if n.lower() in names}, **(column_types or {})}
    try:
        table = pacsv.read_csv(source(path), read_options=read, parse_options=parse, convert_options=convert)
        names = table.column_names  # Arrow decodes the header's names here
    except pa.ArrowInvalid as exc:
        raise table_error(path, what, exc) from exc
    except UnicodeDecodeError as exc:
        raise not_utf8(path, what, exc) from exc
    check_header(path, what, names, skip_rows)
    if skip_comment_rows and table.num_rows and table.num_columns:
        first = table.column(0)
        if pa.types.is_string(first.type):
            keep = pc.invert(pc.fill_null(pc.starts_with(first, "#"), False))
            table = table.filter(keep)
    return table


#: a line of bases (IUPAC letters, gaps), as a GFF3's ``##FASTA`` section holds after its features
_FASTA_LINE = re.compile(r"[A-Za-z*.-]+")


def _csv_options(path: Path, column_names: Sequence[str] | None, column_types: dict[str, pa.DataType] | None,
                 skip_rows: int, delimiter: str | None, quoting: bool, null_values: Sequence[str],
                 skip_comment_rows: bool = False, block_size: int = BLOCK_BYTES, sequence: list | None = None
                 ) -> tuple[pacsv.ReadOptions, pacsv.ParseOptions, pacsv.ConvertOptions]:
    def on_invalid(row: pacsv.InvalidRow) -> str:
        text = row.text or ""
        if skip_comment_rows and text.startswith("#"):
            return "skip"
        # what a GFF3's `##FASTA` section holds (`>seqid` lines and bases): skipped, and kept in ``sequence`` for
        # the reader to check that the file has that section (a line cut short is an error otherwise)
        if sequence is not None and (text.startswith(">") or _FASTA_LINE.fullmatch(text.rstrip("\r"))):
            sequence.append(text)
            return "skip"
        return "error"

    read = pacsv.ReadOptions(
        skip_rows=skip_rows, column_names=list(column_names) if column_names else None, block_size=block_size
    )
    parse = pacsv.ParseOptions(
        delimiter=delimiter or delimiter_for(path),
        quote_char='"' if quoting else False,
        invalid_row_handler=on_invalid,
        newlines_in_values=False,
    )
    convert = pacsv.ConvertOptions(
        column_types=column_types or {},
        null_values=list(null_values),
        strings_can_be_null=True,
    )
    return read, parse, convert


def not_utf8(path: Path, what: str, exc: UnicodeDecodeError) -> InputError:
    """The :class:`InputError` of a text table whose header is not UTF-8 (a spreadsheet's Latin-1 export)."""
    return InputError(path, f"{what} is not UTF-8 text (the header holds byte "
                      f"{exc.object[exc.start:exc.start + 1]!r})", expected="a UTF-8 (or ASCII) text table",
                      hint="Save the table as UTF-8 (in a spreadsheet: CSV UTF-8)")


def table_error(path: Path, what: str, exc: pa.ArrowInvalid) -> InputError:
    """The :class:`InputError` of a text table Arrow could not read; a row with another number of fields than the
    header is named by its line (Arrow's message quotes the row, not its number)."""
    message = str(exc)
    if "Empty CSV file" in message:
        return InputError(path, f"{what} has no rows")
    fields = re.search(r"Expected (\d+) columns, got (\d+): (.*)", message, re.S)
    if fields:
        line = _line_of_row(path, fields.group(3))
        return InputError(path, f"{what} cannot be parsed: a row has {fields.group(2)} fields",
                          record=f"line {line}" if line else None,
                          expected=f"{fields.group(1)} fields, as the header has (tab- or comma-separated as the "
                                   f"file is; a field with the separator in it quoted)")
    return InputError(path, f"{what} cannot be parsed: {_short_arrow_message(message)}")


def _line_of_row(path: Path, row: str) -> int | None:
    """The line number (1-based) of the first line of ``path`` that reads ``row`` (one pass over the file, on an
    error only); None where none does (Arrow shortens long rows)."""
    wanted = row.rstrip("\r\n").encode("utf-8", errors="replace")
    try:
        with open_bytes(path) as fh:
            for number, line in enumerate(fh, start=1):
                if line.rstrip(b"\r\n") == wanted:
                    return number
    except (OSError, EOFError, zlib.error):
        return None
    return None


def csv_batches(
    path: str | Path,
    what: str,
    column_types: Callable[[pa.Schema], dict[str, pa.DataType]],
    *,
    skip_rows: int = 0,
    delimiter: str | None = None,
    quoting: bool = True,
    null_values: Sequence[str] = NULL_VALUES,
    block_rows: int | None = None,
    column_names: Sequence[str] | None = None,
    skip_comment_rows: bool = False,
    fasta_section: bool = False,
) -> tuple[pa.Schema, int, CsvBatches]:
    """A TSV/CSV (plain or gzip) read a block at a time: the schema Arrow infers from its first lines, its number of
    lines (:func:`~geximpute.io.checks.count_lines`, all of them: header and skipped lines included), and its record
    batches (:class:`CsvBatches`: read afresh at each pass) with the types ``column_types(schema)`` gives (columns
    it leaves out keep the first block's type). A whole table is never held: a reader of a large matrix keeps only
    what it converts each batch to.

    A block is about ``block_rows`` (default :data:`BLOCK_ROWS`) lines of the file's mean length (at least
    :data:`MIN_BLOCK_BYTES`): batches of a wide file stay long enough for a per-batch cost to vanish, and Arrow's
    buffers stay a few blocks' size. The schema is read first, then the file is read again with the types fixed, so
    that a column's type cannot change between blocks.

    ``column_names`` names the columns of a file without a header; with ``skip_comment_rows`` a line starting with
    ``#`` that does not parse is skipped (one that parses is the caller's to drop, as :func:`read_table` does). With
    ``fasta_section`` (a GFF3) the ``>seqid`` and sequence lines of a ``##FASTA`` section are skipped; in a file
    without that section such a line is the error it was.

    The batches raise ``pa.ArrowInvalid`` where a row does not parse or a value does not convert (:func:`table_error`
    words it); a caller that wants to name the record reads the file whole then.

    Raises:
        InputError: missing, empty or truncated file, or a header that names a column twice.
    """
    path = check_readable(path, what)
    lines, size = count_lines(path, what)  # a gzip file is checked whole on the way
    block = max(MIN_BLOCK_BYTES, min(BLOCK_BYTES << 2, size // max(lines, 1) * (block_rows or BLOCK_ROWS)))
    options = _csv_options(path, column_names, None, skip_rows, delimiter, quoting, null_values, skip_comment_rows,
                           block_size=block, sequence=[] if fasta_section else None)
    try:
        with pacsv.open_csv(source(path), read_options=options[0], parse_options=options[1],
                            convert_options=options[2]) as reader:
            schema = reader.schema
            names = schema.names  # Arrow decodes the header's names here
    except pa.ArrowInvalid as exc:
        raise table_error(path, what, exc) from exc
    except UnicodeDecodeError as exc:
        raise not_utf8(path, what, exc) from exc
    check_header(path, what, names, skip_rows)
    sequence: list | None = [] if fasta_section else None
    read, parse, convert = _csv_options(path, column_names, column_types(schema), skip_rows, delimiter, quoting,
                                        null_values, skip_comment_rows, block_size=block, sequence=sequence)
    return schema, lines, CsvBatches(path, read, parse, convert, sequence)


def source(path: Path) -> pa.NativeFile:
    """What Arrow's CSV reader reads ``path`` from (its reader closes the stream): gzip by the file's bytes, a plain
    file named ``.gz`` as text, any other name as Arrow's reader decides by it (``.bz2``, ``.zst``, ``.lz4``).
    Arrow alone decides gzip by the name, case-sensitively: a plain file named ``.gz`` (a download the browser
    decompressed) failed as a bare zlib error without the file's name, and a gzip file named ``.GZ``, ``.bgz`` or
    without a suffix was parsed as text."""
    path = Path(path)
    if is_gzip(path):
        compression: str | None = "gzip"
    elif path.suffix.lower() == ".gz":
        compression = None
    else:
        compression = "detect"
    return pa.input_stream(str(path), compression=compression)


class CsvBatches:
    """A text table's record batches, read afresh from the file each time they are iterated over (a reader that
    needs two passes, such as a long table's ids and then its values, iterates twice)."""

    def __init__(self, path: Path, read: pacsv.ReadOptions, parse: pacsv.ParseOptions,
                 convert: pacsv.ConvertOptions, sequence: list | None = None) -> None:
        self.path, self.options, self.sequence = path, (read, parse, convert), sequence

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        read, parse, convert = self.options
        if self.sequence is not None:
            self.sequence.clear()
        with pacsv.open_csv(source(self.path), read_options=read, parse_options=parse,
                            convert_options=convert) as reader:
            yield from reader
        if self.sequence and not _has_fasta_section(self.path):
            raise pa.ArrowInvalid(f"CSV parse error: a line is not a feature (columns missing) and the file has no "
                                  f"##FASTA section it could belong to: {self.sequence[0][:80]!r}")


def _has_fasta_section(path: Path) -> bool:
    """Whether a (possibly gzip) text file has a ``##FASTA`` line (a GFF3's sequence section)."""
    with open_bytes(path) as fh:
        return any(line.startswith(b"##FASTA") for line in fh)


def check_header(path: Path, what: str, names: Sequence[str], skip_rows: int | None) -> None:
    """Refuse a header that names one column twice (a column read by name would be ambiguous); ``skip_rows`` None:
    a Parquet file's schema."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen and name != "":
            raise InputError(path, f"{what} names column {name!r} twice (columns {seen[name] + 1} and {i + 1})",
                             record="the schema" if skip_rows is None else f"the header (line {skip_rows + 1})",
                             expected="unique column names")
        seen.setdefault(name, i)


def _short_arrow_message(message: str) -> str:
    # Arrow repeats the offending row in full; keep the first 300 characters.
    message = message.replace("CSV parse error: ", "").strip()
    return message if len(message) <= 300 else message[:300] + " ..."


def require_columns(table: pa.Table, path: Path | str, what: str, required: dict[str, Sequence[str]]) -> pa.Table:
    """Rename the first alias found of each required column to its canonical name.

    Args:
        required: ``{canonical_name: [accepted names, ...]}`` (matched case-insensitively).

    Raises:
        InputError: naming the missing columns, the accepted names and the columns the file has.
    """
    lower = {name.lower(): name for name in table.column_names}
    renames = {}
    missing = []
    for canonical, aliases in required.items():
        found = next((lower[a.lower()] for a in (canonical, *aliases) if a.lower() in lower), None)
        if found is None:
            missing.append(f"{canonical} (or {', '.join(aliases)})" if aliases else canonical)
        else:
            renames[found] = canonical
    if missing:
        raise InputError(
            path,
            f"{what} lacks required column(s) {'; '.join(missing)}",
            record="the header",
            expected=f"named columns; the file has {table.column_names[:12]}",
        )
    return table.rename_columns([renames.get(n, n) for n in table.column_names])

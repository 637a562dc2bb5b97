"""A (rows x columns) matrix kept in a file on disk and read or written a range of rows at a time.

`geximpute impute` and `geximpute nightly` keep their expression matrix in one of these, in a folder of the run's
own beside the output (:func:`geximpute.runtime.atomic.scratch_folder`): the reader writes each block of rows as it
converts it, every later stage reads and writes bounded passes of rows, and each Ray task that
needs a range of genes (a chromosome's shards, a gene range's stacked baselines) reads those rows from the file
itself (:meth:`MatrixFile.window`, which pickles as a path and offsets). The driver then never holds the whole
(genes x samples) matrix (issue 15's metadata-only driver; docs/benchmarks.md "The matrix on disk").

The file is the matrix's bytes in C order, nothing else (a scratch buffer of this process, not an exchange format):
rows are read with :func:`numpy.fromfile` and written with ``os.pwrite`` (:func:`write_at`) at their offsets, never
memory-mapped, so that the pages read count in the page cache and not in any process's resident memory. Columns
(:meth:`MatrixFile.columns`) are read through a read-only memory map opened and closed for each call: only the pages
holding those columns are touched, and they leave the process's resident set when the map closes.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

#: cells of a pass over a matrix file's rows (a float32 pass of 64 MiB)
PASS_CELLS = 1 << 24


class MatrixFile:
    """A 2-D matrix stored row-major in ``path`` from byte ``offset`` on; indexed like an array for reading
    (``m[lo:hi]``, ``m[i]``, ``m[rows]``, ``m[lo:hi, cols]``, ``m[:, lo:hi]``, ``m[gi, si]``), each returning a new
    ndarray, and written by rows (``m[lo:hi] = block``, ``m[i] = row``). Converting the whole file to an array
    implicitly (``np.asarray(m)``, ``np.isnan(m)``) raises: that is the copy this class exists to avoid; call
    :meth:`read` where the whole matrix is really wanted.

    A :meth:`window` is a view of a range of rows of the same file (it cannot be resized); it pickles as the path
    and its offsets, so a Ray task reads its rows from the file and nothing else travels.
    """

    def __init__(self, path: str | Path, shape: tuple[int, int], dtype: Any = np.float32, offset: int = 0,
                 *, view: bool = False, hidden: MatrixFile | None = None,
                 rescale: tuple[np.ndarray, bool] | None = None) -> None:
        self.path = str(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.offset = int(offset)
        self.view = view
        self.hidden = hidden
        self.rescale = rescale

    @classmethod
    def create(cls, path: str | Path, shape: tuple[int, int], dtype: Any = np.float32, *,
               need: int | None = None) -> MatrixFile:
        """A new file of ``shape`` (its content undefined until written; the file is sparse until then).

        Args:
            need: the free bytes its writing needs (default: the whole matrix's; less where another file shrinks
                while it is written).

        Raises:
            OSError: ENOSPC, naming the file, where its file system has less free space than that (the file would
                fail when written, part of the way through; a sparse file claims no space at first).
        """
        out = cls(path, shape, dtype)
        check_space(out.path, out.nbytes if need is None else need)
        with open(out.path, "wb") as f:
            f.truncate(out.nbytes)
        return out

    @classmethod
    def from_array(cls, path: str | Path, values: np.ndarray) -> MatrixFile:
        """A new file holding ``values`` (2-D)."""
        out = cls(path, values.shape, values.dtype)
        check_space(out.path, out.nbytes)
        write_at(out.path, 0, np.ascontiguousarray(values), create=True)
        return out

    # --- the array-like surface ---------------------------------------------------------------------------------

    ndim = 2

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def row_bytes(self) -> int:
        return self.shape[1] * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        hidden = "" if self.hidden is None else f", hidden by {self.hidden.path!r}"
        return f"MatrixFile({self.path!r}, shape={self.shape}, dtype={self.dtype}, offset={self.offset}{hidden})"

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(f"{self!r}: the whole matrix is not read implicitly; read rows (m[lo:hi]) in passes, or "
                        "call .read() where the whole matrix is wanted")

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError(f"{self!r}: index with at most two keys, got {len(key)}")
            rows, cols = key
            if isinstance(rows, slice) and rows == slice(None) and isinstance(cols, slice):
                return self.columns(cols)
            if isinstance(rows, slice) and rows == slice(None) and isinstance(cols, (int, np.integer)):
                c = _position(int(cols), self.shape[1], self, "column")  # read as one, not the whole matrix
                return self.columns(slice(c, c + 1))[:, 0]
            if _is_indices(rows) and _is_indices(cols):  # point reads: each distinct row read once
                r = np.asarray(rows, np.int64)
                c = np.asarray(cols, np.int64)
                r, c = np.broadcast_arrays(r, c)
                unique, where = np.unique(r, return_inverse=True)
                return self._take(unique)[where.reshape(r.shape), c]
            return self[rows][:, cols] if not isinstance(rows, (int, np.integer)) else self[rows][cols]
        if isinstance(key, (int, np.integer)):
            i = _position(int(key), self.shape[0], self)
            return self._read(i, i + 1)[0]
        if isinstance(key, slice):
            lo, hi, step = key.indices(self.shape[0])
            if step == 1:
                return self._read(lo, max(lo, hi))
            return self._take(np.arange(lo, hi, step))
        if _is_indices(key):
            return self._take(np.asarray(key, np.int64))
        raise IndexError(f"{self!r}: unsupported index {key!r}")

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, (int, np.integer)):
            i = _position(int(key), self.shape[0], self)
            self._write(i, np.broadcast_to(np.asarray(value, self.dtype), (1, self.shape[1])))
            return
        if isinstance(key, slice):
            lo, hi, step = key.indices(self.shape[0])
            if step == 1:
                n = max(0, hi - lo)
                self._write(lo, np.broadcast_to(np.asarray(value, self.dtype), (n, self.shape[1])))
                return
        raise IndexError(f"{self!r}: rows are written by an index or a range, got {key!r}")

    # --- reading and writing ------------------------------------------------------------------------------------

    def read(self) -> np.ndarray:
        """The whole matrix as an array (where it is really wanted: a window's rows in the task that owns them)."""
        return self._read(0, self.shape[0])

    def _read(self, lo: int, hi: int) -> np.ndarray:
        n = hi - lo
        if n <= 0 or self.shape[1] == 0:
            return np.empty((max(n, 0), self.shape[1]), self.dtype)
        with open(self.path, "rb") as f:
            f.seek(self.offset + lo * self.row_bytes)
            out = np.fromfile(f, self.dtype, count=n * self.shape[1])
        if out.size != n * self.shape[1]:
            raise OSError(errno.EIO, f"{out.size} values read for rows {lo}:{hi} of {self.shape}; the file is "
                          "shorter than its matrix (truncated while in use?)", self.path)
        out = out.reshape(n, self.shape[1])
        if self.hidden is not None:
            out[self.hidden._read(lo, hi)] = np.nan
        if self.rescale is not None:
            rescale_columns(out, *self.rescale)
        return out

    def _take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order), each run of consecutive rows read at once."""
        rows = np.asarray(rows, np.int64).ravel()
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        if not len(rows):
            return out
        if rows.min() < -self.shape[0] or rows.max() >= self.shape[0]:
            raise IndexError(f"{self!r}: rows {rows.min()}..{rows.max()} out of range")
        rows = np.where(rows < 0, rows + self.shape[0], rows)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        for run in np.split(np.arange(len(rows)), breaks):
            lo = int(sorted_rows[run[0]])
            out[order[run]] = self._read(lo, lo + len(run))
        return out

    def _write(self, lo: int, block: np.ndarray) -> None:
        if self.hidden is not None or self.rescale is not None:
            raise ValueError(f"{self!r}: a matrix with entries hidden or rescaled is read-only")
        if self.shape[1] == 0 or not len(block):
            return
        if lo < 0 or lo + len(block) > self.shape[0]:
            raise IndexError(f"{self!r}: rows {lo}:{lo + len(block)} out of range")
        write_at(self.path, self.offset + lo * self.row_bytes, np.ascontiguousarray(block, self.dtype))

    def columns(self, cols: slice) -> np.ndarray:
        """Columns ``cols`` of every row (a copy), through read-only memory maps of :data:`PASS_CELLS` cells of rows
        each, one at a time: the kernel maps the pages around each one read (most of a row's, for rows of a few
        pages), so a map of the whole file would put the whole file in this process's resident set; one pass's
        rows at most are there, and they leave it when their map closes."""
        lo, hi, step = cols.indices(self.shape[1])
        out = np.empty((self.shape[0], len(range(lo, hi, step))), self.dtype)
        if self.shape[0] == 0 or out.shape[1] == 0:
            return out
        rows = pass_rows(self)
        for r0 in range(0, self.shape[0], rows):
            r1 = min(self.shape[0], r0 + rows)
            mapped = np.memmap(self.path, self.dtype, "r", offset=self.offset + r0 * self.row_bytes,
                               shape=(r1 - r0, self.shape[1]))
            try:
                out[r0:r1] = mapped[:, cols]
            finally:
                mapped._mmap.close()  # type: ignore[attr-defined]
                del mapped
        if self.hidden is not None:
            out[self.hidden.columns(cols)] = np.nan
        if self.rescale is not None:
            rescale_columns(out, *self.rescale, cols)
        return out

    # --- shape --------------------------------------------------------------------------------------------------

    def window(self, lo: int, hi: int) -> MatrixFile:
        """Rows ``lo:hi`` as a view of the same file (nothing read)."""
        lo, hi, _ = slice(lo, hi).indices(self.shape[0])
        hi = max(lo, hi)
        return MatrixFile(self.path, (hi - lo, self.shape[1]), self.dtype, self.offset + lo * self.row_bytes,
                          view=True, hidden=None if self.hidden is None else self.hidden.window(lo, hi),
                          rescale=self.rescale)

    def hiding(self, hidden: MatrixFile, rescale: tuple[np.ndarray, bool] | None = None) -> MatrixFile:
        """A read-only view of this matrix with NaN wherever ``hidden`` (a bool matrix file of the same shape) is
        True: a training fold's problem without a second copy of the values (every read, a window's in a task
        too, applies the mask; the values' file is not changed). ``rescale``: ``(ratio, log1p)``, each column's
        values divided by its ``ratio`` on the count scale as they are read (``log1p``: the values are log1p of
        counts), for a fold whose counts are normalised again without its entries."""
        if hidden.shape != self.shape or hidden.dtype != np.bool_:
            raise ValueError(f"{self!r}: hidden by {hidden!r}; expected a bool matrix of shape {self.shape}")
        return self._view(hidden, rescale)

    def rescaled(self, rescale: tuple[np.ndarray, bool]) -> MatrixFile:
        """A read-only view of this matrix with each column divided by its ratio on the count scale as it is read
        (:meth:`hiding`'s ``rescale`` without hiding anything): a training fold's labels on the fold's scale."""
        return self._view(None, rescale)

    def _view(self, hidden: MatrixFile | None, rescale: tuple[np.ndarray, bool] | None) -> MatrixFile:
        """A read-only view hiding ``hidden``'s entries and rescaling by ``rescale`` as it reads."""
        if self.hidden is not None or self.rescale is not None:
            raise ValueError(f"{self!r}: a view already (entries hidden or rescaled)")
        if rescale is not None:
            rescale = (np.asarray(rescale[0], np.float32), bool(rescale[1]))
            if rescale[0].shape != (self.shape[1],):
                raise ValueError(f"{self!r}: rescaled by {rescale[0].shape[0]} ratios; expected one per column")
        return MatrixFile(self.path, self.shape, self.dtype, self.offset, view=True, hidden=hidden, rescale=rescale)

    def resize(self, shape: tuple[int, int]) -> None:
        """Keep the first ``shape[0]`` rows (or add undefined rows); the columns do not change. The file is
        truncated (or extended) where it is: rows past the new end take no disk space."""
        if self.view or self.offset:
            raise ValueError(f"{self!r}: a window of a matrix file cannot be resized")
        if int(shape[1]) != self.shape[1]:
            raise ValueError(f"{self!r}: resized to {shape}; only the rows of a matrix file change")
        os.truncate(self.path, int(shape[0]) * self.row_bytes)
        self.shape = (int(shape[0]), self.shape[1])

    def unlink(self) -> None:
        """Remove the file (a window's: the whole file)."""
        Path(self.path).unlink(missing_ok=True)


def rescale_columns(block: np.ndarray, ratio: np.ndarray, log1p: bool, cols: slice = slice(None)) -> None:
    """``block`` (rows x the columns ``cols`` of ``ratio``) divided by each column's ratio on the count scale
    (``log1p``: the values are log1p of counts), in place."""
    ratio = np.asarray(ratio, block.dtype)[cols][None, :]
    if log1p:
        np.log1p(np.expm1(block) / ratio, out=block)
    else:
        block /= ratio


def write_at(path: str | Path, offset: int, block: np.ndarray, *, create: bool = False) -> None:
    """Write ``block``'s bytes into the file ``path`` at ``offset`` (a new file with ``create``), every byte or an
    error: ``OSError`` with its errno (ENOSPC, EDQUOT, EIO...) and ``path``, from the write or from closing the file
    (where a network file system reports a full disk or quota). Not ``ndarray.tofile``, which writes through a
    stdio copy of the file whose failures at close are not reported: rows lost without an error, read back as 0."""
    data = memoryview(block.reshape(-1).view(np.uint8))  # its bytes (an empty block: none)
    flags = os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if create else 0)
    try:
        fd = os.open(path, flags, 0o666)
        try:
            while len(data):
                n = os.pwrite(fd, data, offset)
                if n <= 0:
                    raise OSError(errno.EIO, f"{os.strerror(errno.EIO)}: nothing written at byte {offset}")
                data, offset = data[n:], offset + n
        finally:
            os.close(fd)  # where a network file system reports what the writes did not
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def check_space(path: str | Path, nbytes: int) -> None:
    """Raise ENOSPC (naming ``path``) where the file system of ``path``'s folder has less than ``nbytes`` free."""
    free = shutil.disk_usage(Path(path).parent).free
    if free < nbytes:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: the matrix needs {nbytes / 2**30:.2f} GiB and its "
                      f"file system has {free / 2**30:.2f} GiB free", str(path))


def _is_indices(key: Any) -> bool:
    return isinstance(key, (list, np.ndarray)) and np.asarray(key).dtype.kind in "iu"


def _position(i: int, n: int, where: MatrixFile, axis: str = "row") -> int:
    if not -n <= i < n:
        raise IndexError(f"{where!r}: {axis} {i} out of range")
    return i + n if i < 0 else i


def pass_rows(matrix: np.ndarray | MatrixFile, cells: int | None = None) -> int:
    """Rows of ``matrix`` per pass of at most ``cells`` cells (default :data:`PASS_CELLS`; at least one row)."""
    return max(1, min(max(len(matrix), 1), (cells or PASS_CELLS) // max(1, matrix.shape[1])))


def update_rows(matrix: np.ndarray | MatrixFile, fn, cells: int | None = None) -> None:
    """Apply ``fn`` (an in-place update of a float block of rows) to every row of ``matrix``: an array at once,
    a matrix file a pass of rows at a time (read, updated, written back). Elementwise updates give the same values
    to the bit either way."""
    if not isinstance(matrix, MatrixFile):
        fn(matrix)
        return
    step = pass_rows(matrix, cells)
    for lo in range(0, len(matrix), step):
        block = matrix[lo : lo + step]
        fn(block)
        matrix[lo : lo + step] = block


def count_measured(matrix: np.ndarray | MatrixFile, cells: int | None = None) -> int:
    """The non-NaN cells of ``matrix``, counted a pass of rows at a time."""
    step = pass_rows(matrix, cells)
    return sum(int(np.count_nonzero(~np.isnan(matrix[lo : lo + step]))) for lo in range(0, len(matrix), step))


def measured(matrix: np.ndarray | MatrixFile, cells: int | None = None) -> np.ndarray:
    """(rows, columns) bool: the non-NaN cells of ``matrix`` (an array's at once, a file's a pass of rows at a time:
    no float copy of the matrix)."""
    if not isinstance(matrix, MatrixFile):
        return ~np.isnan(matrix)
    out = np.empty(matrix.shape, bool)
    step = pass_rows(matrix, cells)
    for lo in range(0, len(matrix), step):
        np.logical_not(np.isnan(matrix[lo : lo + step]), out=out[lo : lo + step])
    return out


def take_and_hide(matrix: np.ndarray | MatrixFile, hidden: np.ndarray, cells: int | None = None) -> np.ndarray:
    """The values of the ``hidden`` cells ((rows, columns) bool), in ``np.nonzero(hidden)`` order, set to NaN in
    ``matrix`` where they are (a file's a pass of rows at a time)."""
    if not isinstance(matrix, MatrixFile):
        values = matrix[hidden]
        matrix[hidden] = np.nan
        return values
    out = []
    step = pass_rows(matrix, cells)
    for lo in range(0, len(matrix), step):
        mask = hidden[lo : lo + step]
        if not mask.any():
            continue
        block = matrix[lo : lo + step]
        out.append(block[mask])
        block[mask] = np.nan
        matrix[lo : lo + step] = block
    return np.concatenate(out) if out else np.zeros(0, matrix.dtype)


def append_columns(matrix: MatrixFile, extra: np.ndarray, path: str | Path, cells: int | None = None) -> MatrixFile:
    """A new matrix file at ``path``: ``matrix``'s columns, then ``extra``'s ((rows, k)), written a pass of rows at a
    time (``matrix`` is left as it is)."""
    if len(extra) != len(matrix):
        raise ValueError(f"append_columns: {len(extra)} rows of new columns for the {len(matrix)} of {matrix!r}")
    out = MatrixFile.create(path, (len(matrix), matrix.shape[1] + extra.shape[1]), matrix.dtype)
    step = pass_rows(out, cells)
    for lo in range(0, len(matrix), step):
        out[lo : lo + step] = np.concatenate([matrix[lo : lo + step], extra[lo : lo + step].astype(matrix.dtype)],
                                             axis=1)
    return out


def row_sums(matrix: np.ndarray | MatrixFile, cells: int | None = None) -> np.ndarray:
    """(rows,) int64 sums of each row of a bool (or integer) matrix: an array's at once, a file's a pass at a time."""
    if not isinstance(matrix, MatrixFile):
        return np.asarray(matrix.sum(axis=1), np.int64)
    step = pass_rows(matrix, cells)
    out = np.zeros(len(matrix), np.int64)
    for lo in range(0, len(matrix), step):
        out[lo : lo + step] = matrix[lo : lo + step].sum(axis=1)
    return out


def column_sums(matrix: np.ndarray | MatrixFile, cells: int | None = None) -> np.ndarray:
    """(columns,) int64 sums of each column of a bool (or integer) matrix, likewise."""
    if not isinstance(matrix, MatrixFile):
        return np.asarray(matrix.sum(axis=0), np.int64)
    step = pass_rows(matrix, cells)
    out = np.zeros(matrix.shape[1], np.int64)
    for lo in range(0, len(matrix), step):
        out += matrix[lo : lo + step].sum(axis=0)
    return out


def row_range(matrix: np.ndarray | MatrixFile, lo: int, hi: int) -> np.ndarray | MatrixFile:
    """Rows ``lo:hi``, nothing read: a view of an array, a :meth:`MatrixFile.window` of a file (what a task that
    reads its own rows is handed)."""
    return matrix.window(lo, hi) if isinstance(matrix, MatrixFile) else matrix[lo:hi]


def materialise(values: np.ndarray | MatrixFile | None) -> np.ndarray | None:
    """``values`` as an array: a matrix file (or window) read whole, an array as it is."""
    return values.read() if isinstance(values, MatrixFile) else values

"""Handing memory a process has freed back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import pyarrow as pa


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_unused_memory() -> bool:
    """Return what Arrow's memory pool and the C heap hold freed to the system; True where the C heap was trimmed.

    A large read leaves freed memory in both: Arrow's pool keeps what its tables used, and glibc keeps freed small
    allocations in its heap (reading 1,000 genes x 2,400 samples left ~30 MiB of the reader's freed allocations
    resident in the process, docs/benchmarks.md). Neither changes what the process holds; both lower its resident
    memory for what comes next.
    """
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

"""geximpute.runtime.memory: freed memory handed back to the system."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from geximpute.runtime.memory import release_unused_memory


def anon_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon is read from /proc (Linux)")
def test_freed_heap_memory_goes_back_to_the_system():
    # small allocations freed with a few survivors among them stay resident until the C heap is trimmed
    parts = [np.ones(512) for _ in range(40_000)]  # 4 KiB each: allocated from the C heap, not mapped apart
    survivors = [p[:1].copy() for p in parts[::100]]
    del parts
    before = anon_mib()
    assert release_unused_memory()  # glibc here: the heap was trimmed
    assert anon_mib() < before - 50  # ~160 MiB freed, most of it handed back
    assert len(survivors) == 400

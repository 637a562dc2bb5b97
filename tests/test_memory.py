"""geximpute.runtime.memory: freed memory handed back to the system."""

from __future__ import annotations

import subprocess
import sys

import pytest

#: small allocations freed with a few survivors among them stay resident until the C heap is trimmed; run in a fresh
#: process, whose heap holds nothing else (the test process's own heap, after hundreds of tests, is not predictable)
SCRIPT = """
import numpy as np
from geximpute.runtime.memory import release_unused_memory

def anon_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("RssAnon:"))

parts = [np.ones(512) for _ in range(40_000)]  # 4 KiB each: allocated from the C heap, not mapped apart
survivors = [p[:1].copy() for p in parts[::100]]
del parts
before = anon_mib()
trimmed = release_unused_memory()
print(before, anon_mib(), trimmed, len(survivors))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon is read from /proc (Linux)")
def test_freed_heap_memory_goes_back_to_the_system():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout.split()
    before, after, trimmed, survivors = int(out[0]), int(out[1]), out[2], int(out[3])
    assert trimmed == "True"  # glibc here: the heap was trimmed
    assert survivors == 400
    assert after < before - 100, (before, after)  # ~160 MiB freed, most of it handed back

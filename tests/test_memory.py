"""Freed heap memory goes back to the operating system (``memory.release_freed_memory``)."""

import numpy as np
import pytest

from rlhf_jax.memory import _malloc_trim, release_freed_memory


def resident_mb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(_malloc_trim() is None, reason="no glibc malloc_trim")
def test_freed_heap_pages_are_returned():
    np.ones(8 << 20, np.uint8)  # freeing an 8 MB mmapped block raises glibc's mmap threshold: what follows is heap
    blocks = [np.ones(2 << 20, np.uint8) for _ in range(150)]  # 300 MB of heap, touched
    keep = blocks[-1]  # the top of the heap stays in use, so free() alone cannot shrink it
    del blocks
    before = resident_mb()
    release_freed_memory()
    assert before - resident_mb() > 200
    assert keep.sum() == 2 << 20  # what is live is untouched

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


class _Device:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_peak_memory_reports_the_largest_accelerator_high_water_mark(monkeypatch):
    import jax

    from rlhf_jax.metrics import peak_memory, peak_rss_gb

    assert set(peak_memory()) == {"peak_rss_gb"}  # the CPU backend reports no device statistics
    devices = [_Device({"peak_bytes_in_use": 3 << 30}), _Device({"peak_bytes_in_use": 5 << 29})]
    monkeypatch.setattr(jax, "local_devices", lambda: devices)
    peaks = peak_memory()
    assert peaks["peak_device_gb"] == 3.0 and peaks["peak_rss_gb"] >= peak_rss_gb() - 1e-6
    devices.append(_Device(None))  # one device without statistics: no device figure rather than a partial one
    assert "peak_device_gb" not in peak_memory()

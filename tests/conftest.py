"""Test setup: 8 fake CPU devices for pmap/sharding tests, set before jax is imported; the
GGUF metadata cache and the persistent XLA compilation cache inside the checkout (shared by the
workers and their subprocesses: tests that build the same program load it compiled)."""

import os
from pathlib import Path

from phase_runs import COMPILATION_CACHE

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("RLHF_JAX_CACHE", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "rlhf_jax"))
for _name, _value in COMPILATION_CACHE.items():
    os.environ.setdefault(_name, _value)


def pytest_collection_modifyitems(config, items):
    """The slow tests first: on CI's two pytest-xdist workers the long runs start early and the
    short tests fill in around them, instead of a few long runs ending the suite on one core."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

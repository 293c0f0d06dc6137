"""Test setup: 8 fake CPU devices for pmap/sharding tests and XLA's quicker CPU emitters, set
before jax is imported; the GGUF metadata cache inside the checkout (shared by the workers and
their subprocesses); the ``fast_compile`` marker's compiler setting."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# The CPU backend's elemental emitters instead of its MLIR fusion emitters: the in-process
# tests compile many small programs and run each briefly (measured on 15 of their modules, two
# workers: 360 s -> 225 s; no test slower by more than a second). Floats may differ from the
# default build in the last bits. Subprocesses choose their own flags (phase_runs.process_env).
if "xla_cpu_use_fusion_emitters" not in _flags:
    _flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("RLHF_JAX_CACHE", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "rlhf_jax"))


def pytest_collection_modifyitems(config, items):
    """The slow tests first: on CI's two pytest-xdist workers the long runs start early and the
    short tests fill in around them, instead of a few long runs ending the suite on one core."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _fast_compile(request):
    """A test marked ``fast_compile`` compiles with XLA's optimisations mostly off
    (``jax_disable_most_optimizations``, in this process only: subprocesses choose their own):
    for compile-bound tests of small programs run a step or two, 25-60% less time measured on
    the suite's two workers; tests that train for many steps run slower so and stay unmarked.
    Results may differ from the optimised build in the last bits."""
    if request.node.get_closest_marker("fast_compile") is None:
        yield
        return
    import jax

    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", False)

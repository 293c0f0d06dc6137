"""Which JAX platforms a command starts, decided before JAX imports its backends."""

from __future__ import annotations

import glob
import importlib.util
import os


def default_platforms(argv: list[str], environ, *, libtpu: bool, cuda: bool, tpu_chips: bool) -> str | None:
    """``JAX_PLATFORMS`` for a run on a host where ``libtpu`` is installed but no TPU chips are
    (installed to plan for a slice: ``pip install -e ".[tpu]"``): ``"cpu"``, so that JAX does
    not start the TPU plugin first -- its init errors on every run, and its lock file, which
    would keep a second process from planning. None (JAX decides) when ``JAX_PLATFORMS`` is
    set, on a TPU or CUDA host, and for ``plan --topology``, which compiles with libtpu."""
    planning_a_slice = bool(argv) and argv[0] == "plan" and any(a.startswith("--topology") for a in argv)
    if "JAX_PLATFORMS" in environ or not libtpu or cuda or tpu_chips or planning_a_slice:
        return None
    return "cpu"


def use_platforms_present(argv: list[str]) -> None:
    """Set ``JAX_PLATFORMS`` to :func:`default_platforms` of this host and command line, when
    that is not None; before JAX starts its backends."""
    found = default_platforms(argv, os.environ, libtpu=importlib.util.find_spec("libtpu") is not None,
                              cuda=any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13)),
                              tpu_chips=bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))
    if found is not None:
        os.environ["JAX_PLATFORMS"] = found

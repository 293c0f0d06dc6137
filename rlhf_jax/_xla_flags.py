"""XLA flags that rlhf_jax sets by default, before JAX creates its backends.

``--xla_gpu_enable_triton_gemm=false``: XLA:GPU otherwise autotunes Triton kernels for every
matmul it sees, which took the first step of a ~5M-parameter model from 4-7 s to 33-53 s of
compilation on an H100 while the steps themselves ran no faster than with cuBLAS
(``benchmarks/README.md``). A user who sets the flag in ``XLA_FLAGS`` keeps their value. The
flags are read when JAX first initialises a backend, so they apply only when ``rlhf_jax`` is
imported before the first JAX computation; CPU and TPU backends ignore them.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULT_XLA_FLAGS = {"xla_gpu_enable_triton_gemm": "false"}


def add_default_xla_flags(environ: MutableMapping[str, str] = os.environ) -> None:
    """Append each of ``DEFAULT_XLA_FLAGS`` to ``environ["XLA_FLAGS"]`` unless it is already named there."""
    flags = environ.get("XLA_FLAGS", "").split()
    named = {flag.lstrip("-").split("=", 1)[0] for flag in flags}
    flags += [f"--{name}={value}" for name, value in DEFAULT_XLA_FLAGS.items() if name not in named]
    environ["XLA_FLAGS"] = " ".join(flags)

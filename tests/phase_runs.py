"""Running ``rlhf-jax`` phases in fresh processes, and reading back their checkpoints."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
QUIET = ["metrics.progress=false", "train.samples=0"]


def cli(*args, devices: int | None = None, timeout: int = 300, extra_env: dict | None = None,
        **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(extra_env or {}))
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    else:
        env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "rlhf_jax.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


def checkpoint_arrays(output_dir: Path, step: int) -> dict:
    """``{"params": ..., "opt_state": ..., ...}`` of one checkpoint as numpy leaves."""
    import jax
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(Path(output_dir).absolute() / "checkpoints" / str(step) / "state")
    def plain(x):
        return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)

    return jax.tree.map(plain, restored)


def leaves_with_paths(tree) -> list:
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)[0]


def assert_bit_identical(a, b) -> None:
    """Every leaf of two checkpoint trees has the same dtype and the same bits."""
    for (path, x), (_, y) in zip(leaves_with_paths(a), leaves_with_paths(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{path} differs"

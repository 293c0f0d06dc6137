"""The driver's console lines: one process speaks for the run."""

from __future__ import annotations

import jax


def log(message: str) -> None:
    """Print ``[rlhf_jax] message`` on process 0 (every process calls it alike)."""
    if jax.process_index() == 0:
        print(f"[rlhf_jax] {message}", flush=True)

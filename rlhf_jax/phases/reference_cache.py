"""The reference model's outputs as data: DPO's ``dpo.reference_logps: precompute`` runs the
frozen reference once over every training and held-out row before step 0 and adds its
response log-probs to the rows as columns, cached in ``<output_dir>/reference_logps.npz``
(reused by a resumed run when written for the same reference and data), so the reference
need not stay in memory while the policy trains."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from rlhf_jax.data import TokenizedData, added_fields
from rlhf_jax.hosts import to_host
from rlhf_jax.models.pure_jit import pure_jit
from rlhf_jax.phases.console import log
from rlhf_jax.phases.setup import put_shared_rows


def ordered_batches(data: TokenizedData, batch_size: int, limit: int | None):
    """``(batch, valid_B)`` over ``data`` in order, at most ``limit`` batches (held-out data, a
    reference pass); the last one is topped up with copies of its first row, flagged invalid,
    so every batch has the compiled shape and no row counts twice."""
    n = len(data)
    starts = list(range(0, n, batch_size))[:limit]
    for start in starts:
        real = np.arange(start, min(start + batch_size, n))
        indices = np.concatenate([real, np.full(batch_size - len(real), real[0])])
        yield data.collate(indices, data.padded_length(indices)), np.arange(batch_size) < len(real)


def precompute_columns(prepare, reference, data: TokenizedData, batch_size: int, mesh) -> dict[str, np.ndarray]:
    """``prepare(reference, batch)`` over every row of ``data`` once, in order: the columns it
    adds to a batch, one value per row (DPO: the reference's response log-probs)."""
    jitted, columns = pure_jit(prepare), {}
    for batch, valid in ordered_batches(data, batch_size, None):
        placed = jax.tree.map(lambda v: v[None], put_shared_rows(batch, mesh))  # one micro-batch
        for name, values in added_fields(batch, to_host(jitted(reference, placed))).items():
            columns.setdefault(name, []).append(np.asarray(values)[0][valid])
    return {name: np.concatenate(parts) for name, parts in columns.items()}


def cached_columns(path: Path, prepare, reference, splits: dict[str, TokenizedData], batch_size: int, mesh, *,
                   fingerprint: str, reuse: bool) -> dict[str, TokenizedData]:
    """``splits`` with the columns of :func:`precompute_columns`, read from ``path`` when
    ``reuse`` (a resumed run) and the file was written for the same ``fingerprint`` (what the
    values depend on: reference, data) and sizes; else computed and written there."""
    if reuse and path.exists():
        with np.load(path) as cached:
            same = "fingerprint" in cached.files and str(cached["fingerprint"]) == fingerprint
            found = {split: {key.split("/", 1)[1]: cached[key] for key in cached.files if key.startswith(split + "/")}
                     for split in splits}
        if same and all(found[split] and all(len(v) == len(data) for v in found[split].values())
                        for split, data in splits.items()):
            log(f"reference log-probs: loaded from {path}")
            return {split: data.with_columns(found[split]) for split, data in splits.items()}
        log(f"reference log-probs: {path} was written for other data or another reference; computing them again")
    tick = time.perf_counter()
    columns = {split: precompute_columns(prepare, reference, data, batch_size, mesh) for split, data in splits.items()}
    if jax.process_index() == 0:  # every process holds the same values; one writes them
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, fingerprint=np.asarray(fingerprint),
                 **{f"{split}/{name}": v for split, named in columns.items() for name, v in named.items()})
    log(f"reference log-probs: {sum(len(d) for d in splits.values())} rows in {time.perf_counter() - tick:.1f} s, "
        f"cached in {path}")
    return {split: data.with_columns(columns[split]) for split, data in splits.items()}

"""Logical axis names -> mesh shardings, as data (a rules table), not model code.

Every parameter carries logical names (``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``); a
rule ``(logical, mesh_axis)`` shards that dimension over the mesh axis. A dimension stays
replicated when the rule names no axis, the mesh lacks the axis, the axis is already used by
another dimension of the same array, or the dimension does not divide evenly.
"""

from __future__ import annotations

from collections.abc import Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

# FSDP over the embedding dimension, tensor parallelism over heads / mlp / vocab.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
)


def logical_to_sharding(
    names: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES,
) -> NamedSharding:
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names or (None,) * len(shape), shape):
        axis = table.get(name) if name is not None else None
        ok = axis in mesh.shape and axis not in used and size % mesh.shape[axis] == 0
        spec.append(axis if ok else None)
        used.update([axis] if ok else [])
    return NamedSharding(mesh, PartitionSpec(*spec))

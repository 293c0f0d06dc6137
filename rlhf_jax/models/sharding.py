"""Logical axis names -> mesh shardings, as data (a rules table), not model code.

Every parameter carries logical names (``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``); a
rule ``(logical, mesh_axis)`` shards that dimension over the mesh axis. A dimension stays
replicated when the rule names no axis, the mesh lacks the axis, the axis is already used by
another dimension of the same array, or the dimension does not divide evenly.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.hosts import to_global

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
    """The ``NamedSharding`` of an array of ``shape`` whose dimensions carry the logical ``names``,
    by ``rules`` (see the module docstring for when a dimension stays replicated)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names or (None,) * len(shape), shape):
        axis = table.get(name) if name is not None else None
        ok = axis in mesh.shape and axis not in used and size % mesh.shape[axis] == 0
        spec.append(axis if ok else None)
        used.update([axis] if ok else [])
    return NamedSharding(mesh, PartitionSpec(*spec))


def place(tree, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES):
    """``jax.device_put`` every ``nnx.Variable`` in ``tree`` (model state, optimiser moments,
    a whole train state) onto its logical sharding; other arrays are replicated."""
    from flax import nnx

    def sharding_of(leaf):
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            return leaf.replace(logical_to_sharding(leaf.get_metadata().get("out_sharding"), value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    shardings = jax.tree.map(sharding_of, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return jax.tree.map(to_global, tree, shardings)


def rows_sharding(mesh: Mesh, rows: int, axes: Sequence[str]) -> NamedSharding:
    """Rows (the leading dimension) split over the mesh ``axes`` when they divide evenly,
    else replicated (a small evaluation batch)."""
    shards = 1
    for axis in axes:
        shards *= mesh.shape[axis]
    return NamedSharding(mesh, PartitionSpec(tuple(axes)) if rows % shards == 0 else PartitionSpec())

"""Logical axis names -> mesh shardings, as data (a rules table), not model code.

Every parameter carries logical names (``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``,
``layers`` for stacked blocks); a rule ``logical -> mesh axis`` shards that dimension over
the axis of the mesh ``data x fsdp x tensor`` (Xu et al., 2021, GSPMD; the logical-axis
rules of MaxText and T5X). A dimension stays replicated when its rule names no axis, or
when the axis already shards another dimension of the same array (the first one wins). A
dimension whose size the axis does not divide is a :class:`ShardingError` naming both --
never a silent replication.

Activations follow the same rules inside the decoder (:func:`constrain`, active while a
run's :func:`activation_sharding` context holds its mesh): tokens over the batch axes
(``data`` and ``fsdp``), attention heads, MLP features and the vocabulary (logits and
log-probs, vocabulary-parallel) over whatever axis the rules give ``heads``, ``mlp`` and
``vocab`` -- ``tensor`` by default.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.config import ConfigError
from rlhf_jax.hosts import to_global

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the axes a batch's rows split over
LOGICAL_AXES = ("vocab", "embed", "heads", "kv", "mlp", "layers")

# FSDP over the embedding dimension, tensor parallelism over heads / mlp / vocab.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
)

_MESH_RULES: dict[tuple[Mesh, bool], dict[str, str | None]] = {}  # (mesh, frozen) -> the run's rules
# the open activation scope: a one-item list holding its mesh (filled when the run makes it)
_ACTIVE_MESH: contextvars.ContextVar[list | None] = contextvars.ContextVar("activation_mesh", default=None)


class ShardingError(ConfigError):
    """A rule that cannot be applied: an axis the mesh lacks, or a size the axis does not divide."""


def check_rules(rules: Mapping[str, str | None], axes: Sequence[str] = MESH_AXES, what: str = "mesh.rules") -> None:
    """Raise :class:`ShardingError` for a rule of an unknown logical axis or one naming an axis
    not in ``axes``."""
    for logical, axis in rules.items():
        if logical not in LOGICAL_AXES:
            raise ShardingError(f"{what}: {logical!r} is no logical axis of the models; they are "
                                f"{', '.join(LOGICAL_AXES)}")
        if axis is not None and axis not in axes:
            raise ShardingError(f"{what}: the rule {logical} -> {axis!r} names an axis the mesh lacks (its axes: "
                                f"{', '.join(axes)}); use one of them, or null to replicate {logical}")


def register_rules(mesh: Mesh, rules: Mapping[str, str | None],
                   frozen: Mapping[str, str | None] | None = None) -> None:
    """Make ``rules`` (checked against ``mesh``'s axes) the default of every placement on
    ``mesh``, and ``frozen`` (default: ``rules``) that of frozen models (:func:`rules_of`)."""
    check_rules(rules, tuple(mesh.axis_names))
    check_rules(frozen or {}, tuple(mesh.axis_names), what="mesh.frozen_rules")
    _MESH_RULES[mesh, False] = dict(rules)
    _MESH_RULES[mesh, True] = dict(rules if frozen is None else frozen)


def rules_of(mesh: Mesh, frozen: bool = False) -> dict[str, str | None]:
    """The rules registered for ``mesh`` (:func:`register_rules`; ``frozen``: those of frozen
    models), else :data:`DEFAULT_RULES`."""
    return _MESH_RULES.get((mesh, frozen), dict(DEFAULT_RULES))


def logical_to_sharding(
    names: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, str | None] | Sequence[tuple[str, str | None]] | None = None,
    what: str = "an array",
    table: str = "mesh.rules",
) -> NamedSharding:
    """The ``NamedSharding`` of an array of ``shape`` whose dimensions carry the logical ``names``,
    by ``rules`` (default: :func:`rules_of` the mesh); see the module docstring for when a
    dimension stays replicated. Raises :class:`ShardingError` naming ``what``, the dimension,
    the axis and the config's ``table`` when the axis does not divide the dimension's size."""
    rules_by_name = rules_of(mesh) if rules is None else dict(rules)
    used: set[str] = set()
    spec = []
    for i, (name, size) in enumerate(zip(names or (None,) * len(shape), shape)):
        axis = rules_by_name.get(name) if name is not None else None
        if axis is None or axis not in mesh.shape or axis in used:
            spec.append(None)
            continue
        if size % mesh.shape[axis]:
            raise ShardingError(
                f"{what}: dimension {i} ({name}, size {size}) does not divide over mesh axis {axis} of size "
                f"{mesh.shape[axis]} (rule {name} -> {axis}); choose a mesh.{axis} that divides {size}, or map "
                f"{name} to another axis or to null in {table}")
        spec.append(axis)
        used.add(axis)
    return NamedSharding(mesh, PartitionSpec(*spec))


def shardings_of(tree, mesh: Mesh, rules: Mapping[str, str | None] | None = None, table: str = "mesh.rules"):
    """The sharding of every leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``): each
    ``nnx.Variable``'s logical sharding by ``rules`` (default: the mesh's), every other leaf
    replicated. Raises :class:`ShardingError` naming the parameter whose size a rule's axis
    does not divide and the config's ``table`` that holds the rule."""
    from flax import nnx

    def sharding_of(path, leaf):
        if isinstance(leaf, nnx.Variable):
            where = ".".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)
            value = leaf.get_value()
            return leaf.replace(logical_to_sharding(leaf.get_metadata().get("out_sharding"), value.shape, mesh, rules,
                                                    what=f"parameter {where}", table=table))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(sharding_of, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def place(tree, mesh: Mesh, rules: Mapping[str, str | None] | None = None):
    """``jax.device_put`` every ``nnx.Variable`` in ``tree`` (model state, optimiser moments,
    a whole train state) onto its logical sharding by ``rules`` (:func:`shardings_of`); other
    arrays are replicated."""
    return jax.tree.map(to_global, tree, shardings_of(tree, mesh, rules))


def reshard(tree, mesh: Mesh, rules: Mapping[str, str | None], table: str = "mesh.rules"):
    """``tree``'s arrays, already on ``mesh``, moved to their logical shardings by ``rules``
    (:func:`shardings_of`) on the devices -- a compiled identity, no trip through the hosts, so
    any number of processes. Raises :class:`ShardingError` naming ``table``."""
    return jax.jit(lambda t: t, out_shardings=shardings_of(tree, mesh, rules, table=table))(tree)


def rows_sharding(mesh: Mesh, rows: int, axes: Sequence[str]) -> NamedSharding:
    """Rows (the leading dimension) split over the mesh ``axes`` when they divide evenly,
    else replicated (a small evaluation batch)."""
    shards = 1
    for axis in axes:
        shards *= mesh.shape[axis]
    return NamedSharding(mesh, PartitionSpec(tuple(axes)) if rows % shards == 0 else PartitionSpec())


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None = None):
    """A scope in which :func:`constrain` places the decoder's activations on ``mesh`` by its
    rules (programs traced meanwhile carry the constraints). ``None``: the mesh the run makes
    later in the scope (:func:`use_for_activations`, called by ``phases.setup.make_mesh``);
    outside any scope activations are left to the compiler."""
    token = _ACTIVE_MESH.set([mesh])
    try:
        yield
    finally:
        _ACTIVE_MESH.reset(token)


def use_for_activations(mesh: Mesh) -> None:
    """Make ``mesh`` the activations' mesh of the open :func:`activation_sharding` scope (none open:
    nothing)."""
    scope = _ACTIVE_MESH.get()
    if scope is not None:
        scope[0] = mesh


def activation_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """The ``PartitionSpec`` of an activation whose dimensions carry ``names``: ``"batch"``
    over the batch axes (those of size > 1, when their product divides the rows), any other
    name by the mesh's rules when its axis divides the size and is not yet used; else
    replicated (an activation may be, where a parameter may not: a 3-row evaluation batch)."""
    rules, used, spec = rules_of(mesh), set(), []
    for name, size in zip(names, shape):
        axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1) if name == "batch" else \
            ((rules.get(name),) if name is not None and rules.get(name) in mesh.shape else ())
        shards = 1
        for axis in axes:
            shards *= mesh.shape[axis]
        if not axes or shards == 1 or size % shards or used & set(axes):
            spec.append(None)
            continue
        spec.append(axes if len(axes) > 1 else axes[0])
        used.update(axes)
    return PartitionSpec(*spec)


def activation_mesh() -> Mesh | None:
    """The mesh of the open :func:`activation_sharding` scope (None outside one, or before the
    run made its mesh)."""
    scope = _ACTIVE_MESH.get()
    return None if scope is None else scope[0]


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` with a sharding constraint (:func:`activation_spec`) on the mesh of the open
    :func:`activation_sharding` context; ``x`` itself outside one."""
    mesh = activation_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, activation_spec(names, x.shape, mesh)))

"""``epochs`` x ``minibatches`` passes over one rollout's experience as a single ``lax.scan``,
the optimisation skeleton that PPO and the critic-free methods share."""

from __future__ import annotations

from collections.abc import Callable

import jax


def minibatch_order(key: jax.Array, rows: int, epochs: int, minibatches: int) -> jax.Array:
    """``[epochs * minibatches, rows / minibatches]`` row indices: each epoch a fresh
    permutation of the rows drawn from ``key``, cut into equal minibatches."""
    if rows % minibatches:
        raise ValueError(f"{rows} rollout rows do not split into {minibatches} minibatches; make the rows "
                         "(prompts x samples per prompt) a multiple of the minibatches")
    orders = jax.vmap(lambda k: jax.random.permutation(k, rows))(jax.random.split(key, epochs))
    return orders.reshape(epochs * minibatches, rows // minibatches)


def scan_minibatches(step: Callable, carry, experience, key: jax.Array, *, epochs: int, minibatches: int):
    """``lax.scan`` of ``step(carry, minibatch) -> (carry, metrics)`` over the minibatches of
    ``experience`` (a pytree of ``[rows, ...]`` arrays). Returns ``(carry, metrics)`` with
    metrics stacked ``[epochs * minibatches]``."""
    rows = jax.tree.leaves(experience)[0].shape[0]
    order = minibatch_order(key, rows, epochs, minibatches)
    return jax.lax.scan(lambda c, rows_b: step(c, jax.tree.map(lambda x: x[rows_b], experience)), carry, order)

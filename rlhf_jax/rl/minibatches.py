"""``epochs`` x ``minibatches`` passes over one rollout's experience as a single ``lax.scan``,
the optimisation skeleton that PPO and the critic-free methods share, and each minibatch's
gradient accumulated over micro-batches (for memory: activations of one micro-batch at a
time), exactly."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.masked import safe_div
from rlhf_jax.train.state import float32_moments


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


def check_micro_batches(rows: int, micro_batches: int, what: str, fix: str) -> None:
    """Raises ``ValueError`` naming ``what`` and ``fix`` if ``micro_batches`` does not divide ``rows``."""
    if rows % micro_batches:
        raise ValueError(f"{rows} {what} do not split into {micro_batches} micro-batches; make {fix}")


def split_micro_batches(tree, micro_batches: int):
    """``[rows, ...]`` leaves as ``[micro_batches, rows / micro_batches, ...]``, micro-batch ``m``
    holding rows ``m, m + M, m + 2M, ...`` (every data shard contributes to each)."""
    return jax.tree.map(lambda x: x.reshape(-1, micro_batches, *x.shape[1:]).swapaxes(0, 1), tree)


def micro_batch_map(fn: Callable, micro_batches: int, *rows):
    """``fn(*rows)`` for a row-wise ``fn`` (each output row depends on its own input rows only,
    e.g. a forward's log-probs), computed on ``micro_batches`` micro-batches in turn
    (``lax.map``; rows as :func:`split_micro_batches` takes them), so one micro-batch's
    activations and logits are alive at a time; the outputs' rows back in their order.
    ``rows``: pytrees of ``[B, ...]`` arrays. Raises ``ValueError`` if ``micro_batches``
    does not divide ``B``."""
    if micro_batches == 1:
        return fn(*rows)
    check_micro_batches(jax.tree.leaves(rows)[0].shape[0], micro_batches, "rows",
                        "the rows (prompts x samples) a multiple of minibatches x micro_batches")
    out = jax.lax.map(lambda chunk: fn(*chunk), split_micro_batches(rows, micro_batches))
    return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(-1, *y.shape[2:]), out)


def micro_batch_gradients(grad_fn: Callable, params, batch, micro_batches: int, weights_fn: Callable):
    """The gradient of one minibatch, accumulated over ``micro_batches`` micro-batches.

    ``grad_fn(params, micro) -> (grads, (losses, metrics))`` gives, for each part of the
    objective (the policy's, the critic's), a gradient tree, its scalar loss -- an aggregate
    (``masked.aggregate``) over the rows it is given -- and a dict of scalar metrics, as
    three tuples; ``weights_fn(micro)`` gives each part's aggregation weight
    (``masked.aggregation_weight``). Micro-batch ``m`` takes rows ``m, m + M, m + 2M, ...``
    (every data shard contributes to each); part ``k``'s gradient, loss and metrics are
    ``sum_m w_mk x_mk / sum_m w_mk`` -- for the gradient and the loss the full minibatch's,
    exactly, whatever the micro-batches' token counts; for a metric, exactly when it is
    aggregated as its part's loss (else the weighted mean; metrics named ``*_max``, the
    maximum). One micro-batch calls ``grad_fn`` on the whole batch. Returns ``(grads, losses,
    metrics)``: the tuples of gradients and losses, one dict of every part's metrics. Raises
    ``ValueError`` if ``micro_batches`` does not divide the rows."""
    if micro_batches == 1:
        grads, (losses, metrics) = grad_fn(params, batch)
        return grads, losses, {k: v for part in metrics for k, v in part.items()}
    check_micro_batches(jax.tree.leaves(batch)[0].shape[0], micro_batches, "minibatch rows",
                        "the rows per minibatch (prompts x samples / minibatches) a multiple of micro_batches")
    micro = split_micro_batches(batch, micro_batches)
    weights_MK = jax.vmap(lambda m: jnp.stack(weights_fn(m)))(micro)
    shares_MK = safe_div(weights_MK, jnp.sum(weights_MK, axis=0))

    def one(total, xs):
        micro_batch, shares_K = xs
        grads, (losses, metrics) = grad_fn(params, micro_batch)
        shares = tuple(shares_K)
        weighted = jax.tree.map(lambda s, part: jax.tree.map(lambda x: x * s, part), (shares, shares),
                                float32_moments((grads, losses)))  # accumulated in float32 (bf16 parameters too)
        return jax.tree.map(jnp.add, total, weighted), (metrics, shares_K)

    first = jax.tree.map(lambda x: x[0], micro)
    grads_shape, (losses_shape, _) = jax.eval_shape(lambda: grad_fn(params, first))
    zeros = float32_moments(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (grads_shape, losses_shape)))
    (grads, losses), (metrics_M, shares_MK) = jax.lax.scan(one, zeros, (micro, shares_MK))
    metrics = {k: jnp.max(v, axis=0) if k.endswith("_max") else jnp.sum(v * shares_MK[:, part], axis=0)
               for part, part_metrics in enumerate(metrics_M) for k, v in part_metrics.items()}
    return grads, losses, metrics

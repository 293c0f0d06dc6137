"""Masked reductions over tokens and batches, the one place every token loss reduces.

All functions take an explicit 0/1 (or bool) mask and an optional ``axis_name``. With an
``axis_name`` the sums and counts are ``lax.psum``-ed over that named axis before dividing,
so under ``pmap``/``shard_map`` every shard returns the value of the *global* batch, not the
mean of per-shard means.

Aggregation modes for a per-token loss ``l[b, t]`` with mask ``m[b, t]``:

``token_mean``
    ``sum_bt m l / sum_bt m`` -- every valid token in the (global) batch weighs the same
    (PPO as in most RLHF code, DAPO).
``seq_mean_token_mean``
    ``1/B' sum_b (sum_t m l / sum_t m)`` over the ``B'`` rows with at least one valid
    token -- each sequence weighs the same (GRPO as written in Shao et al., 2024).
``seq_sum``
    ``1/B sum_b sum_t m l / C`` with a constant normaliser ``C`` -- no length bias
    (Dr. GRPO, Liu et al., 2025, uses ``C`` = the maximum completion length; ``C = 1``
    is the plain sequence sum of REINFORCE).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax._checks import check_choice, check_mask_like

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_sum"]
Reduction = Literal["mean", "none"]
REDUCTIONS: tuple[str, ...] = ("mean", "none")
AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_sum")


def psum_over(x: jax.Array, axis_name: str | None) -> jax.Array:
    """``lax.psum(x, axis_name)``, or ``x`` itself when there is no named axis."""
    return x if axis_name is None else lax.psum(x, axis_name)


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` with 0 where ``den == 0`` (an all-masked batch reduces to 0, not NaN)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0.0)


def masked_sum(x: jax.Array, mask: jax.Array, *, axis_name: str | None = None) -> jax.Array:
    """``sum(mask * x)`` over all axes (and over ``axis_name`` when given)."""
    check_mask_like(mask, x, "mask", "x")
    return psum_over(jnp.sum(jnp.where(mask, x, 0.0)), axis_name)


def masked_mean(x: jax.Array, mask: jax.Array, *, axis_name: str | None = None) -> jax.Array:
    """``sum(mask * x) / sum(mask)`` over all axes; 0 when the mask is empty."""
    check_mask_like(mask, x, "mask", "x")
    total = psum_over(jnp.sum(jnp.where(mask, x, 0.0)), axis_name)
    count = psum_over(jnp.sum(mask, dtype=x.dtype), axis_name)
    return safe_div(total, count)


def masked_var(
    x: jax.Array, mask: jax.Array, *, unbiased: bool = True, axis_name: str | None = None
) -> jax.Array:
    """Variance of the masked entries; Bessel-corrected (``n - 1``) when ``unbiased``."""
    mean = masked_mean(x, mask, axis_name=axis_name)
    sq = masked_sum(jnp.square(x - mean), mask, axis_name=axis_name)
    count = psum_over(jnp.sum(mask, dtype=x.dtype), axis_name)
    return safe_div(sq, count - 1 if unbiased else count)


def masked_whiten(
    x: jax.Array,
    mask: jax.Array,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    axis_name: str | None = None,
) -> jax.Array:
    """Whiten the masked entries: ``(x - mu) / sqrt(var + eps)``; masked entries become 0.

    ``mu`` and ``var`` (unbiased) are taken over the valid entries of the global batch.
    With ``shift_mean=False`` the mean is added back, ``(x - mu) / sigma + mu``: the scale
    is normalised but the offset kept, the form used for PPO *rewards* (Ziegler et al.,
    2019) so that a uniformly good batch keeps a positive reward.
    """
    mean = masked_mean(x, mask, axis_name=axis_name)
    var = masked_var(x, mask, axis_name=axis_name)
    whitened = (x - mean) * lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask, whitened, 0.0)


def aggregate(
    values_BT: jax.Array,
    mask_BT: jax.Array,
    mode: Aggregation = "token_mean",
    *,
    normalizer: float = 1.0,
    axis_name: str | None = None,
) -> jax.Array:
    """Reduce a per-token quantity to a scalar by one of the modes in the module docstring.

    Args:
      values_BT: per-token values, ``[B, T]``.
      mask_BT: 0/1 validity mask, ``[B, T]``.
      mode: ``token_mean``, ``seq_mean_token_mean`` or ``seq_sum``.
      normalizer: the constant ``C`` of ``seq_sum`` (ignored by the other modes).
      axis_name: named axis to reduce across under ``pmap``/``shard_map``.
    """
    check_choice(mode, AGGREGATIONS, "aggregation mode")
    check_mask_like(mask_BT, values_BT, "mask_BT", "values_BT")
    if values_BT.ndim != 2:
        raise ValueError(f"values_BT must have rank 2 [B, T], got shape {values_BT.shape}")
    masked_BT = jnp.where(mask_BT, values_BT, 0.0)
    if mode == "token_mean":
        return masked_mean(values_BT, mask_BT, axis_name=axis_name)
    if mode == "seq_mean_token_mean":
        count_B = jnp.sum(mask_BT, axis=1, dtype=values_BT.dtype)
        seq_mean_B = safe_div(jnp.sum(masked_BT, axis=1), count_B)
        nonempty_B = count_B > 0
        return safe_div(
            psum_over(jnp.sum(seq_mean_B), axis_name),
            psum_over(jnp.sum(nonempty_B, dtype=values_BT.dtype), axis_name),
        )
    batch = psum_over(jnp.asarray(values_BT.shape[0], values_BT.dtype), axis_name)
    return psum_over(jnp.sum(masked_BT), axis_name) / (batch * normalizer)


def aggregation_weight(mask_BT: jax.Array, mode: Aggregation = "token_mean") -> jax.Array:
    """The denominator of :func:`aggregate` on this batch (``seq_sum``'s constant left out):
    the valid tokens (``token_mean``), the rows with a valid token (``seq_mean_token_mean``) or
    the rows (``seq_sum``). It is what makes gradient accumulation exact: for a batch cut into
    micro-batches ``m`` with weights ``w_m``, ``aggregate(batch) = sum_m w_m aggregate(m) /
    sum_m w_m``, also when the micro-batches hold different numbers of tokens (an unweighted
    mean of the micro-batches' values would not be). A scalar; raises ``ValueError`` on an
    unknown mode or a mask that is not ``[B, T]``."""
    check_choice(mode, AGGREGATIONS, "aggregation mode")
    if mask_BT.ndim != 2:
        raise ValueError(f"mask_BT must have rank 2 [B, T], got shape {mask_BT.shape}")
    count_B = jnp.sum(mask_BT, axis=1, dtype=jnp.float32)
    if mode == "token_mean":
        return jnp.sum(count_B)
    if mode == "seq_mean_token_mean":
        return jnp.sum(count_B > 0, dtype=jnp.float32)
    return jnp.asarray(mask_BT.shape[0], jnp.float32)


def batch_mean(x_B: jax.Array, *, axis_name: str | None = None) -> jax.Array:
    """Mean over a per-example vector, global under ``axis_name``."""
    total = psum_over(jnp.sum(x_B), axis_name)
    count = psum_over(jnp.asarray(x_B.size, x_B.dtype), axis_name)
    return total / count


def reduce_examples(x_B: jax.Array, reduction: Reduction = "mean", *, axis_name: str | None = None) -> jax.Array:
    """Per-example values ``[B]`` reduced as a loss's ``reduction`` says: ``"mean"``, their
    mean over the batch (global under ``axis_name``); ``"none"``, the values themselves, for a
    caller that sums or weighs examples itself (as optax's and rlax's losses leave the
    reduction to the caller). Raises ``ValueError`` for another ``reduction``."""
    check_choice(reduction, REDUCTIONS, "reduction")
    return x_B if reduction == "none" else batch_mean(x_B, axis_name=axis_name)

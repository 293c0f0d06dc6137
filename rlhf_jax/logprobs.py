"""Per-token log-probabilities and entropies from logits (the model-side inputs of the losses)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax._checks import check_rank


def token_logprobs(logits_BTV: jax.Array, tokens_BT: jax.Array) -> jax.Array:
    """``log softmax(logits)[b, t, tokens[b, t]]``, computed in float32 or wider."""
    check_rank(logits_BTV, 3, "logits_BTV")
    check_rank(tokens_BT, 2, "tokens_BT")
    if logits_BTV.shape[:2] != tokens_BT.shape:
        raise ValueError(
            f"logits_BTV{logits_BTV.shape} and tokens_BT{tokens_BT.shape} disagree on [B, T]"
        )
    logits_BTV = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, tokens_BT[..., None], axis=-1)[..., 0]
    return picked_BT - logz_BT


def categorical_entropy(logits_BTV: jax.Array) -> jax.Array:
    """``H[b, t] = -sum_v p log p`` of the softmax over the last axis."""
    check_rank(logits_BTV, 3, "logits_BTV")
    logits_BTV = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    return -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)

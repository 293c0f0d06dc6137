"""SFT: next-token negative log-likelihood of the trained tokens (completions / assistant turns).

Batch (per micro-batch): ``input_ids [b, T]``, ``attention_mask [b, T]``, ``loss_mask [b, T]``
(1 on the tokens to learn, aligned with ``input_ids``), and for packed rows
``segment_ids [b, T]``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.models.completion import sequence_logprobs
from rlhf_jax.models.heads import CausalLM


def sft_loss_sums(model: CausalLM, batch: dict, *, vocab_chunk: int | None = None):
    """``(sum of -log p over loss_mask tokens, their count, {})``: token-mean SFT loss once divided."""
    logp_BT = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], vocab_chunk=vocab_chunk,
                                segment_ids_BT=batch.get("segment_ids"))
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    return -jnp.sum(logp_BT * mask_BT), jnp.sum(mask_BT), {}


def perplexity(mean_nll: jax.Array) -> jax.Array:
    return jnp.exp(mean_nll)

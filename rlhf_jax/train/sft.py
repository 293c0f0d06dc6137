"""SFT: next-token negative log-likelihood of the trained tokens (completions / assistant turns).

Batch (per micro-batch): :class:`rlhf_jax.data.Sequences` (``[b, T]``; the loss mask on the
tokens to learn; segments for packed rows)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.data.batches import Sequences
from rlhf_jax.losses import sequence_nll
from rlhf_jax.models.token_logprobs import sequence_logprobs
from rlhf_jax.models.heads import CausalLM


def token_nll_rows(model: CausalLM, batch: Sequences, *, vocab_chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``(nll_B, tokens_B)``: per row, the summed negative log-likelihood ``-sum_t log p(x_t |
    x_<t)`` (nats) of the tokens ``loss_mask`` selects, and how many there are -- the SFT
    objective: the model's forward (``sequence_logprobs``) and the loss core's
    ``losses.sequence_nll``; the SFT step, its held-out evaluation and RAFT's update reduce it."""
    logp_BT = sequence_logprobs(model, batch.input_ids_BT, batch.attention_mask_BT, vocab_chunk=vocab_chunk,
                                segment_ids_BT=batch.segment_ids_BT)
    return sequence_nll(logp_BT, batch.loss_mask_BT)


def sft_loss_sums(model: CausalLM, batch: Sequences, *, vocab_chunk: int | None = None):
    """``(sum of -log p over loss_mask tokens, their count, {})``: token-mean SFT loss once divided."""
    nll_B, tokens_B = token_nll_rows(model, batch, vocab_chunk=vocab_chunk)
    return jnp.sum(nll_B), jnp.sum(tokens_B), {}


def perplexity(mean_nll: jax.Array) -> jax.Array:
    """``exp(mean negative log-likelihood)``."""
    return jnp.exp(mean_nll)

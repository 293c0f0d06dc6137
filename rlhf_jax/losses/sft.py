"""Supervised fine-tuning: masked next-token cross-entropy."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax._checks import check_mask_like
from rlhf_jax.logprobs import token_logprobs
from rlhf_jax.masked import Aggregation, aggregate, masked_mean, masked_sum


class SFTAux(NamedTuple):
    """SFT diagnostics over the trained tokens: mean negative log-likelihood (nats), argmax
    accuracy, and the token count."""

    nll: jax.Array  # token-mean negative log-likelihood (exp of it is the perplexity)
    accuracy: jax.Array  # fraction of valid tokens where argmax == target
    num_tokens: jax.Array  # valid tokens in the (global) batch


def sft_loss(
    logits_BTV: jax.Array,
    targets_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    aggregation: Aggregation = "token_mean",
    normalizer: float = 1.0,
    axis_name: str | None = None,
) -> tuple[jax.Array, SFTAux]:
    """Masked token cross-entropy, ``-log p(target[b, t] | context)`` aggregated over tokens.

    ``logits_BTV[b, t]`` must already be aligned with ``targets_BT[b, t]`` (the caller
    shifts inputs by one). ``mask_BT`` selects the trained tokens, e.g. the assistant turns
    only. See ``rlhf_jax.masked.aggregate`` for the aggregation modes.
    """
    check_mask_like(mask_BT, targets_BT, "mask_BT", "targets_BT")
    nll_BT = -token_logprobs(logits_BTV, targets_BT)
    loss = aggregate(nll_BT, mask_BT, aggregation, normalizer=normalizer, axis_name=axis_name)
    correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(nll_BT.dtype)
    aux = SFTAux(
        nll=masked_mean(nll_BT, mask_BT, axis_name=axis_name),
        accuracy=masked_mean(correct_BT, mask_BT, axis_name=axis_name),
        num_tokens=masked_sum(jnp.ones_like(nll_BT), mask_BT, axis_name=axis_name),
    )
    return loss, aux


def sequence_nll(token_logps_BT: jax.Array, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(nll_B, tokens_B)``: per sequence, the summed negative log-likelihood ``-sum_t mask
    log p(x_t | x_<t)`` (nats) of the tokens ``mask_BT`` selects, and how many there are --
    SFT's per-example values (Ouyang et al., 2022, the SFT step), left for the caller to
    reduce: ``sum(nll_B) / sum(tokens_B)`` is the token-mean loss over any set of rows.
    ``token_logps_BT`` ``[B, T]`` are the model's log-probs of the tokens themselves (e.g.
    ``models.sequence_logprobs``). Raises ``ValueError`` when the mask is not 0/1-like or
    shapes differ."""
    check_mask_like(mask_BT, token_logps_BT, "mask_BT", "token_logps_BT")
    mask_BT = mask_BT.astype(token_logps_BT.dtype)
    return -jnp.sum(token_logps_BT * mask_BT, axis=1), jnp.sum(mask_BT, axis=1)

"""Log-probabilities of given tokens under a causal LM, optionally chunked over the vocabulary.

``log p(x_t | x_<t) = z_t[x_t] - logsumexp_v z_t[v]`` with ``z_t = h_{t-1} W`` the logits
from the previous position. With ``vocab_chunk`` the log-normaliser is accumulated chunk by
chunk (a running max and sum, as in online softmax, Milakov & Gimelshein, 2018) and each
chunk is recomputed in the backward pass, so at most ``[B, T, vocab_chunk]`` logits are
alive at once instead of ``[B, T, V]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.logprobs import token_logprobs
from rlhf_jax.models.decoder import visibility
from rlhf_jax.models.heads import CausalLM, softcap


def _chunked_logsumexp(h_BTD: jax.Array, w_DV: jax.Array, cap: float | None, chunk: int) -> jax.Array:
    D, V = w_DV.shape
    n = -(-V // chunk)
    w_NDC = jnp.pad(w_DV, ((0, 0), (0, n * chunk - V))).reshape(D, n, chunk).transpose(1, 0, 2)
    valid_NC = (jnp.arange(n * chunk) < V).reshape(n, chunk)

    @jax.checkpoint
    def step(carry, chunk_in):
        max_BT, sum_BT = carry
        w_DC, valid_C = chunk_in
        z_BTC = softcap(jnp.einsum("btd,dc->btc", h_BTD, w_DC.astype(h_BTD.dtype)).astype(jnp.float32), cap)
        z_BTC = jnp.where(valid_C, z_BTC, -jnp.inf)
        new_max_BT = jnp.maximum(max_BT, z_BTC.max(-1))
        sum_BT = sum_BT * jnp.exp(max_BT - new_max_BT) + jnp.exp(z_BTC - new_max_BT[..., None]).sum(-1)
        return (new_max_BT, sum_BT), None

    start = (jnp.full(h_BTD.shape[:2], -jnp.inf, jnp.float32), jnp.zeros(h_BTD.shape[:2], jnp.float32))
    (max_BT, sum_BT), _ = jax.lax.scan(step, start, (w_NDC, valid_NC))
    return max_BT + jnp.log(sum_BT)


def predecessors(attention_mask_BT: jax.Array, segment_ids_BT: jax.Array) -> jax.Array:
    """``parent_BT[b, t]``: the token whose hidden state predicts token ``t`` -- the last one
    before it that it sees (:func:`~rlhf_jax.models.decoder.visibility`), or -1 for none. It is
    ``t - 1`` except at the first token of a packed example (-1) and of a shared prompt's
    response (the prompt's last token)."""
    T = attention_mask_BT.shape[1]
    t_T1, s_1T = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    before_BTT = visibility(attention_mask_BT, segment_ids_BT) & (s_1T < t_T1)[None]
    return jnp.max(jnp.where(before_BTT, s_1T[None], -1), axis=-1)


def _hidden_before(model: CausalLM, input_ids_BT, attention_mask_BT, segment_ids_BT, start: int):
    """``(h_BND, predicted_BN)``: the final hidden states that predict tokens ``start .. T - 1``
    and whether each has a predecessor (``None``: all do). Without segments token ``t`` is
    predicted from ``t - 1``; with segments from :func:`predecessors`."""
    if not 1 <= start < input_ids_BT.shape[1]:
        raise ValueError(f"start={start} must be in [1, {input_ids_BT.shape[1]}): the first token has no context")
    h_BTD = model.model(input_ids_BT, attention_mask_BT, segment_ids_BT)
    if segment_ids_BT is None:
        return h_BTD[:, start - 1:-1], None
    parent_BN = predecessors(attention_mask_BT, segment_ids_BT)[:, start:]
    return jnp.take_along_axis(h_BTD, jnp.maximum(parent_BN, 0)[..., None], axis=1), parent_BN >= 0


def next_token_logits(model: CausalLM, input_ids_BT: jax.Array, attention_mask_BT: jax.Array, *,
                      start: int = 1, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """``logits_BNV[:, n]``: the distribution of token ``start + n`` given the tokens before it,
    for ``N = T - start`` positions. The output head runs on those positions only: with
    ``start`` = a rollout's prompt width it never forms the prompt's logits (``[B, T, V]`` ->
    ``[B, N, V]``, the saving of TRL's ``logits_to_keep``)."""
    return model.logits(_hidden_before(model, input_ids_BT, attention_mask_BT, segment_ids_BT, start)[0])


def sequence_logprobs(model: CausalLM, input_ids_BT: jax.Array, attention_mask_BT: jax.Array, *,
                      vocab_chunk: int | None = None, segment_ids_BT: jax.Array | None = None,
                      start: int = 1) -> jax.Array:
    """``logp_BT[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`` for ``t >= start``; 0 before
    (``start >= 1``: the first token has no context). Multiply by a completion mask to keep the
    completion's tokens; ``start`` = the prompt width of a rollout skips the prompt's logits
    (``next_token_logits``). ``vocab_chunk``: the vocabulary slice size (``None``: full logits
    at once). ``segment_ids_BT``: packed or shared-prompt rows (see ``Decoder``): each token is
    predicted from its :func:`predecessors`; a token without one (the first of a packed example)
    gets 0."""
    h_BTD, predicted_BT = _hidden_before(model, input_ids_BT, attention_mask_BT, segment_ids_BT, start)
    targets_BT = input_ids_BT[:, start:]
    if vocab_chunk is None:
        logp_BT = token_logprobs(model.logits(h_BTD), targets_BT)
    else:
        w_DV = model.output_embedding()
        target_w_BTD = jnp.take(w_DV.T, targets_BT, axis=0).astype(h_BTD.dtype)
        picked_BT = softcap(jnp.einsum("btd,btd->bt", h_BTD, target_w_BTD).astype(jnp.float32), model.config.final_softcap)
        logp_BT = picked_BT - _chunked_logsumexp(h_BTD, w_DV, model.config.final_softcap, vocab_chunk)
    if predicted_BT is not None:
        logp_BT = jnp.where(predicted_BT, logp_BT, 0.0)
    return jnp.pad(logp_BT, ((0, 0), (start, 0)))


def response_logprob_sums(model: CausalLM, input_ids_BT: jax.Array, attention_mask_BT: jax.Array,
                          segment_ids_BT: jax.Array, response_BTK: jax.Array, *,
                          vocab_chunk: int | None = None) -> jax.Array:
    """``[B, K]``: the summed token log-probs (nats) of each of the ``K`` responses that
    ``response_BTK`` (bool) marks in rows holding a prompt and several responses whose
    segments make each response see only the prompt and itself (``data.SharedPromptResponses``):
    the same values as :func:`sequence_logprobs` of prompt + response alone, summed over the
    response."""
    logp_BT = sequence_logprobs(model, input_ids_BT, attention_mask_BT, vocab_chunk=vocab_chunk,
                                segment_ids_BT=segment_ids_BT)
    return jnp.einsum("bt,btk->bk", logp_BT, response_BTK.astype(logp_BT.dtype))

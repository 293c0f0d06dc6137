"""DPO and its variants (the ``loss_type``s of :func:`rlhf_jax.losses.dpo_loss`).

Batch: :class:`rlhf_jax.data.Pairs` (``[b, T]`` chosen and rejected rows; the loss mask marks
the response tokens) or, with ``data.shared_prompt``, :class:`rlhf_jax.data.SharedPromptPairs`
(``b`` rows: each prompt once, both responses after it); the reference model's summed response
log-probs ``reference_logps_BK`` ``[b, 2]`` are added by :func:`reference_logps` (per
micro-batch) or :func:`add_reference_logps` (a whole step's ``[M, b, ...]`` batch), in the
step's program (``jit_train_step``), or cached once before training."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.data.batches import PairBatch, SharedPromptPairs
from rlhf_jax.losses import dpo_loss
from rlhf_jax.models.token_logprobs import response_logprob_sums, sequence_logprobs
from rlhf_jax.models.heads import CausalLM


def response_logps(model: CausalLM, batch: PairBatch, *, vocab_chunk: int | None = None,
                   average: bool = False) -> jax.Array:
    """``[b, 2]``: the summed log-probs (nats) of the chosen and rejected responses, in one
    forward; with ``average``, divided by each response's tokens (the per-token mean that
    TRL's IPO uses)."""
    if isinstance(batch, SharedPromptPairs):
        logps_BK = response_logprob_sums(model, batch.input_ids_BT, batch.attention_mask_BT, batch.segment_ids_BT,
                                         batch.response_mask_BTK(), vocab_chunk=vocab_chunk)
    else:
        b = batch.chosen.input_ids_BT.shape[0]
        ids, mask, loss_mask = (jnp.concatenate([getattr(batch.chosen, name), getattr(batch.rejected, name)])
                                for name in ("input_ids_BT", "attention_mask_BT", "loss_mask_BT"))
        logps_2b = jnp.sum(sequence_logprobs(model, ids, mask, vocab_chunk=vocab_chunk) * loss_mask, axis=1)
        logps_BK = jnp.stack([logps_2b[:b], logps_2b[b:]], axis=1)
    if average:
        return logps_BK / jnp.maximum(batch.response_lengths_BK(), 1).astype(logps_BK.dtype)
    return logps_BK


def reference_logps(reference: CausalLM, batch: PairBatch, *, vocab_chunk: int | None = None,
                    average: bool = False) -> PairBatch:
    """The batch with ``reference_logps_BK`` (the reference's :func:`response_logps`) added."""
    return batch.replace(reference_logps_BK=response_logps(reference, batch, vocab_chunk=vocab_chunk, average=average))


def add_reference_logps(reference: CausalLM, batch_MB: PairBatch, *, vocab_chunk: int | None = None,
                        average: bool = False) -> PairBatch:
    """:func:`reference_logps` over every micro-batch of a step's ``[M, b, ...]`` batch."""
    return jax.vmap(lambda micro: reference_logps(reference, micro, vocab_chunk=vocab_chunk, average=average))(batch_MB)


def dpo_loss_sums(model: CausalLM, batch: PairBatch, *, beta: float = 0.1, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0, vocab_chunk: int | None = None, average: bool = False):
    """``(loss sum, pairs, metric sums)`` of the DPO loss (Rafailov et al., 2023) of a pair batch
    whose reference log-probs ``reference_logps_BK`` ``[b, 2]`` are in it
    (``add_reference_logps``, with the same ``average``): the objective is the model's forward
    (:func:`response_logps`) and the loss core's per-pair ``dpo_loss``, summed."""
    reference_BK = batch.reference_logps_BK
    logps_BK = response_logps(model, batch, vocab_chunk=vocab_chunk, average=average)
    loss_B, aux = dpo_loss(logps_BK[:, 0], logps_BK[:, 1], reference_BK[:, 0], reference_BK[:, 1], beta=beta,
                           loss_type=loss_type, label_smoothing=label_smoothing, reduction="none")
    n = jnp.asarray(logps_BK.shape[0], jnp.float32)
    return jnp.sum(loss_B), n, {"reward_accuracy": jnp.sum(aux.reward_accuracy),
                                "reward_margin": jnp.sum(aux.reward_margin)}

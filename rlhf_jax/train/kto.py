"""KTO (Ethayarajh et al., 2024) on unpaired binary feedback.

Batch: :class:`rlhf_jax.data.UnpairedSequences` -- each example's prompt + completion with its
label, and the mismatched rows (prompt ``b``, completion ``b + 1``) on which the reference
point ``z_0`` is estimated; the reference model's summed completion log-probs
``reference_logps_BK`` ``[b, 2]`` (the example, its mismatched row) are added by
:func:`add_reference_logps` in the step's program, or cached before training."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.data.batches import UnpairedSequences
from rlhf_jax.losses import kto_loss, kto_reference_point
from rlhf_jax.models.heads import CausalLM
from rlhf_jax.models.token_logprobs import sequence_logprobs


def completion_logps(model: CausalLM, batch: UnpairedSequences, *, vocab_chunk: int | None = None) -> jax.Array:
    """``[b, 2]``: the summed log-probs (nats) of each example's completion and of its
    mismatched row's completion, in one forward over ``2b`` rows."""
    b = batch.desirable_B.shape[0]
    ids, mask, loss_mask = (jnp.concatenate([getattr(batch.sequences, name), getattr(batch.mismatched, name)])
                            for name in ("input_ids_BT", "attention_mask_BT", "loss_mask_BT"))
    logps_2b = jnp.sum(sequence_logprobs(model, ids, mask, vocab_chunk=vocab_chunk) * loss_mask, axis=1)
    return jnp.stack([logps_2b[:b], logps_2b[b:]], axis=1)


def add_reference_logps(reference: CausalLM, batch_MB: UnpairedSequences, *,
                        vocab_chunk: int | None = None) -> UnpairedSequences:
    """The step's ``[M, b, ...]`` batch with the reference's :func:`completion_logps` added."""
    return jax.vmap(lambda micro: micro.replace(
        reference_logps_BK=completion_logps(reference, micro, vocab_chunk=vocab_chunk)))(batch_MB)


def kto_loss_sums(model: CausalLM, batch: UnpairedSequences, *, beta: float = 0.1, desirable_weight: float = 1.0,
                  undesirable_weight: float = 1.0, vocab_chunk: int | None = None):
    """``(loss sum, examples, metric sums)``: the policy's forward (:func:`completion_logps`),
    the reference point ``z_0`` from the mismatched rows of this micro-batch
    (``losses.kto_reference_point``, no gradient; TRL also estimates it per batch), and the
    loss core's per-example ``kto_loss`` (eq. 8), summed. Metrics: ``kl`` (``z_0``) and
    ``reward_accuracy``, the share of examples whose implicit reward has their label's sign."""
    logps_BK, reference_BK = completion_logps(model, batch, vocab_chunk=vocab_chunk), batch.reference_logps_BK
    point = kto_reference_point(logps_BK[:, 1], reference_BK[:, 1])
    loss_B, aux = kto_loss(logps_BK[:, 0], reference_BK[:, 0], batch.desirable_B, point, beta=beta,
                           desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, reduction="none")
    n = jnp.asarray(loss_B.shape[0], jnp.float32)
    agrees_B = jnp.where(batch.desirable_B, aux.desirable_reward > 0, aux.undesirable_reward < 0)
    return jnp.sum(loss_B), n, {"kl": point * n, "reward_accuracy": jnp.sum(agrees_B.astype(jnp.float32))}

"""DPO and its variants (the ``loss_type``s of :func:`rlhf_jax.losses.dpo_loss`).

Batch: ``chosen_ids``, ``chosen_mask``, ``chosen_loss_mask`` and the same for ``rejected``
(``[b, T]``; the loss mask marks the response tokens), plus the reference model's summed
response log-probs ``ref_chosen_logps [b]`` / ``ref_rejected_logps [b]`` from
:func:`reference_logps` (per micro-batch) or :func:`add_reference_logps` (a whole step's
``[M, b, ...]`` batch), computed for each batch in the step's program (``jit_train_step``).
With ``data.shared_prompt`` the pairs come as ``b`` rows ``shared_ids``, ``shared_mask``,
``shared_segment_ids``: each prompt once, both responses after it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses import dpo_loss
from rlhf_jax.models.completion import response_logprob_sums, sequence_logprobs
from rlhf_jax.models.heads import CausalLM


def response_logps(model: CausalLM, batch: dict, *, vocab_chunk: int | None = None) -> tuple:
    """Summed log-probs of the chosen and rejected responses, ``([b], [b])``, in one forward."""
    if "shared_ids" in batch:
        logps_BK = response_logprob_sums(model, batch["shared_ids"], batch["shared_mask"], batch["shared_segment_ids"],
                                         2, vocab_chunk=vocab_chunk)
        return logps_BK[:, 0], logps_BK[:, 1]
    b = batch["chosen_ids"].shape[0]
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    loss_mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]]).astype(jnp.float32)
    logps_2b = jnp.sum(sequence_logprobs(model, ids, mask, vocab_chunk=vocab_chunk) * loss_mask, axis=1)
    return logps_2b[:b], logps_2b[b:]


def reference_logps(reference: CausalLM, batch: dict, *, vocab_chunk: int | None = None) -> dict:
    """The batch with ``ref_chosen_logps`` / ``ref_rejected_logps`` added."""
    chosen, rejected = response_logps(reference, batch, vocab_chunk=vocab_chunk)
    return batch | {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


def add_reference_logps(reference: CausalLM, batch_MB: dict, *, vocab_chunk: int | None = None) -> dict:
    """:func:`reference_logps` over every micro-batch of a step's ``[M, b, ...]`` batch."""
    return jax.vmap(lambda micro: reference_logps(reference, micro, vocab_chunk=vocab_chunk))(batch_MB)


def dpo_loss_sums(model: CausalLM, batch: dict, *, beta: float = 0.1, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0, vocab_chunk: int | None = None):
    """``(loss sum, pairs, metric sums)`` of the DPO loss (Rafailov et al., 2023) of a pair batch
    whose reference log-probs ``ref_chosen_logps``/``ref_rejected_logps`` ``[b]`` are in it
    (``add_reference_logps``): the pair-mean loss times the pair count."""
    chosen_B, rejected_B = response_logps(model, batch, vocab_chunk=vocab_chunk)
    loss, aux = dpo_loss(chosen_B, rejected_B, batch["ref_chosen_logps"], batch["ref_rejected_logps"],
                         beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    n = jnp.asarray(chosen_B.shape[0], jnp.float32)
    return loss * n, n, {"reward_accuracy": aux.reward_accuracy * n, "reward_margin": aux.reward_margin * n}

"""Reward model: pairwise Bradley–Terry loss on a score head (InstructGPT, eq. 1).

Batch: :class:`rlhf_jax.data.Pairs` (``[b, T]`` chosen and rejected rows, optionally Llama 2's
per-pair ``margin_B``), run through one forward of ``2b`` rows -- or, with
``data.shared_prompt``, :class:`rlhf_jax.data.SharedPromptPairs`: ``b`` rows holding each
prompt once and both responses after it."""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.data.batches import PairBatch, SharedPromptPairs
from rlhf_jax.losses import bradley_terry_loss
from rlhf_jax.models.heads import ScoreModel


def pair_scores(model: ScoreModel, batch: PairBatch) -> tuple:
    """``(r_chosen [b], r_rejected [b])``."""
    if isinstance(batch, SharedPromptPairs):
        scores_BKL = model.response_scores(batch.input_ids_BT, batch.attention_mask_BT, batch.segment_ids_BT,
                                           batch.sequence_mask_BTK())
        return scores_BKL[:, 0, 0], scores_BKL[:, 1, 0]
    b = batch.chosen.input_ids_BT.shape[0]
    ids = jnp.concatenate([batch.chosen.input_ids_BT, batch.rejected.input_ids_BT])
    mask = jnp.concatenate([batch.chosen.attention_mask_BT, batch.rejected.attention_mask_BT])
    rewards_2b = model.sequence_scores(ids, mask)[:, 0]
    return rewards_2b[:b], rewards_2b[b:]


def rm_loss_sums(model: ScoreModel, batch: PairBatch, *, center_coef: float = 0.0):
    """Per-pair sums of the Bradley–Terry loss, accuracy and margin, and the pair count."""
    chosen_B, rejected_B = pair_scores(model, batch)
    loss, aux = bradley_terry_loss(chosen_B, rejected_B, margin_B=batch.margin_B, center_coef=center_coef)
    n = jnp.asarray(chosen_B.shape[0], jnp.float32)
    return loss * n, n, {"accuracy": aux.accuracy * n, "margin": aux.margin * n}

"""Reward model: pairwise Bradley–Terry loss on a score head (InstructGPT, eq. 1).

Rankings (K responses per prompt, best first) train a K-wise loss on the same score head.

Batch: :class:`rlhf_jax.data.Pairs` (``[b, T]`` chosen and rejected rows, optionally Llama 2's
per-pair ``margin_B``), run through one forward of ``2b`` rows -- or, with
``data.shared_prompt``, :class:`rlhf_jax.data.SharedPromptPairs`: ``b`` rows holding each
prompt once and both responses after it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.data.batches import PairBatch, RankedBatch, SharedPromptPairs, SharedPromptRankings
from rlhf_jax.losses import bradley_terry_loss, ranking_loss
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
    """``(loss sum, pairs, metric sums)``: the objective is the score forward
    (:func:`pair_scores`) and the loss core's per-pair ``bradley_terry_loss``, summed with its
    accuracy and margin."""
    chosen_B, rejected_B = pair_scores(model, batch)
    loss_B, aux = bradley_terry_loss(chosen_B, rejected_B, margin_B=batch.margin_B, center_coef=center_coef,
                                     reduction="none")
    n = jnp.asarray(chosen_B.shape[0], jnp.float32)
    return jnp.sum(loss_B), n, {"accuracy": jnp.sum(aux.accuracy), "margin": jnp.sum(aux.margin)}


def ranking_scores(model: ScoreModel, batch: RankedBatch) -> jax.Array:
    """``[b, K]`` scores of ranked responses (:class:`Rankings` ``[b, K, T]``, or
    :class:`SharedPromptRankings` ``[b, T]``) in one forward."""
    if isinstance(batch, SharedPromptRankings):
        return model.response_scores(batch.input_ids_BT, batch.attention_mask_BT, batch.segment_ids_BT,
                                     batch.sequence_mask_BTK())[..., 0]
    b, k, t = batch.input_ids_BKT.shape
    scores = model.sequence_scores(batch.input_ids_BKT.reshape(b * k, t), batch.attention_mask_BKT.reshape(b * k, t))
    return scores[:, 0].reshape(b, k)


def ranking_loss_sums(model: ScoreModel, batch: RankedBatch, *, kind: str):
    """``(loss sum, prompts, metric sums)`` of the K-wise ranking loss (``losses.ranking_loss``):
    each prompt counts once; ``accuracy`` sums each prompt's pairwise accuracy."""
    loss_B, aux = ranking_loss(ranking_scores(model, batch), valid_BK=batch.valid_BK, kind=kind, reduction="none")
    n = jnp.asarray(batch.valid_BK.shape[0], jnp.float32)
    return jnp.sum(loss_B), n, {"accuracy": jnp.sum(aux.pair_accuracy)}

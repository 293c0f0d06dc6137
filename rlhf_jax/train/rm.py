"""Reward model: pairwise Bradley–Terry loss on a score head (InstructGPT, eq. 1).

Batch: ``chosen_ids``, ``chosen_mask``, ``rejected_ids``, ``rejected_mask`` (each ``[b, T]``)
and optionally ``margin [b]`` (Llama 2's per-pair margin). Chosen and rejected run through
one forward of ``2b`` rows -- or, with ``data.shared_prompt``, ``b`` rows ``shared_ids``,
``shared_mask``, ``shared_segment_ids`` holding each prompt once and both responses after it."""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.losses import bradley_terry_loss
from rlhf_jax.models.heads import ScoreModel


def pair_scores(model: ScoreModel, batch: dict) -> tuple:
    """``(r_chosen [b], r_rejected [b])``."""
    if "shared_ids" in batch:
        scores_BKL = model.response_scores(batch["shared_ids"], batch["shared_mask"], batch["shared_segment_ids"], 2)
        return scores_BKL[:, 0, 0], scores_BKL[:, 1, 0]
    b = batch["chosen_ids"].shape[0]
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    rewards_2b = model.sequence_scores(ids, mask)[:, 0]
    return rewards_2b[:b], rewards_2b[b:]


def rm_loss_sums(model: ScoreModel, batch: dict, *, center_coef: float = 0.0):
    """Per-pair sums of the Bradley–Terry loss, accuracy and margin, and the pair count."""
    chosen_B, rejected_B = pair_scores(model, batch)
    loss, aux = bradley_terry_loss(chosen_B, rejected_B, margin_B=batch.get("margin"), center_coef=center_coef)
    n = jnp.asarray(chosen_B.shape[0], jnp.float32)
    return loss * n, n, {"accuracy": aux.accuracy * n, "margin": aux.margin * n}

"""Process reward model: a score head read at the last token of each reasoning step, trained
by binary cross-entropy on the steps' labels (``losses.process_reward_loss``; Lightman et al.,
2023, "Let's Verify Step by Step", sec. 2.4).

Batch: :class:`rlhf_jax.data.StepSequences` -- prompt + solution rows, ``step_mask_BT`` 1 at
each step's last token (its newline; the last step's EOS), ``step_labels_BT`` its label."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.data.batches import StepSequences
from rlhf_jax.losses import process_reward_loss
from rlhf_jax.models.heads import ScoreModel


def step_logits(model: ScoreModel, batch: StepSequences) -> jax.Array:
    """``[B, T]``: the score head's logit at every position (read at the step ends)."""
    return model(batch.sequences.input_ids_BT, batch.sequences.attention_mask_BT)[..., 0]


def prm_loss_sums(model: ScoreModel, batch: StepSequences):
    """``(loss sum, steps, metric sums)``: the process reward loss summed over the batch's step
    ends (each step weighs the same, however the steps fall into rows or micro-batches), with
    the steps predicted right (``step_accuracy``)."""
    loss, aux = process_reward_loss(step_logits(model, batch), batch.step_labels_BT, batch.step_mask_BT)
    return loss * aux.steps, aux.steps, {"step_accuracy": aux.step_accuracy * aux.steps}


def step_rows(model: ScoreModel, batch: StepSequences) -> dict:
    """Per row ``[B]``: its steps, the steps predicted right, the summed loss (the loss core on
    each row alone) and the steps labelled correct (for the majority-label baseline)."""
    logits_BT, labels_BT, mask_BT = step_logits(model, batch), batch.step_labels_BT, batch.step_mask_BT
    loss_B, aux = jax.vmap(lambda z, y, m: process_reward_loss(z[None], y[None], m[None]))(logits_BT, labels_BT,
                                                                                          mask_BT)
    return {"steps": aux.steps, "correct": aux.step_accuracy * aux.steps, "loss": loss_B * aux.steps,
            "positive": jnp.sum((labels_BT > 0.5) * mask_BT, 1)}

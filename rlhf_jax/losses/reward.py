"""Reward-model losses: pairwise Bradley-Terry, K-wise rankings, and a process reward model's
per-step loss."""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax._checks import check_binary, check_choice, check_floating, check_rank, check_same_shape
from rlhf_jax.masked import Reduction, psum_over, reduce_examples, safe_div


class RewardAux(NamedTuple):
    """Bradley-Terry reward-model diagnostics (Ouyang et al., 2022), scalars over the pairs."""
    accuracy: jax.Array  # fraction of pairs with r_chosen > r_rejected
    chosen_reward: jax.Array  # mean r_chosen
    rejected_reward: jax.Array  # mean r_rejected
    margin: jax.Array  # mean r_chosen - r_rejected


def bradley_terry_loss(
    chosen_rewards_B: jax.Array,
    rejected_rewards_B: jax.Array,
    *,
    margin_B: jax.Array | None = None,
    center_coef: float = 0.0,
    axis_name: str | None = None,
    reduction: Reduction = "mean",
) -> tuple[jax.Array, RewardAux]:
    """Pairwise Bradley-Terry reward loss (InstructGPT, Ouyang et al., 2022, eq. 1):

        L = -E[ log sigmoid(r_chosen - r_rejected - m) ] + c * E[(r_chosen + r_rejected)^2]

    ``margin_B`` is Llama 2's per-pair margin ``m`` (Touvron et al., 2023, eq. 2), larger
    for pairs the labellers rated as clearly different; ``center_coef`` ``c`` is the
    reward-centering term of Eisenstein et al. (2023), which pins the mean reward near 0.
    Rewards ``[B]``; the loss and ``aux`` are means over the pairs, or per pair ``[B]`` with
    ``reduction="none"``. Raises ``ValueError`` for mismatched shapes or an unknown ``reduction``.
    """
    check_rank(chosen_rewards_B, 1, "chosen_rewards_B")
    check_same_shape([("chosen_rewards_B", chosen_rewards_B), ("rejected_rewards_B", rejected_rewards_B)])
    check_floating(chosen_rewards_B, "chosen_rewards_B")
    diff_B = chosen_rewards_B - rejected_rewards_B
    if margin_B is not None:
        check_same_shape([("chosen_rewards_B", chosen_rewards_B), ("margin_B", margin_B)])
        diff_B = diff_B - margin_B
    loss_B = -jax.nn.log_sigmoid(diff_B)
    if center_coef:
        loss_B = loss_B + center_coef * jnp.square(chosen_rewards_B + rejected_rewards_B)
    raw_margin_B = chosen_rewards_B - rejected_rewards_B
    aux = RewardAux(*(reduce_examples(x_B, reduction, axis_name=axis_name) for x_B in (
        (raw_margin_B > 0).astype(raw_margin_B.dtype), chosen_rewards_B, rejected_rewards_B, raw_margin_B)))
    return reduce_examples(loss_B, reduction, axis_name=axis_name), aux


class RankingAux(NamedTuple):
    """K-wise ranking diagnostics, scalars over the rankings."""
    pair_accuracy: jax.Array  # fraction of valid (i < j) pairs with r_i > r_j
    best_reward: jax.Array  # mean reward of the top-ranked response
    worst_reward: jax.Array  # mean reward of the lowest-ranked valid response


RANKING_KINDS = ("all_pairs", "plackett_luce")


def ranking_loss(
    rewards_BK: jax.Array,
    *,
    valid_BK: jax.Array | None = None,
    kind: Literal["all_pairs", "plackett_luce"] = "all_pairs",
    axis_name: str | None = None,
    reduction: Reduction = "mean",
) -> tuple[jax.Array, RankingAux]:
    """K-wise reward loss for responses sorted best first: ``rewards_BK[b, 0]`` is the best.

    ``all_pairs`` (InstructGPT, Ouyang et al., 2022, eq. 1): every one of the ``C(K, 2)``
    ordered pairs of a prompt is a Bradley-Terry comparison, averaged per prompt so that a
    prompt counts once whatever its ``K``:

        L_b = -1/C(K_b, 2) sum_{i < j} log sigmoid(r_i - r_j)

    ``plackett_luce``: the negative log-likelihood of the whole ranking under the
    Plackett-Luce model (Plackett, 1975; Luce, 1959), used for K-wise RMs by Zhu et al.
    (2023):

        L_b = -sum_{k=0}^{K_b-1} [ r_k - log sum_{j >= k} exp(r_j) ]

    ``valid_BK`` marks the ranked responses of prompts with fewer than ``K``; it must be a
    prefix (valid responses first). ``K = 2`` with either kind is ``bradley_terry_loss``.
    The loss and ``aux`` are means over the prompts (``pair_accuracy`` over all valid pairs),
    or per prompt ``[B]`` with ``reduction="none"`` (``pair_accuracy`` over the prompt's
    pairs). Raises ``ValueError`` for a bad shape, ``kind``, ``valid_BK`` or ``reduction``.
    """
    check_rank(rewards_BK, 2, "rewards_BK")
    check_floating(rewards_BK, "rewards_BK")
    check_choice(kind, RANKING_KINDS, "ranking kind")
    if valid_BK is None:
        valid_BK = jnp.ones(rewards_BK.shape, bool)
    check_same_shape([("rewards_BK", rewards_BK), ("valid_BK", valid_BK)])
    check_binary(valid_BK, "valid_BK")
    valid_BK = valid_BK.astype(bool)
    dtype = rewards_BK.dtype

    diff_BKK = rewards_BK[:, :, None] - rewards_BK[:, None, :]
    upper_KK = jnp.triu(jnp.ones(diff_BKK.shape[1:], bool), k=1)
    pairs_BKK = upper_KK & valid_BK[:, :, None] & valid_BK[:, None, :]
    num_pairs_B = jnp.sum(pairs_BKK, axis=(1, 2), dtype=dtype)
    if kind == "all_pairs":
        pair_nll_B = jnp.sum(jnp.where(pairs_BKK, -jax.nn.log_sigmoid(diff_BKK), 0.0), axis=(1, 2))
        loss_B = safe_div(pair_nll_B, num_pairs_B)
    else:
        # A finite fill (not -inf) keeps the gradient of the padded suffix free of NaNs.
        masked_BK = jnp.where(valid_BK, rewards_BK, jnp.finfo(dtype).min)
        # log sum_{j >= k} exp(r_j): a reversed cumulative logsumexp.
        suffix_lse_BK = jax.lax.cumlogsumexp(masked_BK, axis=1, reverse=True)
        loss_B = -jnp.sum(jnp.where(valid_BK, rewards_BK - suffix_lse_BK, 0.0), axis=1)
    correct_B = jnp.sum(jnp.where(pairs_BKK, diff_BKK > 0, False), axis=(1, 2), dtype=dtype)
    if reduction == "none":
        pair_accuracy = safe_div(correct_B, num_pairs_B)
    else:
        pair_accuracy = safe_div(psum_over(jnp.sum(correct_B), axis_name), psum_over(jnp.sum(num_pairs_B), axis_name))
    last_B = jnp.sum(valid_BK, axis=1) - 1
    worst_B = jnp.take_along_axis(rewards_BK, last_B[:, None], axis=1)[:, 0]
    aux = RankingAux(pair_accuracy, reduce_examples(rewards_BK[:, 0], reduction, axis_name=axis_name),
                     reduce_examples(worst_B, reduction, axis_name=axis_name))
    return reduce_examples(loss_B, reduction, axis_name=axis_name), aux


class ProcessRewardAux(NamedTuple):
    """Process-reward-model diagnostics, over the labelled step ends."""
    step_accuracy: jax.Array  # fraction of steps with (logit > 0) == (label > 1/2)
    steps: jax.Array  # labelled step ends in the batch


def process_reward_loss(
    step_logits_BT: jax.Array,
    step_labels_BT: jax.Array,
    step_mask_BT: jax.Array,
    *,
    axis_name: str | None = None,
) -> tuple[jax.Array, ProcessRewardAux]:
    """A process reward model's loss (Uesato et al., 2022; Lightman et al., 2023, "Let's Verify
    Step by Step", sec. 2.4): at the last token of each reasoning step the model's logit
    ``z`` predicts whether the step is correct, trained by binary cross-entropy,

        L = -1/S sum_{steps} [ y log sigmoid(z) + (1 - y) log sigmoid(-z) ]

    over the ``S`` step ends marked by ``step_mask_BT`` (``[B, T]``, 1 at a step's last token).
    ``step_labels_BT`` ``[B, T]`` holds each step's label ``y`` in ``[0, 1]`` at its end (soft
    labels allowed; other positions are ignored). Returns ``(loss, aux)``; 0 without a step.
    Raises ``ValueError`` for mismatched shapes or a non-binary mask."""
    check_rank(step_logits_BT, 2, "step_logits_BT")
    check_same_shape([("step_logits_BT", step_logits_BT), ("step_labels_BT", step_labels_BT),
                      ("step_mask_BT", step_mask_BT)])
    check_floating(step_logits_BT, "step_logits_BT")
    check_binary(step_mask_BT, "step_mask_BT")
    mask_BT = step_mask_BT.astype(step_logits_BT.dtype)
    labels_BT = step_labels_BT.astype(step_logits_BT.dtype)
    loss_BT = -(labels_BT * jax.nn.log_sigmoid(step_logits_BT) + (1 - labels_BT) * jax.nn.log_sigmoid(-step_logits_BT))
    steps = psum_over(jnp.sum(mask_BT), axis_name)
    correct_BT = ((step_logits_BT > 0) == (labels_BT > 0.5)).astype(mask_BT.dtype)
    return (safe_div(psum_over(jnp.sum(loss_BT * mask_BT), axis_name), steps),
            ProcessRewardAux(safe_div(psum_over(jnp.sum(correct_BT * mask_BT), axis_name), steps), steps))

"""Advantage estimators: GAE, discounted returns, group-relative (GRPO) and RLOO baselines.

Token-level estimators take right-padded ``[B, T]`` arrays with an explicit mask. Only
positions with ``mask = 1`` are steps of the episode: a masked position is skipped (its
reward and value are ignored and it gets advantage 0), and the value *after* the last
valid token is 0 -- an episode ends at its last valid token, it is never bootstrapped
from padding. Because masked positions are skipped rather than treated as terminal, a
mask with holes (e.g. tool-output tokens inside a completion) is handled too.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax._checks import check_floating, check_mask_like, check_rank, check_same_shape
from rlhf_jax.masked import masked_whiten

__all__ = [
    "gae",
    "discounted_returns",
    "masked_whiten",
    "group_relative_advantages",
    "GroupAux",
    "rloo_advantages",
]


def gae(
    rewards_BT: jax.Array,
    values_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al., 2016), a reverse ``lax.scan``:

        delta_t = r_t + gamma * V_{t'} - V_t
        A_t     = delta_t + gamma * lam * A_{t'}
        R_t     = A_t + V_t

    where ``t'`` is the next valid position after ``t``, and ``V_{t'} = A_{t'} = 0`` after
    the last valid token. Returns ``(advantages_BT, returns_BT)``, both 0 where masked.
    Neither output carries a gradient into ``values_BT`` (they are regression targets).
    """
    check_rank(rewards_BT, 2, "rewards_BT")
    check_same_shape([("rewards_BT", rewards_BT), ("values_BT", values_BT)])
    check_mask_like(mask_BT, rewards_BT, "mask_BT", "rewards_BT")
    check_floating(rewards_BT, "rewards_BT")
    rewards_BT = lax.stop_gradient(rewards_BT)
    values_BT = lax.stop_gradient(values_BT).astype(rewards_BT.dtype)
    valid_BT = mask_BT.astype(bool)

    def step(carry, inputs):
        next_value_B, next_adv_B = carry
        reward_B, value_B, valid_B = inputs
        delta_B = reward_B + gamma * next_value_B - value_B
        adv_B = delta_B + gamma * lam * next_adv_B
        carry = (jnp.where(valid_B, value_B, next_value_B), jnp.where(valid_B, adv_B, next_adv_B))
        return carry, jnp.where(valid_B, adv_B, 0.0)

    zeros_B = jnp.zeros(rewards_BT.shape[0], rewards_BT.dtype)
    _, adv_TB = lax.scan(
        step, (zeros_B, zeros_B), (rewards_BT.T, values_BT.T, valid_BT.T), reverse=True
    )
    advantages_BT = adv_TB.T
    returns_BT = jnp.where(valid_BT, advantages_BT + values_BT, 0.0)
    return advantages_BT, returns_BT


def discounted_returns(rewards_BT: jax.Array, mask_BT: jax.Array, *, gamma: float) -> jax.Array:
    """``G_t = r_t + gamma * G_{t'}`` over valid positions; GAE with ``V = 0, lam = 1``."""
    returns_BT, _ = gae(rewards_BT, jnp.zeros_like(rewards_BT), mask_BT, gamma=gamma, lam=1.0)
    return returns_BT


class GroupAux(NamedTuple):
    """Per-group reward statistics of group-relative advantages: ``mean_B``, ``std_B`` over the
    ``B`` groups, and the fraction of groups with zero spread (no learning signal)."""
    mean_B: jax.Array  # per-group mean reward
    std_B: jax.Array  # per-group reward standard deviation
    zero_std_fraction: jax.Array  # fraction of groups whose rewards are all equal


def group_relative_advantages(
    rewards_BG: jax.Array,
    *,
    scale_by_std: bool = True,
    ddof: int = 0,
    eps: float = 1e-6,
) -> tuple[jax.Array, GroupAux]:
    """GRPO outcome advantages (Shao et al., 2024, "DeepSeekMath", sec. 4.1.2):

        A_{b,i} = (r_{b,i} - mean_i r_{b,i}) / (std_i r_{b,i} + eps)

    over the ``G`` samples of each prompt ``b``. A group whose rewards are all equal has no
    learning signal: its advantages are exactly 0 (not rounding noise divided by eps).
    ``scale_by_std=False`` gives Dr. GRPO's unscaled ``r - mean`` (Liu et al., 2025).
    ``ddof=0`` is the population std of the paper; TRL's GRPOTrainer uses ``ddof=1``.
    """
    check_rank(rewards_BG, 2, "rewards_BG")
    check_floating(rewards_BG, "rewards_BG")
    if rewards_BG.shape[1] < 2:
        raise ValueError(f"rewards_BG needs a group of >= 2 samples per prompt, got {rewards_BG.shape}")
    mean_B = jnp.mean(rewards_BG, axis=1)
    std_B = jnp.std(rewards_BG, axis=1, ddof=ddof)
    constant_B = jnp.all(rewards_BG == rewards_BG[:, :1], axis=1)
    centered_BG = rewards_BG - mean_B[:, None]
    if scale_by_std:
        centered_BG = centered_BG / (std_B[:, None] + eps)
    advantages_BG = jnp.where(constant_B[:, None], 0.0, centered_BG)
    return advantages_BG, GroupAux(mean_B, std_B, jnp.mean(constant_B.astype(rewards_BG.dtype)))


def rloo_advantages(rewards_BG: jax.Array) -> jax.Array:
    """REINFORCE leave-one-out advantages (Ahmadian et al., 2024, eq. 7):

        A_{b,i} = r_{b,i} - 1/(G-1) sum_{j != i} r_{b,j} = G/(G-1) (r_{b,i} - mean_j r_{b,j})
    """
    check_rank(rewards_BG, 2, "rewards_BG")
    check_floating(rewards_BG, "rewards_BG")
    group = rewards_BG.shape[1]
    if group < 2:
        raise ValueError(f"RLOO needs >= 2 samples per prompt, rewards_BG has shape {rewards_BG.shape}")
    baseline_BG = (jnp.sum(rewards_BG, axis=1, keepdims=True) - rewards_BG) / (group - 1)
    return rewards_BG - baseline_BG

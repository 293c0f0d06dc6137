"""Process rewards in PPO: a process reward model (``rlhf-jax prm``) scores each reasoning step
of a rollout, and the score lands on the step's last token as a per-token reward, which GAE
credits to the step's earlier tokens (``kl.kl_shaped_rewards(step_rewards_BT=...)``; Lightman
et al., 2023; Wang et al., 2024, "Math-Shepherd", sec. 3.3).

A completion's steps are its lines: a step ends at each completion token whose text holds a
newline, and the last one at the completion's last token (its EOS when it stopped) -- where
``rlhf-jax prm`` read its labels (``data.formats.Steps``). The PRM reads the policy's own token
ids, so it must share the policy's tokenizer (a PRM trained from the SFT model does). The
reward at a step end is ``weight * (sigmoid(z) - 1/2)``, ``z`` the PRM's logit there: positive
for a step it judges right, negative for one it judges wrong; centred, so that writing more
steps is not rewarded for itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.models.pure_jit import pure_jit
from rlhf_jax.rl.multi_turn import token_ids_containing


def step_end_mask(ids_BT: jax.Array, action_mask_BT: jax.Array, newline_ids: jax.Array) -> jax.Array:
    """``[B, T]`` float, 1 at each step's last token: an action token whose id is one of
    ``newline_ids`` ``[K]``, and each row's last action token."""
    action_BT = action_mask_BT > 0
    newline_BT = jnp.isin(ids_BT, newline_ids) & action_BT
    last_BT = action_BT & ~jnp.pad(action_BT[:, 1:], ((0, 0), (0, 1)))
    return (newline_BT | last_BT).astype(jnp.float32)


def process_step_rewards(prm, ids_BT, mask_BT, action_mask_BT, newline_ids, weight) -> jax.Array:
    """``[B, T]``: ``weight * (sigmoid(z_t) - 1/2)`` at each step end (:func:`step_end_mask`), 0
    elsewhere; ``z_t`` the process reward model's logit at position ``t``."""
    logits_BT = prm(ids_BT, mask_BT)[..., 0]
    return weight * (jax.nn.sigmoid(logits_BT) - 0.5) * step_end_mask(ids_BT, action_mask_BT, newline_ids)


class ProcessReward:
    """The step rewards of rollouts under ``prm`` (a score model on the policy's tokenizer):
    ``reward(rollout) -> step_rewards_BT`` aligned with ``rollout.sequences()``."""

    def __init__(self, prm, tokenizer, weight: float = 1.0):
        self.prm, self.weight = prm, weight
        self.newline_ids = jnp.asarray(token_ids_containing(tokenizer, "\n", "a reasoning step's end"), jnp.int32)
        self._rewards = pure_jit(process_step_rewards)

    def __call__(self, rollout) -> jax.Array:
        ids_BT, mask_BT = rollout.sequences()
        return self._rewards(self.prm, ids_BT, mask_BT, rollout.action_mask(), self.newline_ids, self.weight)

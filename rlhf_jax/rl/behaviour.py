"""The behaviour policy: the training forward scores the sampled tokens under the distribution
they were drawn from, and the gap to the sampler's own numbers is measured and, optionally,
corrected.

Every online algorithm computes its old, new and reference log-probs with
:func:`policy_logprobs`, i.e. ``log softmax(filter(logits / T))`` at the sampled token
(``rollout.sampled_token_logprobs``), so the ratio ``pi / pi_old`` of the first minibatch is
1 for any temperature and top-k / top-p / min-p filter, and the KL to the reference is the KL
between the two *sampling* distributions (the same temperature and filters applied to the
reference's logits).

The sampler runs another program (a KV cache, one token at a time, possibly another dtype),
so its log-probs of the same tokens differ from the trainer's by rounding -- or by more, e.g.
bf16 sampling against fp32 training. :func:`logprob_gap` measures that per iteration, and
:func:`truncated_importance_weights` corrects for it (truncated importance sampling, Ionides,
2008; as used for sampler/trainer mismatch by Yao et al., 2025, "Your efficient RL framework
secretly brings you off-policy RL training")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.masked import masked_mean
from rlhf_jax.models.token_logprobs import next_token_logits, sequence_logprobs
from rlhf_jax.rollout.sampling import SamplingConfig, sampled_token_logprobs


def policy_logprobs(model, ids_BT: jax.Array, mask_BT: jax.Array, sampling: SamplingConfig, *,
                    start: int = 1) -> jax.Array:
    """``logp_BT``: each token's log-prob under ``model``'s sampling distribution for
    ``sampling`` (0 before ``start``, as ``models.sequence_logprobs``). With the model's own
    distribution (``T = 1``, no filter; or greedy) this is ``sequence_logprobs`` itself."""
    if sampling.is_model_distribution:
        return sequence_logprobs(model, ids_BT, mask_BT, start=start)
    logits_BNV = next_token_logits(model, ids_BT, mask_BT, start=start)
    return jnp.pad(sampled_token_logprobs(logits_BNV, ids_BT[:, start:], sampling), ((0, 0), (start, 0)))


def tempered_logits(logits_BNV: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """``logits / T`` (``T = 0``: the logits themselves), e.g. for the entropy bonus, which is
    the entropy of the tempered, unfiltered distribution."""
    return logits_BNV / sampling.temperature if sampling.temperature > 0 else logits_BNV


def logprob_gap(trainer_logp_BT: jax.Array, sampler_logp_BT: jax.Array, action_mask_BT: jax.Array) -> dict:
    """``{"logprob_gap_max", "logprob_gap_mean"}``: ``|trainer - sampler|`` log-probs of the
    sampled tokens over the actions, in nats."""
    gap_BT = jnp.abs(jax.lax.stop_gradient(trainer_logp_BT) - sampler_logp_BT)
    return {"logprob_gap_max": jnp.max(jnp.where(action_mask_BT > 0, gap_BT, 0.0)),
            "logprob_gap_mean": masked_mean(gap_BT, action_mask_BT)}


def truncated_importance_weights(trainer_logp_BT: jax.Array, sampler_logp_BT: jax.Array,
                                 cap: float | None) -> jax.Array | None:
    """``w_BT = min(pi_trainer / pi_sampler, cap)`` per token (a constant for the gradient),
    weighing each token's policy loss so the update estimates the gradient at the trainer's
    policy from tokens the sampler drew; ``None`` when ``cap`` is ``None`` (no correction)."""
    if cap is None:
        return None
    ratio_BT = jnp.exp(jax.lax.stop_gradient(trainer_logp_BT) - sampler_logp_BT)
    return jnp.minimum(ratio_BT, cap)

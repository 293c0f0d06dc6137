"""Pure loss functions on arrays. Each returns ``(loss, aux)`` with a typed ``NamedTuple``
aux, runs under ``jit``/``grad``/``vmap``/``pmap``/``shard_map``, and takes an optional
``axis_name`` so that under ``pmap``/``shard_map`` the loss equals the global-batch loss."""

from rlhf_jax.losses.policy_gradient import (
    EntropyAux,
    GRPOAux,
    PenaltyAux,
    PolicyAux,
    ReinforceAux,
    ValueAux,
    cispo_policy_loss,
    entropy_bonus,
    grpo_loss,
    ppo_penalty_loss,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_loss,
    sequence_log_ratio,
)
from rlhf_jax.losses.preference import (
    DPO_LOSS_TYPES,
    KTOAux,
    ORPOAux,
    PreferenceAux,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    simpo_loss,
)
from rlhf_jax.losses.reward import (ProcessRewardAux, RankingAux, RewardAux, bradley_terry_loss,
                                   process_reward_loss, ranking_loss)
from rlhf_jax.losses.sft import SFTAux, sequence_nll, sft_loss

__all__ = [
    "DPO_LOSS_TYPES",
    "EntropyAux",
    "GRPOAux",
    "KTOAux",
    "ORPOAux",
    "PenaltyAux",
    "PolicyAux",
    "PreferenceAux",
    "ProcessRewardAux",
    "RankingAux",
    "ReinforceAux",
    "RewardAux",
    "SFTAux",
    "ValueAux",
    "bradley_terry_loss",
    "cispo_policy_loss",
    "dpo_loss",
    "entropy_bonus",
    "grpo_loss",
    "kto_loss",
    "kto_reference_point",
    "orpo_loss",
    "ppo_penalty_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "process_reward_loss",
    "ranking_loss",
    "reinforce_loss",
    "sequence_log_ratio",
    "sequence_nll",
    "sft_loss",
    "simpo_loss",
]

"""Online RL on language models: PPO's experience and update, the critic-free
estimators (GRPO, RLOO, REINFORCE), TRPO; each update takes its algorithm's own config (the
YAML section) and an ``UpdateContext`` from the rest of the run."""

from rlhf_jax.rl.critic_free import (ESTIMATORS, AdvantageEstimator, CriticFreeConfig, GRPOConfig, GroupExperience,
                                     critic_free_loss, critic_free_update, make_group_experience, register_estimator,
                                     update_is_on_policy)
from rlhf_jax.rl.ppo import Experience, PPOConfig, explained_variance, make_experience, ppo_losses, ppo_update, token_values
from rlhf_jax.rl.trpo import TRPOConfig, trpo_update
from rlhf_jax.rl.update_config import ClippedUpdateConfig, UpdateContext

__all__ = ["ESTIMATORS", "AdvantageEstimator", "ClippedUpdateConfig", "CriticFreeConfig", "Experience", "GRPOConfig",
           "GroupExperience", "PPOConfig", "TRPOConfig", "UpdateContext", "critic_free_loss", "critic_free_update",
           "explained_variance", "make_experience", "make_group_experience", "ppo_losses", "ppo_update",
           "register_estimator", "token_values", "trpo_update", "update_is_on_policy"]

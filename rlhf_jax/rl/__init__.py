"""Online RL on language models: PPO's experience and update, the critic-free
estimators (GRPO, RLOO, REINFORCE), reward sources, and the online phase."""

from rlhf_jax.rl.critic_free import (ESTIMATORS, AdvantageEstimator, CriticFreeConfig, GroupExperience, critic_free_loss,
                                     critic_free_update, make_group_experience, register_estimator)
from rlhf_jax.rl.ppo import Experience, PPOConfig, explained_variance, make_experience, ppo_losses, ppo_update, token_values
from rlhf_jax.rl.trpo import TrustRegion, trpo_update

__all__ = ["ESTIMATORS", "AdvantageEstimator", "CriticFreeConfig", "Experience", "GroupExperience", "PPOConfig", "critic_free_loss", "critic_free_update", "explained_variance",
           "make_experience", "make_group_experience", "ppo_losses", "ppo_update", "register_estimator", "token_values", "TrustRegion",
           "trpo_update"]

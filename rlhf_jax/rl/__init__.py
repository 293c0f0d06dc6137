"""Online RL on language models (issue [E]): PPO's experience and update; more to come."""

from rlhf_jax.rl.ppo import Experience, PPOConfig, make_experience, ppo_losses, ppo_update, token_values

__all__ = ["Experience", "PPOConfig", "make_experience", "ppo_losses", "ppo_update", "token_values"]

"""rlhf_jax: a JAX-native RLHF library -- SFT, reward modelling, PPO and the DPO/GRPO family."""

__version__ = "0.1.0"

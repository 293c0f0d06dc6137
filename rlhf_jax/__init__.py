"""rlhf_jax: a JAX-native RLHF library -- SFT, reward modelling, PPO and the DPO/GRPO family."""

from rlhf_jax._xla_flags import add_default_xla_flags

add_default_xla_flags()

__version__ = "0.1.0"

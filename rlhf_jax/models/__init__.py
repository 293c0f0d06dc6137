"""Model zoo in flax.nnx with Hugging Face checkpoint interop (work in progress, issue [B]:
so far the Llama family -- Llama, Mistral, Qwen2 -- and loading from safetensors)."""

from rlhf_jax.models.config import SUPPORTED_MODEL_TYPES, DecoderConfig, decoder_config_from_hf
from rlhf_jax.models.hf import CheckpointError, from_pretrained
from rlhf_jax.models.llama import LlamaForCausalLM

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CheckpointError",
    "DecoderConfig",
    "LlamaForCausalLM",
    "decoder_config_from_hf",
    "from_pretrained",
]

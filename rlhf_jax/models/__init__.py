"""Model zoo in flax.nnx with Hugging Face checkpoint interop.

Decoders (GPT-2, Llama 2/3/3.1+, Mistral, Qwen2, Gemma 1/2) share one module,
:class:`~rlhf_jax.models.decoder.Decoder`, configured per family from ``config.json``;
BERT is the encoder for reward models. Heads: :class:`CausalLM` (with a KV cache),
:class:`ScoreModel` (reward model / critic). :func:`from_pretrained` / :func:`save_pretrained`
read and write transformers-compatible safetensors checkpoints.
"""

from rlhf_jax.models.bert import BertModel, BertScoreModel
from rlhf_jax.models.token_logprobs import next_token_logits, sequence_logprobs
from rlhf_jax.models.config import DecoderConfig, EncoderConfig
from rlhf_jax.models.families import Family, config_from_hf, register_family, supported_model_types
from rlhf_jax.models.decoder import Decoder, positions_from_mask
from rlhf_jax.models.kv_cache import KVCache, PagedKVCache
from rlhf_jax.models.heads import CausalLM, ScoreModel, last_token_index
from rlhf_jax.models.hf import CheckpointError, build_model, from_pretrained, save_pretrained
from rlhf_jax.models.lora import LoRALinear, apply_lora, merge_lora, trainable_filter, without_lora
from rlhf_jax.models.sharding import DEFAULT_RULES, logical_to_sharding

__all__ = [
    "DEFAULT_RULES",
    "BertModel",
    "BertScoreModel",
    "CausalLM",
    "CheckpointError",
    "Decoder",
    "DecoderConfig",
    "EncoderConfig",
    "Family",
    "KVCache",
    "PagedKVCache",
    "LoRALinear",
    "ScoreModel",
    "apply_lora",
    "build_model",
    "config_from_hf",
    "from_pretrained",
    "register_family",
    "supported_model_types",
    "last_token_index",
    "logical_to_sharding",
    "merge_lora",
    "without_lora",
    "positions_from_mask",
    "save_pretrained",
    "next_token_logits",
    "sequence_logprobs",
    "trainable_filter",
]

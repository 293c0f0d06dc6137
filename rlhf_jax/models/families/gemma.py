"""Gemma 1 (RMSNorm ``x (1 + w)``, scaled embeddings, GeGLU) and Gemma 2 (Gemma Team, 2024:
sandwich norms, logit soft-capping, a sliding window on the layers ``layer_types`` marks);
checkpoints name their tensors as Llama's do."""

from __future__ import annotations

from rlhf_jax.models.config import DecoderConfig, activation_name, attention_shape, rope_fields, shared_fields
from rlhf_jax.models.families import Family, llama, register_family


def config_from_hf(hf: dict) -> DecoderConfig:
    """A Gemma or Gemma 2 config.json as a :class:`DecoderConfig`."""
    gemma2 = hf["model_type"] == "gemma2"
    n = hf["num_hidden_layers"]
    extra: dict = {}
    if gemma2:
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)
        ]
        extra = dict(
            query_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
            attn_softcap=hf.get("attn_logit_softcapping"),
            final_softcap=hf.get("final_logit_softcapping"),
            post_norms=True,
            layer_windows=tuple(hf.get("sliding_window") if t == "sliding_attention" else None for t in layer_types),
        )
    activation = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh")
    return DecoderConfig(
        **shared_fields(hf),
        **attention_shape(hf),
        **rope_fields(hf),
        norm_eps=float(hf["rms_norm_eps"]),
        norm="rms_one_plus",
        activation=activation_name("gelu_pytorch_tanh" if activation == "gelu" else activation),
        qkv_bias=bool(hf.get("attention_bias", False)),
        out_bias=bool(hf.get("attention_bias", False)),
        embed_scale=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **({"layer_windows": (None,) * n} | extra),
    )


FAMILY = register_family(Family("gemma", {"gemma": "Gemma", "gemma2": "Gemma2"}, config_from_hf, llama.tensor_names))

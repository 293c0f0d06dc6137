"""Llama 2/3/3.1+ (Touvron et al., 2023), Mistral (one sliding window on every layer) and
Qwen2 (bias on q/k/v only): RMSNorm, rotary positions, SwiGLU, grouped-query attention."""

from __future__ import annotations

from rlhf_jax.models.config import DecoderConfig, activation_name, attention_shape, rope_fields, shared_fields
from rlhf_jax.models.families import Family, register_family
from rlhf_jax.models.hf_names import TensorName, decoder_heads, entries, linear_rows, norm_rows, under


def config_from_hf(hf: dict) -> DecoderConfig:
    """A Llama-family config.json as a :class:`DecoderConfig`. Raises ``ValueError`` for
    Qwen2's ``use_sliding_window`` (not supported)."""
    model_type = hf["model_type"]
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("Qwen2 with use_sliding_window=true is not supported; set it to false")
    window = hf.get("sliding_window") if model_type == "mistral" else None
    qkv_bias = bool(hf.get("attention_bias", model_type == "qwen2"))
    return DecoderConfig(
        **shared_fields(hf),
        **attention_shape(hf),
        **rope_fields(hf),
        norm_eps=float(hf["rms_norm_eps"]),
        activation=activation_name(hf.get("hidden_act", "silu")),
        qkv_bias=qkv_bias,
        out_bias=qkv_bias and model_type != "qwen2",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        layer_windows=(window,) * hf["num_hidden_layers"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _layer(c: DecoderConfig, i: int) -> list:
    h = f"layers.{i}."
    rows = norm_rows(h + "input_layernorm", "attn_norm", False)
    if c.post_norms:  # Gemma 2 calls its attention-output norm post_attention_layernorm
        rows += norm_rows(h + "post_attention_layernorm", "attn_out_norm", False)
        rows += norm_rows(h + "pre_feedforward_layernorm", "mlp_norm", False)
        rows += norm_rows(h + "post_feedforward_layernorm", "mlp_out_norm", False)
    else:
        rows += norm_rows(h + "post_attention_layernorm", "mlp_norm", False)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rows += linear_rows(f"{h}self_attn.{proj}", ("attn", proj), c.out_bias if proj == "o_proj" else c.qkv_bias)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rows += linear_rows(f"{h}mlp.{proj}", ("mlp", proj), c.mlp_bias)
    return under(("layers", i), rows)


def tensor_names(c: DecoderConfig, head: str) -> list[TensorName]:
    """The ``model.``-prefixed tensors of Llama-style checkpoints (Gemma's too) and the head's."""
    rows = [("embed_tokens.weight", (("embed_tokens", "embedding"),), False)] + norm_rows("norm", "norm", False)
    for i in range(c.num_layers):
        rows += _layer(c, i)
    return entries("model.", ("model",), rows) + decoder_heads(c.tie_word_embeddings, head)


FAMILY = register_family(Family("llama", {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}, config_from_hf,
                                tensor_names, gguf=True))

"""Decoder configs read from Hugging Face ``config.json`` files, one mapping per family."""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool = False  # bias on q/k/v (Qwen2)
    tie_word_embeddings: bool = False
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # llama3 scaling, as sorted items
    sliding_window: int | None = None  # Mistral: attend to at most this many previous tokens


def _rope_parameters(hf: dict) -> tuple[float, tuple | None]:
    """``(rope_theta, llama3 scaling items)`` from either the transformers 4 or 5 layout."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"rope scaling {rope_type!r} is not supported; supported: default, llama3")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, tuple((k, float(scaling[k])) for k in keys)


def decoder_config_from_hf(hf: dict) -> DecoderConfig:
    """Map a Hugging Face config dict of a supported decoder family to ``DecoderConfig``."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    heads = hf["num_attention_heads"]
    theta, scaling = _rope_parameters(hf)
    sliding = hf.get("sliding_window") if model_type == "mistral" else None
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("Qwen2 with use_sliding_window=true is not supported yet")
    return DecoderConfig(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=float(hf["rms_norm_eps"]),
        rope_theta=theta,
        attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_scaling=scaling,
        sliding_window=sliding,
    )

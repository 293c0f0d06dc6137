"""Model configs read from Hugging Face ``config.json`` dicts (the per-family mappings are in
:mod:`rlhf_jax.models.families`), and the field readers the families share.

Every decoder family maps onto one :class:`DecoderConfig`: the families differ only in a
handful of switches (norm kind, learned vs rotary positions, gated vs plain MLP, biases,
Gemma's embedding scale, soft-capping and per-layer sliding windows). The original HF dict
is kept (as JSON) so that :func:`rlhf_jax.models.save_pretrained` writes back every field
transformers needs, token ids included.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")


def _check_sizes(config) -> None:
    """``ValueError`` naming the first size field of a model config that is not an int >= 1."""
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim"):
        value = getattr(config, field, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{_HF_NAMES.get(field, field)}={value!r} must be an integer >= 1")


_HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads"}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Everything the shared :class:`~rlhf_jax.models.decoder.Decoder` needs to be one family (see
    the table in the README's Models section); built from a config.json by ``families.config_from_hf``."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    norm: str = "rms"  # "rms" (Llama), "rms_one_plus" (Gemma: x * (1 + w)), "layer" (GPT-2)
    activation: str = "silu"  # an HF activation name from ACTIVATIONS
    gated_mlp: bool = True  # down(act(gate(x)) * up(x)) vs down(act(up(x)))
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # llama3 scaling, as sorted items
    max_positions: int | None = None  # learned absolute positions (GPT-2); None: rotary
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    query_scale: float | None = None  # default 1/sqrt(head_dim); Gemma 2: query_pre_attn_scalar^-1/2
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: the same on the logits
    post_norms: bool = False  # Gemma 2: norms on the attention and MLP outputs too
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window length or None
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    context_length: int | None = None  # max_position_embeddings / n_positions: the longest sequence
    hf_json: str = "{}"  # the original config.json, for save_pretrained

    def __post_init__(self):
        _check_sizes(self)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads="
                             f"{self.num_kv_heads} (grouped-query attention shares each key/value head by a group)")
        if not self.norm_eps > 0:
            raise ValueError(f"the norm epsilon {self.norm_eps!r} must be > 0")

    @property
    def hf_config(self) -> dict:
        """The config.json fields this config was read from (written back on export)."""
        return json.loads(self.hf_json)

    @property
    def attention_scale(self) -> float:
        """The factor on ``q . k``: ``query_scale`` when set (Gemma 2: ``query_pre_attn_scalar^-1/2``), else
        ``head_dim^-1/2``."""
        return self.query_scale if self.query_scale is not None else 1 / math.sqrt(self.head_dim)

    @property
    def windowed(self) -> bool:
        """Whether any layer attends through a sliding window."""
        return any(w is not None for w in self.layer_windows)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """BERT (Devlin et al., 2019): post-norm encoder with learned absolute and token-type embeddings."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    type_vocab_size: int
    norm_eps: float
    activation: str = "gelu"
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        _check_sizes(self)
    context_length: int | None = None
    hf_json: str = "{}"

    @property
    def head_dim(self) -> int:
        """Features per attention head: ``hidden_size / num_heads``."""
        return self.hidden_size // self.num_heads

    @property
    def hf_config(self) -> dict:
        """The config.json fields this config was read from (written back on export)."""
        return json.loads(self.hf_json)


def activation_name(name: str | None) -> str:
    """``name`` when it is one of :data:`ACTIVATIONS`; else ``ValueError``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return name


def rope_fields(hf: dict) -> dict:
    """``rope_theta`` and llama3 scaling items from either the transformers 4 or 5 layout."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "default":
        return dict(rope_theta=theta)
    if rope_type != "llama3":
        raise ValueError(f"rope scaling {rope_type!r} is not supported; supported: default, llama3")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return dict(rope_theta=theta, rope_scaling=tuple((k, float(scaling[k])) for k in keys))


def shared_fields(hf: dict, layers_key: str = "num_hidden_layers") -> dict:
    """The fields every family reads alike: type, context, vocabulary, depth, pad id, init scale
    and the original dict."""
    return dict(
        model_type=hf["model_type"],
        context_length=hf.get("max_position_embeddings", hf.get("n_positions")),
        vocab_size=hf["vocab_size"],
        num_layers=hf[layers_key],
        pad_token_id=hf.get("pad_token_id"),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        hf_json=json.dumps(hf, sort_keys=True),
    )


def attention_shape(hf: dict) -> dict:
    """Widths and head counts in the Llama-style field names (``head_dim`` defaulted)."""
    heads = hf["num_attention_heads"]
    return dict(
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
    )

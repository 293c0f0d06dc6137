"""Model configs read from Hugging Face ``config.json`` dicts, one small mapping per family.

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

DECODER_MODEL_TYPES: tuple[str, ...] = ("gemma", "gemma2", "gpt2", "llama", "mistral", "qwen2")
ENCODER_MODEL_TYPES: tuple[str, ...] = ("bert",)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(DECODER_MODEL_TYPES + ENCODER_MODEL_TYPES))
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
    the table in the README's Models section); built from a config.json by ``config_from_hf``."""
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


def _activation(name: str | None) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return name


def _rope(hf: dict) -> dict:
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


def _shared(hf: dict, layers_key: str = "num_hidden_layers") -> dict:
    return dict(
        model_type=hf["model_type"],
        context_length=hf.get("max_position_embeddings", hf.get("n_positions")),
        vocab_size=hf["vocab_size"],
        num_layers=hf[layers_key],
        pad_token_id=hf.get("pad_token_id"),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        hf_json=json.dumps(hf, sort_keys=True),
    )


def _attention_shape(hf: dict) -> dict:
    heads = hf["num_attention_heads"]
    return dict(
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
    )


def _llama(hf: dict) -> DecoderConfig:
    """Llama 2/3/3.1+, Mistral (one window on every layer) and Qwen2 (bias on q/k/v only)."""
    model_type = hf["model_type"]
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("Qwen2 with use_sliding_window=true is not supported; set it to false")
    window = hf.get("sliding_window") if model_type == "mistral" else None
    qkv_bias = bool(hf.get("attention_bias", model_type == "qwen2"))
    return DecoderConfig(
        **_shared(hf),
        **_attention_shape(hf),
        **_rope(hf),
        norm_eps=float(hf["rms_norm_eps"]),
        activation=_activation(hf.get("hidden_act", "silu")),
        qkv_bias=qkv_bias,
        out_bias=qkv_bias and model_type != "qwen2",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        layer_windows=(window,) * hf["num_hidden_layers"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _gemma(hf: dict) -> DecoderConfig:
    """Gemma 1 (RMSNorm x(1+w), scaled embeddings, GeGLU) and Gemma 2 (+ sandwich norms,
    soft-capping, sliding window on the layers ``layer_types`` marks)."""
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
        **_shared(hf),
        **_attention_shape(hf),
        **_rope(hf),
        norm_eps=float(hf["rms_norm_eps"]),
        norm="rms_one_plus",
        activation=_activation("gelu_pytorch_tanh" if activation == "gelu" else activation),
        qkv_bias=bool(hf.get("attention_bias", False)),
        out_bias=bool(hf.get("attention_bias", False)),
        embed_scale=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **({"layer_windows": (None,) * n} | extra),
    )


def _gpt2(hf: dict) -> DecoderConfig:
    """GPT-2 (Radford et al., 2019): LayerNorm, learned positions, fused qkv, plain GELU MLP."""
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("GPT-2 with scale_attn_by_inverse_layer_idx=true is not supported")
    d, heads = hf["n_embd"], hf["n_head"]
    return DecoderConfig(
        **_shared(hf, layers_key="n_layer"),
        hidden_size=d,
        intermediate_size=hf.get("n_inner") or 4 * d,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        norm="layer",
        activation=_activation(hf.get("activation_function", "gelu_new")),
        gated_mlp=False,
        max_positions=hf["n_positions"],
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        layer_windows=(None,) * hf["n_layer"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _bert(hf: dict) -> EncoderConfig:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("BERT with relative position embeddings is not supported; supported: absolute")
    return EncoderConfig(
        **_shared(hf),
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        max_positions=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        activation=_activation(hf.get("hidden_act", "gelu")),
    )


_FAMILIES = {"gemma": _gemma, "gemma2": _gemma, "gpt2": _gpt2, "llama": _llama, "mistral": _llama,
             "qwen2": _llama, "bert": _bert}


def check_init_fields(init: dict) -> None:
    """``ValueError`` naming the first key of ``init`` (config.json fields of a fresh model) that
    the transformers config of its ``model_type`` does not know, with the closest valid key --
    a misspelt ``hiden_size`` would otherwise be ignored and the default taken."""
    import difflib

    import transformers

    model_type = init.get("model_type")
    if model_type not in _FAMILIES:
        raise ValueError(f"init.model_type={model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    reference = transformers.AutoConfig.for_model(model_type)
    known = set(reference.to_dict()) | set(getattr(reference, "attribute_map", {})) | {"vocab_size"}
    for key in init:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ValueError(f"init.{key} is not a {model_type} config.json field"
                             + (f"; did you mean {close[0]!r}?" if close else ""))
    try:  # the values: sizes, head grouping, epsilon (vocab_size comes from the tokenizer when absent)
        config_from_hf({"vocab_size": 2, **init})
    except ValueError as error:
        raise ValueError(f"init: {error}") from None


def config_from_hf(hf: dict) -> DecoderConfig | EncoderConfig:
    """Map a Hugging Face config dict to this library's config; the family comes from ``model_type``."""
    model_type = hf.get("model_type")
    if model_type not in _FAMILIES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        return _FAMILIES[model_type](hf)
    except KeyError as missing:
        raise ValueError(f"{model_type} config.json lacks the field {missing}") from None
    except (TypeError, ZeroDivisionError) as error:  # a size that is not a positive number
        raise ValueError(f"{model_type} config: the sizes (hidden_size, num_attention_heads, ...) must be positive "
                         f"integers ({error})") from None

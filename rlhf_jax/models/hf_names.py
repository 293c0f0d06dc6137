"""Hugging Face tensor names <-> attribute paths in this library's models, per family.

Torch ``nn.Linear`` stores weights ``[out, in]`` and flax ``[in, out]`` (``transpose``);
GPT-2's ``Conv1D`` already stores ``[in, out]`` and fuses q, k and v into one ``c_attn``
tensor, which maps to several paths (split evenly on the last flax axis).
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.models.config import DecoderConfig, EncoderConfig

HEADS = ("lm", "score", "base")


@dataclasses.dataclass(frozen=True)
class TensorName:
    """One checkpoint tensor and the attribute path(s) it fills in our model."""
    hf: str  # full name in a checkpoint of the head's class, base-model prefix included
    paths: tuple[tuple, ...]  # attribute paths in our model; several = concatenated on the last axis
    transpose: bool
    prefix: str = ""  # the base-model prefix, absent from checkpoints saved from the base model


def _entries(prefix: str, ours: tuple, table: list[tuple[str, tuple, bool]]) -> list[TensorName]:
    return [TensorName(prefix + hf, tuple(ours + p for p in paths), t, prefix) for hf, paths, t in table]


def _linear(hf: str, ours: tuple, bias: bool, transpose: bool = True) -> list:
    rows = [(f"{hf}.weight", (ours + ("kernel",),), transpose)]
    return rows + ([(f"{hf}.bias", (ours + ("bias",),), False)] if bias else [])


def _norm(hf: str, ours: str, with_bias: bool) -> list:
    rows = [(f"{hf}.weight", ((ours, "scale"),), False)]
    return rows + ([(f"{hf}.bias", ((ours, "bias"),), False)] if with_bias else [])


def _llama_layer(c: DecoderConfig, i: int) -> list:
    h, ours = f"layers.{i}.", ("layers", i)
    rows = _norm(h + "input_layernorm", "attn_norm", False)
    if c.post_norms:  # Gemma 2 calls its attention-output norm post_attention_layernorm
        rows += _norm(h + "post_attention_layernorm", "attn_out_norm", False)
        rows += _norm(h + "pre_feedforward_layernorm", "mlp_norm", False)
        rows += _norm(h + "post_feedforward_layernorm", "mlp_out_norm", False)
    else:
        rows += _norm(h + "post_attention_layernorm", "mlp_norm", False)
    rows = [(n, tuple(ours + p for p in paths), t) for n, paths, t in rows]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rows += _linear(f"{h}self_attn.{proj}", ours + ("attn", proj), c.out_bias if proj == "o_proj" else c.qkv_bias)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rows += _linear(f"{h}mlp.{proj}", ours + ("mlp", proj), c.mlp_bias)
    return rows


def _gpt2_layer(c: DecoderConfig, i: int) -> list:
    h, ours = f"h.{i}.", ("layers", i)
    qkv = tuple(ours + ("attn", p) for p in ("q_proj", "k_proj", "v_proj"))
    rows = [(n, tuple(ours + p for p in paths), t) for n, paths, t in
            _norm(h + "ln_1", "attn_norm", True) + _norm(h + "ln_2", "mlp_norm", True)]
    rows += [(f"{h}attn.c_attn.weight", tuple(p + ("kernel",) for p in qkv), False),
             (f"{h}attn.c_attn.bias", tuple(p + ("bias",) for p in qkv), False)]
    rows += _linear(f"{h}attn.c_proj", ours + ("attn", "o_proj"), True, transpose=False)
    rows += _linear(f"{h}mlp.c_fc", ours + ("mlp", "up_proj"), True, transpose=False)
    rows += _linear(f"{h}mlp.c_proj", ours + ("mlp", "down_proj"), True, transpose=False)
    return rows


def decoder_names(c: DecoderConfig, head: str) -> list[TensorName]:
    """Names for :class:`~rlhf_jax.models.heads.CausalLM` (``head="lm"``) or
    :class:`~rlhf_jax.models.heads.ScoreModel` (``head="score"``)."""
    if c.model_type == "gpt2":
        prefix = "transformer."
        rows = [("wte.weight", (("embed_tokens", "embedding"),), False),
                ("wpe.weight", (("embed_positions", "embedding"),), False)]
        rows += _norm("ln_f", "norm", True)
        layer = _gpt2_layer
    else:
        prefix = "model."
        rows = [("embed_tokens.weight", (("embed_tokens", "embedding"),), False)]
        rows += _norm("norm", "norm", False)
        layer = _llama_layer
    for i in range(c.num_layers):
        rows += layer(c, i)
    names = _entries(prefix, ("model",), rows)
    if head == "lm" and not c.tie_word_embeddings:
        names += _entries("", (), _linear("lm_head", ("lm_head",), False))
    if head == "score":
        names += _entries("", (), _linear("score", ("score",), False))
    return names


def encoder_names(c: EncoderConfig, head: str) -> list[TensorName]:
    """Names for :class:`~rlhf_jax.models.bert.BertModel` (``head="base"``, saved without a
    prefix) or :class:`~rlhf_jax.models.bert.BertScoreModel` (``head="score"``)."""
    rows = [(f"embeddings.{n}.weight", ((n, "embedding"),), False)
            for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    rows += _norm("embeddings.LayerNorm", "embed_norm", True)
    for i in range(c.num_layers):
        h, ours = f"encoder.layer.{i}.", ("layers", i)
        layer = [
            *_linear(h + "attention.self.query", ("q_proj",), True),
            *_linear(h + "attention.self.key", ("k_proj",), True),
            *_linear(h + "attention.self.value", ("v_proj",), True),
            *_linear(h + "attention.output.dense", ("o_proj",), True),
            *_norm(h + "attention.output.LayerNorm", "attn_norm", True),
            *_linear(h + "intermediate.dense", ("up_proj",), True),
            *_linear(h + "output.dense", ("down_proj",), True),
            *_norm(h + "output.LayerNorm", "mlp_norm", True),
        ]
        rows += [(n, tuple(ours + p for p in paths), t) for n, paths, t in layer]
    rows += _linear("pooler.dense", ("pooler",), True)
    if head == "base":
        return _entries("", (), rows)
    return _entries("bert.", ("model",), rows) + _entries("", (), _linear("classifier", ("classifier",), True))

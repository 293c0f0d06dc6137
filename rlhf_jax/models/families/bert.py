"""BERT (Devlin et al., 2019), the encoder of reward models: post-norm, learned absolute and
token-type embeddings, a pooler; loaded as the bare encoder (``base``) or with a score head."""

from __future__ import annotations

from rlhf_jax.models.config import EncoderConfig, activation_name, shared_fields
from rlhf_jax.models.families import Family, register_family
from rlhf_jax.models.hf_names import TensorName, entries, linear_rows, norm_rows, under


def config_from_hf(hf: dict) -> EncoderConfig:
    """A BERT config.json as an :class:`EncoderConfig`. Raises ``ValueError`` for relative
    position embeddings (not supported)."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("BERT with relative position embeddings is not supported; supported: absolute")
    return EncoderConfig(
        **shared_fields(hf),
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        max_positions=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        activation=activation_name(hf.get("hidden_act", "gelu")),
    )


def tensor_names(c: EncoderConfig, head: str) -> list[TensorName]:
    """:class:`~rlhf_jax.models.bert.BertModel`'s tensors (``base``, saved without a prefix) or
    :class:`~rlhf_jax.models.bert.BertScoreModel`'s (``score``: under ``bert.``, plus the
    classifier)."""
    rows = [(f"embeddings.{n}.weight", ((n, "embedding"),), False)
            for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    rows += norm_rows("embeddings.LayerNorm", "embed_norm", True)
    for i in range(c.num_layers):
        h = f"encoder.layer.{i}."
        rows += under(("layers", i), [
            *linear_rows(h + "attention.self.query", ("q_proj",), True),
            *linear_rows(h + "attention.self.key", ("k_proj",), True),
            *linear_rows(h + "attention.self.value", ("v_proj",), True),
            *linear_rows(h + "attention.output.dense", ("o_proj",), True),
            *norm_rows(h + "attention.output.LayerNorm", "attn_norm", True),
            *linear_rows(h + "intermediate.dense", ("up_proj",), True),
            *linear_rows(h + "output.dense", ("down_proj",), True),
            *norm_rows(h + "output.LayerNorm", "mlp_norm", True),
        ])
    rows += linear_rows("pooler.dense", ("pooler",), True)
    if head == "base":
        return entries("", (), rows)
    return entries("bert.", ("model",), rows) + entries("", (), linear_rows("classifier", ("classifier",), True))


FAMILY = register_family(Family("bert", {"bert": "Bert"}, config_from_hf, tensor_names, heads=("base", "score")))

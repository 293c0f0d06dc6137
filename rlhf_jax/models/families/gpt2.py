"""GPT-2 (Radford et al., 2019): LayerNorm, learned positions, fused q/k/v in ``Conv1D``
layers (stored ``[in, out]``), a plain GELU MLP."""

from __future__ import annotations

from rlhf_jax.models.config import DecoderConfig, activation_name, shared_fields
from rlhf_jax.models.families import Family, register_family
from rlhf_jax.models.hf_names import TensorName, decoder_heads, entries, linear_rows, norm_rows, under


def config_from_hf(hf: dict) -> DecoderConfig:
    """A GPT-2 config.json as a :class:`DecoderConfig`. Raises ``ValueError`` for
    ``scale_attn_by_inverse_layer_idx`` (not supported)."""
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("GPT-2 with scale_attn_by_inverse_layer_idx=true is not supported")
    d, heads = hf["n_embd"], hf["n_head"]
    return DecoderConfig(
        **shared_fields(hf, layers_key="n_layer"),
        hidden_size=d,
        intermediate_size=hf.get("n_inner") or 4 * d,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        norm="layer",
        activation=activation_name(hf.get("activation_function", "gelu_new")),
        gated_mlp=False,
        max_positions=hf["n_positions"],
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        layer_windows=(None,) * hf["n_layer"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _layer(i: int) -> list:
    h = f"h.{i}."
    qkv = tuple(("attn", p) for p in ("q_proj", "k_proj", "v_proj"))
    rows = norm_rows(h + "ln_1", "attn_norm", True) + norm_rows(h + "ln_2", "mlp_norm", True)
    rows += [(f"{h}attn.c_attn.weight", tuple(p + ("kernel",) for p in qkv), False),
             (f"{h}attn.c_attn.bias", tuple(p + ("bias",) for p in qkv), False)]
    rows += linear_rows(f"{h}attn.c_proj", ("attn", "o_proj"), True, transpose=False)
    rows += linear_rows(f"{h}mlp.c_fc", ("mlp", "up_proj"), True, transpose=False)
    rows += linear_rows(f"{h}mlp.c_proj", ("mlp", "down_proj"), True, transpose=False)
    return under(("layers", i), rows)


def tensor_names(c: DecoderConfig, head: str) -> list[TensorName]:
    """The ``transformer.``-prefixed tensors of GPT-2 checkpoints and the head's."""
    rows = [("wte.weight", (("embed_tokens", "embedding"),), False),
            ("wpe.weight", (("embed_positions", "embedding"),), False)] + norm_rows("ln_f", "norm", True)
    for i in range(c.num_layers):
        rows += _layer(i)
    return entries("transformer.", ("model",), rows) + decoder_heads(c.tie_word_embeddings, head)


FAMILY = register_family(Family("gpt2", {"gpt2": "GPT2"}, config_from_hf, tensor_names,
                                causal_lm_class="GPT2LMHeadModel"))

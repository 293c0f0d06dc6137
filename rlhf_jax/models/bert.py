"""BERT (Devlin et al., 2019), the encoder family for reward models: learned absolute,
token-type and word embeddings -> LayerNorm, then post-norm blocks
``x = LN(x + attn(x))``, ``x = LN(x + mlp(x))`` with bidirectional attention over the real
tokens; a tanh pooler on the first ([CLS]) token. Positions are ``0..T-1`` as in
transformers: BERT inputs are right-padded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import EncoderConfig
from rlhf_jax.models.layers import ACTIVATION_FNS, Norm, attend, embedding, linear


class EncoderLayer(nnx.Module):
    """One post-norm BERT layer (Devlin et al., 2019): ``x = norm(x + attn(x))``, ``x = norm(x +
    mlp(x))``, attention both ways over the real tokens."""
    def __init__(self, config: EncoderConfig, *, rngs, dtype, param_dtype):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, bias=True, std=config.initializer_range)
        self.q_proj = linear(d, d, ("embed", "heads"), **kw)
        self.k_proj = linear(d, d, ("embed", "heads"), **kw)
        self.v_proj = linear(d, d, ("embed", "heads"), **kw)
        self.o_proj = linear(d, d, ("heads", "embed"), **kw)
        self.attn_norm = Norm(d, "layer", config.norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.up_proj = linear(d, f, ("embed", "mlp"), **kw)
        self.down_proj = linear(f, d, ("mlp", "embed"), **kw)
        self.mlp_norm = Norm(d, "layer", config.norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.config = config

    def __call__(self, x_BTD, allowed_BTS):
        c = self.config
        B, T, _ = x_BTD.shape
        q_BTHD, k_BTHD, v_BTHD = (p(x_BTD).reshape(B, T, c.num_heads, c.head_dim)
                                  for p in (self.q_proj, self.k_proj, self.v_proj))
        a_BTHD = attend(q_BTHD, k_BTHD.transpose(0, 2, 1, 3), v_BTHD.transpose(0, 2, 1, 3), allowed_BTS,
                        scale=c.head_dim**-0.5)
        x_BTD = self.attn_norm(x_BTD + self.o_proj(a_BTHD.reshape(B, T, -1)))
        m_BTD = self.down_proj(ACTIVATION_FNS[c.activation](self.up_proj(x_BTD)))
        return self.mlp_norm(x_BTD + m_BTD)


class BertModel(nnx.Module):
    """``model(ids_BT, mask_BT, token_type_ids_BT=None) -> hidden states [B, T, D]``;
    :meth:`pooled` gives ``tanh(W h_cls + b)``."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        with nnx.use_eager_sharding(False):
            d = config.hidden_size
            kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=config.initializer_range)
            self.config = config
            self.word_embeddings = embedding(config.vocab_size, d, ("vocab", "embed"), **kw)
            self.position_embeddings = embedding(config.max_positions, d, (None, "embed"), **kw)
            self.token_type_embeddings = embedding(config.type_vocab_size, d, (None, "embed"), **kw)
            self.embed_norm = Norm(d, "layer", config.norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.layers = nnx.List(
                [EncoderLayer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype) for _ in range(config.num_layers)]
            )
            self.pooler = linear(d, d, ("embed", "embed"), bias=True, **kw)

    def __call__(self, input_ids_BT, attention_mask_BT, token_type_ids_BT=None) -> jax.Array:
        T = input_ids_BT.shape[1]
        if token_type_ids_BT is None:
            token_type_ids_BT = jnp.zeros_like(input_ids_BT)
        x_BTD = (self.word_embeddings(input_ids_BT) + self.position_embeddings(jnp.arange(T))[None]
                 + self.token_type_embeddings(token_type_ids_BT))
        x_BTD = self.embed_norm(x_BTD)
        allowed_BTS = jnp.broadcast_to(attention_mask_BT.astype(bool)[:, None, :], (x_BTD.shape[0], T, T))
        for layer in self.layers:
            x_BTD = layer(x_BTD, allowed_BTS)
        return x_BTD

    def pooled(self, input_ids_BT, attention_mask_BT, token_type_ids_BT=None) -> jax.Array:
        """The [CLS] hidden state through the pooler's dense + tanh: ``[B, D]``, as transformers'
        ``BertPooler``."""
        h_BTD = self(input_ids_BT, attention_mask_BT, token_type_ids_BT)
        return jnp.tanh(self.pooler(h_BTD[:, 0]))


class BertScoreModel(nnx.Module):
    """``BertForSequenceClassification``'s layout: ``classifier(pooled)`` with bias, ``[B, L]``."""

    def __init__(self, config: EncoderConfig, num_labels: int = 1, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        with nnx.use_eager_sharding(False):
            self.config, self.num_labels = config, num_labels
            self.model = BertModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            self.classifier = linear(config.hidden_size, num_labels, ("embed", None), rngs=rngs, dtype=dtype,
                                     param_dtype=param_dtype, bias=True, std=config.initializer_range)

    def sequence_scores(self, input_ids_BT, attention_mask_BT, token_type_ids_BT=None) -> jax.Array:
        """Scores ``[B, L]`` of ``input_ids_BT`` (``[CLS] ... [SEP]`` rows) from the pooled [CLS],
        as ``BertForSequenceClassification``."""
        return self.classifier(self.model.pooled(input_ids_BT, attention_mask_BT, token_type_ids_BT))

"""The Llama decoder family in flax.nnx: Llama 2/3/3.1+, Mistral and Qwen2.

Pre-norm transformer blocks (Touvron et al., 2023): RMSNorm -> grouped-query attention
with rotary position embeddings (Su et al., 2021) -> residual, RMSNorm -> SwiGLU MLP
(Shazeer, 2020) -> residual. Qwen2 adds a bias to q/k/v; Mistral limits attention to a
sliding window. Parameter names follow the Hugging Face checkpoint names one to one.

Positions come from the attention mask (``cumsum(mask) - 1``), so left-padded batches give
the same logits on their real tokens as the unpadded sequences.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import DecoderConfig


def rope_inverse_frequencies(config: DecoderConfig) -> jax.Array:
    """``theta^(-2i/d)`` for ``i < d/2``, rescaled by Llama 3.1's rule when configured:
    long wavelengths (> original context / low_freq_factor) are divided by ``factor``,
    short ones (< original context / high_freq_factor) kept, and the band between
    interpolated linearly in ``original context / wavelength``."""
    dim = config.head_dim
    inv_freq_F = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if config.rope_scaling is None:
        return inv_freq_F
    s = dict(config.rope_scaling)
    context = s["original_max_position_embeddings"]
    wavelength_F = 2 * math.pi / inv_freq_F
    smooth_F = (context / wavelength_F - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smooth_F = jnp.clip(smooth_F, 0.0, 1.0)
    return (1 - smooth_F) * inv_freq_F / s["factor"] + smooth_F * inv_freq_F


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, inv_freq_F: jax.Array) -> jax.Array:
    """Rotate feature pairs ``(i, i + d/2)`` by ``position * inv_freq_i`` (HF's half layout)."""
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq_F
    cos_BT1F, sin_BT1F = jnp.cos(angles_BTF)[:, :, None], jnp.sin(angles_BTF)[:, :, None]
    first, second = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos_BT1F - second * sin_BT1F, second * cos_BT1F + first * sin_BT1F], -1)
    return rotated.astype(x_BTHD.dtype)


def positions_from_mask(attention_mask_BT: jax.Array) -> jax.Array:
    """``cumsum(mask) - 1`` floored at 0: real tokens count 0, 1, 2, ... after left padding."""
    return jnp.maximum(jnp.cumsum(attention_mask_BT, axis=1) - 1, 0)


def _linear(d_in, d_out, names, rngs, dtype, param_dtype, bias=False):
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]),
        rngs=rngs,
    )


def _rms_norm(config, rngs, dtype, param_dtype):
    return nnx.RMSNorm(
        config.hidden_size,
        epsilon=config.rms_norm_eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
        rngs=rngs,
    )


class Attention(nnx.Module):
    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = _linear(d, h * hd, ("embed", "heads"), rngs, dtype, param_dtype, bias)
        self.k_proj = _linear(d, kv * hd, ("embed", "kv"), rngs, dtype, param_dtype, bias)
        self.v_proj = _linear(d, kv * hd, ("embed", "kv"), rngs, dtype, param_dtype, bias)
        self.o_proj = _linear(h * hd, d, ("heads", "embed"), rngs, dtype, param_dtype)
        self.config = config

    def __call__(self, x_BTD, positions_BT, attend_BTS, inv_freq_F):
        c = self.config
        B, T, _ = x_BTD.shape
        q_BTHD = apply_rope(self.q_proj(x_BTD).reshape(B, T, c.num_heads, c.head_dim), positions_BT, inv_freq_F)
        k_BSKD = apply_rope(self.k_proj(x_BTD).reshape(B, T, c.num_kv_heads, c.head_dim), positions_BT, inv_freq_F)
        v_BSKD = self.v_proj(x_BTD).reshape(B, T, c.num_kv_heads, c.head_dim)
        groups = c.num_heads // c.num_kv_heads
        q_BTKGD = q_BTHD.reshape(B, T, c.num_kv_heads, groups, c.head_dim)
        scores_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD).astype(jnp.float32)
        scores_BKGTS = scores_BKGTS / math.sqrt(c.head_dim)
        scores_BKGTS = jnp.where(attend_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
        probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKD.dtype)
        out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS, v_BSKD)
        return self.o_proj(out_BTKGD.reshape(B, T, c.num_heads * c.head_dim))


class MLP(nnx.Module):
    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = _linear(d, f, ("embed", "mlp"), rngs, dtype, param_dtype)
        self.up_proj = _linear(d, f, ("embed", "mlp"), rngs, dtype, param_dtype)
        self.down_proj = _linear(f, d, ("mlp", "embed"), rngs, dtype, param_dtype)

    def __call__(self, x_BTD):
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class Block(nnx.Module):
    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.input_layernorm = _rms_norm(config, rngs, dtype, param_dtype)
        self.self_attn = Attention(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_attention_layernorm = _rms_norm(config, rngs, dtype, param_dtype)
        self.mlp = MLP(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x_BTD, positions_BT, attend_BTS, inv_freq_F):
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), positions_BT, attend_BTS, inv_freq_F)
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))


class LlamaForCausalLM(nnx.Module):
    """``model(input_ids_BT, attention_mask_BT) -> logits_BTV`` (or hidden states)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        # Parameters carry logical axis names (vocab, embed, heads, kv, mlp) for sharding rules;
        # with eager sharding off they are not taken for mesh axes at construction.
        with nnx.use_eager_sharding(False):
            self._build(config, rngs, dtype, param_dtype)

    def _build(self, config, rngs, dtype, param_dtype):
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [Block(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype) for _ in range(config.num_layers)]
        )
        self.norm = _rms_norm(config, rngs, dtype, param_dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else _linear(config.hidden_size, config.vocab_size, ("embed", "vocab"), rngs, dtype, param_dtype)
        )

    def hidden_states(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array) -> jax.Array:
        """Final-norm hidden states ``[B, T, D]``."""
        T = input_ids_BT.shape[1]
        positions_BT = positions_from_mask(attention_mask_BT)
        causal_TS = jnp.tril(jnp.ones((T, T), bool))
        if self.config.sliding_window is not None:
            causal_TS &= ~jnp.tril(jnp.ones((T, T), bool), k=-self.config.sliding_window)
        attend_BTS = causal_TS[None] & attention_mask_BT.astype(bool)[:, None, :]
        inv_freq_F = rope_inverse_frequencies(self.config)
        x_BTD = self.embed_tokens(input_ids_BT)
        for block in self.layers:
            x_BTD = block(x_BTD, positions_BT, attend_BTS, inv_freq_F)
        return self.norm(x_BTD)

    def __call__(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array) -> jax.Array:
        h_BTD = self.hidden_states(input_ids_BT, attention_mask_BT)
        if self.lm_head is None:
            return self.embed_tokens.attend(h_BTD)
        return self.lm_head(h_BTD)

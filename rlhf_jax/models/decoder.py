"""One pre-norm decoder for every supported causal-LM family, with a functional KV cache.

Block (Radford et al., 2019; Touvron et al., 2023): ``x += attn(norm(x))``, ``x += mlp(norm(x))``
-- with Gemma 2's extra norms on both outputs (Gemma Team, 2024). Attention is grouped-query
with rotary position embeddings (Su et al., 2021), or learned absolute positions (GPT-2);
the MLP is gated (SwiGLU / GeGLU, Shazeer, 2020) or plain. :class:`DecoderConfig` switches
between families; nothing family-specific lives in the modules.

Positions come from the attention mask (``cumsum(mask) - 1``), so left-padded prompts give
the same logits on their real tokens as the unpadded sequences. The KV cache holds
fixed-size buffers ``[L, B, K, S, D]``: :meth:`Decoder.extend` writes ``T`` new
tokens at slot ``length`` and attends over every filled slot -- prefill and single-token
decode are the same computation, and the no-cache forward is ``extend`` on an empty cache
the size of the input. :meth:`Decoder.decode_paged` runs one token per decode slot against a
paged cache (``models.kv_cache``), the continuous-batching engine's layout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.models.kv_cache import DenseWrite, KVCache, PagedKVCache, PageWrite
from rlhf_jax.models.attention import KERNELS, attention_kernel, reads_segments
from rlhf_jax.models.layers import ACTIVATION_FNS, Norm, embedding, linear
from rlhf_jax.models.sharding import constrain
from rlhf_jax.models.splash import splash_segments


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


# model.remat: what each block's forward keeps for the backward pass (``jax.checkpoint_policies``);
# the rest is recomputed one block at a time in the backward pass
REMAT_POLICIES = {
    "none": None,  # no recomputation: every activation kept
    "block": jax.checkpoint_policies.nothing_saveable,  # each block's input only
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the projections' outputs too
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),  # those, in host memory
}


def remat_policy(remat: bool | str) -> str:
    """The :data:`REMAT_POLICIES` name of ``remat``: ``True`` is ``block``, ``False`` ``none``.
    Raises ``ValueError`` for another name."""
    name = ("block" if remat else "none") if isinstance(remat, bool) else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"model.remat={remat!r}; choose one of {', '.join(REMAT_POLICIES)} (or true / false)")
    return name


def positions_from_mask(attention_mask_BT: jax.Array) -> jax.Array:
    """``cumsum(mask) - 1`` floored at 0: real tokens count 0, 1, 2, ... after left padding."""
    return jnp.maximum(jnp.cumsum(attention_mask_BT, axis=1) - 1, 0)


def visibility(attention_mask_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """``visible_BTT[b, t, s]``: token ``t`` attends to token ``s`` iff ``s <= t``, ``s`` is real,
    and -- with ``segment_ids_BT`` -- ``s`` is in ``t``'s segment or in segment 0.

    Segment ids describe two layouts with one rule. Packed rows (SFT): examples 1, 2, ... and
    padding 0 (not real), so no token sees another example. Shared-prompt rows (prefix sharing,
    Wang et al., 2024): the prompt is segment 0, its responses 1, 2, ... follow it, and each
    response sees the prompt and itself but no other response."""
    T = attention_mask_BT.shape[1]
    causal_TT = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    visible_BTT = causal_TT[None] & attention_mask_BT.astype(bool)[:, None, :]
    if segment_ids_BT is not None:
        key_BTT = segment_ids_BT[:, None, :]
        visible_BTT &= (key_BTT == segment_ids_BT[:, :, None]) | (key_BTT == 0)
    return visible_BTT


def positions_from_visibility(visible_BTT: jax.Array) -> jax.Array:
    """A token's position is the number of earlier tokens it sees: ``sum_s visible[t, s] - 1``
    (floored at 0). Packed examples count from 0 each; a shared prompt's responses each
    continue from the prompt's end, as if each followed it alone."""
    return jnp.maximum(visible_BTT.sum(-1, dtype=jnp.int32) - 1, 0)


class Attention(nnx.Module):
    """Grouped-query attention (Ainslie et al., 2023) with rotary positions when the family has
    them; reads and writes one layer's KV buffers."""
    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=config.initializer_range)
        self.q_proj = linear(d, h * hd, ("embed", "heads"), bias=config.qkv_bias, **kw)
        self.k_proj = linear(d, kv * hd, ("embed", "kv"), bias=config.qkv_bias, **kw)
        self.v_proj = linear(d, kv * hd, ("embed", "kv"), bias=config.qkv_bias, **kw)
        self.o_proj = linear(h * hd, d, ("heads", "embed"), bias=config.out_bias, **kw)
        self.config = config
        self.kernel = "auto"  # models.attention.KERNELS (model.attention); decoding keeps the cache path

    def __call__(self, x_BTD, positions_BT, allowed_BTS, inv_freq_F, cached_kv, write):
        """Attend from the ``T`` new tokens to every allowed slot -- the layer's cached keys and
        values with the new ones in place (``write.attend``: a :class:`DenseWrite` or
        :class:`PageWrite`), or the new ones alone when ``cached_kv`` is None (``model.attention``'s
        kernel); returns the output and the new keys/values ``[B, K, T, D]``."""
        c = self.config
        B, T, _ = x_BTD.shape
        q_BTHD = constrain(self.q_proj(x_BTD).reshape(B, T, c.num_heads, c.head_dim), ("batch", None, "heads", None))
        k_BTKD = constrain(self.k_proj(x_BTD).reshape(B, T, c.num_kv_heads, c.head_dim), ("batch", None, "kv", None))
        v_BTKD = constrain(self.v_proj(x_BTD).reshape(B, T, c.num_kv_heads, c.head_dim), ("batch", None, "kv", None))
        if inv_freq_F is not None:
            q_BTHD = apply_rope(q_BTHD, positions_BT, inv_freq_F)
            k_BTKD = apply_rope(k_BTKD, positions_BT, inv_freq_F)
        k_BKTD, v_BKTD = k_BTKD.transpose(0, 2, 1, 3), v_BTKD.transpose(0, 2, 1, 3)
        if cached_kv is None:
            kernel = attention_kernel(self.kernel, T, c.attn_softcap, windowed=c.windowed)
            out_BTHD = kernel(q_BTHD, k_BKTD, v_BKTD, allowed_BTS, scale=c.attention_scale, softcap=c.attn_softcap)
        else:
            out_BTHD = write.attend(cached_kv, q_BTHD, k_BKTD, v_BKTD, allowed_BTS, scale=c.attention_scale,
                                    softcap=c.attn_softcap)
        out_BTHD = constrain(out_BTHD, ("batch", None, "heads", None))
        return self.o_proj(out_BTHD.reshape(B, T, -1)), (k_BKTD, v_BKTD)


class MLP(nnx.Module):
    """The feed-forward block: ``down(act(gate(x)) * up(x))`` when gated (SwiGLU / GeGLU, Shazeer,
    2020), else ``down(act(up(x)))``."""
    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, bias=config.mlp_bias, std=config.initializer_range)
        self.gate_proj = linear(d, f, ("embed", "mlp"), **kw) if config.gated_mlp else None
        self.up_proj = linear(d, f, ("embed", "mlp"), **kw)
        self.down_proj = linear(f, d, ("mlp", "embed"), **kw)
        self.activation = config.activation

    def __call__(self, x_BTD):
        act = ACTIVATION_FNS[self.activation]
        if self.gate_proj is None:
            h_BTF = act(self.up_proj(x_BTD))
        else:
            h_BTF = act(self.gate_proj(x_BTD)) * self.up_proj(x_BTD)
        return self.down_proj(constrain(h_BTF, ("batch", None, "mlp")))


class Block(nnx.Module):
    """One pre-norm decoder block: ``x += attn(norm(x))``, ``x += mlp(norm(x))``, with Gemma 2's
    output norms when configured."""
    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        def norm():
            return Norm(config.hidden_size, config.norm, config.norm_eps, dtype=dtype, param_dtype=param_dtype)

        self.attn_norm = norm()
        self.attn = Attention(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attn_out_norm = norm() if config.post_norms else None
        self.mlp_norm = norm()
        self.mlp = MLP(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp_out_norm = norm() if config.post_norms else None

    def __call__(self, x_BTD, positions_BT, allowed_BTS, inv_freq_F, cached_kv, write):
        a_BTD, kv = self.attn(self.attn_norm(x_BTD), positions_BT, allowed_BTS, inv_freq_F, cached_kv, write)
        x_BTD = x_BTD + (a_BTD if self.attn_out_norm is None else self.attn_out_norm(a_BTD))
        m_BTD = self.mlp(self.mlp_norm(x_BTD))
        x_BTD = x_BTD + (m_BTD if self.mlp_out_norm is None else self.mlp_out_norm(m_BTD))
        return constrain(x_BTD, ("batch", None, None)), kv


SCAN_LAYERS_AUTO = 4  # scan_layers=None: stack the blocks of decoders this deep or deeper


def _stacked_state(blocks) -> tuple[nnx.GraphDef, nnx.State]:
    """One block's graph and the ``L`` blocks' states stacked on a new leading axis."""
    return nnx.graphdef(blocks[0]), jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *map(nnx.state, blocks))


def set_attention(model: nnx.Module, kind: str) -> None:
    """Make every attention layer of ``model`` use the kernel ``kind`` (``models.attention``).
    Raises ``ValueError`` for an unknown kind, and for one that cannot run the model on the
    target platform (``models.attention.resolve``)."""
    if kind not in KERNELS:
        raise ValueError(f"model.attention={kind!r}; choose one of {', '.join(KERNELS)}")
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Decoder):
            reads_segments(kind, module.config.attn_softcap, windowed=module.config.windowed)  # refused early
        if isinstance(module, Attention | Decoder):
            module.kernel = kind


def attends_by_segments(model: nnx.Module) -> bool:
    """Whether ``model``'s decoder takes its attention mask as segment ids (splash), which
    cannot describe a shared prompt seen by every response (``data.shared_prompt``)."""
    return any(isinstance(module, Decoder) and reads_segments(module.kernel, module.config.attn_softcap,
                                                              windowed=module.config.windowed)
               for _, module in nnx.iter_graph(model))


def stack_blocks(blocks: list[Block]) -> Block:
    """One :class:`Block` whose every parameter is the ``L`` blocks' stacked on a new leading
    axis, logical name ``"layers"`` (no sharding rule names it: replicated)."""
    stacked = nnx.merge(*_stacked_state(blocks))
    for _, variable in nnx.iter_graph(stacked):
        if isinstance(variable, nnx.Variable) and variable.has_metadata("out_sharding"):
            variable.set_metadata("out_sharding", ("layers", *variable.get_metadata()["out_sharding"]))
    return stacked


class Decoder(nnx.Module):
    """The shared backbone: embeddings, blocks, final norm.

    ``scan_layers``: store the ``L`` blocks as one :class:`Block` of stacked parameters
    ``[L, ...]`` (:func:`stack_blocks`) and run them with one ``lax.scan``, so a step compiles
    one block instead of ``L`` (None: on from :data:`SCAN_LAYERS_AUTO` layers). Checkpoints
    keep the Hugging Face per-layer layout either way (``models.hf``). ``remat`` (a
    :data:`REMAT_POLICIES` name; ``True`` is ``block``) recomputes each block's activations in
    the backward pass (``jax.checkpoint`` with that policy on the scan body; unscanned blocks
    are stacked for the step) instead of storing them."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool | str = False, scan_layers: bool | None = None):
        self.config, self.dtype, self.remat = config, dtype, remat_policy(remat)
        self.kernel = "auto"  # as its attention layers' (set_attention): splash reads segment ids
        self.scan_layers = config.num_layers >= SCAN_LAYERS_AUTO if scan_layers is None else scan_layers
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=config.initializer_range)
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, ("vocab", "embed"), **kw)
        self.embed_positions = (
            None if config.max_positions is None
            else embedding(config.max_positions, config.hidden_size, (None, "embed"), **kw)
        )
        blocks = [Block(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype) for _ in range(config.num_layers)]
        self.layers = stack_blocks(blocks) if self.scan_layers else nnx.List(blocks)
        self.norm = Norm(config.hidden_size, config.norm, config.norm_eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array,
                 segment_ids_BT: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states ``[B, T, D]``. With ``segment_ids_BT`` (packed rows, or a
        shared prompt with its responses; see :func:`visibility`) attention and positions
        follow the segments."""
        visible_BTT = visibility(attention_mask_BT, segment_ids_BT)
        if segment_ids_BT is None:
            positions_BT = positions_from_mask(attention_mask_BT)
        else:
            positions_BT = positions_from_visibility(visible_BTT)
        if reads_segments(self.kernel, self.config.attn_softcap, windowed=self.config.windowed):
            allowed = splash_segments(attention_mask_BT, segment_ids_BT)[None]  # [1, B, T]: one window, none
        else:
            allowed = self._windowed(visible_BTT, positions_BT[:, :, None] - positions_BT[:, None, :])
        h_BTD, _ = self._run(input_ids_BT, positions_BT, allowed, None, None)
        return h_BTD

    def extend(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Run ``T`` new tokens against the cache; returns their hidden states and the cache with
        them written at slots ``[length, length + T)``. The caller sizes the cache: slots past
        its end are not written (``dynamic_update_slice`` clamps)."""
        start = cache.length
        positions_BT = cache.next_position_B[:, None] + positions_from_mask(attention_mask_BT)
        key_mask_BS = jax.lax.dynamic_update_slice_in_dim(cache.key_mask_BS, attention_mask_BT.astype(bool), start, 1)
        q_T1 = start + jnp.arange(input_ids_BT.shape[1])[:, None]
        s_1S = jnp.arange(key_mask_BS.shape[1])[None, :]
        allowed = self._windowed((s_1S <= q_T1)[None] & key_mask_BS[:, None, :], (q_T1 - s_1S)[None])
        h_BTD, (keys_LBKSD, values_LBKSD) = self._run(input_ids_BT, positions_BT, allowed,
                                                      (cache.keys_LBKSD, cache.values_LBKSD), DenseWrite(start))
        cache = KVCache(
            keys_LBKSD=keys_LBKSD,
            values_LBKSD=values_LBKSD,
            key_mask_BS=key_mask_BS,
            next_position_B=cache.next_position_B + attention_mask_BT.sum(1).astype(jnp.int32),
            length=start + input_ids_BT.shape[1],
        )
        return h_BTD, cache

    def decode_paged(self, token_S: jax.Array, live_S: jax.Array, cache: PagedKVCache,
                     kernel: str = "gather") -> tuple[jax.Array, PagedKVCache]:
        """Run one token per slot at position ``length_S`` against the slot's pages; returns the
        hidden states ``[S, D]`` and the cache with the token written and ``length_S`` one more
        for the ``live_S`` slots (the others' tokens are computed and dropped). The caller gives
        each live slot the page that position lands on (``table_SM[s, length_S // Z]``).
        ``kernel``: ``gather`` or ``pallas`` (``models.paged_attention.resolve_paged``)."""
        length_S = cache.length_S
        X = cache.table_SM.shape[1] * cache.page_size
        s_1X = jnp.arange(X)[None, :]
        allowed = self._windowed((s_1X <= length_S[:, None])[:, None, :], (length_S[:, None] - s_1X)[:, None, :])
        write = PageWrite(cache.table_SM, length_S, live_S, kernel)
        h_S1D, (keys, values) = self._run(token_S[:, None], length_S[:, None], allowed,
                                          (cache.keys_LKPZD, cache.values_LKPZD), write)
        return h_S1D[:, 0], cache.replace(keys_LKPZD=keys, values_LKPZD=values,
                                          length_S=length_S + live_S.astype(jnp.int32))

    def _windowed(self, visible_BTS: jax.Array, distance_BTS: jax.Array) -> jax.Array:
        """``[W, B, T, S]``: for each distinct attention window of the model (in
        ``layer_windows`` order) the visible keys, and for a sliding window only those less than
        ``window`` positions back."""
        windows = dict.fromkeys(self.config.layer_windows)
        return jnp.stack([visible_BTS if w is None else visible_BTS & (distance_BTS < w) for w in windows])

    def _run(self, input_ids_BT, positions_BT, allowed_WBTS, kv_cache, write):
        """Embed, run every block, final norm. ``kv_cache``: None, or the stacked buffers (dense
        ``[L, B, K, S, D]`` or pages ``[L, K, P, Z, D]``), returned with the new tokens written
        where ``write`` (:class:`DenseWrite` / :class:`PageWrite`) puts them."""
        c = self.config
        x_BTD = self.embed_tokens(input_ids_BT)
        if c.embed_scale:
            x_BTD = x_BTD * jnp.asarray(math.sqrt(c.hidden_size), x_BTD.dtype)
        if self.embed_positions is not None:
            x_BTD = x_BTD + self.embed_positions(positions_BT)
        x_BTD = constrain(x_BTD, ("batch", None, None))
        inv_freq_F = rope_inverse_frequencies(c) if c.max_positions is None else None
        windows = list(dict.fromkeys(c.layer_windows))
        window_L = [windows.index(w) for w in c.layer_windows]

        def layer(x_BTD, block, window, layer_kv):
            """One block over its layer's cached keys/values (or none); returns the new tokens' own."""
            return block(x_BTD, positions_BT, allowed_WBTS[window], inv_freq_F, layer_kv, write)

        remat = remat_policy(self.remat) if kv_cache is None else "none"
        if self.scan_layers or remat != "none":
            x_BTD, new_kv = self._scan(layer, x_BTD, jnp.asarray(window_L), kv_cache, remat)
        else:
            per_layer = []
            for i, block in enumerate(self.layers):
                x_BTD, layer_new = layer(x_BTD, block, window_L[i], None if kv_cache is None else
                                         tuple(buffer[i] for buffer in kv_cache))
                per_layer.append(layer_new)
            new_kv = None if kv_cache is None else tuple(jnp.stack(parts) for parts in zip(*per_layer))
        if kv_cache is not None:  # every layer's new keys/values [L, B, K, T, D] written in one update, in place
            kv_cache = write.write(kv_cache, new_kv)
        return self.norm(x_BTD), kv_cache

    def _scan(self, layer, x_BTD, window_L: jax.Array, kv_cache, remat: str):
        """The blocks as one ``lax.scan`` over their stacked parameters (stored stacked, or
        stacked for this call when only ``remat`` asks for the scan) and the layers' cached
        keys/values; returns the output and the new tokens' keys/values ``[L, B, K, T, D]``
        (written into the cache by the caller in one update: a scan carrying the whole cache
        copied it at every layer, twice the decode time). With ``remat`` the body is a
        ``jax.checkpoint`` with the :data:`REMAT_POLICIES` policy ``remat``: with ``block`` the
        forward keeps each block's input only and the backward recomputes one block at a time
        (Chen et al., 2016, "Training Deep Nets with Sublinear Memory Cost"). The scan is what bounds the memory: with a Python loop of checkpointed
        blocks XLA:CPU schedules every recomputation early and keeps all activations anyway
        (measured: the same peak)."""
        graphdef, params_L = nnx.split(self.layers) if self.scan_layers else _stacked_state(list(self.layers))

        def body(x_BTD, xs):
            params, window, layer_kv = xs
            x_BTD, new_kv = layer(x_BTD, nnx.merge(graphdef, params), window, layer_kv)
            return x_BTD, None if layer_kv is None else new_kv  # no cache: nothing stacked for the caller

        body = body if remat == "none" else jax.checkpoint(body, policy=REMAT_POLICIES[remat])
        return jax.lax.scan(body, x_BTD, (params_L, window_L, kv_cache))

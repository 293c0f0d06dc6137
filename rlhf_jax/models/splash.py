"""Pallas splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) behind the
decoder's attention signature: FlashAttention's blocked online softmax (Dao et al., 2022) as a
TPU kernel that also skips the blocks a causal mask leaves empty. On a CPU it runs in Pallas
interpret mode -- exact and slow, for tests; a GPU has ``dot_product`` (cuDNN) instead.

Splash reads its mask as a static causal mask and'ed with segment ids, not as a boolean
``[B, T, S]`` matrix (which it never materialises): :func:`splash_segments` gives each real
token its packed example's id and each padding token an id of its own. That describes causal,
padded and packed rows exactly; it cannot describe a shared prompt seen by every response
(``data.shared_prompt`` is refused with splash) nor a sliding window (a Gemma 2 or Mistral
model is refused by name). Grouped-query heads run the multi-query kernel once per key/value
head (``vmap``); on a mesh the kernel runs per shard (``shard_map``): rows over the batch
axes, key/value heads over ``tensor``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from rlhf_jax.models.sharding import activation_mesh, activation_spec

LANE = 128  # splash tiles the sequence in multiples of this
BLOCKS = (512, 256, LANE)  # the largest of these dividing the padded length is the tile size


def splash_segments(attention_mask_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """``[B, T]`` int32 segment ids for :func:`splash_attend`: a real token's packed example id
    (1 when ``segment_ids_BT`` is None), and ``-1 - t`` for a padding token at ``t``, so it
    sees no other token. Packed rows number their examples 1, 2, ... (0 is padding); rows
    whose segment 0 holds real tokens (a shared prompt) cannot be described."""
    T = attention_mask_BT.shape[1]
    real_BT = attention_mask_BT.astype(bool)
    ids_BT = jnp.ones_like(attention_mask_BT, jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    return jnp.where(real_BT, ids_BT, -1 - jnp.arange(T, dtype=jnp.int32)[None])


def _tile(length: int) -> tuple[int, int]:
    """``(padded_length, block)``: ``length`` rounded up to the lane width and the largest
    block of :data:`BLOCKS` dividing it."""
    padded = -(-length // LANE) * LANE
    return padded, next(b for b in BLOCKS if padded % b == 0)


@functools.lru_cache(maxsize=32)
def _kernel(length: int, block: int, group: int, softcap: float | None, interpret: bool):
    """The multi-query splash kernel for ``group`` query heads per key/value head over
    ``length`` tokens (a causal mask), its forward and backward tiles ``block``."""
    sizes = kernels.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                               block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = masks.MultiHeadMask([masks.CausalMask((length, length))] * group)
    with jax.ensure_compile_time_eval():  # the mask's block tables: constants, not the first caller's tracers
        return kernels.make_splash_mqa_single_device(mask, block_sizes=sizes, attn_logits_soft_cap=softcap,
                                                     interpret=interpret)


def splash_attend(q_BTHD, k_BKSD, v_BKSD, segments_BT, *, scale: float, softcap: float | None = None,
                  interpret: bool | None = None) -> jax.Array:
    """Causal self-attention by splash: ``q [B, T, H, D]``, keys and values ``[B, K, T, D]``
    (``S == T``: no cache), ``segments_BT`` from :func:`splash_segments`; ``scale`` multiplies
    the scores before Gemma 2's ``softcap``. Equals :func:`rlhf_jax.models.layers.attend` on
    every real query (float32 accumulation); a padding query's output is zero (no real token
    reads it). ``T`` is padded to a multiple of 128 inside. ``interpret``: Pallas interpret
    mode (default: off on a TPU only). Returns ``[B, T, H, D]`` in the queries' dtype."""
    B, T, H, D = q_BTHD.shape
    K = k_BKSD.shape[1]
    if k_BKSD.shape[2] != T:
        raise ValueError(f"splash attends a sequence to itself; got {T} queries and {k_BKSD.shape[2]} keys")
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    padded, block = _tile(T)
    kernel = _kernel(padded, block, H // K, softcap, interpret)
    q_BKGTD = (q_BTHD * scale).reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)
    pad = padded - T
    if pad:  # the tail: padding tokens of their own segments
        q_BKGTD = jnp.pad(q_BKGTD, ((0, 0),) * 3 + ((0, pad), (0, 0)))
        k_BKSD, v_BKSD = (jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0))) for a in (k_BKSD, v_BKSD))
        segments_BT = jnp.pad(segments_BT, ((0, 0), (0, pad)), constant_values=-1 - T)

    def per_shard(q_BKGTD, k_BKSD, v_BKSD, segments_BT):
        one_head = lambda q_GTD, k_SD, v_SD, ids_T: kernel(  # noqa: E731
            q_GTD, k_SD.astype(q_GTD.dtype), v_SD.astype(q_GTD.dtype), segment_ids=kernels.SegmentIds(ids_T, ids_T))
        per_row = jax.vmap(one_head, in_axes=(0, 0, 0, None))  # over key/value heads
        return jax.vmap(per_row)(q_BKGTD, k_BKSD, v_BKSD, segments_BT)

    mesh = activation_mesh()
    if mesh is not None and mesh.size > 1:  # a Pallas call is not partitioned by XLA: run it per shard
        spec = lambda x, names: activation_spec(names, x.shape, mesh)  # noqa: E731
        q_spec = spec(q_BKGTD, ("batch", "kv", None, None, None))
        kv_spec = spec(k_BKSD, ("batch", "kv", None, None))
        per_shard = jax.shard_map(per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec,
                                                                  jax.sharding.PartitionSpec(q_spec[0], None)),
                                  out_specs=q_spec, check_vma=False)
    out_BKGTD = per_shard(q_BKGTD, k_BKSD, v_BKSD, segments_BT)[:, :, :, :T]
    out_BTHD = out_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)
    return jnp.where((segments_BT[:, :T] >= 0)[..., None, None], out_BTHD, 0).astype(q_BTHD.dtype)

"""Decode attention over a paged KV cache, chosen by ``rollout.paged_attention``:

- ``gather``: each slot's pages gathered into a contiguous ``[S, K, M * Z, D]`` and the
  reference attention run over them (``models.kv_cache.PageWrite.read``) -- any platform,
  sliding windows included.
- ``pallas``: the Pallas TPU paged-attention kernel
  (``jax.experimental.pallas.ops.tpu.paged_attention``; Kwon et al., 2023, "Efficient Memory
  Management for Large Language Model Serving with PagedAttention"), which reads a slot's
  pages where they lie, a block of pages at a time with FlashAttention's online softmax (Dao et
  al., 2022), and skips the pages past each slot's length. It returns the normalised output
  only (no log-sum-exp to merge the new token's score into), so the new token's key and value
  are written into the layer's pages before the call (:meth:`~rlhf_jax.models.kv_cache.PageWrite.attend`).
  The kernel reads keys and values as bfloat16 (a float32 cache is rounded as it is read),
  accumulating in float32. Its blocks need a head size that is a multiple of the TPU's 128
  lanes (Llama 3's 128, Gemma's 256; SmolLM2's 64 is refused by name), and no sliding windows
  (a Gemma 2 or Mistral model is refused by name). On a CPU it runs in Pallas TPU interpret
  mode -- for tests; a GPU is refused.
- ``auto``: ``pallas`` when the program is compiled for a TPU (``models.attention.target_platform``:
  the backend, or a plan's target) for a model the kernel can run with a bfloat16 cache, else
  ``gather``.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

from rlhf_jax.config import ConfigError
from rlhf_jax.models.attention import target_platform
from rlhf_jax.models.sharding import activation_mesh, activation_spec

PAGED_KERNELS = ("auto", "gather", "pallas")
LANES = 128  # the kernel's head size is a multiple of this
BLOCK_TOKENS = 512  # the kernel's compute block: the most pages of a slot whose tokens fit in this


def resolve_paged(kind: str, *, head_dim: int, windowed: bool = False, cache_dtype=jnp.bfloat16) -> str:
    """``"gather"`` or ``"pallas"``: what ``kind`` (:data:`PAGED_KERNELS`) runs for a model of
    ``head_dim`` with (``windowed``) or without sliding windows and a cache of ``cache_dtype``
    on the target platform. Raises ``ConfigError`` (a ``ValueError``) for an unknown kind, and
    for ``pallas`` with sliding windows, a head size not a multiple of :data:`LANES` or on a GPU."""
    if kind not in PAGED_KERNELS:
        raise ConfigError(f"rollout.paged_attention={kind!r}; choose one of {', '.join(PAGED_KERNELS)}")
    platform = target_platform()
    unfit = ("the pallas kernel has no sliding windows (this model has some)" if windowed else
             f"the pallas kernel needs a head size that is a multiple of {LANES} (this model's is {head_dim})"
             if head_dim % LANES else None)
    if kind == "auto":
        exact = jnp.dtype(cache_dtype) == jnp.bfloat16  # the kernel reads bfloat16: a float32 cache keeps gather
        return "pallas" if platform == "tpu" and exact and unfit is None else "gather"
    if kind == "pallas" and unfit is not None:
        raise ConfigError(f"rollout.paged_attention: {unfit}; use gather or auto")
    if kind == "pallas" and platform == "gpu":
        raise ConfigError("rollout.paged_attention: pallas is a TPU kernel; on a GPU use gather or auto")
    return kind


def compute_block(pages_per_slot: int, page_size: int) -> int:
    """The kernel's pages per compute block: the largest divisor of ``pages_per_slot`` whose
    pages hold at most :data:`BLOCK_TOKENS` tokens (at least one page)."""
    fits = [d for d in range(1, pages_per_slot + 1) if pages_per_slot % d == 0 and d * page_size <= BLOCK_TOKENS]
    return max(fits, default=1)


def paged_attend(q_SHD: jax.Array, k_pages_KPZD: jax.Array, v_pages_KPZD: jax.Array, table_SM: jax.Array,
                 length_S: jax.Array, *, scale: float, softcap: float | None = None,
                 interpret: bool | None = None) -> jax.Array:
    """One query token per slot attending to the first ``length_S[s]`` tokens of its pages:
    queries ``[S, H, D]``, one layer's pages ``[K, P, Z, D]`` (key/value head ``h // (H / K)``
    for query head ``h``), the page table ``[S, M]`` (token ``i`` of slot ``s`` on page
    ``table_SM[s, i // Z]``; an entry out of ``[0, P)`` names no page and is never read within
    a slot's length) and ``length_S >= 1`` int32. ``scale`` multiplies the scores before Gemma
    2's ``softcap``. Equals the reference attention over the gathered pages with float32
    accumulation, up to the kernel's reading of keys and values as bfloat16 (exact for
    bfloat16 pages). ``interpret``: Pallas TPU interpret
    mode (default: on everywhere but a TPU). On an open activation mesh the kernel runs per
    shard (``shard_map``), key/value heads over ``tensor``. Returns ``[S, H, D]`` in the
    queries' dtype."""
    interpret = target_platform() != "tpu" if interpret is None else interpret
    P = k_pages_KPZD.shape[1]
    block = compute_block(table_SM.shape[1], k_pages_KPZD.shape[2])

    def per_shard(q_SHD, k_KPZD, v_KPZD, table_SM, length_S):
        return paged_attention((q_SHD * scale).astype(k_KPZD.dtype), k_KPZD, v_KPZD, length_S.astype(jnp.int32),
                               jnp.clip(table_SM, 0, P - 1).astype(jnp.int32), attn_logits_soft_cap=softcap,
                               pages_per_compute_block=block)

    mesh = activation_mesh()
    if mesh is not None and mesh.size > 1:  # a Pallas call is not partitioned by XLA: run it per shard
        q_spec = activation_spec((None, "heads", None), q_SHD.shape, mesh)
        kv_spec = activation_spec(("kv", None, None, None), k_pages_KPZD.shape, mesh)
        if q_spec[1] != kv_spec[0]:  # query heads split only with their key/value heads
            q_spec = kv_spec = jax.sharding.PartitionSpec()
        replicated = jax.sharding.PartitionSpec()
        per_shard = jax.shard_map(per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, replicated, replicated),
                                  out_specs=q_spec, check_vma=False)
    with pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext():  # read as the kernel is traced
        return per_shard(q_SHD, k_pages_KPZD, v_pages_KPZD, table_SM, length_S).astype(q_SHD.dtype)

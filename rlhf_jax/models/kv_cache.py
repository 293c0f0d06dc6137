"""Key/value caches for decoding, and where a forward writes its new tokens' keys and values.

Two layouts, one interface for the decoder's attention (:class:`DenseWrite` and
:class:`PageWrite` each ``read`` one layer's keys/values with the new tokens' in place, and
``write`` every layer's new keys/values into the cache after the layer scan):

- :class:`KVCache`: fixed-size buffers ``[L, B, K, S, D]``, one row per sequence, ``S`` slots
  reserved up front -- the static engine's cache.
- :class:`PagedKVCache`: a pool of fixed-size pages ``[L, K, P, Z, D]`` shared by decode slots,
  each slot's tokens on the pages its row of the page table names (Kwon et al., 2023, "Efficient
  Memory Management for Large Language Model Serving with PagedAttention"), so the memory held
  is proportional to the tokens held. Attention reads a slot's pages with an XLA gather, or
  where they lie with the Pallas TPU kernel (:mod:`rlhf_jax.models.paged_attention`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.models.layers import attend
from rlhf_jax.models.paged_attention import paged_attend


@flax.struct.dataclass
class KVCache:
    """Fixed-size key/value buffers, every layer's stacked on a leading axis. Slot ``s`` of row
    ``b`` holds a real token iff ``key_mask_BS[b, s]``; ``length`` slots have been written;
    ``next_position_B`` is the position id the next real token of each row gets."""

    keys_LBKSD: jax.Array  # head-major, rotary already applied
    values_LBKSD: jax.Array
    key_mask_BS: jax.Array
    next_position_B: jax.Array
    length: jax.Array

    @classmethod
    def empty(cls, config: DecoderConfig, batch: int, max_length: int, dtype=jnp.float32) -> KVCache:
        """A cache of ``max_length`` slots for ``batch`` rows, every layer's keys and values zero
        ``[L, B, K, S, D]`` and no slot filled."""
        zeros = jnp.zeros((config.num_layers, batch, config.num_kv_heads, max_length, config.head_dim), dtype)
        return cls(
            keys_LBKSD=zeros,
            values_LBKSD=zeros,
            key_mask_BS=jnp.zeros((batch, max_length), bool),
            next_position_B=jnp.zeros((batch,), jnp.int32),
            length=jnp.zeros((), jnp.int32),
        )

    def repeat(self, n: int) -> KVCache:
        """Each row repeated ``n`` times (row-major): one prefill serves ``n`` samples per prompt."""
        return self.replace(
            keys_LBKSD=jnp.repeat(self.keys_LBKSD, n, axis=1),
            values_LBKSD=jnp.repeat(self.values_LBKSD, n, axis=1),
            key_mask_BS=jnp.repeat(self.key_mask_BS, n, axis=0),
            next_position_B=jnp.repeat(self.next_position_B, n, axis=0),
        )


@flax.struct.dataclass
class DenseWrite:
    """The ``T`` new tokens of every row go to slots ``[start, start + T)`` of a :class:`KVCache`."""

    start: jax.Array

    def attend(self, layer_kv, q_BTHD, k_BKTD, v_BKTD, allowed_BTS, *, scale: float, softcap: float | None):
        """The new tokens' attention ``[B, T, H, D]`` over one layer's buffers with their own
        keys/values in place (:func:`~rlhf_jax.models.layers.attend` over :meth:`read`)."""
        return attend(q_BTHD, *self.read(layer_kv, k_BKTD, v_BKTD), allowed_BTS, scale=scale, softcap=softcap)

    def read(self, layer_kv, k_BKTD: jax.Array, v_BKTD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One layer's buffers ``[B, K, S, D]`` with the new keys/values written at ``start``."""
        return tuple(jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), self.start, axis=2)
                     for buffer, new in zip(layer_kv, (k_BKTD, v_BKTD)))

    def write(self, kv, new_kv) -> tuple[jax.Array, jax.Array]:
        """Every layer's new keys/values ``[L, B, K, T, D]`` written into ``[L, B, K, S, D]`` in one
        update (in place)."""
        return tuple(jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), (0, 0, 0, self.start, 0))
                     for buffer, new in zip(kv, new_kv))


@flax.struct.dataclass
class PagedKVCache:
    """A pool of ``P`` pages of ``Z`` tokens, every layer's stacked on a leading axis, shared by
    ``S`` decode slots. Slot ``s`` holds ``length_S[s]`` tokens at positions ``0, 1, ...``; token
    ``i`` lies on page ``table_SM[s, i // Z]`` at offset ``i % Z``. A table entry equal to ``P``
    names no page. The KV-head-major pool is the layout of the Pallas TPU paged-attention
    kernel's pages (``jax.experimental.pallas.ops.tpu.paged_attention``)."""

    keys_LKPZD: jax.Array  # rotary already applied
    values_LKPZD: jax.Array
    table_SM: jax.Array  # int32 page ids, M = pages a slot can hold
    length_S: jax.Array  # int32 tokens held (the next token's position)

    @classmethod
    def empty(cls, config: DecoderConfig, slots: int, pages: int, page_size: int, pages_per_slot: int,
              dtype=jnp.float32) -> PagedKVCache:
        """``pages`` zero pages of ``page_size`` tokens, ``slots`` slots holding none."""
        shape = (config.num_layers, config.num_kv_heads, pages, page_size, config.head_dim)
        return cls(keys_LKPZD=jnp.zeros(shape, dtype), values_LKPZD=jnp.zeros(shape, dtype),
                   table_SM=jnp.full((slots, pages_per_slot), pages, jnp.int32),
                   length_S=jnp.zeros((slots,), jnp.int32))

    @property
    def pages(self) -> int:
        """``P``: the pages in the pool (also the table's "no page" entry)."""
        return self.keys_LKPZD.shape[2]

    @property
    def page_size(self) -> int:
        """``Z``: tokens per page."""
        return self.keys_LKPZD.shape[3]


@flax.struct.dataclass
class PageWrite:
    """One new token per slot at position ``length_S`` of a :class:`PagedKVCache`, for the slots
    in ``live_S`` (the others' writes are dropped)."""

    table_SM: jax.Array
    length_S: jax.Array
    live_S: jax.Array
    kernel: str = flax.struct.field(pytree_node=False, default="gather")  # models.paged_attention: gather | pallas

    def attend(self, layer_kv, q_S1HD, k_SK1D, v_SK1D, allowed_S1X, *, scale: float, softcap: float | None):
        """The new token's attention ``[S, 1, H, D]`` over its slot's pages of one layer
        ``[K, P, Z, D]`` and itself: ``gather`` runs the reference attention over :meth:`read`
        (``allowed_S1X``: the positions up to ``length_S``, and a sliding window's);
        ``pallas`` writes the new key/value into a copy of the layer's pages and runs the TPU
        paged-attention kernel over the first ``length_S + 1`` tokens
        (:func:`~rlhf_jax.models.paged_attention.paged_attend`)."""
        if self.kernel == "gather":
            return attend(q_S1HD, *self.read(layer_kv, k_SK1D, v_SK1D), allowed_S1X, scale=scale, softcap=softcap)
        page_S, offset_S = self._destination(layer_kv[0].shape[1], layer_kv[0].shape[2])
        k_KPZD, v_KPZD = (pages.at[:, page_S, offset_S].set(new[:, :, 0].transpose(1, 0, 2).astype(pages.dtype),
                                                             mode="drop")
                          for pages, new in zip(layer_kv, (k_SK1D, v_SK1D)))
        out_SHD = paged_attend(q_S1HD[:, 0], k_KPZD, v_KPZD, self.table_SM, self.length_S + 1, scale=scale,
                               softcap=softcap)
        return out_SHD[:, None]

    def _destination(self, pages: int, page_size: int) -> tuple[jax.Array, jax.Array]:
        """``(page_S, offset_S)``: where each slot's new token goes; a slot not in ``live_S``
        gets page ``pages`` (out of range: its write is dropped)."""
        page_S = jnp.take_along_axis(self.table_SM, (self.length_S // page_size)[:, None], axis=1, mode="clip")[:, 0]
        return jnp.where(self.live_S, page_S, pages), self.length_S % page_size

    def read(self, layer_kv, k_SK1D: jax.Array, v_SK1D: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One layer's pages ``[K, P, Z, D]`` gathered per slot into ``[S, K, M * Z, D]``, the new
        token's key/value at index ``length_S``; positions past it are stale (the caller's
        attention mask stops at ``length_S``)."""
        S, M = self.table_SM.shape
        at_S1X1 = (jnp.arange(M * layer_kv[0].shape[2]) == self.length_S[:, None])[:, None, :, None]

        def gathered(pages_KPZD, new_SK1D):
            slots_KSMZD = jnp.take(pages_KPZD, self.table_SM, axis=1, mode="clip")  # an empty entry: any page
            K, _, _, Z, D = slots_KSMZD.shape
            slots_SKXD = slots_KSMZD.transpose(1, 0, 2, 3, 4).reshape(S, K, M * Z, D)
            return jnp.where(at_S1X1, new_SK1D.astype(slots_SKXD.dtype), slots_SKXD)

        return gathered(layer_kv[0], k_SK1D), gathered(layer_kv[1], v_SK1D)

    def write(self, kv, new_kv) -> tuple[jax.Array, jax.Array]:
        """Every layer's new keys/values ``[L, S, K, 1, D]`` written to their pages in one scatter."""
        page_S, offset_S = self._destination(kv[0].shape[2], kv[0].shape[3])
        return tuple(pool.at[:, :, page_S, offset_S].set(new[:, :, :, 0].transpose(0, 2, 1, 3).astype(pool.dtype),
                                                         mode="drop")
                     for pool, new in zip(kv, new_kv))

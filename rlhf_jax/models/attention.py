"""Attention kernels behind one signature, chosen by ``model.attention``:

- ``xla``: :func:`rlhf_jax.models.layers.attend`, scores materialised ``[B, K, G, T, S]`` in
  float32 -- the reference every other kernel is tested against; memory grows with ``T * S``.
- ``blockwise``: :func:`blockwise_attend`, FlashAttention's online softmax over key blocks
  (Dao et al., 2022; Rabe & Staats, 2021, "Self-attention Does Not Need O(n^2) Memory") in
  plain XLA with its own backward pass: temporaries of one key block at a time, so memory
  grows linearly in the length on any backend.
- ``dot_product``: ``jax.nn.dot_product_attention`` (cuDNN's flash attention on a GPU, XLA
  elsewhere); it has no soft-capping, so a Gemma 2 model is refused by name.
- ``splash``: Pallas splash attention on a TPU (:mod:`rlhf_jax.models.splash`; Pallas
  interpret mode on a CPU, for tests). It reads segment ids instead of ``allowed_BTS``
  (:func:`reads_segments`), so it refuses sliding windows and shared-prompt rows.
- ``auto``: ``splash`` on a TPU (a model without sliding windows), ``dot_product`` on a GPU,
  else ``xla`` up to :data:`BLOCKWISE_FROM` keys and ``blockwise`` beyond -- the naive path is
  the faster one at short lengths on a CPU. The platform is the one the program is compiled
  for: the backend's, or a plan's target (:func:`compiling_for`).

Every kernel takes ``q [B, T, H, D]``, keys and values head-major ``[B, K, S, D]``, the
boolean ``allowed_BTS`` (causal, padding, packed segments and sliding windows folded in by
the decoder; ``splash`` takes segment ids in its place), ``scale`` and Gemma 2's ``softcap``;
every one but ``splash`` gives a disallowed score the float32 minimum, so a query with
nothing allowed (padding) averages the values instead of producing NaN, as the reference
does. Decoding keeps the cache path of ``xla``."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp

from rlhf_jax.models.layers import attend
from rlhf_jax.models.splash import splash_attend

KERNELS = ("auto", "xla", "blockwise", "dot_product", "splash")
BLOCKWISE_FROM = 2048  # auto: key lengths from this on take the blockwise kernel
BLOCK = 512  # keys per block of the blockwise kernel
_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("attention_platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
    """A scope in which kernels are chosen for ``platform`` ("tpu", "gpu", "cpu") rather than
    this process's backend: a plan compiles TPU programs on a CPU host."""
    token = _PLATFORM.set(platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def target_platform() -> str:
    """The platform of :func:`compiling_for`'s open scope, else the default backend's."""
    return _PLATFORM.get() or jax.default_backend()


def _masked_scores(q_BKGTD, k_BKCD, allowed_BTC, scale, softcap):
    """``(scores, raw)``: the block's float32 scores, soft-capped and masked, and the capped
    scores before masking (for the backward pass)."""
    raw = jnp.einsum("bkgtd,bkcd->bkgtc", q_BKGTD, k_BKCD, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        raw = softcap * jnp.tanh(raw / softcap)
    return jnp.where(allowed_BTC[:, None, None], raw, jnp.finfo(jnp.float32).min), raw


def _empty(allowed_BTS):
    """``[B, T]``: the queries with no key allowed (padding)."""
    return ~allowed_BTS.any(-1)


def _value_mean(v_BKSD, heads: int):
    """``[B, 1, H, D]``: each query head's mean value, what the reference gives a query that sees
    nothing (every score equal)."""
    return jnp.repeat(v_BKSD.mean(2), heads // v_BKSD.shape[1], axis=1)[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q_BKGTD, k_NBKCD, v_NBKCD, allowed_NBTC, scale, softcap):
    return _flash_forward(q_BKGTD, k_NBKCD, v_NBKCD, allowed_NBTC, scale, softcap)[0]


def _flash_forward(q_BKGTD, k_NBKCD, v_NBKCD, allowed_NBTC, scale, softcap):
    """The online softmax over the ``N`` key blocks: a running max ``m``, normaliser ``l`` and
    weighted sum; returns the output and the log-sum-exp ``m + log l`` per query."""
    B, K, G, T, D = q_BKGTD.shape
    start = (jnp.full((B, K, G, T), jnp.finfo(jnp.float32).min, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
             jnp.zeros((B, K, G, T, D), jnp.float32))

    def block(carry, inputs):
        m_BKGT, l_BKGT, acc_BKGTD = carry
        k_BKCD, v_BKCD, allowed_BTC = inputs
        scores, _ = _masked_scores(q_BKGTD, k_BKCD, allowed_BTC, scale, softcap)
        new_m = jnp.maximum(m_BKGT, scores.max(-1))
        p_BKGTC = jnp.exp(scores - new_m[..., None])
        correction = jnp.exp(m_BKGT - new_m)
        acc_BKGTD = acc_BKGTD * correction[..., None] + jnp.einsum(
            "bkgtc,bkcd->bkgtd", p_BKGTC, v_BKCD.astype(jnp.float32))
        return (new_m, l_BKGT * correction + p_BKGTC.sum(-1), acc_BKGTD), None

    (m_BKGT, l_BKGT, acc_BKGTD), _ = jax.lax.scan(block, start, (k_NBKCD, v_NBKCD, allowed_NBTC))
    out_BKGTD = acc_BKGTD / l_BKGT[..., None]
    return out_BKGTD, m_BKGT + jnp.log(l_BKGT)


def _flash_fwd(q_BKGTD, k_NBKCD, v_NBKCD, allowed_NBTC, scale, softcap):
    out_BKGTD, lse_BKGT = _flash_forward(q_BKGTD, k_NBKCD, v_NBKCD, allowed_NBTC, scale, softcap)
    return out_BKGTD, (q_BKGTD, k_NBKCD, v_NBKCD, allowed_NBTC, out_BKGTD, lse_BKGT)


def _flash_bwd(scale, softcap, residuals, d_out_BKGTD):
    """FlashAttention's backward pass (Dao et al., 2022, Algorithm 2): each block's
    probabilities recomputed from the saved log-sum-exp, ``dS = P (dP - rowsum(dO O))``."""
    q_BKGTD, k_NBKCD, v_NBKCD, allowed_NBTC, out_BKGTD, lse_BKGT = residuals
    d_out_BKGTD = d_out_BKGTD.astype(jnp.float32)
    delta_BKGT = jnp.sum(d_out_BKGTD * out_BKGTD, -1)

    def block(dq_BKGTD, inputs):
        k_BKCD, v_BKCD, allowed_BTC = inputs
        scores, raw = _masked_scores(q_BKGTD, k_BKCD, allowed_BTC, scale, softcap)
        p_BKGTC = jnp.exp(scores - lse_BKGT[..., None])
        dv_BKCD = jnp.einsum("bkgtc,bkgtd->bkcd", p_BKGTC, d_out_BKGTD)
        dp_BKGTC = jnp.einsum("bkgtd,bkcd->bkgtc", d_out_BKGTD, v_BKCD.astype(jnp.float32))
        ds_BKGTC = jnp.where(allowed_BTC[:, None, None], p_BKGTC * (dp_BKGTC - delta_BKGT[..., None]), 0.0)
        if softcap is not None:  # d(cap tanh(s / cap)) / ds = 1 - tanh^2
            ds_BKGTC = ds_BKGTC * (1.0 - jnp.square(raw / softcap))
        ds_BKGTC = ds_BKGTC * scale
        dq_BKGTD = dq_BKGTD + jnp.einsum("bkgtc,bkcd->bkgtd", ds_BKGTC, k_BKCD.astype(jnp.float32))
        dk_BKCD = jnp.einsum("bkgtc,bkgtd->bkcd", ds_BKGTC, q_BKGTD.astype(jnp.float32))
        return dq_BKGTD, (dk_BKCD, dv_BKCD)

    dq_BKGTD, (dk_NBKCD, dv_NBKCD) = jax.lax.scan(block, jnp.zeros(q_BKGTD.shape, jnp.float32),
                                                   (k_NBKCD, v_NBKCD, allowed_NBTC))
    return (dq_BKGTD.astype(q_BKGTD.dtype), dk_NBKCD.astype(k_NBKCD.dtype), dv_NBKCD.astype(v_NBKCD.dtype),
            None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attend(q_BTHD, k_BKSD, v_BKSD, allowed_BTS, *, scale: float, softcap: float | None = None,
                     block: int = BLOCK) -> jax.Array:
    """:func:`~rlhf_jax.models.layers.attend` computed ``block`` keys at a time with an online
    softmax and a recomputing backward pass (module docstring): the same values and gradients
    (float32 accumulation), temporaries ``[B, K, G, T, block]`` instead of ``[B, K, G, T, S]``.
    Returns ``[B, T, H, D]`` in the values' dtype."""
    B, T, H, D = q_BTHD.shape
    K, S = k_BKSD.shape[1], k_BKSD.shape[2]
    empty_BT, mean_BTHD = _empty(allowed_BTS), _value_mean(v_BKSD, H)  # padding queries: as the reference
    block = min(block, S)
    n = math.ceil(S / block)
    pad = n * block - S
    if pad:  # keys past the end: never allowed
        k_BKSD, v_BKSD = (jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0))) for a in (k_BKSD, v_BKSD))
        allowed_BTS = jnp.pad(allowed_BTS, ((0, 0), (0, 0), (0, pad)))
    blocks = lambda a: jnp.moveaxis(a.reshape(B, K, n, block, D), 2, 0)  # noqa: E731  [N, B, K, C, D]
    allowed_NBTC = jnp.moveaxis(allowed_BTS.reshape(B, T, n, block), 2, 0)
    q_BKGTD = q_BTHD.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)
    out_BKGTD = _flash(q_BKGTD, blocks(k_BKSD), blocks(v_BKSD), allowed_NBTC, scale, softcap)
    out_BTHD = out_BKGTD.astype(v_BKSD.dtype).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)
    return jnp.where(empty_BT[..., None, None], mean_BTHD.astype(out_BTHD.dtype), out_BTHD)


def dot_product_attend(q_BTHD, k_BKSD, v_BKSD, allowed_BTS, *, scale: float, softcap: float | None = None):
    """``jax.nn.dot_product_attention`` (cuDNN flash attention on a GPU) with the decoder's mask.
    Raises ``ValueError`` for ``softcap``, which it cannot apply."""
    if softcap is not None:
        raise ValueError("model.attention: dot_product has no attention soft-capping (Gemma 2); use blockwise or xla")
    k_BSKD, v_BSKD = k_BKSD.transpose(0, 2, 1, 3), v_BKSD.transpose(0, 2, 1, 3)
    out = jax.nn.dot_product_attention(q_BTHD, k_BSKD.astype(q_BTHD.dtype), v_BSKD.astype(q_BTHD.dtype),
                                       mask=allowed_BTS[:, None], scale=scale)
    # a query with nothing allowed: the reference averages the values (every score the float32 minimum)
    return jnp.where(_empty(allowed_BTS)[..., None, None], _value_mean(v_BKSD, q_BTHD.shape[2]).astype(out.dtype), out)


def resolve(kind: str, keys: int, softcap: float | None, *, windowed: bool = False) -> str:
    """The kernel ``kind`` resolves to for ``keys`` keys of a model with (``windowed``) or
    without sliding windows on the target platform (module docstring). Raises ``ValueError``
    for an unknown kind and for a kernel that cannot run the model: ``dot_product`` with a
    soft-cap, ``splash`` with sliding windows or on a GPU."""
    if kind not in KERNELS:
        raise ValueError(f"model.attention={kind!r}; choose one of {', '.join(KERNELS)}")
    platform = target_platform()
    if kind == "auto":
        if platform == "tpu" and not windowed:
            kind = "splash"
        elif platform == "gpu" and softcap is None:
            kind = "dot_product"
        else:
            kind = "blockwise" if keys >= BLOCKWISE_FROM else "xla"
    if kind == "dot_product" and softcap is not None:
        raise ValueError("model.attention: dot_product has no attention soft-capping (Gemma 2); use blockwise or xla")
    if kind == "splash" and windowed:
        raise ValueError("model.attention: splash has no sliding windows (this model has some); use blockwise or xla")
    if kind == "splash" and platform == "gpu":
        raise ValueError("model.attention: splash is a TPU kernel; on a GPU use dot_product (cuDNN) or blockwise")
    return kind


def reads_segments(kind: str, softcap: float | None, *, windowed: bool = False) -> bool:
    """Whether ``kind`` resolves to a kernel that takes segment ids
    (:func:`rlhf_jax.models.splash.splash_segments`) in place of ``allowed_BTS`` -- at any
    length, on the target platform."""
    return resolve(kind, 0, softcap, windowed=windowed) == "splash"


def attention_kernel(kind: str, keys: int, softcap: float | None, *, windowed: bool = False):
    """The kernel function ``kind`` resolves to (:func:`resolve`, which raises ``ValueError``
    for a kernel that cannot run the model)."""
    kind = resolve(kind, keys, softcap, windowed=windowed)
    if kind == "splash":
        return functools.partial(splash_attend, interpret=target_platform() != "tpu")
    return {"xla": attend, "blockwise": blockwise_attend, "dot_product": dot_product_attend}[kind]

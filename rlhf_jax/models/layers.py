"""Building blocks shared by the decoder and encoder families: activations, norms, linear
layers with logical axis names, and masked scaled dot-product attention."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATION_FNS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class Linear(nnx.Module):
    """``y = x W + b`` over the last axis, ``W`` stored ``[in, out]`` with logical axis names.

    Leading axes are flattened into one before the product: XLA:CPU runs the backward pass
    of a 2-D matmul about twice as fast as that of the same ``[B, T, D]`` dot_general."""

    def __init__(self, d_in: int, d_out: int, names, *, rngs: nnx.Rngs, dtype, param_dtype, bias: bool = False,
                 std: float = 0.02):
        self.kernel = nnx.Param(nnx.initializers.normal(std)(rngs.params(), (d_in, d_out), param_dtype),
                                out_sharding=tuple(names))
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype), out_sharding=tuple(names[1:])) if bias else None
        self.dtype = dtype

    def __call__(self, x_NI: jax.Array) -> jax.Array:
        return self._apply(x_NI, self.kernel[...])

    def _apply(self, x_NI: jax.Array, kernel_IO: jax.Array) -> jax.Array:
        dtype = self.dtype or x_NI.dtype
        y_MO = x_NI.reshape(-1, x_NI.shape[-1]).astype(dtype) @ kernel_IO.astype(dtype)
        if self.bias is not None:
            y_MO = y_MO + self.bias[...].astype(dtype)
        return y_MO.reshape(*x_NI.shape[:-1], kernel_IO.shape[1])


def linear(d_in, d_out, names, *, rngs, dtype, param_dtype, bias=False, std=0.02) -> Linear:
    """A :class:`Linear` ``[d_in, d_out]`` with logical axis ``names`` for sharding, weights drawn
    from ``N(0, std^2)``."""
    return Linear(d_in, d_out, names, rngs=rngs, dtype=dtype, param_dtype=param_dtype, bias=bias, std=std)


def embedding(num, dim, names, *, rngs, dtype, param_dtype, std=0.02) -> nnx.Embed:
    """An ``nnx.Embed`` ``[num, dim]`` with logical axis ``names``, drawn from ``N(0, std^2)``."""
    return nnx.Embed(
        num,
        dim,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(std), names),
        rngs=rngs,
    )


class Norm(nnx.Module):
    """Normalisation over the last axis, computed in float32:

    - ``"rms"``: ``x / sqrt(mean(x^2) + eps) * w`` (Zhang & Sennrich, 2019; Llama),
    - ``"rms_one_plus"``: the same times ``(1 + w)`` with ``w`` initialised to 0 (Gemma),
    - ``"layer"``: ``(x - mean) / sqrt(var + eps) * w + b`` (Ba et al., 2016; GPT-2, BERT).
    """

    def __init__(self, dim: int, kind: str, eps: float, *, dtype, param_dtype):
        self.kind, self.eps, self.dtype = kind, eps, dtype
        init = jnp.zeros if kind == "rms_one_plus" else jnp.ones
        self.scale = nnx.Param(init((dim,), param_dtype), out_sharding=("embed",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("embed",)) if kind == "layer" else None

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x_BTD32 = x_BTD.astype(jnp.float32)
        if self.kind == "layer":
            x_BTD32 = x_BTD32 - x_BTD32.mean(-1, keepdims=True)
        y_BTD = x_BTD32 * jax.lax.rsqrt(jnp.mean(jnp.square(x_BTD32), -1, keepdims=True) + self.eps)
        scale_D = self.scale[...].astype(jnp.float32)
        y_BTD = y_BTD * (1.0 + scale_D if self.kind == "rms_one_plus" else scale_D)
        if self.bias is not None:
            y_BTD = y_BTD + self.bias[...].astype(jnp.float32)
        return y_BTD.astype(self.dtype or x_BTD.dtype)


def attend(
    q_BTHD: jax.Array,
    k_BKSD: jax.Array,
    v_BKSD: jax.Array,
    allowed_BTS: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
) -> jax.Array:
    """``softmax(cap(q k^T * scale) masked) v`` with grouped-query heads (Ainslie et al., 2023):
    query head ``h`` reads key/value head ``h // (H / K)``. Keys and values come head-major
    ``[B, K, S, D]`` (the KV cache's layout, so decoding reads the cache without transposing
    it). Scores and softmax in float32; disallowed scores are set to the float32 minimum
    (not -inf), so a row with nothing allowed (a padding query) gives finite values, never
    NaN. ``softcap``: Gemma 2's ``cap * tanh(s / cap)``. Returns ``[B, T, H, D]``."""
    B, T, H, D = q_BTHD.shape
    K = k_BKSD.shape[1]
    q_BKGTD = q_BTHD.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)
    scores_BKGTS = jnp.einsum("bkgtd,bksd->bkgts", q_BKGTD, k_BKSD).astype(jnp.float32) * scale
    if softcap is not None:
        scores_BKGTS = softcap * jnp.tanh(scores_BKGTS / softcap)
    scores_BKGTS = jnp.where(allowed_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BKSD.dtype)
    out_BKGTD = jnp.einsum("bkgts,bksd->bkgtd", probs_BKGTS, v_BKSD)
    return out_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)

"""Every attention kernel equals the naive path (values and gradients, float32) with grouped
heads, padding, packed segments, a sliding window and a soft-cap; the blockwise kernel's
compiled temporaries grow about linearly with the length where the naive path's grow with
its square."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models.attention import attention_kernel, blockwise_attend, dot_product_attend
from rlhf_jax.models.decoder import visibility
from rlhf_jax.models.layers import attend

B, T, H, K, D = 2, 40, 4, 2, 8


def _mask(case: str) -> jax.Array:
    lengths = jnp.asarray([T, T - 9])
    mask_BT = (jnp.arange(T)[None] < lengths[:, None]).astype(jnp.int32)  # the second row right-padded
    segments = None
    if case == "packed":
        segments = jnp.where(mask_BT > 0, 1 + (jnp.arange(T)[None] >= 17), 0)  # two examples in a row
    allowed = visibility(mask_BT, segments)
    if case == "window":
        allowed &= (jnp.arange(T)[:, None] - jnp.arange(T)[None, :] < 7)[None]
    return allowed


def _inputs(seed=0):
    q, k, v = (jax.random.normal(jax.random.key(seed + i), shape) for i, shape in
               enumerate([(B, T, H, D), (B, K, T, D), (B, K, T, D)]))
    return q, k, v


@pytest.mark.parametrize("kernel", ["blockwise", "dot_product"])
@pytest.mark.parametrize("case", ["causal", "packed", "window", "softcap"])
def test_each_kernel_equals_the_naive_path_in_values_and_gradients(kernel, case):
    if kernel == "dot_product" and case == "softcap":
        with pytest.raises(ValueError, match="dot_product has no attention soft-capping"):
            attention_kernel("dot_product", T, 50.0)
        return
    allowed = _mask(case)
    softcap = 5.0 if case == "softcap" else None
    fn = {"blockwise": lambda *a, **k: blockwise_attend(*a, **k, block=16), "dot_product": dot_product_attend}[kernel]
    q, k, v = _inputs()

    def loss(f, q, k, v):
        out = f(q, k, v, allowed, scale=D ** -0.5, softcap=softcap)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

    (expected, reference), grads = jax.value_and_grad(lambda *a: loss(attend, *a), argnums=(0, 1, 2), has_aux=True)(
        q, k, v)
    (value, out), got = jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(out, reference, atol=1e-5)
    assert abs(float(value - expected)) < 1e-4
    for name, a, b in zip("qkv", grads, got):
        np.testing.assert_allclose(b, a, atol=1e-5, err_msg=name)


def _temporaries(fn, length: int) -> int:
    """XLA's temporary bytes of one attention forward + backward at ``length`` tokens."""
    q = jax.ShapeDtypeStruct((1, length, 8, 64), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 2, length, 64), jnp.float32)
    allowed = jax.ShapeDtypeStruct((1, length, length), jnp.bool_)
    grad = jax.grad(lambda q, k, v, m: fn(q, k, v, m, scale=0.125).sum(), argnums=(0, 1, 2))
    return jax.jit(grad).lower(q, kv, kv, allowed).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_blockwise_temporaries_grow_linearly_where_the_naive_paths_grow_quadratically():
    lengths = (2048, 4096, 8192)
    blockwise = [_temporaries(blockwise_attend, n) for n in lengths]
    naive = [_temporaries(attend, n) for n in lengths[:2]]
    assert all(b / a <= 2.2 for a, b in zip(blockwise, blockwise[1:])), blockwise
    assert naive[1] / naive[0] > 3.5, naive  # the scores [B, K, G, T, S]
    assert blockwise[1] < naive[1] / 4
    assert attention_kernel("auto", 4096, None) is blockwise_attend and attention_kernel("auto", 512, None) is attend


@pytest.mark.parametrize("kind", ["blockwise", "dot_product"])
def test_a_decoder_on_another_kernel_gives_the_naive_logits_and_decodes_unchanged(kind):
    from flax import nnx

    from rlhf_jax import models
    from rlhf_jax.models.decoder import set_attention

    config = models.config_from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "rms_norm_eps": 1e-5})
    model = models.build_model(config, "lm", rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 24), 0, 64)
    mask = jnp.ones_like(ids).at[1, :5].set(0)  # left padding
    naive = model(ids, mask)
    set_attention(model, kind)
    np.testing.assert_allclose(model(ids, mask), naive, atol=1e-5)
    with pytest.raises(ValueError, match="model.attention='splashy'"):
        set_attention(model, "splashy")

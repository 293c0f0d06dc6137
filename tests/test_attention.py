"""Every attention kernel equals the naive path (values and gradients, float32) with grouped
heads, padding, packed segments, a sliding window and a soft-cap -- splash in Pallas interpret
mode, on one device and per shard on a mesh; the blockwise kernel's compiled temporaries grow
about linearly with the length where the naive path's grow with its square."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models.attention import attention_kernel, blockwise_attend, compiling_for, dot_product_attend
from rlhf_jax.models.decoder import visibility
from rlhf_jax.models.layers import attend
from rlhf_jax.models.splash import splash_attend, splash_segments

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

B, T, H, K, D = 2, 40, 4, 2, 8


def _rows(case: str, length: int = T) -> tuple[jax.Array, jax.Array | None]:
    """``(attention_mask_BT, segment_ids_BT)``: the second row right-padded; ``packed``: two
    examples in a row."""
    lengths = jnp.asarray([length, length - 9])
    mask_BT = (jnp.arange(length)[None] < lengths[:, None]).astype(jnp.int32)
    segments = None
    if case == "packed":
        segments = jnp.where(mask_BT > 0, 1 + (jnp.arange(length)[None] >= 17), 0)
    return mask_BT, segments


def _mask(case: str) -> jax.Array:
    allowed = visibility(*_rows(case))
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


def _loss_on_real_queries(fn, mask_BT, q, k, v, *args, **kwargs):
    out = jnp.where(mask_BT.astype(bool)[..., None, None], fn(q, k, v, *args, **kwargs), 0)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out


@pytest.mark.parametrize("case", ["causal", "packed", "softcap"])
def test_splash_in_interpret_mode_equals_the_naive_path_on_real_queries(case):
    """Splash reads segment ids; T = 40 is padded to its 128-token tile inside. Padding queries,
    which no real token reads, are zero."""
    mask_BT, segment_ids_BT = _rows(case)
    softcap = 5.0 if case == "softcap" else None
    q, k, v = _inputs(1)
    reference = jax.value_and_grad(_loss_on_real_queries, argnums=(2, 3, 4), has_aux=True)
    (expected, out_ref), grads = reference(attend, mask_BT, q, k, v, visibility(mask_BT, segment_ids_BT),
                                           scale=D ** -0.5, softcap=softcap)
    (value, out), got = jax.jit(lambda *a: reference(splash_attend, mask_BT, *a, splash_segments(
        mask_BT, segment_ids_BT), scale=D ** -0.5, softcap=softcap))(q, k, v)
    np.testing.assert_allclose(out, out_ref, atol=1e-5)
    assert abs(float(value - expected)) < 1e-4
    for name, a, b in zip("qkv", grads, got):
        np.testing.assert_allclose(b, a, atol=1e-5, err_msg=name)
    padding = ~mask_BT.astype(bool)
    assert np.all(np.asarray(splash_attend(q, k, v, splash_segments(mask_BT, segment_ids_BT), scale=1.0))[padding] == 0)


def test_splash_on_a_mesh_runs_per_shard_and_equals_one_device():
    """Rows over data x fsdp, key/value heads over tensor (a 2 x 2 x 2 mesh of the 8 test
    devices): the kernel runs per shard, the same values and gradients as unsharded."""
    from rlhf_jax.models.sharding import activation_sharding
    from rlhf_jax.phases.config import MeshConfig
    from rlhf_jax.phases.setup import make_mesh

    mask_BT, segment_ids_BT = _rows("packed")
    segments_BT = splash_segments(mask_BT, segment_ids_BT)
    q, k, v = _inputs(2)
    grad = jax.value_and_grad(_loss_on_real_queries, argnums=(2, 3, 4), has_aux=True)
    run = jax.jit(lambda *a: grad(splash_attend, mask_BT, *a, segments_BT, scale=D ** -0.5))
    (_, expected), grads = run(q, k, v)
    with activation_sharding(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):
        (_, out), got = jax.jit(lambda *a: grad(splash_attend, mask_BT, *a, segments_BT, scale=D ** -0.5))(q, k, v)
        assert "shard_map" in str(jax.make_jaxpr(lambda *a: splash_attend(*a, segments_BT, scale=1.0))(q, k, v))
    np.testing.assert_allclose(out, expected, atol=1e-6)
    for name, a, b in zip("qkv", grads, got):
        np.testing.assert_allclose(b, a, atol=1e-6, err_msg=name)


def test_splash_refuses_what_segment_ids_cannot_describe_and_auto_takes_it_on_a_tpu():
    assert attention_kernel("auto", 512, None, windowed=True) is attend  # a CPU: never splash
    with compiling_for("tpu"):
        assert attention_kernel("auto", 512, 50.0).func is splash_attend
        assert attention_kernel("auto", 4096, None, windowed=True) is blockwise_attend
        with pytest.raises(ValueError, match="splash has no sliding windows"):
            attention_kernel("splash", 512, None, windowed=True)
    with compiling_for("gpu"), pytest.raises(ValueError, match="splash is a TPU kernel"):
        attention_kernel("splash", 512, None)


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


@pytest.mark.parametrize("kind", ["blockwise", "dot_product", "splash"])
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
    real = mask.astype(bool)[..., None]
    np.testing.assert_allclose(jnp.where(real, model(ids, mask), 0), jnp.where(real, naive, 0), atol=1e-5)
    with pytest.raises(ValueError, match="model.attention='splashy'"):
        set_attention(model, "splashy")


def test_splash_turns_shared_prompt_rows_off_and_refuses_them_or_a_sliding_window_by_name():
    """Segment ids cannot show one prompt to every response: ``data.shared_prompt: auto`` is
    off on splash and ``true`` a ConfigError; a model with sliding windows refuses splash."""
    from flax import nnx

    from rlhf_jax import models
    from rlhf_jax.config import ConfigError
    from rlhf_jax.models.decoder import set_attention
    from rlhf_jax.phases.config import resolved_shared_prompt

    shape = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5}
    model = models.build_model(models.config_from_hf({"model_type": "llama", **shape}), "lm", rngs=nnx.Rngs(0))
    assert resolved_shared_prompt("auto", "preference", model) is True
    set_attention(model, "splash")
    assert resolved_shared_prompt("auto", "preference", model) is False
    with pytest.raises(ConfigError, match="data.shared_prompt: true cannot run on model.attention's splash"):
        resolved_shared_prompt(True, "preference", model)
    windowed = models.build_model(models.config_from_hf({"model_type": "mistral", "sliding_window": 8, **shape}), "lm",
                                  rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="splash has no sliding windows"):
        set_attention(windowed, "splash")

"""Decode attention over a paged KV cache: the Pallas TPU paged-attention kernel (in Pallas TPU
interpret mode on the CPU) equals the reference attention over the gathered pages; the
continuous engine with it gives the static engine's completions; ``auto`` takes it only where
it runs exactly (a TPU target, a bfloat16 cache, a lane-wide head, no sliding windows) and an
explicit ``pallas`` the kernel cannot run is refused by name. That it compiles for a TPU slice
is in ``tests/test_plan.py`` (libtpu)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phase_runs import main_in_process
from rlhf_jax import models, rollout
from rlhf_jax.models.attention import compiling_for
from rlhf_jax.models.layers import attend
from rlhf_jax.models.paged_attention import compute_block, paged_attend, resolve_paged
from rlhf_jax.models.sharding import activation_sharding
from rlhf_jax.phases.config import MeshConfig
from rlhf_jax.phases.setup import make_mesh
from rlhf_jax.rollout.continuous import generate_continuous
from rlhf_jax.rollout.engine import ContinuousBatching

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

S, H, K, D, P, Z, M = 3, 4, 2, 128, 10, 4, 4


def _bf16_exact(x):
    """``x`` rounded to bfloat16 and back: the kernel reads keys and values as bfloat16 and its
    dots run at TPU default precision, so float32 inputs it can represent make it exact."""
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def _inputs():
    keys = jax.random.split(jax.random.key(0), 3)
    q_SHD = _bf16_exact(jax.random.normal(keys[0], (S, H, D)))
    k_KPZD, v_KPZD = (_bf16_exact(jax.random.normal(k, (K, P, Z, D))) for k in keys[1:])
    table_SM = jnp.asarray([[3, 7, P, P], [0, 1, 2, 9], [5, P, P, P]], jnp.int32)  # P: no page
    length_S = jnp.asarray([6, 16, 1], jnp.int32)  # mid-page, every page, one token
    return q_SHD, k_KPZD, v_KPZD, table_SM, length_S


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_the_kernel_equals_attention_over_the_gathered_pages(softcap):
    q_SHD, k_KPZD, v_KPZD, table_SM, length_S = _inputs()
    got = paged_attend(q_SHD, k_KPZD, v_KPZD, table_SM, length_S, scale=0.125, softcap=softcap)
    gathered_SKXD = [jnp.take(pages, table_SM, axis=1, mode="clip").transpose(1, 0, 2, 3, 4).reshape(S, K, M * Z, D)
                     for pages in (k_KPZD, v_KPZD)]
    allowed_S1X = (jnp.arange(M * Z)[None] < length_S[:, None])[:, None]
    expected = attend(q_SHD[:, None], *gathered_SKXD, allowed_S1X, scale=0.125, softcap=softcap)[:, 0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-6, rtol=2e-6)


def test_on_a_mesh_the_kernel_runs_per_shard_of_key_value_heads_and_equals_one_device():
    inputs = _inputs()
    expected = paged_attend(*inputs, scale=0.125)
    mesh = make_mesh(MeshConfig(data=4, fsdp=1, tensor=2))
    with activation_sharding(mesh):
        got = jax.jit(lambda *a: paged_attend(*a, scale=0.125))(*inputs)
    assert got.sharding.spec[1] == "tensor"  # query heads split with their key/value heads
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6)


def test_the_compute_block_is_the_most_pages_of_512_tokens_dividing_a_slots_pages():
    assert compute_block(12, 16) == 12 and compute_block(64, 16) == 32 and compute_block(7, 128) == 1
    assert compute_block(6, 128) == 3 and compute_block(1, 1024) == 1


def test_auto_takes_the_kernel_where_it_runs_exactly_and_pallas_is_refused_where_it_cannot_run():
    assert resolve_paged("auto", head_dim=128) == "gather"  # this CPU
    assert resolve_paged("pallas", head_dim=128, cache_dtype=jnp.float32) == "pallas"  # interpret mode
    with compiling_for("tpu"):
        assert resolve_paged("auto", head_dim=128) == "pallas"
        assert resolve_paged("auto", head_dim=128, cache_dtype=jnp.float32) == "gather"  # read as bf16: not exact
        assert resolve_paged("auto", head_dim=64) == "gather"
        assert resolve_paged("auto", head_dim=256, windowed=True) == "gather"
        with pytest.raises(ValueError, match="multiple of 128 .this model's is 64.; use gather or auto"):
            resolve_paged("pallas", head_dim=64)
        with pytest.raises(ValueError, match="no sliding windows"):
            resolve_paged("pallas", head_dim=128, windowed=True)
    with compiling_for("gpu"), pytest.raises(ValueError, match="pallas is a TPU kernel; on a GPU use gather"):
        resolve_paged("pallas", head_dim=128)
    with pytest.raises(ValueError, match="rollout.paged_attention='paged'; choose one of auto, gather, pallas"):
        ContinuousBatching(attention="paged")


def test_a_run_asking_for_the_kernel_a_model_cannot_take_exits_2_with_one_line(tmp_path, capsys):
    code, err = main_in_process(capsys, "grpo", "configs/grpo_tiny.yaml", f"output_dir={tmp_path}",
                                "rollout.engine=continuous", "rollout.paged_attention=pallas", "train.iterations=1",
                                "rollout.prompts=8",
                                "metrics.progress=false")  # heads 16 wide
    assert code == 2 and "needs a head size that is a multiple of 128 (this model's is 16)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_the_continuous_engine_with_the_kernel_gives_the_static_engines_completions():
    """A Llama of 128-wide heads (two query heads on one key/value head): tokens and stops
    equal, log-probs within the kernel's bfloat16 reading of the float32 cache."""
    hf = {"model_type": "llama", "vocab_size": 32, "hidden_size": 256, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "max_position_embeddings": 64}
    model = models.build_model(models.config_from_hf(hf), "lm", rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 32, size=(3, 7)).astype(np.int32)
    mask = (np.arange(7)[None] >= np.asarray([[0], [4], [6]])).astype(np.int32)  # left-padded: 7, 3, 1 tokens
    base = rollout.GenerationConfig(max_new_tokens=10, stop_token_ids=(0, 1), pad_token_id=0, num_samples=2,
                                    sampling=rollout.SamplingConfig(temperature=1.0), prompt_buckets=(8,))
    key = jax.random.key(4)
    expected = rollout.generate(model, ids, mask, key, base)
    paged = dataclasses.replace(base, continuous=ContinuousBatching(slots=2, page_size=4, attention="pallas"))
    got, _ = generate_continuous(model, ids, mask, key, paged)
    for field in ("completion_ids_BN", "completion_mask_BN", "stopped_B"):
        np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(expected, field)), field)
    assert np.asarray(expected.completion_mask_BN).sum() > 30  # a real decode, not stops at once
    np.testing.assert_allclose(np.asarray(got.logprobs_BN), np.asarray(expected.logprobs_BN), atol=2e-3)

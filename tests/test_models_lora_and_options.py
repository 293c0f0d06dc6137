"""LoRA (optimizer state for adapters only, merged export equal to the adapted model),
remat, and compute dtype separate from parameter dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hf_tiny import padded_batch, save_tiny, torch_forward, transformers

from rlhf_jax import models
from rlhf_jax.masked import masked_mean
from rlhf_jax.models.token_logprobs import sequence_logprobs


def lm_loss(model, ids, mask):
    logp = sequence_logprobs(model, ids, mask)
    return -masked_mean(logp, mask.at[:, 0].set(0))


@pytest.fixture
def tiny(tmp_path):
    save_tiny(tmp_path / "base", "llama")
    ids, mask = (jnp.asarray(a) for a in padded_batch("right"))
    return tmp_path, ids, mask


@pytest.mark.fast_compile  # compile-bound: tests/conftest.py
def test_lora_trains_adapters_only_and_merged_export_equals_adapted(tiny):
    tmp_path, ids, mask = tiny
    model = models.from_pretrained(tmp_path / "base")
    base_logits = np.asarray(model(ids, mask))
    base_state = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    models.apply_lora(model, ("q_proj", "v_proj"), rank=4, alpha=8.0, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(model(ids, mask)), base_logits)  # B = 0 at start

    assert models.trainable_filter(model) is nnx.LoRAParam
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    adapter_sizes = sorted(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    assert len(adapter_sizes) == 2 * 2 * 2  # layers x targets x (A, B)
    moments = [x.size for x in jax.tree.leaves(optimizer.opt_state) if x.ndim > 0]
    assert sorted(moments) == sorted(adapter_sizes * 2)  # Adam's mu and nu, nothing for the base

    loss_before = float(lm_loss(model, ids, mask))
    for _ in range(5):
        grads = nnx.grad(lm_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, ids, mask)
        optimizer.update(model, grads)
    assert float(lm_loss(model, ids, mask)) < loss_before
    frozen = [s for s in jax.tree.leaves(nnx.state(model, nnx.Not(nnx.LoRAParam)))]
    for before, after in zip(jax.tree.leaves(base_state), frozen):
        np.testing.assert_array_equal(before, np.asarray(after))

    adapted = np.asarray(model(ids, mask))
    assert np.abs(adapted - base_logits).max() > 1e-3
    merged = models.merge_lora(model)
    assert not any(isinstance(m, models.LoRALinear) for _, m in nnx.iter_modules(merged))
    np.testing.assert_allclose(np.asarray(merged(ids, mask)), adapted, atol=1e-5)
    models.save_pretrained(model, tmp_path / "merged")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    valid = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(torch_forward(exported, np.asarray(ids), np.asarray(mask))[valid], adapted[valid],
                               atol=1e-5)


def test_lora_names_unknown_targets(tiny):
    model = models.from_pretrained(tiny[0] / "base")
    with pytest.raises(ValueError, match=r"\['qproj'\] match no linear layer; the model has: down_proj, gate_proj"):
        models.apply_lora(model, ("qproj",), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: sliding-window and global layers alternate
def test_remat_gives_the_same_gradients(tmp_path, family):
    save_tiny(tmp_path / "base", family)
    ids, mask = (jnp.asarray(a) for a in padded_batch("right"))
    plain = models.from_pretrained(tmp_path / "base")
    remat = models.from_pretrained(tmp_path / "base", remat=True)
    grad = nnx.jit(nnx.grad(lm_loss))  # compiled: faster than eager
    g_plain, g_remat = grad(plain, ids, mask), grad(remat, ids, mask)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)

    def grad_jaxpr(model):
        graphdef, state = nnx.split(model)
        return str(jax.make_jaxpr(jax.grad(lambda s: lm_loss(nnx.merge(graphdef, s), ids, mask)))(state))

    assert "remat" in grad_jaxpr(remat) and "remat" not in grad_jaxpr(plain)


@pytest.mark.fast_compile  # compile-bound: tests/conftest.py
def test_remat_policies_keep_the_gradients_and_bound_the_activation_memory_in_order():
    """Every ``model.remat`` policy gives the plain gradients. The compiled gradient's scratch
    memory for 6 more layers, by XLA's own buffer assignment: ``block`` keeps about one
    block's input per layer (a Python loop of checkpointed blocks kept them all -- the scan
    is what bounds it), ``save_dots`` the projections' outputs too, ``offload`` moves those
    to host memory (one memory on a CPU: not measured here); ``none`` every activation."""
    config_of = lambda layers: models.config_from_hf({  # noqa: E731
        "model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 256,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5})
    ids = jnp.ones((4, 128), jnp.int32)

    def gradient(layers, remat):
        graphdef, state = nnx.split(models.build_model(config_of(layers), "lm", rngs=nnx.Rngs(0), remat=remat))
        grad = jax.jit(jax.grad(lambda s: jnp.sum(sequence_logprobs(nnx.merge(graphdef, s), ids, jnp.ones_like(ids)))))
        return grad, state

    def temp_bytes(layers, remat):
        grad, state = gradient(layers, remat)
        return grad.lower(state).compile().memory_analysis().temp_size_in_bytes

    cost = {policy: temp_bytes(5, policy) - temp_bytes(2, policy) for policy in ("none", "block", "save_dots")}
    assert cost["block"] < 0.2 * cost["none"], cost  # for 3 more layers
    assert cost["block"] < cost["save_dots"] < 0.5 * cost["none"], cost
    grad, state = gradient(2, "none")
    plain = jax.tree.leaves(grad(state))
    for policy in ("save_dots", "offload"):  # block: test_remat_gives_the_same_gradients
        grad, state = gradient(2, policy)
        for a, b in zip(plain, jax.tree.leaves(grad(state))):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6, err_msg=policy)  # float32
    with pytest.raises(ValueError, match="model.remat='dots'; choose one of none, block, save_dots, offload"):
        models.build_model(config_of(1), "lm", rngs=nnx.Rngs(0), remat="dots")


def test_compute_dtype_is_separate_from_parameter_dtype(tiny):
    tmp_path, ids, mask = tiny
    fp32 = np.asarray(models.from_pretrained(tmp_path / "base")(ids, mask))
    mixed = models.from_pretrained(tmp_path / "base", dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(mixed))} == {jnp.dtype(jnp.float32)}
    bf16 = models.from_pretrained(tmp_path / "base", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16))} == {jnp.dtype(jnp.bfloat16)}
    valid = np.asarray(mask).astype(bool)
    for model in (mixed, bf16):
        logits = model(ids, mask)
        assert logits.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(logits, np.float32)[valid], fp32[valid], atol=0.05)

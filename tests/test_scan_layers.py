"""Decoder blocks stored stacked and run by one ``lax.scan`` (``scan_layers``): the same
gradients as the Python loop (with and without remat), one block traced whatever the depth,
LoRA adapters one pair per layer, and checkpoints in the per-layer Hugging Face layout.
(Logits, cached decode and the transformers round trip: tests/test_models_parity.py.)"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_tiny import padded_batch, save_tiny

from rlhf_jax import models
from rlhf_jax.models.token_logprobs import sequence_logprobs
from rlhf_jax.models.decoder import SCAN_LAYERS_AUTO

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

LAYERS = 3


def loss(model, ids, mask):
    return -sequence_logprobs(model, ids, mask).sum() / mask.sum()


def close(got, want):  # float32 sums in another order: within 1e-5, relative for gradients of ~30
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def outside_blocks(grads) -> dict:
    """Every gradient but the blocks' (embeddings, final norm, head)."""
    tree = nnx.to_pure_dict(grads)
    return {k: v for k, v in tree.items() if k != "model"} | {k: v for k, v in tree["model"].items() if k != "layers"}


def per_layer(tree, layers: int) -> list:
    """A stacked tree's rows, one per layer."""
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(layers)]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])  # gemma2: sliding-window and global layers alternate
def test_scanned_gradients_equal_the_python_loop(tmp_path, family):
    save_tiny(tmp_path, family, num_hidden_layers=LAYERS)
    ids, mask = (jnp.asarray(a) for a in padded_batch("left"))
    loop = models.from_pretrained(tmp_path, scan_layers=False)
    grad, forward = nnx.jit(nnx.grad(loss)), nnx.jit(lambda m, ids, mask: m(ids, mask))  # compiled: faster than eager
    expected = grad(loop, ids, mask)
    for remat in (False, True):
        scanned = models.from_pretrained(tmp_path, scan_layers=True, remat=remat)
        np.testing.assert_allclose(np.asarray(forward(scanned, ids, mask)), np.asarray(forward(loop, ids, mask)),
                                   atol=1e-5)
        grads = grad(scanned, ids, mask)
        for got, want in zip(per_layer(nnx.to_pure_dict(grads["model"]["layers"]), LAYERS),
                             [nnx.to_pure_dict(expected["model"]["layers"][i]) for i in range(LAYERS)]):
            jax.tree.map(close, got, want)
        jax.tree.map(close, outside_blocks(grads), outside_blocks(expected))


def _dot_count(jaxpr) -> int:
    """``dot_general`` equations in a jaxpr and all its sub-jaxprs (scan bodies, checkpoints)."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "dot_general"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _dot_count(sub)
    return count


def test_a_scanned_step_traces_one_block_whatever_the_depth():
    ids, mask = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32)

    def dots(layers: int, scan: bool) -> int:
        config = models.config_from_hf({"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
                                        "intermediate_size": 32, "num_hidden_layers": layers,
                                        "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5})
        model = models.build_model(config, "lm", rngs=nnx.Rngs(0), scan_layers=scan)
        graphdef, state = nnx.split(model)
        step = jax.grad(lambda s: loss(nnx.merge(graphdef, s), ids, mask))
        return _dot_count(jax.make_jaxpr(step)(state).jaxpr)

    assert dots(2, True) == dots(8, True)
    assert dots(8, False) > dots(2, False)


def test_scan_layers_defaults_on_from_a_few_layers():
    def decoder(layers):
        config = models.config_from_hf({"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
                                        "intermediate_size": 32, "num_hidden_layers": layers,
                                        "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5})
        return models.build_model(config, "lm", rngs=nnx.Rngs(0)).model

    assert not decoder(SCAN_LAYERS_AUTO - 1).scan_layers and isinstance(decoder(SCAN_LAYERS_AUTO - 1).layers, nnx.List)
    deep = decoder(SCAN_LAYERS_AUTO)
    assert deep.scan_layers and deep.layers.attn.q_proj.kernel[...].shape == (SCAN_LAYERS_AUTO, 16, 16)


def test_lora_on_stacked_blocks_is_one_adapter_pair_per_layer(tmp_path):
    save_tiny(tmp_path / "base", "llama", num_hidden_layers=LAYERS)
    ids, mask = (jnp.asarray(a) for a in padded_batch("right"))
    model = models.from_pretrained(tmp_path / "base", scan_layers=True)
    base_logits = np.asarray(model(ids, mask))
    models.apply_lora(model, ("q_proj", "down_proj"), rank=4, alpha=8.0, rngs=nnx.Rngs(0))
    q = model.model.layers.attn.q_proj
    a = np.asarray(q.lora_a[...])
    assert a.shape == (LAYERS, 32, 4) and q.lora_b[...].shape == (LAYERS, 4, 32)
    bound = 1 / np.sqrt(32)  # torch's kaiming_uniform(a=sqrt 5) over each layer's fan-in of 32
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert not np.allclose(a[0], a[1])  # each layer its own draw
    np.testing.assert_array_equal(np.asarray(model(ids, mask)), base_logits)  # B = 0 at start

    for adapter in (q, model.model.layers.mlp.down_proj):  # a trained state: every B non-zero
        adapter.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(1), adapter.lora_b[...].shape))
    adapted = np.asarray(model(ids, mask))
    assert np.abs(adapted - base_logits).max() > 1e-3
    np.testing.assert_allclose(np.asarray(models.merge_lora(model)(ids, mask)), adapted, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(models.without_lora(model)(ids, mask)), base_logits)
    models.save_pretrained(model, tmp_path / "merged")  # per-layer HF tensors, read back unscanned
    reread = models.from_pretrained(tmp_path / "merged", scan_layers=False)
    np.testing.assert_allclose(np.asarray(reread(ids, mask)), adapted, atol=1e-5)

"""Llama-family logits against transformers (torch, CPU, fp32) on left- and right-padded
batches; loading errors. Tiny random configs built with transformers and saved locally."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models

torch = pytest.importorskip("torch", reason="parity tests need the `parity` extra (CPU torch)")
transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False),
    "llama3_scaled_tied": lambda: transformers.LlamaConfig(
        **COMMON,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ),
    "mistral_window": lambda: transformers.MistralConfig(**COMMON, sliding_window=4),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
}


def save_tiny(tmp_path, family):
    torch.manual_seed(0)
    config = FAMILIES[family]()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def padded_batch(padding_side):
    rng = np.random.default_rng(1)
    lengths = [9, 5, 1, 7]
    ids = np.zeros((4, 9), np.int64)
    mask = np.zeros((4, 9), np.int64)
    for b, n in enumerate(lengths):
        span = slice(9 - n, 9) if padding_side == "left" else slice(0, n)
        ids[b, span] = rng.integers(1, 97, size=n)
        mask[b, span] = 1
    return ids, mask


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(tmp_path, family, padding_side):
    reference = save_tiny(tmp_path, family)
    model = models.from_pretrained(tmp_path)
    ids, mask = padded_batch(padding_side)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        expected = reference(
            input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), position_ids=torch.as_tensor(positions)
        ).logits.numpy()
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(logits[valid], expected[valid], atol=1e-4, rtol=1e-4)


def test_left_padding_does_not_change_real_token_logits(tmp_path):
    save_tiny(tmp_path, "llama")
    model = models.from_pretrained(tmp_path)
    ids, mask = padded_batch("left")
    padded = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    alone = np.asarray(model(jnp.asarray(ids[1:2, 4:]), jnp.ones((1, 5), jnp.int32)))
    np.testing.assert_allclose(padded[1, 4:], alone[0], atol=1e-5)


def test_unsupported_model_type_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    with pytest.raises(ValueError, match="unsupported model_type 'falcon'; supported: llama, mistral, qwen2"):
        models.from_pretrained(tmp_path)


def test_mis_shaped_and_missing_tensors_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    save_tiny(tmp_path, "llama")
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((63, 32), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(models.CheckpointError, match=r"model.layers.1.mlp.up_proj.weight.*\(63, 32\).*\(64, 32\)"):
        models.from_pretrained(tmp_path)
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(models.CheckpointError, match="'model.norm.weight' is missing"):
        models.from_pretrained(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    reference = save_tiny(tmp_path, "llama")
    (tmp_path / "model.safetensors").unlink()
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(models.CheckpointError, match="pytorch_model.bin.*refused"):
        models.from_pretrained(tmp_path)

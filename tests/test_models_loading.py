"""Loading policy: named errors, reward/critic initialisation from a causal LM, sharded
index files, checkpoints of the bare base model, and placement onto a device mesh."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_tiny import padded_batch, save_tiny, torch, transformers
from jax.sharding import AxisType, PartitionSpec
from safetensors.numpy import load_file, save_file

from rlhf_jax import models
from rlhf_jax.models.sharding import DEFAULT_RULES, ShardingError


def test_unsupported_model_type_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    with pytest.raises(ValueError, match="unsupported model_type 'falcon'; supported: bert, gemma, gemma2, gpt2, llama"):
        models.from_pretrained(tmp_path)


def test_mis_shaped_and_missing_tensors_are_named(tmp_path):
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


def test_score_head_from_causal_lm_keeps_the_decoder(tmp_path, caplog):
    save_tiny(tmp_path, "qwen2")
    lm = models.from_pretrained(tmp_path)
    with caplog.at_level(logging.INFO):
        rm = models.from_pretrained(tmp_path, head="score")
    assert "score.weight is not in the checkpoint" in caplog.text
    ids, mask = (jnp.asarray(a) for a in padded_batch("right"))
    np.testing.assert_array_equal(np.asarray(rm.model(ids, mask)), np.asarray(lm.model(ids, mask)))
    std = float(jnp.std(rm.score.kernel[...]))
    assert 0.01 < std < 0.04  # N(0, 0.02^2) over 32 draws
    critic = models.ScoreModel.from_causal_lm(lm, rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(np.asarray(critic.model(ids, mask)), np.asarray(lm.model(ids, mask)))
    critic.model.norm.scale[...] = 0.0  # a copy: training the critic leaves the policy alone
    assert float(jnp.abs(lm.model.norm.scale[...]).sum()) > 0


def test_sharded_index_and_base_model_checkpoints_load(tmp_path):
    reference = save_tiny(tmp_path / "one", "gpt2")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    reference.transformer.save_pretrained(tmp_path / "base")  # names without "transformer."
    ids, mask = (jnp.asarray(a) for a in padded_batch("left"))
    expected = np.asarray(models.from_pretrained(tmp_path / "one")(ids, mask))
    for variant in ("sharded", "base"):
        got = np.asarray(models.from_pretrained(tmp_path / variant, head="lm")(ids, mask))
        np.testing.assert_array_equal(got, expected)


def test_save_pretrained_shards_large_checkpoints(tmp_path):
    save_tiny(tmp_path / "in", "llama")
    model = models.from_pretrained(tmp_path / "in")
    models.save_pretrained(model, tmp_path / "out", max_shard_bytes=30_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(reloaded.model.norm.weight, torch.as_tensor(np.array(model.model.norm.scale[...])))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_loading_onto_a_mesh_places_each_parameter_by_the_rules(tmp_path, scan_layers):
    save_tiny(tmp_path, "llama")
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    with pytest.raises(ShardingError, match=r"model.embed_tokens.weight: dimension 0 \(vocab, size 97\) does not divide over mesh axis tensor of "
                                            r"size 4 \(rule vocab -> tensor\)"):
        models.from_pretrained(tmp_path, mesh=mesh, scan_layers=scan_layers)  # never a silent replication
    rules = dict(DEFAULT_RULES) | {"vocab": None}
    sharded = models.from_pretrained(tmp_path, mesh=mesh, rules=rules, scan_layers=scan_layers)
    plain = models.from_pretrained(tmp_path, scan_layers=scan_layers)
    # [embed, heads] = [32, 32] per layer; stacked [layers, embed, heads], the layer axis replicated
    attn, lead = (sharded.model.layers.attn, (None,)) if scan_layers else (sharded.model.layers[0].attn, ())
    q = attn.q_proj.kernel[...]
    assert q.sharding.spec == PartitionSpec(*lead, "fsdp", "tensor")
    assert {s.data.shape for s in q.addressable_shards} == {(2,) * len(lead) + (16, 8)}
    assert attn.k_proj.kernel[...].sharding.spec == PartitionSpec(*lead, "fsdp", "tensor")  # [embed, kv]
    assert sharded.lm_head.kernel[...].sharding.spec == PartitionSpec("fsdp", None)  # vocab -> null: replicated
    for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(plain))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids, mask = (jnp.asarray(a) for a in padded_batch("left"))
    graphdef, state = nnx.split(sharded)
    logits = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))(state, ids, mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(plain(ids, mask)), atol=1e-5)


def test_bfloat16_checkpoints_round_trip_bit_exactly(tmp_path):
    reference = save_tiny(tmp_path / "fp32", "llama").to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "bf16")
    model = models.from_pretrained(tmp_path / "bf16", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    models.save_pretrained(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name

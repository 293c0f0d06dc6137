"""The mesh data x fsdp x tensor: a step on any mesh shape equals the one-device step;
parameters and activations are placed by the rules; a rule that cannot hold is a config
error naming both sides, never a silent replication."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from phase_runs import checkpoint_arrays, cli, main_in_process
from test_train_steps import pair_batch, sft_batch

from rlhf_jax import models, train
from rlhf_jax.config import ConfigError
from rlhf_jax.models.sharding import activation_sharding, activation_spec, constrain, place
from rlhf_jax.phases.config import MeshConfig
from rlhf_jax.phases.setup import make_mesh

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]  # data x fsdp x tensor


def tiny(head: str, seed: int = 0):
    """Every sharded size divides 8: vocab 32, embed 64, heads 8 x 8, kv 2 x 8, mlp 128."""
    config = models.config_from_hf({"model_type": "llama", "vocab_size": 32, "hidden_size": 64,
                                    "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 8,
                                    "num_key_value_heads": 2, "rms_norm_eps": 1e-5})
    return models.build_model(config, head, rngs=nnx.Rngs(seed))


def _steps(loss_fn, head, batch, mesh=None):
    """Two SGD steps (Adam's first steps amplify float-order noise: see test_train_steps)."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    state = train.TrainState.create(tiny(head), tx, jax.random.key(0))
    step = jax.jit(train.make_train_step(loss_fn, tx))
    if mesh is not None:
        state = place(state, mesh)
        batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"))))
    for _ in range(2):
        state, metrics = step(state, batch)
    return state, float(metrics["loss"])


@functools.cache
def _dpo_batch():
    reference = tiny("lm", seed=1)
    return jax.jit(jax.vmap(lambda b: train.reference_logps(reference, b)))(pair_batch(16, 0, micro=2))


PHASES = {"sft": (train.sft_loss_sums, "lm", lambda: sft_batch(16, micro=2)),
          "rm": (train.rm_loss_sums, "score", lambda: pair_batch(16, 0, micro=2)),
          "dpo": (train.dpo_loss_sums, "lm", _dpo_batch)}


@pytest.fixture(scope="module")
def one_device():
    return {name: _steps(loss_fn, head, batch()) for name, (loss_fn, head, batch) in PHASES.items()}


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sft_rm_and_dpo_steps_on_any_mesh_equal_one_device(one_device, shape):
    data, fsdp, tensor = shape
    with activation_sharding():  # as a run holds it: the step traced with the decoder's constraints
        mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
        for name, (loss_fn, head, batch) in PHASES.items():
            state, loss = _steps(loss_fn, head, batch(), mesh)
            expected, expected_loss = one_device[name]
            assert loss == pytest.approx(expected_loss, rel=1e-5), name
            for a, b in zip(jax.tree.leaves(expected.params), jax.tree.leaves(state.params), strict=True):
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, err_msg=name)
    # the parameters follow the rules: embed over fsdp, heads / kv / mlp / vocab over tensor
    attn, mlp = state.params["model"]["layers"][0]["attn"], state.params["model"]["layers"][0]["mlp"]
    for array, spec in ((attn["q_proj"]["kernel"], ("fsdp", "tensor")), (attn["k_proj"]["kernel"], ("fsdp", "tensor")),
                        (attn["o_proj"]["kernel"], ("tensor", "fsdp")), (mlp["down_proj"]["kernel"], ("tensor", "fsdp")),
                        (state.params["model"]["embed_tokens"]["embedding"], ("tensor", "fsdp"))):
        assert array.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, PartitionSpec(*spec)), 2), spec
    assert attn["q_proj"]["kernel"].addressable_shards[0].data.shape == (64 // fsdp, 64 // tensor)


def test_activations_follow_the_rules():
    with activation_sharding():
        mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
        x = jnp.zeros((8, 12, 8, 16))
        constrained = jax.jit(lambda x: constrain(x, ("batch", None, "heads", None)))(x)
        expected = jax.sharding.NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor", None))
        assert constrained.sharding.is_equivalent_to(expected, 4)
    # rows that do not divide, and a dimension the axis does not divide, stay whole (activations may)
    assert activation_spec(("batch", None, "heads"), (3, 12, 5), mesh) == PartitionSpec(None, None, None)
    assert activation_spec(("batch", None, "vocab"), (8, 1, 32), mesh) == PartitionSpec(("data", "fsdp"), None,
                                                                                         "tensor")
    outside = jax.jit(lambda x: constrain(x, ("batch", None, "heads", None)))(x)  # no scope: left to XLA
    assert outside.sharding.is_fully_replicated


def test_mesh_sizes_and_rules_that_cannot_hold_are_config_errors():
    with pytest.raises(ConfigError, match="data=2 x fsdp=2 x tensor=3 does not cover the 8 devices"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=3))
    with pytest.raises(ConfigError, match="fsdp=3 x tensor=1 does not divide the 8 devices, so mesh.data=-1"):
        make_mesh(MeshConfig(fsdp=3))
    with pytest.raises(ValueError, match="the rule vocab -> 'model' names an axis the mesh lacks"):
        MeshConfig(rules={"vocab": "model"})
    with pytest.raises(ValueError, match="'heeds' is no logical axis"):
        MeshConfig(rules={"heeds": "tensor"})
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    with pytest.raises(ConfigError, match=r"parameter lm_head.kernel: dimension 1 \(vocab, size 30\) "
                                          r"does not divide over mesh axis tensor of size 4"):
        place(nnx.state(models.build_model(models.config_from_hf({
            "model_type": "llama", "vocab_size": 30, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 4,
            "rms_norm_eps": 1e-5}), "lm", rngs=nnx.Rngs(0))), mesh)


TINY_INIT = "model.init.vocab_size=264"  # the byte tokenizer's 258 ids, padded to a multiple of 8


@pytest.mark.slow
@pytest.mark.parametrize("phase, config, shape", [("grpo", "configs/grpo_tiny.yaml", (2, 2, 2)),
                                                  ("ppo", "configs/ppo_tiny.yaml", (1, 2, 4))])
def test_online_iterations_through_the_cli_on_a_mesh_equal_one_device(tmp_path, phase, config, shape):
    # Adam with a large eps: a near-zero gradient's float-order noise is not amplified to an lr-sized step
    common = [TINY_INIT, "train.iterations=2", "checkpoint.every=2", "checkpoint.export_hf=false",
              "metrics.progress=false", "train.optimizer.eps=1e-3",
              *(["train.critic_optimizer.eps=1e-3"] if phase == "ppo" else [])]
    one = cli(phase, config, f"output_dir={tmp_path / 'one'}", *common, devices=1)
    assert one.returncode == 0, one.stderr
    data, fsdp, tensor = shape
    many = cli(phase, config, f"output_dir={tmp_path / 'mesh'}", *common, f"mesh.data={data}", f"mesh.fsdp={fsdp}",
               f"mesh.tensor={tensor}", devices=8)
    assert many.returncode == 0, many.stderr
    expected, got = checkpoint_arrays(tmp_path / "one", 2), checkpoint_arrays(tmp_path / "mesh", 2)
    trained = [("policy", "params")] + ([("critic", "params")] if phase == "ppo" else [])
    for role, part in trained:
        for a, b in zip(jax.tree.leaves(expected[role][part]), jax.tree.leaves(got[role][part]), strict=True):
            np.testing.assert_allclose(b, a, atol=1e-5, err_msg=role)
    np.testing.assert_allclose(got["kl_controller"]["beta"], expected["kl_controller"]["beta"], atol=1e-7)


def test_a_rule_that_cannot_hold_exits_2_with_one_line(tmp_path, capsys):
    code, odd = main_in_process(capsys, "sft", "configs/sft_tiny.yaml", f"output_dir={tmp_path / 'a'}", "mesh.tensor=4",
                                "mesh.data=2", "metrics.progress=false")
    assert code == 2 and len(odd.strip().splitlines()) == 1, odd
    assert "(vocab, size 258) does not divide over mesh axis tensor of size 4 (rule vocab -> tensor)" in odd
    code, absent = main_in_process(capsys, "sft", "configs/sft_tiny.yaml", f"output_dir={tmp_path / 'b'}",
                                   "mesh.rules.mlp=model")
    assert code == 2 and "the rule mlp -> 'model' names an axis the mesh lacks" in absent

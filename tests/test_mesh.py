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
from phase_runs import FAST_COMPILE_OPTIONS, QUIET, checkpoint_arrays, cli, cli_hosts, cli_in_turn, main_in_process
from test_train_steps import pair_batch, sft_batch

from rlhf_jax import models, rl, train
from rlhf_jax.models.pure_jit import pure_jit
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


SGD = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))  # Adam's first steps amplify float-order noise


def _steps(loss_fn, head, batch, mesh=None):
    """``(params, loss)`` after two SGD steps of an offline phase (see test_train_steps)."""
    state = train.TrainState.create(tiny(head), SGD, jax.random.key(0))
    step = jax.jit(train.make_train_step(loss_fn, SGD), compiler_options=FAST_COMPILE_OPTIONS)
    if mesh is not None:
        state = place(state, mesh)
        batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"))))
    for _ in range(2):
        state, metrics = step(state, batch)
    return state.params, float(metrics["loss"])


@functools.cache
def _dpo_batch():
    reference = tiny("lm", seed=1)
    return jax.jit(jax.vmap(lambda b: train.reference_logps(reference, b)))(pair_batch(16, 0, micro=2))


PROMPT, WIDTH = 4, 12  # a rollout's prompt width and its prompt + completion width
PPO = rl.PPOConfig(epochs=1, minibatches=2)
GRPO, GROUPS = rl.GRPOConfig(epochs=1, minibatches=2), rl.UpdateContext(group_size=4, kl_in_loss=True)


@functools.cache
def _experience(algorithm: str):
    """One rollout's experience, made on one device: 16 completions of 2..8 tokens after a
    4-token prompt, random scores; GRPO's in groups of 4 with the KL as a loss term."""
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, 32, (16, WIDTH)), jnp.int32)
    ends = PROMPT + rng.integers(2, 9, (16, 1))
    positions = np.arange(WIDTH)
    mask, actions = jnp.asarray(positions < ends, jnp.int32), jnp.asarray((positions >= PROMPT) & (positions < ends))
    scores = jnp.asarray(rng.normal(size=16), jnp.float32)
    if algorithm == "ppo":
        make = functools.partial(rl.make_experience, config=PPO, prompt_width=PROMPT)
        return pure_jit(make, compiler_options=FAST_COMPILE_OPTIONS)(tiny("lm"), tiny("lm", 1), tiny("score", 2), ids, mask,
                                                                    actions, scores, 0.05)[0]
    make = functools.partial(rl.make_group_experience, config=GRPO, prompt_width=PROMPT, context=GROUPS,
                             estimator="grpo")
    return pure_jit(make, compiler_options=FAST_COMPILE_OPTIONS)(tiny("lm"), tiny("lm", 1), ids, mask, actions, scores,
                                                                0.05)[0]


def _update(algorithm: str, mesh=None):
    """``(params, loss)`` after one PPO or GRPO update on :func:`_experience` (two SGD
    minibatches; PPO's params are the policy's and the critic's)."""
    states = [train.TrainState.create(tiny("lm"), SGD, jax.random.key(0))]
    if algorithm == "ppo":
        states.append(train.TrainState.create(tiny("score", 2), SGD, jax.random.key(1)))
    experience = _experience(algorithm)
    if mesh is not None:
        states = [place(state, mesh) for state in states]
        experience = jax.device_put(experience, jax.sharding.NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    if algorithm == "ppo":
        update = jax.jit(functools.partial(rl.ppo_update, policy_tx=SGD, critic_tx=SGD, config=PPO),
                         compiler_options=FAST_COMPILE_OPTIONS)
        *states, metrics = update(*states, experience, jax.random.key(4), 0.05)
    else:
        update = jax.jit(functools.partial(rl.critic_free_update, policy_tx=SGD, config=GRPO, context=GROUPS),
                         compiler_options=FAST_COMPILE_OPTIONS)
        *states, metrics = update(*states, experience, jax.random.key(4), 0.05)
    return [state.params for state in states], float(metrics["policy_loss"][-1])


RUNS = {"sft": functools.partial(_steps, train.sft_loss_sums, "lm", sft_batch(16, micro=2)),
        "rm": functools.partial(_steps, train.rm_loss_sums, "score", pair_batch(16, 0, micro=2)),
        "dpo": lambda mesh=None: _steps(train.dpo_loss_sums, "lm", _dpo_batch(), mesh),
        "ppo": functools.partial(_update, "ppo"), "grpo": functools.partial(_update, "grpo")}


@pytest.fixture(scope="module")
def one_device():
    return {name: run() for name, run in RUNS.items()}


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_every_phases_step_on_any_mesh_equals_one_device(one_device, shape):
    data, fsdp, tensor = shape
    with activation_sharding():  # as a run holds it: the step traced with the decoder's constraints
        mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
        for name, run in RUNS.items():
            params, loss = run(mesh=mesh)
            expected, expected_loss = one_device[name]
            assert loss == pytest.approx(expected_loss, rel=1e-5, abs=1e-7), name
            for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params), strict=True):
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, err_msg=name)
            if name == "sft":
                sft_params = params
    # the parameters follow the rules: embed over fsdp, heads / kv / mlp / vocab over tensor
    attn, mlp = sft_params["model"]["layers"][0]["attn"], sft_params["model"]["layers"][0]["mlp"]
    for array, spec in ((attn["q_proj"]["kernel"], ("fsdp", "tensor")), (attn["k_proj"]["kernel"], ("fsdp", "tensor")),
                        (attn["o_proj"]["kernel"], ("tensor", "fsdp")), (mlp["down_proj"]["kernel"], ("tensor", "fsdp")),
                        (sft_params["model"]["embed_tokens"]["embedding"], ("tensor", "fsdp"))):
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
ONE_BLOCK = "model.init.num_hidden_layers=1"  # every rule holds in one block as in two: half the compile
OFFLINE = ["train.steps=2", "train.optimizer.warmup_steps=1", *QUIET]
ONLINE = ["train.iterations=2", "rollout.prompts=8", "rollout.max_new_tokens=8", "metrics.progress=false"]  # rows over 8
CLI_RUNS = {"sft": ("configs/sft_tiny.yaml", OFFLINE, (("params",),)),
            "rm": ("configs/rm_tiny.yaml", OFFLINE, (("params",),)),
            "dpo": ("configs/dpo_tiny.yaml", OFFLINE, (("params",),)),
            "ppo": ("configs/ppo_tiny.yaml", [*ONLINE, "train.critic_optimizer.eps=1e-3"],
                    (("policy", "params"), ("critic", "params"))),
            "grpo": ("configs/grpo_tiny.yaml", ONLINE, (("policy", "params"),))}


HOSTS = ("sft", "ppo", "grpo")  # also on four hosts; DPO's four-host run is tests/test_multihost.py's


@pytest.mark.slow
@pytest.mark.parametrize("phase", CLI_RUNS)
def test_every_phase_through_the_cli_on_the_five_meshes_and_four_hosts_equals_one_device(tmp_path, phase):
    """Two steps (iterations) of ``rlhf-jax PHASE`` on one device, then on each mesh of
    :data:`MESHES` in turn (one process of 8 devices runs the five): the checkpoints equal.
    SFT, PPO and GRPO also run on four processes joined by ``jax.distributed``, two devices
    each, on the 2x4x1 mesh: the checkpoint equals the one process's on the same mesh, and
    process 0 alone exports."""
    config, options, trained = CLI_RUNS[phase]
    # Adam with a large eps: a near-zero gradient's float-order noise is not amplified to an lr-sized step
    common = [phase, config, TINY_INIT, ONE_BLOCK, *options, "checkpoint.every=2", "train.optimizer.eps=1e-3",
              "data.eval_size=0"]
    one = cli(*common, "checkpoint.export_hf=false", f"output_dir={tmp_path / 'one'}", devices=1)
    assert one.returncode == 0, one.stderr
    meshes = {"x".join(map(str, shape)): shape for shape in MESHES}
    mesh_args = {name: [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"]
                 for name, (data, fsdp, tensor) in meshes.items()}
    many = cli_in_turn([[*common, "checkpoint.export_hf=false", f"output_dir={tmp_path / name}", *args]
                        for name, args in mesh_args.items()], devices=8)
    assert many.returncode == 0, many.stderr[-3000:]

    def assert_equal(expected_dir, got_dir, what):
        expected, got = checkpoint_arrays(expected_dir, 2), checkpoint_arrays(got_dir, 2)
        for path in trained:
            a, b = functools.reduce(dict.__getitem__, path, expected), functools.reduce(dict.__getitem__, path, got)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                np.testing.assert_allclose(y, x, atol=1e-5, err_msg=f"{what} {path}")

    for name in meshes:
        assert_equal(tmp_path / "one", tmp_path / name, name)
    if phase in HOSTS:
        hosts = cli_hosts(*common, f"output_dir={tmp_path / 'hosts'}", *mesh_args["2x4x1"], processes=4, devices=2)
        assert all(run.returncode == 0 for run in hosts), "\n".join(run.stderr[-1500:] for run in hosts)
        assert_equal(tmp_path / "2x4x1", tmp_path / "hosts", "four hosts")
        assert (tmp_path / "hosts" / "hf" / "model.safetensors").exists()
        assert "exported" in hosts[0].stdout and not any("exported" in run.stdout for run in hosts[1:])


def test_a_rule_that_cannot_hold_exits_2_with_one_line(tmp_path, capsys):
    code, odd = main_in_process(capsys, "sft", "configs/sft_tiny.yaml", f"output_dir={tmp_path / 'a'}", "mesh.tensor=4",
                                "mesh.data=2", "metrics.progress=false")
    assert code == 2 and len(odd.strip().splitlines()) == 1, odd
    assert "(vocab, size 258) does not divide over mesh axis tensor of size 4 (rule vocab -> tensor)" in odd
    code, absent = main_in_process(capsys, "sft", "configs/sft_tiny.yaml", f"output_dir={tmp_path / 'b'}",
                                   "mesh.rules.mlp=model")
    assert code == 2 and "the rule mlp -> 'model' names an axis the mesh lacks" in absent

"""Micro-batches in the online update: each minibatch's gradient accumulated over micro-batches
equals the whole minibatch's, also when they hold different numbers of tokens and rows with
none; a micro-batch count that does not divide a minibatch is refused by name."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from rl_tiny import NEW, critic_free_configs, rollout, target_fraction, tiny

from rlhf_jax import config, rl
from rlhf_jax.masked import AGGREGATIONS, aggregate, aggregation_weight
from rlhf_jax.phases.online import check_config
from rlhf_jax.phases.online_config import OnlineConfig
from rlhf_jax.train import TrainState

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

GROUP = 4


def uneven(action_mask_BT):
    """Completions cut to lengths 0..7 by row (row 0 empty): the micro-batches' token counts differ."""
    action_mask_BT = np.asarray(action_mask_BT)
    kept_BT = np.cumsum(action_mask_BT, axis=1) <= np.arange(action_mask_BT.shape[0])[:, None]
    return jnp.asarray(action_mask_BT * kept_BT)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_weighted_micro_batch_aggregates_are_the_batch_aggregate(mode):
    rng = np.random.default_rng(0)
    values_BT = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    mask_BT = uneven(np.ones((8, 6)))
    micro = [slice(0, 2), slice(2, 3), slice(3, 8)]  # unequal sizes too
    weights = [float(aggregation_weight(mask_BT[m], mode)) for m in micro]
    parts = [float(aggregate(values_BT[m], mask_BT[m], mode, normalizer=3.0)) for m in micro]
    combined = sum(w * p for w, p in zip(weights, parts)) / sum(weights)
    np.testing.assert_allclose(combined, float(aggregate(values_BT, mask_BT, mode, normalizer=3.0)), rtol=1e-6)
    by_hand = {"token_mean": 28.0, "seq_mean_token_mean": 7.0, "seq_sum": 8.0}  # lengths 0..6 (capped at 6)
    np.testing.assert_allclose(float(aggregation_weight(mask_BT, mode)), by_hand[mode] if mode != "token_mean"
                               else sum(min(i, 6) for i in range(8)))


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_critic_free_micro_batches_give_the_minibatch_update(mode):
    tx = optax.sgd(0.5)  # linear in the gradient: Adam would magnify rounding in near-zero gradients
    policy = TrainState.create(tiny("lm", 0), tx, jax.random.key(0))
    _, ids, mask, action_mask = rollout(policy.model(), jax.random.key(6), prompts=4, samples=GROUP)
    action_mask = uneven(action_mask)
    updated = {}
    configs = {micro: critic_free_configs("grpo", group_size=GROUP, epochs=2, minibatches=2, micro_batches=micro,
                                          loss_aggregation=mode, loss_normalizer=float(NEW))  # Dr. GRPO's scale
               for micro in (1, 4)}
    config, context = configs[1]
    experience, _ = nnx.jit(functools.partial(rl.make_group_experience, config=config, context=context,
                                              estimator="grpo"))(  # micro-batch free
        policy.model(), tiny("lm", 5), ids, mask, action_mask, target_fraction(ids, action_mask), 0.1)
    for micro, (config, context) in configs.items():
        update = jax.jit(functools.partial(rl.critic_free_update, policy_tx=tx, config=config, context=context))
        updated[micro] = update(policy, experience, jax.random.key(7), 0.1)
    (whole, whole_metrics), (split, split_metrics) = updated[1], updated[4]
    assert_same_params(split, whole)
    np.testing.assert_allclose(split_metrics["policy_loss"], whole_metrics["policy_loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split_metrics["policy_grad_norm"], whole_metrics["policy_grad_norm"], rtol=1e-5)


def test_ppo_micro_batches_weigh_the_policy_and_value_terms_each_by_their_own_aggregation():
    policy_tx, critic_tx = optax.sgd(0.5), optax.sgd(0.5)
    policy = TrainState.create(tiny("lm", 0), policy_tx, jax.random.key(0))
    critic = TrainState.create(tiny("score", 1), critic_tx, jax.random.key(1))
    _, ids, mask, action_mask = rollout(policy.model(), jax.random.key(3), prompts=8)
    action_mask = uneven(action_mask)
    results = {}
    for micro in (1, 4):  # seq_mean_token_mean: the policy terms weigh rows, the value loss tokens
        config = rl.PPOConfig(epochs=2, minibatches=1, micro_batches=micro, loss_aggregation="seq_mean_token_mean")
        context = rl.UpdateContext(kl_in_loss=True)
        experience, _ = nnx.jit(functools.partial(rl.make_experience, config=config, context=context))(
            policy.model(), tiny("lm", 5), critic.model(), ids, mask, action_mask,
            target_fraction(ids, action_mask), 0.05)
        results[micro] = jax.jit(functools.partial(rl.ppo_update, policy_tx=policy_tx, critic_tx=critic_tx,
                                                   config=config, context=context))(policy, critic, experience, jax.random.key(4), 0.05)
    assert_same_params(results[4][0], results[1][0])
    assert_same_params(results[4][1], results[1][1])
    for name in ("policy_loss", "value_loss", "policy_grad_norm", "value_grad_norm"):
        np.testing.assert_allclose(results[4][2][name], results[1][2][name], rtol=1e-5, atol=1e-6)


def test_micro_batches_that_do_not_divide_a_minibatch_are_refused():
    overrides = ["data.source=p.jsonl", "data.format=prompt", "algorithm=grpo", "reward.function=builtin:letters",
                 "rollout.prompts=4", "rollout.samples=4", "grpo.minibatches=2"]
    check_config(config.load(OnlineConfig, None, [*overrides, "grpo.micro_batches=4"]), check_paths=False)
    with pytest.raises(config.ConfigError, match=r"grpo.micro_batches=3 does not divide the 8 rows of a minibatch"):
        check_config(config.load(OnlineConfig, None, [*overrides, "grpo.micro_batches=3"]), check_paths=False)


def test_bf16_gradients_accumulate_over_micro_batches_in_float32():
    """bf16 parameters give bf16 gradients; their micro-batch sum is carried in float32 (a bf16
    carry met float32 shares and the scan refused it -- found by planning GRPO at 8B with
    micro-batches) and equals the whole minibatch's gradient to bf16's precision."""
    from rlhf_jax.rl.minibatches import micro_batch_gradients

    params = {"w": jnp.asarray([0.5, -1.0, 2.0], jnp.bfloat16)}
    batch = {"x": jnp.arange(24, dtype=jnp.float32).reshape(8, 3) / 10}

    def grad_fn(p, micro):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((micro["x"] @ p["w"].astype(jnp.float32)) ** 2))(p)
        return (grads,), ((loss,), ({},))

    def weights_fn(micro):
        return (jnp.asarray(micro["x"].shape[0], jnp.float32),)

    whole, _, _ = jax.jit(lambda p, b: micro_batch_gradients(grad_fn, p, b, 1, weights_fn))(params, batch)
    split, losses, _ = jax.jit(lambda p, b: micro_batch_gradients(grad_fn, p, b, 4, weights_fn))(params, batch)
    assert whole[0]["w"].dtype == jnp.bfloat16 and split[0]["w"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(split[0]["w"]), np.asarray(whole[0]["w"], np.float32), rtol=1e-2)


def wide(head, seed):
    """One block, a 4096-token vocabulary: the rollout's logits are most of a forward's memory."""
    from rlhf_jax import models

    config = models.config_from_hf({"model_type": "llama", "vocab_size": 4096, "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "rms_norm_eps": 1e-5})
    return models.build_model(config, head, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_the_experience_forwards_run_in_micro_batches_to_the_same_values_in_less_memory(algorithm):
    """``forward_micro_batches``: the rollout's log-probs (and PPO's values) computed on 4
    micro-batches of rows in turn equal the whole batch's, and the compiled experience holds
    under half the temporaries (16 rows x 32 actions x 4096 float32 logits: 8.4 MB at once)."""
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 4096, (16, 40)), jnp.int32)
    mask = jnp.ones_like(ids)
    actions = jnp.asarray(np.arange(40) >= 8)[None].repeat(16, 0)
    scores = jnp.asarray(rng.normal(size=16), jnp.float32)
    if algorithm == "ppo":
        make = functools.partial(rl.make_experience, config=rl.PPOConfig(minibatches=2, micro_batches=2),
                                 prompt_width=8)
        models = (wide("lm", 0), wide("lm", 1), wide("score", 2))
    else:
        config, context = critic_free_configs("grpo", epochs=2, minibatches=2, micro_batches=2)
        make = functools.partial(rl.make_group_experience, config=config, context=context, estimator="grpo",
                                 prompt_width=8)
        models = (wide("lm", 0), wide("lm", 1))
    inputs = (*models, ids, mask, actions, scores, 0.1)
    programs = {m: jax.jit(lambda *xs, m=m: make(*xs, forward_micro_batches=m)).lower(*inputs).compile()
                for m in (1, 4)}
    (whole, whole_stats), (split, split_stats) = (programs[m](*inputs) for m in (1, 4))
    for a, b in zip(jax.tree.leaves((whole, whole_stats)), jax.tree.leaves((split, split_stats)), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert whole.old_logp_BT is not None and float(jnp.abs(whole.old_logp_BT).sum()) > 0
    temporaries = {m: program.memory_analysis().temp_size_in_bytes for m, program in programs.items()}
    assert temporaries[4] < 0.5 * temporaries[1], temporaries

"""PPO on a tiny transformer: the first minibatch's ratio is 1 and its losses are the loss
core's on the same arrays; PPO raises a known reward while the KL to the reference stays
bounded."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import losses, models, rl
from rlhf_jax.rollout import GenerationConfig, SamplingConfig, generate
from rlhf_jax.train import TrainState

V, PROMPT, NEW, EOS, TARGET = 16, 4, 8, 0, 3
BETA = 0.05  # KL-regularised optimum: p(TARGET) = 0.45 per token, KL ~ 4.8 nats per completion


def tiny(head, seed):
    config = models.config_from_hf({"model_type": "llama", "vocab_size": V, "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "rms_norm_eps": 1e-5, "max_position_embeddings": 64})
    return models.build_model(config, head, rngs=nnx.Rngs(seed))


def setup(lr=3e-3):
    policy_tx, critic_tx = optax.adam(lr), optax.adam(lr)
    policy = TrainState.create(tiny("lm", 0), policy_tx, jax.random.key(0))
    critic = TrainState.create(tiny("score", 1), critic_tx, jax.random.key(1))
    return policy, critic, tiny("lm", 0), policy_tx, critic_tx


def rollout(policy_model, key, batch=32):
    prompts = jax.random.randint(key, (batch, PROMPT), 1, V)
    config = GenerationConfig(max_new_tokens=NEW, stop_token_ids=(EOS,), pad_token_id=EOS, prompt_buckets=(PROMPT,))
    out = generate(policy_model, prompts, jnp.ones_like(prompts), jax.random.fold_in(key, 1), config)
    ids, mask = out.sequences()
    action_mask = jnp.concatenate([jnp.zeros_like(out.prompt_mask_BP), out.completion_mask_BN.astype(jnp.int32)], 1)
    return out, ids, mask, action_mask


def target_fraction(ids, action_mask):
    """The known reward: the fraction of completion tokens equal to TARGET."""
    return jnp.sum((ids == TARGET) * action_mask, 1) / jnp.maximum(jnp.sum(action_mask, 1), 1)


def test_first_minibatch_ratio_is_one_and_losses_are_the_loss_cores():
    policy, critic, reference, policy_tx, critic_tx = setup()
    config = rl.PPOConfig(epochs=1, minibatches=1)
    out, ids, mask, action_mask = rollout(policy.model(), jax.random.key(3))
    scores = target_fraction(ids, action_mask)
    experience, _ = nnx.jit(functools.partial(rl.make_experience, config=config))(
        policy.model(), reference, critic.model(), ids, mask, action_mask, scores, 0.05)
    # the sampler's log-probs (T = 1) are the training forward's
    np.testing.assert_allclose(np.asarray(experience.old_logp_BT[:, PROMPT:]) * np.asarray(out.completion_mask_BN),
                               np.asarray(out.logprobs_BN) * np.asarray(out.completion_mask_BN), atol=1e-5)
    _, _, metrics = jax.jit(functools.partial(rl.ppo_update, policy_tx=policy_tx, critic_tx=critic_tx, config=config))(
        policy, critic, experience, jax.random.key(4))
    assert abs(float(metrics["ratio_mean"][0]) - 1) < 1e-6 and abs(float(metrics["ratio_max"][0]) - 1) < 1e-6
    assert float(metrics["clip_fraction"][0]) == 0.0
    expected_policy, _ = losses.ppo_policy_loss(experience.old_logp_BT, experience.old_logp_BT,
                                                experience.advantages_BT, experience.action_mask_BT)
    expected_value, _ = losses.ppo_value_loss(experience.old_values_BT, experience.old_values_BT,
                                              experience.returns_BT, experience.action_mask_BT)
    np.testing.assert_allclose(float(metrics["policy_loss"][0]), float(expected_policy), atol=1e-6)
    np.testing.assert_allclose(float(metrics["value_loss"][0]), float(expected_value), atol=1e-6)


@pytest.mark.slow
def test_ppo_raises_a_known_reward_with_bounded_kl():
    policy, critic, reference, policy_tx, critic_tx = setup()
    config = rl.PPOConfig(epochs=2, minibatches=2)
    experience_fn = nnx.jit(functools.partial(rl.make_experience, config=config))
    update = jax.jit(functools.partial(rl.ppo_update, policy_tx=policy_tx, critic_tx=critic_tx, config=config))
    history = []
    for iteration in range(30):
        key = jax.random.key(100 + iteration)
        _, ids, mask, action_mask = rollout(policy.model(), key)
        scores = target_fraction(ids, action_mask)
        experience, stats = experience_fn(policy.model(), reference, critic.model(), ids, mask, action_mask, scores, BETA)
        policy, critic, _ = update(policy, critic, experience, jax.random.fold_in(key, 2))
        history.append((float(stats["score_mean"]), float(stats["kl"])))
    first, last = np.mean([s for s, _ in history[:3]]), np.mean([s for s, _ in history[-3:]])
    assert first < 0.15 and last > 0.5, history
    # without the penalty the optimum is deterministic: ~22 nats per completion of 8 tokens
    assert max(k for _, k in history) < 10.0, history

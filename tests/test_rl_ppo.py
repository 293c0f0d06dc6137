"""PPO on a tiny transformer: the first minibatch's ratio is 1 and its losses are the loss
core's on the same arrays; PPO raises a known reward while the KL to the reference stays
bounded."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from rl_tiny import PROMPT, rollout, target_fraction, tiny

from rlhf_jax import kl, losses, rl
from rlhf_jax.train import TrainState

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

BETA = 0.05  # KL-regularised optimum: p(TARGET) = 0.45 per token, KL ~ 4.8 nats per completion


def setup(lr=3e-3):
    policy_tx, critic_tx = optax.adam(lr), optax.adam(lr)
    policy = TrainState.create(tiny("lm", 0), policy_tx, jax.random.key(0))
    critic = TrainState.create(tiny("score", 1), critic_tx, jax.random.key(1))
    return policy, critic, tiny("lm", 0), policy_tx, critic_tx


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
        policy, critic, experience, jax.random.key(4), 0.05)
    assert abs(float(metrics["ratio_mean"][0]) - 1) < 1e-6 and abs(float(metrics["ratio_max"][0]) - 1) < 1e-6
    assert float(metrics["clip_fraction"][0]) == 0.0
    expected_policy, _ = losses.ppo_policy_loss(experience.old_logp_BT, experience.old_logp_BT,
                                                experience.advantages_BT, experience.action_mask_BT)
    expected_value, _ = losses.ppo_value_loss(experience.old_values_BT, experience.old_values_BT,
                                              experience.returns_BT, experience.action_mask_BT)
    np.testing.assert_allclose(float(metrics["policy_loss"][0]), float(expected_policy), atol=1e-6)
    np.testing.assert_allclose(float(metrics["value_loss"][0]), float(expected_value), atol=1e-6)


def test_kl_in_loss_moves_the_penalty_from_the_reward_to_the_loss():
    policy, critic, _, _, _ = setup()
    reference = tiny("lm", 5)  # another model: the KL is not 0
    _, ids, mask, action_mask = rollout(policy.model(), jax.random.key(3))
    scores = target_fraction(ids, action_mask)
    config, in_reward, in_loss = rl.PPOConfig(), rl.UpdateContext(), rl.UpdateContext(kl_in_loss=True)
    make = nnx.jit(functools.partial(rl.make_experience, config=config), static_argnames="context")
    inputs = (policy.model(), reference, critic.model(), ids, mask, action_mask, scores)
    experience, stats = make(*inputs, 0.5, context=in_loss)
    no_kl, _ = make(*inputs, 0.0, context=in_reward)
    penalised, _ = make(*inputs, 0.5, context=in_reward)
    assert abs(float(stats["kl"])) > 0.01  # k1: an unbiased estimate, either sign
    np.testing.assert_array_equal(experience.returns_BT, no_kl.returns_BT)  # the reward holds no KL
    assert not np.allclose(penalised.returns_BT, no_kl.returns_BT)
    # at the rollout's parameters the loss gains beta x the mean k3 over the actions
    action = np.asarray(experience.action_mask_BT, bool)
    log_ratio = np.asarray(experience.ref_logp_BT - experience.old_logp_BT)[action]
    k3 = np.mean(np.expm1(log_ratio) - log_ratio)
    with_term, _, metrics = rl.ppo_losses(policy.model(), critic.model(), experience, 0.5, config, context=in_loss)
    without, _, _ = rl.ppo_losses(policy.model(), critic.model(), experience, 0.5, config, context=in_reward)
    np.testing.assert_allclose(float(metrics["kl_loss_term"]), k3, rtol=1e-5)
    np.testing.assert_allclose(float(with_term - without), 0.5 * k3, rtol=1e-5)


def run_ppo(iterations: int, controller: kl.KLController) -> list[tuple[float, float, float]]:
    """``[(score mean, KL per completion, beta)]`` per iteration of PPO on the known reward."""
    policy, critic, reference, policy_tx, critic_tx = setup()
    config = rl.PPOConfig(epochs=2, minibatches=2)
    experience_fn = nnx.jit(functools.partial(rl.make_experience, config=config))
    update = jax.jit(functools.partial(rl.ppo_update, policy_tx=policy_tx, critic_tx=critic_tx, config=config))
    beta, history = controller.init(), []
    for iteration in range(iterations):
        key = jax.random.key(100 + iteration)
        _, ids, mask, action_mask = rollout(policy.model(), key)
        scores = target_fraction(ids, action_mask)
        experience, stats = experience_fn(policy.model(), reference, critic.model(), ids, mask, action_mask, scores,
                                          beta.beta)
        policy, critic, _ = update(policy, critic, experience, jax.random.fold_in(key, 2), beta.beta)
        history.append((float(stats["score_mean"]), float(stats["kl"]), float(beta.beta)))
        beta = controller.update(beta, stats["kl"], ids.shape[0])
    return history


@pytest.mark.slow
def test_ppo_raises_a_known_reward_with_bounded_kl():
    history = run_ppo(30, kl.fixed_kl_controller(BETA))
    first, last = np.mean([s for s, _, _ in history[:3]]), np.mean([s for s, _, _ in history[-3:]])
    assert first < 0.15 and last > 0.5, history
    # without the penalty the optimum is deterministic: ~22 nats per completion of 8 tokens
    assert max(k for _, k, _ in history) < 10.0, history


@pytest.mark.slow
def test_adaptive_controller_drives_kl_toward_its_target():
    target = 1.0
    history = run_ppo(40, kl.adaptive_kl_controller(0.005, target=target, horizon=32.0))  # K_beta = 32 / 32 = 1
    late_kl = np.mean([k for _, k, _ in history[-10:]])
    betas = [b for _, _, b in history]
    assert betas[-1] > 4 * betas[0], history  # KL overshot the target, so beta rose
    assert 0.5 * target < late_kl < 2.0 * target, history


def test_the_kl_penalty_form_takes_the_clipped_step_at_ratio_one_then_its_own():
    """PPO's KL-penalty surrogate (``surrogate="kl_penalty"``): on the first minibatch (ratio 1,
    KL 0) its loss and gradient are the clipped surrogate's; the second epoch (ratio != 1)
    departs, with the penalty's KL(pi_old || pi) reported as ``approx_kl``."""
    runs = {}
    for surrogate in ("clip", "kl_penalty"):
        policy, critic, reference, policy_tx, critic_tx = setup()
        config = rl.PPOConfig(epochs=2, minibatches=1, surrogate=surrogate)
        _, ids, mask, action_mask = rollout(policy.model(), jax.random.key(3))
        experience, _ = nnx.jit(functools.partial(rl.make_experience, config=config))(
            policy.model(), reference, critic.model(), ids, mask, action_mask, target_fraction(ids, action_mask), 0.05)
        update = jax.jit(functools.partial(rl.ppo_update, policy_tx=policy_tx, critic_tx=critic_tx, config=config))
        policy, _, metrics = update(policy, critic, experience, jax.random.key(4), 0.05, penalty_beta=2.0)
        runs[surrogate] = (jax.tree.leaves(policy.params), jax.tree.map(np.asarray, metrics))
    (clip_params, clip), (penalty_params, penalty) = runs["clip"], runs["kl_penalty"]
    for name in ("policy_loss", "policy_grad_norm"):
        assert float(penalty[name][0]) == pytest.approx(float(clip[name][0]), rel=1e-5, abs=1e-7)
    assert float(penalty["approx_kl"][0]) == pytest.approx(0.0, abs=1e-7) and float(penalty["approx_kl"][1]) > 0
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(clip_params, penalty_params, strict=True)) > 1e-6

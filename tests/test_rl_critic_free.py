"""GRPO, RLOO and REINFORCE on the tiny policy: the advantages are the estimators' by hand,
the first minibatch's ratio is 1, and each raises the known reward with a bounded KL."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from rl_tiny import critic_free_configs, rollout, target_fraction, tiny

from rlhf_jax import rl
from rlhf_jax.models import sequence_logprobs
from rlhf_jax.phases.algorithms import ALGORITHMS
from rlhf_jax.train import TrainState

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

GROUP = 4


def experience_for(estimator, scores, beta=0.0, reference_seed=0, **config):
    policy = tiny("lm", 0)
    _, ids, mask, action_mask = rollout(policy, jax.random.key(5), prompts=2, samples=GROUP)
    config, context = critic_free_configs(estimator, group_size=GROUP, **config)
    return rl.make_group_experience(policy, tiny("lm", reference_seed), ids, mask, action_mask,
                                    jnp.asarray(scores, jnp.float32), beta, config, context=context,
                                    estimator=estimator)


def test_advantages_are_the_estimators_by_hand():
    scores = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    grpo, _ = experience_for("grpo", scores)
    np.testing.assert_allclose(grpo.advantages_B, [1, -1, -1, 1, 0, 0, 0, 0], atol=1e-5)  # (r - 0.5) / 0.5
    rloo, _ = experience_for("rloo", scores)
    np.testing.assert_allclose(rloo.advantages_B, [1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3, 0, 0, 0, 0], atol=1e-6)
    reinforce, _ = experience_for("reinforce", scores)
    np.testing.assert_allclose(reinforce.advantages_B, np.asarray(scores) - np.mean(scores), atol=1e-6)
    # the policy is its own reference here: the KL in the reward is 0, so beta changes nothing
    rloo_beta, _ = experience_for("rloo", scores, beta=0.5)
    np.testing.assert_allclose(rloo_beta.advantages_B, rloo.advantages_B, atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_kl_in_loss_takes_the_kl_out_of_the_reward(estimator):
    scores = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    free, _ = experience_for(estimator, scores)
    # two epochs: the experience holds the rollout's log-probs and its KL statistic
    in_loss, stats = experience_for(estimator, scores, beta=0.5, reference_seed=5, kl_in_loss=True, epochs=2)
    in_reward, _ = experience_for(estimator, scores, beta=0.5, reference_seed=5, kl_in_loss=False)
    assert abs(float(stats["kl"])) > 0.01  # k1: an unbiased estimate, either sign
    np.testing.assert_allclose(in_loss.advantages_B, free.advantages_B, atol=1e-6)
    assert not np.allclose(in_reward.advantages_B, free.advantages_B, atol=1e-3)
    assert ALGORITHMS[estimator].kl_in_loss == (estimator == "grpo")  # where each algorithm puts it by default


def test_one_on_policy_step_is_the_update_with_the_rollout_logprobs():
    tx = optax.sgd(0.1)  # not Adam: its first step turns float-order noise in a ~0 gradient into +-lr
    policy, reference = TrainState.create(tiny("lm", 0), tx, jax.random.key(0)), tiny("lm", 5)
    _, ids, mask, action_mask = rollout(policy.model(), jax.random.key(6), prompts=2, samples=GROUP)
    config, context = critic_free_configs("grpo", group_size=GROUP)  # one epoch of one minibatch
    experience, stats = rl.make_group_experience(policy.model(), reference, ids, mask, action_mask,
                                                 target_fraction(ids, action_mask), 0.1, config, prompt_width=4,
                                                 context=context, estimator="grpo")
    assert experience.old_logp_BT is None and "kl" not in stats  # the old forward is skipped
    rollout_logp = sequence_logprobs(policy.model(), ids, mask)
    explicit = experience.replace(old_logp_BT=rollout_logp)
    update = jax.jit(functools.partial(rl.critic_free_update, policy_tx=tx, config=config, context=context))
    skipped, metrics = update(policy, experience, jax.random.key(7), 0.1)
    computed, explicit_metrics = update(policy, explicit, jax.random.key(7), 0.1)
    for a, b in zip(jax.tree.leaves(skipped.params), jax.tree.leaves(computed.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(metrics["policy_loss"], explicit_metrics["policy_loss"], atol=1e-6)
    log_ratio = np.asarray(rollout_logp - experience.ref_logp_BT) * np.asarray(action_mask)
    np.testing.assert_allclose(float(metrics["kl"][0]), np.mean(log_ratio.sum(1)), atol=1e-6)  # k1, summed (~1e-2)


def run(estimator, iterations, beta, lr=3e-3):
    tx = optax.adam(lr)
    policy = TrainState.create(tiny("lm", 0), tx, jax.random.key(0))
    reference = tiny("lm", 0)
    config, context = critic_free_configs(estimator, group_size=GROUP)
    experience_fn = nnx.jit(functools.partial(rl.make_group_experience, config=config, context=context,
                                              estimator=estimator))
    update = jax.jit(functools.partial(rl.critic_free_update, policy_tx=tx, config=config, context=context))
    history = []
    for iteration in range(iterations):
        key = jax.random.key(200 + iteration)
        _, ids, mask, action_mask = rollout(policy.model(), key, prompts=8, samples=GROUP)
        experience, stats = experience_fn(policy.model(), reference, ids, mask, action_mask,
                                          target_fraction(ids, action_mask), beta)
        policy, metrics = update(policy, experience, jax.random.fold_in(key, 2), beta)
        if iteration == 0:  # one epoch, one minibatch: the ratio is exactly 1
            assert abs(float(metrics["ratio_max"][0]) - 1) < 1e-6
        kl = stats["kl"] if "kl" in stats else metrics["kl"][0]  # one on-policy step: the update measures it
        history.append((float(stats["score_mean"]), float(kl)))
    return history


@pytest.mark.slow
# GRPO's beta weighs a per-token mean of k3 against advantages of order 1 per completion;
# RLOO's subtracts beta x the completion's summed KL from its score: not the same scale.
@pytest.mark.parametrize("estimator,beta", [("grpo", 0.3), ("rloo", 0.05)])
def test_critic_free_methods_raise_a_known_reward_with_bounded_kl(estimator, beta):
    history = run(estimator, 30, beta=beta)
    first, last = np.mean([s for s, _ in history[:3]]), np.mean([s for s, _ in history[-3:]])
    assert first < 0.15 and last > 0.4, history
    assert max(k for _, k in history) < 12.0, history

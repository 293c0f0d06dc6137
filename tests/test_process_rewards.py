"""Process supervision in the loss core (issue [I], item 5): a process reward model's per-step
loss and accuracy by hand, and step rewards at step ends shaped with the KL and credited to
every earlier token by GAE."""

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import advantages, kl, losses


def test_process_reward_loss_by_hand():
    # two rows; step ends at (0, 1), (0, 3), (1, 2) with labels 1, 0, 1; other positions ignored
    logits = jnp.asarray([[9.0, 2.0, 9.0, 0.5], [9.0, 9.0, -1.0, 9.0]])
    labels = jnp.asarray([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    mask = jnp.asarray([[0, 1, 0, 1], [0, 0, 1, 0]])
    loss, aux = losses.process_reward_loss(logits, labels, mask)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    expected = -(np.log(sigmoid(2.0)) + np.log(1 - sigmoid(0.5)) + np.log(sigmoid(-1.0))) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(aux.step_accuracy) == pytest.approx(1 / 3) and float(aux.steps) == 3  # only the first is right
    soft, _ = losses.process_reward_loss(logits, labels * 0.5, mask)  # soft labels: y = 1/2 at the positives
    expected_soft = -(0.5 * np.log(sigmoid(2.0)) + 0.5 * np.log(sigmoid(-2.0)) + np.log(1 - sigmoid(0.5))
                      + 0.5 * np.log(sigmoid(-1.0)) + 0.5 * np.log(sigmoid(1.0))) / 3
    assert float(soft) == pytest.approx(expected_soft, rel=1e-6)
    empty, aux = losses.process_reward_loss(logits, labels, jnp.zeros_like(mask))
    assert float(empty) == 0.0 and float(aux.steps) == 0
    with pytest.raises(ValueError):
        losses.process_reward_loss(logits, labels[:, :3], mask)


def test_step_rewards_at_step_ends_are_credited_to_every_earlier_token():
    # one completion of 5 tokens (position 5 is padding), steps ending at tokens 1 and 4 scored
    # 0.5 and -1.0, no KL (logp = ref), outcome score 2 at the last valid token (4)
    mask = jnp.asarray([[1, 1, 1, 1, 1, 0]])
    step_rewards = jnp.asarray([[0.0, 0.5, 0.0, 0.0, -1.0, 7.0]])  # the 7 sits on padding: ignored
    logp = jnp.zeros((1, 6))
    rewards, _ = kl.kl_shaped_rewards(jnp.asarray([2.0]), logp, logp, mask, beta=0.1, step_rewards_BT=step_rewards)
    np.testing.assert_allclose(rewards, [[0.0, 0.5, 0.0, 0.0, 1.0, 0.0]])
    advantages_BT, _ = advantages.gae(rewards, jnp.zeros((1, 6)), mask, gamma=1.0, lam=1.0)
    # with V = 0 and gamma = lam = 1 a token's advantage is the sum of the rewards from it on
    np.testing.assert_allclose(advantages_BT, [[1.5, 1.5, 1.0, 1.0, 1.0, 0.0]])
    # the KL still enters per token: log-ratio 0.2 everywhere, beta 0.1 -> -0.02 on each valid token
    rewards_kl, _ = kl.kl_shaped_rewards(jnp.asarray([0.0]), logp + 0.2, logp, mask, beta=0.1,
                                         step_rewards_BT=step_rewards)
    np.testing.assert_allclose(rewards_kl, [[-0.02, 0.48, -0.02, -0.02, -1.02, 0.0]], atol=1e-6)

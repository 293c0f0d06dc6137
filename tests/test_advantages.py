import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from rlhf_jax import advantages
from rlhf_jax.masked import masked_whiten


def test_gae_hand_worked_example():
    adv, ret = advantages.gae(
        jnp.array([[0.0, 1.0, 0.0]]), jnp.array([[0.0, 0.0, 100.0]]), jnp.array([[1, 1, 0]]), gamma=1.0, lam=0.95
    )
    np.testing.assert_allclose(adv, [[0.95, 1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.95, 1.0, 0.0]], atol=1e-6)


def gae_reference_loop(rewards, values, mask, gamma, lam):
    """Plain Python: walk each row backwards over its valid positions only."""
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(rewards.shape[1])):
            if not mask[b, t]:
                continue
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            adv[b, t] = next_adv
    return adv, np.where(mask, adv + values, 0.0)


def random_padded_batch(seed, batch=6, length=9, holes=False):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, length + 1, size=batch)
    mask = np.arange(length)[None, :] < lengths[:, None]
    if holes:
        mask &= rng.random((batch, length)) > 0.25
    return rng.normal(size=(batch, length)), rng.normal(size=(batch, length)), mask


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_python_loop(holes, gamma, lam):
    rewards, values, mask = random_padded_batch(int(gamma * 100 + lam * 10) + holes, holes=holes)
    adv, ret = advantages.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=gamma, lam=lam)
    ref_adv, ref_ret = gae_reference_loop(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5)


def test_gae_matches_rlax_on_each_unpadded_row():
    rewards, values, mask = random_padded_batch(7)
    adv, _ = advantages.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=0.97, lam=0.9)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        if n == 0:
            continue
        # rlax wants V for t = 0..n (the last one after the episode end, here 0).
        values_with_terminal = np.concatenate([values[b, :n], [0.0]])
        expected = rlax.truncated_generalized_advantage_estimation(
            rewards[b, :n], np.full(n, 0.97), 0.9, values_with_terminal
        )
        np.testing.assert_allclose(adv[b, :n], expected, atol=1e-5)


def test_discounted_returns():
    returns = advantages.discounted_returns(jnp.array([[1.0, 2.0, 3.0, 9.0]]), jnp.array([[1, 1, 1, 0]]), gamma=0.5)
    np.testing.assert_allclose(returns, [[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 0.0]])


def test_masked_whiten_matches_numpy():
    x = jnp.array([[1.0, 2.0, 3.0, 4.0, 50.0]])
    mask = jnp.array([[1, 1, 1, 1, 0]])
    valid = np.array([1.0, 2.0, 3.0, 4.0])
    expected = (valid - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(masked_whiten(x, mask)[0, :4], expected, rtol=1e-6)
    assert masked_whiten(x, mask)[0, 4] == 0.0
    np.testing.assert_allclose(masked_whiten(x, mask, shift_mean=False)[0, :4], expected + valid.mean(), rtol=1e-6)


def test_group_relative_advantages_and_zero_std_groups():
    rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1], [3.0, 1.0, 2.0, 2.0]])
    adv, aux = advantages.group_relative_advantages(rewards)
    r = np.asarray(rewards)
    expected = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(adv)[[0, 2]], expected[[0, 2]], rtol=1e-5)
    np.testing.assert_array_equal(adv[1], np.zeros(4))
    assert float(aux.zero_std_fraction) == pytest.approx(1 / 3)
    unscaled, _ = advantages.group_relative_advantages(rewards, scale_by_std=False)
    np.testing.assert_allclose(unscaled[2], [1.0, -1.0, 0.0, 0.0], atol=1e-6)


def test_rloo_is_reward_minus_mean_of_the_others():
    adv = advantages.rloo_advantages(jnp.array([[1.0, 2.0, 6.0]]))
    np.testing.assert_allclose(adv, [[1 - 4.0, 2 - 3.5, 6 - 1.5]])


def test_gae_is_one_program_under_jit():
    traces = []

    def fn(r, v, m):
        traces.append(1)
        return advantages.gae(r, v, m, gamma=1.0, lam=0.95)

    jitted = jax.jit(fn)
    for seed in range(3):
        rewards, values, mask = random_padded_batch(seed)
        jitted(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32), jnp.asarray(mask))
    assert len(traces) == 1


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: advantages.gae(jnp.zeros(3), jnp.zeros(3), jnp.ones(3), gamma=1.0, lam=1.0), "rewards_BT"),
        (lambda: advantages.gae(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 3)), gamma=1.0, lam=1.0), "values_BT"),
        (lambda: advantages.gae(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.full((2, 3), 2.0), gamma=1.0, lam=1.0), "mask_BT"),
        (lambda: advantages.rloo_advantages(jnp.zeros((4, 1))), "rewards_BG"),
        (lambda: advantages.group_relative_advantages(jnp.zeros(4)), "rewards_BG"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()

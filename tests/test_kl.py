import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import kl


def test_estimators_hand_values():
    logp, ref = jnp.array(-1.0), jnp.array(-2.0)
    assert kl.kl_penalty(logp, ref, "k1") == pytest.approx(1.0)
    assert kl.kl_penalty(logp, ref, "k2") == pytest.approx(0.5)
    assert kl.kl_penalty(logp, ref, "k3") == pytest.approx(np.exp(-1.0), rel=1e-6)
    assert kl.kl_penalty(ref, logp, "abs") == pytest.approx(1.0)


def test_k1_and_k3_are_unbiased_estimates_of_the_true_kl():
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.2, 0.6])
    true_kl = float(np.sum(p * np.log(p / q)))
    logp, logq = jnp.log(p), jnp.log(q)
    for kind in ("k1", "k3"):
        expectation = float(jnp.sum(p * kl.kl_penalty(logp, logq, kind)))
        assert expectation == pytest.approx(true_kl, rel=1e-5), kind


def test_shaped_rewards_put_the_score_on_the_last_valid_token():
    logp = jnp.array([[-1.0, -1.0, -1.0, -1.0], [-0.5, -0.5, -0.5, -0.5]])
    ref = jnp.array([[-2.0, -1.0, -1.0, -1.0], [-0.5, -1.5, -0.5, -0.5]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    scores = jnp.array([3.0, -2.0])
    rewards, aux = kl.kl_shaped_rewards(scores, logp, ref, mask, beta=0.1)
    expected = np.array([[-0.1, 0.0, 3.0, 0.0], [0.0, -0.1 - 2.0, 0.0, 0.0]])
    np.testing.assert_allclose(rewards, expected, atol=1e-6)
    np.testing.assert_allclose(aux.kl_B, [1.0, 1.0], atol=1e-6)


def test_shaped_rewards_empty_row_gets_nothing():
    rewards, _ = kl.kl_shaped_rewards(
        jnp.array([5.0]), jnp.zeros((1, 3)), jnp.zeros((1, 3)), jnp.zeros((1, 3), bool), beta=0.1
    )
    np.testing.assert_array_equal(rewards, np.zeros((1, 3)))


def test_adaptive_controller_follows_ziegler_eq2():
    init_beta, target, horizon, n_steps = 0.2, 6.0, 10000.0, 512
    controller = kl.adaptive_kl_controller(init_beta, target, horizon)
    state = controller.init()
    update = jax.jit(controller.update)
    beta = init_beta
    for observed in [12.0, 6.6, 3.0, 5.0, 0.1]:
        state = update(state, jnp.asarray(observed), n_steps)
        error = np.clip((observed - target) / target, -0.2, 0.2)
        beta = beta * (1 + n_steps / horizon * error)
        assert float(state.beta) == pytest.approx(beta, rel=1e-6)


def test_fixed_controller_never_moves():
    controller = kl.fixed_kl_controller(0.05)
    state = controller.update(controller.init(), jnp.asarray(100.0), 64)
    assert float(state.beta) == pytest.approx(0.05)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: kl.kl_penalty(jnp.zeros(3), jnp.zeros(3), "k4"), "KL kind"),
        (lambda: kl.kl_penalty(jnp.zeros(3), jnp.zeros(4), "k1"), "ref_logp"),
        (lambda: kl.kl_shaped_rewards(jnp.zeros(2), jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.full((2, 3), 0.5), beta=0.1), "mask_BT"),
        (lambda: kl.kl_shaped_rewards(jnp.zeros(3), jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)), beta=0.1), "scores_B"),
        (lambda: kl.adaptive_kl_controller(0.1, 0.0, 1000), "target"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()

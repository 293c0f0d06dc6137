"""PPO's KL-penalty form and TRPO against hand-worked values and explicit
matrices: the beta rule, the penalised surrogate, conjugate gradient on a known SPD system,
the Fisher-vector product against the explicit Fisher matrix of a tiny categorical policy, and
a line search that keeps the KL inside the trust region."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from rl_tiny import rollout, target_fraction, tiny

from rlhf_jax import kl, losses, rl
from rlhf_jax.models.token_logprobs import next_token_logits
from rlhf_jax.train import TrainState
from rlhf_jax.trust_region import conjugate_gradient, fisher_vector_product, trpo_step

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py



@pytest.fixture
def float64():
    """float64 for this module's exact comparisons, without changing other tests' dtypes."""
    with jax.enable_x64(True):
        yield


def test_the_ppo_penalty_beta_rule_by_hand():
    controller = kl.ppo_penalty_kl_controller(0.5, target=0.01)
    state = controller.init()
    for observed, expected in ((0.005, 0.25), (0.0066, 0.125), (0.01, 0.125), (0.0151, 0.25), (0.02, 0.5)):
        state = controller.update(state, jnp.asarray(observed), 1)
        assert float(state.beta) == pytest.approx(expected)


@pytest.mark.usefixtures("float64")
def test_the_penalised_surrogate_by_hand():
    ratio = np.array([[1.5, 0.8]])
    old = np.log(np.array([[0.2, 0.5]]))
    logp = old + np.log(ratio)
    loss, aux = losses.ppo_penalty_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray([[2.0, -1.0]]),
                                        jnp.ones((1, 2)), beta=0.5)
    k3 = (ratio - 1) - np.log(ratio)
    assert float(aux.surrogate) == pytest.approx(np.mean(-ratio * [[2.0, -1.0]]))
    assert float(loss) == pytest.approx(np.mean(-ratio * [[2.0, -1.0]]) + 0.5 * np.mean(k3))
    assert float(aux.kl) == pytest.approx(np.mean(k3))


@pytest.mark.usefixtures("float64")
def test_conjugate_gradient_solves_a_known_spd_system():
    a = jnp.asarray([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
    x_true = jnp.asarray([1.0, -2.0, 0.5])
    x = conjugate_gradient(lambda v: a @ v, a @ x_true, iterations=3)
    np.testing.assert_allclose(x, x_true, rtol=1e-9)
    with pytest.raises(ValueError, match="vector"):
        conjugate_gradient(lambda v: v, jnp.ones((2, 2)))


def policy_logits(flat_W, states_ND):
    return states_ND @ flat_W.reshape(3, 4)  # a linear policy over 4 actions from 3 features


@pytest.mark.usefixtures("float64")
def test_the_fisher_vector_product_is_the_explicit_fisher_matrix_times_v():
    rng = np.random.default_rng(0)
    states = jnp.asarray(rng.normal(size=(5, 3)))
    theta_old, v = jnp.asarray(rng.normal(size=12)), jnp.asarray(rng.normal(size=12))
    p_old = jax.nn.softmax(policy_logits(theta_old, states))

    def mean_kl(theta):  # KL(pi_old || pi_theta), averaged over the states
        logp = jax.nn.log_softmax(policy_logits(theta, states))
        return jnp.mean(jnp.sum(p_old * (jnp.log(p_old) - logp), axis=-1))

    # the Fisher information: mean_s J_s^T (diag(p_s) - p_s p_s^T) J_s, J_s = d logits_s / d theta
    jacobian = jax.jacobian(policy_logits)(theta_old, states)  # [N, A, n]
    fisher = np.mean([jacobian[s].T @ (np.diag(p_old[s]) - np.outer(p_old[s], p_old[s])) @ jacobian[s]
                      for s in range(5)], axis=0)
    np.testing.assert_allclose(fisher_vector_product(mean_kl, theta_old, v), fisher @ v, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fisher_vector_product(mean_kl, theta_old, v, damping=0.1), fisher @ v + 0.1 * v,
                               rtol=1e-9, atol=1e-12)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("max_kl", [1e-3, 1e-2])
def test_a_trpo_step_lowers_the_surrogate_inside_the_kl_bound(max_kl):
    rng = np.random.default_rng(1)
    states = jnp.asarray(rng.normal(size=(16, 3)))
    actions = jnp.asarray(rng.integers(0, 4, size=16))
    advantages = jnp.asarray(rng.normal(size=16)) * 10.0  # a large gradient: the full step would overshoot
    theta_old = {"w": jnp.asarray(rng.normal(size=12))}
    logp_all_old = jax.nn.log_softmax(policy_logits(theta_old["w"], states))
    logp_old = jnp.take_along_axis(logp_all_old, actions[:, None], axis=1)[:, 0]

    def surrogate(params):
        logp = jax.nn.log_softmax(policy_logits(params["w"], states))
        return -jnp.mean(jnp.exp(jnp.take_along_axis(logp, actions[:, None], axis=1)[:, 0] - logp_old) * advantages)

    def mean_kl(params):
        logp = jax.nn.log_softmax(policy_logits(params["w"], states))
        return jnp.mean(jnp.sum(jnp.exp(logp_all_old) * (logp_all_old - logp), axis=-1))

    new, aux = trpo_step(surrogate, mean_kl, theta_old, max_kl=max_kl)
    assert float(aux.step_fraction) > 0 and float(aux.loss_after) < float(aux.loss_before)
    assert 0 < float(mean_kl(new)) <= max_kl and float(aux.kl) == pytest.approx(float(mean_kl(new)))
    with pytest.raises(ValueError, match="max_kl"):
        trpo_step(surrogate, mean_kl, theta_old, max_kl=0.0)


def test_a_trpo_iteration_of_a_tiny_lm_stays_inside_its_trust_region():
    """``rl.trpo_update`` on a rollout of the tiny policy: the exact KL(pi_old || pi_new) over the
    vocabulary, recomputed here from the two models, is positive and at most ``max_kl``, and the
    surrogate fell."""
    policy = TrainState.create(tiny("lm", 0), optax.sgd(0.0), jax.random.key(0))
    critic = TrainState.create(tiny("score", 1), optax.adam(1e-3), jax.random.key(1))
    _, ids, mask, action_mask = rollout(policy.model(), jax.random.key(3))
    config = rl.TRPOConfig(max_kl=1e-3, epochs=1, minibatches=1)
    experience, _ = nnx.jit(functools.partial(rl.make_experience, config=config))(
        policy.model(), tiny("lm", 0), critic.model(), ids, mask, action_mask, target_fraction(ids, action_mask),
        0.0)
    update = jax.jit(functools.partial(rl.trpo_update, critic_tx=optax.adam(1e-3), config=config))
    new_policy, _, metrics = update(policy, critic, experience, jax.random.key(4), 0.0)
    start = experience.prompt_width

    def logp(state):
        return jax.nn.log_softmax(next_token_logits(state.model(), ids, mask, start=start))

    old, new = logp(policy), logp(new_policy)
    kl_BN = jnp.sum(jnp.exp(old) * (old - new), axis=-1)
    actions_BN = experience.action_mask_BT[:, start:]
    exact = float(jnp.sum(kl_BN * actions_BN) / jnp.sum(actions_BN))
    assert 0 < exact <= 1e-3 * (1 + 1e-4) and exact == pytest.approx(float(metrics["approx_kl"]), rel=1e-3)
    assert float(metrics["policy_loss_after"]) < float(metrics["policy_loss_before"])

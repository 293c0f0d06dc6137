"""The training forward scores sampled tokens under the distribution they were drawn from
(temperature and filters), so the first minibatch's ratio is 1 for any sampling settings;
the loss aggregation of each algorithm is its paper's; truncated importance sampling
weighs tokens by the capped trainer/sampler ratio."""

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
from rlhf_jax.rollout import SamplingConfig, sampled_token_logprobs, sampling_logprobs
from rlhf_jax.train import TrainState

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

# T in {0.7, 1.3}, each with top-p, top-k, both, and neither
SETTINGS = [SamplingConfig(temperature=0.7, top_p=0.9), SamplingConfig(temperature=1.3, top_k=5),
            SamplingConfig(temperature=0.7, top_p=0.8, top_k=6), SamplingConfig(temperature=1.3)]


def test_sampled_token_logprobs_are_the_samplers_and_stay_finite_outside_the_filter():
    logits = jnp.log(jnp.asarray([[0.35, 0.25, 0.15, 0.12, 0.08, 0.05]], jnp.float32))
    config = SamplingConfig(temperature=0.5, top_p=0.8)  # keeps tokens 0 and 1 (test_sampling)
    full = np.asarray(sampling_logprobs(logits, config))[0]
    inside = sampled_token_logprobs(logits, jnp.asarray([0]), config)
    np.testing.assert_allclose(float(inside[0]), full[0], atol=1e-6)
    # token 4 lies outside the filter: renormalised over the kept set plus itself, by hand
    z = np.log([0.35, 0.25, 0.15, 0.12, 0.08, 0.05]) / 0.5
    by_hand = z[4] - np.logaddexp.reduce(z[[0, 1, 4]])
    np.testing.assert_allclose(float(sampled_token_logprobs(logits, jnp.asarray([4]), config)[0]), by_hand, rtol=1e-5)


@pytest.mark.parametrize("sampling", SETTINGS, ids=lambda c: f"T{c.temperature}-p{c.top_p}-k{c.top_k}")
def test_first_ppo_ratio_is_one_and_trainer_logprobs_are_the_samplers(sampling):
    tx = optax.adam(1e-3)
    policy = TrainState.create(tiny("lm", 0), tx, jax.random.key(0))
    critic = TrainState.create(tiny("score", 1), tx, jax.random.key(1))
    out, ids, mask, action_mask = rollout(policy.model(), jax.random.key(3), prompts=8, sampling=sampling)
    config, context = rl.PPOConfig(epochs=1, minibatches=1), rl.UpdateContext(sampling=sampling)
    experience, stats = nnx.jit(functools.partial(rl.make_experience, config=config, context=context))(
        policy.model(), tiny("lm", 0), critic.model(), ids, mask, action_mask, target_fraction(ids, action_mask), 0.05,
        sampler_logp_BT=out.sequence_logprobs())
    actions = np.asarray(action_mask, bool)
    np.testing.assert_allclose(np.asarray(experience.old_logp_BT)[actions], np.asarray(out.sequence_logprobs())[actions],
                               atol=1e-5)
    assert float(stats["logprob_gap_max"]) < 1e-5
    assert float(stats["kl"]) == pytest.approx(0.0, abs=1e-6)  # reference = policy, same sampling distribution
    # the update's forward on the first minibatch (here: the whole batch) at unchanged parameters
    _, _, metrics = nnx.jit(functools.partial(rl.ppo_losses, config=config, context=context))(
        policy.model(), critic.model(), experience, 0.05)
    assert abs(float(metrics["ratio_mean"]) - 1) < 1e-6 and abs(float(metrics["ratio_max"]) - 1) < 1e-6


def test_first_critic_free_ratio_is_one_under_sampling():
    sampling = SamplingConfig(temperature=0.7, top_p=0.9)
    tx = optax.adam(1e-3)
    policy = TrainState.create(tiny("lm", 0), tx, jax.random.key(0))
    out, ids, mask, action_mask = rollout(policy.model(), jax.random.key(5), prompts=4, samples=4, sampling=sampling)
    config, context = rl.CriticFreeConfig(epochs=2, minibatches=2), rl.UpdateContext(sampling=sampling, group_size=4)
    experience, stats = nnx.jit(functools.partial(rl.make_group_experience, context=context, estimator="rloo"),
                                static_argnums=(7, 8))(
        policy.model(), tiny("lm", 0), ids, mask, action_mask, target_fraction(ids, action_mask), 0.1, config, 4,
        out.sequence_logprobs())
    assert float(stats["logprob_gap_max"]) < 1e-5
    _, metrics = jax.jit(functools.partial(rl.critic_free_update, policy_tx=tx, config=config, context=context))(
        policy, experience, jax.random.key(7), 0.1)
    assert abs(float(metrics["ratio_mean"][0]) - 1) < 1e-6 and abs(float(metrics["ratio_max"][0]) - 1) < 1e-6


def _group_batch(estimator, **config):
    policy = tiny("lm", 0)
    out, ids, mask, action_mask = rollout(policy, jax.random.key(8), prompts=2, samples=4)
    config, context = critic_free_configs(estimator, epochs=2, **config)  # two epochs: old log-probs computed
    experience, _ = nnx.jit(functools.partial(rl.make_group_experience, context=context, estimator=estimator),
                            static_argnums=(7, 8))(
        policy, tiny("lm", 0), ids, mask, action_mask, target_fraction(ids, action_mask), 0.0, config, 4,
        out.sequence_logprobs())
    return policy, experience, config


def _loss(policy, experience, config):
    return float(nnx.jit(rl.critic_free_loss, static_argnums=3)(policy, experience, 0.0, config)[0])


@pytest.mark.parametrize("estimator", ["reinforce", "rloo"])
def test_reinforce_and_rloo_use_the_summed_sequence_logprob(estimator):
    policy, experience, config = _group_batch(estimator)
    assert config.loss_aggregation == "seq_sum"
    graph, params = nnx.split(policy)
    A_B, m_BT = np.asarray(experience.advantages_B), np.asarray(experience.action_mask_BT)

    @jax.jit
    def loss(params):
        return rl.critic_free_loss(nnx.merge(graph, params), experience, 0.0, config)[0]

    @jax.jit
    def by_hand(params):  # -1/B sum_b A_b sum_t log pi(a_t): REINFORCE with the summed log-prob
        logp_BT = sequence_logprobs(nnx.merge(graph, params), experience.ids_BT, experience.mask_BT)
        return -jnp.mean(A_B * jnp.sum(logp_BT * m_BT, axis=1))

    np.testing.assert_allclose(float(loss(params)), -np.mean(A_B * m_BT.sum(1)), rtol=1e-5)  # ratio 1
    for got, want in zip(jax.tree.leaves(jax.jit(jax.grad(loss))(params)), jax.tree.leaves(jax.jit(jax.grad(by_hand))(params))):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_grpo_defaults_to_the_sequence_mean_of_token_means_and_takes_dr_grpo():
    policy, experience, config = _group_batch("grpo")
    A_B, m_BT = np.asarray(experience.advantages_B), np.asarray(experience.action_mask_BT)
    np.testing.assert_allclose(_loss(policy, experience, config), -np.mean(A_B), atol=1e-6)  # each sequence's token mean of -A is -A
    dr = rl.GRPOConfig(epochs=2, loss_aggregation="seq_sum", loss_normalizer=8.0)
    np.testing.assert_allclose(_loss(policy, experience, dr), -np.mean(A_B * m_BT.sum(1)) / 8.0, rtol=1e-5)


def test_truncated_importance_sampling_weighs_tokens_by_the_capped_ratio():
    policy, experience, config = _group_batch("reinforce", tis_cap=2.0)
    m_BT = np.asarray(experience.action_mask_BT)
    shift_BT = np.where(np.arange(m_BT.shape[1]) % 2 == 0, np.log(3.0), np.log(0.5)) * m_BT  # trainer/sampler 3 or 0.5
    skewed = experience.replace(sampler_logp_BT=experience.old_logp_BT - shift_BT)
    weights_BT = np.minimum(np.exp(shift_BT), 2.0) * m_BT  # capped at 2
    A_B = np.asarray(experience.advantages_B)
    np.testing.assert_allclose(_loss(policy, skewed, config), -np.mean(A_B * weights_BT.sum(1)), rtol=1e-5)
    untouched = _loss(policy, skewed, rl.CriticFreeConfig(epochs=2))
    np.testing.assert_allclose(untouched, -np.mean(A_B * m_BT.sum(1)), rtol=1e-5)

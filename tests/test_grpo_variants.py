"""The GRPO family as options of one code path (``losses.grpo_loss``): GSPO's
sequence ratio and CISPO's clipped stop-gradient weights against hand-worked values and
gradients, Dr. GRPO's unscaled advantages, DAPO's overlong punishment, and the invariant that
at ratio 1 (the first minibatch) every variant's update is GRPO's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from rl_tiny import critic_free_configs, tiny
from test_rl_critic_free import experience_for

from rlhf_jax import advantages, losses, rl
from rlhf_jax.rl.rewards import overlong_penalty
from rlhf_jax.train import TrainState

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

MASK = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
OLD = jnp.asarray([[-1.0, -2.0, -3.0], [-1.5, -0.5, -2.5]])
ADVANTAGES = jnp.asarray([1.0, -1.0])


def loss_of(log_ratio_BT, **options):
    return lambda logp_BT: losses.grpo_loss(logp_BT, OLD, OLD, ADVANTAGES, MASK, beta=0.0, clip_eps=0.2,
                                            **options)[0], OLD + log_ratio_BT


def test_gspo_clips_one_ratio_per_sequence_by_hand():
    # sequence 0: mean log-ratio over its 2 tokens (0.1 + 0.3) / 2 = 0.2, s = e^0.2 = 1.2214 > 1.2 with A = 1:
    #   clipped, loss -1.2, no gradient; sequence 1: mean (-0.1 - 0.2 - 0.3) / 3 = -0.2, s = e^-0.2 = 0.8187
    #   inside [0.8, 1.2] with A = -1: loss s, d/dlogp_t = s / 3 for each of its tokens.
    fn, logp = loss_of(jnp.asarray([[0.1, 0.3, 9.0], [-0.1, -0.2, -0.3]]), importance_ratio="sequence")
    s1 = np.exp(-0.2)
    assert float(fn(logp)) == pytest.approx((-1.2 + s1) / 2, rel=1e-6)  # seq_mean_token_mean over 2 sequences
    np.testing.assert_allclose(jax.grad(fn)(logp), [[0, 0, 0], [s1 / 6] * 3], rtol=1e-5, atol=1e-7)


def test_cispo_keeps_the_gradient_of_clipped_tokens_with_a_clipped_constant_weight():
    # ratios 1.5, 0.5 | 1.0, 1.1, 0.7: weights clip(r, 0.8, 1.28) = 1.28, 0.8 | 1.0, 1.1, 0.8.
    log_ratio = jnp.log(jnp.asarray([[1.5, 0.5, 1.0], [1.0, 1.1, 0.7]]))
    fn, logp = loss_of(log_ratio, surrogate="cispo", clip_eps_high=0.28, aggregation="token_mean")
    weights = np.asarray([[1.28, 0.8, 0.0], [1.0, 1.1, 0.8]])
    loss_BT = -weights * np.asarray(ADVANTAGES)[:, None] * np.asarray(logp)
    assert float(fn(logp)) == pytest.approx(loss_BT.sum() / 5, rel=1e-5)
    # every valid token keeps a gradient, -w A / N -- PPO's clip would zero the first token's (r > 1 + eps, A > 0)
    np.testing.assert_allclose(jax.grad(fn)(logp), -weights * np.asarray(ADVANTAGES)[:, None] / 5, rtol=1e-5)
    _, ppo_logp = loss_of(log_ratio, aggregation="token_mean")
    ppo_grad = jax.grad(loss_of(log_ratio, aggregation="token_mean")[0])(ppo_logp)
    assert float(ppo_grad[0, 0]) == 0.0


def test_dr_grpo_advantages_keep_the_scale_of_the_rewards():
    rewards_BG = jnp.asarray([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    unscaled, _ = advantages.group_relative_advantages(rewards_BG, scale_by_std=False)
    np.testing.assert_allclose(unscaled, [[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, 0.0, 0.0]], atol=1e-7)


def test_dapo_overlong_punishment_by_hand():
    # L_max 16, L_cache 4: no punishment up to 12 tokens, then (12 - |y|) / 4 down to -1 at 16
    np.testing.assert_allclose(overlong_penalty(jnp.asarray([10, 12, 13, 15, 16]), 16, 4),
                               [0.0, 0.0, -0.25, -0.75, -1.0])
    with pytest.raises(ValueError, match="overlong buffer"):
        overlong_penalty(jnp.asarray([1]), 16, 17)


def test_at_ratio_one_every_variant_takes_grpos_step():
    """One epoch of one minibatch: the ratio is 1, where GSPO's sequence ratio, CISPO's weight and
    DAPO's clip range all reduce to GRPO's gradient, so the updated parameters are equal (and
    differ from the starting ones)."""
    scores = [1.0, 0.0, 0.0, 1.0, 2.0, 0.5, 2.0, 1.0]

    def updated(**variant):
        experience, _ = experience_for("grpo", scores, beta=0.0, **variant)
        config, context = critic_free_configs("grpo", **variant)
        state = TrainState.create(tiny("lm", 0), optax.sgd(0.5), jax.random.key(0))
        state, _ = rl.critic_free_update(state, experience, jax.random.key(1), 0.0, optax.sgd(0.5), config,
                                         context=context)
        return jax.tree.leaves(state.params)

    grpo = updated()
    start = jax.tree.leaves(TrainState.create(tiny("lm", 0), optax.sgd(0.5), jax.random.key(0)).params)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(grpo, start, strict=True)) > 1e-4
    for options in ({"importance_ratio": "sequence"}, {"surrogate": "cispo"}, {"clip_eps_high": 0.28}):
        for a, b in zip(grpo, updated(**options), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, err_msg=str(options))

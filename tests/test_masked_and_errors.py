import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from rlhf_jax.masked import aggregate, masked_mean

VALUES = np.array([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])


def test_aggregation_modes_by_hand():
    token_mean = aggregate(jnp.asarray(VALUES), jnp.asarray(MASK), "token_mean")
    assert float(token_mean) == pytest.approx((1 + 2 + 3 + 4 + 10 + 20) / 6)
    seq_mean = aggregate(jnp.asarray(VALUES), jnp.asarray(MASK), "seq_mean_token_mean")
    assert float(seq_mean) == pytest.approx((2.5 + 15.0) / 2)  # the empty row does not count
    seq_sum = aggregate(jnp.asarray(VALUES), jnp.asarray(MASK), "seq_sum", normalizer=4.0)
    assert float(seq_sum) == pytest.approx((10 + 30 + 0) / (3 * 4.0))


def test_all_masked_reduces_to_zero_not_nan():
    zeros = jnp.zeros((2, 3), bool)
    assert float(masked_mean(jnp.ones((2, 3)), zeros)) == 0.0
    for mode in ("token_mean", "seq_mean_token_mean", "seq_sum"):
        assert float(aggregate(jnp.ones((2, 3)), zeros, mode)) == 0.0


z4 = jnp.zeros(4)
z24 = jnp.zeros((2, 4))
m24 = jnp.ones((2, 4), bool)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: aggregate(z24, m24, "mean"), "aggregation mode"),
        (lambda: aggregate(z24, jnp.full((2, 4), 0.5), "token_mean"), "mask_BT must contain only 0 and 1"),
        (lambda: losses.dpo_loss(z4, z4, z4, z4, loss_type="exo"), "unknown loss_type 'exo'.*sigmoid"),
        (lambda: losses.dpo_loss(z4, z4, z4, jnp.zeros(5)), "ref_rejected_logps_B"),
        (lambda: losses.dpo_loss(z24, z24, z24, z24), "policy_chosen_logps_B must have rank 1"),
        (lambda: losses.dpo_loss(z4, z4, z4, z4, loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
        (lambda: losses.dpo_loss(z4, z4, z4, z4, label_smoothing=0.5), "label_smoothing"),
        (lambda: losses.dpo_loss(jnp.zeros(4, jnp.int32), z4, z4, z4), "floating"),
        (lambda: losses.simpo_loss(z4, z4, jnp.zeros(4), jnp.ones(4)), "chosen_lengths_B must be > 0"),
        (lambda: losses.kto_loss(z4, z4, jnp.array([0, 1, 2, 1]), 0.0), "desirable_B"),
        (lambda: losses.bradley_terry_loss(z4, jnp.zeros(3)), "rejected_rewards_B"),
        (lambda: losses.bradley_terry_loss(z4, z4, margin_B=jnp.zeros(2)), "margin_B"),
        (lambda: losses.ranking_loss(z4), "rewards_BK must have rank 2"),
        (lambda: losses.ranking_loss(z24, kind="listnet"), "ranking kind"),
        (lambda: losses.ppo_policy_loss(z24, z24, z24, jnp.full((2, 4), 0.3)), "mask_BT"),
        (lambda: losses.ppo_policy_loss(z24, jnp.zeros((2, 5)), z24, m24), "old_logp_BT"),
        (lambda: losses.ppo_policy_loss(z24, z24, z24, m24, dual_clip=0.5), "dual_clip"),
        (lambda: losses.ppo_value_loss(z4, z4, z4, jnp.ones(4)), "values_BT must have rank 2"),
        (lambda: losses.sft_loss(jnp.zeros((2, 4, 3)), jnp.zeros((2, 5), jnp.int32), m24), "mask_BT|targets_BT"),
        (lambda: losses.grpo_loss(z24, z24, z24, jnp.zeros(3), m24), "advantages_B"),
        (lambda: losses.reinforce_loss(z24, jnp.zeros(3), m24), "rewards_B"),
        (lambda: losses.entropy_bonus(jnp.zeros((2, 4)), m24), "logits_BTV must have rank 3"),
    ],
)
def test_bad_input_gives_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()

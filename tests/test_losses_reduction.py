"""``reduction="none"``: the pairwise and ranking losses give per-example values that the
objectives sum; each equals the loss of that example alone, and their mean is
the default reduction's value."""

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

RNG = np.random.default_rng(0)
B = 5
CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED = (jnp.asarray(RNG.normal(-20, 3, B), jnp.float32) for _ in range(4))
MARGIN = jnp.asarray(RNG.uniform(0, 1, B), jnp.float32)
REWARDS_BK = jnp.asarray(RNG.normal(0, 1, (B, 4)), jnp.float32)
VALID_BK = jnp.asarray(np.arange(4)[None] < np.array([4, 2, 3, 4, 2])[:, None])

CALLS = {
    "dpo sigmoid": lambda rows, **kw: losses.dpo_loss(CHOSEN[rows], REJECTED[rows], REF_CHOSEN[rows],
                                                      REF_REJECTED[rows], beta=0.1, **kw),
    "dpo ipo": lambda rows, **kw: losses.dpo_loss(CHOSEN[rows], REJECTED[rows], REF_CHOSEN[rows], REF_REJECTED[rows],
                                                  beta=0.1, loss_type="ipo", **kw),
    "dpo robust": lambda rows, **kw: losses.dpo_loss(CHOSEN[rows], REJECTED[rows], REF_CHOSEN[rows],
                                                     REF_REJECTED[rows], loss_type="robust", label_smoothing=0.2, **kw),
    "simpo": lambda rows, **kw: losses.simpo_loss(CHOSEN[rows], REJECTED[rows], jnp.full(len(rows), 7.0),
                                                  jnp.full(len(rows), 9.0), **kw),
    "bradley-terry": lambda rows, **kw: losses.bradley_terry_loss(CHOSEN[rows] / 10, REJECTED[rows] / 10,
                                                                  margin_B=MARGIN[rows], center_coef=0.1, **kw),
    "all pairs": lambda rows, **kw: losses.ranking_loss(REWARDS_BK[rows], valid_BK=VALID_BK[rows], **kw),
    "plackett-luce": lambda rows, **kw: losses.ranking_loss(REWARDS_BK[rows], valid_BK=VALID_BK[rows],
                                                            kind="plackett_luce", **kw),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_per_example_values_are_each_example_alone_and_average_to_the_mean(name):
    call, rows = CALLS[name], np.arange(B)
    loss_B, aux = call(rows, reduction="none")
    mean, mean_aux = call(rows)
    assert loss_B.shape == (B,)
    np.testing.assert_allclose(float(jnp.mean(loss_B)), float(mean), rtol=1e-6)
    for b in range(B):
        alone, alone_aux = call(np.array([b]))
        np.testing.assert_allclose(float(loss_B[b]), float(alone), rtol=1e-6)
        for field, value in zip(aux._fields, aux, strict=True):
            np.testing.assert_allclose(float(value[b]), float(getattr(alone_aux, field)), rtol=1e-6, err_msg=field)
    if name != "all pairs" and name != "plackett-luce":  # a ranking's pair accuracy is over all pairs
        for field, value in zip(aux._fields, aux, strict=True):
            np.testing.assert_allclose(float(jnp.mean(value)), float(getattr(mean_aux, field)), rtol=1e-5, atol=1e-6)


def test_an_unknown_reduction_is_named():
    with pytest.raises(ValueError, match="reduction"):
        CALLS["dpo sigmoid"](np.arange(B), reduction="sum")


def test_sequence_nll_sums_the_masked_token_nll_of_each_row():
    logp_BT = jnp.log(jnp.asarray([[0.5, 0.25, 0.125], [1.0, 0.5, 0.5]]))
    mask_BT = jnp.asarray([[0, 1, 1], [1, 1, 0]])
    nll_B, tokens_B = losses.sequence_nll(logp_BT, mask_BT)
    np.testing.assert_allclose(nll_B, [np.log(4) + np.log(8), np.log(2)], rtol=1e-6)
    np.testing.assert_array_equal(tokens_B, [2, 2])


def test_kto_per_example_values_average_to_the_mean_and_split_the_rewards_by_label():
    desirable_B = jnp.asarray([True, False, True, True, False])
    kwargs = {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.5}
    loss_B, aux = losses.kto_loss(CHOSEN, REF_CHOSEN, desirable_B, 0.3, reduction="none", **kwargs)
    loss, mean_aux = losses.kto_loss(CHOSEN, REF_CHOSEN, desirable_B, 0.3, **kwargs)
    np.testing.assert_allclose(float(jnp.mean(loss_B)), float(loss), rtol=1e-6)
    np.testing.assert_allclose(float(jnp.sum(aux.desirable_reward) / 3), float(mean_aux.desirable_reward), rtol=1e-6)
    np.testing.assert_allclose(float(jnp.sum(aux.undesirable_reward) / 2), float(mean_aux.undesirable_reward),
                               rtol=1e-6)
    assert float(jnp.abs(aux.desirable_reward[1])) == 0.0 and float(jnp.abs(aux.undesirable_reward[0])) == 0.0

"""Sampling filters: the allowed sets worked out by hand, no token outside them, and draw
frequencies matching the filtered distribution (chi-square)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rlhf_jax.rollout import SamplingConfig, sample_token, sampling_logprobs

PROBS = np.array([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])  # sorted, so the allowed sets are easy to read
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))[None]

# (config, allowed tokens, worked out by hand)
CASES = [
    (SamplingConfig(), [0, 1, 2, 3, 4, 5]),
    (SamplingConfig(top_k=3), [0, 1, 2]),
    (SamplingConfig(top_p=0.6), [0, 1]),  # 0.35 < 0.6, then 0.35 + 0.25 reaches it
    (SamplingConfig(top_p=0.61), [0, 1, 2]),
    (SamplingConfig(min_p=0.4), [0, 1, 2]),  # p >= 0.4 * 0.35 = 0.14
    (SamplingConfig(top_k=4, min_p=0.5), [0, 1]),  # within the top 4, p >= 0.5 * max of the renormalised
    (SamplingConfig(temperature=0.5, top_p=0.8), [0, 1]),  # p^2 renormalised: 0.531, 0.271, ...
]


def filtered(config, allowed):
    z = np.log(PROBS) / config.temperature
    z = np.where(np.isin(np.arange(len(PROBS)), allowed), z, -np.inf)
    return np.exp(z - np.logaddexp.reduce(z))


@pytest.mark.parametrize(("config", "allowed"), CASES)
def test_filters_keep_the_hand_worked_set(config, allowed):
    logp = np.asarray(sampling_logprobs(LOGITS, config))[0]
    assert np.flatnonzero(np.isfinite(logp)).tolist() == allowed
    np.testing.assert_allclose(np.exp(logp), filtered(config, allowed), atol=1e-6)


@pytest.mark.parametrize(("config", "allowed"), CASES)
def test_draws_stay_in_the_set_and_follow_the_distribution(config, allowed):
    n = 20_000
    keys = jax.random.split(jax.random.key(0), n)
    tokens, logps = jax.vmap(lambda k: sample_token(k[None], LOGITS, config))(keys)
    tokens = np.asarray(tokens)[:, 0]
    assert set(np.unique(tokens)) <= set(allowed)
    expected = filtered(config, allowed)
    np.testing.assert_allclose(np.exp(np.asarray(logps)[:, 0]), expected[tokens], rtol=1e-5)
    counts = np.bincount(tokens, minlength=len(PROBS))[allowed]
    if len(allowed) > 1:
        assert stats.chisquare(counts, n * expected[allowed]).pvalue > 1e-3


def test_greedy_is_the_argmax_with_the_model_logprob():
    token, logp = sample_token(jax.random.key(0)[None], LOGITS, SamplingConfig(temperature=0.0))
    assert int(token[0]) == 0
    np.testing.assert_allclose(float(logp[0]), np.log(0.35), rtol=1e-6)

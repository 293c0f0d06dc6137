"""Best-of-N picks the best sample of each prompt; RAFT (SFT on the kept best) raises a
known reward on the tiny policy."""

import functools

import jax
import numpy as np
import optax
import pytest
from rl_tiny import PROMPT, V, rollout, target_fraction, tiny

from rlhf_jax.data import byte_tokenizer
from rlhf_jax.rl.best_of_n import best_in_groups, best_of_n, raft_update
from rlhf_jax.rl.rewards import FunctionReward
from rlhf_jax.rollout import GenerationConfig
from rlhf_jax.train import TrainState

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py


def test_best_in_groups_by_hand():
    scores = np.asarray([0.1, 0.9, 0.3, 0.5, 0.5, 0.2])
    np.testing.assert_array_equal(best_in_groups(scores, 3), [1, 3])  # ties: the first
    np.testing.assert_array_equal(best_in_groups(scores, 2), [1, 3, 4])


def test_best_of_n_returns_each_prompts_best_sample():
    tokenizer = byte_tokenizer()
    model = tiny("lm", 0)
    prompts = np.asarray(jax.random.randint(jax.random.key(0), (3, PROMPT), 1, V))
    config = GenerationConfig(max_new_tokens=6, stop_token_ids=(0,), pad_token_id=0, prompt_buckets=(PROMPT,),
                              num_samples=5)
    texts = ["p0", "p1", "p2"]
    completions, best, all_scores = best_of_n(model, tokenizer, prompts, np.ones_like(prompts), texts,
                                              jax.random.key(1), config, FunctionReward(lambda p, c: len(c), "len"))
    assert all_scores.shape == (3, 5)
    np.testing.assert_array_equal(best, all_scores.max(axis=1))
    assert [len(c) for c in completions] == list(best)


@pytest.mark.slow
def test_raft_raises_a_known_reward():
    tx = optax.adam(3e-3)
    policy = TrainState.create(tiny("lm", 0), tx, jax.random.key(0))
    update = jax.jit(functools.partial(raft_update, policy_tx=tx, epochs=2, minibatches=1))
    history = []
    for iteration in range(20):
        key = jax.random.key(300 + iteration)
        _, ids, mask, action_mask = rollout(policy.model(), key, prompts=8, samples=4)
        scores = np.asarray(target_fraction(ids, action_mask))
        best = best_in_groups(scores, 4)
        policy, metrics = update(policy, ids[best], mask[best], action_mask[best], jax.random.fold_in(key, 2))
        history.append(float(scores.mean()))
    assert np.mean(history[:3]) < 0.15 and np.mean(history[-3:]) > 0.3, history

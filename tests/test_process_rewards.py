"""Process supervision in the loss core: a process reward model's per-step
loss and accuracy by hand, and step rewards at step ends shaped with the KL and credited to
every earlier token by GAE."""

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import advantages, kl, losses

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py


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


def encoded_steps(rows, max_length=64):
    from rlhf_jax.data import DataReport, Encoder, byte_tokenizer, encode_examples, parse_row

    tokenizer = byte_tokenizer()
    report = DataReport("steps")
    examples = [(f"row {i}", parse_row(row, "steps")) for i, row in enumerate(rows)]
    return tokenizer, encode_examples(examples, Encoder(tokenizer, max_length=max_length), report), report


def test_step_ends_are_each_steps_newline_and_the_final_eos():
    from rlhf_jax.data import TokenizedData

    rows = [{"prompt": "1+2+3=", "steps": ["1+2=3", "3+3=6"], "labels": [1, 0]},
            {"prompt": "9+9+9=", "steps": ["9+9=18", "18+9=27", "27"], "labels": [True, 0.5, 1]}]
    tokenizer, items, _ = encoded_steps(rows)
    for item, row in zip(items, rows):
        ids = item.sequence.ids
        assert [tokenizer.decode([ids[e]]) for e in item.step_ends[:-1]] == ["\n"] * (len(row["steps"]) - 1)
        assert ids[item.step_ends[-1]] == tokenizer.eos_token_id and item.step_ends[-1] == len(ids) - 1
        text = tokenizer.decode(ids[item.sequence.loss_mask], skip_special_tokens=True)
        assert text == "\n".join(row["steps"])  # the response is the steps, one per line
        np.testing.assert_array_equal(item.labels, np.asarray(row["labels"], np.float32))
    batch = TokenizedData(items, tokenizer.pad_token_id, 64).collate(np.arange(2), 64)
    assert batch.step_mask_BT.sum() == 5 and batch.step_labels_BT.sum() == 1 + 1 + 0.5 + 1
    assert np.all(batch.step_labels_BT[batch.step_mask_BT == 0] == 0)
    # truncation keeps the steps that end inside max_length, drops a row with none
    short = len(tokenizer("1+2+3=1+2=3\n")["input_ids"]) + 1
    _, cut, report = encoded_steps(rows[:1], max_length=short)
    assert len(cut[0].step_ends) == 1 and cut[0].labels.tolist() == [1.0] and report.responses_truncated == 1


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "steps": ["a\nb"], "labels": [1]}, "a step holds a newline"),
    ({"prompt": "p", "steps": ["a", "b"], "labels": [1]}, "1 labels for 2 steps"),
    ({"prompt": "p", "steps": ["a"], "labels": [2]}, "labels should be booleans or numbers in"),
    ({"prompt": "p", "steps": [], "labels": []}, "steps should be a non-empty list"),
])
def test_malformed_step_rows_are_refused_saying_why(row, message):
    from rlhf_jax.data import MalformedRow, parse_row

    with pytest.raises(MalformedRow, match=message):
        parse_row(row, "steps")


def test_prm_loss_reads_the_score_head_at_the_step_ends():
    import jax
    from flax import nnx

    from rlhf_jax import models
    from rlhf_jax.data import TokenizedData
    from rlhf_jax.train.prm import prm_loss_sums, step_logits

    tokenizer, items, _ = encoded_steps([{"prompt": "1+2+3=", "steps": ["1+2=3", "3+3=7"], "labels": [1, 0]},
                                         {"prompt": "2+2+2=", "steps": ["2+2=4", "4+2=6"], "labels": [1, 1]}])
    batch = jax.tree.map(jnp.asarray, TokenizedData(items, tokenizer.pad_token_id, 64).collate(np.arange(2), 64))
    config = models.config_from_hf({"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 64})
    model = models.build_model(config, "score", rngs=nnx.Rngs(0))
    logits = np.asarray(step_logits(model, batch))
    expected = []
    for row, item in enumerate(items):
        for end, label in zip(item.step_ends, item.labels):
            z = logits[row, end]
            expected.append(-(label * np.log(1 / (1 + np.exp(-z))) + (1 - label) * np.log(1 / (1 + np.exp(z)))))
    loss_sum, steps, metrics = prm_loss_sums(model, batch)
    assert float(steps) == 4 and float(loss_sum) == pytest.approx(sum(expected), rel=1e-5)
    right = sum((logits[r, e] > 0) == (y > 0.5) for r, it in enumerate(items) for e, y in zip(it.step_ends, it.labels))
    assert float(metrics["step_accuracy"]) == pytest.approx(right)


def test_step_rewards_land_at_each_newline_and_the_last_action_token():
    from flax import nnx

    from rlhf_jax import models
    from rlhf_jax.data import byte_tokenizer
    from rlhf_jax.rl.process_rewards import ProcessReward, process_step_rewards, step_end_mask

    newline = 5  # the step separator's id in this toy vocabulary
    ids = jnp.asarray([[1, 2, 3, 5, 4, 5, 6, 0], [1, 2, 5, 4, 4, 0, 0, 0]])
    action = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0, 0, 0]])  # a prompt of 2, a padded tail
    ends = step_end_mask(ids, action, jnp.asarray([newline]))
    np.testing.assert_array_equal(ends, [[0, 0, 0, 1, 0, 1, 1, 0], [0, 0, 1, 0, 1, 0, 0, 0]])
    config = models.config_from_hf({"model_type": "llama", "vocab_size": 16, "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "rms_norm_eps": 1e-5, "max_position_embeddings": 16})
    prm = models.build_model(config, "score", rngs=nnx.Rngs(3))
    mask = jnp.ones_like(ids)
    rewards = process_step_rewards(prm, ids, mask, action, jnp.asarray([newline]), 2.0)
    z = np.asarray(prm(ids, mask)[..., 0])
    np.testing.assert_allclose(rewards, 2.0 * (1 / (1 + np.exp(-z)) - 0.5) * np.asarray(ends), rtol=1e-6, atol=1e-7)
    tokenizer = byte_tokenizer()  # every token whose text holds a newline ends a step
    found = ProcessReward(prm, tokenizer).newline_ids
    assert len(found) >= 1 and all("\n" in tokenizer.decode([int(i)]) for i in found)

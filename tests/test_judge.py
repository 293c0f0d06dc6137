"""The AI judge (``rl.judge``): the verdict probability by hand, both orders averaged (so the
two orders of a pair sum to 1), a verdict equal to the model's own next-token distribution,
and group scores as mean win probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import models
from rlhf_jax.data import byte_tokenizer
from rlhf_jax.rl.judge import TEMPLATE, PairwiseJudge, group_scores, verdict_probability
from rlhf_jax.rl.rewards import RewardError


def test_verdict_probability_by_hand():
    logits = jnp.asarray([[0.0, 2.0, 1.0, 9.0], [0.0, -1.0, 1.0, 9.0]])  # verdict tokens 1 (A) and 2 (B)
    np.testing.assert_allclose(verdict_probability(logits, 1, 2),
                               [1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(2.0))], rtol=1e-6)


def tiny_judge(**options):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = None  # plain text: the verdict is " A" / " B"
    config = models.config_from_hf({"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 512})
    model = models.build_model(config, "lm", rngs=nnx.Rngs(3))
    return PairwiseJudge(model, tokenizer, "Prefer more vowels.", batch_size=4, **options), model, tokenizer


def test_both_orders_are_averaged_and_equal_the_models_own_verdict():
    judge, model, tokenizer = tiny_judge()
    prompts, a, b = ["abc=", "hgf=", "x="], ["aeae", "hhh", "q"], ["hhhh", "eee", "qq"]
    forward, backward = judge.prefer_first(prompts, a, b), judge.prefer_first(prompts, b, a)
    np.testing.assert_allclose(forward + backward, 1.0, atol=1e-6)  # position bias cancels
    # one order by hand: the model's next-token logits after the filled template, A against B
    text = TEMPLATE.format(principle="Prefer more vowels.", prompt="abc=", first="aeae", second="hhhh")
    ids = jnp.asarray([tokenizer(text + " ")["input_ids"]])  # bytes: the verdicts share the space, then A / B
    logits_V = model(ids, jnp.ones_like(ids))[0, -1]
    a_id, b_id = tokenizer.encode("A", add_special_tokens=False)[0], tokenizer.encode("B", add_special_tokens=False)[0]
    by_hand = float(jax.nn.softmax(jnp.stack([logits_V[a_id], logits_V[b_id]]))[0])
    assert float(judge._probability_first(["abc="], ["aeae"], ["hhhh"])[0]) == pytest.approx(by_hand, abs=1e-5)
    with pytest.raises(RewardError, match="more than the judge's max_length=40"):
        tiny_judge(max_length=40)[0].prefer_first(prompts, a, b)


class FixedJudge:
    """P(first beats second) = 0.9 when the first is longer, 0.1 when shorter, 0.5 on a tie."""

    def prefer_first(self, prompts, firsts, seconds):
        return np.asarray([0.5 + 0.4 * np.sign(len(x) - len(y)) for x, y in zip(firsts, seconds)])


def test_group_scores_are_mean_win_probabilities():
    scores = group_scores(FixedJudge(), ["p"] * 6, ["aaa", "a", "aa", "b", "bb", "bb"], group_size=3)
    # group 1: "aaa" beats both (0.9, 0.9); "a" loses both (0.1, 0.1); "aa" 0.1 and 0.9
    # group 2: "b" loses both; the two "bb" beat "b" (0.9) and tie each other (0.5)
    np.testing.assert_allclose(scores, [0.9, 0.1, 0.5, 0.1, 0.7, 0.7], atol=1e-6)
    with pytest.raises(ValueError, match="groups of 4"):
        group_scores(FixedJudge(), ["p"] * 6, ["a"] * 6, group_size=4)

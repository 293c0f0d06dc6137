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

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py


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


def test_rlhf_jax_label_writes_the_pairs_the_judge_prefers(tmp_path):
    from rlhf_jax import config
    from rlhf_jax.config import ConfigError
    from rlhf_jax.export import write_hf
    from rlhf_jax.phases.iterative_dpo import IterativeDPOConfig
    from rlhf_jax.phases.iterative_dpo import check_config as check_iterative
    from rlhf_jax.phases.label import LabelRunConfig, build_judge, run_label

    _, model, tokenizer = tiny_judge()
    write_hf(model, byte_tokenizer(), tmp_path / "lm")  # the policy and the judge: one tiny random LM
    (tmp_path / "principle.txt").write_text("Prefer more vowels.")
    overrides = [f"policy.path={tmp_path / 'lm'}", f"judge.model={tmp_path / 'lm'}",
                 f"judge.principle={tmp_path / 'principle.txt'}", f"output={tmp_path / 'pairs.jsonl'}",
                 "data.source=tests/data/sft.jsonl", "data.format=prompt_completion", "data.limit=6",
                 "data.chat_template=never", "rollout.prompts=3", "rollout.samples=2", "rollout.max_new_tokens=6"]
    label_config = config.load(LabelRunConfig, None, overrides)
    result = run_label(label_config)
    rows = [__import__("json").loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert result.eval["pairs"] == len(rows) and len(rows) + result.eval["empty_completions"] // 2 >= 5
    judge = build_judge(label_config.judge)  # asked again, independently: every chosen response is preferred
    preferred = judge.prefer_first([r["prompt"] for r in rows], [r["chosen"] for r in rows],
                                   [r["rejected"] for r in rows])
    assert (preferred > 0.5).all() and all(r["scores"][0] > r["scores"][1] for r in rows)
    # the DPO phase reading the pairs sees the very ids sampled: no re-tokenization, no EOS added to a cut one
    from rlhf_jax.data import DataConfig, load_data

    pairs, _, _ = load_data(DataConfig(source=str(tmp_path / "pairs.jsonl"), format="preference", max_length=64,
                                       chat_template="never"), byte_tokenizer())
    eos = byte_tokenizer().eos_token_id
    assert any(r["token_ids"]["chosen"][-1] != eos for r in rows)  # a completion cut at max_new_tokens
    for row, pair in zip(rows, pairs.items):
        ids = row["token_ids"]
        for side in ("chosen", "rejected"):
            sequence = getattr(pair, side)
            assert sequence.ids.tolist() == ids["prompt"] + ids[side]
            assert sequence.loss_mask.tolist() == [0] * len(ids["prompt"]) + [1] * len(ids[side])
    with pytest.raises(ConfigError, match="cannot read the principle file"):
        run_label(config.load(LabelRunConfig, None, [*overrides, "judge.principle=/no/such/principle.txt"]))
    # an output that would overwrite the prompts, or cannot be written, is refused before any sampling
    before = (tmp_path / "pairs.jsonl").stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"output=tests/data/sft.jsonl: writing it would overwrite data.source"):
        run_label(config.load(LabelRunConfig, None, [*overrides, "output=tests/data/sft.jsonl"]))
    with pytest.raises(ConfigError, match=r"output=.*pairs.jsonl/out.jsonl: cannot write .*; give a .jsonl path"):
        run_label(config.load(LabelRunConfig, None, [*overrides, f"output={tmp_path / 'pairs.jsonl' / 'out.jsonl'}"]))
    assert (tmp_path / "pairs.jsonl").stat().st_mtime_ns == before
    # the judge as iterative DPO's labeller passes the config check (its checkpoint found)
    check_iterative(config.load(IterativeDPOConfig, "configs/iterative_dpo_tiny.yaml", [
        f"model.path={tmp_path / 'lm'}", "reward.function=null", f"labels.judge.model={tmp_path / 'lm'}",
        f"labels.judge.principle={tmp_path / 'principle.txt'}"]))

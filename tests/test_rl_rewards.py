"""Reward sources: a function's failures name the sample or are penalised and counted; a
reward model with its own tokenizer reads the text (the handoff); sums; score shaping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_jax import models
from rlhf_jax.data import byte_tokenizer
from rlhf_jax.models.sharding import place, rows_sharding
from rlhf_jax.rl.rewards import FunctionReward, ModelReward, RewardError, SumReward, load_function, shape_scores
from rlhf_jax.rollout import Rollout, decode_completions
from rlhf_jax.tasks import vowel_share

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

PROMPTS = ["abc=", "hgf=", "dea="]
COMPLETIONS = ["aeab", "hhhh", "eeee"]


def test_function_reward_scores_and_names_the_failing_sample():
    scores, penalised = FunctionReward(vowel_share, "vowels")(PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(scores, [0.75, 0.0, 1.0])
    assert penalised == 0

    def picky(prompt, completion):
        if completion == "hhhh":
            raise KeyError("h")
        return float("inf") if completion == "eeee" else 1.0

    with pytest.raises(RewardError, match=r"picky raised KeyError: 'h' for sample 1 \(prompt 'hgf=', completion 'hhhh'\)"):
        FunctionReward(picky, "picky")(PROMPTS, COMPLETIONS)
    with pytest.raises(RewardError, match="returned 'x', not a finite number for sample 0"):
        FunctionReward(lambda p, c: "x", "text")(PROMPTS, COMPLETIONS)
    scores, penalised = FunctionReward(picky, "picky", on_error="penalty", penalty=-5.0)(PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(scores, [1.0, -5.0, -5.0])
    assert penalised == 2


def char_tokenizer():
    """A reward model's tokenizer unlike the policy's: characters a-h only, its own special
    tokens ([PAD], [END]) and none of the policy's (<|endoftext|>)."""
    vocab = {"[PAD]": 0, "[END]": 1, "[UNK]": 2, "=": 3} | {ch: 4 + i for i, ch in enumerate("abcdefgh")}
    core = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", eos_token="[END]", unk_token="[UNK]")


def test_a_reward_model_with_its_own_tokenizer_reads_the_text():
    rm_tokenizer, policy_tokenizer = char_tokenizer(), byte_tokenizer()
    assert "<|endoftext|>" not in rm_tokenizer.get_vocab()
    config = models.config_from_hf({"model_type": "llama", "vocab_size": len(rm_tokenizer), "hidden_size": 16,
                                    "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "pad_token_id": 0})
    rm = models.build_model(config, "score", rngs=nnx.Rngs(0))
    # the policy's completions: its own ids, ending with its EOS (257) and padding (256)
    eos, pad = policy_tokenizer.eos_token_id, policy_tokenizer.pad_token_id
    rows = [policy_tokenizer(c, add_special_tokens=False)["input_ids"] + [eos] for c in COMPLETIONS]
    ids = np.full((3, 6), pad)
    mask = np.zeros((3, 6), bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, True
    rollout = Rollout(np.zeros((3, 1)), np.ones((3, 1)), ids, mask, np.zeros((3, 6)), np.ones(3, bool))
    completions = decode_completions(policy_tokenizer, rollout)
    assert completions == COMPLETIONS  # the handoff text carries no policy special token
    scores, _ = ModelReward(rm, rm_tokenizer, max_length=12)(PROMPTS, completions)
    # the reward model sees prompt + completion + its own [END], in its own ids
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        expected_ids = [rm_tokenizer.convert_tokens_to_ids(ch) for ch in p + c] + [1]
        assert 2 not in expected_ids  # nothing unknown
        direct = rm.sequence_scores(jnp.asarray([expected_ids]), jnp.ones((1, len(expected_ids)), jnp.int32))[0, 0]
        np.testing.assert_allclose(scores[i], direct, atol=1e-5)
    # a longer max_length pads the batch only to the smallest bucket that holds it, same scores
    roomy = ModelReward(rm, rm_tokenizer, max_length=200)
    assert roomy.encode(PROMPTS, completions)[0].shape == (3, 32)
    assert roomy.encode(PROMPTS, ["abcdefgh" * 5] * 3)[0].shape == (3, 64)
    np.testing.assert_allclose(roomy(PROMPTS, completions)[0], scores, atol=1e-5)
    # on a mesh: the model placed (fsdp), rows split over the batch axes when they divide
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))
    sharded = ModelReward(place(rm, mesh), rm_tokenizer, max_length=12,
                          rows_sharding=lambda rows: rows_sharding(mesh, rows, ("data", "fsdp")))
    np.testing.assert_allclose(sharded(PROMPTS, completions)[0], scores, atol=1e-5)  # 3 rows: replicated
    eight = (PROMPTS * 3)[:8], (completions * 3)[:8]
    np.testing.assert_allclose(sharded(*eight)[0], np.tile(scores, 3)[:8], atol=1e-5)


def test_sum_reward_and_loading():
    total = SumReward([(2.0, FunctionReward(vowel_share, "v")), (-1.0, FunctionReward(lambda p, c: len(c), "len"))])
    scores, _ = total(PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(scores, [2 * 0.75 - 4, 0 - 4, 2 - 4])
    assert load_function("builtin:letters") is vowel_share
    assert load_function("rlhf_jax.tasks:vowel_share") is vowel_share
    with pytest.raises(RewardError, match="unknown built-in task 'chess'"):
        load_function("builtin:chess")
    with pytest.raises(RewardError, match="should look like package.module:function"):
        load_function("vowel_share")


def test_score_shaping_by_hand():
    scores, stopped = jnp.asarray([1.0, 3.0, -2.0]), jnp.asarray([True, False, True])
    np.testing.assert_allclose(shape_scores(scores, stopped, missing_eos_penalty=1.0), [1.0, 2.0, -2.0])
    np.testing.assert_allclose(shape_scores(scores, stopped, clip=1.5), [1.0, 1.5, -1.5])
    white = shape_scores(scores, stopped, whiten=True)
    np.testing.assert_allclose([white.mean(), white.std()], [0.0, 1.0], atol=1e-6)


def test_multi_objective_sources_are_whitened_weighted_and_logged_each(tmp_path):
    from rlhf_jax.data import byte_tokenizer
    from rlhf_jax.phases.reward_sources import build_reward
    from rlhf_jax.phases.online_config import RewardConfig, RewardSource
    from rlhf_jax.phases.setup import make_mesh
    from rlhf_jax.phases.config import MeshConfig
    from rlhf_jax.rl.scorer_prompts import PromptTable

    config = RewardConfig(sources=(RewardSource("vowels", function="builtin:letters", weight=2.0, whiten=True),
                                   RewardSource("length", function="test_rl_rewards:completion_length", weight=-0.5)))
    reward = build_reward(config, byte_tokenizer(), make_mesh(MeshConfig()), seed=0, prompts=PromptTable())
    scores, _ = reward(PROMPTS, COMPLETIONS)
    vowels = np.asarray([0.75, 0.0, 1.0])  # whitened by hand: mean 7/12, population std
    std = np.sqrt(np.mean((vowels - 7 / 12) ** 2))
    np.testing.assert_allclose(scores, 2.0 * (vowels - 7 / 12) / std - 0.5 * 4, rtol=1e-5)
    assert reward.components == pytest.approx({"vowels": 7 / 12, "length": 4.0})  # raw means, each objective
    with pytest.raises(ValueError, match="exactly one of model or function"):
        RewardSource("both", model="m", function="f:g")
    with pytest.raises(ValueError, match="max_length has no effect on a function source"):
        RewardSource("f", function="f:g", max_length=64)
    with pytest.raises(ValueError, match="not both"):
        RewardConfig(function="builtin:letters", sources=(RewardSource("a", function="builtin:letters"),))
    with pytest.raises(ValueError, match="names must differ"):
        RewardConfig(sources=(RewardSource("a", function="x:y"), RewardSource("a", function="x:z")))


def completion_length(prompt, completion):
    return float(len(completion))

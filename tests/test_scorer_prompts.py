"""A scorer reads each prompt as its own training rendered it: the data's text as written, or
its own chat template -- not the policy's rendering; the reward-model phase records which."""

import json

import pytest
from test_token_ids import END, char_tokenizer

from rlhf_jax.data import DataConfig
from rlhf_jax.rl.prompts import load_prompts
from rlhf_jax.rl.rewards import ModelReward, RewardError
from rlhf_jax.rl.scorer_prompts import PromptTable, read_prompt_format, write_prompt_format


def _policy_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hi there"}) + "\n")
    policy = char_tokenizer(adds_bos=True)  # renders prompts through its chat template
    prompts, _, _ = load_prompts(DataConfig(source=str(path), format="prompt", max_length=64), policy)
    return policy, prompts


@pytest.mark.parametrize("prompt_format", ["text", "chat_template", None])
def test_a_scorer_encodes_the_prompt_in_its_own_training_format(tmp_path, prompt_format):
    policy, prompts = _policy_prompts(tmp_path)
    assert prompts.texts == ["[BOS]<user>hi there<assistant>"]  # the policy's rendering
    scorer = char_tokenizer(adds_bos=False)
    reward = ModelReward(None, scorer, max_length=64, prompt_format=prompt_format, prompts=PromptTable.of(prompts))
    ids, mask = reward.encode(prompts.texts, ["ok"])
    completion = scorer("ok", add_special_tokens=False)["input_ids"] + [END]
    expected = {  # what the scorer's training encoder made of the same row
        "text": scorer("hi there", add_special_tokens=False)["input_ids"],
        "chat_template": scorer.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=True,
                                                    add_generation_prompt=True, return_dict=True)["input_ids"],
        None: scorer(prompts.texts[0], add_special_tokens=False)["input_ids"]}[prompt_format] + completion
    assert ids[0, : mask[0].sum()].tolist() == expected


def test_a_prompt_from_no_known_row_is_named(tmp_path):
    _, prompts = _policy_prompts(tmp_path)
    reward = ModelReward(None, char_tokenizer(adds_bos=False), max_length=64, prompt_format="text",
                         prompts=PromptTable.of(prompts), name="runs/rm/hf")
    with pytest.raises(RewardError, match="runs/rm/hf, sample 0: the prompt 'elsewhere' comes from no registered"):
        reward.encode(["elsewhere"], ["ok"])


def test_the_record_round_trips_and_a_bad_one_is_named(tmp_path):
    assert read_prompt_format(tmp_path) is None
    write_prompt_format(tmp_path, chat=True)
    assert read_prompt_format(tmp_path) == "chat_template"
    write_prompt_format(tmp_path, chat=False)
    assert read_prompt_format(tmp_path) == "text"
    (tmp_path / "prompt_format.json").write_text('{"prompt_format": "html"}')
    with pytest.raises(ValueError, match="prompt_format.json is not a prompt-format record"):
        read_prompt_format(tmp_path)

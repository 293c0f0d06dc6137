"""Formats with a prompt render through the tokenizer's chat template (data.chat_template:
auto): the prompt as chat turns with the generation prompt, the response as the assistant's
reply ending with EOS; HH dialogues become turns; preference and ranking rows may be
conversational; `never` keeps plain text."""

import json

import pytest
from test_token_ids import BOS, END, char_tokenizer

from rlhf_jax.data import DataConfig, DataError, load_data
from rlhf_jax.rl.prompts import load_prompts


def _write(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _expected(tokenizer, messages, response):
    prompt = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    return list(prompt["input_ids"]) + tokenizer(response, add_special_tokens=False)["input_ids"] + [END]


def _user(text):
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("fmt, row, messages, responses", [
    ("prompt_completion", {"prompt": "hi there", "completion": " hello"}, _user("hi there"), ["hello"]),
    ("alpaca", {"instruction": "say hi", "input": "to bob", "output": "hi bob"}, _user("say hi\n\nto bob"),
     ["hi bob"]),
    ("alpaca", {"instruction": "say hi", "input": "", "output": "hi"}, _user("say hi"), ["hi"]),
    ("preference", {"prompt": "pick", "chosen": "yes", "rejected": "no"}, _user("pick"), ["yes", "no"]),
    ("preference", {"prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "pick"}],
                    "chosen": [{"role": "assistant", "content": "yes"}], "rejected": "no"},
     [{"role": "system", "content": "be kind"}, {"role": "user", "content": "pick"}], ["yes", "no"]),
    ("hh_rlhf", {"chosen": "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: why\n\nAssistant: because",
                 "rejected": "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: why\n\nAssistant: no"},
     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}, {"role": "user", "content": "why"}],
     ["because", "no"]),
    ("ranking", {"prompt": "rank", "completions": ["a", "b", "c"]}, _user("rank"), ["a", "b", "c"]),
])
def test_each_format_renders_its_prompt_through_the_chat_template(tmp_path, fmt, row, messages, responses):
    tokenizer = char_tokenizer(adds_bos=True)
    config = DataConfig(source=_write(tmp_path, [row]), format=fmt, max_length=256)
    train, _, _ = load_data(config, tokenizer)
    item = train.items[0]
    sequences = {"prompt_completion": lambda: [item], "alpaca": lambda: [item],
                 "preference": lambda: [item.chosen, item.rejected], "hh_rlhf": lambda: [item.chosen, item.rejected],
                 "ranking": lambda: list(item.sequences)}[fmt]()
    for sequence, response in zip(sequences, responses, strict=True):
        expected = _expected(tokenizer, messages, response)
        assert sequence.ids.tolist() == expected
        assert sequence.ids.tolist().count(BOS) == 1  # the template's, none added again
        response_length = len(tokenizer(response, add_special_tokens=False)["input_ids"]) + 1
        assert sequence.loss_mask.tolist() == [False] * (len(expected) - response_length) + [True] * response_length


def test_never_keeps_plain_text_and_online_prompts_follow_the_setting(tmp_path):
    tokenizer = char_tokenizer(adds_bos=True)
    source = _write(tmp_path, [{"prompt": "hi there", "completion": "hello"}])
    plain, _, _ = load_data(DataConfig(source=source, format="prompt_completion", chat_template="never"), tokenizer)
    assert plain.items[0].ids.tolist() == tokenizer("hi there")["input_ids"] + tokenizer(
        "hello", add_special_tokens=False)["input_ids"] + [END]
    chat, _, _ = load_prompts(DataConfig(source=source, format="prompt_completion"), tokenizer)
    rendered = tokenizer.apply_chat_template(_user("hi there"), tokenize=False, add_generation_prompt=True)
    assert chat.texts == [rendered] and chat.ids[0].tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    never, _, _ = load_prompts(DataConfig(source=source, format="prompt_completion", chat_template="never"), tokenizer)
    assert never.texts == ["hi there"]


def test_a_conversational_row_without_a_template_is_named(tmp_path):
    row = {"prompt": [{"role": "user", "content": "pick"}], "chosen": "yes", "rejected": "no"}
    config = DataConfig(source=_write(tmp_path, [row]), format="preference", chat_template="never")
    with pytest.raises(DataError, match=r"rows.jsonl row 1: a conversational row .* needs a chat template"):
        load_data(config, char_tokenizer(adds_bos=True))

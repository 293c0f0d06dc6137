"""Reward-model inputs keep the completion whole and cut the prompt from the left, keeping its
leading special tokens; an encoder reward model (all-MiniLM-L6-v2, BERT) trains from the CLI
with its own tokenizer, no EOS, and its [CLS] ... [SEP] framing."""

import json

import numpy as np
import pytest
from test_models_bert import minilm_dir

from rlhf_jax.data import DataReport, Encoder, PromptCompletion, load_tokenizer
from rlhf_jax.data.formats import Preference


def test_an_encoder_tokenizer_needs_no_eos_and_frames_pairs_with_cls_and_sep():
    tokenizer = load_tokenizer(str(minilm_dir()), needs_eos=False)
    assert tokenizer.eos_token_id is None
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    encoder = Encoder(tokenizer, max_length=16, truncation="truncate", keep_responses=True)
    report = DataReport("x")
    long_prompt = "the quick brown fox jumps over the lazy dog " * 4
    pair = encoder.encode(Preference(long_prompt, "a good answer", "bad"), "row 1", report)
    for sequence, response in ((pair.chosen, "a good answer"), (pair.rejected, "bad")):
        ids = sequence.ids.tolist()
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        assert len(ids) <= 16 and ids[0] == cls and ids.count(cls) == 1  # [CLS] kept under truncation
        assert ids[-len(response_ids) - 1:] == response_ids + [sep]  # the whole response, closed by [SEP]
        assert ids[len(ids) - len(response_ids) - 2] == sep  # [CLS] prompt-end [SEP] response [SEP]
        assert sequence.loss_mask.sum() == len(response_ids) + 1
    assert report.prompts_truncated == 1 and report.responses_truncated == 0
    with pytest.raises(Exception, match="has no EOS token; responses need one to end on"):
        load_tokenizer(str(minilm_dir()))  # a policy's tokenizer must have one


def test_a_reward_input_keeps_the_completion_and_the_bos_of_a_long_prompt():
    from test_token_ids import BOS, END, char_tokenizer

    tokenizer = char_tokenizer(adds_bos=True)
    report = DataReport("x")
    cut = Encoder(tokenizer, max_length=12, keep_responses=True).encode(
        PromptCompletion("abcdefghijklmnop", "xyz"), "sample 0", report)
    assert cut.ids.tolist() == [BOS] + tokenizer("jklmnop", add_special_tokens=False)["input_ids"] + \
        tokenizer("xyz", add_special_tokens=False)["input_ids"] + [END]
    policy_rule = Encoder(tokenizer, max_length=12).encode(PromptCompletion("abcdefghijklmnop", "xyz"), "s", report)
    assert policy_rule.ids.tolist()[0] == BOS and len(policy_rule.ids) == 12  # policy data: the response is cut
    assert policy_rule.loss_mask.sum() == 1


def test_a_minilm_reward_model_trains_from_the_cli(tmp_path):
    from phase_runs import cli

    rows = [{"prompt": f"question {i} is about the weather today in the north of the country", "chosen": "a kind and helpful answer",
             "rejected": "go away"} for i in range(16)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = cli("rm", "configs/rm_tiny.yaml", "model.init=null", f"model.path={minilm_dir()}",
                 f"data.source={tmp_path / 'pairs.jsonl'}", "data.max_length=16", "data.eval_size=4", "train.steps=3",
                 "train.batch_size=4", "train.optimizer.warmup_steps=0", "checkpoint.export_hf=false",
                 "metrics.progress=false", f"output_dir={tmp_path / 'rm'}")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    data = next(r for r in rows if r["kind"] == "rm/data")
    assert data["prompts_truncated"] == 16  # every prompt cut to fit, every response whole
    assert data["responses_truncated"] == 0
    losses = [r["loss"] for r in rows if r["kind"] == "rm/train"]
    assert len(losses) == 3 and np.isfinite(losses).all()

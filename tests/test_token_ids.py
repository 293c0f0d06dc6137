"""Token ids have one source, the tokenizer in use: the score head skips the tokenizer's pad
id (config.json's only as a fallback), and text a chat template rendered -- BOS included --
gets no second BOS in online prompts or reward-model inputs."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rlhf_jax.data import DataConfig
from rlhf_jax.data.encode import Encoder
from rlhf_jax.data.dataset import read_split
from rlhf_jax.data.formats import Conversation
from rlhf_jax.data.report import DataReport
from rlhf_jax.phases.config import ModelConfig
from rlhf_jax.phases.setup import build_model
from rlhf_jax.rl.prompts import load_prompts
from rlhf_jax.rl.rewards import ModelReward

BOS, END, PAD = 1, 2, 3
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
            "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def char_tokenizer(adds_bos: bool):
    """Characters a-z, '<', '>' and ' '; [BOS] 1, [END] 2, [PAD] 3 (config.json of the tiny
    models says pad 0); with ``adds_bos`` it adds [BOS] in front of every encoding, as Llama's."""
    chars = "abcdefghijklmnopqrstuvwxyz<> "
    vocab = {"[UNK]": 0, "[BOS]": BOS, "[END]": END, "[PAD]": PAD} | {ch: 4 + i for i, ch in enumerate(chars)}
    core = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()  # characters joined back without spaces
    core.add_special_tokens(["[BOS]", "[END]", "[PAD]"])
    if adds_bos:
        core.post_processor = processors.TemplateProcessing(single="[BOS] $A", pair="[BOS] $A $B",
                                                            special_tokens=[("[BOS]", BOS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="[BOS]", eos_token="[END]",
                                        pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_scores_are_read_at_the_last_real_token_when_the_tokenizer_pads_with_another_id(tmp_path):
    from hf_tiny import save_tiny, torch, transformers

    reference = save_tiny(tmp_path, "llama", auto=transformers.AutoModelForSequenceClassification, num_labels=1)
    assert reference.config.pad_token_id == 0
    tokenizer = char_tokenizer(adds_bos=False)
    assert tokenizer.pad_token_id == PAD != reference.config.pad_token_id
    model = build_model(ModelConfig(path=str(tmp_path)), "score", tokenizer=tokenizer, seed=0)
    prompts, completions = ["ab", "abcdefg", "h"], ["cd", "e", "fghijkl"]
    reward = ModelReward(model, tokenizer, max_length=32)
    ids, mask = reward.encode(prompts, completions)
    assert (ids[~mask.astype(bool)] == PAD).all() and (mask.sum(1) < ids.shape[1]).all()  # every row padded
    scores, _ = reward(prompts, completions)
    for row, (ids_T, mask_T) in enumerate(zip(ids, mask)):
        alone = ids_T[mask_T.astype(bool)][None]  # the sequence alone, as transformers would score it
        with torch.no_grad():
            expected = reference(torch.as_tensor(alone)).logits[0, 0].item()
        np.testing.assert_allclose(scores[row], expected, atol=1e-4)


def test_a_template_that_writes_bos_gives_one_bos_in_online_prompts_and_reward_inputs(tmp_path):
    tokenizer = char_tokenizer(adds_bos=True)
    assert tokenizer("ab")["input_ids"][0] == BOS  # the tokenizer adds one of its own
    conversation = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": conversation}) + "\n")
    prompts, _, _ = load_prompts(DataConfig(source=str(path), format="messages", max_length=64), tokenizer)
    rendered = tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    assert prompts.texts[0] == rendered and rendered.startswith("[BOS]")
    ids = prompts.ids[0].tolist()
    assert ids[0] == BOS and ids.count(BOS) == 1
    # the SFT row of the same conversation starts the same way
    sft_row = Encoder(tokenizer, max_length=64).encode(Conversation(tuple(conversation)), "row 1", DataReport("x"))
    assert sft_row.ids.tolist()[: len(ids)] == ids
    # the reward model (the same tokenizer) sees one BOS in front of prompt + completion
    reward_ids, reward_mask = ModelReward(None, tokenizer, max_length=64).encode(prompts.texts, ["hello"])
    real = reward_ids[0][reward_mask[0].astype(bool)].tolist()
    assert real[0] == BOS and real.count(BOS) == 1 and real[-1] == END
    # plain (untemplated) text still gets the tokenizer's BOS
    plain, _, _ = load_prompts(DataConfig(source=str(_prompt_file(tmp_path)), format="prompt", max_length=64), tokenizer)
    assert plain.ids[0].tolist()[0] == BOS and plain.ids[0].tolist().count(BOS) == 1


def _prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "say hi"}) + "\n")
    return path


def test_a_vocabulary_that_does_not_fit_the_model_is_an_error():
    from rlhf_jax.config import ConfigError

    init = {"model_type": "llama", "vocab_size": 8, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5}
    with pytest.raises(ConfigError, match=r"the model \(model.init\) has a vocabulary of 8 tokens but its tokenizer .* has 33"):
        build_model(ModelConfig(init=init), "lm", tokenizer=char_tokenizer(adds_bos=False), seed=0)


def test_retokenize_gives_one_bos_to_a_templated_prompt():
    from rlhf_jax.rollout import retokenize

    tokenizer = char_tokenizer(adds_bos=True)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    batch = retokenize(tokenizer, [rendered, "plain"], ["yo", "yo"], max_length=32)
    for ids_T, mask_T in zip(batch["input_ids"], batch["attention_mask"]):
        real = ids_T[mask_T.astype(bool)].tolist()
        assert real[0] == BOS and real.count(BOS) == 1


@pytest.mark.parametrize("chat", [False, True])
def test_an_over_long_online_prompt_is_cut_as_the_offline_encoder_cuts_it(tmp_path, chat):
    """BOS stays in front and the last tokens are kept, as for an SFT/DPO row; the prompt's
    text encodes back to the very ids the sampler saw (what a DPO round or a reward model
    sharing the tokenizer reads)."""
    from rlhf_jax.data.tokenizer import encode_prompt

    tokenizer = char_tokenizer(adds_bos=True)
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "abcdefghijklmnopqrstuvwxyz", "completion": "ok"}, {"prompt": "short", "completion": "ok"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cap = 24 if chat else 8  # "[BOS]<user>short<assistant>" is 23 tokens
    config = DataConfig(source=str(path), format="prompt_completion", max_length=64, max_prompt_length=cap,
                        chat_template="auto" if chat else "never")
    prompts, _, reports = load_prompts(config, tokenizer)
    assert reports[0].prompts_truncated == 1
    encoder = Encoder(tokenizer, max_length=64, max_prompt_length=cap, chat_template=chat)
    examples, _, _ = read_split(config)
    for (where, example), ids in zip(examples, prompts.ids):
        offline = encoder.encode(example, where, DataReport("x"))
        assert ids.tolist() == offline.ids[: len(ids)].tolist() and offline.loss_mask[len(ids)] == 1
    cut = prompts.ids[0].tolist()
    assert len(cut) == cap and cut[0] == BOS and cut.count(BOS) == 1
    assert tokenizer.decode(cut[-3:]) == ("<assistant>"[-3:] if chat else "xyz")
    for text, ids in zip(prompts.texts, prompts.ids):
        assert encode_prompt(tokenizer, text, templated=chat) == ids.tolist()

"""Text helpers: decoding completions by their mask, and re-tokenizing for a reward model
with another tokenizer (the real all-MiniLM-L6-v2 BERT tokenizer)."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_models_bert import minilm_dir
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf_jax.rollout import Rollout, decode_completions, retokenize


def word_tokenizer():
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "the", "cat", "sat", "mat", "on"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def test_decode_completions_reads_only_masked_in_tokens():
    tok = word_tokenizer()
    completions = np.array([[3, 4, 1, 0], [2, 5, 5, 5]])  # "cat sat <eos>" | cut at max_new_tokens
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    r = Rollout(prompt_ids_BP=jnp.zeros((2, 1)), prompt_mask_BP=jnp.ones((2, 1)), completion_ids_BN=completions,
                completion_mask_BN=mask, logprobs_BN=jnp.zeros((2, 4)), stopped_B=jnp.array([True, False]))
    assert decode_completions(tok, r) == ["cat sat", "the mat mat mat"]
    assert decode_completions(tok, r, skip_special_tokens=False) == ["cat sat <eos>", "the mat mat mat"]


def test_retokenize_keeps_the_completion_and_counts_truncations():
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    prompts = ["short prompt", "a much longer prompt that will not fit in the window at all"]
    completions = ["good answer", "fine answer"]
    batch = retokenize(tok, prompts, completions, max_length=12)
    assert batch["input_ids"].shape == (2, 12) and batch["truncated"] == 1
    assert tok.decode(batch["input_ids"][0], skip_special_tokens=True) == "short prompt good answer"
    kept = tok.decode(batch["input_ids"][1], skip_special_tokens=True)
    assert kept.endswith("at all fine answer") and not kept.startswith("a much")  # the prompt's end stays
    assert batch["attention_mask"][0].sum() == len(tok("short prompt", "good answer")["input_ids"])
    with pytest.raises(ValueError, match="completion 0 alone fills max_length=4"):
        retokenize(tok, ["x"], ["a rather long completion"], max_length=4)
    tok.pad_token = None
    with pytest.raises(ValueError, match="has no pad token"):
        retokenize(tok, ["x"], ["y"], max_length=8)

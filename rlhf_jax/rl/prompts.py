"""Prompts for online RL: read with the data layer (any format that has a prompt -- ``prompt``,
``prompt_completion``, ``preference``, ``alpaca``, ``messages`` ... -- so an SFT or preference
file serves as a prompt set), tokenized once, over-long prompts cut as the offline encoder cuts
them (``data.encode.cut_prompt``: the leading special tokens, then the last tokens, to
``max_prompt_length``) and counted, batched left-padded for the sampler."""

from __future__ import annotations

import dataclasses

import numpy as np

from rlhf_jax.data import DataConfig, DataError, DataReport
from rlhf_jax.data.dataset import read_split
from rlhf_jax.data.encode import cut_prompt
from rlhf_jax.data.formats import Conversation
from rlhf_jax.data.tokenizer import encode_prompt, renders_prompts


@dataclasses.dataclass(frozen=True)
class Prompts:
    ids: list[np.ndarray]  # token ids of each prompt, as the policy sees it
    texts: list[str]  # the same prompts as text (after truncation), for reward functions and models
    examples: list  # the data rows they came from (a scorer renders them its own way: rl.scorer_prompts)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids_BP, mask_BP)`` of the prompts ``indices``, left-padded to the longest."""
        width = max(len(self.ids[i]) for i in indices)
        ids = np.full((len(indices), width), pad_id, np.int32)
        mask = np.zeros((len(indices), width), np.int32)
        for row, i in enumerate(indices):
            ids[row, width - len(self.ids[i]):], mask[row, width - len(self.ids[i]):] = self.ids[i], 1
        return ids, mask


def prompt_text(example, tokenizer, *, chat: bool) -> tuple[str, bool]:
    """``(text, templated)``: the prompt of an example of any format -- for a conversation the
    turns before its last assistant turn, and with ``chat`` (a tokenizer with a template,
    ``data.chat_template: auto``) any example's chat turns, rendered with the chat template
    and its generation prompt (``templated``: the template wrote the special tokens it
    wants); else its ``prompt`` field. Raises ``DataError`` for a conversational row
    without a template."""
    if isinstance(example, Conversation):
        messages = list(example.messages)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True), True
    if not hasattr(example, "prompt"):
        raise DataError(f"{type(example).__name__} examples have no prompt")
    if chat and example.messages is not None:
        return tokenizer.apply_chat_template(list(example.messages), tokenize=False, add_generation_prompt=True), True
    if example.prompt is None:
        raise DataError("a conversational row (the prompt as messages) needs a chat template; the tokenizer has none "
                        "or data.chat_template is never")
    return example.prompt, False


def _text_of(ids: list[int], tokenizer, *, templated: bool) -> str:
    """The text of a cut prompt that encodes back to ``ids`` (``encode_prompt`` with the same
    ``templated``), wherever it is handed on -- a reward model, a DPO round's pairs: special
    tokens the template wrote stay in the text; the BOS the tokenizer adds to plain text is
    left for it to add again."""
    if not templated and ids and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    return tokenizer.decode(ids, skip_special_tokens=False)


def _tokenize(examples, tokenizer, max_prompt_length: int, report: DataReport, chat: bool) -> Prompts:
    ids, texts, kept, special_ids = [], [], [], set(tokenizer.all_special_ids)
    for where, example in examples:
        text, templated = prompt_text(example, tokenizer, chat=chat)
        tokens = np.asarray(encode_prompt(tokenizer, text, templated=templated), np.int32)
        if len(tokens) == 0:
            report.skip(f"{where}: the prompt encodes to no tokens")
            continue
        if len(tokens) > max_prompt_length:
            tokens = np.asarray(cut_prompt(tokens.tolist(), max_prompt_length, special_ids), np.int32)
            report.prompts_truncated += 1
            text = _text_of(tokens.tolist(), tokenizer, templated=templated)
        ids.append(tokens)
        texts.append(text)
        kept.append(example)
        report.kept += 1
    if not ids:
        raise DataError(f"{report.source}: no usable prompts ({report.summary()})")
    return Prompts(ids, texts, kept)


def load_prompts(config: DataConfig, tokenizer) -> tuple[Prompts, Prompts | None, list[DataReport]]:
    """``(train prompts, held-out prompts or None, reports)``: ``max_prompt_length`` (default
    ``max_length``) caps a prompt, keeping its end; ``eval_size`` / ``eval_source`` as in
    :func:`rlhf_jax.data.load_data` (the same fixed held-out choice)."""
    cap = config.max_prompt_length or config.max_length
    chat = renders_prompts(tokenizer, config.chat_template)
    examples, held, reports = read_split(config)
    train = _tokenize(examples, tokenizer, cap, reports[0], chat)
    return train, None if held is None else _tokenize(held, tokenizer, cap, reports[1], chat), reports

"""Text-level helpers around the sampler: decode completions, and re-tokenize prompt +
completion for a reward model whose tokenizer differs from the policy's."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlhf_jax.hosts import to_host
from rlhf_jax.rollout.engine import Rollout


def decode_completions(tokenizer, rollout: Rollout, *, skip_special_tokens: bool = True) -> list[str]:
    """The completion text of each row: its masked-in tokens only (the stop token is dropped
    with ``skip_special_tokens`` when the tokenizer marks it special)."""
    ids, mask = to_host((rollout.completion_ids_BN, rollout.completion_mask_BN))
    mask = np.asarray(mask).astype(bool)
    return [tokenizer.decode(row[keep].tolist(), skip_special_tokens=skip_special_tokens) for row, keep in zip(ids, mask)]


def row_token_ids(rollout: Rollout) -> tuple[list[list[int]], list[list[int]]]:
    """``(prompt ids, completion ids)`` of each row as sampled: the masked-in tokens, padding
    left out, a completion's stop token kept when it stopped."""
    prompt_ids, prompt_mask, ids, mask = to_host((rollout.prompt_ids_BP, rollout.prompt_mask_BP,
                                                 rollout.completion_ids_BN, rollout.completion_mask_BN))
    prompts = [row[np.asarray(keep).astype(bool)].tolist() for row, keep in zip(prompt_ids, prompt_mask)]
    completions = [row[np.asarray(keep).astype(bool)].tolist() for row, keep in zip(ids, mask)]
    return prompts, completions


def _without_leading_bos(tokenizer, text: str) -> str:
    """``text`` without a leading BOS (a chat template wrote it) when ``tokenizer`` adds its own."""
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    return text[len(bos):] if adds_bos and text.startswith(bos) else text


def retokenize(tokenizer, prompts: Sequence[str], completions: Sequence[str], max_length: int) -> dict:
    """Right-padded ``input_ids`` / ``attention_mask`` ``[B, max_length]`` of prompt +
    completion pairs under ``tokenizer`` (e.g. a reward model's). Over-length pairs keep the
    end of the prompt and the whole completion (``truncation="only_first"``, left side):
    ``truncated`` counts them, nothing is dropped silently. A prompt that starts with the BOS
    text (rendered by a chat template) loses it when the tokenizer adds its own, so a row
    never begins with two. A pair whose completion alone is too long raises."""
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no pad token; set tokenizer.pad_token "
                         "(e.g. to its eos_token) before re-tokenizing")
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    for row, completion in enumerate(completions):
        if len(tokenizer(completion, add_special_tokens=False)["input_ids"]) >= room:
            raise ValueError(f"completion {row} alone fills max_length={max_length} under {type(tokenizer).__name__}; "
                             "raise max_length (no room would be left for the prompt)")
    prompts = [_without_leading_bos(tokenizer, p) for p in prompts]
    full = tokenizer(list(prompts), list(completions))["input_ids"]
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        batch = tokenizer(list(prompts), list(completions), max_length=max_length, truncation="only_first",
                          padding="max_length", return_tensors="np")
    finally:
        tokenizer.truncation_side = side
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "truncated": sum(len(f) > max_length for f in full)}

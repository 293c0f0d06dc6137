"""Completions for a few prompts at the end of a phase, greedy, written as JSON lines -- a
look at what the model now does."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from rlhf_jax.data import Encoded, PackedRows, TokenizedData
from rlhf_jax.data.encode import prompt_length
from rlhf_jax.data.loader import sequences_of
from rlhf_jax.rollout import GenerationConfig, SamplingConfig, decode_completions, generate


def prompts_of(data: TokenizedData, count: int) -> list[np.ndarray]:
    """The prompt tokens (those before the first trained token) of the first ``count`` examples."""
    if isinstance(data.items, PackedRows):
        rows = zip(data.items.input_ids, data.items.loss_mask & (data.items.segment_ids == 1))
        sequences = [Encoded(ids, mask) for ids, mask in rows]
    else:
        sequences = [sequences_of(item)[0] for item in data.items]
    prompts = []
    for seq in sequences[:count]:
        first = prompt_length(seq)
        if first > 0:
            prompts.append(np.asarray(seq.ids[:first]))
    return prompts


def write_samples(model, tokenizer, data: TokenizedData, path: Path, *, count: int, max_new_tokens: int,
                  seed: int, stop_ids: tuple[int, ...]) -> None:
    """Greedy completions (at most ``max_new_tokens``, ending at any of ``stop_ids``) of the
    first ``count`` prompts of ``data``, written to ``path`` as JSON lines."""
    prompts = prompts_of(data, count)
    if not prompts or count == 0:
        return
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):  # left padding
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    room = model.config.context_length - width if model.config.context_length else max_new_tokens
    config = GenerationConfig(max_new_tokens=max(1, min(max_new_tokens, room)), stop_token_ids=stop_ids,
                              pad_token_id=tokenizer.pad_token_id, sampling=SamplingConfig(temperature=0.0))
    rollout = generate(model, ids, mask, jax.random.key(seed), config)
    with open(path, "w") as f:
        for prompt, completion in zip(prompts, decode_completions(tokenizer, rollout)):
            f.write(json.dumps({"prompt": tokenizer.decode(prompt.tolist()), "completion": completion}) + "\n")

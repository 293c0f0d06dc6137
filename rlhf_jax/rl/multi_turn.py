"""Multi-turn rollouts with a text environment (``rl.environments``): tool use.

An episode of a prompt: the policy writes a turn, sampled until its stop token or a token
whose text contains the environment's ``call_end``; the environment reads the turn and
returns a reply, which is appended to the sequence, and the policy writes the next turn on
top of everything so far -- until the environment ends the episode (a turn without a tool
call), a turn is cut at ``max_new_tokens``, or ``max_turns`` turns are written (a call in the
last turn gets no reply).

The episode becomes one rollout row: prompt | turn 1, reply 1, turn 2, ... The replies are
attended to like any context but are not the policy's actions: ``action_mask_BN`` is 0 on
them and their log-probs are 0, so they carry no loss, no KL and no advantage. The reward
reads the last turn (the final answer); the transcript (turns and replies) is kept for the
samples. Each turn is one call of the compiled sampler; later turns re-read the episode so
far from the prompt (no KV cache across turns)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from rlhf_jax.hosts import to_host
from rlhf_jax.rl.environments import Environment
from rlhf_jax.rl.rewards import RewardError
from rlhf_jax.rollout import GenerationConfig, Rollout, bucket_length, generate


@dataclasses.dataclass(frozen=True)
class Episodes:
    """Multi-turn rollouts as one host-side :class:`Rollout` ``[B, ...]`` (replies masked out
    of ``action_mask_BN``), each row's last turn (what a reward reads), its transcript
    (turns and replies), and the counts ``turns_B`` and ``tool_calls_B``."""

    rollout: Rollout
    final_turns: list[str]
    transcripts: list[str]
    turns_B: np.ndarray
    tool_calls_B: np.ndarray


def token_ids_containing(tokenizer, text: str, what: str = "the tool call's end") -> tuple[int, ...]:
    """The ids of every vocabulary token whose text contains ``text`` (a scan of the
    vocabulary): the tokens that end a tool call (the sampler stops on any of them), or a
    reasoning step. Raises ``ValueError`` naming ``what`` when there is none."""
    ids = tuple(i for i in range(len(tokenizer)) if text in tokenizer.decode([i]))
    if not ids:
        raise ValueError(f"no token of the tokenizer contains {what} {text!r}")
    return ids


def _left_padded(sequences: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, sequences))
    ids = np.full((len(sequences), width), pad_id, np.int32)
    mask = np.zeros((len(sequences), width), np.int32)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence):], mask[row, width - len(sequence):] = sequence, 1
    return ids, mask


def multi_turn_rollout(model, prompt_ids_BP, prompt_mask_BP, key: jax.Array, config: GenerationConfig, tokenizer,
                       environment: Environment, prompt_texts: Sequence[str], *, max_turns: int,
                       buckets: Sequence[int], place: Callable = lambda a: a,
                       call_end_ids: tuple[int, ...] | None = None) -> Episodes:
    """Episodes of ``config.num_samples`` samples of each prompt (module docstring).
    ``prompt_texts`` are the prompts' texts (one per prompt row), what ``environment.reset``
    reads; ``config.max_new_tokens`` bounds each turn; the completion width is the smallest of
    ``buckets`` that holds the longest episode; ``place`` puts a turn's host batch where the
    sampler should read it (e.g. split over a mesh); ``call_end_ids``: the tokens that end a
    tool call (:func:`token_ids_containing`, a scan of the vocabulary: pass it when sampling
    repeatedly). Raises ``ValueError`` for ``max_turns < 1``."""
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    final_stops = set(config.stop_token_ids)
    if call_end_ids is None:
        call_end_ids = token_ids_containing(tokenizer, environment.call_end)
    turn_config = dataclasses.replace(config, stop_token_ids=tuple(config.stop_token_ids) + tuple(call_end_ids))
    first = to_host(generate(model, prompt_ids_BP, prompt_mask_BP, jax.random.fold_in(key, 0), turn_config))
    rows, n = len(first.stopped_B), config.num_samples
    prompts = [ids[mask.astype(bool)] for ids, mask in zip(first.prompt_ids_BP, first.prompt_mask_BP)]
    states = [environment.reset(prompt_texts[row // n]) for row in range(rows)]
    tokens = [[] for _ in range(rows)]  # per row: (token ids, log-probs, is the policy's) pieces
    final, transcripts = [""] * rows, [""] * rows
    turns, calls, stopped = np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.zeros(rows, bool)
    active = np.ones(rows, bool)
    turn = first
    for t in range(max_turns):
        if t > 0:  # every row re-reads its episode so far; finished rows' samples are dropped
            ids, mask = _left_padded([np.concatenate([prompts[r], *(p[0] for p in tokens[r])]) for r in range(rows)],
                                     config.pad_token_id)
            turn = to_host(generate(model, place(ids), place(mask), jax.random.fold_in(key, t),
                                    dataclasses.replace(turn_config, num_samples=1)))
        for r in np.flatnonzero(active):
            keep = turn.completion_mask_BN[r].astype(bool)
            ids_r = turn.completion_ids_BN[r][keep]
            tokens[r].append((ids_r, turn.logprobs_BN[r][keep], 1))
            turns[r] += 1
            text = tokenizer.decode(ids_r.tolist(), skip_special_tokens=True)
            final[r], transcripts[r] = text, transcripts[r] + text
            ended = bool(turn.stopped_B[r])
            reply = None
            if ended and int(ids_r[-1]) not in final_stops:
                try:
                    states[r], reply = environment.step(states[r], text)
                except Exception as error:  # a user's environment may raise anything
                    raise RewardError(f"environment {environment.name} raised {type(error).__name__}: {error} on turn "
                                      f"{t + 1} {text!r} of row {r}; fix the environment") from error
            if reply is None or t == max_turns - 1:  # a final answer, a cut turn, or the turn limit
                active[r], stopped[r] = False, ended and reply is None
                continue
            calls[r] += 1
            reply_ids = np.asarray(tokenizer.encode(reply, add_special_tokens=False), np.int32)
            tokens[r].append((reply_ids, np.zeros(len(reply_ids), np.float32), 0))
            transcripts[r] += reply
        if not active.any():
            break
    width = bucket_length(max(sum(len(p[0]) for p in pieces) for pieces in tokens), buckets, "episode length")
    completion = np.full((rows, width), config.pad_token_id, np.int32)
    completion_mask, action_mask = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
    logprobs = np.zeros((rows, width), np.float32)
    for r, pieces in enumerate(tokens):
        ids_r = np.concatenate([p[0] for p in pieces])
        completion[r, :len(ids_r)], completion_mask[r, :len(ids_r)] = ids_r, 1
        action_mask[r, :len(ids_r)] = np.concatenate([np.full(len(p[0]), p[2], np.int32) for p in pieces])
        logprobs[r, :len(ids_r)] = np.concatenate([p[1] for p in pieces])
    rollout = Rollout(first.prompt_ids_BP, first.prompt_mask_BP, completion, completion_mask, logprobs, stopped,
                      action_mask)
    return Episodes(rollout, final, transcripts, turns, calls)

"""Examples -> token ids with a loss mask, under a stated truncation policy.

A sequence is ``prompt + response`` (the response ends with EOS, unless it already does or
``append_eos`` is off); ``loss_mask`` marks the response tokens. Chat conversations are
rendered with the tokenizer's chat template and the mask marks every assistant turn. With
``chat_template`` on and a tokenizer that has a template, a prompt is rendered as its chat
turns with the generation prompt (``apply_chat_template``, no special tokens added again) and
its response, leading whitespace stripped, follows as the assistant's reply, ending with EOS.

Truncation (``max_length``, ``max_prompt_length``), counted in the :class:`DataReport`:

- ``truncate``: a prompt longer than ``max_prompt_length`` keeps its *last* tokens (the
  part nearest the response) after its leading special tokens (BOS, BERT's [CLS]), which
  always stay; then a response that does not fit keeps its *first*
  ``max_length - len(prompt)`` tokens. With ``keep_responses`` (reward-model inputs) the
  prompt gives way first: it is cut from the left until the longest response fits whole,
  and only a response longer than ``max_length`` minus the leading special tokens and one
  prompt token is cut. A conversation keeps its first ``max_length`` tokens. An example left
  with no response token is dropped (counted).

A response ends with the tokenizer's EOS -- or, for an encoder tokenizer without one (BERT),
its [SEP], which closes the ``[CLS] prompt [SEP] response [SEP]`` framing.
- ``drop``: an example over either limit is dropped (counted).
- ``error``: an example over either limit is an error naming its row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from rlhf_jax.data import formats
from rlhf_jax.data.report import DataError, DataReport
from rlhf_jax.data.tokenizer import encode_prompt, vocabulary_digest

TRUNCATION = ("truncate", "drop", "error")


def leading_specials(ids: Sequence[int], special_ids: set[int]) -> int:
    """How many special tokens (BOS, BERT's [CLS], a template's start token) open ``ids``."""
    return next((i for i, t in enumerate(ids) if t not in special_ids), len(ids))


def cut_prompt(ids: Sequence[int], cap: int, special_ids: set[int]) -> list[int]:
    """A prompt of at most ``cap`` tokens (fewer only when its leading special tokens alone
    exceed ``cap``): its leading special tokens, which always stay, then its *last* tokens --
    the part nearest the response. The one prompt truncation of the library: offline rows
    (:class:`Encoder`) and online prompts (``rl.prompts``) are cut alike."""
    ids = list(ids)
    if len(ids) <= cap:
        return ids
    lead = leading_specials(ids, special_ids)
    keep = max(0, cap - lead)
    return ids[:lead] + (ids[len(ids) - keep:] if keep else [])


class Encoded(NamedTuple):
    ids: np.ndarray  # [L] int32
    loss_mask: np.ndarray  # [L] bool: the tokens a policy learns (responses, assistant turns)


def prompt_length(seq: Encoded) -> int:
    """The tokens of ``seq`` before its first trained (loss-mask) token: the prompt of a
    prompt + response sequence (the whole sequence when nothing is trained)."""
    return int(np.argmax(seq.loss_mask)) if seq.loss_mask.any() else len(seq.ids)


class EncodedPair(NamedTuple):
    chosen: Encoded
    rejected: Encoded
    margin: float | None


class EncodedRanking(NamedTuple):
    sequences: tuple[Encoded, ...]  # best first


class EncodedUnpaired(NamedTuple):
    sequence: Encoded
    desirable: bool


class EncodedSteps(NamedTuple):
    sequence: Encoded
    step_ends: np.ndarray  # [S] int32: each step's last token (its newline; the last step's EOS)
    labels: np.ndarray  # [S] float32


def _sequence(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> Encoded:
    ids = np.asarray([*prompt_ids, *response_ids], np.int32)
    return Encoded(ids, np.arange(len(ids)) >= len(prompt_ids))


class Encoder:
    """Turns typed examples into :class:`Encoded` sequences; ``None`` when dropped."""

    def __init__(self, tokenizer, *, max_length: int, max_prompt_length: int | None = None,
                 truncation: str = "truncate", append_eos: bool = True, chat_template: bool = False,
                 keep_responses: bool = False):
        """``chat_template``: render prompts through the tokenizer's template (it must have one;
        see ``data.tokenizer.renders_prompts``); ``keep_responses``: the truncation rule of
        reward-model inputs (module docstring)."""
        if truncation not in TRUNCATION:
            raise DataError(f"truncation={truncation!r}; choose one of {', '.join(TRUNCATION)}")
        if max_prompt_length is not None and max_prompt_length >= max_length:
            raise DataError(f"max_prompt_length={max_prompt_length} leaves no room for a response "
                            f"within max_length={max_length}")
        self.tokenizer, self.max_length, self.max_prompt_length = tokenizer, max_length, max_prompt_length
        self.truncation, self.append_eos = truncation, append_eos
        self.chat, self.keep_responses = chat_template, keep_responses
        self.end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.special_ids = set(tokenizer.all_special_ids)
        self._digest: str | None = None  # the tokenizer's vocabulary digest, once a row with token ids needs it

    def policy(self) -> str:
        """The truncation policy in words, for the run's log."""
        prompt = f"prompts over {self.max_prompt_length} tokens " if self.max_prompt_length else ""
        return {
            "truncate": f"truncate: {prompt or 'prompts '}keep their last tokens, responses keep their first tokens "
                        f"to fit max_length={self.max_length}; examples left without a response token are dropped",
            "drop": f"drop: examples over max_length={self.max_length}"
                    + (f" or with prompts over {self.max_prompt_length} tokens" if prompt else "") + " are dropped",
            "error": f"error: an example over max_length={self.max_length} stops the run",
        }[self.truncation]

    # -- tokenisation ---------------------------------------------------------------------
    def _prompt_ids(self, example, where: str) -> list[int]:
        if self.chat and example.messages is not None:
            return list(self.tokenizer.apply_chat_template(list(example.messages), tokenize=True,
                                                           add_generation_prompt=True, return_dict=True)["input_ids"])
        if example.prompt is None:
            raise DataError(f"{where}: a conversational row (the prompt as messages) needs a chat template; the "
                            "tokenizer has none or data.chat_template is never")
        return encode_prompt(self.tokenizer, example.prompt) if example.prompt else []

    def _sampled_ids(self, ids: formats.TokenIds, where: str) -> tuple[list[int], list[list[int]]]:
        """``(prompt, [chosen, rejected])`` as the sampler held them -- no re-tokenization, no
        EOS added to a completion that did not stop. Raises ``DataError`` when they belong to
        another tokenizer."""
        if self._digest is None:
            self._digest = vocabulary_digest(self.tokenizer)
        if ids.tokenizer != self._digest:
            raise DataError(f"{where}: its token_ids were written under another tokenizer (vocabulary {ids.tokenizer}, "
                            f"this one's {self._digest}); remove the token_ids fields to re-tokenize the text")
        return list(ids.prompt), [list(ids.chosen), list(ids.rejected)]

    def _response_ids(self, text: str) -> list[int]:
        text = text.lstrip() if self.chat else text
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        end = self.end_id
        return ids + [end] if self.append_eos and end is not None and (not ids or ids[-1] != end) else ids

    def _chat_ids(self, messages) -> list[int]:
        return [] if not messages else list(self.tokenizer.apply_chat_template(
            list(messages), tokenize=True, add_generation_prompt=False, return_dict=True)["input_ids"])

    # -- truncation -----------------------------------------------------------------------
    def _over(self, where: str, what: str, report: DataReport) -> None:
        if self.truncation == "error":
            raise DataError(f"{where}: {what}. Raise max_length / max_prompt_length, or set "
                            "data.truncation to truncate or drop (both counted)")
        report.dropped_overlength += 1

    def _fit(self, prompt: list[int], responses: list[list[int]], where: str, report: DataReport):
        longest = max(len(r) for r in responses)
        prompt_cap = self.max_prompt_length if self.max_prompt_length is not None else len(prompt)
        if len(prompt) <= prompt_cap and len(prompt) + longest <= self.max_length:
            return prompt, responses
        if self.truncation != "truncate":
            return self._over(where, f"{len(prompt)} prompt + {longest} response tokens exceed the limits "
                                     f"(max_prompt_length={self.max_prompt_length}, max_length={self.max_length})", report)
        lead = leading_specials(prompt, self.special_ids)
        room = self.max_length - 1 - lead  # the most prompt content a response of one token leaves
        if self.keep_responses:
            room = min(room, max(self.max_length - longest - lead, 1))
        kept_prompt = cut_prompt(prompt, lead + max(0, min(prompt_cap - lead, room)), self.special_ids)
        budget = self.max_length - len(kept_prompt)
        report.prompts_truncated += len(kept_prompt) < len(prompt)
        report.responses_truncated += longest > budget
        return kept_prompt, [r[:budget] for r in responses]

    # -- examples -------------------------------------------------------------------------
    def encode(self, example, where: str, report: DataReport):
        if isinstance(example, formats.Conversation):
            return self._conversation(example, where, report)
        if isinstance(example, formats.PromptCompletion | formats.Unpaired):
            fitted = self._fit(self._prompt_ids(example, where), [self._response_ids(example.completion)], where, report)
            if fitted is None:
                return None
            sequence = _sequence(fitted[0], fitted[1][0])
            return sequence if isinstance(example, formats.PromptCompletion) else EncodedUnpaired(sequence, example.desirable)
        if isinstance(example, formats.Steps):
            return self._steps(example, where, report)
        if isinstance(example, formats.Preference) and example.token_ids is not None:
            fitted = self._fit(*self._sampled_ids(example.token_ids, where), where, report)
            return None if fitted is None else EncodedPair(_sequence(fitted[0], fitted[1][0]),
                                                           _sequence(fitted[0], fitted[1][1]), example.margin)
        if isinstance(example, formats.Preference | formats.Ranking):
            texts = [example.chosen, example.rejected] if isinstance(example, formats.Preference) else example.completions
            fitted = self._fit(self._prompt_ids(example, where), [self._response_ids(t) for t in texts], where, report)
            if fitted is None:
                return None
            sequences = [_sequence(fitted[0], r) for r in fitted[1]]
            if isinstance(example, formats.Ranking):
                return EncodedRanking(tuple(sequences))
            return EncodedPair(sequences[0], sequences[1], example.margin)
        raise TypeError(f"cannot encode {type(example).__name__}")

    def _steps(self, example: formats.Steps, where: str, report: DataReport):
        """The solution's lines, each step tokenised with its newline (the last with EOS); a
        step's end is its last token. Steps cut off by truncation are left out; an example
        left with none is dropped (counted)."""
        pieces = [f"{step}\n" for step in example.steps[:-1]] + [example.steps[-1]]
        pieces[0] = pieces[0].lstrip() if self.chat else pieces[0]
        ids = [list(self.tokenizer(piece, add_special_tokens=False)["input_ids"]) for piece in pieces]
        if self.append_eos and self.end_id is not None:
            ids[-1].append(self.end_id)
        ends = np.cumsum([len(piece) for piece in ids]) - 1
        fitted = self._fit(self._prompt_ids(example, where), [[t for piece in ids for t in piece]], where, report)
        if fitted is None:
            return None
        kept = ends < len(fitted[1][0])
        if not kept.any():
            report.dropped_overlength += 1
            return None
        prompt = len(fitted[0])
        return EncodedSteps(_sequence(fitted[0], fitted[1][0]), (prompt + ends[kept]).astype(np.int32),
                            np.asarray(example.labels, np.float32)[kept])

    def _conversation(self, example: formats.Conversation, where: str, report: DataReport):
        """Render once, then mark each assistant turn as the tokens between the rendering
        of the turns before it (with the generation prompt) and the rendering through it."""
        messages = example.messages
        ids = self._chat_ids(messages)
        loss_mask = np.zeros(len(ids), bool)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = list(self.tokenizer.apply_chat_template(
                list(messages[:i]), tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]) if i else []
            through = self._chat_ids(messages[: i + 1])
            if through[: len(before)] != before or ids[: len(through)] != through:
                raise DataError(f"{where}: the tokenizer's chat template does not render a conversation as the "
                                "rendering of its beginning plus more tokens, so assistant turns cannot be located; "
                                "use a prefix-stable template")
            loss_mask[len(before): len(through)] = True
        if len(ids) > self.max_length:
            if self.truncation != "truncate":
                return self._over(where, f"the conversation has {len(ids)} tokens, over max_length={self.max_length}", report)
            ids, loss_mask = ids[: self.max_length], loss_mask[: self.max_length]
            report.responses_truncated += 1
            if not loss_mask.any():
                report.dropped_overlength += 1
                return None
        return Encoded(np.asarray(ids, np.int32), loss_mask)


def encode_examples(examples: Sequence[tuple[str, object]], encoder: Encoder, report: DataReport) -> list:
    """Encode every ``(where, example)``; dropped ones are counted in ``report``, the rest returned."""
    encoded = []
    for where, example in examples:
        item = encoder.encode(example, where, report)
        if item is not None:
            encoded.append(item)
    report.kept = len(encoded)
    return encoded

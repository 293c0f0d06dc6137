"""Row formats -> typed examples, with column mapping and validation.

=====================  =========================================  ==================
format                 fields read (rename with ``columns``)      example type
=====================  =========================================  ==================
``prompt_completion``  prompt, completion                         PromptCompletion
``alpaca``             instruction, input (optional), output      PromptCompletion
``messages``           messages: [{role, content}, ...]           Conversation
``preference``         prompt, chosen, rejected, margin (opt.),   Preference
                       token_ids (opt.)
``hh_rlhf``            chosen, rejected (whole dialogues)         Preference
``ranking``            prompt, completions (best first)           Ranking
``unpaired``           prompt, completion, label (bool)           Unpaired
``steps``              prompt, steps (lines), labels (per step)   Steps
``prompt``             prompt (online RL: PPO, GRPO, ...)         Prompt
=====================  =========================================  ==================

Every example with a prompt also carries it as chat turns, ``messages`` (a user turn for a
plain prompt; instruction and input for Alpaca; the Human / Assistant turns of an HH-RLHF
dialogue), which the encoder renders through the tokenizer's chat template when
``data.chat_template`` is ``auto`` (the default) and the tokenizer has one. Preference and
ranking rows may be conversational: ``prompt`` a list of messages (then ``prompt`` text is
``None`` and only the chat form exists), ``chosen`` / ``rejected`` a string or a list
holding one assistant message.

A preference row written by a sampler (``rlhf-jax label``, an iterative DPO round) may carry
``token_ids``: ``{"prompt": [...], "chosen": [...], "rejected": [...], "tokenizer": <digest>}``,
the ids the policy saw and produced (a completion's stop token included when it stopped), so
the phase that trains on the pair reads exactly those ids instead of re-tokenizing the text
(``data.tokenizer.vocabulary_digest`` names the tokenizer they belong to).

A row that cannot be read (a missing field, a wrong type, an empty response, chosen ==
rejected) is a :class:`DataError` naming file and row, or, with ``on_malformed="skip"``,
skipped and counted in the :class:`DataReport`.

Each format is a :class:`DataFormat` record of :data:`FORMATS`; :func:`register_format` adds
one (a plugin's, ``RLHF_JAX_PLUGINS``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import NamedTuple

from rlhf_jax.data import hh_rlhf
from rlhf_jax.data.report import DataError, DataReport
from rlhf_jax.data.sources import UnreadableRow, read_rows

ROLES = ("system", "user", "assistant")
# Stanford Alpaca's prompt (Taori et al., 2023), with and without an input.
ALPACA_PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


Messages = tuple[dict, ...]  # chat turns, {"role": ..., "content": ...}


class PromptCompletion(NamedTuple):
    prompt: str
    completion: str
    messages: Messages | None = None  # the prompt as chat turns


class Conversation(NamedTuple):
    messages: tuple[dict, ...]  # {"role": ..., "content": ...}; loss on the assistant turns


class TokenIds(NamedTuple):
    """The ids of a sampled pair as its sampler held them (module docstring)."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    tokenizer: str  # data.tokenizer.vocabulary_digest of the tokenizer the ids belong to


class Preference(NamedTuple):
    prompt: str | None  # None: a conversational row (messages only)
    chosen: str
    rejected: str
    margin: float | None = None
    messages: Messages | None = None
    token_ids: TokenIds | None = None


class Ranking(NamedTuple):
    prompt: str | None
    completions: tuple[str, ...]  # best first
    messages: Messages | None = None


class Unpaired(NamedTuple):
    prompt: str
    completion: str
    desirable: bool
    messages: Messages | None = None


class Steps(NamedTuple):
    """A solution as reasoning steps, one line each, with each step's label in [0, 1] (1: the
    step is correct): the data of a process reward model (Lightman et al., 2023)."""

    prompt: str
    steps: tuple[str, ...]
    labels: tuple[float, ...]
    messages: Messages | None = None


class Prompt(NamedTuple):
    prompt: str
    messages: Messages | None = None


class MalformedRow(ValueError):
    pass


def _field(row: Mapping, name: str, columns: Mapping[str, str], kind: type | tuple, *, required: bool = True):
    column = columns.get(name, name)
    if column not in row or row[column] is None:
        if required:
            mapped = f" (mapped from {name!r})" if column != name else ""
            if column in row:
                raise MalformedRow(f"field {column!r}{mapped} is null")
            raise MalformedRow(f"missing field {column!r}{mapped}; the row has {sorted(row)}")
        return None
    value = row[column]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise MalformedRow(f"field {column!r} should be {names}, got {type(value).__name__}")
    return value


def _response(row, name, columns) -> str:
    text = _field(row, name, columns, str)
    if not text.strip():
        raise MalformedRow(f"field {columns.get(name, name)!r} is empty")
    return text


def _user(prompt: str) -> Messages | None:
    return ({"role": "user", "content": prompt},) if prompt.strip() else None


def _checked_messages(messages: list, what: str) -> Messages:
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise MalformedRow(f"{what} message {i} should be {{'role': ..., 'content': str}}, got {message!r:.80}")
        if message.get("role") not in ROLES:
            raise MalformedRow(f"{what} message {i} has role {message.get('role')!r}; roles are {', '.join(ROLES)}")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def _prompt_field(row, columns) -> tuple[str | None, Messages | None]:
    """``(text, messages)`` of a prompt given as text or, conversationally, as messages."""
    prompt = _field(row, "prompt", columns, (str, list))
    if isinstance(prompt, str):
        return prompt, _user(prompt)
    messages = _checked_messages(prompt, "prompt")
    if not messages or messages[-1]["role"] != "user":
        raise MalformedRow("a conversational prompt should end with a user message")
    return None, messages


def _reply(row, name, columns) -> str:
    """A response given as text or as a list holding one assistant message."""
    value = _field(row, name, columns, (str, list))
    if isinstance(value, list):
        turns = _checked_messages(value, name)
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise MalformedRow(f"field {columns.get(name, name)!r} as a list should hold one assistant message")
        value = turns[0]["content"]
    if not value.strip():
        raise MalformedRow(f"field {columns.get(name, name)!r} is empty")
    return value


def _prompt_completion(row, columns):
    prompt = _field(row, "prompt", columns, str)
    return PromptCompletion(prompt, _response(row, "completion", columns), _user(prompt))


def _alpaca(row, columns):
    instruction = _response(row, "instruction", columns)
    extra = _field(row, "input", columns, str, required=False) or ""
    prompt = ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if extra.strip() else "",
        instruction=instruction,
        input_block=f"### Input:\n{extra}\n\n" if extra.strip() else "",
    )
    chat = instruction + (f"\n\n{extra}" if extra.strip() else "")
    return PromptCompletion(prompt, _response(row, "output", columns), _user(chat))


def _conversation(row, columns):
    messages = _checked_messages(_field(row, "messages", columns, list), "the")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise MalformedRow("no non-empty assistant turn to learn from")
    return Conversation(messages)


def _distinct(chosen: str, rejected: str) -> None:
    if chosen == rejected:
        raise MalformedRow("chosen and rejected are the same text, so the pair carries no preference")


def _preference(row, columns):
    chosen, rejected = _reply(row, "chosen", columns), _reply(row, "rejected", columns)
    token_ids = _token_ids(row, columns)
    if token_ids is None or token_ids.chosen == token_ids.rejected:  # two samples may decode to one text
        _distinct(chosen, rejected)
    margin = _field(row, "margin", columns, (int, float), required=False)
    prompt, messages = _prompt_field(row, columns)
    return Preference(prompt, chosen, rejected, None if margin is None else float(margin), messages, token_ids)


def _token_ids(row, columns) -> TokenIds | None:
    ids = _field(row, "token_ids", columns, dict, required=False)
    if ids is None:
        return None
    lists = []
    for part in ("prompt", "chosen", "rejected"):
        value = ids.get(part)
        if not isinstance(value, list) or not value or not all(isinstance(t, int) and t >= 0 for t in value):
            raise MalformedRow(f"token_ids.{part} should be a non-empty list of token ids")
        lists.append(tuple(value))
    if not isinstance(ids.get("tokenizer"), str):
        raise MalformedRow("token_ids.tokenizer should name the tokenizer's vocabulary digest")
    return TokenIds(*lists, ids["tokenizer"])


def _hh_rlhf(row, columns):
    chosen, rejected = _response(row, "chosen", columns), _response(row, "rejected", columns)
    _distinct(chosen, rejected)
    try:
        prompt, chosen, rejected = hh_rlhf.split_dialogues(chosen, rejected)
        return Preference(prompt, chosen, rejected, messages=hh_rlhf.dialogue_messages(prompt))
    except ValueError as error:
        raise MalformedRow(str(error)) from None


def _ranking(row, columns):
    completions = _field(row, "completions", columns, list)
    if len(completions) < 2 or not all(isinstance(c, str) and c.strip() for c in completions):
        raise MalformedRow("completions should be a list of at least 2 non-empty strings, best first")
    if len(set(completions)) < len(completions):
        raise MalformedRow("completions repeat a text, so the ranking is ambiguous")
    prompt, messages = _prompt_field(row, columns)
    return Ranking(prompt, tuple(completions), messages)


def _unpaired(row, columns):
    prompt = _field(row, "prompt", columns, str)
    return Unpaired(prompt, _response(row, "completion", columns), _field(row, "label", columns, bool), _user(prompt))


def _steps(row, columns):
    prompt = _field(row, "prompt", columns, str)
    steps, labels = _field(row, "steps", columns, list), _field(row, "labels", columns, list)
    if not steps or not all(isinstance(step, str) and step.strip() for step in steps):
        raise MalformedRow("steps should be a non-empty list of non-empty strings")
    if any("\n" in step for step in steps):
        raise MalformedRow("a step holds a newline; a policy's completion is split into steps at newlines, so give "
                           "each line as a step of its own")
    if len(labels) != len(steps):
        raise MalformedRow(f"{len(labels)} labels for {len(steps)} steps; give one label per step")
    if not all(isinstance(y, bool | int | float) and 0 <= y <= 1 for y in labels):
        raise MalformedRow("labels should be booleans or numbers in [0, 1] (1: the step is correct)")
    return Steps(prompt, tuple(steps), tuple(float(y) for y in labels), _user(prompt))


def _prompt(row, columns):
    prompt = _response(row, "prompt", columns)
    return Prompt(prompt, _user(prompt))


@dataclasses.dataclass(frozen=True)
class DataFormat:
    """A ``data.format``: ``parse(row, columns) -> example`` (raising :class:`MalformedRow`), the
    fields it reads (the keys ``data.columns`` may rename), and the example type it yields --
    which the encoder, the loader and the phases dispatch on, so a new format of an existing
    example type is one parser and one registration."""

    name: str
    parse: Callable[[Mapping, Mapping[str, str]], object]
    fields: tuple[str, ...]
    example: type


FORMATS: dict[str, DataFormat] = {}


def register_format(data_format: DataFormat) -> DataFormat:
    """Add ``data_format`` under its name (a value of ``data.format``); returns it. Raises
    ``ValueError`` for a name already taken."""
    if data_format.name in FORMATS:
        raise ValueError(f"a data format named {data_format.name!r} is already registered")
    FORMATS[data_format.name] = data_format
    return data_format


def formats_of(*examples: type) -> tuple[str, ...]:
    """The registered formats whose rows become one of ``examples`` (e.g. ``Preference``)."""
    return tuple(name for name, data_format in FORMATS.items() if data_format.example in examples)


def compares_responses(fmt: str) -> bool:
    """Whether a row of ``fmt`` holds responses to one prompt to compare (a pair or a ranking)."""
    return FORMATS[fmt].example in (Preference, Ranking)


for _format in (
        DataFormat("prompt_completion", _prompt_completion, ("prompt", "completion"), PromptCompletion),
        DataFormat("alpaca", _alpaca, ("instruction", "input", "output"), PromptCompletion),
        DataFormat("messages", _conversation, ("messages",), Conversation),
        DataFormat("preference", _preference, ("prompt", "chosen", "rejected", "margin", "token_ids"), Preference),
        DataFormat("hh_rlhf", _hh_rlhf, ("chosen", "rejected"), Preference),
        DataFormat("ranking", _ranking, ("prompt", "completions"), Ranking),
        DataFormat("unpaired", _unpaired, ("prompt", "completion", "label"), Unpaired),
        DataFormat("steps", _steps, ("prompt", "steps", "labels"), Steps),
        DataFormat("prompt", _prompt, ("prompt",), Prompt)):
    register_format(_format)
ON_MALFORMED = ("error", "skip")


def parse_row(row: object, fmt: str, columns: Mapping[str, str] | None = None):
    """One row -> its example; :class:`MalformedRow` says what is wrong, ``DataError`` names an
    unknown format."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; formats are: {', '.join(FORMATS)}")
    if isinstance(row, UnreadableRow):
        raise MalformedRow(row.reason)
    if not isinstance(row, Mapping):
        raise MalformedRow(f"a row should be an object with named fields, got {type(row).__name__}")
    return FORMATS[fmt].parse(row, columns or {})


def load_examples(source: str, fmt: str, *, columns: Mapping[str, str] | None = None, split: str = "train",
                  on_malformed: str = "error", report: DataReport | None = None) -> tuple[list, DataReport]:
    """``([(where, example), ...], report)``: every row of ``source`` parsed as ``fmt``;
    malformed rows raise (naming file and row) or, with ``on_malformed="skip"``, are counted
    in the report and left out."""
    if on_malformed not in ON_MALFORMED:
        raise DataError(f"on_malformed={on_malformed!r}; choose one of {', '.join(ON_MALFORMED)}")
    report = report or DataReport(source)
    examples = []
    for where, row in read_rows(source, split):
        report.rows += 1
        try:
            examples.append((where, parse_row(row, fmt, columns)))
        except MalformedRow as error:
            if on_malformed == "error":
                raise DataError(f"{where}: {error} (format {fmt!r}). Fix the row, map its columns with "
                                "data.columns, or set data.on_malformed: skip to leave such rows out (counted)") from None
            report.skip(f"{where}: {error}")
    if not examples:
        raise DataError(f"{source}: no usable rows (read {report.rows}); give a file with rows of the {fmt} format "
                        f"(fields: {', '.join(FORMATS[fmt].fields)})")
    return examples, report

"""A scorer reads prompts in the format it was trained on.

A reward model learns on prompts rendered one way -- its own tokenizer's chat template, or the
data's text as written (HH-RLHF's ``\\n\\nHuman: ... \\n\\nAssistant:``) -- and is blind to the
policy's rendering (another chat template, a system prompt it never saw). The reward-model
phase records its rendering beside the exported checkpoint (``prompt_format.json``,
:func:`write_prompt_format`); at scoring time a :class:`PromptTable` leads each policy prompt
text back to its data row, and the scorer renders that row its own way
(:meth:`PromptTable.scorer_example`) before its encoder cuts and encodes it exactly as the
training encoder did. A checkpoint without the record (a reward model trained elsewhere)
scores the policy's text, as said in the run's log."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from rlhf_jax.data.formats import Conversation, PromptCompletion

PROMPT_FORMAT_FILE = "prompt_format.json"
PROMPT_FORMATS = ("chat_template", "text")  # the scorer's own chat template; the data's prompt text as written


def write_prompt_format(directory: str | Path, *, chat: bool) -> None:
    """Record in ``directory`` (an exported checkpoint) how its training rendered prompts:
    through its tokenizer's chat template (``chat``) or as the data's text."""
    record = {"prompt_format": "chat_template" if chat else "text"}
    (Path(directory) / PROMPT_FORMAT_FILE).write_text(json.dumps(record) + "\n")


def read_prompt_format(directory: str | Path) -> str | None:
    """The prompt format ``directory``'s checkpoint records (one of ``PROMPT_FORMATS``), or
    ``None`` when it records none. Raises ``ValueError`` for an unreadable record."""
    path = Path(directory) / PROMPT_FORMAT_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())["prompt_format"]
    except (json.JSONDecodeError, KeyError, TypeError):
        value = None
    if value not in PROMPT_FORMATS:
        raise ValueError(f"{path} is not a prompt-format record ({{\"prompt_format\": "
                         f"{' or '.join(map(repr, PROMPT_FORMATS))}}}); delete it or export the reward model again")
    return value


def prompt_parts(example) -> tuple[str | None, tuple[dict, ...] | None]:
    """``(text, messages)`` of an example's prompt: its text as written (``None`` for a
    conversational row) and its chat turns (for a conversation, those before its last
    assistant turn)."""
    if isinstance(example, Conversation):
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        return None, tuple(example.messages[:last])
    return example.prompt, example.messages


class PromptTable:
    """Policy prompt texts -> the data rows they were rendered from, filled by whoever renders
    prompts for a scorer (the online phases' prompt sets, ``evaluate``'s prompts and judge
    validation pairs)."""

    def __init__(self):
        self._parts: dict[str, tuple[str | None, tuple[dict, ...] | None]] = {}

    @classmethod
    def of(cls, *prompt_sets) -> PromptTable:
        """The table of prompt sets (``rl.prompts.Prompts``: ``texts`` and ``examples``; ``None``
        entries skipped)."""
        table = cls()
        for prompts in prompt_sets:
            if prompts is not None:
                table.add(prompts.texts, prompts.examples)
        return table

    def add(self, texts: Iterable[str], examples: Iterable) -> None:
        """Register each rendered ``texts[i]`` as coming from ``examples[i]``."""
        for text, example in zip(texts, examples):
            self._parts.setdefault(text, prompt_parts(example))

    def scorer_example(self, text: str, completion: str, prompt_format: str, where: str) -> PromptCompletion:
        """The example a scorer of ``prompt_format`` encodes for policy prompt ``text`` and
        ``completion``: the row's text as written (``"text"``) or its chat turns, which the
        scorer's encoder renders with its own template (``"chat_template"``). Raises
        ``ValueError`` naming ``where`` for a text no registered row rendered, or a
        conversational row for a scorer trained on text."""
        if text not in self._parts:
            raise ValueError(f"{where}: the prompt {text[-60:]!r} comes from no registered data row, so it cannot be "
                             "rendered in the scorer's own format")
        prompt, messages = self._parts[text]
        if prompt_format == "text":
            if prompt is None:
                raise ValueError(f"{where}: the scorer was trained on prompt text, and this prompt is a conversation "
                                 "with no text; train the reward model on data of this shape (chat_template: auto)")
            return PromptCompletion(prompt, completion)
        return PromptCompletion(prompt or "", completion, messages)

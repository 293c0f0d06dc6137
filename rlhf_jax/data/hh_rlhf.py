"""Anthropic HH-RLHF raw dialogues -> (prompt, chosen response, rejected response).

Each row holds two whole dialogues, ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, that share
their beginning. The prompt is the longest shared beginning that ends with
``"\\n\\nAssistant:"``; each response is the rest of its dialogue (it keeps its leading
space, as the text was written). In almost every row the two dialogues differ only in the
last assistant turn; in the few that diverge earlier (5 of the 2,312 harmless-base test
rows) the responses carry the remaining turns, which is what the labeller compared."""

from __future__ import annotations

import os
import re

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"


def dialogue_messages(prompt: str) -> tuple[dict, ...]:
    """The turns of an HH prompt (``"\\n\\nHuman: ...\\n\\nAssistant:"``) as chat messages,
    user and assistant, contents stripped; the final empty assistant turn (the one to
    answer) is left out."""
    parts = re.split(r"\n\n(Human|Assistant):", prompt)
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return tuple(messages)


def split_dialogues(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen_response, rejected_response)``; ``ValueError`` when the two share no
    assistant turn or a response is empty."""
    if not chosen.startswith(HUMAN) or not rejected.startswith(HUMAN):
        raise ValueError(f"an HH-RLHF dialogue must start with {HUMAN!r}")
    shared = os.path.commonprefix([chosen, rejected])
    end = shared.rfind(ASSISTANT)
    if end < 0:
        raise ValueError(f"chosen and rejected share no {ASSISTANT!r} turn, so there is no common prompt")
    prompt = chosen[: end + len(ASSISTANT)]
    chosen_response, rejected_response = chosen[len(prompt):], rejected[len(prompt):]
    if not chosen_response.strip() or not rejected_response.strip():
        raise ValueError("a response is empty after the shared prompt")
    return prompt, chosen_response, rejected_response

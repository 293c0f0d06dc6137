"""The ``letters`` task: a prompt is three letters and ``=`` (``"cab="``); a demonstration continues
it with 6-12 letters drawn uniformly from ``a``-``h``. The gold reward of a completion is
the share of its characters that are vowels (``a`` or ``e``): 0.25 for a demonstration on
average. Preference pairs are two demonstrations of the same prompt, the one with the larger
share chosen (ties redrawn)."""

from __future__ import annotations

import random
from pathlib import Path

from rlhf_jax.tasks.files import task_paths, write_jsonl, write_preferences

ALPHABET = "abcdefgh"
VOWELS = "ae"


def vowel_share(prompt: str, completion: str) -> float:
    """The ``letters`` task's gold reward: the share of ``a``/``e`` among the completion's characters."""
    del prompt
    return sum(ch in VOWELS for ch in completion) / len(completion) if completion else 0.0


def _letters(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(low, high)))


def write_letters(directory: Path, *, seed: int, demonstrations: int = 2000, pairs: int = 2000,
                  prompts: int = 1000, write: bool = True) -> dict[str, Path]:
    """Write ``sft.jsonl`` (prompt/completion), ``preferences.jsonl`` (prompt/chosen/rejected)
    and ``prompts.jsonl`` (prompt) under ``directory``; the same files for the same seed.
    ``write=False``: only their paths (the other processes of a multi-host run)."""
    rng = random.Random(seed)
    prompt = lambda: _letters(rng, 3, 3) + "="  # noqa: E731
    sft = [{"prompt": prompt(), "completion": _letters(rng, 6, 12)} for _ in range(demonstrations)]
    preferences = []
    while len(preferences) < pairs:
        p, a, b = prompt(), _letters(rng, 6, 12), _letters(rng, 6, 12)
        if vowel_share(p, a) != vowel_share(p, b):
            chosen, rejected = (a, b) if vowel_share(p, a) > vowel_share(p, b) else (b, a)
            preferences.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    paths = task_paths(directory)
    if not write:
        return paths
    write_jsonl(paths["sft"], sft)
    write_preferences(paths, preferences)
    write_jsonl(paths["prompts"], [{"prompt": prompt()} for _ in range(prompts)])
    return paths

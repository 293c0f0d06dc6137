"""The ``sums`` task, a verifiable reward for a chat model: a prompt asks ``What is A + B? Answer
with the number only.`` for numbers A and B from 2 to 25; the reward is 1 when the completion's final answer is the sum,
else 0 -- exact-match accuracy, no judge needed (the verifiable-reward line of DeepSeekMath,
Shao et al., 2024, and DeepSeek-R1, 2025).

The answer rule (:func:`final_answer`): the last integer in the completion, thousands
separators ignored -- the convention of GSM8K graders (Cobbe et al., 2021). A completion that
works the sum out and then rambles on ends on another number and scores 0; one with no
integer scores 0.

The problems (:func:`write_sums`) are the pairs ``{A, B}`` split once, by ``seed``, into
disjoint training and held-out sets, each pair asked in both orders: a held-out problem is
never trained on, in either order. (SmolLM2-135M-Instruct answers about a third of them
right; two-digit sums such as ``27 + 30`` it gets right about one time in ten.) The reward reads the question from the prompt itself, so it scores any
rendering of it (a chat template around it, a system prompt before it)."""

from __future__ import annotations

import random
import re
from pathlib import Path

from rlhf_jax.tasks.arithmetic import careless_answer
from rlhf_jax.tasks.files import task_paths, write_jsonl, write_preferences

_QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")
_INTEGER = re.compile(r"-?\d+")
LOWEST, HIGHEST = 2, 25


def question(a: int, b: int) -> str:
    """The prompt of the problem ``a + b``."""
    return f"What is {a} + {b}? Answer with the number only."


def final_answer(completion: str) -> int | None:
    """The last integer in ``completion`` (commas between digits ignored), or ``None``."""
    found = _INTEGER.findall(re.sub(r"(?<=\d),(?=\d{3})", "", completion))
    return int(found[-1]) if found else None


def sum_exact_match(prompt: str, completion: str) -> float:
    """The ``sums`` task's reward: 1.0 when :func:`final_answer` of ``completion`` is the sum the
    prompt's last ``What is A + B?`` asks for, else 0.0. Raises ``ValueError`` for a prompt
    that asks no such question."""
    asked = _QUESTION.findall(prompt)
    if not asked:
        raise ValueError(f"prompt {prompt[-80:]!r} asks no 'What is A + B?' question")
    a, b = map(int, asked[-1])
    return float(final_answer(completion) == a + b)


def split_problems(seed: int, held_out: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(train, held_out)`` problems ``(a, b)``: the pairs ``a <= b`` in ``[LOWEST, HIGHEST]``
    shuffled by ``seed``, the first ``held_out`` pairs held out; every pair asked in both
    orders, each list shuffled again. Raises ``ValueError`` when ``held_out`` leaves no
    training pair."""
    pairs = [(a, b) for a in range(LOWEST, HIGHEST + 1) for b in range(a, HIGHEST + 1)]
    if not 0 < held_out < len(pairs):
        raise ValueError(f"held_out={held_out}: choose 1 to {len(pairs) - 1} of the {len(pairs)} pairs")
    rng = random.Random(seed)
    rng.shuffle(pairs)
    both_orders = lambda chosen: [order for a, b in chosen for order in dict.fromkeys([(a, b), (b, a)])]  # noqa: E731
    train, held = both_orders(pairs[held_out:]), both_orders(pairs[:held_out])
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def write_sums(directory: Path, *, seed: int = 0, held_out: int = 80, write: bool = True) -> dict[str, Path]:
    """Under ``directory`` (:func:`split_problems`): ``prompts.jsonl`` (the training problems,
    ``{"prompt", "answer"}``), ``held_out.jsonl`` (problems never trained on, the same rows),
    ``sft.jsonl`` (a worked answer ``A + B = C.`` per training problem) and
    ``preferences.jsonl`` (that answer chosen over one off by +-1 or +-10); the same files for
    the same seed. ``write=False``: only their paths."""
    paths = task_paths(directory) | {"held_out": directory / "held_out.jsonl"}
    if not write:
        return paths
    train, held = split_problems(seed, held_out)
    rng = random.Random(seed + 1)
    worked = lambda a, b, c: f"{a} + {b} = {c}."  # noqa: E731
    write_jsonl(paths["prompts"], [{"prompt": question(a, b), "answer": a + b} for a, b in train])
    write_jsonl(paths["held_out"], [{"prompt": question(a, b), "answer": a + b} for a, b in held])
    write_jsonl(paths["sft"], [{"prompt": question(a, b), "completion": worked(a, b, a + b)} for a, b in train])
    write_preferences(paths, [
        {"prompt": question(a, b), "chosen": worked(a, b, a + b), "rejected": worked(a, b, careless_answer(a, b, rng))}
        for a, b in train])
    return paths

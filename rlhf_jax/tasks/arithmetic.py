"""The ``arithmetic`` task, a verifiable reward: a prompt is a sum of two numbers and ``=``
(``"23+45="``); the reward is 1 when the completion's answer is the sum, else 0.

The answer rule (:func:`extract_answer`): the completion's leading integer -- optional
spaces, then the longest run of digits -- and nothing else is read; a completion without one
has no answer and scores 0. The checker (:func:`exact_match`) compares it to the sum exactly.

The demonstrations come from a careless teacher: right with probability
``teacher_accuracy`` (0.5), otherwise off in one digit (+-1 or +-10). An SFT policy learns
the careless answers with the right ones; a reinforcement-learning phase with the exact
checker as its reward (GRPO, DAPO, ...) can learn to give the right one. Preference pairs
set the right answer against a careless one. The prompts are distinct problems; the
demonstrations and pairs are drawn from all problems, so a held-out prompt (one the RL phase
never trained on) may have been demonstrated, with the teacher's mix of answers.

:func:`step_solutions`: sums of three numbers solved in two steps (``a+b=s``, ``s+c=t``),
each step labelled by its own arithmetic -- the data of a process reward model (data format
``steps``, ``rlhf-jax prm``).

``arithmetic_tools``: the same problems, with half the demonstrations asking the built-in
calculator tool instead (``calc(a+b)``, the reply ``=SUM``, then the answer; the others are
the careless teacher's) and the online phases running multi-turn episodes with the
calculator (``rollout.environment: builtin:calculator``); the reward reads the last turn."""

from __future__ import annotations

import random
import re
from pathlib import Path

from rlhf_jax.tasks.files import task_paths, write_jsonl, write_preferences

_PROMPT = re.compile(r"(\d+)\+(\d+)=$")
_ANSWER = re.compile(r" *(\d+)")
CARELESS_OFFSETS = (-10, -1, 1, 10)

# the pipeline's settings for this task over its generic ones (rlhf_jax.pipeline): a longer SFT
# (the sums are harder to learn than the letters), short completions, larger groups, a weak KL
PIPELINE_DEFAULTS = {
    "sft": {"train": {"steps": 1500}, "checkpoint": {"every": 500}},
    "online": {"rollout": {"prompts": 16, "samples": 8, "max_new_tokens": 8},
               "kl": {"beta": 0.01}, "reward": {"missing_eos_penalty": None},
               "train": {"iterations": 80, "optimizer": {"learning_rate": 2e-3, "schedule": "cosine", "warmup_steps": 5},
                         "eval_prompts": 64}},
}


def extract_answer(completion: str) -> int | None:
    """The completion's leading integer (spaces, then digits), or ``None`` when it has none."""
    match = _ANSWER.match(completion)
    return int(match.group(1)) if match else None


def exact_match(prompt: str, completion: str) -> float:
    """The ``arithmetic`` task's reward: 1.0 when the completion's answer (:func:`extract_answer`)
    is the sum the prompt asks for (its trailing ``a+b=``), else 0.0. Raises ``ValueError`` for
    a prompt that does not end in ``a+b=``."""
    question = _PROMPT.search(prompt)
    if question is None:
        raise ValueError(f"prompt {prompt!r} does not end in a sum a+b=")
    return float(extract_answer(completion) == int(question.group(1)) + int(question.group(2)))


def careless_answer(a: int, b: int, rng: random.Random) -> int:
    """A wrong answer a careless teacher gives: the sum off by +-1 or +-10, never negative."""
    return a + b + rng.choice([offset for offset in CARELESS_OFFSETS if a + b + offset >= 0])


def tool_demonstration(a: int, b: int) -> str:
    """A demonstration that asks the calculator (``rl.environments.Calculator``): the call, the
    calculator's reply as it will be appended, then the answer."""
    return f"calc({a}+{b})={a + b}\n{a + b}"


def write_arithmetic(directory: Path, *, seed: int, demonstrations: int = 3000, pairs: int = 2000,
                     prompts: int = 200, largest: int = 19, teacher_accuracy: float = 0.5, tool_share: float = 0.0,
                     write: bool = True) -> dict[str, Path]:
    """Write ``sft.jsonl`` (prompt/completion), ``preferences.jsonl`` (prompt/chosen/rejected)
    and ``prompts.jsonl`` (prompt) under ``directory`` for sums of two numbers in
    ``[0, largest]``: ``prompts`` distinct problems, the demonstrations and pairs drawn (with
    replacement) from all problems, a share ``tool_share`` of the demonstrations asking the
    calculator (:func:`tool_demonstration`), the others the careless teacher's answers; the same files for the same seed. ``write=False``: only their
    paths. Raises ``ValueError`` when the problems do not suffice."""
    rng = random.Random(seed)
    problems = [(a, b) for a in range(largest + 1) for b in range(largest + 1)]
    if prompts >= len(problems):
        raise ValueError(f"{prompts} prompts asked for; sums up to {largest} have only {len(problems)} problems")
    rng.shuffle(problems)
    held = problems[:prompts]
    demo, pair = [rng.choice(problems) for _ in range(demonstrations)], [rng.choice(problems) for _ in range(pairs)]
    question = lambda a, b: f"{a}+{b}="  # noqa: E731
    paths = task_paths(directory)
    if not write:
        return paths
    def demonstration(a: int, b: int) -> str:
        if rng.random() < tool_share:
            return tool_demonstration(a, b)
        return str(a + b if rng.random() < teacher_accuracy else careless_answer(a, b, rng))

    write_jsonl(paths["sft"], [{"prompt": question(a, b), "completion": demonstration(a, b)} for a, b in demo])
    write_preferences(paths, [
        {"prompt": question(a, b), "chosen": str(a + b), "rejected": str(careless_answer(a, b, rng))} for a, b in pair])
    write_jsonl(paths["prompts"], [{"prompt": question(a, b)} for a, b in held])
    return paths


def write_arithmetic_tools(directory: Path, *, seed: int, write: bool = True, **options) -> dict[str, Path]:
    """:func:`write_arithmetic` with half the demonstrations asking the calculator."""
    return write_arithmetic(directory, seed=seed, write=write, tool_share=0.5, **options)


def step_solutions(seed: int, n: int, *, largest: int = 19, step_accuracy: float = 0.5) -> list[dict]:
    """``n`` rows of the ``steps`` format: a prompt ``a+b+c=`` with numbers in ``[0, largest]``
    and its careless teacher's two steps ``a+b=s`` and ``s+c=t``, each right with probability
    ``step_accuracy`` (else off by +-1 or +-10), labelled 1 when the step's own sum is right
    -- the second from the first's result, right or wrong, as a grader of steps judges each
    step (Lightman et al., 2023). The same rows for the same seed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, c = (rng.randint(0, largest) for _ in range(3))
        steps, labels, running = [], [], a
        for term in (b, c):
            right = rng.random() < step_accuracy
            result = running + term if right else careless_answer(running, term, rng)
            steps.append(f"{running}+{term}={result}")
            labels.append(int(right))
            running = result
        rows.append({"prompt": f"{a}+{b}+{c}=", "steps": steps, "labels": labels})
    return rows


# the tool task's pipeline settings: turns long enough for a call, the calculator as environment
TOOLS_PIPELINE_DEFAULTS = {
    "sft": PIPELINE_DEFAULTS["sft"],
    "online": {**PIPELINE_DEFAULTS["online"],
               "rollout": {**PIPELINE_DEFAULTS["online"]["rollout"], "max_new_tokens": 16,
                           "environment": "builtin:calculator", "max_turns": 3}},
}

"""Built-in tasks: small problems whose reward is known exactly, so a whole pipeline runs
offline and its result is judged by that reward -- which no phase optimises directly when
preferences or demonstrations stand between it and the policy.

- ``letters`` (:mod:`.letters`): a preference task, the share of vowels in a completion.
- ``arithmetic`` (:mod:`.arithmetic`): a verifiable task, the exact answer to a sum;
  ``arithmetic_tools``: the same with a calculator tool (multi-turn episodes).
- ``sums`` (:mod:`.sums`): a verifiable task for chat models, ``What is A + B?`` for two-digit
  numbers, exact match of the final answer; training and held-out problems disjoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from rlhf_jax.tasks.arithmetic import PIPELINE_DEFAULTS as ARITHMETIC_DEFAULTS
from rlhf_jax.tasks.arithmetic import TOOLS_PIPELINE_DEFAULTS as TOOLS_DEFAULTS
from rlhf_jax.tasks.arithmetic import exact_match, extract_answer, write_arithmetic, write_arithmetic_tools
from rlhf_jax.tasks.letters import vowel_share, write_letters
from rlhf_jax.tasks.sums import final_answer, sum_exact_match, write_sums


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    reward: Callable[[str, str], float]  # the gold reward of (prompt, completion)
    reward_text: str  # the gold reward in words
    write_data: Callable[..., dict[str, Path]]  # (directory, *, seed, write) -> {"sft", "preferences", "unpaired", "prompts"}
    # the pipeline's settings for this task over its generic ones: phase name (or "online", every
    # online phase) -> that phase's config keys
    pipeline_defaults: dict = dataclasses.field(default_factory=dict)


TASKS = {task.name: task for task in (
    Task("letters", vowel_share, "the share of a/e in the completion", write_letters),
    Task("arithmetic", exact_match, "1 for the exact sum, else 0", write_arithmetic, ARITHMETIC_DEFAULTS),
    Task("arithmetic_tools", exact_match, "1 for the exact sum in the last turn, else 0", write_arithmetic_tools,
         TOOLS_DEFAULTS),
    Task("sums", sum_exact_match, "1 when the completion's last integer is the sum, else 0", write_sums))}


def get(name: str) -> Task:
    """The built-in task ``name``; ``KeyError`` naming the built-in tasks otherwise."""
    if name not in TASKS:
        raise KeyError(f"unknown built-in task {name!r}; built-in tasks: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "Task", "exact_match", "extract_answer", "final_answer", "get", "sum_exact_match", "vowel_share", "write_arithmetic",
           "write_arithmetic_tools", "write_letters", "write_sums"]

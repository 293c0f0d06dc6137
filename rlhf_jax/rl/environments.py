"""Text environments for multi-turn rollouts (``rl.multi_turn``): a policy's turn may end in a
tool call, the environment answers, and the episode goes on.

The protocol, :class:`Environment`, is on text: ``reset(prompt) -> state`` starts an episode
and ``step(state, turn) -> (state, reply)`` reads one turn of the policy -- the text it wrote
since the last reply -- and returns the reply to append, or ``None`` when the episode is over
(the turn was a final answer). A turn ends at the policy's stop token or at a token whose
text contains ``call_end``, the end of a tool call.

The built-in ``calculator`` (:class:`Calculator`): a turn that ends in ``calc(EXPR)`` gets
the reply ``=VALUE`` and a newline, where ``EXPR`` is integers joined by ``+``, ``-`` and
``*`` (evaluated left to right with ``*`` first, no ``eval``); anything else in the
parentheses gets ``=error``. A turn without a call ends the episode."""

from __future__ import annotations

import re
from typing import Any, Protocol

from rlhf_jax.rl.rewards import RewardError, import_object


class Environment(Protocol):
    """A text environment of :mod:`rlhf_jax.rl.multi_turn` (module docstring)."""

    name: str
    call_end: str  # a turn whose last token's text contains this is a tool call: the sampler stops there

    def reset(self, prompt: str) -> Any:
        """The state of a new episode on ``prompt``."""
        ...

    def step(self, state: Any, turn: str) -> tuple[Any, str | None]:
        """``(state, reply)`` after the policy's ``turn``; ``reply=None`` ends the episode."""
        ...


_CALL = re.compile(r"calc\(([^()]*)\)\s*$", re.ASCII)
_EXPRESSION = re.compile(r"\s*\d+(\s*[-+*]\s*\d+)*\s*", re.ASCII)  # ASCII digits and spaces only


def evaluate_expression(expression: str) -> int | None:
    """The value of integers joined by ``+``, ``-``, ``*`` (``*`` binds first), or ``None``
    for anything else."""
    if not _EXPRESSION.fullmatch(expression):
        return None
    total = 0
    for term in re.split(r"(?=[-+])", "".join(expression.split())):
        sign = -1 if term.startswith("-") else 1
        product = 1
        for factor in term.lstrip("+-").split("*"):
            product *= int(factor)
        total += sign * product
    return total


class Calculator:
    """The built-in calculator tool (module docstring); stateless."""

    name = "calculator"
    call_end = ")"

    def reset(self, prompt: str) -> None:
        """No state: each call stands alone."""
        del prompt

    def step(self, state: None, turn: str) -> tuple[None, str | None]:
        """``=VALUE`` + newline for a turn ending in ``calc(EXPR)``, ``None`` for a final answer."""
        call = _CALL.search(turn)
        if call is None:
            return state, None
        value = evaluate_expression(call.group(1))
        return state, f"={'error' if value is None else value}\n"


ENVIRONMENTS = {"calculator": Calculator}


def load_environment(spec: str) -> Environment:
    """``"builtin:NAME"`` (:data:`ENVIRONMENTS`) or ``"package.module:Factory"`` (called with no
    arguments). Raises ``RewardError`` naming the spec when it cannot be loaded."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in ENVIRONMENTS:
            raise RewardError(f"unknown built-in environment {name!r}; built-in environments: {', '.join(ENVIRONMENTS)}")
        return ENVIRONMENTS[name]()
    environment = import_object(spec, "environment", "package.module:Factory or builtin:NAME")()
    missing = [name for name in ("name", "call_end", "reset", "step") if not hasattr(environment, name)]
    if missing:
        raise RewardError(f"environment {spec!r} lacks {', '.join(missing)} (see rlhf_jax.rl.environments.Environment)")
    return environment

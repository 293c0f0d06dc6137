"""Reward functions that misbehave, for the bad-input tests (imported by the CLI as
``reward_functions:NAME`` with ``tests/`` on ``PYTHONPATH``)."""


def raises_on_third_sample(prompt: str, completion: str) -> float:
    raises_on_third_sample.calls = getattr(raises_on_third_sample, "calls", 0) + 1
    if raises_on_third_sample.calls == 3:
        raise ValueError("cannot parse the answer")
    return 0.0


def nan_for_everything(prompt: str, completion: str) -> float:
    return float("nan")


def has_vowel(prompt: str, completion: str) -> float:
    """A 0/1 checker: 1.0 when the completion holds an a or an e."""
    del prompt
    return float("a" in completion or "e" in completion)

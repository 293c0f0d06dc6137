"""Reward sources behind one interface, and the score shaping applied before the KL.

A source is called on text -- ``source(prompts, completions) -> (scores_B, penalised)`` --
so a reward model with its own tokenizer reads exactly what a person would (the *text
handoff*: the policy's tokens are decoded, special tokens dropped, and re-encoded by the
reward model's tokenizer the way its training data was). ``penalised`` counts the samples
that got a configured penalty instead of a score.

- :class:`FunctionReward`: a Python function of ``(prompt, completion) -> float`` (verifiable
  rewards). A sample for which it raises or returns a non-finite value is an error naming the
  sample, or, with ``on_error="penalty"``, scored ``penalty`` and counted.
- :class:`ModelReward`: a trained reward model (``ScoreModel``) and its tokenizer.
- :class:`SumReward`: a weighted sum of sources, each optionally whitened over the batch
  (multi-objective rewards), each one's mean logged.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import DataReport, Encoder, PromptCompletion
from rlhf_jax.hosts import to_global, to_host
from rlhf_jax.models.pure_jit import pure_jit
from rlhf_jax.rl.scorer_prompts import PromptTable
from rlhf_jax.rollout.buckets import bucket_length


class RewardError(ValueError):
    """A reward that cannot be computed; the message names the sample."""


def _snippet(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class FunctionReward:
    def truncations(self) -> dict[str, int]:
        """A function reads the text whole: nothing is cut."""
        return {}

    def __init__(self, fn: Callable[[str, str], float], name: str, *, on_error: str = "error", penalty: float = -1.0,
                 section: str = "reward", role: str = "reward function"):
        """``fn(prompt, completion) -> float`` named ``name``; ``role`` names it in errors (a
        reward function, ``reward.monitor``), ``section`` the config section of its
        ``on_error`` / ``penalty``."""
        if on_error not in ("error", "penalty"):
            raise ValueError(f"on_error={on_error!r}; choose error or penalty")
        self.fn, self.name, self.on_error, self.penalty, self.section = fn, name, on_error, penalty, section
        self.role = role

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[np.ndarray, int]:
        scores, penalised = np.empty(len(prompts), np.float32), 0
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            try:
                value = self.fn(prompt, completion)
                problem = None if isinstance(value, int | float | np.number) and math.isfinite(value) else \
                    f"returned {value!r}, not a finite number"
            except Exception as error:  # a user's function may raise anything
                problem = f"raised {type(error).__name__}: {error}"
            if problem is None:
                scores[i] = value
                continue
            if self.on_error == "error":
                raise RewardError(f"{self.role} {self.name} {problem} for sample {i} (prompt {_snippet(prompt)}, "
                                  f"completion {_snippet(completion)}); fix the function, or set {self.section}.on_error: "
                                  f"penalty to score such samples {self.section}.penalty (counted)")
            scores[i], penalised = self.penalty, penalised + 1
        return scores, penalised


class ModelReward:
    """Scores from a reward model on ``prompt + completion + EOS`` under its own tokenizer,
    encoded as the reward-model phase encoded its pairs: an over-long prompt is cut from the
    left (its leading BOS / [CLS] kept) so the completion stays whole; ``max_prompt_length``
    caps the prompt; :meth:`truncations` counts both kinds of cut. A batch is right-padded to the smallest power of two
    (from 32) that holds its longest sequence, capped at ``max_length``: a few compiles, and
    short completions are not scored at the full ``max_length``. ``rows_sharding(rows)``: where
    a batch of that many rows goes (e.g. split over a mesh's batch axes, the model placed on
    the same mesh); default: the default device. ``prompt_format``: how the model's training
    rendered prompts (``rl.scorer_prompts``), each prompt text led back to its data row through
    ``prompts`` and rendered that way; ``None``: the prompt text as given."""

    def __init__(self, model, tokenizer, *, max_length: int, name: str = "reward_model",
                 rows_sharding: Callable[[int], jax.sharding.Sharding] | None = None,
                 max_prompt_length: int | None = None, prompt_format: str | None = None,
                 prompts: PromptTable | None = None):
        self.model, self.tokenizer, self.max_length, self.name = model, tokenizer, max_length, name
        self.rows_sharding = rows_sharding
        if prompt_format is not None and prompts is None:
            raise ValueError("a reward model with its own prompt format needs the PromptTable of the prompts it scores")
        self.prompt_format, self.prompts = prompt_format, prompts
        self.buckets = tuple(b for b in (2 ** k for k in range(5, max_length.bit_length())) if b < max_length) + (
            max_length,)
        self.encoder = Encoder(tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                               truncation="truncate", keep_responses=True,
                               chat_template=prompt_format == "chat_template")
        self.report = DataReport(f"{name} inputs")
        self._score = pure_jit(lambda model, ids, mask: model.sequence_scores(ids, mask)[:, 0])

    def truncations(self) -> dict[str, int]:
        """Inputs cut so far: prompts shortened, and completions (longer than the input alone) cut."""
        return {"reward_prompts_truncated": self.report.prompts_truncated,
                "reward_completions_truncated": self.report.responses_truncated}

    def encode(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        sequences = [self.encoder.encode(self._example(prompt, completion, f"sample {i}"), f"sample {i}",
                                         self.report).ids for i, (prompt, completion) in enumerate(zip(prompts, completions))]
        width = bucket_length(max(map(len, sequences)), self.buckets, "reward-model input length")
        ids = np.full((len(prompts), width), self.tokenizer.pad_token_id, np.int32)
        mask = np.zeros_like(ids)
        for i, sequence in enumerate(sequences):
            ids[i, : len(sequence)], mask[i, : len(sequence)] = sequence, 1
        return ids, mask

    def _example(self, prompt: str, completion: str, where: str) -> PromptCompletion:
        if self.prompt_format is None:
            return PromptCompletion(prompt, completion)
        try:
            return self.prompts.scorer_example(prompt, completion, self.prompt_format, f"{self.name}, {where}")
        except ValueError as error:
            raise RewardError(str(error)) from None

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[np.ndarray, int]:
        ids, mask = self.encode(prompts, completions)
        sharding = None if self.rows_sharding is None else self.rows_sharding(len(ids))
        ids, mask = to_global(ids, sharding), to_global(mask, sharding)
        return np.asarray(to_host(self._score(self.model, ids, mask)), np.float32), 0


class SumReward:
    """The weighted sum of sources: ``parts`` of ``(weight, source)`` or ``(weight, source,
    whiten)``, a whitened source's scores standardised over the batch (``(s - mean) / std``)
    before weighting. ``components`` holds each source's mean raw score of the last call
    (for logging each objective on its own)."""

    def __init__(self, parts: Sequence[tuple]):
        self.parts = [(part[0], part[1], part[2] if len(part) > 2 else False) for part in parts]
        self.name = " + ".join(f"{w:g} x {'whitened ' if white else ''}{s.name}" for w, s, white in self.parts)
        self.components: dict[str, float] = {}

    def truncations(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, source, _ in self.parts:
            for key, value in source.truncations().items():
                counts[key] = counts.get(key, 0) + value
        return counts

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[np.ndarray, int]:
        total, penalised = np.zeros(len(prompts), np.float32), 0
        for weight, source, whiten in self.parts:
            scores, n = source(prompts, completions)
            self.components[source.name] = float(np.mean(scores))
            if whiten:
                scores = (scores - scores.mean()) / (scores.std() + 1e-8)
            total, penalised = total + weight * scores, penalised + n
        return total, penalised


def import_object(spec: str, what: str, form: str):
    """The object ``spec`` = ``"package.module:name"`` names; ``RewardError`` naming ``what`` and
    the ``form`` it should take when the spec is malformed or cannot be imported."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"{what} {spec!r} should look like {form}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise RewardError(f"cannot load {what} {spec!r}: {error}. The form is {form}, a module importable from the "
                          "working directory or the Python path") from None


def load_function(spec: str, what: str = "reward function") -> Callable[[str, str], float]:
    """``"package.module:function"``, or ``"builtin:NAME"`` for a built-in task's reward;
    ``what`` names it in the ``RewardError`` raised when it cannot be imported or called."""
    if spec.startswith("builtin:"):
        from rlhf_jax import tasks

        try:
            return tasks.get(spec.removeprefix("builtin:")).reward
        except KeyError as error:
            raise RewardError(error.args[0]) from None
    fn = import_object(spec, what, "package.module:function or builtin:NAME")
    if not callable(fn):
        raise RewardError(f"{what} {spec!r} is a {type(fn).__name__}, not callable")
    return fn


def overlong_penalty(lengths_B: jax.Array, max_length: int, buffer: int) -> jax.Array:
    """DAPO's soft overlong punishment (Yu et al., 2025, eq. 13), ``[B]``: 0 for a completion
    of at most ``max_length - buffer`` tokens, falling linearly to -1 at ``max_length``:

        R(|y|) = 0                                   |y| <= L_max - L_cache
                 ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
                 -1                                   |y| > L_max

    with ``L_max = max_length`` and ``L_cache = buffer`` (tokens). Raises ``ValueError`` unless
    ``0 < buffer <= max_length``."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"the overlong buffer must be in (0, {max_length}] tokens, got {buffer}")
    lengths_B = lengths_B.astype(jnp.float32)
    return jnp.clip(((max_length - buffer) - lengths_B) / buffer, -1.0, 0.0)


def shape_scores(scores_B: jax.Array, stopped_B: jax.Array, *, missing_eos_penalty: float | None = None,
                 whiten: bool = False, clip: float | None = None,
                 overlong: jax.Array | None = None) -> jax.Array:
    """The score the policy optimises, in this order: ``overlong`` ``[B]`` added (e.g.
    :func:`overlong_penalty`), ``missing_eos_penalty`` subtracted from completions that hit
    ``max_new_tokens`` without a stop token (a nudge to finish; Huang et al., 2024, "The N+
    Implementation Details of RLHF with PPO"), whitened over the batch (``(s - mean) / std``),
    clipped to ``[-clip, clip]``. ``[B]`` float32."""
    scores_B = scores_B.astype(jnp.float32)
    if overlong is not None:
        scores_B = scores_B + overlong
    if missing_eos_penalty is not None:
        scores_B = jnp.where(stopped_B, scores_B, scores_B - missing_eos_penalty)
    if whiten:
        scores_B = (scores_B - jnp.mean(scores_B)) / (jnp.std(scores_B) + 1e-8)
    if clip is not None:
        scores_B = jnp.clip(scores_B, -clip, clip)
    return scores_B

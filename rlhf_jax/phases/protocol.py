"""What an offline phase hands :func:`rlhf_jax.phases.runner.run_phase` (which makes it a job of
the one run loop, ``phases.loop``):
its data formats, model head, config type, a loss, a held-out evaluation, and -- for a phase
with a frozen reference model (DPO) -- how the reference enters a batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np

from rlhf_jax.data.formats import formats_of
from rlhf_jax.phases.config import PhaseConfig


# A training command's place in the pipeline's chain (``rlhf_jax.pipeline``):
# - start: trains the pipeline's model (SFT); every later phase starts from its checkpoint;
# - reward: a reward model, the reward of the policy phases that score their own samples;
# - process_reward: a process reward model, the step rewards of the online phases with a critic;
# - policy: trains the policy from the starting checkpoint (DPO, an online algorithm, ...).
Role = Literal["start", "reward", "process_reward", "policy"]


@runtime_checkable
class Phase(Protocol):
    """An offline phase: SFT, reward model, DPO (``phases.PHASES``).

    ``loss_fn(config, reference)`` returns the step's ``loss_fn(model, micro_batch) ->
    (loss_sum, weight, metric_sums)`` (see ``train.step``); ``eval_rows(config, model,
    reference, batch)`` gives per-row arrays ``[B]`` of a held-out batch, and ``summarise``
    reduces the rows of the whole held-out set to the logged numbers. ``reference`` is the
    frozen reference model, or None for a phase without one."""

    name: ClassVar[str]  # the CLI sub-command and the metrics prefix
    summary: ClassVar[str]  # the CLI's one-line help
    checkpoint_fields: ClassVar[tuple[str, ...]]  # config fields naming checkpoints that must exist
    examples: ClassVar[tuple[type, ...]]  # the example types it trains on (data.formats); see trained_formats
    head: ClassVar[str]  # "lm" or "score"
    pipeline_role: ClassVar[Role]  # its place in the pipeline's chain
    config_cls: ClassVar[type[PhaseConfig]]
    samples: ClassVar[bool]  # whether the run ends by sampling held-out prompts

    def loss_fn(self, config: Any, reference: Any) -> Callable:
        """The step's ``loss_fn(model, micro_batch) -> (loss_sum, weight, metric_sums)``."""
        ...

    def eval_rows(self, config: Any, model: Any, reference: Any, batch: dict) -> dict:
        """Per-row arrays ``[B]`` of one held-out batch (jitted by the loop)."""
        ...

    def summarise(self, config: Any, rows: dict[str, np.ndarray]) -> dict:
        """The logged held-out numbers from the rows of the whole held-out set."""
        ...


def trained_formats(phase: Phase) -> tuple[str, ...]:
    """The ``data.format`` values ``phase`` trains on: every registered format whose rows are
    one of its ``examples`` (``data.formats.formats_of``), a plugin's included."""
    return formats_of(*phase.examples)


@runtime_checkable
class ReferencePhase(Phase, Protocol):
    """A phase with a frozen reference model whose outputs enter each batch: ``prepare(config,
    reference, batch)`` adds them (in the step's program, or once before training when
    ``precomputes_reference``); ``reference_path`` names a reference other than the starting
    model (None: the starting model itself, or a LoRA policy's base)."""

    def reference_path(self, config: Any) -> str | None:
        """The reference checkpoint, or None for the starting model (a LoRA policy's base)."""
        ...

    def precomputes_reference(self, config: Any) -> bool:
        """Whether the reference runs once over the data before training instead of every step."""
        ...

    def prepare_fingerprint(self, config: Any) -> dict:
        """The options ``prepare``'s values depend on (a cached pass is reused only for equal ones)."""
        ...

    def prepare(self, config: Any, reference: Any, batch: dict) -> dict:
        """``batch`` (``[M, b, ...]``) with the reference's outputs added."""
        ...

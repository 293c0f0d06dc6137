"""What an offline phase hands :func:`rlhf_jax.phases.runner.run_phase` (which makes it a job of
the one run loop, ``phases.loop``):
its data formats, model head, config type, a loss, a held-out evaluation, and -- for a phase
with a frozen reference model (DPO) -- how the reference enters a batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from rlhf_jax.phases.config import PhaseConfig


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
    formats: ClassVar[tuple[str, ...]]  # the data.format values it reads
    head: ClassVar[str]  # "lm" or "score"
    pipeline_role: ClassVar[str]  # its place in the pipeline's chain: a phases.commands.Role
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

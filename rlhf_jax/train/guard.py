"""Stopping a run that has diverged: non-finite updates are skipped (``train.step``), and this
many of them in a row mean the run cannot recover by itself."""

from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """The run stopped because its updates kept failing; the message says where and what to do."""


def check_nonfinite_streak(streak: int, limit: int, *, step: int, unit: str) -> None:
    """Raise :class:`TrainingDiverged` when ``streak`` (the state's ``nonfinite_streak``: the
    latest updates in a row whose loss or gradients were not finite, none applied) reaches
    ``limit`` (``train.max_nonfinite``). The run loop finishes the checkpoint in flight and
    adds the one that restores to the message."""
    if streak >= limit:
        raise TrainingDiverged(
            f"{streak} updates in a row had a non-finite loss or gradients (none applied) at {unit} {step}; the run "
            f"stops (train.max_nonfinite={limit}). Lower the learning rate, set train.optimizer.clip_norm, or check "
            "the data for empty or extreme rows.")

"""Process-reward-model phase: a score head trained on step-labelled solutions (data format
``steps``); held-out step accuracy and loss beside the majority-label baseline."""

from __future__ import annotations

import numpy as np

from rlhf_jax.data.formats import Steps
from rlhf_jax.phases.config import PRMConfig
from rlhf_jax.train.prm import prm_loss_sums, step_rows


class PRMPhase:
    name = "prm"
    summary = "a process reward model: a score at each reasoning step's end (Lightman et al., 2023)"
    checkpoint_fields = ("model.path",)
    examples = (Steps,)  # the rows it trains on: every data.format that yields them
    head = "score"
    pipeline_role = "process_reward"  # its place in the pipeline (phases.commands.Role)
    config_cls = PRMConfig
    samples = False

    def loss_fn(self, config: PRMConfig, reference):
        return prm_loss_sums

    def eval_rows(self, config: PRMConfig, model, reference, batch) -> dict:
        """Per solution: its steps, those predicted right, the summed loss, those labelled correct."""
        return step_rows(model, batch)

    def summarise(self, config: PRMConfig, rows: dict[str, np.ndarray]) -> dict:
        """Step accuracy and mean loss over every held-out step, and the accuracy of always
        answering the held-out steps' majority label: a PRM that does not beat it has learnt
        nothing about the steps."""
        steps = max(float(rows["steps"].sum()), 1.0)
        positive = float(rows["positive"].sum()) / steps
        return {"step_accuracy": float(rows["correct"].sum()) / steps, "loss": float(rows["loss"].sum()) / steps,
                "majority_baseline_accuracy": max(positive, 1.0 - positive), "steps": float(rows["steps"].sum())}

"""DPO phase (and its IPO / hinge / robust variants): the reference model's log-probs are
computed on the fly for each batch, in the same compiled program as the step
(``train.jit_train_step``), or precomputed once for every pair and cached
(``dpo.reference_logps: precompute``); held-out implicit-reward accuracy and margins."""

from __future__ import annotations

import functools

import numpy as np

from rlhf_jax.data.formats import Preference
from rlhf_jax.losses import dpo_loss
from rlhf_jax.phases.config import DPOConfig
from rlhf_jax.train.dpo import add_reference_logps, dpo_loss_sums, response_logps


class DPOPhase:
    name = "dpo"
    summary = "direct preference optimisation (and IPO / hinge / robust)"
    checkpoint_fields = ("model.path", "dpo.reference")
    examples = (Preference,)  # the rows it trains on: every data.format that yields them
    head = "lm"
    pipeline_role = "policy"  # its place in the pipeline (phases.commands.Role)
    config_cls = DPOConfig
    samples = True

    def reference_path(self, config: DPOConfig) -> str | None:
        return config.dpo.reference

    def precomputes_reference(self, config: DPOConfig) -> bool:
        return config.dpo.reference_logps == "precompute"

    def prepare_fingerprint(self, config: DPOConfig) -> dict:
        return {"average_logps": config.dpo.average_logps}

    def loss_fn(self, config: DPOConfig, reference):
        return functools.partial(dpo_loss_sums, beta=config.dpo.beta, loss_type=config.dpo.loss_type,
                                 label_smoothing=config.dpo.label_smoothing, vocab_chunk=config.train.vocab_chunk,
                                 average=config.dpo.average_logps)

    def prepare(self, config: DPOConfig, reference, batch):
        """Add the reference log-probs to a ``[M, b, ...]`` batch."""
        return add_reference_logps(reference, batch, vocab_chunk=config.train.vocab_chunk,
                                   average=config.dpo.average_logps)

    def eval_rows(self, config: DPOConfig, model, reference, batch) -> dict:
        logps = functools.partial(response_logps, batch=batch, vocab_chunk=config.train.vocab_chunk,
                                  average=config.dpo.average_logps)
        logps_BK = logps(model)
        reference_BK = batch.reference_logps_BK  # precomputed, else None
        if reference_BK is None:
            reference_BK = logps(reference)
        return {"chosen": logps_BK[:, 0], "rejected": logps_BK[:, 1], "ref_chosen": reference_BK[:, 0],
                "ref_rejected": reference_BK[:, 1]}

    def summarise(self, config: DPOConfig, rows: dict[str, np.ndarray]) -> dict:
        loss, aux = dpo_loss(rows["chosen"], rows["rejected"], rows["ref_chosen"], rows["ref_rejected"],
                             beta=config.dpo.beta, loss_type=config.dpo.loss_type,
                             label_smoothing=config.dpo.label_smoothing)
        return {"loss": float(loss), "reward_accuracy": float(aux.reward_accuracy),
                "reward_margin": float(aux.reward_margin), "pairs": float(len(rows["chosen"]))}

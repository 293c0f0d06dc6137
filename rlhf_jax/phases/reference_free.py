"""SimPO and ORPO phases: preference optimisation with no reference model in memory
(``train.reference_free``); held-out implicit-reward accuracy, margin and loss."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.formats import Preference
from rlhf_jax.losses import orpo_loss, simpo_loss
from rlhf_jax.phases.config import ORPOConfig, SimPOConfig
from rlhf_jax.train.dpo import response_logps
from rlhf_jax.train.reference_free import orpo_loss_sums, simpo_loss_sums


class _ReferenceFreePhase:
    """What SimPO and ORPO share: pair data, a policy alone, held-out log-probs and lengths."""

    examples = (Preference,)  # the rows it trains on: every data.format that yields them
    head = "lm"
    pipeline_role = "policy"  # its place in the pipeline (phases.commands.Role)
    samples = True
    checkpoint_fields = ("model.path",)

    def eval_rows(self, config, model, reference, batch) -> dict:
        """Per pair: the chosen and rejected responses' summed log-probs and token counts."""
        logps_BK = response_logps(model, batch, vocab_chunk=config.train.vocab_chunk)
        lengths_BK = jnp.maximum(batch.response_lengths_BK(), 1).astype(logps_BK.dtype)
        return {"chosen": logps_BK[:, 0], "rejected": logps_BK[:, 1], "chosen_length": lengths_BK[:, 0],
                "rejected_length": lengths_BK[:, 1]}

    def summarise(self, config, rows: dict[str, np.ndarray]) -> dict:
        """The pair means of the per-pair loss and its diagnostics, as the training step weighs them."""
        loss_B, aux = self.pair_losses(config, *(jnp.asarray(rows[k]) for k in
                                                 ("chosen", "rejected", "chosen_length", "rejected_length")))
        return {"loss": float(loss_B.mean())} | {k: float(v.mean()) for k, v in aux._asdict().items()} | {
            "pairs": float(len(rows["chosen"]))}


class SimPOPhase(_ReferenceFreePhase):
    name = "simpo"
    summary = "SimPO: length-normalised preference optimisation with a target margin, no reference model"
    config_cls = SimPOConfig

    def loss_fn(self, config: SimPOConfig, reference):
        o = config.simpo
        return functools.partial(simpo_loss_sums, beta=o.beta, gamma=o.gamma, label_smoothing=o.label_smoothing,
                                 vocab_chunk=config.train.vocab_chunk)

    def pair_losses(self, config: SimPOConfig, *logps_and_lengths):
        """Per-pair SimPO loss and diagnostics (``losses.simpo_loss``)."""
        o = config.simpo
        return simpo_loss(*logps_and_lengths, beta=o.beta, gamma=o.gamma, label_smoothing=o.label_smoothing,
                          reduction="none")


class ORPOPhase(_ReferenceFreePhase):
    name = "orpo"
    summary = "ORPO: SFT on the chosen responses plus an odds-ratio preference term, no reference model"
    config_cls = ORPOConfig

    def loss_fn(self, config: ORPOConfig, reference):
        return functools.partial(orpo_loss_sums, lam=config.orpo.lam, vocab_chunk=config.train.vocab_chunk)

    def pair_losses(self, config: ORPOConfig, *logps_and_lengths):
        """Per-pair ORPO loss and diagnostics (``losses.orpo_loss``)."""
        return orpo_loss(*logps_and_lengths, lam=config.orpo.lam, reduction="none")

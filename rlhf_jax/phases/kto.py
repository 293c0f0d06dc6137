"""KTO phase (Ethayarajh et al., 2024): unpaired desirable / undesirable examples against a
frozen reference (the starting policy unless ``kto.reference`` names one), whose log-probs are
computed in the step's program or precomputed once (``kto.reference_logps``); held-out loss,
reference point and the implicit rewards of each label."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.formats import Unpaired
from rlhf_jax.losses import kto_loss, kto_reference_point
from rlhf_jax.phases.config import KTOConfig
from rlhf_jax.train.kto import add_reference_logps, completion_logps, kto_loss_sums


class KTOPhase:
    name = "kto"
    summary = "KTO: unpaired good / bad examples against a frozen reference (Ethayarajh et al., 2024)"
    checkpoint_fields = ("model.path", "kto.reference")
    examples = (Unpaired,)  # the rows it trains on: every data.format that yields them
    head = "lm"
    pipeline_role = "policy"  # its place in the pipeline (phases.commands.Role)
    config_cls = KTOConfig
    samples = True

    def reference_path(self, config: KTOConfig) -> str | None:
        return config.kto.reference

    def precomputes_reference(self, config: KTOConfig) -> bool:
        return config.kto.reference_logps == "precompute"

    def prepare_fingerprint(self, config: KTOConfig) -> dict:
        return {}

    def loss_fn(self, config: KTOConfig, reference):
        o = config.kto
        return functools.partial(kto_loss_sums, beta=o.beta, desirable_weight=o.desirable_weight,
                                 undesirable_weight=o.undesirable_weight, vocab_chunk=config.train.vocab_chunk)

    def prepare(self, config: KTOConfig, reference, batch):
        """Add the reference's completion log-probs to a ``[M, b, ...]`` batch."""
        return add_reference_logps(reference, batch, vocab_chunk=config.train.vocab_chunk)

    def eval_rows(self, config: KTOConfig, model, reference, batch) -> dict:
        """Per example: policy and reference log-probs of its completion and of its mismatched row."""
        logps_BK = completion_logps(model, batch, vocab_chunk=config.train.vocab_chunk)
        reference_BK = batch.reference_logps_BK  # precomputed, else None
        if reference_BK is None:
            reference_BK = completion_logps(reference, batch, vocab_chunk=config.train.vocab_chunk)
        return {"policy": logps_BK[:, 0], "reference": reference_BK[:, 0], "policy_mismatched": logps_BK[:, 1],
                "reference_mismatched": reference_BK[:, 1], "desirable": batch.desirable_B}

    def summarise(self, config: KTOConfig, rows: dict[str, np.ndarray]) -> dict:
        """The held-out loss with one reference point over all held-out mismatched rows."""
        o, rows = config.kto, {k: jnp.asarray(v) for k, v in rows.items()}
        point = kto_reference_point(rows["policy_mismatched"], rows["reference_mismatched"])
        loss, aux = kto_loss(rows["policy"], rows["reference"], rows["desirable"], point, beta=o.beta,
                             desirable_weight=o.desirable_weight, undesirable_weight=o.undesirable_weight)
        return {"loss": float(loss), "kl": float(point), "desirable_reward": float(aux.desirable_reward),
                "undesirable_reward": float(aux.undesirable_reward), "examples": float(len(rows["policy"]))}

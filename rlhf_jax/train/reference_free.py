"""The preference objectives without a reference model: SimPO (Meng et al., 2024) and ORPO
(Hong et al., 2024). Each is the policy's forward (``train.dpo.response_logps``: summed
response log-probs ``[b, 2]``, chosen then rejected) and the loss core's per-pair loss,
summed; lengths are each response's tokens (``PairBatch.response_lengths_BK``).

Batch: :class:`rlhf_jax.data.Pairs` or :class:`rlhf_jax.data.SharedPromptPairs`."""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.data.batches import PairBatch
from rlhf_jax.losses import orpo_loss, simpo_loss
from rlhf_jax.models.heads import CausalLM
from rlhf_jax.train.dpo import response_logps


def _logps_and_lengths(model: CausalLM, batch: PairBatch, vocab_chunk: int | None):
    logps_BK = response_logps(model, batch, vocab_chunk=vocab_chunk)
    return logps_BK, jnp.maximum(batch.response_lengths_BK(), 1).astype(logps_BK.dtype)


def simpo_loss_sums(model: CausalLM, batch: PairBatch, *, beta: float = 2.0, gamma: float = 1.0,
                    label_smoothing: float = 0.0, vocab_chunk: int | None = None):
    """``(loss sum, pairs, metric sums)`` of SimPO (eq. 6): the length-normalised margin
    ``beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x)`` against the target margin
    ``gamma``, per pair (``losses.simpo_loss``), summed; metrics: reward accuracy and margin."""
    logps_BK, lengths_BK = _logps_and_lengths(model, batch, vocab_chunk)
    loss_B, aux = simpo_loss(logps_BK[:, 0], logps_BK[:, 1], lengths_BK[:, 0], lengths_BK[:, 1], beta=beta,
                             gamma=gamma, label_smoothing=label_smoothing, reduction="none")
    n = jnp.asarray(logps_BK.shape[0], jnp.float32)
    return jnp.sum(loss_B), n, {"reward_accuracy": jnp.sum(aux.reward_accuracy),
                                "reward_margin": jnp.sum(aux.reward_margin)}


def orpo_loss_sums(model: CausalLM, batch: PairBatch, *, lam: float = 0.1, vocab_chunk: int | None = None):
    """``(loss sum, pairs, metric sums)`` of ORPO (eqs. 6-7): each pair's chosen-response NLL
    (its token mean) plus ``lam`` times the odds-ratio loss (``losses.orpo_loss``,
    ``reduction="none"``), summed; metrics: the NLL, the odds-ratio loss, the log odds ratio
    and the reward accuracy."""
    logps_BK, lengths_BK = _logps_and_lengths(model, batch, vocab_chunk)
    loss_B, aux = orpo_loss(logps_BK[:, 0], logps_BK[:, 1], lengths_BK[:, 0], lengths_BK[:, 1], lam=lam,
                            reduction="none")
    n = jnp.asarray(logps_BK.shape[0], jnp.float32)
    return jnp.sum(loss_B), n, {name: jnp.sum(value) for name, value in aux._asdict().items()}

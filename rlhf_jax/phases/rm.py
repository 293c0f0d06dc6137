"""Reward-model phase: Bradley-Terry on pairs (with optional margins) or a K-wise ranking
loss on rankings; held-out pairwise accuracy, margin and calibration."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.formats import Preference, Ranking
from rlhf_jax.data.batches import RankedBatch
from rlhf_jax.phases.config import RMConfig
from rlhf_jax.train.rm import pair_scores, ranking_loss_sums, ranking_scores, rm_loss_sums

CALIBRATION_BINS = 10


def expected_calibration_error(delta: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """ECE (Guo et al., 2017) of the Bradley-Terry probability ``sigmoid(r_c - r_r)``: pairs are
    binned by confidence ``max(p, 1 - p)``; ECE = sum_bins (n_bin / N) |accuracy - confidence|."""
    p = 1.0 / (1.0 + np.exp(-delta))
    confidence, correct = np.maximum(p, 1 - p), (p > 0.5).astype(float)
    which = np.minimum(((confidence - 0.5) * 2 * bins).astype(int), bins - 1)
    return float(sum(abs(correct[which == i].mean() - confidence[which == i].mean()) * (which == i).mean()
                     for i in range(bins) if (which == i).any()))


def length_baseline_accuracy(length_gap: np.ndarray) -> float:
    """The held-out accuracy of the best length-only rule -- "the longer response is chosen" or
    "the shorter one is" (ties half right), whichever scores higher on these pairs: a reward
    model that does not beat it has learnt no more than length (Singhal et al., 2023)."""
    gap = np.asarray(length_gap).reshape(-1)
    longer = float(np.mean((gap > 0) + 0.5 * (gap == 0)))
    return max(longer, 1.0 - longer)


class RMPhase:
    name = "rm"
    summary = "a Bradley-Terry reward model on comparisons"
    checkpoint_fields = ("model.path",)
    examples = (Preference, Ranking)  # the rows it trains on: every data.format that yields them
    head = "score"
    pipeline_role = "reward"  # its place in the pipeline (phases.commands.Role)
    config_cls = RMConfig
    samples = False

    def loss_fn(self, config: RMConfig, reference):
        pairwise = functools.partial(rm_loss_sums, center_coef=config.rm.center_coef)
        ranked = functools.partial(ranking_loss_sums, kind=config.rm.ranking_loss)
        return lambda model, batch: ranked(model, batch) if isinstance(batch, RankedBatch) else pairwise(model, batch)

    def eval_rows(self, config: RMConfig, model, reference, batch) -> dict:
        """Per comparison: ``r_better - r_worse`` (every ordered pair of a ranking); for pairs
        also ``length_gap``, the chosen response's tokens minus the rejected one's."""
        if not isinstance(batch, RankedBatch):
            chosen_B, rejected_B = pair_scores(model, batch)
            return {"delta": chosen_B - rejected_B, "length_gap": batch.length_gap_B()}
        scores_BK = ranking_scores(model, batch)
        k = scores_BK.shape[1]
        better, worse = np.triu_indices(k, 1)
        valid = batch.valid_BK[:, better] & batch.valid_BK[:, worse]
        return {"delta": jnp.where(valid, scores_BK[:, better] - scores_BK[:, worse], jnp.nan)}

    def summarise(self, config: RMConfig, rows: dict[str, np.ndarray]) -> dict:
        delta = rows["delta"].reshape(-1)
        delta = delta[np.isfinite(delta)]
        length = {} if "length_gap" not in rows else {"length_baseline_accuracy": length_baseline_accuracy(
            rows["length_gap"])}
        return {"accuracy": float((delta > 0).mean()), "margin": float(delta.mean()),
                "loss": float(np.logaddexp(0.0, -delta).mean()), "calibration_error": expected_calibration_error(delta),
                "pairs": float(delta.size)} | length

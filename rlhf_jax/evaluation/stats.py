"""Statistics of a head-to-head evaluation: the win rate with its confidence interval, the win
rate among length-matched pairs (length is the classic confound of reward-model judges:
Singhal et al., 2023, "A Long Way to Go: Investigating Length Correlations in RLHF";
Dubois et al., 2024, "Length-Controlled AlpacaEval"), the accuracy of both sides and its
paired gain when the judge is a 0/1 checker (a verifiable reward), and the KL estimate. Pure
NumPy."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class WinRate(NamedTuple):
    rate: float  # wins + ties / 2, over n
    low: float  # the confidence interval's bounds
    high: float
    n: int  # comparisons

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {prefix: self.rate, f"{prefix}_low": self.low, f"{prefix}_high": self.high, f"{prefix}_n": float(self.n)}


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (Wilson, 1927) of a proportion ``successes / n``:

        (p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)

    ``z`` = 1.96 for 95%. Unlike the normal interval it stays inside [0, 1] and does not
    collapse at p = 0 or 1. Raises ``ValueError`` for ``n < 1``."""
    if n < 1:
        raise ValueError("a win rate needs at least one comparison")
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    denominator = 1 + z * z / n
    return (centre - spread) / denominator, (centre + spread) / denominator


def win_rate(policy_B: np.ndarray, baseline_B: np.ndarray) -> WinRate:
    """How often ``policy``'s judge score beats ``baseline``'s on the same prompt, ``[B]`` each:
    a win counts 1, a tie 1/2 (ties count half, as in AlpacaEval); 95% Wilson interval."""
    policy_B, baseline_B = np.asarray(policy_B, np.float64), np.asarray(baseline_B, np.float64)
    if policy_B.shape != baseline_B.shape:
        raise ValueError(f"{policy_B.shape} policy scores against {baseline_B.shape} baseline scores")
    wins = float(np.sum(policy_B > baseline_B) + 0.5 * np.sum(policy_B == baseline_B))
    n = policy_B.size
    return WinRate(wins / n, *wilson_interval(wins, n), n) if n else WinRate(math.nan, math.nan, math.nan, 0)


def matched_length_win_rate(policy_B, baseline_B, policy_length_B, baseline_length_B, tolerance: float) -> WinRate:
    """:func:`win_rate` over the prompts whose two completions have about the same length:
    ``|l_policy - l_baseline| <= tolerance * max(l_policy, l_baseline)`` (tokens), so a judge
    that prefers longer text cannot make the win. ``n`` says how many pairs matched."""
    lp, lb = np.asarray(policy_length_B, np.float64), np.asarray(baseline_length_B, np.float64)
    matched = np.abs(lp - lb) <= tolerance * np.maximum(lp, lb)
    return win_rate(np.asarray(policy_B)[matched], np.asarray(baseline_B)[matched])


def is_binary(*scores_B: np.ndarray) -> bool:
    """Whether every score is 0 or 1 (a verifiable reward's checker: exact match)."""
    return all(np.isin(np.asarray(s), (0.0, 1.0)).all() for s in scores_B)


def accuracy_gain(policy_B: np.ndarray, baseline_B: np.ndarray, z: float = 1.959964) -> dict[str, float]:
    """Accuracies of two sides scored 0/1 on the same ``B`` prompts, each with its Wilson
    interval (``accuracy_policy``, ``accuracy_baseline``, ``_low`` / ``_high`` / ``_n``), and
    the paired gain ``accuracy_gain`` = mean of ``d_i = policy_i - baseline_i`` with the
    normal interval ``mean(d) +/- z sd(d) / sqrt(B)`` of paired differences (the interval
    McNemar's test inverts; Agresti, "Categorical Data Analysis", 10.1). Raises
    ``ValueError`` for scores other than 0 and 1 or sides of different shapes."""
    policy_B, baseline_B = np.asarray(policy_B, np.float64), np.asarray(baseline_B, np.float64)
    if policy_B.shape != baseline_B.shape or not is_binary(policy_B, baseline_B):
        raise ValueError("accuracy needs 0/1 scores of both sides on the same prompts")
    n = policy_B.size
    result = {}
    for name, scores in (("accuracy_policy", policy_B), ("accuracy_baseline", baseline_B)):
        result |= WinRate(float(scores.mean()), *wilson_interval(float(scores.sum()), n), n).as_dict(name)
    difference_B = policy_B - baseline_B
    spread = z * difference_B.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
    gain = float(difference_B.mean())
    return result | {"accuracy_gain": gain, "accuracy_gain_low": gain - spread, "accuracy_gain_high": gain + spread}


def kl_estimate(policy_logp_BN: np.ndarray, baseline_logp_BN: np.ndarray, mask_BN: np.ndarray) -> tuple[float, float]:
    """``(mean, standard error)`` over prompts of the sequence KL(policy || baseline), each
    prompt's estimate ``sum_t log pi(y_t) - log pi_base(y_t)`` over the policy's own sample
    ``y`` (the unbiased Monte-Carlo "k1" estimator, Schulman, 2020, "Approximating KL
    Divergence"), in nats per sequence."""
    per_sequence_B = np.sum((np.asarray(policy_logp_BN) - np.asarray(baseline_logp_BN)) * mask_BN, axis=1)
    n = per_sequence_B.size
    stderr = float(per_sequence_B.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return float(per_sequence_B.mean()), stderr

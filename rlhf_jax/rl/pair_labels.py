"""Preference pairs from scored samples: the labelling rules of iterative (online) DPO.

Given ``K`` scored completions of each prompt, a rule picks (chosen, rejected) pairs:

- ``best_worst``: the highest- against the lowest-scored completion of each prompt (Xu et
  al., 2023, "Some things are more CRINGE than others"; Xiong et al., 2024, "Iterative
  Preference Learning from Human Feedback", sec. 5), kept when they differ by more than
  ``margin``;
- ``all_pairs``: every pair of a prompt's completions whose scores differ by more than
  ``margin``, the higher chosen (Yuan et al., 2024, "Self-Rewarding Language Models", build
  pairs from a prompt's candidates by their scores).

Ties are never a pair: a pair teaches a preference only when the labeller has one. A NaN
score marks a sample that cannot be paired (e.g. an empty completion): it is left out."""

from __future__ import annotations

from typing import Literal

import numpy as np

PairRule = Literal["best_worst", "all_pairs"]


def label_pairs(scores_PK: np.ndarray, rule: PairRule, margin: float = 0.0) -> list[tuple[int, int, int]]:
    """``[(prompt, chosen sample, rejected sample), ...]`` from the scores ``[P, K]`` of ``K``
    completions of each of ``P`` prompts, by ``rule`` (module docstring); the first of equal
    scores wins the best (and the last the worst) place. Raises ``ValueError`` for an unknown
    rule, a negative margin or fewer than two samples."""
    scores_PK = np.asarray(scores_PK, np.float64)
    if scores_PK.ndim != 2 or scores_PK.shape[1] < 2:
        raise ValueError(f"scores of shape {scores_PK.shape}: need [prompts, samples >= 2]")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if rule not in ("best_worst", "all_pairs"):
        raise ValueError(f"unknown pair rule {rule!r}; choose best_worst or all_pairs")
    pairs = []
    for p, scores_K in enumerate(scores_PK):
        valid = [k for k in range(len(scores_K)) if not np.isnan(scores_K[k])]
        if rule == "best_worst" and valid:
            best = max(valid, key=lambda k: (scores_K[k], -k))  # the first of equal scores
            worst = min(valid, key=lambda k: (scores_K[k], -k))  # the last of equal scores
            candidates = [(best, worst)]
        else:
            candidates = [(i, j) if scores_K[i] > scores_K[j] else (j, i) for n, i in enumerate(valid)
                          for j in valid[n + 1:]]
        pairs += [(p, i, j) for i, j in candidates if scores_K[i] - scores_K[j] > margin]
    return pairs

"""Iterative DPO's labelling rules (``rl.pair_labels``) by hand: best against worst, all pairs,
the margin, and ties never a pair."""

import numpy as np
import pytest

from rlhf_jax.rl.pair_labels import label_pairs

SCORES = np.asarray([[0.2, 0.9, 0.5],    # best 1, worst 0
                     [0.4, 0.4, 0.4],    # all tied: no pair
                     [0.7, 0.1, 0.7]])   # best 0 (the first of the tie), worst 1


def test_best_against_worst():
    assert label_pairs(SCORES, "best_worst") == [(0, 1, 0), (2, 0, 1)]
    assert label_pairs(SCORES, "best_worst", margin=0.65) == [(0, 1, 0)]  # gaps 0.7 > 0.65, 0.6 is not


def test_all_pairs_above_the_margin_higher_chosen():
    assert label_pairs(SCORES, "all_pairs") == [(0, 1, 0), (0, 2, 0), (0, 1, 2), (2, 0, 1), (2, 2, 1)]
    assert label_pairs(SCORES, "all_pairs", margin=0.35) == [(0, 1, 0), (0, 1, 2), (2, 0, 1), (2, 2, 1)]


def test_nan_scores_are_left_out():
    scores = np.asarray([[0.2, np.nan, 0.5, 0.1], [np.nan, 0.3, np.nan, np.nan]])
    assert label_pairs(scores, "best_worst") == [(0, 2, 3)]  # the second prompt has one pairable sample
    assert label_pairs(scores, "all_pairs") == [(0, 2, 0), (0, 0, 3), (0, 2, 3)]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="samples >= 2"):
        label_pairs(np.zeros((3, 1)), "best_worst")
    with pytest.raises(ValueError, match="margin"):
        label_pairs(SCORES, "best_worst", margin=-1)
    with pytest.raises(ValueError, match="unknown pair rule"):
        label_pairs(SCORES, "best_vs_median")

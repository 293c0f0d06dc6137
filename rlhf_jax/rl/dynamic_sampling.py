"""DAPO's dynamic sampling (Yu et al., 2025, sec. 3.2, eq. 11): a group whose completions all
get the same score has zero group-relative advantage and teaches nothing, so such groups are
dropped and more prompts are sampled until the batch holds ``groups`` groups with
``0 < |{o_i : o_i correct}| < G``; here, groups whose scores are not all equal -- the scores
as the advantage sees them before batch whitening (``Draw.compared_B``: the raw score with
the per-sample shaping, e.g. a missing-EOS penalty).

The policy when the rounds run out (DAPO samples on without bound): after ``max_rounds``
draws the batch is completed with the dropped groups, in draw order, and their number is
reported (``uninformative_groups_kept``) -- the batch keeps its shape, so the update keeps
its compiled program."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from rlhf_jax.rollout import Rollout, concatenate_rollouts


@dataclasses.dataclass(frozen=True)
class Draw:
    """One round of sampling and scoring: the rollout of some prompts' groups, their prompt and
    completion texts and raw scores ``[B]`` (sample-major within a prompt), penalised count."""

    rollout: Rollout
    texts: list[str]
    completions: list[str]
    scores_B: np.ndarray
    penalised: int
    # what the filter compares, ``[B]``: the scores as the advantage will see them before batch
    # whitening (e.g. with a missing-EOS penalty); None: ``scores_B``
    compared_B: np.ndarray | None = None


def informative_groups(scores_B: np.ndarray, group_size: int) -> np.ndarray:
    """``[B // group_size]`` bool: the groups whose scores are not all equal. Raises
    ``ValueError`` when ``group_size`` does not divide the batch."""
    if len(scores_B) % group_size:
        raise ValueError(f"{len(scores_B)} scores do not form groups of {group_size}")
    scores_GN = np.asarray(scores_B).reshape(-1, group_size)
    return scores_GN.max(axis=1) > scores_GN.min(axis=1)


def _select(draws: list[Draw], chosen: list[tuple[int, int]], group_size: int, pad_token_id: int) -> Draw:
    """The rows of the ``chosen`` (draw, group) pairs, in draw order, as one host-side draw."""
    offsets = np.cumsum([0] + [len(draw.scores_B) for draw in draws])
    rows = [(d, g * group_size + k) for d, g in sorted(chosen) for k in range(group_size)]
    index = np.asarray([offsets[d] + row for d, row in rows])
    rollout = jax.tree.map(lambda a: a[index], concatenate_rollouts([draw.rollout for draw in draws], pad_token_id))
    return Draw(rollout, [draws[d].texts[row] for d, row in rows], [draws[d].completions[row] for d, row in rows],
                np.concatenate([draw.scores_B for draw in draws])[index], sum(draw.penalised for draw in draws))


def dynamic_sample(draw: Callable[[int], Draw], groups: int, group_size: int, max_rounds: int,
                   pad_token_id: int) -> tuple[Draw, dict]:
    """Call ``draw(round)`` for round 0, 1, ... until ``groups`` informative groups are in hand
    or ``max_rounds`` rounds are drawn; return the first ``groups`` of them (completed with
    uninformative ones when short, module docstring) as one host-side draw, and the counts:
    ``sampling_rounds``, ``groups_dropped`` (uninformative groups drawn and not used),
    ``uninformative_groups_kept``. Raises ``ValueError`` for ``max_rounds < 1``."""
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    draws: list[Draw] = []
    kept: list[tuple[int, int]] = []
    spare: list[tuple[int, int]] = []
    while len(draws) < max_rounds and len(kept) < groups:
        d = len(draws)
        draws.append(draw(d))
        last = draws[-1]
        informative = informative_groups(last.scores_B if last.compared_B is None else last.compared_B, group_size)
        kept += [(d, int(g)) for g in np.flatnonzero(informative)]
        spare += [(d, int(g)) for g in np.flatnonzero(~informative)]
    short = max(0, groups - len(kept))
    chosen = kept[:groups] + spare[:short]
    stats = {"sampling_rounds": len(draws), "groups_dropped": len(spare) - short, "uninformative_groups_kept": short}
    return _select(draws, chosen, group_size, pad_token_id), stats

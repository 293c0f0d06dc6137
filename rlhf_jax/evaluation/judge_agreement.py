"""``rlhf-jax judge``: how far to trust an AI judge before it labels anything. The judge
(:mod:`rlhf_jax.rl.judge`) reads labelled preference pairs -- human labels, or a built-in
task's gold labels -- in both orders, and its verdicts are compared with the labels: its
agreement (the "AI labeler alignment" of Lee et al., 2023, "RLAIF", sec. 4.4) with a 95%
Wilson interval, the agreement of a verdict asked in one order only, and its position bias,
how often a one-order verdict picks response A (1/2 for an unbiased judge; Zheng et al.,
2023, "Judging LLM-as-a-Judge", sec. 3.3). The numbers go to ``output`` (JSON) and each
pair's verdict probabilities beside it (``*_pairs.jsonl``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from rlhf_jax.data import DataConfig, DataError
from rlhf_jax.data.dataset import read_split
from rlhf_jax.data.formats import Preference, formats_of
from rlhf_jax.evaluation.stats import win_rate
from rlhf_jax.outputs import check_writable
from rlhf_jax.phases.audit import refuse_missing_checkpoints
from rlhf_jax.phases.console import log
from rlhf_jax.phases.label import build_judge
from rlhf_jax.phases.loop import RunResult
from rlhf_jax.phases.online_config import AIJudgeConfig

@dataclasses.dataclass(frozen=True)
class JudgeAgreementConfig:
    """The judge ``judge`` checked on the pairs of ``data``: its held-out pairs when it holds
    some out (``data.eval_size`` picks the same pairs a reward model's run with the same data
    section holds out, so the two can be compared; or ``data.eval_source``), else every pair
    that ``data.split`` / ``data.limit`` choose."""

    data: DataConfig  # labelled pairs, format preference or hh_rlhf
    judge: AIJudgeConfig
    output: str = "runs/judge/agreement.json"

    def __post_init__(self):
        pair_formats = formats_of(Preference)
        if self.data.format not in pair_formats:
            raise ValueError(f"data.format={self.data.format!r}: the judge is checked against labelled pairs; "
                             f"give a file of format {' or '.join(pair_formats)}")
        if Path(self.output).suffix != ".json":
            raise ValueError(f"output={self.output}: the agreement is written as JSON; give a path ending in .json")


def judge_agreement(forward_B: np.ndarray, backward_B: np.ndarray) -> dict[str, float]:
    """How a judge's verdicts on ``B`` labelled pairs agree with the labels, from its two
    one-order verdict probabilities (:meth:`rlhf_jax.rl.judge.PairwiseJudge.both_orders`
    with the chosen response first): ``forward_B`` = P(A) with the chosen response shown as
    A, ``backward_B`` = P(A) with the rejected one shown as A. Returned:

    - ``agreement`` (with ``agreement_low``, ``agreement_high``, ``agreement_n``): the share
      of pairs whose both-orders probability of the chosen response, ``p = (forward + 1 -
      backward) / 2``, is above 1/2 (exactly 1/2 counts half), and its 95% Wilson interval;
    - ``single_order_agreement`` (with its interval): the same for each of the ``2B``
      one-order verdicts on its own;
    - ``first_position_rate``: the share of those ``2B`` verdicts that pick response A;
    - ``chosen_probability_mean``: the mean of ``p``.

    Raises ``ValueError`` for no pairs or arrays of different shapes."""
    forward_B, backward_B = np.asarray(forward_B, np.float64), np.asarray(backward_B, np.float64)
    if forward_B.shape != backward_B.shape or forward_B.ndim != 1 or not forward_B.size:
        raise ValueError(f"judge_agreement needs two [B] arrays of verdicts, B >= 1: got {forward_B.shape} "
                         f"and {backward_B.shape}")
    chosen_B = (forward_B + 1.0 - backward_B) / 2.0
    one_order_2B = np.concatenate([forward_B, 1.0 - backward_B])  # P(chosen) from each order alone
    picks_a_2B = np.concatenate([forward_B, backward_B])
    return {**win_rate(chosen_B, 1.0 - chosen_B).as_dict("agreement"),
            **win_rate(one_order_2B, 1.0 - one_order_2B).as_dict("single_order_agreement"),
            "first_position_rate": win_rate(picks_a_2B, 1.0 - picks_a_2B).rate,
            "chosen_probability_mean": float(np.mean(chosen_B))}


def _writable_outputs(config: JudgeAgreementConfig) -> tuple[Path, Path]:
    """``(output, its *_pairs.jsonl)``, both found writable before any pair is judged
    (``outputs.check_writable``; neither may be the data file)."""
    out = Path(config.output).expanduser()
    per_pair = out.with_name(out.stem + "_pairs.jsonl")
    for path in (out, per_pair):
        check_writable(path, key="output", inputs=(("data.source", config.data.source),),
                       hint="give a .json path in a writable directory")
    return out, per_pair


def run_judge_agreement(config: JudgeAgreementConfig) -> RunResult:
    """Judge every pair of ``config.data`` and compare with its labels (module docstring).
    Raises ``ConfigError`` (a missing judge checkpoint or principle file, an output that
    cannot be written), ``DataError`` (a pair whose prompt is chat turns only: the judge
    reads the prompt as text) and ``RewardError`` (a judge input over ``judge.max_length``)."""
    refuse_missing_checkpoints(config, ("judge.model",))
    out, per_pair = _writable_outputs(config)
    rows, held_out, reports = read_split(config.data)
    pairs = [pair for _, pair in (rows if held_out is None else held_out)]
    skipped = reports[0].skipped_malformed
    log(f"judge: {len(pairs)} {'held-out ' if held_out is not None else ''}pairs of {config.data.source}"
        + (f" ({skipped} malformed rows skipped: {'; '.join(reports[0].notes)})" if skipped else ""))
    untexted = sum(pair.prompt is None for pair in pairs)
    if untexted:
        raise DataError(f"{config.data.source}: {untexted} pairs give their prompt as chat turns only; the judge "
                        "reads the prompt as text -- give a prompt field")
    judge = build_judge(config.judge)
    prompts, chosen, rejected = ([getattr(pair, field) for pair in pairs] for field in ("prompt", "chosen", "rejected"))
    forward, backward = judge.both_orders(prompts, chosen, rejected)
    stats = judge_agreement(forward, backward)
    which = {"data": config.data.source, "split": config.data.split, "limit": config.data.limit,
             "eval_size": config.data.eval_size, "eval_source": config.data.eval_source,
             "malformed_rows_skipped": skipped}
    out.write_text(json.dumps({"judge": config.judge.model, "principle": config.judge.principle, **which, **stats},
                              indent=2) + "\n")
    per_pair.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r, "forward": float(f),
                                            "backward": float(b)}) + "\n"
                                for p, c, r, f, b in zip(prompts, chosen, rejected, forward, backward)))
    log(f"judge: agrees with the labels on {stats['agreement']:.3f} of {len(pairs)} pairs (95% interval "
        f"[{stats['agreement_low']:.3f}, {stats['agreement_high']:.3f}]); asked in one order only "
        f"{stats['single_order_agreement']:.3f}, and then it picks response A on {stats['first_position_rate']:.3f} "
        f"of the verdicts. Written to {out} (each pair's verdicts: {per_pair})")
    return RunResult(0, None, stats, out.parent)

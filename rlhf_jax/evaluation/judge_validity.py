"""How far a judge can be trusted, measured before its verdict is read: its agreement with
held-out human labels -- how often it scores the human-preferred response of a labelled pair
above the other (ties half) -- with a 95% Wilson interval (Lee et al., 2023, "RLAIF", report
a labeller's alignment the same way). The pairs' prompts are rendered as the evaluation's
prompts are (``rl.prompts.prompt_text`` under the policy's tokenizer and
``data.chat_template``) and scored by the same call as its verdicts, so the number is the
agreement on what the judge will actually read.

A judge whose interval reaches 0.5 is **not shown better than chance**: a win rate it gives is
no evidence either way, and ``rlhf-jax evaluate`` says so in the console, the JSON and the
report."""

from __future__ import annotations

import dataclasses

import numpy as np

from rlhf_jax.config import at_least
from rlhf_jax.data import DataConfig, DataError
from rlhf_jax.data.dataset import read_split
from rlhf_jax.data.formats import Preference
from rlhf_jax.data.tokenizer import renders_prompts
from rlhf_jax.evaluation.stats import WinRate, win_rate
from rlhf_jax.rl.prompts import prompt_text
from rlhf_jax.rl.scorer_prompts import PromptTable

NOT_SHOWN = "judge not shown better than chance"


@dataclasses.dataclass(frozen=True)
class JudgeValidationConfig:
    """Labelled pairs the judge never trained on (``preference`` or ``hh_rlhf`` data; a
    held-out slice such as ``split: train[90%:]``), the first ``pairs`` of them."""

    data: DataConfig
    pairs: int = 256
    batch_size: int = 32  # pairs scored together

    def __post_init__(self):
        at_least(1, pairs=self.pairs, batch_size=self.batch_size)


def labelled_pairs(config: JudgeValidationConfig, tokenizer, table: PromptTable) -> tuple[list[str], list[str],
                                                                                             list[str]]:
    """``(prompts, chosen, rejected)`` texts of the first ``config.pairs`` pairs, each prompt
    rendered as the evaluation renders its prompts under ``tokenizer`` (the policy's) and
    registered in ``table``, so a judge reads it as it reads the evaluation's prompts (in its
    own training format). Raises ``DataError`` for data that holds no pairs."""
    rows, held_out, _ = read_split(config.data)
    examples = [example for _, example in (rows if held_out is None else held_out)][: config.pairs]
    pairs = [example for example in examples if isinstance(example, Preference)]
    if not pairs:
        raise DataError(f"judge_validation.data: {config.data.source} holds no labelled pairs (format preference or "
                        f"hh_rlhf, not {config.data.format})")
    chat = renders_prompts(tokenizer, config.data.chat_template)
    prompts = [prompt_text(pair, tokenizer, chat=chat)[0] for pair in pairs]
    table.add(prompts, pairs)
    return prompts, [pair.chosen for pair in pairs], [pair.rejected for pair in pairs]


def judge_agreement(judge, prompts: list[str], chosen: list[str], rejected: list[str], batch_size: int) -> WinRate:
    """The judge's agreement with the labels: ``win_rate`` of its score of each ``chosen``
    response over its score of the ``rejected`` one (``[n]`` texts each), scored by
    ``judge(prompts, completions) -> (scores, penalised)`` -- the call its verdicts use."""
    chosen_scores, rejected_scores = [], []
    for start in range(0, len(prompts), batch_size):
        window = slice(start, start + batch_size)
        chosen_scores.append(judge(prompts[window], chosen[window])[0])
        rejected_scores.append(judge(prompts[window], rejected[window])[0])
    return win_rate(np.concatenate(chosen_scores), np.concatenate(rejected_scores))


def judge_verdict(metrics: dict) -> str:
    """:func:`verdict` of the agreement an evaluation's ``metrics`` record (``judge_agreement*``)."""
    if metrics.get("judge_agreement") is None:
        return verdict(None, function=bool(metrics.get("judge_is_function")))
    return verdict(WinRate(metrics["judge_agreement"], metrics["judge_agreement_low"], metrics["judge_agreement_high"],
                           int(metrics["judge_agreement_n"])))


def verdict(agreement: WinRate | None, function: bool = False) -> str:
    """How to read a win rate from a judge of this ``agreement`` (None: not measured);
    ``function``: the judge is a reward function alone, whose scores define what is measured."""
    if agreement is None and function:
        return ("the judge is a reward function (judge.function): its scores are the measure itself, with no human "
                "labels to agree with")
    if agreement is None:
        return "the judge's agreement with human labels was not measured (judge_validation); read the win rate with care"
    measured = (f"judge agreement with held-out human labels {agreement.rate:.3f} (95% CI [{agreement.low:.3f}, "
                f"{agreement.high:.3f}]) over {agreement.n} pairs")
    if agreement.low > 0.5:
        return f"{measured}: better than chance"
    return f"{measured}: {NOT_SHOWN}, so the win rate is no evidence either way"

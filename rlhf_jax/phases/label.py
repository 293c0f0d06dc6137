"""Preference data from prompts: a policy samples ``rollout.samples`` responses to each prompt,
an AI judge (``rl.judge``) compares them under a principle, and a pair rule
(``rl.pair_labels``) writes (prompt, chosen, rejected) rows -- reward-model or DPO data with
no human label (``rlhf-jax label``). :func:`label_samples` is the step iterative DPO shares."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from rlhf_jax.config import ConfigError, at_least
from rlhf_jax.data import DataConfig, load_tokenizer
from rlhf_jax.data.tokenizer import vocabulary_digest
from rlhf_jax.metrics import MetricsConfig
from rlhf_jax.outputs import check_writable
from rlhf_jax.phases.audit import Unused, refuse_missing_checkpoints, refuse_unused
from rlhf_jax.phases.config import MeshConfig, ModelConfig, TokenizerConfig
from rlhf_jax.phases.console import log
from rlhf_jax.phases.loop import RunResult
from rlhf_jax.phases.sampler import Sampler
from rlhf_jax.phases.online_config import AIJudgeConfig, RolloutConfig
from rlhf_jax.phases.setup import build_model, make_mesh, phase_tokenizer
from rlhf_jax.rl.judge import PairwiseJudge, group_scores
from rlhf_jax.rl.pair_labels import PairRule, label_pairs
from rlhf_jax.rl.prompts import load_prompts
from rlhf_jax.rollout.text import row_token_ids


def build_judge(c: AIJudgeConfig) -> PairwiseJudge:
    """The judge of ``c``: its checkpoint and tokenizer (the checkpoint's own unless given),
    its principle read from the file ``c.principle``. Raises ``ConfigError`` for a principle
    file that cannot be read."""
    try:
        principle = Path(c.principle).expanduser().read_text()
    except OSError as error:
        raise ConfigError(f"judge.principle={c.principle}: cannot read the principle file ({error.strerror}); give a "
                          "text file that states what the judge prefers") from None
    if not principle.strip():
        raise ConfigError(f"judge.principle={c.principle} is empty; write in it the principle the judge compares by")
    tokenizer = load_tokenizer(c.tokenizer or c.model, pad_token=c.pad_token, needs_eos=False)
    model = build_model(ModelConfig(path=c.model), "lm", tokenizer=tokenizer, seed=0, what="judge.model")
    return PairwiseJudge(model, tokenizer, principle, max_length=c.max_length, batch_size=c.batch_size, name=c.model)


def label_samples(texts: list[str], completions: list[str], scores_B: np.ndarray, samples: int, rule: PairRule,
                  margin: float, token_ids: tuple[list[list[int]], list[list[int]]] | None = None,
                  tokenizer=None) -> tuple[list[dict], dict]:
    """``(rows, counts)``: the preference rows (prompt, chosen, rejected, their scores) that
    ``rule`` and ``margin`` pick from ``samples`` scored completions of each prompt (rows
    sample-major within a prompt); an empty completion has no text for a row and is left out
    of the pairing (counted as ``empty_completions``). With ``token_ids`` -- each sample's
    ``(prompt ids, completion ids)`` as ``rollout.row_token_ids`` gives them -- and their
    ``tokenizer``, each row also carries the ``token_ids`` the policy saw and produced (the
    preference format's field), so the phase that trains on the pair reads those very ids --
    a completion cut at max_new_tokens gets no EOS it never produced, and no text is
    re-tokenized differently."""
    empty = np.asarray([not completion.strip() for completion in completions])
    pairs = label_pairs(np.where(empty, np.nan, scores_B).reshape(-1, samples), rule, margin)
    rows = [{"prompt": texts[p * samples], "chosen": completions[p * samples + i],
             "rejected": completions[p * samples + j],
             "scores": [float(scores_B[p * samples + i]), float(scores_B[p * samples + j])]} for p, i, j in pairs]
    if token_ids is not None:
        prompt_ids, completion_ids = token_ids
        digest = vocabulary_digest(tokenizer)
        for row, (p, i, j) in zip(rows, pairs):
            row["token_ids"] = {"prompt": prompt_ids[p * samples], "chosen": completion_ids[p * samples + i],
                                "rejected": completion_ids[p * samples + j], "tokenizer": digest}
    return rows, {"prompts": len(texts) // samples, "samples": samples, "pairs": len(pairs),
                  "empty_completions": int(empty.sum()), "score_mean": float(np.mean(scores_B)),
                  "score_std": float(np.std(scores_B))}


@dataclasses.dataclass(frozen=True)
class LabelRunConfig:
    data: DataConfig  # the prompts (all of them are labelled; data.limit for fewer)
    judge: AIJudgeConfig
    output: str = "runs/label/pairs.jsonl"  # the preference file written
    seed: int = 0
    policy: ModelConfig = ModelConfig()  # samples the responses (policy.path: e.g. the SFT checkpoint)
    tokenizer: TokenizerConfig = TokenizerConfig()
    rollout: RolloutConfig = RolloutConfig(prompts=16, samples=2)  # prompts per batch, responses per prompt
    rule: PairRule = "best_worst"
    margin: float = 0.0  # a pair needs win probabilities that differ by more than this
    mesh: MeshConfig = MeshConfig()
    metrics: MetricsConfig = MetricsConfig()

    def __post_init__(self):
        at_least(0, margin=self.margin)


def check_label(config: LabelRunConfig, *, check_paths: bool = True) -> None:
    """``ConfigError`` for a config that cannot run, before anything is read -- with
    ``check_paths``, also for missing checkpoints and an output that cannot be written or
    would overwrite the prompts."""
    if config.rollout.samples < 2:
        raise ConfigError("rollout.samples must be >= 2: the judge compares two responses of a prompt")
    if config.policy.path is None:
        raise ConfigError("policy.path: the responses come from a trained policy (e.g. an SFT checkpoint)")
    refuse_unused(config, (Unused(("rollout.dynamic_sampling", "rollout.max_sampling_rounds", "rollout.environment",
                                   "rollout.max_turns", "rollout.max_policy_lag"), lambda c: True,
                                  lambda c: "label samples each prompt's responses once, single-turn"),), "label")
    if check_paths:
        refuse_missing_checkpoints(config, ("policy.path", "judge.model"))
        check_writable(config.output, key="output", inputs=(("data.source", config.data.source),
                                                            ("data.eval_source", config.data.eval_source)),
                       hint="give a .jsonl path in a writable directory")


def run_label(config: LabelRunConfig) -> RunResult:
    """Label every prompt of ``config.data`` (module docstring) into ``config.output``. Raises
    ``ConfigError``, ``DataError``, ``RewardError``."""
    check_label(config)
    tokenizer = phase_tokenizer(config.tokenizer, config.policy)
    prompts, _, reports = load_prompts(config.data, tokenizer)
    for report in reports:
        log(report.summary())
    mesh = make_mesh(config.mesh)
    policy = build_model(config.policy, "lm", tokenizer=tokenizer, seed=config.seed, what="policy")
    sample = Sampler.for_config(config, tokenizer, mesh, config.policy.path)
    sampled = [sample(policy, prompts, np.arange(start, min(start + config.rollout.prompts, len(prompts))),
                      jax.random.fold_in(jax.random.key(config.seed), start))
               for start in range(0, len(prompts), config.rollout.prompts)]
    del policy  # the judge takes its place in memory
    judge = build_judge(config.judge)
    texts = [text for batch in sampled for text in batch.prompts]
    completions = [completion for batch in sampled for completion in batch.completions]
    ids = [row_token_ids(batch.rollout) for batch in sampled]
    token_ids = ([p for prompts, _ in ids for p in prompts], [c for _, completions_ in ids for c in completions_])
    scores = group_scores(judge, texts, completions, config.rollout.samples)
    rows, counts = label_samples(texts, completions, scores, config.rollout.samples, config.rule, config.margin,
                                 token_ids, tokenizer)
    out = Path(config.output)
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    log(f"label: {counts['pairs']} pairs from {counts['prompts']} prompts x {counts['samples']} responses "
        f"({counts['empty_completions']} empty responses left out), judged by {judge.name}; written to {out}")
    return RunResult(0, None, counts, out.parent)

"""``rlhf-jax evaluate``: did training help? The trained policy and the starting one (the
baseline) each answer the same held-out prompts, sampled with the same random numbers (a
paired comparison: identical policies tie everywhere, so a difference is the models'); a
judge -- a reward model the training never saw (trained on a disjoint part of the data), a
reward function, or both -- scores both answers. Reported: the win rate with its 95%
interval, the mean judge scores, the win rate among length-matched pairs, KL(policy ||
baseline) and the lengths (:mod:`.stats`); ``evaluation.json`` and every pair in
``evaluation_samples.jsonl`` under ``output_dir``. Before any answer is sampled, the judge's
own agreement with held-out human labels is measured (``judge_validation``,
:mod:`.judge_validity`), and a judge not shown better than chance makes the verdict say so.
The win rate is also given among the prompts whose two answers both ended before
``max_new_tokens`` (``stopped_win_rate``): answers cut at the cap are compared as fragments."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np

from rlhf_jax.config import at_least, between, greater_than
from rlhf_jax.data import DataConfig
from rlhf_jax.evaluation.judge_validity import (JudgeValidationConfig, judge_agreement, judge_verdict, labelled_pairs,
                                                 verdict)
from rlhf_jax.evaluation.stats import accuracy_gain, is_binary, kl_estimate, matched_length_win_rate, win_rate
from rlhf_jax.hosts import to_host
from rlhf_jax.metrics import peak_memory
from rlhf_jax.models.pure_jit import pure_jit
from rlhf_jax.models.sharding import activation_sharding, place, rules_of
from rlhf_jax.phases.config import MeshConfig, ModelConfig, TokenizerConfig
from rlhf_jax.phases.reward_sources import build_reward
from rlhf_jax.phases.sampler import Sampler
from rlhf_jax.phases.online_config import RewardConfig
from rlhf_jax.phases.console import log
from rlhf_jax.phases.runner import RunResult
from rlhf_jax.phases.setup import build_model, make_mesh, phase_tokenizer, stop_token_ids
from rlhf_jax.rl.behaviour import policy_logprobs
from rlhf_jax.rl.prompts import load_prompts
from rlhf_jax.rl.scorer_prompts import PromptTable
from rlhf_jax.rollout import GenerationConfig, SamplingConfig
from rlhf_jax.run_lock import OutputDirLock

SHAPING = ("whiten", "clip", "missing_eos_penalty")  # RewardConfig fields that shape training rewards only


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """``policy`` (the trained model) against ``baseline`` (where training started) on the first
    ``prompts`` prompts of ``data`` (any format with a prompt; a held-out slice such as
    ``split: train[95%:]``), one sampled answer each, judged by ``judge``."""

    output_dir: str
    policy: ModelConfig
    baseline: ModelConfig
    judge: RewardConfig
    data: DataConfig
    tokenizer: TokenizerConfig = TokenizerConfig()  # the policy's and the baseline's (default: the policy's own)
    prompts: int = 128
    batch_size: int = 16  # prompts sampled together
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    length_tolerance: float = 0.2  # matched length: |l_policy - l_baseline| <= this x the longer
    # labelled pairs the judge never trained on: its agreement with them is measured first
    judge_validation: JudgeValidationConfig | None = None
    seed: int = 0
    # several sampling seeds: every prompt answered once per seed; the win rate per seed and its
    # spread reported beside the pooled numbers (empty: seed alone)
    seeds: tuple[int, ...] = ()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        at_least(1, prompts=self.prompts, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens)
        at_least(0, temperature=self.temperature, top_k=self.top_k)
        between(0, 1, length_tolerance=self.length_tolerance)
        greater_than(0, top_p=self.top_p)
        if self.judge.model is None and self.judge.function is None:
            raise ValueError("judge: give judge.model (a reward model the training never saw) and/or judge.function")
        shaped = [name for name in SHAPING if getattr(self.judge, name) != getattr(RewardConfig(), name)]
        if shaped:
            raise ValueError(f"judge.{shaped[0]} shapes training rewards; a judge scores raw. Remove it")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


def run_evaluate(config: EvaluateConfig) -> RunResult:
    """Sample, judge and compare (see the module docstring); holds ``output_dir``'s lock.
    Raises ``ConfigError`` / ``DataError`` / ``CheckpointError`` for a bad config, data or
    checkpoint, and ``RewardError`` for a failing judge function."""
    with OutputDirLock(config.output_dir, enabled=jax.process_index() == 0), activation_sharding():
        return _evaluate(config)


def _evaluate(config: EvaluateConfig) -> RunResult:
    out = Path(config.output_dir)
    mesh = make_mesh(config.mesh)
    tokenizer = phase_tokenizer(config.tokenizer, config.policy)
    prompts, _, reports = load_prompts(config.data, tokenizer)
    for report in reports:
        log(report.summary())
    n = min(config.prompts, len(prompts))
    if n < config.prompts:
        log(f"the data has {len(prompts)} prompts; evaluating on all of them (prompts={config.prompts})")
    table = PromptTable.of(prompts)
    judge = build_reward(config.judge, tokenizer, mesh, seed=config.seed, prompts=table, what="judge.model")
    agreement = None
    if config.judge_validation is not None:
        v = config.judge_validation
        agreement = judge_agreement(judge, *labelled_pairs(v, tokenizer, table), v.batch_size)
    log(verdict(agreement, function=config.judge.model is None))
    layout = rules_of(mesh, frozen=True) if config.mesh.sampler_rules is None else config.mesh.sampler_rules
    policy, baseline = (place(build_model(c, "lm", tokenizer=tokenizer, seed=config.seed, what=what), mesh, layout)
                        for c, what in ((config.policy, "policy"), (config.baseline, "baseline")))
    stops = stop_token_ids(tokenizer, config.tokenizer, config.policy.path, config.baseline.path)
    generation = GenerationConfig(max_new_tokens=config.max_new_tokens, stop_token_ids=stops,
                                  pad_token_id=tokenizer.pad_token_id, sampling=config.sampling)
    sample = Sampler(generation, (config.max_new_tokens,), tokenizer, mesh)
    log(f"evaluate: {n} prompts, policy {config.policy.path} against baseline {config.baseline.path}, judge "
        f"{judge.name}")
    rows, pairs, judge_penalised, per_seed = {}, [], 0, []
    for seed in config.seeds or (config.seed,):
        seed_rows, seed_pairs, penalised = _answer_and_judge(config, seed, n, prompts, sample, judge, policy,
                                                             baseline)
        for name, parts in seed_rows.items():
            rows.setdefault(name, []).extend(parts)
        pairs += seed_pairs
        judge_penalised += penalised
        per_seed.append({"score_policy": np.concatenate(seed_rows["score_policy"]),
                         "score_baseline": np.concatenate(seed_rows["score_baseline"])})
    values = {name: np.concatenate(parts) for name, parts in rows.items()}
    metrics = summarise(values, config.length_tolerance) | judge_metrics(agreement, config.judge.model is None) | {
        "judge_penalised": judge_penalised, **peak_memory()}
    if config.seeds:
        metrics |= per_seed_metrics(per_seed, "accuracy_gain" in metrics)
    if judge_penalised:
        log(f"the judge function failed on {judge_penalised} answers, scored judge.penalty={config.judge.penalty}")
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps({"metrics": metrics, "config": dataclasses.asdict(config)},
                                                        indent=1))
        with open(out / "evaluation_samples.jsonl", "w") as f:
            f.writelines(json.dumps(pair) + "\n" for pair in pairs)
    log(describe(metrics, config.length_tolerance))
    log(f"wrote {out / 'evaluation.json'} and {out / 'evaluation_samples.jsonl'}")
    return RunResult(0, None, metrics, out)


def _answer_and_judge(config: EvaluateConfig, seed: int, n: int, prompts, sample: Sampler, judge, policy,
                      baseline) -> tuple[dict[str, list], list[dict], int]:
    """``(rows, pairs, judge_penalised)`` of one sampling seed over the first ``n`` prompts:
    both models answer each batch with the same random numbers (a paired comparison), the
    judge scores both answers, and the baseline scores the policy's tokens (the KL)."""
    rows = {name: [] for name in ("score_policy", "score_baseline", "length_policy", "length_baseline",
                                  "stopped_policy", "stopped_baseline", "logp_policy", "logp_baseline",
                                  "completion_mask")}
    pairs, judge_penalised = [], 0
    for start in range(0, n, config.batch_size):
        indices = np.arange(start, min(start + config.batch_size, n))
        key = jax.random.fold_in(jax.random.key(seed), start)
        answers = {}
        for name, model in (("policy", policy), ("baseline", baseline)):
            sampled = sample(model, prompts, indices, key)  # the same draws: a paired comparison
            rollout, texts, completions = sampled.rollout, sampled.prompts, sampled.completions
            scores, penalised = judge(texts, completions)
            judge_penalised += penalised
            lengths = np.asarray(to_host(rollout.completion_mask_BN)).sum(1)
            answers[name] = (rollout, texts, completions, scores, lengths)
            rows[f"score_{name}"].append(scores)
            rows[f"length_{name}"].append(lengths)
            rows[f"stopped_{name}"].append(np.asarray(to_host(rollout.stopped_B)))
        for name, value in zip(("logp_policy", "logp_baseline", "completion_mask"),
                               _logprobs_of_policy_answers(answers["policy"][0], baseline, config.sampling)):
            rows[name].append(value)
        log(f"evaluate: seed {seed}: {indices[-1] + 1}/{n} prompts answered by both and judged")
        texts = answers["policy"][1]
        for i in range(len(indices)):
            pairs.append({"prompt": texts[i], "seed": seed, **{
                f"{field}_{name}": _plain(answers[name][j][i]) for name in ("policy", "baseline")
                for j, field in ((2, "completion"), (3, "score"), (4, "length"))}})
    return rows, pairs, judge_penalised


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _logprobs_of_policy_answers(rollout, baseline, sampling: SamplingConfig) -> tuple[np.ndarray, ...]:
    """``(policy_BN, baseline_BN, mask_BN)``: the log-probs of the policy's completion tokens
    under the policy (the sampler's own) and under the baseline (one forward), both for the
    sampling distribution, and which tokens are the completion's."""
    ids_BT, mask_BT = rollout.sequences()
    width = rollout.prompt_mask_BP.shape[1]
    baseline_BT = _jit_policy_logprobs(baseline, ids_BT, mask_BT, sampling, start=width)
    return tuple(np.asarray(a) for a in to_host((rollout.logprobs_BN, baseline_BT[:, width:],
                                                  rollout.completion_mask_BN)))


_jit_policy_logprobs = pure_jit(policy_logprobs, static_argnames=("sampling", "start"))


def summarise(values: dict[str, np.ndarray], tolerance: float) -> dict[str, float]:
    """The evaluation's numbers from per-prompt ``score_*``, ``length_*`` ``[n]`` and
    ``logp_*``, ``completion_mask`` ``[n, N]`` (see :mod:`.stats`)."""
    sp, sb, lp, lb = (values[k] for k in ("score_policy", "score_baseline", "length_policy", "length_baseline"))
    kl, kl_stderr = kl_estimate(values["logp_policy"], values["logp_baseline"], values["completion_mask"])
    both_stopped = values["stopped_policy"].astype(bool) & values["stopped_baseline"].astype(bool)
    numbers = (win_rate(sp, sb).as_dict("win_rate") | matched_length_win_rate(sp, sb, lp, lb, tolerance).as_dict(
        "matched_length_win_rate") | win_rate(sp[both_stopped], sb[both_stopped]).as_dict("stopped_win_rate") | {"judge_score_policy": float(sp.mean()), "judge_score_baseline": float(sb.mean()),
                                      "kl": kl, "kl_stderr": kl_stderr, "length_policy": float(lp.mean()),
                                      "length_baseline": float(lb.mean())})
    if is_binary(sp, sb):  # a 0/1 checker (a verifiable reward): both sides' accuracy and the gain
        numbers |= accuracy_gain(sp, sb)
    # undefined numbers (no length-matched pair; one prompt's standard error) are None: null in the JSON
    return {name: value if math.isfinite(value) else None for name, value in numbers.items()}


def per_seed_metrics(per_seed: list[dict[str, np.ndarray]], binary: bool) -> dict:
    """The win rate of each sampling seed (``win_rate_per_seed``) and its standard deviation
    over seeds; with a 0/1 judge the same for both accuracies and the gain."""
    metrics = {"win_rate_per_seed": [win_rate(s["score_policy"], s["score_baseline"]).rate for s in per_seed]}
    if binary:
        metrics |= {f"{name}_per_seed": [float(s[f"score_{side}"].mean()) for s in per_seed]
                    for name, side in (("accuracy_policy", "policy"), ("accuracy_baseline", "baseline"))}
        metrics["accuracy_gain_per_seed"] = [p - b for p, b in zip(metrics["accuracy_policy_per_seed"],
                                                                    metrics["accuracy_baseline_per_seed"])]
    spread = lambda values: float(np.std(values, ddof=1)) if len(values) > 1 else None  # noqa: E731
    return metrics | {name.replace("_per_seed", "_seed_std"): spread(values) for name, values in metrics.items()}


def judge_metrics(agreement, function: bool = False) -> dict:
    """The judge's agreement with held-out labels (``judge_agreement*``, None when not
    measured), whether it is shown better than chance (``judge_better_than_chance``) and
    whether it is a reward function alone (``judge_is_function``: its scores are the
    measure itself, e.g. a verifiable reward's exact match)."""
    if agreement is None:
        return {"judge_agreement": None, "judge_better_than_chance": None, "judge_is_function": function}
    return agreement.as_dict("judge_agreement") | {"judge_better_than_chance": bool(agreement.low > 0.5),
                                                   "judge_is_function": function}


def describe(m: dict[str, float], tolerance: float) -> str:
    """One paragraph of the numbers, for the log and the README: the judge's validity first."""
    def subset(prefix: str, what: str) -> str:
        return (f"{m[prefix]:.3f} [{m[prefix + '_low']:.3f}, {m[prefix + '_high']:.3f}] over {m[prefix + '_n']:.0f} "
                f"pairs" if m[prefix + "_n"] else f"no pair {what}")

    return (f"{judge_verdict(m)}. Win rate {m['win_rate']:.3f} (95% CI [{m['win_rate_low']:.3f}, "
            f"{m['win_rate_high']:.3f}]) over {m['win_rate_n']:.0f} prompts; at matched length (within "
            f"{tolerance:.0%}): {subset('matched_length_win_rate', 'matched')}; both answers ended before the cap: "
            f"{subset('stopped_win_rate', 'ended before the cap')}; judge score "
            f"{m['judge_score_policy']:.4f} policy vs {m['judge_score_baseline']:.4f} baseline; KL(policy || baseline) "
            f"{m['kl']:.3f} +/- {m['kl_stderr'] or math.nan:.3f} nats per answer; length {m['length_policy']:.1f} vs "
            f"{m['length_baseline']:.1f} tokens" + (
                f"; per sampling seed {', '.join(f'{r:.3f}' for r in m['win_rate_per_seed'])} (standard deviation "
                f"{m['win_rate_seed_std'] or math.nan:.3f})" if "win_rate_per_seed" in m else "") + (
                f". Accuracy (0/1 judge) {m['accuracy_policy']:.3f} [{m['accuracy_policy_low']:.3f}, "
                f"{m['accuracy_policy_high']:.3f}] policy vs {m['accuracy_baseline']:.3f} [{m['accuracy_baseline_low']:.3f}, "
                f"{m['accuracy_baseline_high']:.3f}] baseline over {m['accuracy_policy_n']:.0f} answers; gain "
                f"{m['accuracy_gain']:+.3f} (95% CI [{m['accuracy_gain_low'] or math.nan:+.3f}, "
                f"{m['accuracy_gain_high'] or math.nan:+.3f}])" if "accuracy_gain" in m else ""))

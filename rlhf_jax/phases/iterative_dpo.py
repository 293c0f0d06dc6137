"""Iterative (online) DPO: rounds of sample -> label -> DPO (Xu et al., 2023; Xiong et al.,
2024, "Iterative Preference Learning from Human Feedback", alg. 1; Guo et al., 2024, "Direct
Language Model Alignment from Online AI Feedback").

Round ``k`` (1-based), under ``<output_dir>/round_k/``:

1. the policy of round ``k - 1`` (round 0: ``model.path``, the SFT checkpoint) samples
   ``rollout.samples`` completions of each of ``rollout.prompts`` prompts (the round's slice
   of a seeded permutation of the prompt set);
2. the reward source (``reward``: a reward model, a Python function, or both; or an AI judge,
   ``labels.judge``, :mod:`rlhf_jax.rl.judge`) scores them and
   a rule (``labels``, :mod:`rlhf_jax.rl.pair_labels`) turns the scores into preference
   pairs, written to ``pairs.jsonl`` (prompt / chosen / rejected; ties are never a pair) with
   the round's counts in ``labels.json``; a completion that is empty or only whitespace (the
   policy stopped at once) has no text for a preference row and is left out of the pairing,
   counted as ``empty_completions``;
3. the DPO phase trains on those pairs from the round-(k-1) policy (``dpo/``), against the
   reference ``reference: previous`` (the round's starting policy) or ``sft`` (``model.path``
   throughout), with the keys of the ``round`` section over these hand-offs.

Each round's numbers are appended to ``<output_dir>/rounds.jsonl``; ``<output_dir>/hf`` links
the last round's policy. Resumable between and within rounds: a round's pairs are written
once (atomically) and reused, and its DPO phase resumes mid-way bit for bit (``--resume``);
``stop_after`` counts DPO steps over all rounds."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Literal

import jax

from rlhf_jax import config as config_lib
from rlhf_jax.config import ConfigError, at_least
from rlhf_jax.data import DataConfig, batch_indices
from rlhf_jax.hosts import barrier
from rlhf_jax.metrics import MetricsConfig
from rlhf_jax.phases import PHASES, run_phase
from rlhf_jax.phases.audit import REWARD_RULES, Unused, audit_offline, refuse_missing_checkpoints, refuse_unused
from rlhf_jax.phases.config import DPOConfig, MeshConfig, ModelConfig, TokenizerConfig
from rlhf_jax.phases.console import log
from rlhf_jax.phases.loop import RunResult
from rlhf_jax.phases.reward_sources import build_reward
from rlhf_jax.phases.sampler import Sampler
from rlhf_jax.phases.label import build_judge, label_samples
from rlhf_jax.phases.online_config import AIJudgeConfig, RewardConfig, RolloutConfig
from rlhf_jax.phases.setup import build_model, make_mesh, phase_tokenizer
from rlhf_jax.rl.judge import group_scores
from rlhf_jax.rl.pair_labels import PairRule
from rlhf_jax.rl.prompts import load_prompts
from rlhf_jax.rl.scorer_prompts import PromptTable
from rlhf_jax.rollout.text import row_token_ids
from rlhf_jax.models.sharding import activation_sharding
from rlhf_jax.run_lock import OutputDirLock


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    rule: PairRule = "best_worst"  # rl.pair_labels: the best against the worst sample, or all pairs
    margin: float = 0.0  # a pair needs scores that differ by more than this
    # an AI judge instead of reward: each sample's score is its mean probability of beating the
    # prompt's other samples under the judge's principle (rl.judge.group_scores)
    judge: AIJudgeConfig | None = None

    def __post_init__(self):
        at_least(0, margin=self.margin)


@dataclasses.dataclass(frozen=True)
class IterativeDPOConfig:
    data: DataConfig  # the prompts: format prompt, or any format with a prompt field
    output_dir: str = "runs/iterative_dpo"
    seed: int = 0
    model: ModelConfig = ModelConfig()  # the starting policy (model.path: the SFT checkpoint)
    tokenizer: TokenizerConfig = TokenizerConfig()
    reward: RewardConfig = RewardConfig()  # the labeller (or labels.judge)
    rounds: int = 3
    rollout: RolloutConfig = RolloutConfig(samples=4)  # prompts per round, samples per prompt, sampling
    labels: LabelConfig = LabelConfig()
    reference: Literal["previous", "sft"] = "previous"  # DPO's reference: the round's starting policy or model.path
    round: dict = dataclasses.field(default_factory=dict)  # each round's DPO phase config keys (train, dpo, ...)
    mesh: MeshConfig = MeshConfig()
    metrics: MetricsConfig = MetricsConfig()

    def __post_init__(self):
        at_least(1, rounds=self.rounds)


def round_dir(config: IterativeDPOConfig, k: int) -> Path:
    return Path(config.output_dir) / f"round_{k}"


def dpo_config(config: IterativeDPOConfig, k: int) -> DPOConfig:
    """Round ``k``'s DPO phase: the ``round`` section over the hand-offs (module docstring)."""
    start = config.model.path if k == 1 else str(round_dir(config, k - 1) / "dpo" / "hf")
    hand_offs = {"output_dir": str(round_dir(config, k) / "dpo"), "seed": config.seed + k,
                 "model": dataclasses.asdict(dataclasses.replace(config.model, path=start)),
                 "tokenizer": dataclasses.asdict(config.tokenizer),
                 "data": {"source": str(round_dir(config, k) / "pairs.jsonl"), "format": "preference",
                          "chat_template": "never"},  # the prompts are written as the policy saw them
                 "dpo": {"reference": config.model.path if config.reference == "sft" else None},
                 # the round trains; how the policy is laid out to sample is this phase's, not the round's
                 "mesh": dataclasses.asdict(config.mesh) | {"sampler_rules": None},
                 "metrics": dataclasses.asdict(config.metrics)}
    mapping = config_lib.merge(hand_offs, config.round)
    mapping.setdefault("checkpoint", {})["export_hf"] = True  # the next round starts from the export
    return config_lib.from_dict(DPOConfig, mapping, prefix="round.")


RULES = (
    *REWARD_RULES,
    Unused(("reward.missing_eos_penalty", "reward.overlong_buffer", "reward.whiten", "reward.clip"), lambda c: True,
           lambda c: "iterative DPO pairs a prompt's samples by their raw scores; score shaping is for the online "
                     "algorithms"),
    Unused(("reward.process_model", "reward.process_weight", "reward.monitor"), lambda c: True,
           lambda c: "iterative DPO labels whole completions by their scores; step rewards and monitors are for "
                     "the online algorithms"),
    Unused(("rollout.dynamic_sampling", "rollout.max_sampling_rounds"), lambda c: True,
           lambda c: "iterative DPO samples each round's prompts once; a prompt whose samples tie gives no pair"),
    Unused(("rollout.max_policy_lag",), lambda c: True,
           lambda c: "iterative DPO samples a round's pairs with the policy that round starts from"),
    Unused(("rollout.environment", "rollout.max_turns", "rollout.completion_buckets"), lambda c: True,
           lambda c: "iterative DPO samples single-turn completions and writes them as text pairs"),
    Unused(("data.truncation", "data.append_eos", "data.pack", "data.shared_prompt", "data.pad_multiple"),
           lambda c: True, lambda c: "data: holds the prompts; set how the round's pairs are encoded in round.data"),
)


def check_config(config: IterativeDPOConfig, *, check_paths: bool = True) -> None:
    """Errors for a config that cannot run or would partly ignore, before anything is read or
    written (``ConfigError``)."""
    refuse_unused(config, RULES, "iterative_dpo")
    if config.model.path is None:
        raise ConfigError("model.path: iterative DPO starts from a trained policy (the SFT checkpoint's directory)")
    if config.rollout.samples < 2:
        raise ConfigError("rollout.samples must be >= 2: a pair compares two samples of a prompt")
    has_reward = config.reward.model is not None or config.reward.function is not None or config.reward.sources
    if bool(has_reward) == (config.labels.judge is not None):
        raise ConfigError("give one labeller: reward (reward.model, reward.function or reward.sources) or "
                          "labels.judge (an AI judge)")
    first_round = dpo_config(config, 1)  # its errors name their keys under round.; a typo before any path
    try:
        audit_offline(first_round, PHASES["dpo"], check_paths=False)
    except ConfigError as error:  # the DPO phase's rules start with its key: make it the round's
        raise ConfigError(f"round.{error}") from None
    if check_paths:
        refuse_missing_checkpoints(config, ("model.path", "reward.model", "labels.judge.model"))


def run_iterative_dpo(config: IterativeDPOConfig, *, resume: bool = False, stop_after: int | None = None) -> RunResult:
    """Run the rounds of ``config`` (module docstring). Raises ``ConfigError``, ``DataError``,
    ``RewardError`` and what the DPO phase raises."""
    check_config(config)
    out = Path(config.output_dir)
    if not resume and (out / "round_1").exists():
        raise ConfigError(f"output_dir {out} holds an earlier run (round_1/); pass --resume to continue it or choose "
                          "another output_dir")
    with OutputDirLock(out, enabled=jax.process_index() == 0), activation_sharding():
        return _rounds(config, resume=resume, stop_after=stop_after)


def _rounds(config: IterativeDPOConfig, *, resume: bool, stop_after: int | None) -> RunResult:
    out = Path(config.output_dir)
    steps = dpo_config(config, 1).train.steps
    result = None
    for k in range(1, config.rounds + 1):
        if resume and (round_dir(config, k) / "round_done.json").exists():
            log(f"iterative dpo: round {k} finished in an earlier run, skipping it")
            continue
        if stop_after is not None and stop_after <= (k - 1) * steps:
            return RunResult((k - 1) * steps, "stop_after", {}, out)
        counts = _label_round(config, k)
        log(f"iterative dpo: round {k}: {counts['pairs']} pairs from {counts['prompts']} prompts x "
            f"{counts['samples']} samples (sample score {counts['score_mean']:.4g})")
        within = None if stop_after is None else stop_after - (k - 1) * steps
        result = run_phase(PHASES["dpo"], dpo_config(config, k), resume=resume, stop_after=within)
        if result.stopped_by is not None:
            return RunResult((k - 1) * steps + result.step, result.stopped_by, result.eval, out)
        if jax.process_index() == 0:
            record = {"round": k} | counts | {f"dpo_{key}": value for key, value in result.eval.items()}
            with open(out / "rounds.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            (round_dir(config, k) / "round_done.json").write_text(json.dumps(record))
            link = out / "hf"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(f"round_{k}") / "dpo" / "hf", target_is_directory=True)
        barrier(f"iterative dpo round {k}")
    log(f"iterative dpo: {config.rounds} rounds done; the policy is {out / 'hf'}")
    return RunResult(config.rounds * steps, None, {} if result is None else result.eval, out)


def _label_round(config: IterativeDPOConfig, k: int) -> dict:
    """Sample, score and pair round ``k``'s prompts with the round-(k-1) policy, unless an
    earlier run wrote them; the round's counts."""
    directory = round_dir(config, k)
    if (directory / "labels.json").exists():
        return json.loads((directory / "labels.json").read_text())
    round_config = dpo_config(config, k)
    start = round_config.model
    tokenizer = phase_tokenizer(config.tokenizer, start)
    prompts, _, reports = load_prompts(config.data, tokenizer)
    for report in reports:
        log(f"iterative dpo: round {k} prompts: {report.summary()}")
    r = config.rollout
    if len(prompts) < r.prompts:
        raise ConfigError(f"rollout.prompts={r.prompts} exceeds the {len(prompts)} prompts of data.source")
    mesh = make_mesh(config.mesh)
    policy = build_model(start, "lm", tokenizer=tokenizer, seed=config.seed, what=f"round {k} policy")
    indices = batch_indices(config.seed, k - 1, len(prompts), r.prompts)
    sample = Sampler.for_config(config, tokenizer, mesh, start.path)
    sampled = sample(policy, prompts, indices, jax.random.key(config.seed + 1000 * k))
    texts, completions = sampled.prompts, sampled.completions
    if config.labels.judge is not None:
        del policy  # the judge takes its place in memory
        scores, penalised = group_scores(build_judge(config.labels.judge), texts, completions, r.samples), 0
    else:
        reward = build_reward(config.reward, tokenizer, mesh, seed=config.seed, prompts=PromptTable.of(prompts))
        scores, penalised = reward(texts, completions)
    rows, counts = label_samples(texts, completions, scores, r.samples, config.labels.rule, config.labels.margin,
                                 row_token_ids(sampled.rollout), tokenizer)
    counts["penalised"] = penalised
    batch_size = round_config.train.batch_size
    if len(rows) < batch_size:
        raise ConfigError(f"round {k} labelled {len(rows)} pairs ({counts['empty_completions']} empty completions; "
                          f"the others' scores tied or within labels.margin), fewer than round.train.batch_size="
                          f"{batch_size}: sample more (rollout.prompts, rollout.samples, rollout.temperature), lower "
                          "labels.margin or use labels.rule: all_pairs")
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(directory / "pairs.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        _write_atomic(directory / "labels.json", json.dumps(counts))
    barrier(f"iterative dpo labels {k}")
    return counts


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

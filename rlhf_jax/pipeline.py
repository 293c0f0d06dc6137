"""The pipeline driver: SFT -> RM -> PPO (or -> DPO, -> GRPO, ...) in order, each phase
handing its exported checkpoint to the next, every phase checkpointed, ``--resume``
continuing at the phase and step where a run stopped.

Any training command (``phases.commands``) can be a phase; its role says where it goes and
what it hands on (each only where the phase's own section does not set it):

- the starting phase (``sft``) trains ``model.init`` from scratch (or ``sft.model.path``);
- a reward model (``rm``) starts from the SFT checkpoint (InstructGPT's recipe: a reward
  model initialised from the SFT model with a new score head), as does a process reward
  model (``prm``);
- the policy phases (``dpo``, ``kto``, ``simpo``, ``orpo``, ``iterative_dpo`` and the online
  algorithms ``ppo``, ``grpo``, ``rloo``, ``reinforce``, ``raft``, ``trpo``, ...) start the
  policy (and a frozen reference) from the SFT checkpoint; the reward of those that score
  their own samples (a config with a ``reward`` section: iterative DPO's labeller, the online
  phases') is the RM checkpoint when there is a reward model (PPO's critic starts from it
  too), else the built-in task's reward function; a process reward model is the
  ``reward.process_model`` of the online phases with a critic (``ppo``, ``trpo``), which
  place its step rewards by GAE.

With a built-in ``task`` (:mod:`rlhf_jax.tasks`), the pipeline writes the task's data under
``<output_dir>/data``, fills each phase's settings from :mod:`rlhf_jax.pipeline_defaults`,
and ends by judging the SFT policy and the final policy with the task's gold reward -- which
generated the preferences but was never optimised directly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import models, tasks
from rlhf_jax.evaluation.report import SAMPLES, overoptimisation_curve, read_metrics, write_pipeline_report
from rlhf_jax.hosts import barrier, to_host
from rlhf_jax.phases.commands import TrainingCommand, training_commands
from rlhf_jax.phases.protocol import Role, trained_formats
from rlhf_jax.phases.sampler import Sampler
from rlhf_jax.phases.online_config import OnlineConfig, RolloutConfig
from rlhf_jax.phases.console import log
from rlhf_jax.phases.runner import RunResult
from rlhf_jax.phases.setup import make_mesh, phase_tokenizer, stop_token_ids
from rlhf_jax.pipeline_defaults import task_defaults
from rlhf_jax.rl.prompts import load_prompts
from rlhf_jax.rl.environments import load_environment
from rlhf_jax.rollout import GenerationConfig

# the chain's order: the starting phase, then the reward models, then the policy phases
ROLE_RANK: dict[Role, int] = {"start": 0, "reward": 1, "process_reward": 1, "policy": 2}
# the final phase's settings of an over-optimisation run, under the user's own section
OVEROPTIMISATION = {"kl": {"beta": 0.0}, "train": {"iterations": 100}}
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 64}


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    prompts: int = 64  # held-out prompts the SFT and final policies are compared on
    samples: int = 4  # completions per prompt (temperature 1)
    max_new_tokens: int = 24

    def __post_init__(self):
        config_lib.at_least(1, prompts=self.prompts, samples=self.samples, max_new_tokens=self.max_new_tokens)


def _default_model() -> dict:
    return {"init": dict(TINY_LLAMA)}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    output_dir: str = "runs/pipeline"
    seed: int = 0
    task: str | None = "letters"  # a built-in task (data + gold reward); None: each phase names its data
    phases: tuple[str, ...] = ("sft", "rm", "ppo")  # training commands (phases.commands), in the chain's order
    model: dict = dataclasses.field(default_factory=_default_model)  # the starting (sft) phase's model
    tokenizer: dict = dataclasses.field(default_factory=lambda: {"name": "builtin:bytes"})
    metrics: dict = dataclasses.field(default_factory=dict)  # every phase's metrics section (e.g. progress: false)
    judge: JudgeConfig = JudgeConfig()
    # the over-optimisation run (Gao et al., 2022): the final online phase trains against the
    # reward model with no KL penalty (kl.beta 0) for 100 iterations (OVEROPTIMISATION), and
    # the report plots the task's gold reward and the proxy against the KL reached
    overoptimisation: bool = False
    # each phase's section, written in YAML as a top-level key named after the phase (sft:,
    # rm:, ppo:, ...): keys of that phase's config, over the pipeline's hand-offs and defaults
    sections: Mapping[str, dict] = dataclasses.field(default_factory=dict)

    NAMED_SECTIONS: ClassVar[config_lib.NamedSections] = config_lib.NamedSections(
        "sections", lambda: training_commands().keys())
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "stages": "it is called phases now (one word for a unit of the pipeline): phases: [sft, rm, ppo]"}

    def __post_init__(self):
        if not isinstance(self.judge, JudgeConfig):  # a YAML config converts it; Python code builds it
            raise TypeError(f"judge should be a JudgeConfig(prompts=..., samples=..., max_new_tokens=...), got "
                            f"{type(self.judge).__name__}")
        commands, phases = training_commands(), list(self.phases)
        unknown = [s for s in phases if s not in commands]
        if unknown:
            raise ValueError(f"phases: unknown phase {unknown[0]!r}; phases are {', '.join(commands)}")
        roles = [commands[s].role for s in phases]
        ranks = [ROLE_RANK[role] for role in roles]
        if ranks != sorted(ranks) or len(set(phases)) != len(phases) or roles.count("start") > 1:
            order = " -> ".join("/".join(n for n, c in commands.items() if ROLE_RANK[c.role] == rank)
                                for rank in sorted(set(ROLE_RANK.values())))
            raise ValueError(f"phases {phases}: give each once, in the order {order} (one starting phase, then "
                             "reward models, then the policy phases)")
        if self.task is None and self.judge != JudgeConfig():
            raise ValueError("judge has no effect without a task: the summary judges policies by a built-in task's "
                             "gold reward")
        if "start" not in roles and self.model != _default_model():
            raise ValueError("model is the starting (sft) phase's model and there is no such phase; give each "
                             "phase's model.path in its own section")
        final = commands[phases[-1]]
        if self.overoptimisation and (self.task is None or "reward" not in roles or final.kind != "online"
                                      or not final.record.uses_reference):
            raise ValueError("overoptimisation needs a task, an rm phase and a final online phase with a KL to its "
                             "reference (ppo, grpo, ...): it plots the task's gold reward against the KL reached")
        for name, section in self.sections.items():
            if not isinstance(section, Mapping):
                raise ValueError(f"{name}: a phase's section is a mapping of its config keys, got {section!r}")
            if name not in phases:
                raise ValueError(f"{name}: a section for a phase that is not in phases {phases}; add the phase "
                                 "or remove the section")


class Pipeline:
    def __init__(self, config: PipelineConfig):
        self.config, self.out = config, Path(config.output_dir)
        self.task = tasks.get(config.task) if config.task is not None else None
        commands = training_commands()
        self.commands: dict[str, TrainingCommand] = {phase: commands[phase] for phase in config.phases}

    def phase_dir(self, phase: str) -> Path:
        return self.out / phase

    def with_role(self, *roles: Role) -> str | None:
        """The first phase of the chain whose role is one of ``roles``, or None."""
        return next((phase for phase, command in self.commands.items() if command.role in roles), None)

    def checkpoint(self, phase: str | None) -> str | None:
        """The exported checkpoint of ``phase`` (None for None)."""
        return None if phase is None else str(self.phase_dir(phase) / "hf")

    def hand_offs(self, phase: str) -> dict[str, Any]:
        """What ``phase`` takes from the pipeline and the phases before it (module docstring)."""
        c, command = self.config, self.commands[phase]
        mapping: dict[str, Any] = {"output_dir": str(self.phase_dir(phase)), "seed": c.seed, "tokenizer": c.tokenizer,
                                   "metrics": c.metrics}
        start = self.with_role("start")
        if command.role == "start":
            mapping["model"] = c.model
        elif start is not None:
            mapping["model"] = {"path": self.checkpoint(start)}
        if command.kind == "online":
            mapping["algorithm"] = phase
        if command.role == "policy" and "reward" in {f.name for f in dataclasses.fields(command.config_cls)}:
            reward_model, process = self.checkpoint(self.with_role("reward")), self.checkpoint(
                self.with_role("process_reward"))
            reward: dict[str, Any] = {}
            if reward_model is not None:
                reward["model"] = reward_model
                if command.kind == "online" and self.task is not None:  # the gold reward beside the proxy
                    reward["monitor"] = f"builtin:{self.task.name}"
            elif self.task is not None:
                reward["function"] = f"builtin:{self.task.name}"
            if process is not None and command.kind == "online" and command.record.needs_critic:
                reward["process_model"] = process  # step rewards need a critic and GAE (ppo, trpo)
            if reward:
                mapping["reward"] = reward
        return mapping

    def phase_config(self, phase: str, data: dict[str, Path] | None):
        """``phase``'s config: the task's defaults, the hand-offs over them, its own section over
        both; checked as its run would (its paths unchecked: earlier phases write them).
        Raises ``ConfigError`` prefixed with the phase's name."""
        command = self.commands[phase]
        defaults = task_defaults(command, self.task, data) if data is not None else {}
        if self.config.overoptimisation and phase == self.config.phases[-1]:
            defaults = config_lib.merge(defaults, OVEROPTIMISATION)
        mapping = config_lib.merge(config_lib.merge(defaults, self.hand_offs(phase)),
                                   self.config.sections.get(phase, {}))
        if data is not None and "data" not in mapping:
            raise config_lib.ConfigError(
                f"{phase}.data: the {self.task.name} task writes no data {phase} trains on (formats "
                f"{', '.join(trained_formats(command.record))}); give {phase}.data.source and {phase}.data.format")
        config = config_lib.from_dict(command.config_cls, mapping, prefix=f"{phase}.")
        try:
            command.check(config, check_paths=False)
        except config_lib.ConfigError as error:
            raise config_lib.ConfigError(f"{phase}.{error}") from None
        return config

    def done_marker(self, phase: str) -> Path:
        return self.phase_dir(phase) / "phase_done.json"

    def run(self, *, resume: bool = False, stop_after_phase: str | None = None) -> RunResult:
        c = self.config
        data = None
        if self.task is not None:  # process 0 writes the task's files, the others wait and read them
            data = self.task.write_data(self.out / "data", seed=c.seed, write=jax.process_index() == 0)
            barrier("pipeline task data")
        configs = {phase: self.phase_config(phase, data) for phase in c.phases}  # every section checked up front
        result = None
        for phase in c.phases:
            if resume and self.done_marker(phase).exists():
                log(f"pipeline: {phase} finished in an earlier run ({self.phase_dir(phase)}), skipping it")
                continue
            log(f"pipeline: phase {phase} -> {self.phase_dir(phase)}")
            result = self.commands[phase].run(configs[phase], resume=resume)
            if result.stopped_by is not None:
                log(f"pipeline stopped in phase {phase}; resume with the same command plus --resume")
                return result
            if jax.process_index() == 0:
                self.done_marker(phase).write_text(json.dumps({"phase": phase, "step": result.step, "eval": result.eval}))
            if phase == stop_after_phase and phase != c.phases[-1]:
                log(f"pipeline stopped after phase {phase} (--stop-after-phase); resume with --resume")
                return RunResult(result.step, "stop_after", result.eval, self.out)
        if self.task is not None and self.with_role("start") and self.commands[c.phases[-1]].role == "policy":
            self.write_summary(configs[c.phases[-1]])
        return result

    def judge(self, model_dir: Path, prompts, sampler: Sampler, sft) -> tuple[dict, list[dict]]:
        """Mean gold reward, EOS rate, length and KL to the SFT policy (k1 summed over the
        completion's actions, averaged) of the policy at ``model_dir`` on ``prompts``; the same
        prompts and random keys for every policy (and the same environment, for tool use). With
        them, the first sample of each of the first prompts and its gold reward (the report's)."""
        model = models.from_pretrained(model_dir)
        indices = np.arange(min(self.config.judge.prompts, len(prompts)))
        sampled = sampler(model, prompts, indices, jax.random.key(self.config.seed + 99))
        gold = [self.task.reward(p, c) for p, c in zip(sampled.prompts, sampled.completions)]
        rollout = sampled.rollout
        ids_BT, mask_BT = rollout.sequences()
        actions_BT = rollout.action_mask()
        log_ratio_BT = models.sequence_logprobs(model, ids_BT, mask_BT) - models.sequence_logprobs(sft, ids_BT, mask_BT)
        examples = [{"prompt": sampled.prompts[i], "completion": sampled.transcripts[i], "gold_reward": gold[i]}
                    for i in range(0, min(len(gold), SAMPLES * self.config.judge.samples), self.config.judge.samples)]
        return {"gold_reward": float(np.mean(gold)), "kl_to_sft": float(np.mean(np.sum(log_ratio_BT * actions_BT, 1))),
                "eos_rate": float(np.mean(to_host(rollout.stopped_B))),
                "completion_length": float(np.mean(np.sum(to_host(rollout.completion_mask_BN), 1)))} \
            | sampled.counts, examples

    def write_summary(self, final_config) -> dict:
        tokenizer = phase_tokenizer(final_config.tokenizer, final_config.model)
        _, held_out, _ = load_prompts(final_config.data, tokenizer)
        if held_out is None:
            log("pipeline: no held-out prompts (data.eval_size) to judge the policies on; no summary")
            return {}
        start, final = self.with_role("start"), self.config.phases[-1]
        sft = models.from_pretrained(self.phase_dir(start) / "hf")
        j = self.config.judge
        generation = GenerationConfig(max_new_tokens=j.max_new_tokens, stop_token_ids=stop_token_ids(tokenizer, final_config.tokenizer),
                                      pad_token_id=tokenizer.pad_token_id, num_samples=j.samples)
        rollout = final_config.rollout if isinstance(final_config, OnlineConfig) else RolloutConfig()
        environment = None if rollout.environment is None else load_environment(rollout.environment)
        sampler = Sampler(generation, rollout.completion_buckets, tokenizer, make_mesh(final_config.mesh), environment,
                          rollout.max_turns, final_config.mesh.sampler_rules)
        judged = {name: self.judge(self.phase_dir(name) / "hf", held_out, sampler, sft) for name in (start, final)}
        rows = {name: row for name, (row, _) in judged.items()}
        summary = {"task": self.task.name, "held_out_prompts": min(self.config.judge.prompts, len(held_out)),
                   "samples_per_prompt": self.config.judge.samples, "policies": rows,
                   "gold_reward_gain": rows[final]["gold_reward"] - rows[start]["gold_reward"]}
        curve = None
        if self.config.overoptimisation:
            curve = overoptimisation_curve(read_metrics(self.phase_dir(final) / "metrics.jsonl")[f"{final}/train"])
            summary["overoptimisation"] = {k: v for k, v in curve.items() if k != "series"}
        if jax.process_index() == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            log(f"summary ({self.task.name} task, gold reward = {self.task.reward_text}; "
                f"{summary['held_out_prompts']} held-out prompts x {summary['samples_per_prompt']} samples):")
            width = max(8, *map(len, rows))
            log(f"  {'policy':<{width}} {'gold reward':>11} {'KL to sft':>9} {'EOS rate':>9} {'length':>7}")
            for name, row in rows.items():
                log(f"  {name:<{width}} {row['gold_reward']:>11.3f} {row['kl_to_sft']:>9.2f} {row['eos_rate']:>9.2f} "
                    f"{row['completion_length']:>7.1f}")
            log(f"  {final} - {start} gold reward: {summary['gold_reward_gain']:+.3f}  (written to {self.out / 'summary.json'})")
            if self.config.overoptimisation:
                o = summary["overoptimisation"]
                log(f"  over-optimisation: the gold reward peaked at {o['gold_peak']:.3f} (KL {o['kl_at_gold_peak']:.1f}) "
                    f"and ended at {o['gold_final']:.3f} (KL {o['kl_final']:.1f}); the proxy went "
                    f"{o['proxy_at_gold_peak']:.3f} -> {o['proxy_final']:.3f}")
            report = write_pipeline_report(self.out, self.config.phases, summary,
                                           {name: examples for name, (_, examples) in judged.items()}, curve,
                                           start=start, reward_model=self.with_role("reward"))
            log(f"pipeline report: {report}")
        return summary


def run_pipeline(config: PipelineConfig, *, resume: bool = False, stop_after_phase: str | None = None) -> RunResult:
    return Pipeline(config).run(resume=resume, stop_after_phase=stop_after_phase)

"""The pipeline driver: SFT -> RM -> PPO (or -> DPO, -> GRPO, ...) in order, each phase
handing its exported checkpoint to the next, every phase checkpointed, ``--resume``
continuing at the phase and step where a run stopped.

Hand-offs (each only where the phase's own section does not set it):

- ``sft`` trains ``model.init`` from scratch (or ``sft.model.path``);
- ``rm`` starts from the SFT checkpoint (InstructGPT's recipe: a reward model initialised
  from the SFT model with a new score head);
- ``dpo``, ``simpo``, ``orpo``, ``iterative_dpo`` and the online phases (``ppo``, ``grpo``,
  ``rloo``, ``reinforce``, ``raft``, ``trpo``) start the policy (and a frozen reference) from
  the SFT checkpoint; the reward of those that score their own samples (iterative DPO's
  labeller, the online phases') is the RM checkpoint when there is an ``rm`` phase (PPO's
  critic starts from it too), else the built-in task's reward function.

With a built-in ``task`` (:mod:`rlhf_jax.tasks`), the pipeline writes the task's data under
``<output_dir>/data`` and ends by judging the SFT policy and the final policy with the task's
gold reward -- which generated the preferences but was never optimised directly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import models, tasks
from rlhf_jax.evaluation.report import SAMPLES, overoptimisation_curve, read_metrics, write_pipeline_report
from rlhf_jax.hosts import barrier, to_host
from rlhf_jax.phases import PHASES, run_phase
from rlhf_jax.phases.audit import audit_offline
from rlhf_jax.phases.algorithms import ALGORITHMS
from rlhf_jax.phases.iterative_dpo import IterativeDPOConfig, run_iterative_dpo
from rlhf_jax.phases.iterative_dpo import check_config as check_iterative_dpo
from rlhf_jax.phases.online import check_config, run_online
from rlhf_jax.phases.sampler import Sampler
from rlhf_jax.phases.online_config import OnlineConfig, RolloutConfig
from rlhf_jax.phases.console import log
from rlhf_jax.phases.runner import RunResult
from rlhf_jax.phases.setup import make_mesh, phase_tokenizer, stop_token_ids
from rlhf_jax.rl.prompts import load_prompts
from rlhf_jax.rl.environments import load_environment
from rlhf_jax.rollout import GenerationConfig

ONLINE = tuple(ALGORITHMS)
POLICY_PHASES = ("dpo", "simpo", "orpo", "iterative_dpo", *ONLINE)
ALL_PHASES = ("sft", "rm", *POLICY_PHASES)
LABELLED = ("iterative_dpo", *ONLINE)  # phases that score their own samples: the reward model's (or task's) hand-off
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


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    output_dir: str = "runs/pipeline"
    seed: int = 0
    task: str | None = "letters"  # a built-in task (data + gold reward); None: each phase names its data
    phases: tuple[str, ...] = ("sft", "rm", "ppo")
    model: dict = dataclasses.field(default_factory=lambda: {"init": dict(TINY_LLAMA)})  # the SFT phase's model
    tokenizer: dict = dataclasses.field(default_factory=lambda: {"name": "builtin:bytes"})
    metrics: dict = dataclasses.field(default_factory=dict)  # every phase's metrics section (e.g. progress: false)
    judge: JudgeConfig = JudgeConfig()
    # the over-optimisation run (Gao et al., 2022): the final online phase trains against the
    # reward model with no KL penalty (kl.beta 0) for 100 iterations (OVEROPTIMISATION), and
    # the report plots the task's gold reward and the proxy against the KL reached
    overoptimisation: bool = False
    # each phase's section: keys of that phase's config, over the pipeline's hand-offs and defaults
    sft: dict = dataclasses.field(default_factory=dict)
    rm: dict = dataclasses.field(default_factory=dict)
    dpo: dict = dataclasses.field(default_factory=dict)
    simpo: dict = dataclasses.field(default_factory=dict)
    orpo: dict = dataclasses.field(default_factory=dict)
    iterative_dpo: dict = dataclasses.field(default_factory=dict)
    ppo: dict = dataclasses.field(default_factory=dict)
    grpo: dict = dataclasses.field(default_factory=dict)
    rloo: dict = dataclasses.field(default_factory=dict)
    reinforce: dict = dataclasses.field(default_factory=dict)
    raft: dict = dataclasses.field(default_factory=dict)
    trpo: dict = dataclasses.field(default_factory=dict)

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "stages": "it is called phases now (one word for a unit of the pipeline): phases: [sft, rm, ppo]"}

    def __post_init__(self):
        if not isinstance(self.judge, JudgeConfig):  # a YAML config converts it; Python code builds it
            raise TypeError(f"judge should be a JudgeConfig(prompts=..., samples=..., max_new_tokens=...), got "
                            f"{type(self.judge).__name__}")
        phases = list(self.phases)
        unknown = [s for s in phases if s not in ALL_PHASES]
        if unknown:
            raise ValueError(f"phases: unknown phase {unknown[0]!r}; phases are {', '.join(ALL_PHASES)}")
        order = [ALL_PHASES.index(s) if s in ("sft", "rm") else len(ALL_PHASES) for s in phases]
        if order != sorted(order) or len(set(phases)) != len(phases):
            raise ValueError(f"phases {phases}: give each once, in the order sft, rm, then the policy phases")
        if self.task is None and self.judge != JudgeConfig():
            raise ValueError("judge has no effect without a task: the summary judges policies by a built-in task's "
                             "gold reward")
        if "sft" not in phases and self.model != PipelineConfig.__dataclass_fields__["model"].default_factory():
            raise ValueError("model is the sft phase's model and there is no sft phase; give each phase's "
                             "model.path in its own section")
        if self.overoptimisation and (self.task is None or "rm" not in phases or phases[-1] not in ONLINE
                                      or not ALGORITHMS[phases[-1]].uses_reference):
            raise ValueError("overoptimisation needs a task, an rm phase and a final online phase with a KL to its "
                             "reference (ppo, grpo, ...): it plots the task's gold reward against the KL reached")
        for phase in ALL_PHASES:
            if phase not in phases and getattr(self, phase):
                raise ValueError(f"{phase}: a section for a phase that is not in phases {phases}; add the phase "
                                 "or remove the section")


def _task_defaults(task: tasks.Task, data: dict[str, Path]) -> dict[str, dict]:
    """Small, fast settings of every phase for a built-in task (2 CPU cores: minutes): the
    generic ones below, under the task's own (``Task.pipeline_defaults``)."""
    generic = _generic_defaults(data)
    own = task.pipeline_defaults
    return {phase: config_lib.merge(settings, own.get(phase, own.get("online", {}) if phase in ONLINE else {}))
            for phase, settings in generic.items()}


def _generic_defaults(data: dict[str, Path]) -> dict[str, dict]:
    # the built-in tasks are plain text, not chats: no template around their prompts
    online = {"data": {"source": str(data["prompts"]), "format": "prompt", "max_length": 16, "eval_size": 64,
                       "chat_template": "never"},
              "rollout": {"prompts": 32, "max_new_tokens": 16},
              "kl": {"beta": 0.02},
              "reward": {"missing_eos_penalty": 0.2},
              "train": {"iterations": 40, "optimizer": {"learning_rate": 1e-3, "schedule": "constant"},
                        "eval_prompts": 32},
              "checkpoint": {"every": 10}}
    ppo = config_lib.merge(online, {"train": {"critic_optimizer": {"learning_rate": 1e-3, "schedule": "constant"}},
                          "ppo": {"epochs": 4, "minibatches": 2}})
    group = config_lib.merge(online, {"rollout": {"prompts": 8, "samples": 4}})
    trpo = online | {"train": {key: value for key, value in ppo["train"].items() if key != "optimizer"}}  # no optimiser
    raft = {key: value for key, value in group.items() if key != "kl"} | {"raft": {"epochs": 1}}  # no KL
    pairs = {"data": {"source": str(data["preferences"]), "format": "preference", "max_length": 32, "eval_size": 128,
                      "chat_template": "never"},
             "train": {"steps": 100, "batch_size": 32, "optimizer": {"learning_rate": 1e-4}},
             "checkpoint": {"every": 50}}
    return {
        "sft": {"data": {"source": str(data["sft"]), "format": "prompt_completion", "max_length": 32, "eval_size": 64,
                         "chat_template": "never"},
                "train": {"steps": 200, "batch_size": 32, "optimizer": {"learning_rate": 3e-3, "warmup_steps": 10}},
                "checkpoint": {"every": 50}},
        "rm": {"data": {"source": str(data["preferences"]), "format": "preference", "max_length": 32, "eval_size": 128,
                        "chat_template": "never"},
               "train": {"steps": 200, "batch_size": 32, "optimizer": {"learning_rate": 1e-3, "warmup_steps": 10}},
               "checkpoint": {"every": 50}},
        "dpo": pairs, "simpo": pairs, "orpo": pairs,
        "iterative_dpo": {"data": online["data"], "rollout": {"prompts": 128, "samples": 4, "max_new_tokens": 16},
                          "round": {"data": {"max_length": 32}, "checkpoint": {"every": 20},
                                    "train": {"steps": 40, "batch_size": 32, "optimizer": {"learning_rate": 1e-4}}}},
        "ppo": ppo, "reinforce": config_lib.merge(online, {"reinforce": {"epochs": 4, "minibatches": 2}}),
        "grpo": config_lib.merge(group, {"grpo": {"epochs": 1}}), "rloo": config_lib.merge(group, {"rloo": {"epochs": 1}}),
        "raft": raft,
        "trpo": trpo,
    }


@dataclasses.dataclass(frozen=True)
class _Runner:
    """How the pipeline builds, checks (its paths unchecked: earlier phases write them) and runs a phase."""

    config_cls: type
    check: Callable[[Any], None]
    run: Callable[..., RunResult]  # (config, *, resume) -> RunResult


def _runner(phase: str) -> _Runner:
    if phase in ONLINE:
        return _Runner(OnlineConfig, functools.partial(check_config, check_paths=False), run_online)
    if phase == "iterative_dpo":
        return _Runner(IterativeDPOConfig, functools.partial(check_iterative_dpo, check_paths=False), run_iterative_dpo)
    return _Runner(PHASES[phase].config_cls, functools.partial(audit_offline, phase=PHASES[phase], check_paths=False),
                   functools.partial(run_phase, PHASES[phase]))


class Pipeline:
    def __init__(self, config: PipelineConfig):
        self.config, self.out = config, Path(config.output_dir)
        self.task = tasks.get(config.task) if config.task is not None else None

    def phase_dir(self, phase: str) -> Path:
        return self.out / phase

    def hand_offs(self, phase: str) -> dict[str, Any]:
        c, phases = self.config, self.config.phases
        mapping: dict[str, Any] = {"output_dir": str(self.phase_dir(phase)), "seed": c.seed, "tokenizer": c.tokenizer,
                                 "metrics": c.metrics}
        sft_hf = str(self.phase_dir("sft") / "hf") if "sft" in phases else None
        if phase == "sft":
            mapping["model"] = c.model
        elif sft_hf is not None:
            mapping["model"] = {"path": sft_hf}
        if phase in ONLINE:
            mapping["algorithm"] = phase
        if phase in LABELLED:
            if "rm" in phases:
                mapping["reward"] = {"model": str(self.phase_dir("rm") / "hf")}
                if phase in ONLINE and self.task is not None:  # the gold reward beside the proxy, for the report
                    mapping["reward"]["monitor"] = f"builtin:{self.task.name}"
            elif self.task is not None:
                mapping["reward"] = {"function": f"builtin:{self.task.name}"}
        return mapping

    def phase_config(self, phase: str, data: dict[str, Path] | None):
        defaults = _task_defaults(self.task, data)[phase] if data is not None else {}
        if self.config.overoptimisation and phase == self.config.phases[-1]:
            defaults = config_lib.merge(defaults, OVEROPTIMISATION)
        mapping = config_lib.merge(config_lib.merge(defaults, self.hand_offs(phase)), getattr(self.config, phase))
        runner = _runner(phase)
        config = config_lib.from_dict(runner.config_cls, mapping, prefix=f"{phase}.")
        try:  # check_paths=False: earlier phases write the checkpoints
            runner.check(config)
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
            result = _runner(phase).run(configs[phase], resume=resume)
            if result.stopped_by is not None:
                log(f"pipeline stopped in phase {phase}; resume with the same command plus --resume")
                return result
            if jax.process_index() == 0:
                self.done_marker(phase).write_text(json.dumps({"phase": phase, "step": result.step, "eval": result.eval}))
            if phase == stop_after_phase and phase != c.phases[-1]:
                log(f"pipeline stopped after phase {phase} (--stop-after-phase); resume with --resume")
                return RunResult(result.step, "stop_after", result.eval, self.out)
        if self.task is not None and c.phases[0] == "sft" and c.phases[-1] in POLICY_PHASES:
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
        final = self.config.phases[-1]
        sft = models.from_pretrained(self.phase_dir("sft") / "hf")
        j = self.config.judge
        generation = GenerationConfig(max_new_tokens=j.max_new_tokens, stop_token_ids=stop_token_ids(tokenizer, final_config.tokenizer),
                                      pad_token_id=tokenizer.pad_token_id, num_samples=j.samples)
        rollout = final_config.rollout if isinstance(final_config, OnlineConfig) else RolloutConfig()
        environment = None if rollout.environment is None else load_environment(rollout.environment)
        sampler = Sampler(generation, rollout.completion_buckets, tokenizer, make_mesh(final_config.mesh), environment,
                          rollout.max_turns, final_config.mesh.sampler_rules)
        judged = {name: self.judge(self.phase_dir(name) / "hf", held_out, sampler, sft) for name in ("sft", final)}
        rows = {name: row for name, (row, _) in judged.items()}
        summary = {"task": self.task.name, "held_out_prompts": min(self.config.judge.prompts, len(held_out)),
                   "samples_per_prompt": self.config.judge.samples, "policies": rows,
                   "gold_reward_gain": rows[final]["gold_reward"] - rows["sft"]["gold_reward"]}
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
            log(f"  {final} - sft gold reward: {summary['gold_reward_gain']:+.3f}  (written to {self.out / 'summary.json'})")
            if self.config.overoptimisation:
                o = summary["overoptimisation"]
                log(f"  over-optimisation: the gold reward peaked at {o['gold_peak']:.3f} (KL {o['kl_at_gold_peak']:.1f}) "
                    f"and ended at {o['gold_final']:.3f} (KL {o['kl_final']:.1f}); the proxy went "
                    f"{o['proxy_at_gold_peak']:.3f} -> {o['proxy_final']:.3f}")
            report = write_pipeline_report(self.out, self.config.phases, summary,
                                           {name: examples for name, (_, examples) in judged.items()}, curve)
            log(f"pipeline report: {report}")
        return summary


def run_pipeline(config: PipelineConfig, *, resume: bool = False, stop_after_phase: str | None = None) -> RunResult:
    return Pipeline(config).run(resume=resume, stop_after_phase=stop_after_phase)

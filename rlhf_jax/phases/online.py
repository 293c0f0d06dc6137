"""The online algorithms (PPO, GRPO, RLOO, REINFORCE, RAFT; ``phases.algorithms``) as jobs of
the one run loop (``phases.loop``): one iteration is

    prompts (a pure function of seed and iteration) -> rollout [C] (one compiled sampler per
    bucket) -> text -> reward source (model and/or function) -> shaped scores -> one jitted
    call: experience + the whole epochs x minibatches update + the KL controller.

The state threaded through it -- :class:`OnlineState`: the policy's and critic's train states,
the KL coefficient, the iteration -- is checkpointed whole, and every random draw is derived
from (seed, iteration), so a run stopped at iteration k and resumed in a new process is bit
for bit the run that never stopped (on CPU)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import __version__, kl
from rlhf_jax.config import ConfigError
from rlhf_jax.data import batch_indices, has_tokenizer, load_tokenizer
from rlhf_jax.metrics import peak_memory
from rlhf_jax.models import ScoreModel
from rlhf_jax.models.hf import has_score_head
from rlhf_jax.hosts import to_global, to_host
from rlhf_jax.models.sharding import place, rows_sharding
from rlhf_jax.phases.algorithms import ALGORITHMS, OnlineState, sampling_config
from rlhf_jax.phases.audit import audit_online
from rlhf_jax.phases.config import ModelConfig
from rlhf_jax.phases.online_config import OnlineConfig, RewardConfig, RewardSource
from rlhf_jax.phases.console import log
from rlhf_jax.phases.loop import Job, RunResult, run_loop
from rlhf_jax.phases.runner import export_hf
from rlhf_jax.data.fingerprint import fingerprint
from rlhf_jax.phases.setup import BATCH_AXES, build_model, make_mesh, phase_tokenizer, stop_token_ids
from rlhf_jax.run_lock import OutputDirLock
from rlhf_jax.rl.dynamic_sampling import Draw, dynamic_sample
from rlhf_jax.rl.environments import load_environment
from rlhf_jax.rl.multi_turn import multi_turn_rollout, token_ids_containing
from rlhf_jax.rl.process_rewards import ProcessReward
from rlhf_jax.rl.prompts import Prompts, load_prompts
from rlhf_jax.rl.rewards import (FunctionReward, RewardError, ModelReward, SumReward, load_function, overlong_penalty,
                                 shape_scores)
from rlhf_jax.rollout import GenerationConfig, Rollout, decode_completions, generate, trim_completions
from rlhf_jax.train import TrainState, make_optimizer
from rlhf_jax.train.guard import check_nonfinite_streak


def check_config(config: OnlineConfig, *, check_paths: bool = True) -> None:
    """Errors for a config the algorithm cannot run or would partly ignore (``phases.audit``),
    raised before any data is read or directory written."""
    audit_online(config, check_paths=check_paths)
    algorithm, r = ALGORITHMS[config.algorithm], config.rollout
    section = algorithm.section(config)
    if algorithm.compares_samples and r.samples < 2:
        raise ConfigError(f"algorithm {config.algorithm} compares samples of a prompt: set rollout.samples >= 2")
    rows = algorithm.rows_per_iteration(config)
    if rows % section.minibatches:
        raise ConfigError(f"{config.algorithm}.minibatches={section.minibatches} does not divide the {rows} rows an "
                          f"iteration of {config.algorithm} trains on")
    micro = getattr(section, "micro_batches", 1)
    if (rows // section.minibatches) % micro:
        raise ConfigError(f"{config.algorithm}.micro_batches={micro} does not divide the {rows // section.minibatches} "
                          f"rows of a minibatch ({rows} rows / {section.minibatches} minibatches); choose a divisor")
    updates = config.train.iterations * section.epochs * section.minibatches
    for name, optimizer in (("optimizer", config.train.optimizer), ("critic_optimizer", config.train.critic_optimizer)):
        if optimizer.total_steps is None and optimizer.warmup_steps > updates:
            raise ConfigError(f"train.{name}.warmup_steps={optimizer.warmup_steps} exceeds the run's {updates} "
                              "updates (iterations x epochs x minibatches); lower the warm-up or train longer")
    if config.reward.overlong_buffer is not None and config.reward.overlong_buffer > r.max_new_tokens:
        raise ConfigError(f"reward.overlong_buffer={config.reward.overlong_buffer} exceeds rollout.max_new_tokens="
                          f"{r.max_new_tokens}: the penalty ramps over the last overlong_buffer tokens of a completion")
    if r.environment is not None:  # found (imported) now, not after the earlier phases of a pipeline ran
        try:
            load_environment(r.environment)
        except RewardError as error:
            raise ConfigError(f"rollout.environment: {error}") from None
    if config.reward.model is None and config.reward.function is None and not config.reward.sources:
        raise ConfigError("reward: give reward.model (a reward-model checkpoint), reward.function, both, or "
                          "reward.sources (named objectives)")


def refuse_untrained_head(path: str, what: str) -> None:
    """``ConfigError`` naming the config key ``what`` when checkpoint ``path``, which is to
    score (a reward model, a process reward model, a judge), has no trained score head: a
    language model's would be drawn at random, and its scores would be noise."""
    if not has_score_head(path):
        raise ConfigError(f"{what}={path} has no trained score head (it is a language model, whose score head would "
                          "be random); give a reward model's checkpoint, e.g. the rm (or prm) phase's <output_dir>/hf")


def build_model_reward(c: RewardConfig | RewardSource, policy_tokenizer, mesh, *, seed: int,
                       what: str = "reward.model", name: str | None = None):
    """A :class:`ModelReward` on checkpoint ``c.model`` with its own tokenizer (``c.tokenizer``,
    else the checkpoint's, else the policy's), placed on ``mesh``, scoring its batches split
    over the batch axes."""
    if c.tokenizer is not None or has_tokenizer(c.model):
        tokenizer = load_tokenizer(c.tokenizer or c.model, pad_token=c.pad_token, needs_eos=False)
    else:
        tokenizer = policy_tokenizer
    refuse_untrained_head(c.model, what)
    model = place(build_model(ModelConfig(path=c.model), "score", tokenizer=tokenizer, seed=seed, what=what), mesh)
    return ModelReward(model, tokenizer, max_length=c.max_length, name=name or c.model,
                       max_prompt_length=c.max_prompt_length,
                       rows_sharding=lambda rows: rows_sharding(mesh, rows, BATCH_AXES))


def build_reward(c: RewardConfig, policy_tokenizer, mesh, *, seed: int, what: str = "reward.model"):
    """The reward source of ``c`` (see :mod:`rlhf_jax.rl.rewards`): a model, a function, their
    weighted sum, or the weighted sum of the named ``c.sources``; a reward model is placed on
    ``mesh`` and scores its batches split over the batch axes."""
    section = what.split(".")[0]

    def function(spec: str, name: str) -> FunctionReward:
        return FunctionReward(load_function(spec), name, on_error=c.on_error, penalty=c.penalty, section=section)

    if c.sources:
        return SumReward([(s.weight, build_model_reward(s, policy_tokenizer, mesh, seed=seed, name=s.name,
                                                        what=f"{section}.sources.{s.name}.model")
                           if s.model is not None else function(s.function, s.name), s.whiten) for s in c.sources])
    parts = []
    if c.model is not None:
        parts.append((c.model_weight, build_model_reward(c, policy_tokenizer, mesh, seed=seed, what=what)))
    if c.function is not None:
        parts.append((c.function_weight, function(c.function, c.function)))
    return parts[0][1] if len(parts) == 1 and parts[0][0] == 1.0 else SumReward(parts)


def build_process_reward(c: RewardConfig, policy_tokenizer, mesh, *, seed: int) -> ProcessReward | None:
    """The step rewards of ``c.process_model`` (``rl.process_rewards``), placed on ``mesh``;
    None without one. Raises ``ConfigError`` when its checkpoint carries a tokenizer other than
    the policy's: it reads the policy's token ids."""
    if c.process_model is None:
        return None
    if has_tokenizer(c.process_model) and load_tokenizer(c.process_model).get_vocab() != policy_tokenizer.get_vocab():
        raise ConfigError(f"reward.process_model={c.process_model} has a tokenizer other than the policy's; a process "
                          "reward model reads the policy's tokens: train it from the policy's checkpoint (rlhf-jax prm "
                          "with model.path: the SFT model)")
    refuse_untrained_head(c.process_model, "reward.process_model")
    prm = place(build_model(ModelConfig(path=c.process_model), "score", tokenizer=policy_tokenizer, seed=seed,
                            what="reward.process_model"), mesh)
    return ProcessReward(prm, policy_tokenizer, c.process_weight)


def build_monitor(c: RewardConfig) -> FunctionReward | None:
    """``c.monitor``, a function scored on every batch and logged but never optimised (a task's
    gold reward beside the reward model the policy trains on), failing as ``c.on_error`` says;
    None without one."""
    if c.monitor is None:
        return None
    return FunctionReward(load_function(c.monitor, "reward.monitor"), c.monitor, on_error=c.on_error,
                          penalty=c.penalty, role="reward.monitor")


def build_critic(config: OnlineConfig, policy, tokenizer):
    """PPO's critic, reading the policy's tokens (``tokenizer``): ``config.critic``; else the
    reward model's weights (InstructGPT); else the policy's decoder with a fresh value head."""
    if config.critic is not None:
        return build_model(config.critic, "score", tokenizer=tokenizer, seed=config.seed + 1, what="critic")
    if config.reward.model is not None:
        critic = build_model(ModelConfig(path=config.reward.model), "score", tokenizer=tokenizer, seed=config.seed + 1,
                             what="critic (from reward.model)")
        if critic.config.vocab_size != len(tokenizer) and critic.config.vocab_size != policy.config.vocab_size:
            raise ConfigError(f"the reward model {config.reward.model} has a vocabulary of {critic.config.vocab_size} "
                              f"tokens, the policy's tokenizer {len(tokenizer)}: it cannot initialise the critic, which "
                              "reads the policy's tokens. Give a critic: section (e.g. critic.path: the SFT checkpoint)")
        return critic
    return ScoreModel.from_causal_lm(policy, rngs=nnx.Rngs(config.seed + 1))


@dataclasses.dataclass(frozen=True)
class Sampled:
    """A sampled batch: the rollout, each row's prompt text, the completion text a reward reads
    (the last turn of an episode), the completion as written (turns and replies) and counts."""

    rollout: Rollout
    prompts: list[str]
    completions: list[str]
    transcripts: list[str]
    counts: dict


class Sampler:
    """Prompts -> placed, left-padded batches -> rollouts and their text: ``generation``'s
    sampler, completions trimmed to the smallest of ``buckets`` that holds them; with an
    ``environment``, multi-turn episodes of up to ``max_turns`` turns (``rl.multi_turn``)."""

    def __init__(self, generation: GenerationConfig, buckets: tuple[int, ...], tokenizer, mesh,
                 environment=None, max_turns: int = 1):
        self.generation, self.buckets, self.tokenizer, self.mesh = generation, buckets, tokenizer, mesh
        self.environment, self.max_turns = environment, max_turns
        # the tokens that end a tool call: one scan of the vocabulary, not one per batch
        self.call_end_ids = None if environment is None else token_ids_containing(tokenizer, environment.call_end)

    @classmethod
    def for_config(cls, config: OnlineConfig, tokenizer, mesh, checkpoint: str | None) -> Sampler:
        """The sampler of ``config.rollout`` (its ``environment`` loaded), stopping at every EOS id
        the policy's ``checkpoint`` declares and at ``config.tokenizer.stop_tokens``
        (:func:`~rlhf_jax.phases.setup.stop_token_ids`)."""
        r = config.rollout
        generation = GenerationConfig(
            max_new_tokens=r.max_new_tokens, stop_token_ids=stop_token_ids(tokenizer, config.tokenizer, checkpoint),
            pad_token_id=tokenizer.pad_token_id,
            sampling=sampling_config(config), num_samples=r.samples)
        environment = None if r.environment is None else load_environment(r.environment)
        return cls(generation, r.completion_buckets, tokenizer, mesh, environment, r.max_turns)

    def __call__(self, model, prompts: Prompts, indices: np.ndarray, key, samples: int | None = None) -> Sampled:
        """``samples`` (default the config's) completions of each of the prompts ``indices``."""
        ids, mask = prompts.batch(indices, self.tokenizer.pad_token_id)
        sharding = rows_sharding(self.mesh, len(indices), BATCH_AXES)
        ids, mask = (to_global(a, sharding) for a in (ids, mask))  # every process holds every prompt row
        config = self.generation if samples is None else dataclasses.replace(self.generation, num_samples=samples)
        n = config.num_samples
        texts = [prompts.texts[i] for i in indices for _ in range(n)]
        if self.environment is None:
            rollout = trim_completions(generate(model, ids, mask, key, config), self.buckets)
            completions = decode_completions(self.tokenizer, rollout)
            return Sampled(rollout, texts, completions, completions, {})
        rows = rows_sharding(self.mesh, len(indices) * n, BATCH_AXES)
        episodes = multi_turn_rollout(model, ids, mask, key, config, self.tokenizer, self.environment,
                                      [prompts.texts[i] for i in indices], max_turns=self.max_turns,
                                      buckets=self.buckets, place=lambda a: to_global(a, rows),
                                      call_end_ids=self.call_end_ids)
        rollout = jax.tree.map(lambda a: to_global(a, rows), episodes.rollout)
        counts = {"turns": float(episodes.turns_B.mean()), "tool_calls": float(episodes.tool_calls_B.mean())}
        return Sampled(rollout, texts, episodes.final_turns, episodes.transcripts, counts)


def run_online(config: OnlineConfig, *, resume: bool = False, stop_after: int | None = None) -> RunResult:
    """Run the online phase of ``config`` (see the module docstring): the config checked
    before anything is read, then the run, holding the output directory's lock. Raises as
    :func:`rlhf_jax.phases.run_phase` does, and ``RewardError``."""
    check_config(config)
    with OutputDirLock(config.output_dir, enabled=jax.process_index() == 0):
        return _train(config, resume=resume, stop_after=stop_after)


def _train(config: OnlineConfig, *, resume: bool, stop_after: int | None) -> RunResult:
    return run_loop(_job(config), config, resume=resume, stop_after=stop_after)


def _job(config: OnlineConfig) -> Job:
    """The online run as a job of the one loop (``phases.loop``); its closures hold the only
    references to the reward, the reference model and the compiled iteration."""
    out, t = Path(config.output_dir), config.train
    mesh = make_mesh(config.mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    shards = int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))
    if config.rollout.prompts % shards:
        raise ConfigError(f"rollout.prompts={config.rollout.prompts} does not split over the {shards} devices of the "
                          f"mesh's batch axes {BATCH_AXES}; make it a multiple of {shards}")
    tokenizer = phase_tokenizer(config.tokenizer, config.model)
    prompts, eval_prompts, reports = load_prompts(config.data, tokenizer)
    for report in reports:
        log(report.summary())
    if len(prompts) < config.rollout.prompts:
        raise ConfigError(f"rollout.prompts={config.rollout.prompts} exceeds the {len(prompts)} training prompts")
    reward = build_reward(config.reward, tokenizer, mesh, seed=config.seed)
    process = build_process_reward(config.reward, tokenizer, mesh, seed=config.seed)
    monitor = build_monitor(config.reward)

    def monitored(prompt_texts, completions) -> dict:
        """The monitor's mean score of these completions (nothing without a monitor)."""
        return {} if monitor is None else {"monitor_score_mean": float(np.mean(monitor(prompt_texts, completions)[0]))}
    algorithm = ALGORITHMS[config.algorithm]
    log(f"{config.algorithm}: reward = {reward.name}; {config.rollout.prompts} prompts x {config.rollout.samples} "
        f"samples per iteration, {t.iterations} iterations")

    policy_model = build_model(config.model, "lm", tokenizer=tokenizer, seed=config.seed, what="policy")
    reference = None if config.model.lora is not None or not algorithm.uses_reference else place(build_model(
        dataclasses.replace(config.model, lora=None), "lm", tokenizer=tokenizer, seed=config.seed, what="reference"), mesh)
    section = algorithm.section(config)
    updates = t.iterations * section.epochs * section.minibatches  # optimiser steps in the run
    policy_tx, critic_tx = (make_optimizer(dataclasses.replace(c, total_steps=c.total_steps or updates))
                            for c in (t.optimizer, t.critic_optimizer))
    critic = None
    if algorithm.needs_critic:
        critic = TrainState.create(build_critic(config, policy_model, tokenizer), critic_tx, jax.random.key(config.seed + 1))
    controller = (kl.fixed_kl_controller(config.kl.beta) if config.kl.target is None else
                  kl.adaptive_kl_controller(config.kl.beta, config.kl.target, config.kl.horizon))
    state = algorithm.init(config, TrainState.create(policy_model, policy_tx, jax.random.key(config.seed)), critic,
                           controller.init())
    state = place(state, mesh)
    del policy_model, critic  # the state holds the arrays (placed copies on a mesh): no second reference

    config_dict = dataclasses.asdict(config)
    data_position = {"prompts": len(prompts), "seed": config.seed, "prompts_per_iteration": config.rollout.prompts,
                     "fingerprint": fingerprint(prompts.ids)}
    update = algorithm.make_iteration(config, policy_tx, critic_tx, controller)
    sample = Sampler.for_config(config, tokenizer, mesh, config.model.path)
    base_key = jax.random.key(config.seed)
    widths: set[tuple[int, int]] = set()  # (prompt, completion) bucket widths met: one update program each
    seconds = [0.0, 0.0]  # an iteration's generation and reward seconds, over its sampling rounds
    episode_counts: dict = {}  # multi-turn episodes: mean turns and tool calls of the last draw

    def draw(model, iteration: int, key, round_: int) -> Draw:
        """Round ``round_`` of an iteration's sampling: the iteration's prompts first, then (dynamic
        sampling) a fresh draw of prompts per round, each from (seed, iteration, round)."""
        if round_ == 0:
            indices = batch_indices(config.seed, iteration, len(prompts), config.rollout.prompts)
            round_key = jax.random.fold_in(key, 0)
        else:
            indices = np.random.default_rng([config.seed, iteration, round_]).choice(
                len(prompts), config.rollout.prompts, replace=False)
            round_key = jax.random.fold_in(jax.random.fold_in(key, 2), round_)
        tick = time.perf_counter()
        sampled = sample(model, prompts, indices, round_key)
        seconds[0] += time.perf_counter() - tick
        tick = time.perf_counter()
        scores, penalised = reward(sampled.prompts, sampled.completions)
        seconds[1] += time.perf_counter() - tick
        episode_counts.update(sampled.counts)
        compared = None if not config.rollout.dynamic_sampling else np.asarray(to_host(
            shape(sampled.rollout, to_global(scores, replicated), whiten=False, clip=None)))  # what the filter compares
        return Draw(sampled.rollout, sampled.prompts, sampled.completions, scores, penalised, compared)

    def shape(rollout, scores, *, whiten: bool, clip: float | None):
        """The score the policy optimises (``rl.rewards.shape_scores`` with ``reward.*``)."""
        r = config.reward
        overlong = None if r.overlong_buffer is None else overlong_penalty(
            jnp.sum(rollout.completion_mask_BN, axis=1), config.rollout.max_new_tokens, r.overlong_buffer)
        return shape_scores(scores, rollout.stopped_B, overlong=overlong, missing_eos_penalty=r.missing_eos_penalty,
                            whiten=whiten, clip=clip)

    def draw_batch(model, iteration: int, key) -> tuple[Draw, dict]:
        """The iteration's scored rollout and the dynamic-sampling counts (none without it); the
        generation and reward seconds in ``seconds``."""
        seconds[:] = [0.0, 0.0]
        episode_counts.clear()
        r = config.rollout
        if not r.dynamic_sampling:
            return draw(model, iteration, key, 0), {}
        batch, counts = dynamic_sample(lambda round_: draw(model, iteration, key, round_), r.prompts, r.samples,
                                       r.max_sampling_rounds, tokenizer.pad_token_id)
        sharding = rows_sharding(mesh, len(batch.scores_B), BATCH_AXES)
        return dataclasses.replace(batch, rollout=jax.tree.map(lambda a: to_global(a, sharding), batch.rollout)), counts

    def step(state: OnlineState, iteration: int, report: bool):
        key = jax.random.fold_in(base_key, iteration)
        tick = time.perf_counter()
        batch, sampling = draw_batch(state.policy.model(), iteration, key)
        rollout, completions, raw_scores = batch.rollout, batch.completions, batch.scores_B
        scored = time.perf_counter()
        widths.add((rollout.prompt_mask_BP.shape[1], rollout.completion_mask_BN.shape[1]))
        scores = shape(rollout, to_global(raw_scores, replicated), whiten=config.reward.whiten, clip=config.reward.clip)
        step_rewards = None if process is None else process(rollout)
        state, metrics = update(state, reference, rollout, scores, jax.random.fold_in(key, 1), step_rewards)
        streaks = [s.nonfinite_streak for s in (state.policy, state.critic) if s is not None]
        check_nonfinite_streak(int(max(to_host(streaks))), t.max_nonfinite, step=iteration + 1, unit="iteration")
        if not report:
            return state, None
        trained = time.perf_counter()
        objectives = {f"reward_{name}": v for name, v in reward.components.items()} if isinstance(reward, SumReward) \
            else {}
        stopped_B, completion_mask_BN = to_host((rollout.stopped_B, rollout.completion_mask_BN))
        new_tokens = float(np.sum(completion_mask_BN))
        values = {k: float(v) for k, v in to_host(metrics).items()}
        return state, values | {
            "score_mean": float(raw_scores.mean()), "score_std": float(raw_scores.std()), "penalised": batch.penalised,
            "eos_rate": float(np.mean(stopped_B)), "completion_length": new_tokens / len(completions),
            "generation_seconds": seconds[0], "reward_seconds": seconds[1],
            "training_seconds": trained - scored, "tokens_per_second": new_tokens / (trained - tick),
            **peak_memory(), "update_programs": len(widths)} | reward.truncations() | sampling \
            | episode_counts | objectives | monitored(batch.texts, completions)

    def evaluate(state: OnlineState) -> dict:
        if eval_prompts is None:
            return {}
        n = t.eval_samples
        indices = np.arange(min(t.eval_prompts, len(eval_prompts)))
        sampled = sample(state.policy.model(), eval_prompts, indices, jax.random.key(config.seed + 7), samples=n)
        scores, penalised = reward(sampled.prompts, sampled.completions)
        scores_PN = scores.reshape(-1, n)
        if jax.process_index() == 0:
            with open(out / "samples.jsonl", "w") as f:
                for i in range(0, len(scores), n):
                    f.write(json.dumps({"prompt": sampled.prompts[i], "completion": sampled.transcripts[i],
                                        "score": float(scores[i])}) + "\n")
        stopped_B, completion_mask_BN = to_host((sampled.rollout.stopped_B, sampled.rollout.completion_mask_BN))
        return {"score_mean": float(scores.mean()), f"best_of_{n}_score_mean": float(scores_PN.max(1).mean()),
                "eos_rate": float(np.mean(stopped_B)), "penalised": penalised,
                "completion_length": float(np.mean(np.sum(completion_mask_BN, 1)))} | sampled.counts \
            | monitored(sampled.prompts, sampled.completions)

    def meta(iteration: int) -> dict:
        return {"phase": config.algorithm, "step": iteration, "version": __version__, "config": config_dict,
                "data": data_position}

    def finish(policy) -> None:
        if config.checkpoint.export_hf:
            export_hf(policy, tokenizer, out, f"{config.algorithm} policy", stop_ids=sample.generation.stop_token_ids,
                      source=config.model.path)

    return Job(config.algorithm, "iteration", t.iterations, t.log_every, t.eval_every,
               {"score": "score_mean", "kl": "kl"}, position=lambda state: int(state.iteration), step=step,
               evaluate=evaluate, meta=meta, trained_model=lambda state: state.policy.model(), finish=finish,
               state=state, data=data_position)

"""The online algorithms (PPO, GRPO, RLOO, REINFORCE, RAFT; ``phases.algorithms``) as jobs of
the one run loop (``phases.loop``): one iteration is

    prompts (a pure function of seed and iteration) -> rollout (one compiled sampler per
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
from rlhf_jax.data import batch_indices
from rlhf_jax.data.fingerprint import fingerprint
from rlhf_jax.hosts import to_global, to_host
from rlhf_jax.metrics import peak_memory
from rlhf_jax.models import ScoreModel
from rlhf_jax.models.sharding import activation_sharding, place, rules_of, rows_sharding
from rlhf_jax.phases.algorithms import ALGORITHMS, OnlineState
from rlhf_jax.phases.audit import audit_online
from rlhf_jax.phases.config import ModelConfig
from rlhf_jax.phases.console import log
from rlhf_jax.phases.loop import Job, RunResult, run_loop
from rlhf_jax.phases.online_config import OnlineConfig
from rlhf_jax.phases.reward_sources import build_monitor, build_process_reward, build_reward
from rlhf_jax.phases.runner import export_hf
from rlhf_jax.phases.sampler import Sampler
from rlhf_jax.phases.setup import BATCH_AXES, build_model, make_mesh, phase_tokenizer
from rlhf_jax.rl.dynamic_sampling import Draw, dynamic_sample
from rlhf_jax.rl.environments import load_environment
from rlhf_jax.rl.prompts import load_prompts
from rlhf_jax.rl.rewards import RewardError, SumReward, overlong_penalty, shape_scores
from rlhf_jax.rl.scorer_prompts import PromptTable
from rlhf_jax.run_lock import OutputDirLock
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


def run_online(config: OnlineConfig, *, resume: bool = False, stop_after: int | None = None) -> RunResult:
    """Run the online phase of ``config`` (see the module docstring): the config checked
    before anything is read, then the run, holding the output directory's lock. Raises as
    :func:`rlhf_jax.phases.run_phase` does, and ``RewardError``."""
    check_config(config)
    with OutputDirLock(config.output_dir, enabled=jax.process_index() == 0), activation_sharding():
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
    reward = build_reward(config.reward, tokenizer, mesh, seed=config.seed,
                          prompts=PromptTable.of(prompts, eval_prompts))
    process = build_process_reward(config.reward, tokenizer, mesh, seed=config.seed)
    monitor = build_monitor(config.reward)

    def monitored(prompt_texts, completions) -> dict:
        """The monitor's mean score of these completions and how many of them its failure
        scored ``reward.penalty`` (nothing without a monitor)."""
        if monitor is None:
            return {}
        scores, penalised = monitor(prompt_texts, completions)
        return {"monitor_score_mean": float(np.mean(scores)), "monitor_penalised": penalised}
    algorithm = ALGORITHMS[config.algorithm]
    log(f"{config.algorithm}: reward = {reward.name}; {config.rollout.prompts} prompts x {config.rollout.samples} "
        f"samples per iteration, {t.iterations} iterations")

    policy_model = build_model(config.model, "lm", tokenizer=tokenizer, seed=config.seed, what="policy")
    reference = None if config.model.lora is not None or not algorithm.uses_reference else place(build_model(
        dataclasses.replace(config.model, lora=None), "lm", tokenizer=tokenizer, seed=config.seed, what="reference"), mesh,
        rules_of(mesh, frozen=True))
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
               {"score": "score_mean", "kl(k3)": "kl_k3"}, position=lambda state: int(state.iteration), step=step,
               evaluate=evaluate, meta=meta, trained_model=lambda state: state.policy.model(), finish=finish,
               state=state, data=data_position)

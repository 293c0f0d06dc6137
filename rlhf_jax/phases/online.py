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
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from rlhf_jax import __version__, kl
from rlhf_jax.config import ConfigError
from rlhf_jax.data.fingerprint import fingerprint
from rlhf_jax.models import ScoreModel
from rlhf_jax.models.sharding import activation_sharding, place, rules_of
from rlhf_jax.phases.algorithms import ALGORITHMS
from rlhf_jax.phases.audit import audit_online
from rlhf_jax.phases.config import ModelConfig
from rlhf_jax.phases.console import log
from rlhf_jax.phases.loop import Job, RunResult, run_loop
from rlhf_jax.phases.online_config import OnlineConfig
from rlhf_jax.phases.online_iteration import OnlineIteration
from rlhf_jax.phases.reward_sources import build_monitor, build_process_reward, build_reward
from rlhf_jax.phases.runner import export_hf
from rlhf_jax.phases.sampler import Sampler
from rlhf_jax.plan.preflight import preflight
from rlhf_jax.phases.setup import BATCH_AXES, build_model, make_mesh, phase_tokenizer
from rlhf_jax.rl.environments import load_environment
from rlhf_jax.rl.prompts import load_prompts
from rlhf_jax.rl.rewards import RewardError
from rlhf_jax.rl.scorer_prompts import PromptTable
from rlhf_jax.rollout.continuous import pages_for
from rlhf_jax.run_lock import OutputDirLock
from rlhf_jax.train import TrainState, make_optimizer


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
    if r.max_policy_lag >= config.train.iterations:
        raise ConfigError(f"rollout.max_policy_lag={r.max_policy_lag} is not below train.iterations="
                          f"{config.train.iterations}: every batch would be drawn by the starting policy (and the "
                          "state would keep that many copies of it); use a lag below the iterations, e.g. 1")
    if r.engine == "continuous" and r.cache_pages:  # the longest request: a whole prompt and all but its last token
        longest = pages_for((config.data.max_prompt_length or config.data.max_length) + max(r.max_new_tokens - 1, 1),
                            r.page_size)
        if r.cache_pages < longest:
            raise ConfigError(f"rollout.cache_pages={r.cache_pages} cannot hold the longest request (a prompt of up to "
                              f"{config.data.max_prompt_length or config.data.max_length} tokens and "
                              f"{r.max_new_tokens} new ones on pages of {r.page_size}: {longest} pages); raise it to "
                              f"{longest}, or 0 for a pool sized for every slot")
    if r.max_policy_lag and getattr(section, "tis_cap", 0) is None:
        raise ConfigError(f"rollout.max_policy_lag={r.max_policy_lag} trains on batches an older policy sampled: set "
                          f"{algorithm.section_key}.tis_cap (e.g. 2.0) so the update reweights each token by "
                          "min(pi_old / pi_sampler, tis_cap) (truncated importance sampling)")
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
    """The online run as a job of the one loop (``phases.loop``): the models, the reward and the
    compiled iteration built from ``config``, their callbacks an :class:`OnlineIteration`'s."""
    out, t = Path(config.output_dir), config.train
    mesh = make_mesh(config.mesh)
    shards = int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))
    if config.rollout.prompts % shards:
        raise ConfigError(f"rollout.prompts={config.rollout.prompts} does not split over the {shards} devices of the "
                          f"mesh's batch axes {BATCH_AXES}; make it a multiple of {shards}")
    preflight(config.algorithm, config, mesh)
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
    state = place(state, mesh).lagged(config.rollout.max_policy_lag)  # the copies made where the weights are
    del policy_model, critic  # the state holds the arrays (placed copies on a mesh): no second reference

    data_position = {"prompts": len(prompts), "seed": config.seed, "prompts_per_iteration": config.rollout.prompts,
                     "fingerprint": fingerprint(prompts.ids)}
    sample = Sampler.for_config(config, tokenizer, mesh, config.model.path)
    iteration = OnlineIteration(config, out, mesh, tokenizer, prompts, eval_prompts, reward, process, monitor,
                                reference, algorithm.make_iteration(config, policy_tx, critic_tx, controller), sample)
    config_dict, stop_ids = dataclasses.asdict(config), sample.generation.stop_token_ids

    def meta(position: int) -> dict:
        return {"phase": config.algorithm, "step": position, "version": __version__, "config": config_dict,
                "data": data_position}

    def finish(policy) -> None:
        if config.checkpoint.export_hf:
            export_hf(policy, tokenizer, out, f"{config.algorithm} policy", stop_ids=stop_ids, source=config.model.path)

    return Job(config.algorithm, "iteration", t.iterations, t.log_every, t.eval_every,
               {"score": "score_mean", "kl(k3)": "kl_k3"}, position=lambda state: int(state.iteration),
               step=iteration.step, evaluate=iteration.evaluate, meta=meta,
               trained_model=lambda state: state.policy.model(), finish=finish, state=state, data=data_position)

"""The online loop (PPO, GRPO, RLOO, REINFORCE, RAFT): one iteration is

    prompts (a pure function of seed and iteration) -> rollout [C] (one compiled sampler per
    bucket) -> text -> reward source (model and/or function) -> shaped scores -> one jitted
    call: experience + the whole epochs x minibatches update + the KL controller.

The state threaded through it -- :class:`OnlineState`: the policy's and critic's train states,
the KL coefficient, the iteration -- is checkpointed whole, and every random draw is derived
from (seed, iteration), so a run stopped at iteration k and resumed in a new process is bit
for bit the run that never stopped (on CPU)."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import __version__, kl, rl
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.config import ConfigError
from rlhf_jax.data import batch_indices, has_tokenizer, load_tokenizer
from rlhf_jax.memory import release_freed_memory
from rlhf_jax.metrics import MetricsWriter, Progress, peak_rss_gb
from rlhf_jax.models import ScoreModel, without_lora
from rlhf_jax.hosts import to_global, to_host
from rlhf_jax.models.sharding import place, rows_sharding
from rlhf_jax.phases.audit import audit_online
from rlhf_jax.phases.config import ModelConfig
from rlhf_jax.phases.online_config import OnlineConfig, RewardConfig
from rlhf_jax.phases.console import log
from rlhf_jax.phases.runner import (RunResult, StopRequests, close_checkpoints, export_hf, log_evaluation,
                                    restore_or_start)
from rlhf_jax.phases.setup import BATCH_AXES, build_model, make_mesh, phase_tokenizer
from rlhf_jax.run_lock import OutputDirLock
from rlhf_jax.rl.best_of_n import best_in_groups, raft_update
from rlhf_jax.rl.prompts import Prompts, load_prompts
from rlhf_jax.rl.rewards import FunctionReward, ModelReward, SumReward, load_function, shape_scores
from rlhf_jax.rollout import GenerationConfig, SamplingConfig, decode_completions, generate, trim_completions
from rlhf_jax.train import TrainState, make_optimizer
from rlhf_jax.train.guard import check_nonfinite_streak


@flax.struct.dataclass
class OnlineState:
    iteration: jax.Array
    policy: TrainState
    critic: TrainState | None  # PPO only
    kl_controller: kl.KLControllerState  # the KL coefficient (fixed or adaptive) and its state


def check_config(config: OnlineConfig, *, check_paths: bool = True) -> None:
    """Errors for a config the algorithm cannot run or would partly ignore (``phases.audit``),
    raised before any data is read or directory written."""
    audit_online(config, check_paths=check_paths)
    r, u = config.rollout, config.update
    if config.algorithm in ("grpo", "rloo", "raft") and r.samples < 2:
        raise ConfigError(f"algorithm {config.algorithm} compares samples of a prompt: set rollout.samples >= 2")
    rows = r.prompts if config.algorithm == "raft" else r.prompts * r.samples
    if rows % u.minibatches:
        raise ConfigError(f"update.minibatches={u.minibatches} does not divide the {rows} rows an iteration trains on "
                          f"(rollout.prompts x rollout.samples{'' if config.algorithm != 'raft' else ' / samples'})")
    updates = config.train.iterations * u.epochs * u.minibatches
    for name, optimizer in (("optimizer", config.train.optimizer), ("critic_optimizer", config.train.critic_optimizer)):
        if optimizer.total_steps is None and optimizer.warmup_steps > updates:
            raise ConfigError(f"train.{name}.warmup_steps={optimizer.warmup_steps} exceeds the run's {updates} "
                              "updates (iterations x epochs x minibatches); lower the warm-up or train longer")
    if config.reward.model is None and config.reward.function is None:
        raise ConfigError("reward: give reward.model (a reward-model checkpoint), reward.function, or both")


def build_model_reward(c: RewardConfig, policy_tokenizer, mesh, *, seed: int, what: str = "reward.model"):
    """A :class:`ModelReward` on checkpoint ``c.model`` with its own tokenizer (``c.tokenizer``,
    else the checkpoint's, else the policy's), placed on ``mesh``, scoring its batches split
    over the batch axes."""
    if c.tokenizer is not None or has_tokenizer(c.model):
        tokenizer = load_tokenizer(c.tokenizer or c.model, pad_token=c.pad_token, needs_eos=False)
    else:
        tokenizer = policy_tokenizer
    model = place(build_model(ModelConfig(path=c.model), "score", tokenizer=tokenizer, seed=seed, what=what), mesh)
    return ModelReward(model, tokenizer, max_length=c.max_length, name=c.model, max_prompt_length=c.max_prompt_length,
                       rows_sharding=lambda rows: rows_sharding(mesh, rows, BATCH_AXES))


def build_reward(c: RewardConfig, policy_tokenizer, mesh, *, seed: int, what: str = "reward.model"):
    """The reward source of ``c`` (see :mod:`rlhf_jax.rl.rewards`): a model, a function or
    their weighted sum; a reward model is placed on ``mesh`` and scores its batches split
    over the batch axes."""
    parts = []
    if c.model is not None:
        parts.append((c.model_weight, build_model_reward(c, policy_tokenizer, mesh, seed=seed, what=what)))
    if c.function is not None:
        fn = FunctionReward(load_function(c.function), c.function, on_error=c.on_error, penalty=c.penalty,
                            section=what.split(".")[0])
        parts.append((c.function_weight, fn))
    return parts[0][1] if len(parts) == 1 and parts[0][0] == 1.0 else SumReward(parts)


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


def _mean_metrics(update_metrics: dict) -> dict:
    """Per-minibatch metrics -> one number each (the max for ``*_max``), plus the first
    minibatch's ``first_ratio_max``: 1 when the trainer scores the sampling distribution."""
    means = {k: (jnp.max(v) if k.endswith("_max") else jnp.mean(v.astype(jnp.float32)))
             for k, v in update_metrics.items()}
    return means | ({"first_ratio_max": update_metrics["ratio_max"][0]} if "ratio_max" in update_metrics else {})


def sampling_config(config: OnlineConfig) -> SamplingConfig:
    r = config.rollout
    return SamplingConfig(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p)


def train_iteration(state: OnlineState, reference, ids_BT, mask_BT, action_mask_BT, sampler_logp_BT, scores_B, key,
                    prompt_width, *, config: OnlineConfig, policy_tx, critic_tx, controller: kl.KLController):
    """Experience, the whole update and the KL controller for one rollout (PPO and the
    critic-free estimators); one jitted call, ``prompt_width`` static (``rl.make_experience``).
    ``reference`` ``None``: a LoRA policy's own base under its adapters (no second copy)."""
    reference = without_lora(state.policy.model()) if reference is None else reference
    u = config.update
    common = {"epochs": u.epochs, "minibatches": u.minibatches, "clip_eps": u.clip_eps, "kl_kind": config.kl.kind,
              "sampling": sampling_config(config), "normalizer": u.loss_normalizer, "tis_cap": u.tis_cap}
    if config.algorithm == "ppo":
        ppo = rl.PPOConfig(value_clip_eps=u.value_clip_eps, entropy_coef=u.entropy_coef, gamma=u.gamma, lam=u.lam,
                           kl_in_loss=bool(config.kl.in_loss), whiten_advantages=u.whiten_advantages,
                           aggregation=u.loss_aggregation or "token_mean", **common)
        experience, stats = rl.make_experience(state.policy.model(), reference, state.critic.model(), ids_BT, mask_BT,
                                               action_mask_BT, scores_B, state.kl_controller.beta, ppo, prompt_width,
                                               sampler_logp_BT)
        policy, critic, metrics = rl.ppo_update(state.policy, state.critic, experience, key, state.kl_controller.beta,
                                                 policy_tx, critic_tx, ppo)
    else:
        cf = rl.CriticFreeConfig(estimator=config.algorithm, group_size=config.rollout.samples,
                                 kl_in_loss=config.kl.in_loss, aggregation=u.loss_aggregation, **common)
        experience, stats = rl.make_group_experience(state.policy.model(), reference, ids_BT, mask_BT, action_mask_BT,
                                                     scores_B, state.kl_controller.beta, cf, prompt_width,
                                                     sampler_logp_BT)
        (policy, metrics), critic = rl.critic_free_update(state.policy, experience, key, state.kl_controller.beta,
                                                          policy_tx, cf), None
    metrics = stats | _mean_metrics(metrics)
    kl_controller = controller.update(state.kl_controller, metrics["kl"], ids_BT.shape[0])
    return OnlineState(state.iteration + 1, policy, critic, kl_controller), metrics


def jit_train_iteration(config: OnlineConfig, policy_tx, critic_tx, controller: kl.KLController):
    """``train_iteration`` of ``config`` compiled, called ``(state, reference, ids_BT, mask_BT,
    action_mask_BT, sampler_logp_BT, scores_B, key, prompt_width)``: one program per prompt width.
    The state is donated: the new parameters and optimiser states take the old ones' buffers."""
    return nnx.jit(functools.partial(train_iteration, config=config, policy_tx=policy_tx, critic_tx=critic_tx,
                                     controller=controller), static_argnums=8, donate_argnums=0)


def raft_iteration(state: OnlineState, ids_BT, mask_BT, action_mask_BT, key, *, config: OnlineConfig, policy_tx):
    """RAFT: the SFT update on the kept (best-of-N) completions."""
    policy, metrics = raft_update(state.policy, ids_BT, mask_BT, action_mask_BT, key, policy_tx,
                                  epochs=config.update.epochs, minibatches=config.update.minibatches)
    return state.replace(iteration=state.iteration + 1, policy=policy), _mean_metrics(metrics)


class Sampler:
    """Prompts -> placed, left-padded batches -> rollouts and their text: ``generation``'s
    sampler, completions trimmed to the smallest of ``buckets`` that holds them."""

    def __init__(self, generation: GenerationConfig, buckets: tuple[int, ...], tokenizer, mesh):
        self.generation, self.buckets, self.tokenizer, self.mesh = generation, buckets, tokenizer, mesh

    @classmethod
    def for_config(cls, config: OnlineConfig, tokenizer, mesh) -> Sampler:
        r = config.rollout
        generation = GenerationConfig(
            max_new_tokens=r.max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
            sampling=sampling_config(config), num_samples=r.samples)
        return cls(generation, r.completion_buckets, tokenizer, mesh)

    def __call__(self, model, prompts: Prompts, indices: np.ndarray, key, samples: int | None = None):
        """``(rollout, prompt texts repeated per sample, completion texts)``."""
        ids, mask = prompts.batch(indices, self.tokenizer.pad_token_id)
        sharding = rows_sharding(self.mesh, len(indices), BATCH_AXES)
        ids, mask = (to_global(a, sharding) for a in (ids, mask))  # every process holds every prompt row
        config = self.generation if samples is None else dataclasses.replace(self.generation, num_samples=samples)
        rollout = trim_completions(generate(model, ids, mask, key, config), self.buckets)
        n = config.num_samples
        texts = [prompts.texts[i] for i in indices for _ in range(n)]
        return rollout, texts, decode_completions(self.tokenizer, rollout)


def run_online(config: OnlineConfig, *, resume: bool = False, stop_after: int | None = None) -> RunResult:
    """Run the online phase of ``config`` (see the module docstring): the config checked
    before anything is read, then the run, holding the output directory's lock. Raises as
    :func:`rlhf_jax.phases.run_phase` does, and ``RewardError``."""
    check_config(config)
    with OutputDirLock(config.output_dir, enabled=jax.process_index() == 0):
        return _train(config, resume=resume, stop_after=stop_after)


def _train(config: OnlineConfig, *, resume: bool, stop_after: int | None) -> RunResult:
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
    log(f"{config.algorithm}: reward = {reward.name}; {config.rollout.prompts} prompts x {config.rollout.samples} "
        f"samples per iteration, {t.iterations} iterations")

    policy_model = build_model(config.model, "lm", tokenizer=tokenizer, seed=config.seed, what="policy")
    reference = None if config.model.lora is not None else place(build_model(
        dataclasses.replace(config.model, lora=None), "lm", tokenizer=tokenizer, seed=config.seed, what="reference"), mesh)
    updates = t.iterations * config.update.epochs * config.update.minibatches  # optimiser steps in the run
    policy_tx, critic_tx = (make_optimizer(dataclasses.replace(c, total_steps=c.total_steps or updates))
                            for c in (t.optimizer, t.critic_optimizer))
    critic = None
    if config.algorithm == "ppo":
        critic = TrainState.create(build_critic(config, policy_model, tokenizer), critic_tx, jax.random.key(config.seed + 1))
    controller = (kl.fixed_kl_controller(config.kl.beta) if config.kl.target is None else
                  kl.adaptive_kl_controller(config.kl.beta, config.kl.target, config.kl.horizon))
    state = OnlineState(jnp.zeros((), jnp.int32), TrainState.create(policy_model, policy_tx, jax.random.key(config.seed)),
                        critic, controller.init())
    state = place(state, mesh)
    del policy_model, critic  # the state holds the arrays (placed copies on a mesh): no second reference

    config_dict = dataclasses.asdict(config)
    data_position = {"prompts": len(prompts), "seed": config.seed, "prompts_per_iteration": config.rollout.prompts}
    checkpointer = Checkpointer(out / "checkpoints", every=config.checkpoint.every, keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    state = restore_or_start(checkpointer, state, resume=resume, config_dict=config_dict, data=data_position)

    if config.algorithm == "raft":
        update = jax.jit(functools.partial(raft_iteration, config=config, policy_tx=policy_tx), donate_argnums=0)
    else:
        update = jit_train_iteration(config, policy_tx, critic_tx, controller)
    sample = Sampler.for_config(config, tokenizer, mesh)
    base_key = jax.random.key(config.seed)

    def evaluate(state: OnlineState) -> dict:
        if eval_prompts is None:
            return {}
        n = t.eval_samples
        indices = np.arange(min(t.eval_prompts, len(eval_prompts)))
        rollout, texts, completions = sample(state.policy.model(), eval_prompts, indices, jax.random.key(config.seed + 7),
                                             samples=n)
        scores, penalised = reward(texts, completions)
        scores_PN = scores.reshape(-1, n)
        if jax.process_index() == 0:
            with open(out / "samples.jsonl", "w") as f:
                for i in range(0, len(texts), n):
                    f.write(json.dumps({"prompt": texts[i], "completion": completions[i], "score": float(scores[i])}) + "\n")
        stopped_B, completion_mask_BN = to_host((rollout.stopped_B, rollout.completion_mask_BN))
        return {"score_mean": float(scores.mean()), f"best_of_{n}_score_mean": float(scores_PN.max(1).mean()),
                "eos_rate": float(np.mean(stopped_B)), "penalised": penalised,
                "completion_length": float(np.mean(np.sum(completion_mask_BN, 1)))}

    def meta(iteration: int) -> dict:
        return {"phase": config.algorithm, "step": iteration, "version": __version__, "config": config_dict,
                "data": data_position}

    writer = MetricsWriter(config.metrics, out, run_config=config_dict, enabled=jax.process_index() == 0)
    start = int(state.iteration)
    progress = Progress(config.metrics.progress and jax.process_index() == 0, total=t.iterations, initial=start,
                        description=config.algorithm)
    stopped_by, saved = None, start if resume and start else None
    widths: set[tuple[int, int]] = set()  # (prompt, completion) bucket widths met: one update program each
    with StopRequests() as stop:
        for iteration in range(start, t.iterations):
            key = jax.random.fold_in(base_key, iteration)
            tick = time.perf_counter()
            indices = batch_indices(config.seed, iteration, len(prompts), config.rollout.prompts)
            rollout, texts, completions = sample(state.policy.model(), prompts, indices, jax.random.fold_in(key, 0))
            generated = time.perf_counter()
            raw_scores, penalised = reward(texts, completions)
            scored = time.perf_counter()
            ids, mask = rollout.sequences()
            action_mask = rollout.action_mask()
            widths.add((rollout.prompt_mask_BP.shape[1], rollout.completion_mask_BN.shape[1]))
            r = config.reward
            scores = shape_scores(to_global(raw_scores, replicated), rollout.stopped_B,
                                  missing_eos_penalty=r.missing_eos_penalty, whiten=r.whiten, clip=r.clip)
            if config.algorithm == "raft":  # the best of each prompt's samples by the shaped score
                best = best_in_groups(np.asarray(to_host(scores)), config.rollout.samples)
                state, metrics = update(state, ids[best], mask[best], action_mask[best], jax.random.fold_in(key, 1))
            else:
                state, metrics = update(state, reference, ids, mask, action_mask, rollout.sequence_logprobs(), scores,
                                        jax.random.fold_in(key, 1), rollout.prompt_mask_BP.shape[1])
            release_freed_memory()  # the sampler's and last update's freed scratch, before this update's
            values = {k: float(v) for k, v in to_host(metrics).items()}
            done = iteration + 1
            streaks = [s.nonfinite_streak for s in (state.policy, state.critic) if s is not None]
            check_nonfinite_streak(int(max(to_host(streaks))), t.max_nonfinite, step=done, unit="iteration",
                                   checkpoint_dir=checkpointer.directory)
            trained = time.perf_counter()
            stopped_B, completion_mask_BN = to_host((rollout.stopped_B, rollout.completion_mask_BN))
            new_tokens = float(np.sum(completion_mask_BN))
            values |= {"score_mean": float(raw_scores.mean()), "score_std": float(raw_scores.std()),
                       "penalised": penalised, "eos_rate": float(np.mean(stopped_B)),
                       "completion_length": new_tokens / len(completions), "generation_seconds": generated - tick,
                       "reward_seconds": scored - generated, "training_seconds": trained - scored,
                       "tokens_per_second": new_tokens / (trained - tick), "peak_rss_gb": peak_rss_gb(),
                       "update_programs": len(widths)} | reward.truncations()
            if done % t.log_every == 0 or done == t.iterations:
                writer.write(done, values, f"{config.algorithm}/train")
                progress.update({"score": values["score_mean"], "kl": values.get("kl", 0.0)})
            if t.eval_every and done % t.eval_every == 0 and done < t.iterations:
                writer.write(done, evaluate(state), f"{config.algorithm}/eval")
            if checkpointer.save(done, state, meta(done)):
                saved = done
            if stop.signal or (stop_after is not None and done >= stop_after and done < t.iterations):
                stopped_by = stop.signal or "stop_after"
                break
    progress.close()
    iteration = int(state.iteration)
    try:  # the final evaluation first, so the final checkpoint is written without the reference in memory
        final = evaluate(state) if stopped_by is None else {}
        reference = update = None
    finally:
        stopped = close_checkpoints(checkpointer, writer, state, iteration, saved, meta, stopped_by, "iteration", out)
    if stopped is not None:
        return stopped
    log_evaluation(writer, iteration, final, f"{config.algorithm}/eval")
    policy = state.policy.model()
    state = None  # optimiser moments and critic freed before the export's copies
    if config.checkpoint.export_hf:
        export_hf(policy, tokenizer, out, f"{config.algorithm} policy")
    writer.close()
    return RunResult(iteration, None, final, out)

"""One online iteration as an object of the run loop (``phases.loop``): draw the iteration's
prompts, sample, score, shape the scores and run the compiled update; evaluate on held-out
prompts. Built by ``phases.online`` from the config; it
holds the only references to the reward, the reference model and the compiled iteration."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax.data import batch_indices
from rlhf_jax.hosts import to_global, to_host
from rlhf_jax.metrics import peak_memory
from rlhf_jax.models.sharding import rows_sharding
from rlhf_jax.phases.algorithms import OnlineState, RolloutBatch
from rlhf_jax.phases.loop import StepInfo
from rlhf_jax.phases.online_config import OnlineConfig
from rlhf_jax.phases.sampler import Sampled, Sampler
from rlhf_jax.phases.setup import BATCH_AXES
from rlhf_jax.rl.dynamic_sampling import Draw, dynamic_sample
from rlhf_jax.rl.prompts import Prompts
from rlhf_jax.rl.rewards import SumReward, overlong_penalty, shape_scores
from rlhf_jax.train.guard import check_nonfinite_streak


@dataclasses.dataclass(frozen=True)
class RoundCost:
    """What one sampling round took: generation and reward seconds, and its sampler's counts
    (the engine's, the move to ``mesh.sampler_rules``, a multi-turn draw's mean turns and
    tool calls)."""

    generation_seconds: float
    reward_seconds: float
    sampler_counts: dict

    @staticmethod
    def total(rounds: list[RoundCost]) -> dict:
        """The iteration's seconds over its rounds (the sampler's moves included), and the last
        round's other counts."""
        moves = [seconds for r in rounds if (seconds := r.sampler_counts.get("sampler_reshard_seconds")) is not None]
        return {"generation_seconds": sum(r.generation_seconds for r in rounds),
                "reward_seconds": sum(r.reward_seconds for r in rounds)} | rounds[-1].sampler_counts | (
                    {"sampler_reshard_seconds": sum(moves)} if moves else {})


@dataclasses.dataclass
class OnlineIteration:
    """The pieces of an online run's iteration, and the loop's ``step`` and ``evaluate`` as
    methods (the loop drops both before its final checkpoint, and with them the reward and the
    reference). ``update_widths`` collects the (prompt, completion) bucket widths met, one
    compiled update program each."""

    config: OnlineConfig
    out: Path
    mesh: jax.sharding.Mesh
    tokenizer: Any
    prompts: Prompts
    eval_prompts: Prompts | None
    reward: Any  # rl.rewards: (prompt texts, completions) -> (scores [B], penalised count)
    process: Callable | None  # a process reward model: rollout -> per-step rewards
    monitor: Any  # a reward watched, not optimised; None
    reference: Any
    update: Callable  # algorithm.make_iteration: one compiled call per iteration
    sample: Sampler
    update_widths: set[tuple[int, int]] = dataclasses.field(default_factory=set)
    # with rollout.max_policy_lag: the scored batches drawn ahead, by the iteration that trains on them
    in_flight: dict[int, tuple[Draw, dict]] = dataclasses.field(default_factory=dict)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def monitored(self, prompt_texts: list[str], completions: list[str]) -> dict:
        """The monitor's mean score of these completions and how many of them its failure
        scored ``reward.penalty`` (nothing without a monitor)."""
        if self.monitor is None:
            return {}
        scores, penalised = self.monitor(prompt_texts, completions)
        return {"monitor_score_mean": float(np.mean(scores)), "monitor_penalised": penalised}

    def shape(self, rollout, scores_B, *, whiten: bool, clip: float | None):
        """The score the policy optimises (``rl.rewards.shape_scores`` with ``reward.*``)."""
        r = self.config.reward
        overlong = None if r.overlong_buffer is None else overlong_penalty(
            jnp.sum(rollout.completion_mask_BN, axis=1), self.config.rollout.max_new_tokens, r.overlong_buffer)
        return shape_scores(scores_B, rollout.stopped_B, overlong=overlong, missing_eos_penalty=r.missing_eos_penalty,
                            whiten=whiten, clip=clip)

    def sample_round(self, model, iteration: int, key, round_: int) -> tuple[Sampled, float]:
        """Round ``round_`` of an iteration's sampling and its seconds: the iteration's prompts
        first, then (dynamic sampling) a fresh draw of prompts per round, each from (seed,
        iteration, round)."""
        config = self.config
        if round_ == 0:
            indices = batch_indices(config.seed, iteration, len(self.prompts), config.rollout.prompts)
            round_key = jax.random.fold_in(key, 0)
        else:
            indices = np.random.default_rng([config.seed, iteration, round_]).choice(
                len(self.prompts), config.rollout.prompts, replace=False)
            round_key = jax.random.fold_in(jax.random.fold_in(key, 2), round_)
        tick = time.perf_counter()
        sampled = self.sample(model, self.prompts, indices, round_key)
        return sampled, time.perf_counter() - tick

    def score_round(self, sampled: Sampled, generation_seconds: float) -> tuple[Draw, RoundCost]:
        """A sampled round scored by the reward (and, with dynamic sampling, the shaped score the
        filter compares)."""
        tick = time.perf_counter()
        scores, penalised = self.reward(sampled.prompts, sampled.completions)
        cost = RoundCost(generation_seconds, time.perf_counter() - tick, sampled.counts)
        compared = None if not self.config.rollout.dynamic_sampling else np.asarray(to_host(self.shape(
            sampled.rollout, to_global(scores, self.replicated), whiten=False, clip=None)))  # what the filter compares
        return Draw(sampled.rollout, sampled.prompts, sampled.completions, scores, penalised, compared), cost

    def draw(self, model, iteration: int, key, round_: int) -> tuple[Draw, RoundCost]:
        """Round ``round_`` of an iteration's sampling, scored."""
        return self.score_round(*self.sample_round(model, iteration, key, round_))

    def draw_batch(self, model, iteration: int, key) -> tuple[Draw, dict]:
        """The iteration's scored rollout, and its sampling record: generation and reward seconds
        (:class:`RoundCost`) and, with dynamic sampling, the rounds' counts."""
        r = self.config.rollout
        if not r.dynamic_sampling:
            batch, cost = self.draw(model, iteration, key, 0)
            return batch, RoundCost.total([cost])
        costs: list[RoundCost] = []

        def scored_round(round_: int) -> Draw:
            batch, cost = self.draw(model, iteration, key, round_)
            costs.append(cost)
            return batch

        batch, counts = dynamic_sample(scored_round, r.prompts, r.samples, r.max_sampling_rounds,
                                       self.tokenizer.pad_token_id)
        sharding = rows_sharding(self.mesh, len(batch.scores_B), BATCH_AXES)
        batch = dataclasses.replace(batch, rollout=jax.tree.map(lambda a: to_global(a, sharding), batch.rollout))
        return batch, RoundCost.total(costs) | counts

    def key(self, iteration: int) -> jax.Array:
        """The iteration's key: its rollout draws ``fold_in(key, 0)`` (and 2 for extra rounds),
        its update ``fold_in(key, 1)``."""
        return jax.random.fold_in(jax.random.key(self.config.seed), iteration)

    def lagged_batch(self, state: OnlineState, iteration: int) -> tuple[Draw, dict]:
        """The batch iteration ``iteration`` trains on when the sampler trails by ``k =
        rollout.max_policy_lag``: the one drawn ``k`` iterations ago, or -- at the start, or after
        a resume in a new process -- drawn now, with the ``k - 1`` batches after it, from the
        parameters ``state.sampler_params`` kept for them (so a resumed run draws exactly what
        the uninterrupted one did)."""
        lag, last = self.config.rollout.max_policy_lag, self.config.train.iterations
        for ahead, params in enumerate(state.sampler_params):
            later = iteration + ahead
            if later < last and later not in self.in_flight:
                batch, sampling = self.draw_batch(state.policy.model(params), later, self.key(later))
                self.in_flight[later] = batch, sampling | {"policy_lag": min(later, lag)}
        return self.in_flight.pop(iteration)

    def draw_ahead(self, state: OnlineState, iteration: int) -> Callable[[], None]:
        """Start drawing the batch of iteration ``i + k`` (``k = rollout.max_policy_lag``) with
        this iteration's policy, before the update donates its parameters; the call returned
        finishes it -- the reward scored while the update runs on the device -- and keeps it
        for that iteration. A dynamically sampled draw, whose later rounds depend on the rewards
        of the first, is drawn whole here."""
        r, lag = self.config.rollout, self.config.rollout.max_policy_lag
        ahead = iteration + lag

        def keep(batch: Draw, sampling: dict) -> None:
            self.in_flight[ahead] = batch, sampling | {"policy_lag": lag}

        if ahead >= self.config.train.iterations:
            return lambda: None
        if r.dynamic_sampling:
            drawn = self.draw_batch(state.policy.model(), ahead, self.key(ahead))
            return lambda: keep(*drawn)
        sampled = self.sample_round(state.policy.model(), ahead, self.key(ahead), 0)

        def finish() -> None:
            batch, cost = self.score_round(*sampled)
            keep(batch, RoundCost.total([cost]))

        return finish

    def step(self, state: OnlineState, iteration: int, report: bool):
        """One iteration: the scored rollout, then the compiled update; its metrics when ``report``.
        With a policy lag the batch trained on was drawn earlier (:meth:`lagged_batch`) and the
        next one is drawn around the update (:meth:`draw_ahead`)."""
        config = self.config
        key = self.key(iteration)
        if config.rollout.max_policy_lag == 0:
            batch, sampling = self.draw_batch(state.policy.model(), iteration, key)
            finish_ahead = None
        else:
            batch, sampling = self.lagged_batch(state, iteration)
            finish_ahead = self.draw_ahead(state, iteration)
        rollout, completions, raw_scores = batch.rollout, batch.completions, batch.scores_B
        scored = time.perf_counter()
        self.update_widths.add((rollout.prompt_mask_BP.shape[1], rollout.completion_mask_BN.shape[1]))
        scores = self.shape(rollout, to_global(raw_scores, self.replicated), whiten=config.reward.whiten,
                            clip=config.reward.clip)
        step_rewards = None if self.process is None else self.process(rollout)
        state, metrics = self.update(state, self.reference, RolloutBatch.of(rollout, scores, step_rewards),
                                     jax.random.fold_in(key, 1))
        if finish_ahead is not None:
            finish_ahead()
        streaks = [s.nonfinite_streak for s in (state.policy, state.critic) if s is not None]
        check_nonfinite_streak(int(max(to_host(streaks))), config.train.max_nonfinite, step=iteration + 1,
                               unit="iteration")
        stopped_B, completion_mask_BN = to_host((rollout.stopped_B, rollout.completion_mask_BN))
        new_tokens = int(np.sum(completion_mask_BN))
        if not report:
            return state, StepInfo(new_tokens)
        objectives = {f"reward_{name}": v for name, v in self.reward.components.items()} \
            if isinstance(self.reward, SumReward) else {}
        values = {k: float(v) for k, v in to_host(metrics).items()}
        return state, StepInfo(new_tokens, values | {
            "score_mean": float(raw_scores.mean()), "score_std": float(raw_scores.std()), "penalised": batch.penalised,
            "eos_rate": float(np.mean(stopped_B)), "completion_length": new_tokens / len(completions),
            "training_seconds": time.perf_counter() - scored, **peak_memory(),
            "update_programs": len(self.update_widths)} | self.reward.truncations() | sampling | objectives
            | self.monitored(batch.texts, completions))

    def evaluate(self, state: OnlineState) -> dict:
        """``train.eval_samples`` completions of the first ``train.eval_prompts`` held-out prompts:
        their mean score, best-of-n, EOS rate and length; written to ``samples.jsonl``."""
        if self.eval_prompts is None:
            return {}
        t = self.config.train
        n = t.eval_samples
        indices = np.arange(min(t.eval_prompts, len(self.eval_prompts)))
        sampled = self.sample(state.policy.model(), self.eval_prompts, indices, jax.random.key(self.config.seed + 7),
                              samples=n)
        scores, penalised = self.reward(sampled.prompts, sampled.completions)
        scores_PN = scores.reshape(-1, n)
        if jax.process_index() == 0:
            with open(self.out / "samples.jsonl", "w") as f:
                for i in range(0, len(scores), n):
                    f.write(json.dumps({"prompt": sampled.prompts[i], "completion": sampled.transcripts[i],
                                        "score": float(scores[i])}) + "\n")
        stopped_B, completion_mask_BN = to_host((sampled.rollout.stopped_B, sampled.rollout.completion_mask_BN))
        return {"score_mean": float(scores.mean()), f"best_of_{n}_score_mean": float(scores_PN.max(1).mean()),
                "eos_rate": float(np.mean(stopped_B)), "penalised": penalised,
                "completion_length": float(np.mean(np.sum(completion_mask_BN, 1)))} | sampled.counts \
            | self.monitored(sampled.prompts, sampled.completions)

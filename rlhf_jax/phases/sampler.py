"""The sampler of the online phases, iterative DPO, ``rlhf-jax label`` and ``rlhf-jax
evaluate``: prompts -> left-padded batches placed on the mesh -> rollouts and their text,
stopping at every id the policy's checkpoint declares; multi-turn episodes with an
environment."""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from rlhf_jax.hosts import to_global
from rlhf_jax.models.sharding import reshard, rows_sharding
from rlhf_jax.phases.algorithms import sampling_config
from rlhf_jax.phases.online_config import OnlineConfig
from rlhf_jax.phases.setup import BATCH_AXES, stop_token_ids
from rlhf_jax.rl.environments import load_environment
from rlhf_jax.rl.multi_turn import multi_turn_rollout, token_ids_containing
from rlhf_jax.rl.prompts import Prompts
from rlhf_jax.rollout import GenerationConfig, Rollout, decode_completions, generate_with_stats, trim_completions
from rlhf_jax.rollout.engine import ContinuousBatching


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
                 environment=None, max_turns: int = 1, rules: dict[str, str | None] | None = None):
        self.generation, self.buckets, self.tokenizer, self.mesh = generation, buckets, tokenizer, mesh
        self.environment, self.max_turns = environment, max_turns
        self.rules = rules  # mesh.sampler_rules: the policy's layout while sampling (None: as placed)
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
            sampling=sampling_config(config), num_samples=r.samples,
            continuous=None if r.engine == "static" else ContinuousBatching(r.slots, r.page_size, r.cache_pages,
                                                                               r.paged_attention))
        environment = None if r.environment is None else load_environment(r.environment)
        return cls(generation, r.completion_buckets, tokenizer, mesh, environment, r.max_turns,
                   config.mesh.sampler_rules)

    def placed(self, model) -> tuple[object, dict]:
        """``model`` in the sampler's layout (``rules``; ``model`` itself without them) and the
        record of the move: ``sampler_reshard_seconds`` and ``sampler_params_gb``, the
        parameters' (``nnx.Param``) bytes per device in that layout (1e9 bytes). Raises
        ``ShardingError`` for a rule whose axis does not divide a parameter."""
        if self.rules is None:
            return model, {}
        tick = time.perf_counter()
        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, jax.block_until_ready(reshard(state, self.mesh, self.rules, "mesh.sampler_rules")))
        per_device = sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
        return model, {"sampler_reshard_seconds": time.perf_counter() - tick, "sampler_params_gb": per_device / 1e9}

    def __call__(self, model, prompts: Prompts, indices: np.ndarray, key, samples: int | None = None) -> Sampled:
        """``samples`` (default the config's) completions of each of the prompts ``indices``, by
        ``model`` in the sampler's layout (:meth:`placed`)."""
        model, moved = self.placed(model)
        ids, mask = prompts.batch(indices, self.tokenizer.pad_token_id)
        sharding = rows_sharding(self.mesh, len(indices), BATCH_AXES)
        ids, mask = (to_global(a, sharding) for a in (ids, mask))  # every process holds every prompt row
        config = self.generation if samples is None else dataclasses.replace(self.generation, num_samples=samples)
        n = config.num_samples
        texts = [prompts.texts[i] for i in indices for _ in range(n)]
        if self.environment is None:
            rollout, stats = generate_with_stats(model, ids, mask, key, config)
            counts = moved if stats is None else moved | {
                "engine_steps": stats.steps, "preemptions": stats.preemptions, "cache_pages_peak": stats.peak_pages}
            rollout = trim_completions(rollout, self.buckets)
            completions = decode_completions(self.tokenizer, rollout)
            return Sampled(rollout, texts, completions, completions, counts)
        rows = rows_sharding(self.mesh, len(indices) * n, BATCH_AXES)
        episodes = multi_turn_rollout(model, ids, mask, key, config, self.tokenizer, self.environment,
                                      [prompts.texts[i] for i in indices], max_turns=self.max_turns,
                                      buckets=self.buckets, place=lambda a: to_global(a, rows),
                                      call_end_ids=self.call_end_ids)
        rollout = jax.tree.map(lambda a: to_global(a, rows), episodes.rollout)
        counts = moved | {"turns": float(episodes.turns_B.mean()), "tool_calls": float(episodes.tool_calls_B.mean())}
        return Sampled(rollout, texts, episodes.final_turns, episodes.transcripts, counts)

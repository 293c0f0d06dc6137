"""Generation as one compiled program: prefill the left-padded prompts into a preallocated
KV cache, then sample one token per row per step inside ``lax.while_loop`` until every row
has emitted a stop token or ``max_new_tokens`` are out.

``generate`` checks its inputs on the host, pads the prompts to a length bucket, and calls a
``jax.jit``-compiled function of ``(graphdef, params, prompts, key)``: one compile per
(model, config, batch, prompt bucket). Inputs placed on a mesh (batch over the data axis,
parameters by the sharding rules) run sharded through the same code.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax.hosts import to_global, to_host
from rlhf_jax.models.kv_cache import KVCache
from rlhf_jax.models.paged_attention import PAGED_KERNELS
from rlhf_jax.models.heads import CausalLM
from rlhf_jax.rollout.buckets import bucket_length, left_pad_to
from rlhf_jax.rollout.sampling import SamplingConfig, row_keys, sample_token, step_keys


@dataclasses.dataclass(frozen=True)
class ContinuousBatching:
    """The continuous-batching engine (``rollout.continuous``): ``slots`` decode slots over a pool
    of ``pages`` KV pages of ``page_size`` tokens (0: enough for every slot to hold the longest
    request, the static engine's cache for ``slots`` rows), attention over the pages by
    ``attention`` (``models.paged_attention.PAGED_KERNELS``). Raises ``ValueError`` for a value
    out of range or an unknown kernel."""
    slots: int = 16
    page_size: int = 16
    pages: int = 0
    attention: str = "auto"

    def __post_init__(self):
        if self.slots < 1 or self.page_size < 1 or self.pages < 0:
            raise ValueError(f"continuous batching needs slots >= 1, page_size >= 1 and pages >= 0 (0: sized "
                             f"for the slots), got slots={self.slots}, page_size={self.page_size}, pages={self.pages}")
        if self.attention not in PAGED_KERNELS:
            raise ValueError(f"rollout.paged_attention={self.attention!r}; choose one of {', '.join(PAGED_KERNELS)}")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """What to sample: up to ``max_new_tokens`` per row, ``num_samples`` per prompt, stopping at
    ``stop_token_ids``; prompts padded to the smallest bucket that holds them. Raises
    ``ValueError`` for a value out of range."""
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]  # EOS and any other stop tokens; the stop token is kept
    pad_token_id: int  # written after a row stops (may equal an EOS id)
    sampling: SamplingConfig = SamplingConfig()
    num_samples: int = 1  # completions per prompt (GRPO groups, best-of-N)
    prompt_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
    continuous: ContinuousBatching | None = None  # None: the static engine (one batch decoded to its longest row)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")


@flax.struct.dataclass
class Rollout:
    """Prompts (repeated ``num_samples`` times, sample-major within a prompt) and completions.
    ``completion_mask_BN`` covers the generated tokens up to and including the stop token;
    ``logprobs_BN`` are the sampling distribution's log-probs of them (0 where masked)."""

    prompt_ids_BP: jax.Array
    prompt_mask_BP: jax.Array
    completion_ids_BN: jax.Array
    completion_mask_BN: jax.Array
    logprobs_BN: jax.Array
    stopped_B: jax.Array  # the row ended with a stop token (not cut at max_new_tokens)
    # multi-turn episodes (rl.multi_turn): 1 on the policy's tokens, 0 on an environment's replies
    # inside the completion (attended to, never trained on); None: every completion token is an action
    action_mask_BN: jax.Array | None = None

    def sequences(self) -> tuple[jax.Array, jax.Array]:
        """``(ids, mask)`` of prompt + completion, ``[B, P + N]``, for a training forward."""
        ids = jnp.concatenate([self.prompt_ids_BP, self.completion_ids_BN], axis=1)
        mask = jnp.concatenate([self.prompt_mask_BP, self.completion_mask_BN.astype(self.prompt_mask_BP.dtype)], 1)
        return ids, mask

    def action_mask(self) -> jax.Array:
        """``[B, P + N]``, aligned with :meth:`sequences`: 1 on the generated tokens, the actions
        (not on an environment's replies)."""
        actions_BN = self.completion_mask_BN if self.action_mask_BN is None else self.action_mask_BN
        return jnp.concatenate([jnp.zeros_like(self.prompt_mask_BP), actions_BN.astype(jnp.int32)], 1)

    def sequence_logprobs(self) -> jax.Array:
        """``[B, P + N]``, aligned with :meth:`sequences`: the sampler's log-probs (0 on the prompt)."""
        return jnp.concatenate([jnp.zeros(self.prompt_mask_BP.shape, jnp.float32), self.logprobs_BN], 1)


@flax.struct.dataclass
class _Loop:
    step: jax.Array
    logits_BV: jax.Array
    cache: KVCache
    tokens_BN: jax.Array
    logprobs_BN: jax.Array
    mask_BN: jax.Array
    stopped_B: jax.Array  # ended with a stop token
    done_B: jax.Array  # stopped, or at its row's token limit


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def _generate(graphdef, params, prompt_ids_BP, prompt_mask_BP, key, prompt_index_B, limit_B,
              config: GenerationConfig) -> Rollout:
    model: CausalLM = nnx.merge(graphdef, params)
    n, N = config.num_samples, config.max_new_tokens
    logits_BV, cache = model.prefill(prompt_ids_BP, prompt_mask_BP, max_length=prompt_ids_BP.shape[1] + N)
    repeat = functools.partial(jnp.repeat, repeats=n, axis=0)
    logits_BV, cache = repeat(logits_BV), cache.repeat(n)
    B = logits_BV.shape[0]
    keys_B = row_keys(key, prompt_index_B, n)
    stop_S = jnp.asarray(config.stop_token_ids, jnp.int32)

    def body(s: _Loop) -> _Loop:
        token_B, logp_B = sample_token(step_keys(keys_B, s.step), s.logits_BV, config.sampling)
        live_B = ~s.done_B
        token_B = jnp.where(live_B, token_B, config.pad_token_id)
        logits_BV, cache = model.decode(token_B, s.cache)
        return _Loop(
            step=s.step + 1,
            logits_BV=logits_BV,
            cache=cache,
            tokens_BN=s.tokens_BN.at[:, s.step].set(token_B),
            logprobs_BN=s.logprobs_BN.at[:, s.step].set(jnp.where(live_B, logp_B, 0.0)),
            mask_BN=s.mask_BN.at[:, s.step].set(live_B),
            stopped_B=s.stopped_B | (live_B & jnp.isin(token_B, stop_S)),
            done_B=s.done_B | (live_B & (jnp.isin(token_B, stop_S) | (s.step + 1 >= limit_B))),
        )

    start = _Loop(
        step=jnp.zeros((), jnp.int32),
        logits_BV=logits_BV,
        cache=cache,
        tokens_BN=jnp.full((B, N), config.pad_token_id, jnp.int32),
        logprobs_BN=jnp.zeros((B, N), jnp.float32),
        mask_BN=jnp.zeros((B, N), bool),
        stopped_B=jnp.zeros((B,), bool),
        done_B=jnp.zeros((B,), bool),
    )
    end = jax.lax.while_loop(lambda s: (s.step < N) & ~jnp.all(s.done_B), body, start)
    return Rollout(
        prompt_ids_BP=repeat(prompt_ids_BP),
        prompt_mask_BP=repeat(prompt_mask_BP),
        completion_ids_BN=end.tokens_BN,
        completion_mask_BN=end.mask_BN,
        logprobs_BN=end.logprobs_BN,
        stopped_B=end.stopped_B,
    )


def check_prompts(prompt_ids_BP, prompt_mask_BP, model_config, config: GenerationConfig) -> None:
    """Named errors for prompts the engine cannot serve: shape mismatch, empty or
    right-padded rows, or a prompt plus ``max_new_tokens`` beyond the model's context."""
    ids, mask = np.asarray(to_host(prompt_ids_BP)), np.asarray(to_host(prompt_mask_BP))
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"prompt_ids {ids.shape} and prompt_mask {mask.shape} must be equal [B, P] arrays")
    empty = np.flatnonzero(mask.sum(1) == 0)
    if empty.size:
        raise ValueError(f"prompts {empty.tolist()} are empty (no real token); drop them or give each a BOS token")
    if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        rows = np.flatnonzero((np.diff(mask.astype(np.int8), axis=1) < 0).any(1)).tolist()
        raise ValueError(f"prompts {rows} are not left-padded (padding after real tokens); "
                         "tokenize with padding_side='left'")
    context = model_config.context_length
    longest = int(mask.sum(1).max())
    if context is not None and longest + config.max_new_tokens > context:
        raise ValueError(
            f"a prompt of {longest} tokens + max_new_tokens={config.max_new_tokens} exceeds the model's "
            f"context of {context} positions; truncate prompts to {max(context - config.max_new_tokens, 0)} "
            "tokens or lower max_new_tokens"
        )


def prepare_prompts(model: CausalLM, prompt_ids_BP, prompt_mask_BP, config: GenerationConfig, max_new_tokens_B=None,
                    prompt_index_B=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, mask, index, limit)`` on the host: the prompts checked (:func:`check_prompts`) and
    left-padded to their bucket, their indices in the row keys ``[B]`` (``prompt_index_B``,
    default ``0..B-1``; :func:`~rlhf_jax.rollout.sampling.row_keys`) and each output row's token
    limit ``[B * num_samples]`` -- ``max_new_tokens_B`` (each in ``1..max_new_tokens``) or
    ``max_new_tokens``.
    Raises ``ValueError`` for prompts the engine cannot serve or limits out of range."""
    ids, mask = (np.asarray(a) for a in to_host((prompt_ids_BP, prompt_mask_BP)))  # one transfer
    check_prompts(ids, mask, model.config, config)
    width = bucket_length(int(mask.sum(1).max()), config.prompt_buckets, "prompt length")
    ids, mask = left_pad_to(ids, mask, width, config.pad_token_id)
    rows = ids.shape[0] * config.num_samples
    if max_new_tokens_B is None:
        limit = np.full(rows, config.max_new_tokens, np.int32)
    else:
        limit = np.asarray(max_new_tokens_B, np.int32)
        if limit.shape != (rows,) or limit.min() < 1 or limit.max() > config.max_new_tokens:
            raise ValueError(f"max_new_tokens_B must be {rows} per-row limits (prompts x num_samples) in "
                             f"1..{config.max_new_tokens}, got shape {limit.shape}, range "
                             f"{limit.min() if limit.size else None}..{limit.max() if limit.size else None}")
    index = np.arange(ids.shape[0]) if prompt_index_B is None else np.asarray(prompt_index_B)
    if index.shape != (ids.shape[0],):
        raise ValueError(f"prompt_index_B must give one index per prompt ({ids.shape[0]}), got shape {index.shape}")
    return ids.astype(np.int32), mask.astype(np.int32), index.astype(np.uint32), limit


def row_sharding(sharding):
    """The sharding of per-row arrays (any rank) split as the leading axis of ``sharding`` is
    (a prompt batch's), or ``sharding`` itself when it is not a ``NamedSharding``."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:1]))


def generate_static(model: CausalLM, prompt_ids_BP, prompt_mask_BP, key: jax.Array, config: GenerationConfig,
                    max_new_tokens_B=None, prompt_index_B=None) -> Rollout:
    """The static engine (``config.continuous`` aside): ``config.num_samples`` completions of
    each left-padded prompt ``[B, P]``, the batch decoded until its longest row ends; sample
    ``i`` of prompt ``b`` drawn with ``fold_in(fold_in(key, prompt_index_B[b]), i)``
    (:func:`~rlhf_jax.rollout.sampling.row_keys`; ``prompt_index_B`` defaults to ``0..B-1``).
    ``max_new_tokens_B``: an optional token limit per output row. Raises ``ValueError`` for
    prompts or limits the engine cannot serve."""
    ids, mask, index, limit = prepare_prompts(model, prompt_ids_BP, prompt_mask_BP, config, max_new_tokens_B,
                                              prompt_index_B)
    graphdef, params = nnx.split(model)
    sharding = getattr(prompt_ids_BP, "sharding", None)  # the rows stay where the caller put them
    ids, mask = (to_global(a, sharding) for a in (ids, mask))
    return _generate(graphdef, params, ids, mask, key, *(to_global(a, row_sharding(sharding)) for a in (index, limit)),
                     config)


def trim_completions(rollout: Rollout, buckets: tuple[int, ...]) -> Rollout:
    """Cut the completion arrays to the smallest bucket holding the longest completion, so
    the training step that follows compiles once per bucket, not once per length."""
    longest = int(np.asarray(to_host(rollout.completion_mask_BN)).sum(1).max())
    width = bucket_length(max(longest, 1), buckets, "completion length")
    if width >= rollout.completion_ids_BN.shape[1]:
        return rollout
    return rollout.replace(
        completion_ids_BN=rollout.completion_ids_BN[:, :width],
        completion_mask_BN=rollout.completion_mask_BN[:, :width],
        logprobs_BN=rollout.logprobs_BN[:, :width],
        action_mask_BN=None if rollout.action_mask_BN is None else rollout.action_mask_BN[:, :width],
    )


def concatenate_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """The rows of ``rollouts`` in order, as numpy arrays on the host: prompts left-padded and
    completions right-padded to the widest (``pad_token_id``, mask 0, log-prob 0)."""
    rollouts = to_host(rollouts)
    P = max(r.prompt_ids_BP.shape[1] for r in rollouts)
    N = max(r.completion_ids_BN.shape[1] for r in rollouts)

    def pad(a, width, fill, left):
        gap = width - a.shape[1]
        return np.pad(a, ((0, 0), (gap, 0) if left else (0, gap)), constant_values=fill)

    return Rollout(
        prompt_ids_BP=np.concatenate([pad(r.prompt_ids_BP, P, pad_token_id, True) for r in rollouts]),
        prompt_mask_BP=np.concatenate([pad(r.prompt_mask_BP, P, 0, True) for r in rollouts]),
        completion_ids_BN=np.concatenate([pad(r.completion_ids_BN, N, pad_token_id, False) for r in rollouts]),
        completion_mask_BN=np.concatenate([pad(r.completion_mask_BN, N, 0, False) for r in rollouts]),
        logprobs_BN=np.concatenate([pad(r.logprobs_BN, N, 0, False) for r in rollouts]),
        stopped_B=np.concatenate([np.asarray(r.stopped_B) for r in rollouts]),
        action_mask_BN=None if all(r.action_mask_BN is None for r in rollouts) else np.concatenate(
            [pad(r.completion_mask_BN if r.action_mask_BN is None else r.action_mask_BN, N, 0, False)
             for r in rollouts]))

"""Continuous batching over a paged KV cache, in one compiled program.

The static engine decodes a batch until its longest row ends, every row's cache reserved for
the longest possible completion. Here a fixed pool of decode slots serves a queue of requests
(each prompt x each sample): when a row ends, its slot takes the next waiting request in the
same ``lax.while_loop`` -- the prompt run into the slot's pages -- so no slot idles on a
finished row (Yu et al., 2022, "Orca: A Distributed Serving System for Transformer-Based
Generative Models"). The keys and values live on fixed-size pages taken from a shared pool as
a row grows and returned when it ends (Kwon et al., 2023, PagedAttention;
``models.kv_cache.PagedKVCache``), so the cache held is proportional to the tokens held, not
``rows x longest``.

A prompt is run once for all its samples (GRPO's group): the samples admitted while its rows
still hold its pages share the prompt's full pages -- written once, reference-counted, back
on the free stack when the last row holding them lets go -- and copy only its partial last
page, which their first new tokens fill (a row only ever writes at its own length, past the
shared pages; PagedAttention's copy-on-write, needed here for one page only).

Every completion is a function of (key, prompt index, sample index) alone: request ``r``'s
``t``-th token is drawn with ``fold_in(row_key[r], t)`` (``sampling.row_keys``), whatever slot
or step it runs in -- the static engine's completions, tokens and log-probs.

Admission takes a request when a slot is idle and the pool has the pages for its prompt and
its first new token, plus a page of growth for each running row. A step whose growing rows need more pages than are free preempts the
youngest rows until the rest fit; a preempted request goes back to the queue and later
restarts from its prompt, drawing the same tokens again (its keys do not change), so
preemption costs time, never changes a completion. The oldest row always runs, and the pool
holds at least one longest request, so the loop always ends.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax.config import ConfigError
from rlhf_jax.hosts import to_global
from rlhf_jax.models.heads import CausalLM
from rlhf_jax.models.kv_cache import PagedKVCache
from rlhf_jax.models.paged_attention import resolve_paged
from rlhf_jax.rollout.engine import GenerationConfig, Rollout, prepare_prompts, row_sharding
from rlhf_jax.rollout.sampling import row_keys, sample_token, step_keys


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """What a continuous-batching run did: decode ``steps``, ``prefills`` (model runs of a
    prompt; the other samples of a prompt share or copy its pages), ``preemptions``, the most
    pages in use at once (``peak_pages`` of ``pages``) and the pool's bytes."""

    steps: int
    prefills: int
    preemptions: int
    peak_pages: int
    pages: int
    cache_bytes: int


def pages_for(tokens, page_size: int):
    """Pages of ``page_size`` tokens that hold ``tokens`` tokens (``ceil``)."""
    return (tokens + page_size - 1) // page_size


@flax.struct.dataclass
class _State:
    cache: PagedKVCache
    free_P: jax.Array  # a stack of page ids: the first free_count are free
    free_count: jax.Array
    refs_P: jax.Array  # how many slots' tables hold each page (a shared prompt page: more than one)
    request_S: jax.Array  # the request each slot holds, -1: idle
    admitted_S: jax.Array  # when each slot's request was admitted (preemption takes the youngest)
    generated_S: jax.Array  # tokens sampled for the slot's request so far
    logits_SV: jax.Array  # the slot's next-token logits
    next_request: jax.Array  # the first request never started
    requeue_R: jax.Array  # a stack of preempted requests waiting to restart
    requeued: jax.Array
    kept_prompt: jax.Array  # the prompt whose prefill is kept for its other samples
    kept_keys_LKTD: jax.Array
    kept_values_LKTD: jax.Array
    kept_logits_V: jax.Array
    kept_pages_M: jax.Array  # the pages of the kept prompt's latest admission (its full ones shareable)
    sharing_S: jax.Array  # the slots that hold those full pages (none: they may be gone, a fresh set is taken)
    tokens_RN: jax.Array
    logprobs_RN: jax.Array
    mask_RN: jax.Array
    stopped_R: jax.Array
    finished: jax.Array
    admissions: jax.Array
    steps: jax.Array
    prefills: jax.Array
    preemptions: jax.Array
    peak_pages: jax.Array


def _release(s: _State, rows_S: jax.Array) -> _State:
    """The slots ``rows_S`` let go of their pages, their table rows cleared: a page no slot
    holds any more goes back on the free stack."""
    table_SM, pages = s.cache.table_SM, s.cache.pages
    held_F = (rows_S[:, None] & (table_SM < pages)).reshape(-1)
    refs_P = s.refs_P.at[table_SM.reshape(-1)].add(-held_F.astype(jnp.int32), mode="drop")
    freed_P = (s.refs_P > 0) & (refs_P == 0)
    at_P = jnp.where(freed_P, s.free_count + jnp.cumsum(freed_P) - 1, pages)
    return s.replace(
        free_P=s.free_P.at[at_P].set(jnp.arange(pages, dtype=jnp.int32), mode="drop"),
        free_count=s.free_count + freed_P.sum(dtype=jnp.int32), refs_P=refs_P,
        cache=s.cache.replace(table_SM=jnp.where(rows_S[:, None], pages, table_SM),
                              length_S=jnp.where(rows_S, 0, s.cache.length_S)),
        request_S=jnp.where(rows_S, -1, s.request_S), sharing_S=s.sharing_S & ~rows_S)


def _youngest_to_preempt(s: _State, live_S: jax.Array, need_S: jax.Array) -> jax.Array:
    """``[S]`` bool: the fewest youngest live slots whose pages, returned, leave enough free
    pages for the other slots that need one. Preempting the ``j`` youngest frees the pages all
    of whose holders are among them (a shared page stays while an older row holds it)."""
    S, pages = live_S.shape[0], s.cache.pages
    order_S = jnp.argsort(jnp.where(live_S, -s.admitted_S, jnp.iinfo(jnp.int32).max))  # youngest first
    rank_S = jnp.zeros(S, jnp.int32).at[order_S].set(jnp.arange(S, dtype=jnp.int32))
    table_SM = s.cache.table_SM
    last_P = jnp.full(pages, -1, jnp.int32).at[table_SM].max(  # the latest rank among each page's holders
        jnp.broadcast_to(rank_S[:, None], table_SM.shape), mode="drop")
    last_P = jnp.where(last_P >= 0, last_P, S)  # a page no slot holds: out of range, dropped below
    freed_J = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(jnp.zeros(S, jnp.int32).at[last_P].add(
        1, mode="drop"))])
    needed_J = need_S.sum(dtype=jnp.int32) - jnp.concatenate([jnp.zeros(1, jnp.int32),
                                                             jnp.cumsum(need_S[order_S].astype(jnp.int32))])
    count = jnp.argmax(s.free_count + freed_J >= needed_J)  # the first j that fits (j = S always does)
    return jnp.zeros(S, bool).at[order_S].set(jnp.arange(S) < count) & live_S


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static sizes of one program."""
    slots: int
    pages: int
    page_size: int
    pages_per_slot: int  # M
    prompt_pages: int  # pages of a bucket-wide prompt
    kernel: str  # decode attention over the pages: gather | pallas (models.paged_attention)


def _program(graphdef, params, prompt_ids_BP, prompt_mask_BP, key, prompt_index_B, limit_R, config: GenerationConfig,
             plan: _Plan):
    """The whole schedule as one ``lax.while_loop``; each step admits what fits (an inner loop,
    one prefill, or the prompt's shared pages and a copy of its last, per admission), samples
    a token for every running slot, releases finished rows' pages, preempts if the growing
    rows need more pages than are free, grants the pages and decodes the running slots.
    Returns the rollout ``[R, N]`` and the counts."""
    model: CausalLM = nnx.merge(graphdef, params)
    B, P = prompt_ids_BP.shape
    n, N, Z = config.num_samples, config.max_new_tokens, plan.page_size
    R, S, M, Mp = B * n, plan.slots, plan.pages_per_slot, plan.prompt_pages
    keys_R = row_keys(key, prompt_index_B, n)
    length_B = prompt_mask_BP.sum(1, dtype=jnp.int32)
    stop_X = jnp.asarray(config.stop_token_ids, jnp.int32)

    def prefill(prompt):
        logits_1V, dense = model.prefill(prompt_ids_BP[prompt][None], prompt_mask_BP[prompt][None], max_length=P)
        return dense.keys_LBKSD[:, 0], dense.values_LBKSD[:, 0], logits_1V[0].astype(jnp.float32)

    def waiting_request(s: _State):
        return jnp.where(s.requeued > 0, s.requeue_R[jnp.maximum(s.requeued - 1, 0)], s.next_request)

    def shared_pages(s: _State, prompt):
        """How many full pages of ``prompt`` rows still hold (0 unless it is the kept prompt)."""
        return jnp.where((prompt == s.kept_prompt) & s.sharing_S.any(), length_B[prompt] // Z, 0)

    def can_admit(s: _State):
        waiting = (s.requeued > 0) | (s.next_request < R)
        prompt = jnp.minimum(waiting_request(s), R - 1) // n
        reserve = (s.request_S >= 0).sum(dtype=jnp.int32)  # a page of growth for each running row
        needed = pages_for(length_B[prompt] + 1, Z) - shared_pages(s, prompt)
        return (s.request_S < 0).any() & waiting & (s.free_count >= needed + reserve)

    def admit(s: _State) -> _State:
        slot = jnp.argmax(s.request_S < 0)
        request = waiting_request(s)
        prompt = request // n
        fresh = prompt != s.kept_prompt
        keys_LKTD, values_LKTD, logits_V = jax.lax.cond(
            fresh, prefill, lambda _: (s.kept_keys_LKTD, s.kept_values_LKTD, s.kept_logits_V), prompt)
        length, shared = length_B[prompt], shared_pages(s, prompt)
        j_M = jnp.arange(Mp)
        new_M = j_M - shared  # the k-th page not shared comes off the free stack
        page_M = jnp.where(j_M < shared, s.kept_pages_M, jnp.where(
            j_M < pages_for(length, Z), s.free_P[jnp.maximum(s.free_count - 1 - new_M, 0)], plan.pages))
        write_M = jnp.where(j_M < shared, plan.pages, page_M)  # a shared page already holds these keys

        def paged(kv_LKTD):  # the prompt's real tokens (left-padded) from position 0, cut into pages
            kv_LKTD = jnp.roll(kv_LKTD, length - P, axis=2)
            kv_LKTD = jnp.pad(kv_LKTD, ((0, 0), (0, 0), (0, Mp * Z - P), (0, 0)))
            L, K, _, D = kv_LKTD.shape
            return kv_LKTD.reshape(L, K, Mp, Z, D)

        cache = s.cache.replace(
            keys_LKPZD=s.cache.keys_LKPZD.at[:, :, write_M].set(paged(keys_LKTD).astype(s.cache.keys_LKPZD.dtype),
                                                               mode="drop"),
            values_LKPZD=s.cache.values_LKPZD.at[:, :, write_M].set(
                paged(values_LKTD).astype(s.cache.values_LKPZD.dtype), mode="drop"),
            table_SM=s.cache.table_SM.at[slot].set(jnp.full(M, plan.pages, jnp.int32).at[:Mp].set(page_M)),
            length_S=s.cache.length_S.at[slot].set(length))
        from_queue = s.requeued > 0
        return s.replace(
            cache=cache,
            free_count=s.free_count - pages_for(length, Z) + shared,
            refs_P=s.refs_P.at[page_M].add(1, mode="drop"),
            request_S=s.request_S.at[slot].set(request),
            admitted_S=s.admitted_S.at[slot].set(s.admissions),
            generated_S=s.generated_S.at[slot].set(0),
            logits_SV=s.logits_SV.at[slot].set(logits_V),
            next_request=jnp.where(from_queue, s.next_request, s.next_request + 1),
            requeued=jnp.where(from_queue, s.requeued - 1, s.requeued),
            kept_prompt=prompt, kept_keys_LKTD=keys_LKTD, kept_values_LKTD=values_LKTD, kept_logits_V=logits_V,
            kept_pages_M=page_M, sharing_S=jnp.where(shared > 0, s.sharing_S, False).at[slot].set(True),
            admissions=s.admissions + 1,
            prefills=s.prefills + fresh.astype(jnp.int32))

    def step(s: _State) -> _State:
        s = jax.lax.while_loop(can_admit, admit, s)
        active_S = s.request_S >= 0
        request_S = jnp.where(active_S, s.request_S, 0)
        token_S, logp_S = sample_token(step_keys(keys_R[request_S], s.generated_S), s.logits_SV, config.sampling)
        out_S = jnp.where(active_S, s.request_S, R)  # idle slots write nowhere
        stop_S = jnp.isin(token_S, stop_X)
        done_S = active_S & (stop_S | (s.generated_S + 1 >= limit_R[request_S]))
        s = s.replace(
            tokens_RN=s.tokens_RN.at[out_S, s.generated_S].set(token_S, mode="drop"),
            logprobs_RN=s.logprobs_RN.at[out_S, s.generated_S].set(logp_S, mode="drop"),
            mask_RN=s.mask_RN.at[out_S, s.generated_S].set(True, mode="drop"),
            stopped_R=s.stopped_R.at[jnp.where(done_S, s.request_S, R)].set(stop_S, mode="drop"),
            finished=s.finished + done_S.sum(dtype=jnp.int32),
            generated_S=s.generated_S + active_S.astype(jnp.int32))
        s = _release(s, done_S)
        live_S = active_S & ~done_S
        need_S = live_S & (s.cache.length_S % Z == 0)  # the token to write starts a page
        preempt_S = _youngest_to_preempt(s, live_S, need_S)
        restart_S = jnp.where(preempt_S, s.request_S, R)
        s = _release(s, preempt_S).replace(  # their pages back first: the grants below may take them
            requeue_R=s.requeue_R.at[jnp.where(preempt_S, s.requeued + jnp.cumsum(preempt_S) - 1, R)].set(
                s.request_S, mode="drop"),
            requeued=s.requeued + preempt_S.sum(dtype=jnp.int32),
            tokens_RN=s.tokens_RN.at[restart_S].set(config.pad_token_id, mode="drop"),
            logprobs_RN=s.logprobs_RN.at[restart_S].set(0.0, mode="drop"),
            mask_RN=s.mask_RN.at[restart_S].set(False, mode="drop"),
            preemptions=s.preemptions + preempt_S.sum(dtype=jnp.int32))
        grant_S = need_S & ~preempt_S
        rank_S = jnp.cumsum(grant_S) - 1
        page_S = s.free_P[jnp.clip(s.free_count - 1 - rank_S, 0, plan.pages - 1)]
        column_S = jnp.where(grant_S, s.cache.length_S // Z, M)  # out of range: dropped
        s = s.replace(cache=s.cache.replace(table_SM=s.cache.table_SM.at[jnp.arange(S), column_S].set(
            page_S, mode="drop")), free_count=s.free_count - grant_S.sum(dtype=jnp.int32),
            refs_P=s.refs_P.at[jnp.where(grant_S, page_S, plan.pages)].add(1, mode="drop"))
        live_S = live_S & ~preempt_S
        logits_SV, cache = model.decode_paged(jnp.where(live_S, token_S, config.pad_token_id), live_S, s.cache,
                                             plan.kernel)
        return s.replace(
            cache=cache,
            logits_SV=jnp.where(live_S[:, None], logits_SV.astype(jnp.float32), s.logits_SV),
            steps=s.steps + 1,
            peak_pages=jnp.maximum(s.peak_pages, plan.pages - s.free_count))

    c = model.config
    dtype = model.model.dtype or jnp.float32
    kept = jnp.zeros((c.num_layers, c.num_kv_heads, P, c.head_dim), dtype)
    zero = jnp.zeros((), jnp.int32)
    start = _State(
        cache=PagedKVCache.empty(c, S, plan.pages, Z, M, dtype),
        free_P=jnp.arange(plan.pages, dtype=jnp.int32)[::-1], free_count=zero + plan.pages,
        refs_P=jnp.zeros(plan.pages, jnp.int32),
        request_S=jnp.full(S, -1, jnp.int32), admitted_S=jnp.zeros(S, jnp.int32),
        generated_S=jnp.zeros(S, jnp.int32), logits_SV=jnp.zeros((S, c.vocab_size), jnp.float32),
        next_request=zero, requeue_R=jnp.zeros(R, jnp.int32), requeued=zero,
        kept_prompt=zero - 1, kept_keys_LKTD=kept, kept_values_LKTD=kept,
        kept_logits_V=jnp.zeros(c.vocab_size, jnp.float32), kept_pages_M=jnp.full(Mp, plan.pages, jnp.int32),
        sharing_S=jnp.zeros(S, bool),
        tokens_RN=jnp.full((R, N), config.pad_token_id, jnp.int32), logprobs_RN=jnp.zeros((R, N), jnp.float32),
        mask_RN=jnp.zeros((R, N), bool), stopped_R=jnp.zeros(R, bool), finished=zero,
        admissions=zero, steps=zero, prefills=zero, preemptions=zero, peak_pages=zero)
    end = jax.lax.while_loop(lambda s: s.finished < R, step, start)
    repeat = lambda a: jnp.repeat(a, n, axis=0)  # noqa: E731
    rollout = Rollout(prompt_ids_BP=repeat(prompt_ids_BP), prompt_mask_BP=repeat(prompt_mask_BP),
                      completion_ids_BN=end.tokens_RN, completion_mask_BN=end.mask_RN, logprobs_BN=end.logprobs_RN,
                      stopped_B=end.stopped_R)
    return rollout, (end.steps, end.prefills, end.preemptions, end.peak_pages)


compiled_program = jax.jit(_program, static_argnames=("graphdef", "config", "plan"))


def program_plan(config: GenerationConfig, prompt_width: int, model_config, cache_dtype=jnp.float32) -> _Plan:
    """The static sizes of ``config.continuous``'s program for prompts ``prompt_width`` wide:
    each slot's page table holds a whole-width prompt and ``max_new_tokens``; the pool is
    ``config.continuous.pages`` or that many pages for every slot; the decode attention is
    ``config.continuous.attention`` resolved for the model of ``model_config`` (a
    ``DecoderConfig``) with a cache of ``cache_dtype`` on the target platform (``ConfigError``
    for a kernel that cannot run it)."""
    c = config.continuous
    longest = pages_for(prompt_width + config.max_new_tokens, c.page_size)
    return _Plan(slots=c.slots, pages=c.pages or c.slots * longest, page_size=c.page_size, pages_per_slot=longest,
                 prompt_pages=pages_for(prompt_width, c.page_size), kernel=resolve_paged(
        c.attention, head_dim=model_config.head_dim, windowed=model_config.windowed, cache_dtype=cache_dtype))


def generate_continuous(model: CausalLM, prompt_ids_BP, prompt_mask_BP, key: jax.Array, config: GenerationConfig,
                        max_new_tokens_B=None, prompt_index_B=None) -> tuple[Rollout, EngineStats]:
    """``config.num_samples`` completions of each left-padded prompt ``[B, P]`` by continuous
    batching (``config.continuous``): the :class:`~rlhf_jax.rollout.engine.Rollout` the static
    engine gives for ``key``, rows prompt-major, and the run's :class:`EngineStats`.
    ``max_new_tokens_B``: an optional token limit per output row ``[B * num_samples]``;
    ``prompt_index_B`` the prompts' indices in the keys (``rollout.generate``). Prompts
    on a mesh are decoded there replicated (the parameters as placed) and the rows come back
    split as the prompt rows were. Raises ``ValueError`` for prompts
    the engine cannot serve (``engine.check_prompts``) and ``ConfigError`` (a ``ValueError``
    naming ``rollout.cache_pages``) for a pool smaller than one longest request."""
    ids, mask, index, limit = prepare_prompts(model, prompt_ids_BP, prompt_mask_BP, config, max_new_tokens_B,
                                              prompt_index_B)
    plan = program_plan(config, ids.shape[1], model.config, model.model.dtype or jnp.float32)
    # a request needs its prompt and first new token's pages to be admitted, and its prompt and
    # all but its last token's (never written) as it grows
    needed = int(pages_for(mask.sum(1).max() + max(int(limit.max()) - 1, 1), plan.page_size))
    if plan.pages < needed:
        raise ConfigError(f"continuous batching: a pool of {plan.pages} pages of {plan.page_size} tokens cannot hold "
                         f"the longest request ({needed} pages); raise rollout.cache_pages to at least {needed}")
    sharding = getattr(prompt_ids_BP, "sharding", None)
    replicated = NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else None
    graphdef, params = nnx.split(model)
    ids, mask, index, limit = (to_global(a, replicated) for a in (ids, mask, index, limit))
    rollout, counts = compiled_program(graphdef, params, ids, mask, key, index, limit, config, plan)
    if replicated is not None:  # the rows where the caller's prompt rows were (over the same axes)
        rollout = jax.tree.map(lambda a: jax.device_put(a, row_sharding(sharding)), rollout)
    steps, prefills, preemptions, peak = (int(x) for x in jax.device_get(counts))
    mc = model.config
    itemsize = np.dtype(model.model.dtype or jnp.float32).itemsize
    cache_bytes = 2 * mc.num_layers * mc.num_kv_heads * plan.pages * plan.page_size * mc.head_dim * itemsize
    return rollout, EngineStats(steps, prefills, preemptions, peak, plan.pages, cache_bytes)

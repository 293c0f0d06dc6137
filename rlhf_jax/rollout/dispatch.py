"""The one entry point to both generation engines: the static one (``rollout.engine``) and
continuous batching over a paged KV cache (``rollout.continuous``), picked by
``GenerationConfig.continuous``."""

from __future__ import annotations

import jax

from rlhf_jax.models.heads import CausalLM
from rlhf_jax.rollout.continuous import EngineStats, generate_continuous
from rlhf_jax.rollout.engine import GenerationConfig, Rollout, generate_static


def generate_with_stats(model: CausalLM, prompt_ids_BP, prompt_mask_BP, key: jax.Array, config: GenerationConfig,
                        max_new_tokens_B=None, prompt_index_B=None) -> tuple[Rollout, EngineStats | None]:
    """:func:`generate`, and the continuous engine's :class:`EngineStats` (None for the static
    engine)."""
    if config.continuous is None:
        return generate_static(model, prompt_ids_BP, prompt_mask_BP, key, config, max_new_tokens_B,
                               prompt_index_B), None
    return generate_continuous(model, prompt_ids_BP, prompt_mask_BP, key, config, max_new_tokens_B, prompt_index_B)


def generate(model: CausalLM, prompt_ids_BP, prompt_mask_BP, key: jax.Array, config: GenerationConfig,
             max_new_tokens_B=None, prompt_index_B=None) -> Rollout:
    """Sample ``config.num_samples`` completions for each left-padded prompt ``[B, P]``, rows
    prompt-major ``[B * num_samples, N]``; sample ``i`` of prompt ``b`` with the key
    ``fold_in(fold_in(key, prompt_index_B[b]), i)`` (:func:`~rlhf_jax.rollout.sampling.row_keys`;
    ``prompt_index_B`` defaults to ``0..B-1``): the static engine, or with ``config.continuous``
    the continuous-batching one -- the same completions either way, and a prompt's completions
    the same in any batch that gives it the same index. ``max_new_tokens_B``: an optional token
    limit per output row. Raises ``ValueError`` for prompts or limits the engine cannot serve."""
    return generate_with_stats(model, prompt_ids_BP, prompt_mask_BP, key, config, max_new_tokens_B,
                               prompt_index_B)[0]

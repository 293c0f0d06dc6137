"""Heads on the shared decoder: the causal LM, and a linear score head read either per
token (a PPO critic) or at the last token (a reward model, as transformers'
``AutoModelForSequenceClassification``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.models.decoder import Decoder
from rlhf_jax.models.kv_cache import KVCache, PagedKVCache
from rlhf_jax.models.layers import linear
from rlhf_jax.models.sharding import constrain


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (Gemma 2's logit soft-capping); identity when ``cap`` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def last_token_index(input_ids_BT: jax.Array, attention_mask_BT: jax.Array, pad_token_id: int | None,
                     within_BT: jax.Array | None = None) -> jax.Array:
    """The position a sequence score is read from, as transformers does it for a sequence
    alone: the rightmost token that is not ``pad_token_id`` -- among the positions the
    attention mask marks real, so padding is never read even when the pad id is wrong;
    without a pad token, the rightmost real position. ``within_BT``: look only among these
    tokens (a shared-prompt row's prompt and one of its responses). ``[B]`` int32."""
    real_BT = attention_mask_BT.astype(bool)
    if pad_token_id is not None:
        real_BT &= input_ids_BT != pad_token_id
    if within_BT is not None:
        real_BT &= within_BT
    T = input_ids_BT.shape[1]
    return jnp.argmax(jnp.arange(T) * real_BT, axis=1).astype(jnp.int32)


class CausalLM(nnx.Module):
    """``model(input_ids_BT, attention_mask_BT) -> logits_BTV``; ``prefill``/``decode`` for sampling."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool | str = False, scan_layers: bool | None = None):
        # Parameters carry logical axis names (vocab, embed, heads, kv, mlp) for sharding rules;
        # with eager sharding off they are not taken for mesh axes at construction.
        with nnx.use_eager_sharding(False):
            self.config = config
            self.model = Decoder(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                 scan_layers=scan_layers)
            self.lm_head = None if config.tie_word_embeddings else linear(
                config.hidden_size, config.vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dtype,
                param_dtype=param_dtype, std=config.initializer_range,
            )

    def output_embedding(self) -> jax.Array:
        """The unembedding matrix ``[D, V]`` (the token embedding transposed when tied)."""
        if self.lm_head is None:
            return self.model.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, h_BTD: jax.Array) -> jax.Array:
        """Next-token logits ``[..., V]`` of final hidden states ``[..., D]``: the unembedding,
        then Gemma 2's final soft-cap when configured."""
        logits_BTV = self.model.embed_tokens.attend(h_BTD) if self.lm_head is None else self.lm_head(h_BTD)
        logits_BTV = constrain(logits_BTV, ("batch",) + (None,) * (logits_BTV.ndim - 2) + ("vocab",))
        return softcap(logits_BTV, self.config.final_softcap)

    def __call__(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array,
                 segment_ids_BT: jax.Array | None = None) -> jax.Array:
        return self.logits(self.model(input_ids_BT, attention_mask_BT, segment_ids_BT))

    def prefill(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array, max_length: int,
                cache_dtype=None) -> tuple[jax.Array, KVCache]:
        """Run a (left-padded) prompt into a fresh cache of ``max_length`` slots; returns the
        logits at the last position ``[B, V]`` and the cache."""
        B = input_ids_BT.shape[0]
        cache = KVCache.empty(self.config, B, max_length, cache_dtype or self.model.dtype or jnp.float32)
        h_BTD, cache = self.model.extend(input_ids_BT, attention_mask_BT, cache)
        return self.logits(h_BTD[:, -1]), cache

    def decode(self, token_B: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Append one token per row; returns its next-token logits ``[B, V]`` and the cache."""
        h_B1D, cache = self.model.extend(token_B[:, None], jnp.ones_like(token_B[:, None]), cache)
        return self.logits(h_B1D[:, 0]), cache

    def decode_paged(self, token_S: jax.Array, live_S: jax.Array, cache: PagedKVCache,
                     kernel: str = "gather") -> tuple[jax.Array, PagedKVCache]:
        """Append one token to each ``live_S`` decode slot of a paged cache with the attention
        ``kernel`` (:meth:`Decoder.decode_paged`); returns the next-token logits ``[S, V]`` and the cache."""
        h_SD, cache = self.model.decode_paged(token_S, live_S, cache, kernel)
        return self.logits(h_SD), cache


def _score_head(config: DecoderConfig, num_labels: int, rngs: nnx.Rngs, dtype, param_dtype):
    return linear(config.hidden_size, num_labels, ("embed", None), rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                  std=config.initializer_range)


class ScoreModel(nnx.Module):
    """Decoder + linear ``score`` head ``[D, L]`` (no bias), the layout of transformers'
    ``*ForSequenceClassification``. ``model(ids, mask)`` gives per-token scores ``[B, T, L]``
    (a critic's values with ``L = 1``); :meth:`sequence_scores` reads them at
    :func:`last_token_index` (a reward model's scores ``[B, L]``)."""

    def __init__(self, config: DecoderConfig, num_labels: int = 1, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: bool | str = False, scan_layers: bool | None = None):
        with nnx.use_eager_sharding(False):
            self.config, self.num_labels = config, num_labels
            self.model = Decoder(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                 scan_layers=scan_layers)
            self.score = _score_head(config, num_labels, rngs, dtype, param_dtype)

    @classmethod
    def from_causal_lm(cls, lm: CausalLM, num_labels: int = 1, *, rngs: nnx.Rngs) -> ScoreModel:
        """A reward model or critic initialised from a causal LM (InstructGPT's recipe): a copy
        of its decoder and a new score head drawn from ``N(0, initializer_range^2)``."""
        model = nnx.eval_shape(lambda: cls(lm.config, num_labels, rngs=nnx.Rngs(0), scan_layers=lm.model.scan_layers))
        model.model = nnx.clone(lm.model)
        nnx.update(model.model, jax.tree.map(jnp.copy, nnx.state(model.model)))  # its own arrays: it trains apart
        with nnx.use_eager_sharding(False):
            model.score = _score_head(lm.config, num_labels, rngs, lm.model.dtype, lm.model.embed_tokens.param_dtype)
        return model

    def __call__(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array,
                 segment_ids_BT: jax.Array | None = None) -> jax.Array:
        return self.score(self.model(input_ids_BT, attention_mask_BT, segment_ids_BT))

    def sequence_scores(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array) -> jax.Array:
        """Scores ``[B, L]`` read at each row's last real token (:func:`last_token_index`): a
        reward model's rewards."""
        scores_BTL = self(input_ids_BT, attention_mask_BT)
        index_B = last_token_index(input_ids_BT, attention_mask_BT, self.config.pad_token_id)
        return jnp.take_along_axis(scores_BTL, index_B[:, None, None], axis=1)[:, 0]

    def response_scores(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array, segment_ids_BT: jax.Array,
                        sequence_BTK: jax.Array) -> jax.Array:
        """Scores ``[B, K, L]`` of the ``K`` responses of rows holding a prompt and several
        responses (``data.SharedPromptResponses``): ``sequence_BTK`` (bool) marks prompt +
        response ``k``, whose score is read at its own last token as :meth:`sequence_scores`
        reads it from the prompt + response alone."""
        scores_BTL = self(input_ids_BT, attention_mask_BT, segment_ids_BT)
        index_BK = jnp.stack([last_token_index(input_ids_BT, attention_mask_BT, self.config.pad_token_id,
                                               within_BT=sequence_BTK[..., k])
                            for k in range(sequence_BTK.shape[-1])], axis=1)
        return jnp.take_along_axis(scores_BTL, index_BK[:, :, None], axis=1)

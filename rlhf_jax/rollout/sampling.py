"""Next-token sampling as pure functions of logits: temperature, top-k, top-p (nucleus,
Holtzman et al., 2020) and min-p (Nguyen et al., 2024), applied in that order, as
transformers' ``generate`` applies its logits warpers.

Log-prob convention: the log-prob returned with a sampled token is that of the
distribution it was actually drawn from, ``log softmax(filter(logits / T))``. At
temperature 1 with no filter this is the model's own log-prob, so a training forward over
the same tokens gives the same number and the first PPO ratio is exactly 1. Greedy
decoding (temperature 0) returns the model's untempered, unfiltered log-prob of the argmax.
At other settings the trainer scores the drawn tokens with :func:`sampled_token_logprobs`,
which gives the sampler's number at the sampling parameters, so the first ratio is 1 for
any temperature and filter.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How a token is drawn from the logits: temperature, then top-k, top-p (Holtzman et al., 2020)
    and min-p filters. Raises ``ValueError`` for a value out of range."""
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off; keeps every token whose logit ties the k-th largest
    top_p: float = 1.0  # 1: off; keeps the smallest top set whose probability reaches top_p
    min_p: float = 0.0  # 0: off; keeps tokens with probability >= min_p * the top probability

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {self.min_p}")

    @property
    def filters(self) -> bool:
        """Whether a top-k, top-p or min-p filter is active (greedy decoding ignores them)."""
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0)

    @property
    def is_model_distribution(self) -> bool:
        """Tokens are drawn from (or, greedy, scored by) the model's own softmax."""
        return self.temperature in (0.0, 1.0) and not self.filters


def _filter(z_BV: jax.Array, config: SamplingConfig) -> jax.Array:
    """Tempered logits ``z`` with top-k, top-p and min-p applied in that order; filtered-out
    tokens get ``-inf``. Works on any leading shape (``[..., V]``)."""
    if config.top_k > 0 and config.top_k < z_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(z_BV, config.top_k)[0][..., -1:]
        z_BV = jnp.where(z_BV >= kth_B1, z_BV, -jnp.inf)
    if config.top_p < 1.0:
        sorted_BV = -jnp.sort(-z_BV, axis=-1)
        p_sorted_BV = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before_BV = jnp.cumsum(p_sorted_BV, axis=-1) - p_sorted_BV
        keep_BV = mass_before_BV < config.top_p  # the top token always stays
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        z_BV = jnp.where(z_BV >= threshold_B1, z_BV, -jnp.inf)
    if config.min_p > 0.0:
        p_BV = jax.nn.softmax(z_BV, axis=-1)
        z_BV = jnp.where(p_BV >= config.min_p * p_BV.max(-1, keepdims=True), z_BV, -jnp.inf)
    return z_BV


def _tempered(logits_BV: jax.Array, config: SamplingConfig) -> jax.Array:
    z_BV = logits_BV.astype(jnp.promote_types(logits_BV.dtype, jnp.float32))
    return z_BV / config.temperature if config.temperature > 0 else z_BV


def sampling_logprobs(logits_BV: jax.Array, config: SamplingConfig) -> jax.Array:
    """``log softmax(filter(logits / T))`` over the last axis; filtered-out tokens get ``-inf``."""
    return jax.nn.log_softmax(_filter(_tempered(logits_BV, config), config), axis=-1)


def sampled_token_logprobs(logits_BTV: jax.Array, tokens_BT: jax.Array, config: SamplingConfig) -> jax.Array:
    """``logp_BT``: the log-prob of ``tokens_BT`` under the distribution the sampler drew them
    from -- the training side of the module's convention, differentiable in the logits.

        logp(x) = z[x] - logsumexp_{v in K(z) + {x}} z[v],    z = logits / T

    ``K(z)``: the tokens the top-k / top-p / min-p filters keep at ``z`` (renormalised
    filtered distribution, as sampled). The drawn token ``x`` always counts as kept: at the
    sampling parameters it is in ``K`` anyway (so the value equals the sampler's), and after
    updates that push it out of the filter the log-prob stays finite instead of ``-inf``.
    The kept set is a constant for the gradient. Greedy (``T = 0``) and ``T = 1`` without
    filters give the model's own log-prob. Shapes: ``logits [..., V]``, ``tokens [...]``."""
    z_BTV = _tempered(logits_BTV, dataclasses.replace(config, temperature=config.temperature or 1.0))
    picked_BT = jnp.take_along_axis(z_BTV, tokens_BT[..., None], axis=-1)[..., 0]
    if config.filters:
        drawn_BTV = jax.nn.one_hot(tokens_BT, z_BTV.shape[-1], dtype=bool)
        kept_BTV = jnp.isfinite(_filter(jax.lax.stop_gradient(z_BTV), config)) | drawn_BTV
        z_BTV = jnp.where(kept_BTV, z_BTV, -jnp.inf)
    return picked_BT - jax.nn.logsumexp(z_BTV, axis=-1)


def row_keys(key: jax.Array, prompt_index_B, samples: int) -> jax.Array:
    """``keys_R`` ``[B * samples]`` (prompt-major): sample ``i`` of prompt ``b`` gets
    ``fold_in(fold_in(key, prompt_index_B[b]), i)``. A completion drawn with its row's key (step
    ``t`` folds in ``t``, :func:`step_keys`) is a function of (key, prompt index, sample index)
    alone -- not of the batch, the decode slot or the other rows it ran beside."""
    per_prompt_B = jax.vmap(lambda p: jax.random.fold_in(key, p))(jnp.asarray(prompt_index_B, jnp.uint32))
    return jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(samples)))(
        per_prompt_B).reshape(-1)


def step_keys(keys_B: jax.Array, step_B: jax.Array) -> jax.Array:
    """``fold_in(keys_B[b], step_B[b])`` per row: the key of each row's ``step``-th token."""
    return jax.vmap(jax.random.fold_in)(keys_B, jnp.broadcast_to(step_B, keys_B.shape))


def inverse_cdf_sample(keys_B: jax.Array, logp_BV: jax.Array) -> jax.Array:
    """One draw per row from ``exp(logp)`` with that row's key: the first token whose cumulative
    probability reaches ``u ~ U(0, total]``. One uniform per row instead of the Gumbel trick's
    one per vocabulary entry, which dominates a decode step on CPU for small models.
    Zero-probability tokens are never drawn (their cumulative value equals their predecessor's)."""
    cdf_BV = jnp.cumsum(jnp.exp(logp_BV), axis=-1)
    u_B1 = (1.0 - jax.vmap(jax.random.uniform)(keys_B))[:, None] * cdf_BV[:, -1:]
    return jnp.sum(cdf_BV < u_B1, axis=-1)


def sample_token(keys_B: jax.Array, logits_BV: jax.Array, config: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """``(token_B, logp_B)``: one draw per row from the filtered distribution, with row ``b``'s
    key ``keys_B[b]``, and its log-prob."""
    if config.temperature == 0:
        token_B = jnp.argmax(logits_BV, axis=-1)
        logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    else:
        logp_BV = sampling_logprobs(logits_BV, config)
        token_B = inverse_cdf_sample(keys_B, logp_BV)
    return token_B.astype(jnp.int32), jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]

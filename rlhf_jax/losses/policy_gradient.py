"""Policy-gradient losses: clipped PPO (policy and value), entropy bonus, REINFORCE with a
baseline, CISPO's clipped importance weights, and the GRPO objective with its variants.

Every per-token loss is reduced by ``rlhf_jax.masked.aggregate``; ``aggregation`` selects
token-mean (default), sequence-mean-of-token-means, or sequence-sum / constant.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax._checks import check_choice, check_floating, check_mask_like, check_rank, check_same_shape
from rlhf_jax.kl import kl_penalty
from rlhf_jax.logprobs import categorical_entropy
from rlhf_jax.masked import Aggregation, aggregate, masked_mean, psum_over


class PolicyAux(NamedTuple):
    """Diagnostics of the clipped surrogate (Schulman et al., 2017), each a scalar over the valid
    tokens."""
    clip_fraction: jax.Array  # fraction of valid tokens where the clipped surrogate is active
    approx_kl: jax.Array  # k3 estimate of KL(pi_old || pi) on the valid tokens
    ratio_mean: jax.Array  # mean of pi / pi_old over valid tokens
    ratio_max: jax.Array  # max of pi / pi_old over valid tokens


def _check_token_arrays(named: list[tuple[str, jax.Array]], mask_BT: jax.Array) -> None:
    check_rank(named[0][1], 2, named[0][0])
    check_same_shape(named)
    for name, x in named:
        check_floating(x, name)
    check_mask_like(mask_BT, named[0][1], "mask_BT", named[0][0])


def _masked_max(x_BT: jax.Array, mask_BT: jax.Array, axis_name: str | None) -> jax.Array:
    local = jnp.max(jnp.where(mask_BT, x_BT, -jnp.inf))
    return local if axis_name is None else lax.pmax(local, axis_name)


def _policy_aux(clipped_BT, logp_BT, old_logp_BT, ratio_BT, mask_BT, axis_name) -> PolicyAux:
    """The diagnostics of a ratio-based policy loss over the valid tokens (no gradient)."""
    logp_BT, old_logp_BT, ratio_BT = (lax.stop_gradient(x) for x in (logp_BT, old_logp_BT, ratio_BT))
    return PolicyAux(
        clip_fraction=masked_mean(clipped_BT.astype(ratio_BT.dtype), mask_BT, axis_name=axis_name),
        approx_kl=masked_mean(kl_penalty(old_logp_BT, logp_BT, "k3"), mask_BT, axis_name=axis_name),
        ratio_mean=masked_mean(ratio_BT, mask_BT, axis_name=axis_name),
        ratio_max=_masked_max(ratio_BT, mask_BT, axis_name),
    )


def ppo_policy_loss(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    advantages_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    importance_weights_BT: jax.Array | None = None,
    aggregation: Aggregation = "token_mean",
    normalizer: float = 1.0,
    axis_name: str | None = None,
) -> tuple[jax.Array, PolicyAux]:
    """PPO's clipped surrogate (Schulman et al., 2017, eq. 7), as a loss to minimise:

        rho = pi(a|s) / pi_old(a|s)
        l   = -min( rho A, clip(rho, 1 - eps_low, 1 + eps_high) A )

    ``clip_eps_high`` (default ``clip_eps``) gives DAPO's asymmetric "clip-higher" range
    (Yu et al., 2025). ``dual_clip = c > 1`` bounds the loss of negative advantages by
    ``-c A`` (Ye et al., 2020, "dual-clip PPO"): ``l = min(l, -c A)`` where ``A < 0``.
    ``importance_weights_BT`` (constants, e.g. ``min(pi_old / pi_sampler, C)``: truncated
    importance sampling for a sampler that differs from the trainer, Yao et al., 2025)
    multiply each token's loss. ``advantages_BT`` and ``old_logp_BT`` are treated as constants.
    Returns ``(loss, PolicyAux)``; raises ``ValueError`` on mismatched shapes or ``dual_clip <= 1``.
    """
    _check_token_arrays(
        [("logp_BT", logp_BT), ("old_logp_BT", old_logp_BT), ("advantages_BT", advantages_BT)], mask_BT
    )
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (Ye et al., 2020), got {dual_clip}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    old_logp_BT = lax.stop_gradient(old_logp_BT)
    advantages_BT = lax.stop_gradient(advantages_BT)
    ratio_BT = jnp.exp(logp_BT - old_logp_BT)
    unclipped_BT = -ratio_BT * advantages_BT
    clipped_BT = -jnp.clip(ratio_BT, 1.0 - clip_eps, 1.0 + eps_high) * advantages_BT
    loss_BT = jnp.maximum(unclipped_BT, clipped_BT)
    if dual_clip is not None:
        loss_BT = jnp.where(advantages_BT < 0, jnp.minimum(loss_BT, -dual_clip * advantages_BT), loss_BT)
    if importance_weights_BT is not None:
        loss_BT = loss_BT * lax.stop_gradient(importance_weights_BT)
    loss = aggregate(loss_BT, mask_BT, aggregation, normalizer=normalizer, axis_name=axis_name)
    return loss, _policy_aux(clipped_BT > unclipped_BT, logp_BT, old_logp_BT, ratio_BT, mask_BT, axis_name)


def cispo_policy_loss(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    advantages_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    importance_weights_BT: jax.Array | None = None,
    aggregation: Aggregation = "token_mean",
    normalizer: float = 1.0,
    axis_name: str | None = None,
) -> tuple[jax.Array, PolicyAux]:
    """CISPO (MiniMax, 2025, eq. 4): REINFORCE weighted by the clipped importance ratio, the
    weight a constant, so no token's gradient is dropped by the clip as PPO's would be:

        rho = pi(a|s) / pi_old(a|s)
        l   = -sg( clip(rho, 1 - eps_low, 1 + eps_high) ) * A * log pi(a|s)

    Arguments, aggregation and ``PolicyAux`` as in :func:`ppo_policy_loss` (``clip_fraction``:
    the share of tokens whose weight is clipped). Raises ``ValueError`` on mismatched shapes."""
    _check_token_arrays(
        [("logp_BT", logp_BT), ("old_logp_BT", old_logp_BT), ("advantages_BT", advantages_BT)], mask_BT
    )
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio_BT = lax.stop_gradient(jnp.exp(logp_BT - lax.stop_gradient(old_logp_BT)))
    weight_BT = jnp.clip(ratio_BT, 1.0 - clip_eps, 1.0 + eps_high)
    loss_BT = -weight_BT * lax.stop_gradient(advantages_BT) * logp_BT
    if importance_weights_BT is not None:
        loss_BT = loss_BT * lax.stop_gradient(importance_weights_BT)
    loss = aggregate(loss_BT, mask_BT, aggregation, normalizer=normalizer, axis_name=axis_name)
    return loss, _policy_aux(weight_BT != ratio_BT, logp_BT, old_logp_BT, ratio_BT, mask_BT, axis_name)


class PenaltyAux(NamedTuple):
    """Diagnostics of PPO's KL-penalty surrogate: the surrogate alone and the KL estimate."""
    surrogate: jax.Array  # the aggregated -rho A
    kl: jax.Array  # mean k3 estimate of KL(pi_old || pi) over valid tokens


def ppo_penalty_loss(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    advantages_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    beta: float | jax.Array,
    importance_weights_BT: jax.Array | None = None,
    aggregation: Aggregation = "token_mean",
    normalizer: float = 1.0,
    axis_name: str | None = None,
) -> tuple[jax.Array, PenaltyAux]:
    """PPO's KL-penalised surrogate (Schulman et al., 2017, eq. 8), as a loss to minimise:

        l_t = -rho_t A_t + beta * k3_t,      rho_t = pi(a_t|s_t) / pi_old(a_t|s_t)

    with ``k3_t = (rho_t - 1) - log rho_t``, the unbiased, non-negative estimate of
    KL(pi_old || pi) on the tokens ``pi_old`` sampled (Schulman, 2020). ``beta`` follows
    ``kl.ppo_penalty_kl_controller``. ``old_logp_BT`` and ``advantages_BT`` are constants;
    ``importance_weights_BT`` as in :func:`ppo_policy_loss` (they weigh the surrogate's tokens).
    Raises ``ValueError`` on mismatched shapes."""
    _check_token_arrays(
        [("logp_BT", logp_BT), ("old_logp_BT", old_logp_BT), ("advantages_BT", advantages_BT)], mask_BT
    )
    log_ratio_BT = logp_BT - lax.stop_gradient(old_logp_BT)
    ratio_BT = jnp.exp(log_ratio_BT)
    surrogate_BT = -ratio_BT * lax.stop_gradient(advantages_BT)
    if importance_weights_BT is not None:
        surrogate_BT = surrogate_BT * lax.stop_gradient(importance_weights_BT)
    surrogate = aggregate(surrogate_BT, mask_BT, aggregation, normalizer=normalizer, axis_name=axis_name)
    k3_BT = (ratio_BT - 1.0) - log_ratio_BT
    kl_term = aggregate(k3_BT, mask_BT, aggregation, normalizer=normalizer, axis_name=axis_name)
    aux = PenaltyAux(surrogate=surrogate, kl=masked_mean(lax.stop_gradient(k3_BT), mask_BT, axis_name=axis_name))
    return surrogate + beta * kl_term, aux


def sequence_log_ratio(logp_BT: jax.Array, old_logp_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """``[B, T]``: every token of sequence ``i`` given GSPO's length-normalised sequence
    log-ratio (Zheng et al., 2025, eq. 7), ``log s_i = 1/|o_i| sum_t log(pi / pi_old)``, added
    to ``old_logp_BT``: a clipped surrogate on the result uses the sequence ratio ``s_i`` for
    all of ``i``'s tokens, and its gradient is ``s_i`` times the mean of the tokens' score
    functions."""
    mask_BT = mask_BT.astype(logp_BT.dtype)
    old_logp_BT = lax.stop_gradient(old_logp_BT)
    log_ratio_B = jnp.sum((logp_BT - old_logp_BT) * mask_BT, axis=1) / jnp.maximum(jnp.sum(mask_BT, axis=1), 1.0)
    return old_logp_BT + log_ratio_B[:, None]


class ValueAux(NamedTuple):
    """Diagnostics of the clipped value loss, scalars over the valid tokens."""
    clip_fraction: jax.Array  # fraction of valid tokens where the clipped error is the larger
    value_mean: jax.Array  # mean predicted value over valid tokens


def ppo_value_loss(
    values_BT: jax.Array,
    old_values_BT: jax.Array,
    returns_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    clip_eps: float | None = 0.2,
    aggregation: Aggregation = "token_mean",
    normalizer: float = 1.0,
    axis_name: str | None = None,
) -> tuple[jax.Array, ValueAux]:
    """Clipped value loss of PPO as in OpenAI baselines / InstructGPT's PPO:

        V_clip = V_old + clip(V - V_old, -eps, eps)
        l      = 1/2 * max( (V - R)^2, (V_clip - R)^2 )

    ``clip_eps=None`` gives the unclipped ``1/2 (V - R)^2``.
    """
    _check_token_arrays(
        [("values_BT", values_BT), ("old_values_BT", old_values_BT), ("returns_BT", returns_BT)], mask_BT
    )
    old_values_BT = lax.stop_gradient(old_values_BT)
    returns_BT = lax.stop_gradient(returns_BT)
    error_BT = jnp.square(values_BT - returns_BT)
    if clip_eps is None:
        loss_BT, clipped_active_BT = 0.5 * error_BT, jnp.zeros_like(error_BT)
    else:
        clipped_values_BT = old_values_BT + jnp.clip(values_BT - old_values_BT, -clip_eps, clip_eps)
        clipped_error_BT = jnp.square(clipped_values_BT - returns_BT)
        loss_BT = 0.5 * jnp.maximum(error_BT, clipped_error_BT)
        clipped_active_BT = (clipped_error_BT > error_BT).astype(error_BT.dtype)
    loss = aggregate(loss_BT, mask_BT, aggregation, normalizer=normalizer, axis_name=axis_name)
    aux = ValueAux(
        clip_fraction=masked_mean(clipped_active_BT, mask_BT, axis_name=axis_name),
        value_mean=masked_mean(lax.stop_gradient(values_BT), mask_BT, axis_name=axis_name),
    )
    return loss, aux


class EntropyAux(NamedTuple):
    """The policy's mean token entropy (nats), a scalar."""
    entropy: jax.Array  # mean per-token entropy over valid tokens (nats)


def entropy_bonus(
    logits_BTV: jax.Array,
    mask_BT: jax.Array,
    *,
    aggregation: Aggregation = "token_mean",
    normalizer: float = 1.0,
    axis_name: str | None = None,
) -> tuple[jax.Array, EntropyAux]:
    """``-H(pi(.|s_t))`` aggregated over valid tokens: *adding* ``c * loss`` to the total
    loss rewards entropy with coefficient ``c`` (Schulman et al., 2017, eq. 9)."""
    entropy_BT = categorical_entropy(logits_BTV)
    check_mask_like(mask_BT, entropy_BT, "mask_BT", "logits_BTV[..., 0]")
    loss = -aggregate(entropy_BT, mask_BT, aggregation, normalizer=normalizer, axis_name=axis_name)
    return loss, EntropyAux(entropy=masked_mean(lax.stop_gradient(entropy_BT), mask_BT, axis_name=axis_name))


class ReinforceAux(NamedTuple):
    """REINFORCE diagnostics (Williams, 1992), scalars."""
    advantage_mean: jax.Array  # mean of (reward - baseline) over the batch


def reinforce_loss(
    logp_BT: jax.Array,
    rewards_B: jax.Array,
    mask_BT: jax.Array,
    *,
    baseline_B: jax.Array | None = None,
    aggregation: Aggregation = "seq_sum",
    normalizer: float = 1.0,
    axis_name: str | None = None,
) -> tuple[jax.Array, ReinforceAux]:
    """REINFORCE with a baseline (Williams, 1992), the whole completion as one action:

        l = -(R(x, y) - b(x)) * sum_t log pi(y_t | x, y_<t)

    averaged over sequences (``aggregation="seq_sum"``, ``normalizer=1``). With ``b`` the
    leave-one-out mean of the other samples (``rlhf_jax.advantages.rloo_advantages``) this
    is RLOO (Ahmadian et al., 2024); pass those advantages as ``rewards_B`` and no baseline.
    """
    _check_token_arrays([("logp_BT", logp_BT)], mask_BT)
    check_rank(rewards_B, 1, "rewards_B")
    if rewards_B.shape[0] != logp_BT.shape[0]:
        raise ValueError(f"rewards_B has {rewards_B.shape[0]} rows but logp_BT has {logp_BT.shape[0]}")
    advantage_B = rewards_B
    if baseline_B is not None:
        check_same_shape([("rewards_B", rewards_B), ("baseline_B", baseline_B)])
        advantage_B = rewards_B - baseline_B
    advantage_B = lax.stop_gradient(advantage_B).astype(logp_BT.dtype)
    loss = aggregate(-advantage_B[:, None] * logp_BT, mask_BT, aggregation, normalizer=normalizer, axis_name=axis_name)
    count = psum_over(jnp.asarray(advantage_B.shape[0], advantage_B.dtype), axis_name)
    return loss, ReinforceAux(advantage_mean=psum_over(jnp.sum(advantage_B), axis_name) / count)


class GRPOAux(NamedTuple):
    """GRPO diagnostics (Shao et al., 2024): the surrogate's, the KL penalty's, and the surrogate
    loss alone."""
    policy: PolicyAux  # diagnostics of the clipped surrogate
    kl: jax.Array  # mean k3 KL(pi || pi_ref) over valid tokens
    policy_loss: jax.Array  # the clipped-surrogate part of the loss


def grpo_loss(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    ref_logp_BT: jax.Array,
    advantages_B: jax.Array,
    mask_BT: jax.Array,
    *,
    beta: float = 0.04,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    importance_weights_BT: jax.Array | None = None,
    aggregation: Aggregation = "seq_mean_token_mean",
    normalizer: float = 1.0,
    importance_ratio: Literal["token", "sequence"] = "token",
    surrogate: Literal["clip", "cispo"] = "clip",
    axis_name: str | None = None,
) -> tuple[jax.Array, GRPOAux]:
    """GRPO objective (Shao et al., 2024, eq. 3), as a loss to minimise:

        l_t = -min( rho_t A, clip(rho_t, 1-eps, 1+eps) A ) + beta * k3_t(pi || pi_ref)
        L   = 1/G sum_i 1/|o_i| sum_t l_{i,t}      (aggregation="seq_mean_token_mean")

    ``advantages_B`` is one advantage per completion (``group_relative_advantages``,
    flattened), shared by its tokens. ``aggregation="token_mean"`` gives DAPO's token-level
    loss, ``"seq_sum"`` with ``normalizer`` = max completion length gives Dr. GRPO's, and
    ``"seq_sum"`` with ``normalizer=1`` at ratio 1 is REINFORCE / RLOO on the summed sequence
    log-prob (Ahmadian et al., 2024). ``importance_weights_BT`` as in :func:`ppo_policy_loss`.

    The GRPO family as options of this one path:
    - DAPO (Yu et al., 2025): ``clip_eps_high > clip_eps`` (clip-higher, eq. 10) and
      ``aggregation="token_mean"`` (the token-level loss, eq. 12);
    - Dr. GRPO (Liu et al., 2025): advantages without the std (``group_relative_advantages(...,
      scale_by_std=False)``) and ``aggregation="seq_sum"`` with ``normalizer`` = the maximum
      completion length;
    - GSPO (Zheng et al., 2025, eq. 5): ``importance_ratio="sequence"``, one length-normalised
      ratio per sequence (:func:`sequence_log_ratio`), clipped per sequence;
    - CISPO (MiniMax, 2025, eq. 4): ``surrogate="cispo"`` (:func:`cispo_policy_loss`).
    Raises ``ValueError`` for mismatched shapes or an unknown ``importance_ratio`` / ``surrogate``.
    """
    _check_token_arrays([("logp_BT", logp_BT), ("ref_logp_BT", ref_logp_BT)], mask_BT)
    check_rank(advantages_B, 1, "advantages_B")
    if advantages_B.shape[0] != logp_BT.shape[0]:
        raise ValueError(f"advantages_B has {advantages_B.shape[0]} rows but logp_BT has {logp_BT.shape[0]}")
    check_choice(importance_ratio, ("token", "sequence"), "importance_ratio")
    check_choice(surrogate, ("clip", "cispo"), "surrogate")
    advantages_BT = jnp.broadcast_to(advantages_B[:, None], logp_BT.shape).astype(logp_BT.dtype)
    surrogate_logp_BT = logp_BT if importance_ratio == "token" else sequence_log_ratio(logp_BT, old_logp_BT, mask_BT)
    policy_loss, policy_aux = (ppo_policy_loss if surrogate == "clip" else cispo_policy_loss)(
        surrogate_logp_BT,
        old_logp_BT,
        advantages_BT,
        mask_BT,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        importance_weights_BT=importance_weights_BT,
        aggregation=aggregation,
        normalizer=normalizer,
        axis_name=axis_name,
    )
    kl_BT = kl_penalty(logp_BT, lax.stop_gradient(ref_logp_BT), "k3")
    kl_loss = aggregate(kl_BT, mask_BT, aggregation, normalizer=normalizer, axis_name=axis_name)
    aux = GRPOAux(
        policy=policy_aux,
        kl=masked_mean(lax.stop_gradient(kl_BT), mask_BT, axis_name=axis_name),
        policy_loss=policy_loss,
    )
    return policy_loss + beta * kl_loss, aux

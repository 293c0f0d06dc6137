"""KL estimators, KL-shaped rewards and KL coefficient controllers.

Per-token estimators of ``KL(pi || pi_ref)`` from samples ``y ~ pi``, with the log-ratio
``log r = log pi_ref(y) - log pi(y)`` (Schulman, "Approximating KL divergence", 2020):

- ``k1 = -log r = log pi - log pi_ref``         unbiased, high variance, can be negative;
- ``k2 = (log r)^2 / 2``                        biased, low variance, always >= 0;
- ``k3 = (r - 1) - log r``                      unbiased, low variance, always >= 0
  (the GRPO KL term, Shao et al., 2024);
- ``abs = |log pi - log pi_ref|``.

The controllers adapt the KL coefficient ``beta`` (Ziegler et al., 2019, "Fine-Tuning
Language Models from Human Preferences", eq. 2):

    e_t = clip((KL_t - KL_target) / KL_target, -0.2, 0.2)
    beta_{t+1} = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

They are ``(init, update)`` pairs over a small pytree, like optax transformations, so the
state lives in the train state and the update runs under ``jit``.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax._checks import check_choice, check_floating, check_mask_like, check_rank, check_same_shape

KLKind = Literal["k1", "k2", "k3", "abs"]
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3", "abs")


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kind: KLKind = "k1") -> jax.Array:
    """Elementwise KL estimate from the sampled tokens' log-probs (module docstring).

    Args:
      logp: log-probs under the sampling policy ``pi``, any shape.
      ref_logp: log-probs of the same tokens under the reference ``pi_ref``, same shape.
      kind: ``k1``, ``k2``, ``k3`` or ``abs``.
    """
    check_choice(kind, KL_KINDS, "KL kind")
    check_same_shape([("logp", logp), ("ref_logp", ref_logp)])
    check_floating(logp, "logp")
    check_floating(ref_logp, "ref_logp")
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    if kind == "k3":
        return jnp.expm1(log_ratio) - log_ratio
    return jnp.abs(log_ratio)


def last_valid_index(mask_BT: jax.Array) -> jax.Array:
    """Index of the last 1 in each row of ``mask_BT``; -1 for an all-zero row."""
    t_T = jnp.arange(mask_BT.shape[1])
    return jnp.max(jnp.where(mask_BT.astype(bool), t_T, -1), axis=1)


class ShapedRewardAux(NamedTuple):
    """The KL terms of the shaped reward (Ziegler et al., 2019): per token ``[B, T]`` and per
    sequence ``[B]``, in nats."""
    kl_BT: jax.Array  # per-token KL estimate, 0 at masked positions
    kl_B: jax.Array  # per-sequence KL (sum over valid tokens)
    non_score_reward_B: jax.Array  # -beta * kl_B


def kl_shaped_rewards(
    scores_B: jax.Array,
    logp_BT: jax.Array,
    ref_logp_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    beta: float | jax.Array,
    kind: KLKind = "k1",
    step_rewards_BT: jax.Array | None = None,
) -> tuple[jax.Array, ShapedRewardAux]:
    """Per-token PPO rewards of InstructGPT (Ouyang et al., 2022, eq. 2):

        R[b, t] = -beta * KL[b, t] + [t = last valid token of b] * score[b] + s[b, t]

    The reward-model score is placed on the last valid (mask = 1) token of each row, never
    on padding. ``step_rewards_BT`` ``s`` (process supervision: a process reward model's
    score of each step at the step's last token, 0 elsewhere; Lightman et al., 2023; Wang et
    al., 2024, "Math-Shepherd", eq. 5) is added where the mask is 1, so GAE (``advantages.gae``)
    credits each token with the steps after it. Pass ``scores_B = 0`` for step rewards alone.
    Masked positions get reward 0. A row with no valid token carries no reward (it has no
    token to train on).

    Returns ``(rewards_BT, aux)``. Raises ``ValueError`` for mismatched shapes.
    """
    check_rank(scores_B, 1, "scores_B")
    check_rank(logp_BT, 2, "logp_BT")
    check_same_shape([("logp_BT", logp_BT), ("ref_logp_BT", ref_logp_BT)])
    check_mask_like(mask_BT, logp_BT, "mask_BT", "logp_BT")
    if scores_B.shape[0] != logp_BT.shape[0]:
        raise ValueError(
            f"scores_B has {scores_B.shape[0]} rows but logp_BT has {logp_BT.shape[0]}"
        )
    kl_BT = jnp.where(mask_BT, kl_penalty(logp_BT, ref_logp_BT, kind), 0.0)
    last_B = last_valid_index(mask_BT)
    is_last_BT = jnp.arange(logp_BT.shape[1])[None, :] == last_B[:, None]
    rewards_BT = -beta * kl_BT + jnp.where(is_last_BT, scores_B[:, None], 0.0)
    if step_rewards_BT is not None:
        check_same_shape([("logp_BT", logp_BT), ("step_rewards_BT", step_rewards_BT)])
        rewards_BT = rewards_BT + jnp.where(mask_BT, step_rewards_BT, 0.0)
    kl_B = jnp.sum(kl_BT, axis=1)
    return rewards_BT, ShapedRewardAux(kl_BT=kl_BT, kl_B=kl_B, non_score_reward_B=-beta * kl_B)


class KLControllerState(NamedTuple):
    """The KL coefficient ``beta`` a controller carries between updates (a float32 scalar)."""
    beta: jax.Array  # the current KL coefficient, a float32 scalar


class KLController(NamedTuple):
    """``init() -> state``; ``update(state, observed_kl, n_steps) -> state``."""

    init: Callable[[], KLControllerState]
    update: Callable[[KLControllerState, jax.Array, int | jax.Array], KLControllerState]


def _starting_at(beta: float) -> Callable[[], KLControllerState]:
    """A controller's ``init``: the coefficient ``beta`` as a float32 scalar."""
    return lambda: KLControllerState(beta=jnp.asarray(beta, jnp.float32))


def _check_adaptive(init_beta: float, target: float) -> None:
    if init_beta <= 0:
        raise ValueError(f"init_beta must be > 0, got {init_beta}")
    if target <= 0:
        raise ValueError(f"target must be > 0 (the desired KL in nats), got {target}")


def fixed_kl_controller(beta: float) -> KLController:
    """A constant KL coefficient; ``update`` returns the state unchanged."""
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")

    def update(state, observed_kl, n_steps):
        del observed_kl, n_steps
        return state

    return KLController(_starting_at(beta), update)


def adaptive_kl_controller(init_beta: float, target: float, horizon: float) -> KLController:
    """Ziegler et al. (2019) proportional controller driving the observed KL to ``target``.

    ``update(state, observed_kl, n_steps)`` applies eq. 2 of the paper with
    ``K_beta = n_steps / horizon`` (``n_steps`` = samples in the batch that produced
    ``observed_kl``; the paper's ``K_beta = 0.1`` is ``n_steps / horizon = 0.1``).
    """
    _check_adaptive(init_beta, target)
    if horizon <= 0:
        raise ValueError(f"horizon must be > 0, got {horizon}")

    def update(state, observed_kl, n_steps):
        error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
        multiplier = 1.0 + error * n_steps / horizon
        return KLControllerState(beta=(state.beta * multiplier).astype(jnp.float32))

    return KLController(_starting_at(init_beta), update)


def ppo_penalty_kl_controller(init_beta: float, target: float) -> KLController:
    """The adaptive coefficient of PPO's KL-penalty form (Schulman et al., 2017, sec. 4): after
    each update, with ``d`` the observed KL(pi_old || pi) and ``d_targ = target`` (nats),

        d < d_targ / 1.5  ->  beta / 2,      d > 1.5 d_targ  ->  beta x 2,      else unchanged.

    ``update(state, observed_kl, n_steps)`` (``n_steps`` unused: the rule is per update).
    Raises ``ValueError`` unless ``init_beta`` and ``target`` are > 0."""
    _check_adaptive(init_beta, target)

    def update(state, observed_kl, n_steps):
        del n_steps
        beta = jnp.where(observed_kl < target / 1.5, state.beta / 2,
                         jnp.where(observed_kl > target * 1.5, state.beta * 2, state.beta))
        return KLControllerState(beta=beta.astype(jnp.float32))

    return KLController(_starting_at(init_beta), update)

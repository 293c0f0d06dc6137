"""Direct preference optimisation and its family: DPO (+ cDPO, SLiC hinge, IPO, robust),
SimPO, ORPO and KTO.

All take *sequence* log-probabilities (the sum of the completion's token log-probs under
the model, computed by the training step) and return ``(loss, aux)``. They share the
implicit-reward helpers below; a variant is a different function of the same margin.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax._checks import check_binary, check_choice, check_floating, check_rank, check_same_shape
from rlhf_jax.masked import REDUCTIONS, Reduction, batch_mean, masked_mean, psum_over, reduce_examples, safe_div

DPOLossType = Literal["sigmoid", "hinge", "ipo", "robust"]
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo", "robust")


class PreferenceAux(NamedTuple):
    """Implicit-reward diagnostics of a pairwise preference loss (Rafailov et al., 2023): scalars
    over the pairs, or per pair ``[B]`` with ``reduction="none"``."""
    chosen_reward: jax.Array  # mean implicit reward of the chosen responses
    rejected_reward: jax.Array  # mean implicit reward of the rejected responses
    reward_accuracy: jax.Array  # fraction of pairs with chosen reward > rejected reward
    reward_margin: jax.Array  # mean chosen - rejected reward


def _check_pair_vectors(named: list[tuple[str, jax.Array]]) -> None:
    check_rank(named[0][1], 1, named[0][0])
    check_same_shape(named)
    for name, x in named:
        check_floating(x, name)


def _pair_aux(chosen_B: jax.Array, rejected_B: jax.Array, axis_name: str | None,
              reduction: Reduction = "mean") -> PreferenceAux:
    margin_B = chosen_B - rejected_B
    return PreferenceAux(*(reduce_examples(x_B, reduction, axis_name=axis_name) for x_B in (
        chosen_B, rejected_B, (margin_B > 0).astype(margin_B.dtype), margin_B)))


def _smoothed_logistic_loss(logits_B: jax.Array, label_smoothing: float) -> jax.Array:
    """``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``: BCE against a soft label."""
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits_B) - label_smoothing * jax.nn.log_sigmoid(
        -logits_B
    )


def dpo_loss(
    policy_chosen_logps_B: jax.Array,
    policy_rejected_logps_B: jax.Array,
    ref_chosen_logps_B: jax.Array,
    ref_rejected_logps_B: jax.Array,
    *,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    axis_name: str | None = None,
    reduction: Reduction = "mean",
) -> tuple[jax.Array, PreferenceAux]:
    """DPO (Rafailov et al., 2023) and the variants that reuse its log-ratio margin

        h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

    ``loss_type``:

    - ``sigmoid``: ``-log sigmoid(beta h)``, DPO eq. 7. With ``label_smoothing = eps > 0``
      this is conservative DPO (Mitchell, 2023): the preference label is taken to be
      flipped with probability ``eps``, ``-(1-eps) log s(beta h) - eps log s(-beta h)``.
    - ``hinge``: ``max(0, 1 - beta h)``, the SLiC calibration loss (Zhao et al., 2023)
      on the reference-normalised margin, with ``1/beta`` playing the role of SLiC's delta.
    - ``ipo``: ``(h - 1/(2 beta))^2``, IPO (Azar et al., 2023, eq. 17). As in the paper,
      ``h`` uses *summed* sequence log-probs; TRL averages them over tokens instead -- to
      get TRL's behaviour pass per-token-mean log-probs (sum / completion length).
    - ``robust``: robust DPO for noisy labels (Chowdhury et al., 2024, eq. 9), unbiased for
      a flip rate ``eps = label_smoothing < 1/2``:
      ``[(1-eps) l(beta h) - eps l(-beta h)] / (1 - 2 eps)`` with ``l(z) = -log s(z)``.

    The implicit rewards in ``aux`` are ``beta * (log pi - log pi_ref)`` of each response.
    With ``pi = pi_ref`` the sigmoid loss is ``log 2``. Inputs ``[B]`` in nats; the loss and
    ``aux`` are means over the pairs, or per pair ``[B]`` with ``reduction="none"``
    (``masked.reduce_examples``). Raises ``ValueError`` for mismatched shapes, an unknown
    ``loss_type`` or ``reduction``, or a ``label_smoothing`` out of range.
    """
    _check_pair_vectors(
        [
            ("policy_chosen_logps_B", policy_chosen_logps_B),
            ("policy_rejected_logps_B", policy_rejected_logps_B),
            ("ref_chosen_logps_B", ref_chosen_logps_B),
            ("ref_rejected_logps_B", ref_rejected_logps_B),
        ]
    )
    check_choice(loss_type, DPO_LOSS_TYPES, "loss_type")
    if loss_type in ("hinge", "ipo") and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing must be 0 for loss_type={loss_type!r}, got {label_smoothing}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratio_B = policy_chosen_logps_B - ref_chosen_logps_B
    rejected_logratio_B = policy_rejected_logps_B - ref_rejected_logps_B
    h_B = chosen_logratio_B - rejected_logratio_B
    if loss_type == "sigmoid":
        loss_B = _smoothed_logistic_loss(beta * h_B, label_smoothing)
    elif loss_type == "hinge":
        loss_B = jax.nn.relu(1.0 - beta * h_B)
    elif loss_type == "ipo":
        loss_B = jnp.square(h_B - 1.0 / (2.0 * beta))
    else:
        eps = label_smoothing
        loss_B = (
            (1.0 - eps) * -jax.nn.log_sigmoid(beta * h_B) - eps * -jax.nn.log_sigmoid(-beta * h_B)
        ) / (1.0 - 2.0 * eps)
    aux = _pair_aux(
        lax.stop_gradient(beta * chosen_logratio_B),
        lax.stop_gradient(beta * rejected_logratio_B),
        axis_name,
        reduction,
    )
    return reduce_examples(loss_B, reduction, axis_name=axis_name), aux


def _mean_logps(logps_B: jax.Array, lengths_B: jax.Array, name: str) -> jax.Array:
    check_same_shape([(name.replace("lengths", "logps"), logps_B), (name, lengths_B)])
    if not isinstance(lengths_B, jax.core.Tracer) and bool(jnp.any(jnp.asarray(lengths_B) <= 0)):
        raise ValueError(f"{name} must be > 0 (a completion has at least one token)")
    return logps_B / lengths_B.astype(logps_B.dtype)


def simpo_loss(
    policy_chosen_logps_B: jax.Array,
    policy_rejected_logps_B: jax.Array,
    chosen_lengths_B: jax.Array,
    rejected_lengths_B: jax.Array,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    axis_name: str | None = None,
    reduction: Reduction = "mean",
) -> tuple[jax.Array, PreferenceAux]:
    """SimPO (Meng et al., 2024, eq. 6): reference-free, length-normalised, with a margin

        L = -log sigmoid( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma )

    ``gamma`` is the paper's target reward margin itself. TRL parameterises it as
    ``simpo_gamma``/``gamma_beta_ratio`` = ``gamma / beta``: pass ``gamma = beta * ratio``.
    ``label_smoothing`` smooths the label as in conservative DPO. Implicit rewards in
    ``aux`` are ``beta/|y| log pi(y|x)``. ``reduction`` as in :func:`dpo_loss`.
    """
    _check_pair_vectors(
        [("policy_chosen_logps_B", policy_chosen_logps_B), ("policy_rejected_logps_B", policy_rejected_logps_B)]
    )
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_B = beta * _mean_logps(policy_chosen_logps_B, chosen_lengths_B, "chosen_lengths_B")
    rejected_B = beta * _mean_logps(policy_rejected_logps_B, rejected_lengths_B, "rejected_lengths_B")
    loss_B = _smoothed_logistic_loss(chosen_B - rejected_B - gamma, label_smoothing)
    aux = _pair_aux(lax.stop_gradient(chosen_B), lax.stop_gradient(rejected_B), axis_name, reduction)
    return reduce_examples(loss_B, reduction, axis_name=axis_name), aux


class ORPOAux(NamedTuple):
    """ORPO's two terms and the log odds ratio (Hong et al., 2024), scalars over the pairs."""
    nll: jax.Array  # L_SFT: token-mean NLL of the chosen responses
    odds_ratio_loss: jax.Array  # L_OR before weighting by lambda
    log_odds_ratio: jax.Array  # mean log[odds(y_w) / odds(y_l)]
    reward_accuracy: jax.Array  # fraction of pairs with log odds ratio > 0


def _log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2`` (Maechler, 2012)."""
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(
    policy_chosen_logps_B: jax.Array,
    policy_rejected_logps_B: jax.Array,
    chosen_lengths_B: jax.Array,
    rejected_lengths_B: jax.Array,
    *,
    lam: float = 0.1,
    axis_name: str | None = None,
    reduction: Reduction = "mean",
) -> tuple[jax.Array, ORPOAux]:
    """ORPO (Hong et al., 2024, eqs. 6-7): SFT plus an odds-ratio preference term

        L = L_SFT + lam * L_OR,   L_OR = -log sigmoid( log odds(y_w|x) - log odds(y_l|x) )
        odds(y|x) = P(y|x) / (1 - P(y|x)),   log P(y|x) = (1/|y|) sum_t log pi(y_t|x, y_<t)

    ``L_SFT`` is the token-mean NLL of the chosen responses over the global batch. Sequence
    log-probs ``[B]`` (nats) and lengths ``[B]`` (tokens). With ``reduction="none"`` the loss
    and ``aux`` are per pair ``[B]``, ``L_SFT`` then each chosen response's own token mean
    (their mean weighs every pair alike; the batch token mean weighs long responses more).
    Raises ``ValueError`` for mismatched shapes, a length below 1 or an unknown ``reduction``.
    """
    _check_pair_vectors(
        [("policy_chosen_logps_B", policy_chosen_logps_B), ("policy_rejected_logps_B", policy_rejected_logps_B)]
    )
    chosen_mean_B = _mean_logps(policy_chosen_logps_B, chosen_lengths_B, "chosen_lengths_B")
    rejected_mean_B = _mean_logps(policy_rejected_logps_B, rejected_lengths_B, "rejected_lengths_B")
    log_odds_B = (chosen_mean_B - _log1mexp(chosen_mean_B)) - (rejected_mean_B - _log1mexp(rejected_mean_B))
    check_choice(reduction, REDUCTIONS, "reduction")
    if reduction == "none":
        odds_ratio_loss_B = -jax.nn.log_sigmoid(log_odds_B)
        aux = ORPOAux(-chosen_mean_B, odds_ratio_loss_B, lax.stop_gradient(log_odds_B),
                      (log_odds_B > 0).astype(log_odds_B.dtype))
        return -chosen_mean_B + lam * odds_ratio_loss_B, aux
    odds_ratio_loss = batch_mean(-jax.nn.log_sigmoid(log_odds_B), axis_name=axis_name)
    lengths_B = chosen_lengths_B.astype(policy_chosen_logps_B.dtype)
    nll = -safe_div(
        psum_over(jnp.sum(policy_chosen_logps_B), axis_name), psum_over(jnp.sum(lengths_B), axis_name)
    )
    aux = ORPOAux(
        nll=nll,
        odds_ratio_loss=odds_ratio_loss,
        log_odds_ratio=batch_mean(lax.stop_gradient(log_odds_B), axis_name=axis_name),
        reward_accuracy=batch_mean((log_odds_B > 0).astype(log_odds_B.dtype), axis_name=axis_name),
    )
    return nll + lam * odds_ratio_loss, aux


class KTOAux(NamedTuple):
    """KTO diagnostics (Ethayarajh et al., 2024): mean implicit rewards and the reference point
    z_0."""
    desirable_reward: jax.Array  # mean implicit reward of the desirable examples
    undesirable_reward: jax.Array  # mean implicit reward of the undesirable examples
    reference_point: jax.Array  # z_0, the (detached) KL reference point


def kto_reference_point(
    policy_logps_B: jax.Array, ref_logps_B: jax.Array, *, axis_name: str | None = None
) -> jax.Array:
    """KTO's reference point ``z_0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))``.

    Estimated, as in Ethayarajh et al. (2024, sec. 4.1), on *mismatched* pairs ``(x, y')``
    (each prompt with another example's completion); no gradient flows through it.
    """
    _check_pair_vectors([("policy_logps_B", policy_logps_B), ("ref_logps_B", ref_logps_B)])
    kl = batch_mean(policy_logps_B - ref_logps_B, axis_name=axis_name)
    return lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto_loss(
    policy_logps_B: jax.Array,
    ref_logps_B: jax.Array,
    desirable_B: jax.Array,
    reference_point: jax.Array | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    axis_name: str | None = None,
    reduction: Reduction = "mean",
) -> tuple[jax.Array, KTOAux]:
    """KTO for unpaired binary feedback (Ethayarajh et al., 2024, eq. 8):

        r = log pi(y|x) - log pi_ref(y|x)
        v = lam_D sigmoid(beta (r - z_0))   if y is desirable
            lam_U sigmoid(beta (z_0 - r))   if y is undesirable
        L = E[ lam_y - v ]

    ``desirable_B`` is the 0/1 (or bool) label; ``reference_point`` is ``z_0`` from
    ``kto_reference_point``. The paper advises ``lam_D n_D / (lam_U n_U)`` in [1, 4/3].
    Sequence log-probs ``[B]`` (nats). With ``reduction="none"`` the loss is per example
    ``[B]`` and so is ``aux``: each reward field holds the example's implicit reward where its
    label matches and 0 elsewhere (their sums over the examples of a label, divided by that
    label's count, are the means). Raises ``ValueError`` for mismatched shapes, a label that is
    not 0/1, or an unknown ``reduction``.
    """
    _check_pair_vectors([("policy_logps_B", policy_logps_B), ("ref_logps_B", ref_logps_B)])
    check_same_shape([("policy_logps_B", policy_logps_B), ("desirable_B", desirable_B)])
    check_binary(desirable_B, "desirable_B")
    desirable_B = desirable_B.astype(bool)
    logratio_B = policy_logps_B - ref_logps_B
    loss_B = jnp.where(
        desirable_B,
        desirable_weight * (1.0 - jax.nn.sigmoid(beta * (logratio_B - reference_point))),
        undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (reference_point - logratio_B))),
    )
    rewards_B = lax.stop_gradient(beta * logratio_B)
    check_choice(reduction, REDUCTIONS, "reduction")
    if reduction == "none":
        point_B = jnp.broadcast_to(jnp.asarray(reference_point, policy_logps_B.dtype), loss_B.shape)
        return loss_B, KTOAux(jnp.where(desirable_B, rewards_B, 0.0), jnp.where(desirable_B, 0.0, rewards_B), point_B)
    aux = KTOAux(
        desirable_reward=masked_mean(rewards_B, desirable_B, axis_name=axis_name),
        undesirable_reward=masked_mean(rewards_B, ~desirable_B, axis_name=axis_name),
        reference_point=jnp.asarray(reference_point, policy_logps_B.dtype),
    )
    return batch_mean(loss_B, axis_name=axis_name), aux

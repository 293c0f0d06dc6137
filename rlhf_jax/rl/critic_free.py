"""Critic-free policy gradients on the same rollout path as PPO: GRPO, RLOO and REINFORCE
with a baseline. Each completion is one action with one advantage, shared by its tokens.

=============  ===========================================  ==============================
estimator      advantage of completion i of prompt b        KL to the reference
=============  ===========================================  ==============================
``grpo``       (r_bi - mean_j r_bj) / (std_j r_bj + eps)     k3 term in the loss, weight beta
               (Shao et al., 2024)
``rloo``       r_bi - mean_{j != i} r_bj                     in the reward: r = score - beta KL
               (Ahmadian et al., 2024)
``reinforce``  r_bi - mean over the whole batch              in the reward: r = score - beta KL
               (Williams, 1992, with a baseline)
=============  ===========================================  ==============================

Each row is an :class:`AdvantageEstimator` of :data:`ESTIMATORS`; :func:`register_estimator`
adds another (a plugin's critic-free algorithm names it).

``kl_in_loss`` moves the KL to the other place (True: the k3 loss term, False: the reward);
its default ``None`` is the table's. ``aggregation`` reduces the per-token losses
(``masked.aggregate``); its default ``None`` is each paper's: GRPO the per-sequence mean of
token means (Shao et al., 2024), RLOO and REINFORCE the summed sequence log-prob
(``seq_sum``, Ahmadian et al., 2024); Dr. GRPO is ``seq_sum`` with ``normalizer`` = the
maximum completion length (Liu et al., 2025).

Log-probs are those of the sampling distribution (``rl.behaviour``), as in ``rl.ppo``;
``tis_cap`` corrects for the sampler's numbers differing from the trainer's.

The update is ``epochs`` x ``minibatches`` of the clipped surrogate (``losses.grpo_loss``;
with one epoch and one minibatch the ratio is 1 and the gradient is exactly REINFORCE's), one
``lax.scan`` in one jitted call. With one epoch of one minibatch and the KL in the loss, the
rollout policy's log-probs are the update's own forward at unchanged parameters, so the
experience leaves them out (``old_logp_BT = None``; as TRL's GRPO with ``num_iterations=1``):
one forward pass fewer per iteration, and the KL statistic comes from the update."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import advantages, kl, losses
from rlhf_jax.masked import Aggregation, aggregation_weight
from rlhf_jax.rl.behaviour import logprob_gap, policy_logprobs, truncated_importance_weights
from rlhf_jax.rl.minibatches import micro_batch_gradients, scan_minibatches
from rlhf_jax.rollout.sampling import SamplingConfig
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.step import apply_gradients

@dataclasses.dataclass(frozen=True)
class AdvantageEstimator:
    """One row of the module table: ``advantages(rewards_BG, config) -> (advantages_BG,
    metrics)`` over the ``G`` samples of each of ``B`` prompts, where the KL goes by default
    (``kl_in_loss``) and how the loss reduces by default (``aggregation``)."""

    name: str
    advantages: Callable[[jax.Array, CriticFreeConfig], tuple[jax.Array, dict]]
    kl_in_loss: bool
    aggregation: Aggregation


ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_estimator(estimator: AdvantageEstimator) -> AdvantageEstimator:
    """Add ``estimator`` under its name (a critic-free algorithm names it); returns it. Raises
    ``ValueError`` for a name already taken."""
    if estimator.name in ESTIMATORS:
        raise ValueError(f"an advantage estimator named {estimator.name!r} is already registered")
    ESTIMATORS[estimator.name] = estimator
    return estimator


def _group_relative(rewards_BG, config):
    advantages_BG, group = advantages.group_relative_advantages(rewards_BG, scale_by_std=config.scale_advantages)
    return advantages_BG, {"zero_std_groups": group.zero_std_fraction}


for _estimator in (AdvantageEstimator("grpo", _group_relative, True, "seq_mean_token_mean"),
                   AdvantageEstimator("rloo", lambda r_BG, config: (advantages.rloo_advantages(r_BG), {}), False,
                                      "seq_sum"),
                   AdvantageEstimator("reinforce", lambda r_BG, config: (r_BG - jnp.mean(r_BG), {}), False, "seq_sum")):
    register_estimator(_estimator)


@dataclasses.dataclass(frozen=True)
class CriticFreeConfig:
    estimator: str = "grpo"  # a name of ESTIMATORS
    group_size: int = 4  # completions per prompt, sample-major within a prompt (the rollout's order)
    epochs: int = 1
    minibatches: int = 1
    micro_batches: int = 1  # each minibatch's gradient accumulated over this many (exact; for memory)
    clip_eps: float = 0.2
    kl_kind: kl.KLKind = "k1"  # the reward's KL estimator (the loss term is always k3)
    kl_in_loss: bool | None = None  # None: GRPO in the loss, RLOO / REINFORCE in the reward
    sampling: SamplingConfig = SamplingConfig()  # the rollout's: the distribution the tokens were drawn from
    aggregation: Aggregation | None = None  # None: GRPO seq_mean_token_mean, RLOO / REINFORCE seq_sum
    normalizer: float = 1.0  # the constant of aggregation="seq_sum"
    tis_cap: float | None = None  # truncated importance sampling: min(pi_old / pi_sampler, tis_cap) per token
    # the GRPO family (losses.grpo_loss): DAPO's clip-higher, Dr. GRPO's unscaled advantages, GSPO's
    # sequence ratio, CISPO's clipped stop-gradient weights
    clip_eps_high: float | None = None
    scale_advantages: bool = True
    importance_ratio: Literal["token", "sequence"] = "token"
    surrogate: Literal["clip", "cispo"] = "clip"

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator {self.estimator!r} is not one of {', '.join(ESTIMATORS)}")

    @property
    def loss_aggregation(self) -> Aggregation:
        """``aggregation``, or the estimator's default when unset."""
        return ESTIMATORS[self.estimator].aggregation if self.aggregation is None else self.aggregation

    @property
    def kl_term_in_loss(self) -> bool:
        """``kl_in_loss``, or the estimator's default when unset."""
        return ESTIMATORS[self.estimator].kl_in_loss if self.kl_in_loss is None else self.kl_in_loss

    @property
    def update_is_on_policy(self) -> bool:
        """One step on the rollout and nothing else needs its log-probs: the update's forward is theirs."""
        return self.epochs * self.minibatches == 1 and self.kl_term_in_loss


def completion_kl(logp_BT, ref_logp_BT, action_mask_BT, kind: kl.KLKind) -> jax.Array:
    """``kl_B``: each completion's KL estimate to the reference, summed over its tokens."""
    return jnp.sum(kl.kl_penalty(logp_BT, ref_logp_BT, kind) * action_mask_BT, axis=1)


@flax.struct.dataclass
class GroupExperience:
    ids_BT: jax.Array
    mask_BT: jax.Array
    action_mask_BT: jax.Array
    old_logp_BT: jax.Array | None  # None: the update's own forward (module docstring)
    sampler_logp_BT: jax.Array | None  # the sampler's own log-probs of the actions (None: the trainer's)
    ref_logp_BT: jax.Array
    advantages_B: jax.Array
    prompt_width: int = flax.struct.field(pytree_node=False, default=1)  # no action before it (see rl.ppo)


def make_group_experience(policy, reference, ids_BT, mask_BT, action_mask_BT, scores_B, beta,
                          config: CriticFreeConfig, prompt_width: int = 1,
                          sampler_logp_BT=None) -> tuple[GroupExperience, dict]:
    """Log-probs, the per-completion reward and its advantage (module table), for ``jit``;
    ``prompt_width`` and ``sampler_logp_BT`` as in ``rl.make_experience`` (``None``: the
    trainer's own, known after the update's forward when the experience skips it)."""
    action_mask_BT = action_mask_BT.astype(jnp.float32)
    ref_logp_BT = policy_logprobs(reference, ids_BT, mask_BT, config.sampling, start=prompt_width)
    old_logp_BT, metrics = None, {}
    if not config.update_is_on_policy:
        old_logp_BT = policy_logprobs(policy, ids_BT, mask_BT, config.sampling, start=prompt_width)
        kl_B = completion_kl(old_logp_BT, ref_logp_BT, action_mask_BT, config.kl_kind)
        metrics["kl"] = jnp.mean(kl_B)
        metrics["kl_k3"] = jnp.mean(completion_kl(old_logp_BT, ref_logp_BT, action_mask_BT, "k3"))
    if sampler_logp_BT is not None:
        sampler_logp_BT = sampler_logp_BT * action_mask_BT
        if old_logp_BT is not None:
            metrics |= logprob_gap(old_logp_BT, sampler_logp_BT, action_mask_BT)
    rewards_B = scores_B if config.kl_term_in_loss else scores_B - beta * kl_B  # KL in the reward: kl_B exists
    if scores_B.shape[0] % config.group_size:
        raise ValueError(f"{scores_B.shape[0]} completions do not form groups of {config.group_size}")
    rewards_BG = rewards_B.reshape(-1, config.group_size)
    metrics |= {"score_mean": jnp.mean(scores_B), "score_std": jnp.std(scores_B),
                "beta": jnp.asarray(beta, jnp.float32), "reward_mean": jnp.mean(rewards_B)}
    advantages_BG, estimator_metrics = ESTIMATORS[config.estimator].advantages(rewards_BG, config)
    metrics |= estimator_metrics
    experience = GroupExperience(ids_BT, mask_BT, action_mask_BT, old_logp_BT, sampler_logp_BT, ref_logp_BT,
                                 advantages_BG.reshape(-1), prompt_width)
    return experience, metrics


def critic_free_loss(policy, batch: GroupExperience, beta, config: CriticFreeConfig):
    """``(loss, (GRPOAux, old_logp_BT))`` of one minibatch: the clipped surrogate on the
    sampling distribution's log-probs, aggregated by ``config.loss_aggregation``, plus
    ``beta`` x the k3 KL term (pass ``beta = 0`` when the KL is in the reward), each token
    weighed by the truncated trainer/sampler ratio with ``config.tis_cap``. Without the
    batch's ``old_logp_BT`` (one on-policy step) the forward's own values stand in for it."""
    logp_BT = policy_logprobs(policy, batch.ids_BT, batch.mask_BT, config.sampling, start=batch.prompt_width)
    old_logp_BT = jax.lax.stop_gradient(logp_BT) if batch.old_logp_BT is None else batch.old_logp_BT
    weights_BT = None
    if batch.sampler_logp_BT is not None:
        weights_BT = truncated_importance_weights(old_logp_BT, batch.sampler_logp_BT, config.tis_cap)
    value, aux = losses.grpo_loss(logp_BT, old_logp_BT, batch.ref_logp_BT, batch.advantages_B, batch.action_mask_BT,
                                  beta=beta, clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high,
                                  importance_weights_BT=weights_BT, aggregation=config.loss_aggregation,
                                  normalizer=config.normalizer, importance_ratio=config.importance_ratio,
                                  surrogate=config.surrogate)
    return value, (aux, old_logp_BT)


def critic_free_update(policy_state: TrainState, experience: GroupExperience, key: jax.Array, beta,
                       policy_tx: optax.GradientTransformation, config: CriticFreeConfig):
    """``(policy_state, metrics)`` after ``epochs`` x ``minibatches`` clipped-surrogate steps
    (:func:`critic_free_loss`), each minibatch's gradient accumulated exactly over
    ``config.micro_batches`` (``rl.minibatches.micro_batch_gradients``); ``beta`` weighs the k3 KL loss term when the KL is in the loss
    (else it is in the reward). Without the experience's ``old_logp_BT`` (one on-policy step)
    the metrics carry ``kl``, the rollout's KL statistic, and the trainer/sampler
    ``logprob_gap_*`` from the step's own forward."""
    kl_weight = beta if config.kl_term_in_loss else 0.0

    def gradients(state: TrainState, params, batch: GroupExperience):
        (value, (aux, old_logp_BT)), grads = jax.value_and_grad(
            lambda p: critic_free_loss(state.model(p), batch, kl_weight, config), has_aux=True)(params)
        metrics = {"policy_loss": aux.policy_loss, "kl_loss_term": aux.kl, "clip_fraction": aux.policy.clip_fraction,
                   "approx_kl": aux.policy.approx_kl, "ratio_mean": aux.policy.ratio_mean,
                   "ratio_max": aux.policy.ratio_max}
        if experience.old_logp_BT is None:
            metrics["kl"] = jnp.mean(completion_kl(old_logp_BT, batch.ref_logp_BT, batch.action_mask_BT,
                                                   config.kl_kind))
            metrics["kl_k3"] = jnp.mean(completion_kl(old_logp_BT, batch.ref_logp_BT, batch.action_mask_BT, "k3"))
            if batch.sampler_logp_BT is not None:
                metrics |= logprob_gap(old_logp_BT, batch.sampler_logp_BT, batch.action_mask_BT)
        return (grads,), ((value,), (metrics,))

    def one(state: TrainState, batch: GroupExperience):
        (grads,), (value,), metrics = micro_batch_gradients(
            functools.partial(gradients, state), state.params, batch, config.micro_batches,
            lambda micro: (aggregation_weight(micro.action_mask_BT, config.loss_aggregation),))
        state, applied = apply_gradients(state, grads, policy_tx, value)
        return state, metrics | {"policy_grad_norm": optax.tree.norm(grads), "applied": applied}

    return scan_minibatches(one, policy_state, experience, key, epochs=config.epochs, minibatches=config.minibatches)

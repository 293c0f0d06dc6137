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

The config is the algorithm's own section: :class:`CriticFreeConfig` (RLOO's and REINFORCE's)
or :class:`GRPOConfig`, which differ in the default ``loss_aggregation`` (``masked.aggregate``),
each paper's: GRPO the per-sequence mean of token means (Shao et al., 2024), RLOO and
REINFORCE the summed sequence log-prob (``seq_sum``, Ahmadian et al., 2024); Dr. GRPO is
``seq_sum`` with ``loss_normalizer`` = the maximum completion length and unscaled advantages
(Liu et al., 2025). The KL goes where ``UpdateContext.kl_in_loss`` says (True: the k3 loss
term, False: the reward); the online algorithms' records put it where the table does.

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
from rlhf_jax.config import greater_than
from rlhf_jax.masked import Aggregation, aggregation_weight
from rlhf_jax.rl.behaviour import logprob_gap, policy_logprobs, truncated_importance_weights
from rlhf_jax.rl.minibatches import micro_batch_gradients, micro_batch_map, scan_minibatches
from rlhf_jax.rl.update_config import ClippedUpdateConfig, UpdateContext
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.step import apply_gradients

@dataclasses.dataclass(frozen=True)
class AdvantageEstimator:
    """One row of the module table: ``advantages(rewards_BG, config) -> (advantages_BG,
    metrics)`` over the ``G`` samples of each of ``B`` prompts; ``reads``, the options of the
    config it reads (the others act in the loss), so a run can refuse one set for an
    estimator that ignores it."""

    name: str
    advantages: Callable[[jax.Array, CriticFreeConfig], tuple[jax.Array, dict]]
    reads: tuple[str, ...] = ()


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


for _estimator in (AdvantageEstimator("grpo", _group_relative, reads=("scale_advantages",)),
                   AdvantageEstimator("rloo", lambda r_BG, config: (advantages.rloo_advantages(r_BG), {})),
                   AdvantageEstimator("reinforce", lambda r_BG, config: (r_BG - jnp.mean(r_BG), {}))):
    register_estimator(_estimator)


@dataclasses.dataclass(frozen=True)
class CriticFreeConfig(ClippedUpdateConfig):
    """A critic-free algorithm's config, the ``rloo:`` and ``reinforce:`` sections: the clipped
    update's options and the GRPO family's loss variants (``losses.grpo_loss``): DAPO's
    clip-higher bound ``clip_eps_high`` (None: ``clip_eps``), GSPO's sequence-level
    ``importance_ratio``, CISPO's clipped stop-gradient weights (``surrogate: cispo``), and
    GRPO's ``scale_advantages`` (divide by the group's std; false: Dr. GRPO), read by the
    estimators that say so. Raises ``ValueError`` naming a value out of range."""

    loss_aggregation: Aggregation = "seq_sum"
    clip_eps_high: float | None = None
    scale_advantages: bool = True
    importance_ratio: Literal["token", "sequence"] = "token"
    surrogate: Literal["clip", "cispo"] = "clip"

    def __post_init__(self):
        super().__post_init__()
        greater_than(0, clip_eps_high=self.clip_eps_high)


@dataclasses.dataclass(frozen=True)
class GRPOConfig(CriticFreeConfig):
    """GRPO's config, the ``grpo:`` section (Shao et al., 2024): :class:`CriticFreeConfig` with
    the per-sequence token-mean loss; DAPO is ``clip_eps_high`` with ``loss_aggregation:
    token_mean`` (and ``rollout.dynamic_sampling``, ``reward.overlong_buffer``), Dr. GRPO
    ``scale_advantages: false`` with ``seq_sum`` and ``loss_normalizer`` = max_new_tokens, GSPO
    ``importance_ratio: sequence``, CISPO ``surrogate: cispo``."""

    loss_aggregation: Aggregation = "seq_mean_token_mean"


def update_is_on_policy(config: CriticFreeConfig, context: UpdateContext) -> bool:
    """One step on the rollout and nothing else needs its log-probs (the KL in the loss): the
    update's forward is theirs (module docstring)."""
    return config.epochs * config.minibatches == 1 and context.kl_in_loss


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
                          config: CriticFreeConfig, prompt_width: int = 1, sampler_logp_BT=None, *,
                          context: UpdateContext, estimator: str,
                          forward_micro_batches: int = 1) -> tuple[GroupExperience, dict]:
    """Log-probs, the per-completion reward and its advantage by ``estimator`` (a name of
    :data:`ESTIMATORS`; module table) over the groups of ``context.group_size`` consecutive
    completions of ``[B, T]`` (``B`` a multiple of it), for ``jit``: the KL to the reference in
    the reward unless ``context.kl_in_loss``, every log-prob on ``context.sampling``'s
    distribution; ``prompt_width`` and ``sampler_logp_BT`` as in ``rl.make_experience``
    (``None``: the trainer's own, known after the update's forward when the experience skips
    it); ``forward_micro_batches`` as in ``rl.make_experience``. Raises ``ValueError`` for an
    unknown estimator, completions that do not form whole groups, or rows the micro-batches do
    not divide."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator {estimator!r} is not one of {', '.join(ESTIMATORS)}")
    action_mask_BT = action_mask_BT.astype(jnp.float32)
    on_policy = update_is_on_policy(config, context)

    def forwards(ids_BT, mask_BT):
        def logp(model):
            return policy_logprobs(model, ids_BT, mask_BT, context.sampling, start=prompt_width)

        return logp(reference), None if on_policy else logp(policy)

    ref_logp_BT, old_logp_BT = micro_batch_map(forwards, forward_micro_batches, ids_BT, mask_BT)
    metrics = {}
    if old_logp_BT is not None:
        kl_B = completion_kl(old_logp_BT, ref_logp_BT, action_mask_BT, context.kl_kind)
        metrics["kl"] = jnp.mean(kl_B)
        metrics["kl_k3"] = jnp.mean(completion_kl(old_logp_BT, ref_logp_BT, action_mask_BT, "k3"))
    if sampler_logp_BT is not None:
        sampler_logp_BT = sampler_logp_BT * action_mask_BT
        if old_logp_BT is not None:
            metrics |= logprob_gap(old_logp_BT, sampler_logp_BT, action_mask_BT)
    rewards_B = scores_B if context.kl_in_loss else scores_B - beta * kl_B  # KL in the reward: kl_B exists
    if scores_B.shape[0] % context.group_size:
        raise ValueError(f"{scores_B.shape[0]} completions do not form groups of {context.group_size}")
    rewards_BG = rewards_B.reshape(-1, context.group_size)
    metrics |= {"score_mean": jnp.mean(scores_B), "score_std": jnp.std(scores_B),
                "beta": jnp.asarray(beta, jnp.float32), "reward_mean": jnp.mean(rewards_B)}
    advantages_BG, estimator_metrics = ESTIMATORS[estimator].advantages(rewards_BG, config)
    metrics |= estimator_metrics
    experience = GroupExperience(ids_BT, mask_BT, action_mask_BT, old_logp_BT, sampler_logp_BT, ref_logp_BT,
                                 advantages_BG.reshape(-1), prompt_width)
    return experience, metrics


def critic_free_loss(policy, batch: GroupExperience, beta, config: CriticFreeConfig, *,
                     context: UpdateContext = UpdateContext()):
    """``(loss, (GRPOAux, old_logp_BT))`` of one minibatch: the clipped surrogate on the
    log-probs of ``context.sampling``'s distribution (default: temperature 1, no filter), aggregated by ``config.loss_aggregation``, plus
    ``beta`` x the k3 KL term (pass ``beta = 0`` when the KL is in the reward), each token
    weighed by the truncated trainer/sampler ratio with ``config.tis_cap``. Without the
    batch's ``old_logp_BT`` (one on-policy step) the forward's own values stand in for it."""
    logp_BT = policy_logprobs(policy, batch.ids_BT, batch.mask_BT, context.sampling, start=batch.prompt_width)
    old_logp_BT = jax.lax.stop_gradient(logp_BT) if batch.old_logp_BT is None else batch.old_logp_BT
    weights_BT = None
    if batch.sampler_logp_BT is not None:
        weights_BT = truncated_importance_weights(old_logp_BT, batch.sampler_logp_BT, config.tis_cap)
    value, aux = losses.grpo_loss(logp_BT, old_logp_BT, batch.ref_logp_BT, batch.advantages_B, batch.action_mask_BT,
                                  beta=beta, clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high,
                                  importance_weights_BT=weights_BT, aggregation=config.loss_aggregation,
                                  normalizer=config.loss_normalizer, importance_ratio=config.importance_ratio,
                                  surrogate=config.surrogate)
    return value, (aux, old_logp_BT)


def critic_free_update(policy_state: TrainState, experience: GroupExperience, key: jax.Array, beta,
                       policy_tx: optax.GradientTransformation, config: CriticFreeConfig, *,
                       context: UpdateContext):
    """``(policy_state, metrics)`` after ``epochs`` x ``minibatches`` clipped-surrogate steps
    (:func:`critic_free_loss`), each minibatch's gradient accumulated exactly over
    ``config.micro_batches`` (``rl.minibatches.micro_batch_gradients``); ``beta`` weighs the k3
    KL loss term when the KL is in the loss (``context.kl_in_loss``, the experience's too; else
    it is in the reward) and ``context.kl_kind`` estimates the KL statistic. Without the experience's ``old_logp_BT`` (one on-policy step)
    the metrics carry ``kl``, the rollout's KL statistic, and the trainer/sampler
    ``logprob_gap_*`` from the step's own forward."""
    kl_weight = beta if context.kl_in_loss else 0.0

    def gradients(state: TrainState, params, batch: GroupExperience):
        (value, (aux, old_logp_BT)), grads = jax.value_and_grad(
            lambda p: critic_free_loss(state.model(p), batch, kl_weight, config, context=context),
            has_aux=True)(params)
        metrics = {"policy_loss": aux.policy_loss, "kl_loss_term": aux.kl, "clip_fraction": aux.policy.clip_fraction,
                   "approx_kl": aux.policy.approx_kl, "ratio_mean": aux.policy.ratio_mean,
                   "ratio_max": aux.policy.ratio_max}
        if experience.old_logp_BT is None:
            metrics["kl"] = jnp.mean(completion_kl(old_logp_BT, batch.ref_logp_BT, batch.action_mask_BT,
                                                   context.kl_kind))
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

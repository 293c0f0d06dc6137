"""PPO the InstructGPT way (Ouyang et al., 2022; Ziegler et al., 2019): one iteration is

1. a rollout of the policy (prompts left-padded, completions right-padded);
2. ``make_experience``: the policy's and the frozen reference's log-probs of the sampled
   tokens, the critic's values, the reward ``R_t = -beta KL_t + [t = last] score``
   (``kl.kl_shaped_rewards``), and GAE advantages and returns (``advantages.gae``);
3. ``ppo_update``: ``epochs`` x ``minibatches`` of the clipped policy loss + the clipped
   value loss - an entropy bonus, with the policy and the critic each stepping their own
   optimiser -- the whole optimisation is one ``lax.scan`` inside one jitted function.

With ``UpdateContext.kl_in_loss`` the KL leaves the reward (``R_t = [t = last] score``) and enters the
policy loss instead, as GRPO's term ``beta * k3(pi || pi_ref)`` averaged over the actions
(Shao et al., 2024); its gradient is that of the KL to the reference at the current policy,
where the reward penalty reaches the policy only through the advantages.

Log-probs (old, new, reference) are those of the sampling distribution (``rl.behaviour``:
temperature and filters applied), so the first minibatch's ratio is 1 for any sampling
settings and the KL is measured between the policy's and the reference's sampling
distributions. ``tis_cap`` weighs each token by ``min(pi_old / pi_sampler, cap)`` when the
sampler's numbers differ from the trainer's.

Token alignment: every ``*_BT`` array is aligned with ``ids_BT``; position ``t`` holds the
quantity of token ``t`` (its log-prob given ``ids[:t]``, the value of the state it was
sampled from). ``action_mask_BT`` marks the completion tokens, the actions; none lies before
``prompt_width`` (a rollout's left-padded prompt width), so the policy's output head runs on
the completion positions only."""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import advantages, kl, losses
from rlhf_jax.config import at_least, between, greater_than
from rlhf_jax.masked import aggregate, aggregation_weight, masked_var, masked_whiten
from rlhf_jax.models.token_logprobs import next_token_logits
from rlhf_jax.rl.behaviour import logprob_gap, policy_logprobs, tempered_logits, truncated_importance_weights
from rlhf_jax.rl.minibatches import micro_batch_gradients, micro_batch_map, scan_minibatches
from rlhf_jax.rl.update_config import ClippedUpdateConfig, UpdateContext
from rlhf_jax.rollout.sampling import sampled_token_logprobs
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.step import apply_gradients

if TYPE_CHECKING:
    from rlhf_jax.rl.trpo import TRPOConfig


@dataclasses.dataclass(frozen=True)
class PPOConfig(ClippedUpdateConfig):
    """PPO's config, the ``ppo:`` section (Ouyang et al., 2022): the clipped update's options,
    the critic's value clip, the entropy bonus, GAE's ``gamma`` and ``lam``. ``surrogate``:
    ``clip``, the clipped surrogate (Schulman et al., 2017, eq. 7), or ``kl_penalty``, ``-rho A
    + penalty_beta KL(pi_old || pi)`` (eq. 8) with ``penalty_beta`` halved / doubled after each
    update when the KL falls below ``penalty_target`` / 1.5 / rises above 1.5 ``penalty_target``
    (sec. 4; ``kl.ppo_penalty_kl_controller``). Raises ``ValueError`` naming a value out of range."""

    value_clip_eps: float | None = 0.2
    entropy_coef: float = 0.01
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    surrogate: Literal["clip", "kl_penalty"] = "clip"
    penalty_beta: float = 1.0  # its initial value
    penalty_target: float = 0.01  # d_targ, nats per token

    def __post_init__(self):
        super().__post_init__()
        greater_than(0, value_clip_eps=self.value_clip_eps, penalty_beta=self.penalty_beta,
                     penalty_target=self.penalty_target)
        at_least(0, entropy_coef=self.entropy_coef)
        between(0, 1, gamma=self.gamma, lam=self.lam)


@flax.struct.dataclass
class Experience:
    ids_BT: jax.Array
    mask_BT: jax.Array  # attention mask of prompt + completion
    action_mask_BT: jax.Array  # the completion tokens
    old_logp_BT: jax.Array
    sampler_logp_BT: jax.Array | None  # the sampler's own log-probs of the actions (None: the trainer's)
    ref_logp_BT: jax.Array
    old_values_BT: jax.Array
    advantages_BT: jax.Array
    returns_BT: jax.Array
    prompt_width: int = flax.struct.field(pytree_node=False, default=1)  # no action before it


def token_values(critic, ids_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """``V(ids[:t])`` at position ``t``: the critic's output at ``t - 1`` (0 at ``t = 0``)."""
    values_BT = critic(ids_BT, mask_BT)[..., 0]
    return jnp.pad(values_BT[:, :-1], ((0, 0), (1, 0)))


def explained_variance(values_BT, returns_BT, mask_BT) -> jax.Array:
    """``1 - Var(returns - values) / Var(returns)`` over the actions: 1 for a perfect critic,
    0 for one no better than the mean, negative for a worse one."""
    residual = masked_var(returns_BT - values_BT, mask_BT)
    return 1.0 - residual / jnp.maximum(masked_var(returns_BT, mask_BT), 1e-8)


def make_experience(policy, reference, critic, ids_BT, mask_BT, action_mask_BT, scores_B, beta,
                    config: PPOConfig | TRPOConfig, prompt_width: int = 1, sampler_logp_BT=None,
                    step_rewards_BT=None, *, context: UpdateContext = UpdateContext(),
                    forward_micro_batches: int = 1) -> tuple[Experience, dict]:
    """Step 2 above, for ``jit``. ``scores_B``: the reward of each completion (reward model or
    function, already computed); ``prompt_width`` (static): the rollout's prompt width, where the
    actions start (``action_mask_BT`` must be 0 before it, as a rollout's is);
    ``sampler_logp_BT``: the sampler's log-probs aligned with ``ids_BT`` (``None``: taken equal
    to the trainer's); ``step_rewards_BT``: process rewards at step ends, added to the
    per-token rewards before GAE (``rl.process_rewards``; ``None``: none); ``config``: GAE's
    ``gamma``, ``lam`` and ``whiten_advantages`` (PPO's or TRPO's section); ``context``: the
    log-probs' sampling distribution, the KL penalty's estimator ``kl_kind`` in the reward, or
    none there with ``kl_in_loss`` (default: temperature 1, k1, in the reward);
    ``forward_micro_batches``: the three forwards run on that many micro-batches of the rows in
    turn (``rl.minibatches.micro_batch_map``: the update's micro-batch size, so the experience
    holds no more logits than a gradient step). Returns the
    experience and its metrics (with the trainer/sampler ``logprob_gap_*``, and
    ``process_reward_mean``, the mean summed step reward of a completion, when given)."""
    action_mask_BT = action_mask_BT.astype(jnp.float32)

    def forwards(ids_BT, mask_BT):
        return (policy_logprobs(policy, ids_BT, mask_BT, context.sampling, start=prompt_width),
                policy_logprobs(reference, ids_BT, mask_BT, context.sampling, start=prompt_width),
                token_values(critic, ids_BT, mask_BT))

    old_logp_BT, ref_logp_BT, values_BT = micro_batch_map(forwards, forward_micro_batches, ids_BT, mask_BT)
    metrics = {}
    if sampler_logp_BT is not None:
        sampler_logp_BT = sampler_logp_BT * action_mask_BT
        metrics = logprob_gap(old_logp_BT, sampler_logp_BT, action_mask_BT)
    reward_beta = 0.0 if context.kl_in_loss else beta
    rewards_BT, shaped = kl.kl_shaped_rewards(scores_B, old_logp_BT, ref_logp_BT, action_mask_BT, beta=reward_beta,
                                              kind=context.kl_kind, step_rewards_BT=step_rewards_BT)
    if step_rewards_BT is not None:
        metrics["process_reward_mean"] = jnp.mean(jnp.sum(step_rewards_BT * action_mask_BT, axis=1))
    advantages_BT, returns_BT = advantages.gae(rewards_BT, values_BT, action_mask_BT, gamma=config.gamma,
                                               lam=config.lam)
    if config.whiten_advantages:
        advantages_BT = masked_whiten(advantages_BT, action_mask_BT) * action_mask_BT
    experience = Experience(ids_BT, mask_BT, action_mask_BT, old_logp_BT, sampler_logp_BT, ref_logp_BT, values_BT,
                            advantages_BT, returns_BT, prompt_width)
    kl_k3_B = jnp.sum(kl.kl_penalty(old_logp_BT, ref_logp_BT, "k3") * action_mask_BT, axis=1)
    metrics |= {"score_mean": jnp.mean(scores_B), "score_std": jnp.std(scores_B), "kl": jnp.mean(shaped.kl_B),
                "kl_k3": jnp.mean(kl_k3_B),
               "beta": jnp.asarray(beta, jnp.float32), "reward_mean": jnp.mean(jnp.sum(rewards_BT, axis=1)),
               "explained_variance": explained_variance(values_BT, returns_BT, action_mask_BT)}
    return experience, metrics


def ppo_losses(policy, critic, batch: Experience, beta, config: PPOConfig, penalty_beta=0.0, *,
               context: UpdateContext = UpdateContext()):
    """``(policy_loss - entropy_coef * entropy [+ beta * k3 KL], value_loss, metrics)`` on one
    minibatch; the KL term only with ``context.kl_in_loss``. The policy loss is the clipped
    surrogate, or with ``config.surrogate="kl_penalty"`` the KL-penalised one weighted by
    ``penalty_beta`` (``losses.ppo_penalty_loss``)."""
    # the policy's side on the N = T - prompt_width positions that can hold actions
    def actions(x_BT):
        return x_BT[:, batch.prompt_width:]

    logits_BNV = next_token_logits(policy, batch.ids_BT, batch.mask_BT, start=batch.prompt_width)
    logp_BN = sampled_token_logprobs(logits_BNV, actions(batch.ids_BT), context.sampling)
    action_mask_BN = actions(batch.action_mask_BT)
    aggregation = {"aggregation": config.loss_aggregation, "normalizer": config.loss_normalizer}
    weights_BN = None
    if batch.sampler_logp_BT is not None:
        weights_BN = truncated_importance_weights(actions(batch.old_logp_BT), actions(batch.sampler_logp_BT),
                                                  config.tis_cap)
    policy_args = (logp_BN, actions(batch.old_logp_BT), actions(batch.advantages_BT), action_mask_BN)
    if config.surrogate == "kl_penalty":
        policy_loss, penalty_aux = losses.ppo_penalty_loss(*policy_args, beta=penalty_beta,
                                                           importance_weights_BT=weights_BN, **aggregation)
        policy_metrics = {"approx_kl": penalty_aux.kl, "penalty_surrogate": penalty_aux.surrogate}
    else:
        policy_loss, policy_aux = losses.ppo_policy_loss(*policy_args, clip_eps=config.clip_eps,
                                                         importance_weights_BT=weights_BN, **aggregation)
        policy_metrics = {"clip_fraction": policy_aux.clip_fraction, "approx_kl": policy_aux.approx_kl,
                          "ratio_mean": policy_aux.ratio_mean, "ratio_max": policy_aux.ratio_max}
    entropy_loss, entropy_aux = losses.entropy_bonus(tempered_logits(logits_BNV, context.sampling), action_mask_BN,
                                                     **aggregation)
    values_BT = token_values(critic, batch.ids_BT, batch.mask_BT)
    value_loss, value_aux = losses.ppo_value_loss(values_BT, batch.old_values_BT, batch.returns_BT,
                                                  batch.action_mask_BT, clip_eps=config.value_clip_eps)
    metrics = {"policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy_aux.entropy,
               "value_clip_fraction": value_aux.clip_fraction} | policy_metrics
    total_policy_loss = policy_loss + config.entropy_coef * entropy_loss
    if context.kl_in_loss:
        kl_loss = aggregate(kl.kl_penalty(logp_BN, actions(batch.ref_logp_BT), "k3"), action_mask_BN,
                            config.loss_aggregation, normalizer=config.loss_normalizer)
        metrics["kl_loss_term"] = kl_loss
        total_policy_loss += beta * kl_loss
    return total_policy_loss, value_loss, metrics


def ppo_update(policy_state: TrainState, critic_state: TrainState, experience: Experience, key: jax.Array, beta,
               policy_tx: optax.GradientTransformation, critic_tx: optax.GradientTransformation,
               config: PPOConfig, penalty_beta=0.0, *, context: UpdateContext = UpdateContext()):
    """``(policy_state, critic_state, metrics)`` after ``epochs`` x ``minibatches`` updates,
    one ``lax.scan``. Each epoch draws a fresh permutation of the rows from ``key``; ``beta``
    weighs the KL loss term of ``context.kl_in_loss`` (unused otherwise), ``penalty_beta`` the
    KL(pi_old || pi) penalty of ``config.surrogate="kl_penalty"``. Each minibatch's gradients are
    accumulated exactly over ``config.micro_batches`` (``rl.minibatches.micro_batch_gradients``:
    the policy terms weighted by their aggregation's denominators, the value loss by its
    tokens). Metrics are per minibatch,
    shape ``[epochs * minibatches]``."""
    def gradients(states, params, batch):
        def total(params):
            policy, critic = states[0].model(params[0]), states[1].model(params[1])
            policy_loss, value_loss, metrics = ppo_losses(policy, critic, batch, beta, config, penalty_beta,
                                                          context=context)
            value_metrics = {k: metrics.pop(k) for k in ("value_loss", "value_clip_fraction")}
            return policy_loss + value_loss, ((policy_loss, value_loss), (metrics, value_metrics))

        return jax.grad(total, has_aux=True)(params)

    def weights(batch):  # the policy terms aggregate over the actions, the value loss is their token mean
        actions_BN = batch.action_mask_BT[:, batch.prompt_width:]
        return aggregation_weight(actions_BN, config.loss_aggregation), aggregation_weight(batch.action_mask_BT)

    def one(carry, batch):
        policy_s, critic_s = carry
        grads, (policy_loss, value_loss), metrics = micro_batch_gradients(
            functools.partial(gradients, carry), (policy_s.params, critic_s.params), batch, config.micro_batches,
            weights)
        policy_s, policy_ok = apply_gradients(policy_s, grads[0], policy_tx, policy_loss)
        critic_s, critic_ok = apply_gradients(critic_s, grads[1], critic_tx, value_loss)
        metrics |= {"policy_grad_norm": optax.tree.norm(grads[0]), "value_grad_norm": optax.tree.norm(grads[1]),
                    "applied": policy_ok & critic_ok}
        return (policy_s, critic_s), metrics

    (policy_state, critic_state), metrics = scan_minibatches(one, (policy_state, critic_state), experience, key,
                                                             epochs=config.epochs, minibatches=config.minibatches)
    return policy_state, critic_state, metrics


"""TRPO on the PPO rollout path (Schulman et al., 2015): the experience -- GAE advantages
from a critic, the rollout's log-probs -- is PPO's (``rl.make_experience``); the policy takes
one trust-region step on the whole rollout (``trust_region.trpo_step``: the natural gradient
by conjugate gradient on Fisher-vector products, a backtracking line search under the KL
bound), and the critic regresses the returns with its optimiser as PPO's does.

The KL of the trust region is the exact one over the vocabulary, KL(pi_old(.|s_t) ||
pi(.|s_t)) on the sampling distribution's tempered logits, averaged over the action tokens:
its Hessian at the old parameters is the Fisher matrix the step needs (a sampled estimate
has the wrong curvature)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import kl, losses
from rlhf_jax.config import at_least, between, greater_than
from rlhf_jax.masked import masked_mean
from rlhf_jax.models.token_logprobs import next_token_logits
from rlhf_jax.rl.behaviour import policy_logprobs, tempered_logits
from rlhf_jax.rl.minibatches import scan_minibatches
from rlhf_jax.rl.ppo import Experience, token_values
from rlhf_jax.rl.update_config import UpdateContext
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.step import apply_gradients
from rlhf_jax.trust_region import trpo_step


@dataclasses.dataclass(frozen=True)
class TRPOConfig:
    """TRPO's config, the ``trpo:`` section: the trust region of ``trust_region.trpo_step`` (the
    KL bound in nats per action token, conjugate-gradient iterations, Fisher damping, the line
    search's shrink factor and tries), and PPO's critic and GAE (``epochs`` x ``minibatches``
    are the critic's steps). Raises ``ValueError`` naming a value out of range."""

    max_kl: float = 0.01
    cg_iterations: int = 10
    damping: float = 0.1  # added to the Fisher matrix's diagonal in the conjugate gradient
    backtrack: float = 0.5
    max_backtracks: int = 10
    epochs: int = 4  # critic passes over each rollout
    minibatches: int = 1
    value_clip_eps: float | None = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True

    def __post_init__(self):
        greater_than(0, max_kl=self.max_kl, damping=self.damping, value_clip_eps=self.value_clip_eps)
        at_least(1, cg_iterations=self.cg_iterations, max_backtracks=self.max_backtracks, epochs=self.epochs,
                 minibatches=self.minibatches)
        if not 0 < self.backtrack < 1:
            raise ValueError(f"backtrack={self.backtrack!r} is out of range; valid: (0, 1)")
        between(0, 1, gamma=self.gamma, lam=self.lam)


def trpo_update(policy_state: TrainState, critic_state: TrainState, experience: Experience, key: jax.Array, beta,
                critic_tx: optax.GradientTransformation, config: TRPOConfig, *,
                context: UpdateContext = UpdateContext()):
    """``(policy_state, critic_state, metrics)``: one TRPO step of the policy on the whole
    rollout (surrogate ``-mean(rho A)`` over the action tokens, plus ``beta`` times the k3 KL
    to the reference with ``context.kl_in_loss``), then ``config.epochs`` x
    ``config.minibatches`` critic steps on the value loss (``losses.ppo_value_loss``). Metrics:
    the surrogate before and after, the KL reached, the line search's step fraction, and the
    value loss per critic step."""
    e, start = experience, experience.prompt_width
    action_mask_BN = e.action_mask_BT[:, start:]
    old_logits_BNV = jax.lax.stop_gradient(tempered_logits(
        next_token_logits(policy_state.model(), e.ids_BT, e.mask_BT, start=start), context.sampling))
    old_logp_BNV = jax.nn.log_softmax(old_logits_BNV)

    def surrogate(params):
        logp_BT = policy_logprobs(policy_state.model(params), e.ids_BT, e.mask_BT, context.sampling, start=start)
        ratio_BT = jnp.exp(logp_BT - e.old_logp_BT)
        loss = -masked_mean(ratio_BT * e.advantages_BT, e.action_mask_BT)
        if context.kl_in_loss:
            loss += beta * masked_mean(kl.kl_penalty(logp_BT, e.ref_logp_BT, "k3"), e.action_mask_BT)
        return loss

    def mean_kl(params):
        logits_BNV = tempered_logits(next_token_logits(policy_state.model(params), e.ids_BT, e.mask_BT, start=start),
                                     context.sampling)
        kl_BN = jnp.sum(jnp.exp(old_logp_BNV) * (old_logp_BNV - jax.nn.log_softmax(logits_BNV)), axis=-1)
        return masked_mean(kl_BN, action_mask_BN)

    params, aux = trpo_step(surrogate, mean_kl, policy_state.params, max_kl=config.max_kl,
                            cg_iterations=config.cg_iterations, damping=config.damping, backtrack=config.backtrack,
                            max_backtracks=config.max_backtracks)
    policy_state = policy_state.replace(params=params, step=policy_state.step + 1)

    def value_step(critic_s: TrainState, batch: Experience):
        def value_loss(critic_params):
            values_BT = token_values(critic_s.model(critic_params), batch.ids_BT, batch.mask_BT)
            return losses.ppo_value_loss(values_BT, batch.old_values_BT, batch.returns_BT, batch.action_mask_BT,
                                         clip_eps=config.value_clip_eps)[0]

        loss, grads = jax.value_and_grad(value_loss)(critic_s.params)
        critic_s, applied = apply_gradients(critic_s, grads, critic_tx, loss)
        return critic_s, {"value_loss": loss, "value_grad_norm": optax.tree.norm(grads), "applied": applied}

    critic_state, critic_metrics = scan_minibatches(value_step, critic_state, experience, key, epochs=config.epochs,
                                                    minibatches=config.minibatches)
    metrics = {"policy_loss_before": aux.loss_before, "policy_loss_after": aux.loss_after, "approx_kl": aux.kl,
               "step_fraction": aux.step_fraction} | {k: jnp.mean(v.astype(jnp.float32))
                                                      for k, v in critic_metrics.items()}
    return policy_state, critic_state, metrics

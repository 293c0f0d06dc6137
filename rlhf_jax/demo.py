"""InstructGPT in miniature: SFT -> reward model -> PPO on a bigram language model.

The built-in offline job that runs before the transformer pipeline exists (issue [E]). It
is small but complete, and every step goes through the library's loss core:

1. **Task.** Tokens ``0..V-1``; token 0 is EOS. Given a one-token prompt, a policy writes
   up to ``T`` tokens. A known *gold* reward scores a completion: (number of ``3`` tokens
   minus number of ``5`` tokens) / T. Nobody optimises the gold reward directly.
2. **SFT.** Demonstrations come from a fixed random "teacher" bigram model; the policy, a
   bigram table ``logits[prev_token] -> next token``, is fit with ``losses.sft_loss``.
3. **RM.** Pairs of SFT samples are labelled by the gold reward through a Bradley-Terry
   coin flip (noisy labellers); a linear reward model on token counts is fit with
   ``losses.bradley_terry_loss``.
4. **PPO.** Policy and frozen reference start from SFT. Each iteration samples a batch,
   shapes rewards with ``kl.kl_shaped_rewards`` (RM score on the last token, -beta * KL per
   token), computes ``advantages.gae``, whitens them, and runs epochs x minibatches of
   ``ppo_policy_loss + c_v ppo_value_loss + c_H entropy_bonus`` as one jitted
   ``lax.scan``; beta follows ``kl.adaptive_kl_controller``.
5. **Summary.** The PPO policy and the SFT policy are compared by the gold reward.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from rlhf_jax import advantages, kl, losses
from rlhf_jax.logprobs import token_logprobs
from rlhf_jax.masked import masked_whiten

EOS = 0


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    vocab: int = 8
    length: int = 10  # T, the maximum completion length
    seed: int = 0
    sft_examples: int = 2048
    sft_steps: int = 300
    rm_pairs: int = 2048
    rm_steps: int = 300
    label_temperature: float = 0.1  # Bradley-Terry temperature of the simulated labellers
    ppo_iterations: int = 60
    ppo_batch: int = 128
    ppo_epochs: int = 4
    ppo_minibatches: int = 4
    lr: float = 0.05
    ppo_lr: float = 0.02
    init_kl_coef: float = 0.2
    kl_target: float = 3.0  # nats per completion
    kl_horizon: float = 500.0
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    eval_samples: int = 4096


class Rollout(NamedTuple):
    prev_BT: jax.Array  # the token each step conditions on (prompt, then the sample so far)
    tokens_BT: jax.Array  # sampled completion tokens, EOS-padded after the first EOS
    mask_BT: jax.Array  # 1 up to and including the first EOS


def sample(logits_VV: jax.Array, prompt_B: jax.Array, key: jax.Array, length: int) -> Rollout:
    """Sample ``length`` tokens from the bigram policy, stopping each row at its first EOS."""

    def step(carry, key_t):
        prev_B, done_B = carry
        token_B = jnp.where(done_B, EOS, jax.random.categorical(key_t, logits_VV[prev_B]))
        return (token_B, done_B | (token_B == EOS)), (prev_B, token_B, ~done_B)

    init = (prompt_B, jnp.zeros(prompt_B.shape, bool))
    _, (prev_TB, tokens_TB, mask_TB) = lax.scan(step, init, jax.random.split(key, length))
    return Rollout(prev_TB.T, tokens_TB.T, mask_TB.T)


def token_counts(rollout: Rollout, vocab: int) -> jax.Array:
    """``[B, V]`` counts of each token among the valid completion tokens."""
    one_hot_BTV = jax.nn.one_hot(rollout.tokens_BT, vocab) * rollout.mask_BT[..., None]
    return jnp.sum(one_hot_BTV, axis=1)


def rm_features(rollout: Rollout, config: DemoConfig) -> jax.Array:
    """``[B, V]`` reward-model features: token counts over the maximum length."""
    return token_counts(rollout, config.vocab) / config.length


def gold_reward(rollout: Rollout, config: DemoConfig) -> jax.Array:
    counts_BV = token_counts(rollout, config.vocab)
    return (counts_BV[:, 3] - counts_BV[:, 5]) / config.length


def policy_logp(logits_VV: jax.Array, rollout: Rollout) -> jax.Array:
    return token_logprobs(logits_VV[rollout.prev_BT], rollout.tokens_BT)


def random_prompts(key: jax.Array, batch: int, vocab: int) -> jax.Array:
    return jax.random.randint(key, (batch,), 1, vocab)


def fit(loss_fn, params, steps: int, lr: float):
    """``steps`` full-batch Adam steps on ``loss_fn(params) -> (loss, aux)``, one ``lax.scan``."""
    optimizer = optax.adam(lr)

    def step(carry, _):
        params, opt_state = carry
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, aux)

    (params, _), history = lax.scan(step, (params, optimizer.init(params)), length=steps)
    return params, history


def train_sft(config: DemoConfig, key: jax.Array):
    teacher_key, prompt_key, sample_key = jax.random.split(key, 3)
    teacher_VV = 1.5 * jax.random.normal(teacher_key, (config.vocab, config.vocab))
    teacher_VV = teacher_VV.at[:, EOS].add(-1.0)
    prompts_B = random_prompts(prompt_key, config.sft_examples, config.vocab)
    demos = sample(teacher_VV, prompts_B, sample_key, config.length)

    def loss_fn(logits_VV):
        return losses.sft_loss(logits_VV[demos.prev_BT], demos.tokens_BT, demos.mask_BT)

    student_VV, (loss_S, _) = fit(loss_fn, jnp.zeros_like(teacher_VV), config.sft_steps, config.lr)
    return student_VV, loss_S


def train_reward_model(config: DemoConfig, sft_VV: jax.Array, key: jax.Array):
    """Linear RM ``r(y) = w . counts(y) / T`` fit to noisy gold-reward comparisons (no bias:
    the Bradley-Terry loss only sees reward differences)."""
    prompt_key, a_key, b_key, label_key = jax.random.split(key, 4)
    prompts_B = random_prompts(prompt_key, 2 * config.rm_pairs, config.vocab)
    first = sample(sft_VV, prompts_B, a_key, config.length)
    second = sample(sft_VV, prompts_B, b_key, config.length)
    gold_diff_B = gold_reward(first, config) - gold_reward(second, config)
    first_wins_B = jax.random.bernoulli(label_key, jax.nn.sigmoid(gold_diff_B / config.label_temperature))
    features_first_BV = rm_features(first, config)
    features_second_BV = rm_features(second, config)
    chosen_BV = jnp.where(first_wins_B[:, None], features_first_BV, features_second_BV)
    rejected_BV = jnp.where(first_wins_B[:, None], features_second_BV, features_first_BV)
    train, held_out = slice(0, config.rm_pairs), slice(config.rm_pairs, None)

    def loss_fn(w_V, part=train):
        return losses.bradley_terry_loss(chosen_BV[part] @ w_V, rejected_BV[part] @ w_V)

    w_V, _ = fit(loss_fn, jnp.zeros(config.vocab), config.rm_steps, config.lr)
    _, held_out_aux = loss_fn(w_V, held_out)
    rm_diff_B = (features_first_BV - features_second_BV)[held_out] @ w_V
    gold_diff_B = gold_diff_B[held_out]
    decided_B = gold_diff_B != 0
    agrees_B = jnp.sign(rm_diff_B) == jnp.sign(gold_diff_B)
    gold_agreement = jnp.sum(agrees_B & decided_B) / jnp.maximum(jnp.sum(decided_B), 1)
    return w_V, held_out_aux.accuracy, gold_agreement


class PPOState(NamedTuple):
    params: dict  # {"policy": logits_VV, "critic": values_TV}
    opt_state: optax.OptState
    kl_state: kl.KLControllerState
    key: jax.Array


class PPOMetrics(NamedTuple):
    rm_score: jax.Array
    gold_reward: jax.Array
    kl: jax.Array  # mean per-completion KL to the reference (nats)
    beta: jax.Array
    entropy: jax.Array
    clip_fraction: jax.Array
    approx_kl: jax.Array
    value_loss: jax.Array
    length: jax.Array


def make_ppo_iteration(config: DemoConfig, ref_VV: jax.Array, rm_w_V: jax.Array):
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(config.ppo_lr))
    controller = kl.adaptive_kl_controller(config.init_kl_coef, config.kl_target, config.kl_horizon)
    positions_T = jnp.arange(config.length)

    def values_of(critic_TV, rollout):
        return critic_TV[positions_T[None, :], rollout.prev_BT]

    def minibatch_loss(params, batch):
        rollout, old_logp_BT, old_values_BT, adv_BT, returns_BT = batch
        logits_BTV = params["policy"][rollout.prev_BT]
        logp_BT = token_logprobs(logits_BTV, rollout.tokens_BT)
        pg_loss, pg_aux = losses.ppo_policy_loss(logp_BT, old_logp_BT, adv_BT, rollout.mask_BT)
        vf_loss, _ = losses.ppo_value_loss(
            values_of(params["critic"], rollout), old_values_BT, returns_BT, rollout.mask_BT
        )
        ent_loss, ent_aux = losses.entropy_bonus(logits_BTV, rollout.mask_BT)
        total = pg_loss + config.value_coef * vf_loss + config.entropy_coef * ent_loss
        return total, (pg_aux, vf_loss, ent_aux.entropy)

    def iteration(state: PPOState) -> tuple[PPOState, PPOMetrics]:
        key, prompt_key, sample_key, shuffle_key = jax.random.split(state.key, 4)
        policy_VV = state.params["policy"]
        rollout = sample(policy_VV, random_prompts(prompt_key, config.ppo_batch, config.vocab), sample_key, config.length)
        logp_BT = policy_logp(policy_VV, rollout)
        ref_logp_BT = policy_logp(ref_VV, rollout)
        values_BT = values_of(state.params["critic"], rollout)
        scores_B = rm_features(rollout, config) @ rm_w_V
        rewards_BT, shaped = kl.kl_shaped_rewards(
            scores_B, logp_BT, ref_logp_BT, rollout.mask_BT, beta=state.kl_state.beta
        )
        adv_BT, returns_BT = advantages.gae(rewards_BT, values_BT, rollout.mask_BT, gamma=1.0, lam=0.95)
        adv_BT = masked_whiten(adv_BT, rollout.mask_BT)
        batch = (rollout, logp_BT, values_BT, adv_BT, returns_BT)

        def epoch(carry, epoch_key):
            order_B = jax.random.permutation(epoch_key, config.ppo_batch)
            minibatches = jax.tree.map(
                lambda x: x[order_B].reshape(config.ppo_minibatches, -1, *x.shape[1:]), batch
            )

            def update(carry, minibatch):
                params, opt_state = carry
                grads, aux = jax.grad(minibatch_loss, has_aux=True)(params, minibatch)
                updates, opt_state = optimizer.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), aux

            return lax.scan(update, carry, minibatches)

        (params, opt_state), (pg_aux, vf_loss, entropy) = lax.scan(
            epoch, (state.params, state.opt_state), jax.random.split(shuffle_key, config.ppo_epochs)
        )
        mean_kl = jnp.mean(shaped.kl_B)
        kl_state = controller.update(state.kl_state, mean_kl, config.ppo_batch)
        metrics = PPOMetrics(
            rm_score=jnp.mean(scores_B),
            gold_reward=jnp.mean(gold_reward(rollout, config)),
            kl=mean_kl,
            beta=state.kl_state.beta,
            entropy=jnp.mean(entropy),
            clip_fraction=jnp.mean(pg_aux.clip_fraction),
            approx_kl=jnp.mean(pg_aux.approx_kl),
            value_loss=jnp.mean(vf_loss),
            length=jnp.mean(jnp.sum(rollout.mask_BT, axis=1)),
        )
        return PPOState(params, opt_state, kl_state, key), metrics

    def init(key: jax.Array) -> PPOState:
        params = {"policy": jnp.copy(ref_VV), "critic": jnp.zeros((config.length, config.vocab))}
        return PPOState(params, optimizer.init(params), controller.init(), key)

    return init, iteration


def evaluate(config: DemoConfig, logits_VV: jax.Array, ref_VV: jax.Array, key: jax.Array) -> dict:
    prompt_key, sample_key = jax.random.split(key)
    rollout = sample(logits_VV, random_prompts(prompt_key, config.eval_samples, config.vocab), sample_key, config.length)
    kl_BT = kl.kl_penalty(policy_logp(logits_VV, rollout), policy_logp(ref_VV, rollout), "k1")
    kl_B = jnp.sum(jnp.where(rollout.mask_BT, kl_BT, 0.0), axis=1)
    return {
        "gold_reward": float(jnp.mean(gold_reward(rollout, config))),
        "kl_to_sft": float(jnp.mean(kl_B)),
        "length": float(jnp.mean(jnp.sum(rollout.mask_BT, axis=1))),
    }


def run(config: DemoConfig = DemoConfig(), log=print) -> dict:
    """Run SFT -> RM -> PPO and return the summary; ``log`` receives progress lines."""
    sft_key, rm_key, ppo_key, eval_key = jax.random.split(jax.random.key(config.seed), 4)
    started = time.perf_counter()
    sft_VV, sft_loss_S = jax.jit(train_sft, static_argnums=0)(config, sft_key)
    log(f"[sft] {config.sft_steps} steps, loss {float(sft_loss_S[0]):.3f} -> {float(sft_loss_S[-1]):.3f}")
    rm_w_V, rm_accuracy, rm_gold_agreement = jax.jit(train_reward_model, static_argnums=0)(config, sft_VV, rm_key)
    log(
        f"[rm]  {config.rm_steps} steps, held-out accuracy {float(rm_accuracy):.3f} on noisy labels, "
        f"{float(rm_gold_agreement):.3f} against the gold ordering"
    )
    init, iteration = make_ppo_iteration(config, sft_VV, rm_w_V)
    iteration = jax.jit(iteration, donate_argnums=0)
    state = init(ppo_key)
    for i in range(config.ppo_iterations):
        state, m = iteration(state)
        if i % 10 == 0 or i == config.ppo_iterations - 1:
            log(
                f"[ppo] iter {i:3d}  rm {float(m.rm_score):+.3f}  gold {float(m.gold_reward):+.3f}  "
                f"kl {float(m.kl):.3f}  beta {float(m.beta):.4f}  entropy {float(m.entropy):.3f}  "
                f"clipfrac {float(m.clip_fraction):.3f}  len {float(m.length):.1f}"
            )
    summary = {
        "sft": evaluate(config, sft_VV, sft_VV, eval_key),
        "ppo": evaluate(config, state.params["policy"], sft_VV, eval_key),
        "rm_heldout_accuracy": float(rm_accuracy),
        "rm_gold_agreement": float(rm_gold_agreement),
        "final_beta": float(state.kl_state.beta),
        "seconds": time.perf_counter() - started,
    }
    log("")
    log(f"{'policy':<8}{'gold reward':>14}{'KL to SFT':>12}{'length':>9}")
    for name in ("sft", "ppo"):
        row = summary[name]
        log(f"{name:<8}{row['gold_reward']:>14.3f}{row['kl_to_sft']:>12.3f}{row['length']:>9.2f}")
    log(f"PPO - SFT gold reward: {summary['ppo']['gold_reward'] - summary['sft']['gold_reward']:+.3f} "
        f"({summary['seconds']:.0f} s)")
    return summary

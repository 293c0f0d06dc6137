"""Best-of-N: sample N completions per prompt, score them, keep the best -- as an evaluation
(how much reward is within the policy's reach) and as a policy of its own; and RAFT / ReST
(Dong et al., 2023; Gulcehre et al., 2023): fine-tune on the kept best, then sample again."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.data.batches import Sequences
from rlhf_jax.rl.minibatches import scan_minibatches
from rlhf_jax.rollout import GenerationConfig, decode_completions, generate
from rlhf_jax.train.sft import token_nll_rows
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.step import apply_gradients


def best_in_groups(scores_B: np.ndarray, group_size: int) -> np.ndarray:
    """Row index of the highest score in each consecutive group of ``group_size`` rows (the
    sampler's order: the samples of a prompt are adjacent); the first of tied rows."""
    scores_PG = np.asarray(scores_B).reshape(-1, group_size)
    return np.arange(len(scores_PG)) * group_size + np.argmax(scores_PG, axis=1)


def best_of_n(model, tokenizer, prompt_ids_BP, prompt_mask_BP, prompt_texts: Sequence[str], key: jax.Array,
              config: GenerationConfig, reward) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(best completion per prompt, its score, every sample's score [B, N])`` with
    ``N = config.num_samples`` and ``reward(prompts, completions) -> (scores, penalised)``."""
    rollout = generate(model, prompt_ids_BP, prompt_mask_BP, key, config)
    completions = decode_completions(tokenizer, rollout)
    n = config.num_samples
    scores, _ = reward([p for p in prompt_texts for _ in range(n)], completions)
    best = best_in_groups(scores, n)
    return [completions[i] for i in best], scores[best], scores.reshape(-1, n)


def raft_update(policy_state: TrainState, ids_BT, mask_BT, action_mask_BT, key, policy_tx: optax.GradientTransformation,
                *, epochs: int, minibatches: int):
    """``epochs`` x ``minibatches`` steps of the SFT loss (mean negative log-likelihood of the
    action tokens) on the kept completions; one ``lax.scan``."""
    batch = Sequences(ids_BT, mask_BT, action_mask_BT)

    def loss(params, b):
        nll_B, tokens_B = token_nll_rows(policy_state.model(params), b)
        return jnp.sum(nll_B) / jnp.maximum(jnp.sum(tokens_B), 1.0)

    def one(state: TrainState, b):
        value, grads = jax.value_and_grad(loss)(state.params, b)
        state, applied = apply_gradients(state, grads, policy_tx, value)
        return state, {"sft_loss": value, "policy_grad_norm": optax.tree.norm(grads), "applied": applied}

    return scan_minibatches(one, policy_state, batch, key, epochs=epochs, minibatches=minibatches)

"""A tiny Llama policy (vocabulary 16, token 0 = EOS) and a known reward for the RL tests:
the share of completion tokens equal to TARGET (~6% under the untrained model)."""

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import models
from rlhf_jax.rollout import GenerationConfig, SamplingConfig, generate

V, PROMPT, NEW, EOS, TARGET = 16, 4, 8, 0, 3


def tiny(head, seed):
    config = models.config_from_hf({"model_type": "llama", "vocab_size": V, "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "rms_norm_eps": 1e-5, "max_position_embeddings": 64})
    return models.build_model(config, head, rngs=nnx.Rngs(seed))


def rollout(policy_model, key, prompts=32, samples=1, sampling=SamplingConfig()):
    """``(rollout, ids, mask, action_mask)`` for ``prompts`` random prompts x ``samples``."""
    prompt_ids = jax.random.randint(key, (prompts, PROMPT), 1, V)
    config = GenerationConfig(max_new_tokens=NEW, stop_token_ids=(EOS,), pad_token_id=EOS, prompt_buckets=(PROMPT,),
                              num_samples=samples, sampling=sampling)
    out = generate(policy_model, prompt_ids, jnp.ones_like(prompt_ids), jax.random.fold_in(key, 1), config)
    ids, mask = out.sequences()
    return out, ids, mask, out.action_mask()


def target_fraction(ids, action_mask):
    """The known reward: the fraction of completion tokens equal to TARGET."""
    return jnp.sum((ids == TARGET) * action_mask, 1) / jnp.maximum(jnp.sum(action_mask, 1), 1)


def critic_free_configs(estimator, *, group_size=4, kl_in_loss=None, sampling=SamplingConfig(), **options):
    """``(config, context)`` of a critic-free update: the algorithm's own section (GRPO's for
    ``grpo``, else RLOO's / REINFORCE's) with one epoch of one minibatch unless ``options``
    say otherwise, and an ``rl.UpdateContext`` with the KL where the algorithm puts it (GRPO:
    a loss term) unless ``kl_in_loss`` is given."""
    from rlhf_jax import rl

    section = rl.GRPOConfig if estimator == "grpo" else rl.CriticFreeConfig
    context = rl.UpdateContext(sampling=sampling, group_size=group_size,
                               kl_in_loss=estimator == "grpo" if kl_in_loss is None else kl_in_loss)
    return section(**({"epochs": 1} | options)), context

"""What the online benchmarks (GRPO against TRL 1.16, PPO against TRL 1.12) share: the
prompts, the reward function, the checkpoints, TRL's common arguments, and our iteration --
sampling, reward, the jitted experience-and-update -- timed from the prompts to the updated
parameters, exactly as ``rlhf_jax.phases.online.run_online`` runs it."""

from __future__ import annotations

import random
import statistics
import string
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from bench_common import CONFIGS, TORCH_DEVICE

from rlhf_jax import data, kl
from rlhf_jax.data.formats import Prompt
from rlhf_jax.phases.config import MeshConfig
from rlhf_jax.phases.algorithms import ALGORITHMS, OnlineState, RolloutBatch
from rlhf_jax.phases.online import build_critic
from rlhf_jax.phases.reward_sources import build_reward
from rlhf_jax.phases.sampler import Sampler
from rlhf_jax.phases.online_config import OnlineConfig
from rlhf_jax.phases.setup import build_model, make_mesh
from rlhf_jax.rl.prompts import Prompts
from rlhf_jax.rl.scorer_prompts import PromptTable
from rlhf_jax.train import TrainState, make_optimizer
from rlhf_jax.train.optim import OptimizerConfig

WARM_UP, PROMPTS, PROMPT_CHARS, NEW, LR = 2, 8, 32, 64, 1e-5


def letter_share(prompt: str, completion: str) -> float:
    """A cheap verifiable reward, the same on both sides."""
    return sum(ch in "ae" for ch in completion) / max(len(completion), 1)


def prompt_texts(n: int) -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(PROMPT_CHARS)) for _ in range(n)]


def tokenizer_for(vocab: int):
    """The byte-level tokenizer grown to the models' ``vocab`` with added tokens, so that every
    sampled id decodes to text and the reward model's text handoff reads it back."""
    tokenizer = data.byte_tokenizer()
    tokenizer.add_tokens([f"<|extra_{i}|>" for i in range(vocab - len(tokenizer))])
    return tokenizer


def save_checkpoint(family: str, tokenizer, path: str, head: str = "lm") -> str:
    """A fresh ~5M-parameter ``family`` model (seeded) saved in HF format at ``path``."""
    torch.manual_seed(0 if head == "lm" else 1)
    config = CONFIGS[family]()
    config.pad_token_id, config.eos_token_id, config.num_labels = tokenizer.pad_token_id, tokenizer.eos_token_id, 1
    auto = transformers.AutoModelForCausalLM if head == "lm" else transformers.AutoModelForSequenceClassification
    auto.from_config(config).save_pretrained(path)
    return path


def trl_common_args(steps: int) -> dict:
    """TRL's arguments that both trainers share: same learning rate, fp32, no checkpointing."""
    return dict(learning_rate=LR, lr_scheduler_type="constant", logging_steps=10_000, save_strategy="no",
                report_to=[], use_cpu=TORCH_DEVICE.type == "cpu", bf16=False, gradient_checkpointing=False, seed=0,
                dataloader_num_workers=0)


def ours_seconds(config: OnlineConfig, checkpoint: str, tokenizer, steps: int) -> tuple[float, float]:
    """``(median iteration seconds after WARM_UP, first iteration seconds incl. compilation)``
    of ``config``'s algorithm with the policy (and reference) of ``checkpoint``."""
    texts = prompt_texts(PROMPTS * (steps + WARM_UP))
    prompts = Prompts([np.asarray(tokenizer(t)["input_ids"], np.int32) for t in texts], texts,
                      [Prompt(t) for t in texts])
    tx = make_optimizer(OptimizerConfig(learning_rate=LR, schedule="constant", total_steps=steps + WARM_UP))
    policy = build_model(config.model, "lm", tokenizer=tokenizer, seed=0, path=checkpoint)
    reference = build_model(config.model, "lm", tokenizer=tokenizer, seed=0, path=checkpoint)
    algorithm, critic = ALGORITHMS[config.algorithm], None
    if algorithm.needs_critic:
        critic = TrainState.create(build_critic(config, policy, tokenizer), tx, jax.random.key(1))
    controller = kl.fixed_kl_controller(config.kl.beta)
    state = OnlineState(jnp.zeros((), jnp.int32), TrainState.create(policy, tx, jax.random.key(0)), critic,
                        controller.init())
    mesh = make_mesh(MeshConfig())
    sample = Sampler.for_config(config, tokenizer, mesh, checkpoint)
    reward = build_reward(config.reward, tokenizer, mesh, seed=config.seed, prompts=PromptTable.of(prompts))
    update = algorithm.make_iteration(config, tx, tx, controller)
    times = []
    for step in range(steps + WARM_UP):
        start = time.perf_counter()
        key = jax.random.key(step)
        sampled = sample(state.policy.model(), prompts, np.arange(step * PROMPTS, (step + 1) * PROMPTS), key)
        scores, _ = reward(sampled.prompts, sampled.completions)
        state, metrics = update(state, reference, RolloutBatch.of(sampled.rollout, jnp.asarray(scores)), key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return statistics.median(times[WARM_UP:]), times[0]

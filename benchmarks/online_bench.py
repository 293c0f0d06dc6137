"""One GRPO step -- 8 prompts x 4 samples of 64 new tokens, rewards, the update -- in
rlhf_jax and in TRL's GRPOTrainer, side by side in one process, on the same ~5M-parameter
GPT-2 and Llama (fp32), the same prompts, tokenizer and reward function, with a KL term to a
frozen reference on both sides (beta 0.04). A step is timed from the prompts to the updated
parameters (TRL: ``on_step_begin`` -> ``on_step_end``; ours: sampling, reward and the jitted
update until ready). The first 2 steps (compilation, warm-up) are left out.

    python benchmarks/online_bench.py [--steps 8] [--families gpt2 llama]
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import string
import tempfile
import time
import warnings

import datasets
import jax
import numpy as np
import torch
import transformers
import trl
from bench_common import CONFIGS, TORCH_DEVICE, StepTimer, print_header
from flax import nnx

from rlhf_jax import data, kl, models
from rlhf_jax.phases.config import MeshConfig
from rlhf_jax.phases.online import OnlineState, Sampler, train_iteration
from rlhf_jax.phases.online_config import KLConfig, OnlineConfig, RolloutConfig, UpdateConfig
from rlhf_jax.phases.setup import make_mesh
from rlhf_jax.rl.prompts import Prompts
from rlhf_jax.rl.rewards import FunctionReward
from rlhf_jax.train import TrainState, make_optimizer
from rlhf_jax.train.optim import OptimizerConfig

WARM_UP, PROMPTS, SAMPLES, NEW, BETA = 2, 8, 4, 64, 0.04


def letter_share(prompt: str, completion: str) -> float:
    """The same cheap verifiable reward on both sides."""
    return sum(ch in "ae" for ch in completion) / max(len(completion), 1)


def trl_reward(prompts, completions, **kwargs):
    return [letter_share(p, c) for p, c in zip(prompts, completions)]


def prompt_texts(steps: int) -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(32)) for _ in range(PROMPTS * steps)]


def trl_seconds(checkpoint: str, tokenizer, steps: int) -> float:
    args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PROMPTS * SAMPLES,
                          num_generations=SAMPLES, max_completion_length=NEW, max_steps=steps + WARM_UP,
                          learning_rate=1e-5, lr_scheduler_type="constant", beta=BETA, num_iterations=1,
                          logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=TORCH_DEVICE.type == "cpu",
                          bf16=False, gradient_checkpointing=False, seed=0, dataloader_num_workers=0)
    rows = datasets.Dataset.from_list([{"prompt": p} for p in prompt_texts(steps + WARM_UP)])
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=trl_reward, args=args, train_dataset=rows,
                              processing_class=tokenizer)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return statistics.median(timer.times[WARM_UP:])


def ours_seconds(checkpoint: str, tokenizer, steps: int) -> tuple[float, float]:
    """``(median step seconds, first step seconds incl. compilation)``."""
    config = OnlineConfig(data=data.DataConfig(source="(in memory)", format="prompt"), algorithm="grpo",
                          kl=KLConfig(beta=BETA),
                          rollout=RolloutConfig(prompts=PROMPTS, samples=SAMPLES, max_new_tokens=NEW,
                                                completion_buckets=(NEW,)),
                          update=UpdateConfig(epochs=1, minibatches=1))
    texts = prompt_texts(steps + WARM_UP)
    prompts = Prompts([np.asarray(tokenizer(t)["input_ids"], np.int32) for t in texts], texts)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-5, schedule="constant", total_steps=steps + WARM_UP))
    policy, reference = models.from_pretrained(checkpoint), models.from_pretrained(checkpoint)
    controller = kl.fixed_kl_controller(BETA)
    state = OnlineState(jax.numpy.zeros((), jax.numpy.int32), TrainState.create(policy, tx, jax.random.key(0)), None,
                        controller.init())
    sample = Sampler(config, tokenizer, make_mesh(MeshConfig()))
    reward = FunctionReward(letter_share, "letter_share")
    update = nnx.jit(functools.partial(train_iteration, config=config, policy_tx=tx, critic_tx=None,
                                       controller=controller))
    times = []
    for step in range(steps + WARM_UP):
        start = time.perf_counter()
        key = jax.random.key(step)
        rollout, prompt_text, completions = sample(state.policy.model(), prompts,
                                                   np.arange(step * PROMPTS, (step + 1) * PROMPTS), key)
        scores, _ = reward(prompt_text, completions)
        ids, mask = rollout.sequences()
        actions = jax.numpy.concatenate([jax.numpy.zeros_like(rollout.prompt_mask_BP),
                                         rollout.completion_mask_BN.astype(jax.numpy.int32)], 1)
        state, metrics = update(state, reference, ids, mask, actions, jax.numpy.asarray(scores), key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return statistics.median(times[WARM_UP:]), times[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--families", nargs="+", default=list(CONFIGS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tokenizer = data.byte_tokenizer()
    print_header(f"GRPO step ({PROMPTS} prompts x {SAMPLES} samples x {NEW} new tokens) vs TRL {trl.__version__}",
                 args.steps, ["model", "TRL ms/step", "rlhf_jax ms/step", "speed-up", "rlhf_jax first step s"])
    for family in args.families:
        with tempfile.TemporaryDirectory() as checkpoint:
            torch.manual_seed(0)
            config = CONFIGS[family]()
            config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
            transformers.AutoModelForCausalLM.from_config(config).save_pretrained(checkpoint)
            theirs = trl_seconds(checkpoint, tokenizer, args.steps)
            ours, first = ours_seconds(checkpoint, tokenizer, args.steps)
            print(f"| {family} | {theirs * 1e3:.0f} | {ours * 1e3:.0f} | {theirs / ours:.2f}x | {first:.1f} |", flush=True)


if __name__ == "__main__":
    main()

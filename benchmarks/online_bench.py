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
import statistics
import tempfile

import datasets
import transformers
from bench_common import CONFIGS, VOCAB, StepTimer, competitor, parse_args, print_header, quiet, versus
from online_common import NEW, PROMPTS, WARM_UP, letter_share, ours_seconds, prompt_texts, save_checkpoint, \
    tokenizer_for, trl_common_args

from rlhf_jax import data
from rlhf_jax.phases.online_config import KLConfig, OnlineConfig, RewardConfig, RolloutConfig
from rlhf_jax.rl import GRPOConfig

SAMPLES, BETA = 4, 0.04


def trl_reward(prompts, completions, **kwargs):
    return [letter_share(p, c) for p, c in zip(prompts, completions)]


def trl_seconds(trl, checkpoint: str, tokenizer, steps: int) -> float:
    args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PROMPTS * SAMPLES,
                          num_generations=SAMPLES, max_completion_length=NEW, max_steps=steps + WARM_UP, beta=BETA,
                          num_iterations=1, **trl_common_args(steps))
    rows = datasets.Dataset.from_list([{"prompt": p} for p in prompt_texts(PROMPTS * (steps + WARM_UP))])
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=trl_reward, args=args, train_dataset=rows,
                              processing_class=tokenizer)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return statistics.median(timer.times[WARM_UP:])


def grpo_config() -> OnlineConfig:
    return OnlineConfig(data=data.DataConfig(source="(in memory)", format="prompt"), algorithm="grpo",
                        reward=RewardConfig(function="online_common:letter_share"), kl=KLConfig(beta=BETA),
                        rollout=RolloutConfig(prompts=PROMPTS, samples=SAMPLES, max_new_tokens=NEW,
                                              completion_buckets=(NEW,)),
                        grpo=GRPOConfig(epochs=1, minibatches=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--families", nargs="+", default=list(CONFIGS))
    args = parse_args(parser, smoke={"steps": 1, "families": ["llama"]})
    trl = competitor(args.smoke)
    quiet()
    tokenizer = tokenizer_for(VOCAB)
    print_header(f"GRPO step ({PROMPTS} prompts x {SAMPLES} samples x {NEW} new tokens) vs TRL "
                 f"{trl.__version__ if trl else '(not installed)'}",
                 args.steps, ["model", "TRL ms/step", "rlhf_jax ms/step", "speed-up", "rlhf_jax first step s"])
    for family in args.families:
        with tempfile.TemporaryDirectory() as checkpoint:
            save_checkpoint(family, tokenizer, checkpoint)
            theirs = trl and trl_seconds(trl, checkpoint, tokenizer, args.steps)
            ours, first = ours_seconds(grpo_config(), checkpoint, tokenizer, args.steps)
            print(f"| {family} | {versus(theirs, ours)} | {first:.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""One PPO iteration -- 8 prompts, 64 new tokens, reward-model scores, reference log-probs,
values, GAE, then 1 or 4 epochs of the clipped policy and value losses -- in rlhf_jax and in
TRL 1.12's PPOTrainer (the last TRL release with it, ``trl.experimental.ppo``), side by side
in one process, on the same ~5M-parameter GPT-2 and Llama (fp32): the same policy and
reference, the same reward model (which also initialises the critic, as in InstructGPT), the
same prompts and tokenizer, a k1 KL penalty in the reward (beta 0.05) on both sides, one
minibatch of 8 per epoch, no entropy bonus (TRL has none). TRL's iteration is timed between
consecutive ``on_step_end`` calls (PPOTrainer calls no ``on_step_begin``), ours from the
prompts to the updated parameters; the first 2 iterations are left out.

TRL 1.12 and the newer TRL of the ``bench`` extra cannot share an environment; install 1.12
beside it in a directory of its own and put that first on the path:

    pip install --no-deps --target /tmp/trl112 trl==1.12.0
    PYTHONPATH=/tmp/trl112 python benchmarks/ppo_bench.py [--steps 8] [--epochs 1 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import datasets
import transformers
from bench_common import CONFIGS, VOCAB, StepTimer, competitor, parse_args, print_header, quiet, versus
from online_common import NEW, PROMPTS, WARM_UP, ours_seconds, prompt_texts, save_checkpoint, tokenizer_for, \
    trl_common_args

from rlhf_jax import data
from rlhf_jax.phases.online_config import KLConfig, OnlineConfig, RewardConfig, RolloutConfig
from rlhf_jax import rl

BETA = 0.05

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
TRL_112 = ("TRL 1.12 beside the bench extra's (this script's docstring): pip install --no-deps --target /tmp/trl112 "
           "trl==1.12.0 and PYTHONPATH=/tmp/trl112")


def trl_seconds(trl_ppo, policy: str, reward: str, tokenizer, steps: int, epochs: int) -> float:
    """TRL's ``experimental.ppo`` module's PPOTrainer, the median iteration after the warm-up."""
    PPOConfig, PPOTrainer = trl_ppo.PPOConfig, trl_ppo.PPOTrainer  # noqa: N806 (TRL's class names)
    args = PPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PROMPTS, num_mini_batches=1,
                     num_ppo_epochs=epochs, local_rollout_forward_batch_size=PROMPTS, response_length=NEW,
                     stop_token="eos", total_episodes=PROMPTS * (steps + WARM_UP), kl_coef=BETA, kl_estimator="k1",
                     num_sample_generations=0, **trl_common_args(steps))
    rows = datasets.Dataset.from_list([{"input_ids": tokenizer(p)["input_ids"]}
                                       for p in prompt_texts(PROMPTS * (steps + WARM_UP))])
    causal, scorer = transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=causal.from_pretrained(policy),
                         ref_model=causal.from_pretrained(policy), reward_model=scorer.from_pretrained(reward),
                         value_model=scorer.from_pretrained(reward), train_dataset=rows)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return statistics.median(timer.times[WARM_UP:])


def ppo_config(reward: str, epochs: int) -> OnlineConfig:
    return OnlineConfig(data=data.DataConfig(source="(in memory)", format="prompt"), algorithm="ppo",
                        reward=RewardConfig(model=reward, max_length=128), kl=KLConfig(beta=BETA, kind="k1"),
                        rollout=RolloutConfig(prompts=PROMPTS, max_new_tokens=NEW, completion_buckets=(NEW,)),
                        ppo=rl.PPOConfig(epochs=epochs, minibatches=1, entropy_coef=0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--families", nargs="+", default=list(CONFIGS))
    args = parse_args(parser, smoke={"steps": 1, "epochs": [1], "families": ["llama"]})
    trl_ppo = competitor(args.smoke, "trl.experimental.ppo", TRL_112)
    quiet()
    tokenizer = tokenizer_for(VOCAB)
    version = __import__("trl").__version__ if trl_ppo else "(not installed)"
    print_header(f"PPO iteration ({PROMPTS} prompts x {NEW} new tokens) vs TRL {version} PPOTrainer",
                 args.steps, ["model", "epochs", "TRL ms/iter", "rlhf_jax ms/iter", "speed-up",
                              "rlhf_jax first iter s"])
    for family in args.families:
        with tempfile.TemporaryDirectory() as policy, tempfile.TemporaryDirectory() as reward:
            save_checkpoint(family, tokenizer, policy)
            save_checkpoint(family, tokenizer, reward, head="score")
            for epochs in args.epochs:
                theirs = trl_ppo and trl_seconds(trl_ppo, policy, reward, tokenizer, args.steps, epochs)
                ours, first = ours_seconds(ppo_config(reward, epochs), policy, tokenizer, args.steps)
                print(f"| {family} | {epochs} | {versus(theirs, ours)} | {first:.1f} |", flush=True)


if __name__ == "__main__":
    main()

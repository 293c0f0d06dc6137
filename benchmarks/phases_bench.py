"""Training steps of the offline phases -- SFT, reward model, DPO -- in rlhf_jax and in TRL
(SFTTrainer, RewardTrainer, DPOTrainer), side by side in one process, on the same ~5M-parameter
GPT-2 and Llama (fp32), 8 sequences (SFT) or 8 pairs (RM, DPO) of 128 tokens per step.

TRL's defaults are changed to match the work: ``bf16=False`` (TRL 1.x defaults to bf16 mixed
precision, which on a CPU without bf16 matmuls is ~20x slower) and ``gradient_checkpointing=False``
(SFTTrainer's default is on; rlhf_jax's ``remat`` is off here). Both sides start from the same weights and read the same rows through the same byte-level
tokenizer. A step is timed from fetching its batch to the updated parameters: for TRL, from
``on_step_begin`` to ``on_step_end`` of a ``TrainerCallback``; for rlhf_jax, ``Loader.batch``
+ placement + the jitted step until its result is ready. The first 3 steps (compilation,
warm-up) are left out; the medians of the rest are compared. RM and DPO are also timed with
``data.shared_prompt: true`` (each pair one row: the prompt once, both responses after it),
against the same TRL run (TRL has no such layout).

    python benchmarks/phases_bench.py [--steps 10] [--families gpt2 llama] [--phases sft rm dpo]
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import string
import tempfile
import time

import datasets
import jax
import optax
import torch
import transformers
from bench_common import CONFIGS, TORCH_DEVICE, StepTimer, competitor, parse_args, print_header, quiet, versus

from rlhf_jax import data, models
from rlhf_jax.phases.config import MeshConfig
from rlhf_jax.phases.setup import make_mesh, put_batch
from rlhf_jax.train import (TrainState, add_reference_logps, dpo_loss_sums, jit_train_step, make_train_step, rm_loss_sums,
                            sft_loss_sums)

WARM_UP = 3
PROMPT_CHARS, RESPONSE_CHARS = 64, 63  # + EOS: 128 byte tokens per sequence


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(n))


def rows(phase: str, n: int) -> list[dict]:
    rng = random.Random(0)
    if phase == "sft":
        return [{"prompt": random_text(rng, PROMPT_CHARS), "completion": random_text(rng, RESPONSE_CHARS)} for _ in range(n)]
    return [{"prompt": random_text(rng, PROMPT_CHARS), "chosen": random_text(rng, RESPONSE_CHARS),
             "rejected": random_text(rng, RESPONSE_CHARS)} for _ in range(n)]


def trl_seconds(trl, phase: str, checkpoint: str, tokenizer, steps: int, batch: int) -> float:
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps + WARM_UP,
                  learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=10_000, save_strategy="no",
                  report_to=[], use_cpu=TORCH_DEVICE.type == "cpu", dataloader_num_workers=0, max_length=128, seed=0,
                  bf16=False, gradient_checkpointing=False)  # fp32, no remat: the same work as ours
    rows_ = datasets.Dataset.from_list(rows(phase, batch * (steps + WARM_UP)))
    if phase == "sft":
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**common, packing=False), train_dataset=rows_,
                                 processing_class=tokenizer)
    elif phase == "rm":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = trl.RewardTrainer(model=model, args=trl.RewardConfig(**common), train_dataset=rows_,
                                    processing_class=tokenizer)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
        trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(**common, beta=0.1), train_dataset=rows_,
                                 processing_class=tokenizer)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return statistics.median(timer.times[WARM_UP:])


def ours_seconds(phase: str, checkpoint: str, tokenizer, steps: int, batch: int,
                 shared_prompt: bool = False) -> tuple[float, float]:
    """``(median step seconds, first step seconds incl. compilation)``; ``shared_prompt``: pairs
    batched as ``data.shared_prompt: true`` (each prompt once, both responses after it)."""
    encoder = data.Encoder(tokenizer, max_length=128)
    report = data.DataReport("bench")
    parse = {"sft": "prompt_completion"}.get(phase, "preference")
    examples = [(f"row {i}", data.parse_row(r, parse)) for i, r in enumerate(rows(phase, batch * (steps + WARM_UP)))]
    tokenized = data.TokenizedData(data.encode_examples(examples, encoder, report), tokenizer.pad_token_id, 128,
                                   shared_prompt=shared_prompt)
    loader = data.Loader(tokenized, batch_size=batch)
    model = models.from_pretrained(checkpoint, head="score" if phase == "rm" else "lm")
    loss_fn = {"sft": sft_loss_sums, "rm": rm_loss_sums, "dpo": functools.partial(dpo_loss_sums, beta=0.1)}[phase]
    tx = optax.adamw(1e-4)
    state = TrainState.create(model, tx, jax.random.key(0))
    reference = models.from_pretrained(checkpoint) if phase == "dpo" else None
    step_fn = jit_train_step(make_train_step(loss_fn, tx), reference=reference, prepare=add_reference_logps)
    mesh = make_mesh(MeshConfig())
    times = []
    for step in range(steps + WARM_UP):
        start = time.perf_counter()
        state, metrics = step_fn(state, put_batch(loader.batch(step), mesh))
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return statistics.median(times[WARM_UP:]), times[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--families", nargs="+", default=list(CONFIGS))
    parser.add_argument("--phases", nargs="+", default=["sft", "rm", "dpo"])
    args = parse_args(parser, smoke={"steps": 1, "batch": 2, "families": ["llama"], "phases": ["sft", "dpo"]})
    trl = competitor(args.smoke)
    quiet()
    tokenizer = data.byte_tokenizer()
    print_header(f"Phase steps vs TRL {trl.__version__ if trl else '(not installed)'}", args.steps,
                 ["model", "phase", "TRL ms/step", "rlhf_jax ms/step", "speed-up", "rlhf_jax first step s"])
    for family in args.families:
        with tempfile.TemporaryDirectory() as checkpoint:
            torch.manual_seed(0)
            config = CONFIGS[family]()
            config.pad_token_id = tokenizer.pad_token_id
            transformers.AutoModelForCausalLM.from_config(config).save_pretrained(checkpoint)
            for phase in args.phases:
                theirs = trl and trl_seconds(trl, phase, checkpoint, tokenizer, args.steps, args.batch)
                for shared in (False, True) if phase != "sft" else (False,):
                    ours, first = ours_seconds(phase, checkpoint, tokenizer, args.steps, args.batch, shared)
                    label = f"{phase}, shared prompt" if shared else phase
                    print(f"| {family} | {label} | {versus(theirs, ours)} | {first:.1f} |", flush=True)


if __name__ == "__main__":
    main()

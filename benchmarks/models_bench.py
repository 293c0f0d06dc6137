"""One SFT step's forward + backward on a ~5M-parameter GPT-2 and Llama (fp32): rlhf_jax
(jitted, ``jax.value_and_grad``) against the same weights in transformers (torch eager,
``loss.backward()``), side by side in one process. Both sides are first checked to compute
the same loss. Prints the first-step compile time, the medians and the throughput ratio.

    python benchmarks/models_bench.py [--batch 8] [--length 128] [--repeats 10]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from bench_common import CONFIGS, TORCH_DEVICE, VOCAB, median_seconds, model_pair, parse_args, print_header, torch_sync
from flax import nnx

from rlhf_jax import models
from rlhf_jax.masked import masked_mean

def sft_loss(model, ids_BT, mask_BT):
    """Mean next-token cross-entropy over the real tokens (what transformers' ``labels`` computes)."""
    return -masked_mean(models.sequence_logprobs(model, ids_BT, mask_BT)[:, 1:], mask_BT[:, 1:])


def bench(family: str, batch: int, length: int, repeats: int) -> dict:
    reference, model, n_params = model_pair(family)
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(batch, length))
    mask = np.ones_like(ids)

    ids_t, mask_t = torch.as_tensor(ids, device=TORCH_DEVICE), torch.as_tensor(mask, device=TORCH_DEVICE)

    def torch_step():
        reference.zero_grad(set_to_none=True)
        loss = reference(input_ids=ids_t, attention_mask=mask_t, labels=ids_t).loss
        loss.backward()
        torch_sync()
        return loss

    graphdef, state = nnx.split(model)
    step = jax.jit(jax.value_and_grad(lambda s, i, m: sft_loss(nnx.merge(graphdef, s), i, m)))
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)

    def jax_step():
        loss, grads = step(state, ids_j, mask_j)
        jax.block_until_ready(grads)
        return loss

    start = time.perf_counter()
    jax_loss = jax_step()
    compile_s = time.perf_counter() - start
    torch_loss = torch_step()
    np.testing.assert_allclose(float(jax_loss), float(torch_loss), rtol=1e-4)
    torch_step()  # warm-up
    jax_step()
    torch_s = median_seconds(torch_step, repeats)
    jax_s = median_seconds(jax_step, repeats)
    return dict(family=family, params_m=n_params / 1e6, compile_s=compile_s, torch_ms=1e3 * torch_s,
                jax_ms=1e3 * jax_s, speedup=torch_s / jax_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--families", nargs="+", default=sorted(CONFIGS))
    args = parse_args(parser, smoke={"batch": 2, "length": 16, "repeats": 1, "families": ["llama"]})
    print_header(f"SFT forward+backward, batch {args.batch} x length {args.length}, fp32", args.repeats,
                 ["model", "params", "first step (compile)", "torch (ms)", "rlhf_jax (ms)", "speed-up"])
    for family in args.families:
        r = bench(family, args.batch, args.length, args.repeats)
        print(f"| {r['family']} | {r['params_m']:.1f}M | {r['compile_s']:.1f} s | {r['torch_ms']:.1f} | "
              f"{r['jax_ms']:.1f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()

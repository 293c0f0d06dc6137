"""Compile time of one training step against depth: the library's SFT step (forward,
backward, AdamW update; ``train.step.make_train_step``) on a Llama of width 256 with 2 and
16 layers, the blocks in a Python loop (``scan_layers=False``) and stored stacked under one
``lax.scan`` (``scan_layers=True``). Each measurement lowers and compiles a fresh ``jax.jit``
(no cache); several repeats, the median, and the 16-layer / 2-layer ratio per layout.

    python benchmarks/compile_bench.py [--repeats 3] [--layers 2 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from bench_common import parse_args
from flax import nnx

from rlhf_jax import models
from rlhf_jax.data.batches import Sequences
from rlhf_jax.train.sft import sft_loss_sums
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.step import make_train_step

WIDTH = dict(model_type="llama", vocab_size=2048, hidden_size=256, intermediate_size=688, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5)
BATCH, LENGTH = 4, 128


def compile_seconds(layers: int, scan_layers: bool) -> float:
    config = models.config_from_hf(WIDTH | {"num_hidden_layers": layers})
    model = models.build_model(config, "lm", rngs=nnx.Rngs(0), scan_layers=scan_layers)
    state = TrainState.create(model, optax.adamw(1e-4), jax.random.key(0))
    ones = jnp.ones((1, BATCH, LENGTH), jnp.int32)  # [micro_batches, rows, tokens]
    batch = Sequences(input_ids_BT=ones, attention_mask_BT=ones, loss_mask_BT=ones)
    step = make_train_step(sft_loss_sums, optax.adamw(1e-4))
    start = time.perf_counter()
    jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 16])
    args = parse_args(parser, smoke={"repeats": 1, "layers": [1, 2]})
    shallow, deep = args.layers
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, width {WIDTH['hidden_size']}, "
          f"batch {BATCH} x {LENGTH}, median of {args.repeats}")
    print(f"| blocks | {shallow} layers (s) | {deep} layers (s) | ratio |")
    print("| ------ | ---: | ---: | ---: |")
    for scan_layers, name in ((False, "Python loop"), (True, "scanned (scan_layers)")):
        seconds = [statistics.median(compile_seconds(n, scan_layers) for _ in range(args.repeats))
                   for n in (shallow, deep)]
        print(f"| {name} | {seconds[0]:.2f} | {seconds[1]:.2f} | {seconds[1] / seconds[0]:.2f}x |")


if __name__ == "__main__":
    main()

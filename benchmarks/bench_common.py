"""What the benchmark scripts share: the timing rule, the ~5M-parameter model pair (the same
weights in transformers and rlhf_jax) and the markdown table header."""

from __future__ import annotations

import argparse
import functools
import importlib
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import datasets
import jax
import torch
import transformers

from rlhf_jax import models

# Both sides in true fp32: XLA on GPU would otherwise run fp32 matmuls as TF32 (torch keeps
# ``allow_tf32`` off by default), and the loss checks at rtol 1e-4 would not hold.
jax.config.update("jax_default_matmul_precision", "highest")
TORCH_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

VOCAB = 8192
CONFIGS = {  # ~5M parameters each: tied embeddings (2.1M) + 4 blocks of d = 256
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=256, n_layer=4, n_head=4, n_positions=256,
                                            bos_token_id=1, eos_token_id=2),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
    ),
}


def torch_sync() -> None:
    """Wait for queued GPU work (torch launches kernels asynchronously); a no-op on the CPU."""
    if TORCH_DEVICE.type == "cuda":
        torch.cuda.synchronize()


class StepTimer(transformers.TrainerCallback):
    """Wall time of each Trainer step, GPU work included: ``on_step_begin`` -> ``on_step_end``,
    or, for a trainer that never calls ``on_step_begin`` (TRL's PPOTrainer), from the previous
    ``on_step_end`` (the first from ``on_train_begin``)."""

    def __init__(self):
        self.times = []

    def on_train_begin(self, args, state, control, **kwargs):
        torch_sync()
        self.start = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        torch_sync()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        torch_sync()
        self.start, previous = time.perf_counter(), self.start
        self.times.append(self.start - previous)


def _one_block(make: Callable[[], transformers.PretrainedConfig]) -> transformers.PretrainedConfig:
    config = make()
    config.num_hidden_layers = 1  # GPT-2's n_layer too (its attribute map)
    return config


def parse_args(parser: argparse.ArgumentParser, smoke: dict) -> argparse.Namespace:
    """``parser``'s arguments, with ``--smoke`` added: the sizes in ``smoke`` instead of the
    command line's and models of one block -- tiny, one repeat; what the test suite runs so that no benchmark breaks
    unnoticed (its numbers measure nothing)."""
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny sizes and one repeat ({', '.join(f'{k}={v}' for k, v in smoke.items())}): checks "
                             "that the script runs, as the test suite does")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(smoke)
        for family, make in list(CONFIGS.items()):  # one block each: compiles in a fraction of the time
            if getattr(make, "func", None) is not _one_block:  # once (scripts run in turn in one interpreter)
                CONFIGS[family] = functools.partial(_one_block, make)
    return args


def competitor(smoke: bool, module: str = "trl", install: str = 'pip install -e ".[bench]"'):
    """The competitor's ``module``, imported. At ``--smoke`` a missing one is said in one line
    and None returned (its side of the table left out: the suite checks the script's own side);
    otherwise its absence ends the run naming ``install``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = isinstance(error, ModuleNotFoundError) and module.startswith(str(error.name).split(".")[0])
        if not smoke or not missing:  # absent where it is needed, or installed but broken
            raise SystemExit(f"{module} cannot be imported ({error}): {install}") from None
        print(f"{module} is not installed: its side is left out of this smoke run ({install})")
        return None


def versus(theirs: float | None, ours: float) -> str:
    """The table cells ``their ms | our ms | speed-up``; ``-`` for a side left out."""
    if theirs is None:
        return f"- | {ours * 1e3:.0f} | -"
    return f"{theirs * 1e3:.0f} | {ours * 1e3:.0f} | {theirs / ours:.2f}x"


def quiet() -> None:
    """No warnings, transformers logging or datasets progress bars between the table rows."""
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def median_seconds(fn, repeats: int, *, warm_up: bool = False) -> float:
    """The median wall time of ``repeats`` calls (after one uncounted call if ``warm_up``)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_pair(family: str):
    """``(torch reference in eval mode, the same weights loaded by rlhf_jax, parameter count)``."""
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="eager").eval()
    reference.to(TORCH_DEVICE)
    with tempfile.TemporaryDirectory() as path:
        reference.save_pretrained(path)
        model = models.from_pretrained(path)
    return reference, model, sum(p.numel() for p in reference.parameters())


def print_header(title: str, repeats: int, columns: list[str]) -> None:
    torch_on = torch.cuda.get_device_name() if TORCH_DEVICE.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{title}, jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
          f"({torch_on}), transformers {transformers.__version__}, median of {repeats}")
    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join("-" * len(c) for c in columns) + " |")

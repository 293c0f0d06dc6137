"""bf16 weights and compute with float32 optimizer moments: the tiny model's SFT loss curve in
bf16 tracks the float32 one."""

import json

from phase_runs import checkpoint_arrays, cli

SHORT = ["train.steps=12", "checkpoint.every=12", "checkpoint.export_hf=false", "metrics.progress=false"]


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row["kind"] == "sft/train"]


def test_a_bf16_run_tracks_the_float32_loss_curve(tmp_path):
    f32 = cli("sft", "configs/sft_tiny.yaml", f"output_dir={tmp_path / 'f32'}", *SHORT, "train.log_every=1")
    bf16 = cli("sft", "configs/sft_tiny.yaml", f"output_dir={tmp_path / 'bf16'}", *SHORT, "train.log_every=1",
               "model.dtype=bfloat16", "model.param_dtype=bfloat16")
    assert f32.returncode == 0 and bf16.returncode == 0, bf16.stderr
    full, half = _losses(tmp_path / "f32"), _losses(tmp_path / "bf16")
    assert len(full) == len(half) == 12 and full[-1] < 0.8 * full[0]  # it learns
    # bf16 keeps 8 bits of mantissa: each step's loss within 3% of float32's (measured: under 1%)
    for step, (a, b) in enumerate(zip(full, half), start=1):
        assert abs(b - a) <= 0.03 * a, (step, a, b)
    state = checkpoint_arrays(tmp_path / "bf16", 12)
    weights = {str(leaf.dtype) for leaf in _leaves(state["params"]) if leaf.ndim >= 2}
    moments = {str(leaf.dtype) for leaf in _leaves(state["opt_state"]) if leaf.ndim >= 2}
    assert weights == {"bfloat16"} and moments == {"float32"}  # bf16 weights, float32 Adam moments


def _leaves(tree):
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, list | tuple):
        return [leaf for value in tree for leaf in _leaves(value)]
    return [] if tree is None or not hasattr(tree, "dtype") else [tree]

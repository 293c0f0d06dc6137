"""The offline phases end to end through the CLI, each in a fresh process: exact resume,
SIGTERM, corrupt checkpoints, bad rows, the mesh, metrics files, and the shipped data."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from phase_runs import (QUIET, ROOT, SHARED, assert_bit_identical, checkpoint_arrays, cli, killed_and_resumed,
                        leaves_with_paths, main_in_process, process_env)

SHORT = ["train.steps=6", "train.micro_batches=2", "checkpoint.every=100", "checkpoint.export_hf=false", *QUIET]


def _resumed_equals_straight(straight_dir, split_dir):
    """Checkpoint 6 bit for bit, and the train losses of every step (those of steps 4-6 from
    the resumed run) the same numbers."""
    assert_bit_identical(checkpoint_arrays(straight_dir, 6), checkpoint_arrays(split_dir, 6))
    lines = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    losses = lambda d: {r["step"]: r["loss"] for r in lines(d) if r["kind"].endswith("/train")}  # noqa: E731
    assert losses(straight_dir) == losses(split_dir)


@pytest.mark.slow
def test_sft_stopped_by_itself_resumes_in_a_new_process_bit_identically(tmp_path):
    """SFT stops itself at step 3 (``--stop-after``), and a later process resumes it."""
    common = ["sft", "configs/sft_tiny.yaml", *SHORT, "checkpoint.every=3"]
    straight = cli(*common, f"output_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr
    first = cli(*common, f"output_dir={tmp_path / 'split'}", "--stop-after", 3)
    assert first.returncode == 0, first.stderr
    assert "stopped at step 3 (stop_after)" in first.stdout and "--resume" in first.stdout
    # --stop-after counts from the run's start: a resume already there takes no step
    again = cli(*common, f"output_dir={tmp_path / 'split'}", "--stop-after", 3, "--resume")
    assert again.returncode == 0 and "stopped at step 3 (stop_after)" in again.stdout, again.stderr
    assert "without --stop-after" in again.stdout
    second = cli(*common, f"output_dir={tmp_path / 'split'}", "--resume")
    assert second.returncode == 0 and "resumed from" in second.stdout and "at step 3" in second.stdout, second.stderr
    _resumed_equals_straight(tmp_path / "straight", tmp_path / "split")


# one representative per kind of state and data (DPO with its reference on the fly: the pipeline
# and multi-host tests): SimPO trains on DPO's pairs with a reference-free loss, the path KTO's
# unpaired rows and PRM's step labels do not share; DPO and KTO read a cached reference back
KILLED = {"rm": [], "dpo": ["dpo.reference_logps=precompute", "dpo.average_logps=true"], "simpo": [],
          "kto": ["kto.reference_logps=precompute"], "prm": []}


@pytest.mark.slow
def test_each_offline_phase_killed_before_a_checkpoint_resumes_in_a_new_process_bit_identically(tmp_path):
    """Each phase of :data:`KILLED` resumes what a run killed after its step-6 update and
    before that checkpoint left: a copy of the straight run's files without checkpoint 6 (its
    metrics past step 3 dropped on resume). One process runs the five straight, a new one
    resumes the five (one interpreter start each)."""
    second = killed_and_resumed(tmp_path, {phase: [phase, f"configs/{phase}_tiny.yaml", *SHORT, *extra,
                                                   "checkpoint.every=3"] for phase, extra in KILLED.items()},
                                checkpoint=6)
    assert second.stdout.count("resumed from") == second.stdout.count("at step 3") == len(KILLED), second.stdout
    for phase in ("dpo", "kto"):  # the cached reference log-probs are read back, not computed again
        assert f"reference log-probs: loaded from {tmp_path / phase / 'split'}" in second.stdout, second.stdout
    for phase in KILLED:
        _resumed_equals_straight(tmp_path / phase / "straight", tmp_path / phase / "split")


@pytest.mark.slow
def test_precomputed_reference_logps_train_as_computed_on_the_fly(tmp_path):
    runs = {mode: cli("dpo", "configs/dpo_tiny.yaml", f"output_dir={tmp_path / mode}", *SHORT,
                      f"dpo.reference_logps={mode}") for mode in ("on_the_fly", "precompute")}
    assert all(run.returncode == 0 for run in runs.values()), runs["precompute"].stderr
    cached = np.load(tmp_path / "precompute" / "reference_logps.npz")
    assert cached["train/reference_logps_BK"].shape == (40, 2) and cached["eval/reference_logps_BK"].shape == (8, 2)
    on_the_fly, precomputed = (checkpoint_arrays(tmp_path / mode, 6) for mode in runs)
    for (path, a), (_, b) in zip(leaves_with_paths(on_the_fly["params"]), leaves_with_paths(precomputed["params"]),
                                 strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=str(path))


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    env_args = [sys.executable, "-m", "rlhf_jax.cli", "sft", "configs/sft_tiny.yaml", f"output_dir={out}",
                "train.steps=100000", "checkpoint.every=100000", "checkpoint.export_hf=false", *QUIET]
    env = process_env()
    process = subprocess.Popen(env_args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"sft/train"' in metrics.read_text()):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    step = int(stdout.split("stopped at step ")[1].split()[0])
    assert "(SIGTERM); checkpoint saved in" in stdout and "--resume" in stdout
    assert (out / "checkpoints" / str(step)).is_dir()
    resumed = cli("sft", "configs/sft_tiny.yaml", f"output_dir={out}", f"train.steps={step + 2}",
                  "checkpoint.export_hf=false", *QUIET, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert int(checkpoint_arrays(out, step + 2)["step"]) == step + 2


def test_a_corrupt_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    out = tmp_path / "run"
    args = ["sft", "configs/sft_tiny.yaml", f"output_dir={out}", "train.steps=4", "checkpoint.every=2",
            "checkpoint.export_hf=false", *QUIET]
    assert cli(*args).returncode == 0
    again = cli(*args)
    assert again.returncode == 2 and "already holds checkpoints (steps [2, 4]); pass --resume" in again.stderr
    for f in (out / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    broken = cli(*args, "--resume")
    assert broken.returncode == 2
    assert "checkpoints/4 is corrupt" in broken.stderr and "differ from their checksums" in broken.stderr
    assert "present: [2]" in broken.stderr and len(broken.stderr.strip().splitlines()) == 1


def test_malformed_rows_stop_the_run_with_file_and_row(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 20 + [{"prompt": "p", "chosen": "same", "rejected": "same"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = cli("rm", "configs/rm_tiny.yaml", f"data.source={path}", f"output_dir={tmp_path / 'run'}", *QUIET)
    assert result.returncode == 2
    assert f"{path} row 21: chosen and rejected are the same text" in result.stderr


def test_unknown_config_key_and_bad_choice_are_named(capsys):
    code, err = main_in_process(capsys, "dpo", "configs/dpo_tiny.yaml", "dpo.betta=0.2")
    assert code == 2
    assert "unknown config key 'dpo.betta'; did you mean 'dpo.beta'? valid keys are: average_logps, beta" in err
    code, err = main_in_process(capsys, "dpo", "configs/dpo_tiny.yaml", "dpo.loss_type=kto")
    assert code == 2 and "dpo.loss_type: 'kto' is not one of sigmoid, hinge, ipo, robust" in err


@pytest.mark.slow
def test_metrics_reach_jsonl_and_tensorboard(tmp_path):
    out = tmp_path / "run"
    assert cli("sft", "configs/sft_tiny.yaml", f"output_dir={out}", "train.steps=3", "checkpoint.export_hf=false",
               *QUIET).returncode == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if r["kind"] == "sft/train"}
    assert sorted(losses) == [1, 2, 3] and records[-1]["kind"] == "sft/eval" and records[-1]["perplexity"] > 1
    from tensorboard_events import scalars

    board = scalars(next((out / "tensorboard").glob("events.out.tfevents.*")))
    assert {s: pytest.approx(v, rel=1e-6) for s, v in board["sft/train/loss"].items()} == losses


# --- the shipped real data ------------------------------------------------------------------
needs_data = pytest.mark.skipif(not (SHARED / "alpaca_5000.json.gz").exists(), reason=f"{SHARED} is absent")


@needs_data
@pytest.mark.parametrize("phase, config, skipped", [("sft", "configs/sft_alpaca_tiny.yaml", 2),
                                                     ("rm", "configs/rm_hh_tiny.yaml", 4)])
def test_real_data_runs_a_few_steps_and_reports_what_it_did_to_the_rows(tmp_path, phase, config, skipped):
    result = cli(phase, config, f"output_dir={tmp_path}", "train.steps=3", "train.optimizer.warmup_steps=1",
                 "checkpoint.export_hf=false", *QUIET)
    assert result.returncode == 0, result.stderr
    assert f"{skipped} skipped as malformed" in result.stdout and "responses truncated" in result.stdout
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    data = records[0]
    assert data["kind"] == f"{phase}/data" and data["skipped_malformed"] == skipped and data["responses_truncated"] > 0
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == f"{phase}/train")


def test_every_phase_declares_the_protocol_the_loop_reads():
    from rlhf_jax.phases import PHASES
    from rlhf_jax.phases.protocol import Phase, ReferencePhase

    assert all(isinstance(phase, Phase) for phase in PHASES.values())
    assert {name for name, phase in PHASES.items() if isinstance(phase, ReferencePhase)} == {"dpo", "kto"}
    assert all(name == phase.name for name, phase in PHASES.items())


def test_the_tensorboard_writer_does_not_import_torch(tmp_path):
    """tensorboardX's package import tries torch (~1.4 s of a run's start); the writer loads it
    without, and torch still imports after (where installed)."""
    code = ("import importlib.util, sys, pathlib\nfrom rlhf_jax.metrics import TensorBoardFile\n"
            f"board = TensorBoardFile(pathlib.Path({str(tmp_path)!r}))\nboard.add_scalar('a', 1.5, 3)\nboard.close()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "if importlib.util.find_spec('torch'):\n    import torch\n    assert torch.ones(1).item() == 1")
    run = subprocess.run([sys.executable, "-c", code], env=process_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    from tensorboard_events import scalars

    assert scalars(next(tmp_path.glob("events.out.tfevents.*")))["a"] == {3: 1.5}

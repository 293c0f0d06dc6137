"""Nothing lost silently and no user error ends in a traceback: unreadable data files and rows,
a second run into a live output_dir, checkpoints that fail to save or were altered on disk,
runs whose updates keep failing or whose final evaluation is NaN, and the CLI's one-line
errors for each user fault."""

import gzip
import json
import math

import jax
import jax.numpy as jnp
import optax
import pytest

from rlhf_jax import cli
from rlhf_jax.checkpoint import Checkpointer, CheckpointError
from rlhf_jax.config import ConfigError
from rlhf_jax.data import DataError
from rlhf_jax.data.formats import load_examples
from rlhf_jax.phases.runner import RunResult
from rlhf_jax.run_lock import OutputDirLock
from rlhf_jax.train.guard import TrainingDiverged, check_nonfinite_streak
from rlhf_jax.train.step import apply_gradients
from rlhf_jax.train.state import TrainState

ROW = {"prompt": "p", "completion": "c"}


def _jsonl(rows: list[bytes]) -> bytes:
    return b"\n".join(rows) + b"\n"


def test_a_gz_that_is_not_gzip_is_named(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(_jsonl([json.dumps(ROW).encode()]))
    with pytest.raises(DataError, match=r"rows.jsonl.gz: not a valid gzip file"):
        load_examples(str(path), "prompt_completion")


def test_invalid_utf8_and_invalid_json_rows_are_named_or_skipped_and_counted(tmp_path):
    good = json.dumps(ROW).encode()
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl([good, b'{"prompt": "\xff\xfe", "completion": "c"}', good, b"{not json", good])))
    with pytest.raises(DataError, match=r"rows.jsonl.gz row 2: not valid UTF-8"):
        load_examples(str(path), "prompt_completion")
    examples, report = load_examples(str(path), "prompt_completion", on_malformed="skip")
    assert len(examples) == 3 and report.skipped_malformed == 2 and report.rows == 5


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _jsonl([json.dumps(ROW).encode()] * 2))
    examples, _ = load_examples(str(path), "prompt_completion")
    assert [e.prompt for _, e in examples] == ["p", "p"]
    array = tmp_path / "rows.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([ROW]).encode())
    assert len(load_examples(str(array), "prompt_completion")[0]) == 1


def test_a_second_run_into_a_live_output_dir_is_refused_naming_the_holder(tmp_path):
    with OutputDirLock(tmp_path / "run"):
        with pytest.raises(ConfigError, match=r"run is in use by a running job \(pid \d+ on "):
            with OutputDirLock(tmp_path / "run"):
                pass
    with OutputDirLock(tmp_path / "run"):  # released when the first run ends
        pass
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"output_dir .*a_file/run cannot be written"):
        with OutputDirLock(blocker / "run"):
            pass


def _state(value: float):
    return {"w": jnp.full((64,), value, jnp.float32)}


def test_checkpoints_are_checksummed_and_an_altered_one_is_refused_naming_the_others(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints", every=1, keep=3, async_save=False)
    for step in (1, 2):
        checkpointer.save(step, _state(step), {"step": step})
    checkpointer.close()
    checkpointer = Checkpointer(tmp_path / "checkpoints", every=1, keep=3, async_save=False)
    state, meta = checkpointer.restore(_state(0))
    assert meta["step"] == 2 and float(state["w"][0]) == 2.0
    files = sorted(p for p in (tmp_path / "checkpoints" / "2").rglob("*") if p.is_file() and p.stat().st_size > 64)
    data = bytearray(files[-1].read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit flipped, same size
    files[-1].write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoints/2 is corrupt: 1 file\(s\) differ .*present: \[1\]"):
        checkpointer.restore(_state(0))
    state, _ = checkpointer.restore(_state(0), step=1)
    assert float(state["w"][0]) == 1.0


def test_a_failed_save_is_an_error_at_that_save_and_the_last_good_checkpoint_survives(tmp_path, monkeypatch):
    checkpointer = Checkpointer(tmp_path / "checkpoints", every=1, async_save=False)
    checkpointer.save(1, _state(1), {"step": 1})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointer.manager, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"saving checkpoint step 2 .* failed \(OSError: \[Errno 28\] No space "
                                              r"left on device\); the last good checkpoint is 1"):
        checkpointer.save(2, _state(2), {"step": 2})
    monkeypatch.undo()
    state, meta = checkpointer.restore(_state(0))
    assert meta["step"] == 1 and float(state["w"][0]) == 1.0


def test_non_finite_updates_are_counted_in_a_row_and_a_streak_stops_the_run():
    from rl_tiny import tiny

    tx = optax.sgd(0.1)
    state = TrainState.create(tiny("lm", 0), tx, jax.random.key(0))
    grads = jax.tree.map(jnp.ones_like, state.params)
    streaks = []
    for loss in (jnp.nan, jnp.inf, 1.0, jnp.nan):
        state, _ = apply_gradients(state, grads, tx, jnp.asarray(loss))
        streaks.append(int(state.nonfinite_streak))
    assert streaks == [1, 2, 0, 1] and int(state.skipped_updates) == 3
    check_nonfinite_streak(9, 10, step=12, unit="step")
    with pytest.raises(TrainingDiverged, match=r"10 updates in a row had a non-finite loss .* at step 12; the run "
                                               r"stops \(train.max_nonfinite=10\)"):
        check_nonfinite_streak(10, 10, step=12, unit="step")


def test_a_diverged_run_finishes_its_save_and_names_a_checkpoint_that_restores(tmp_path):
    """The save started during the non-finite streak is finished (no orbax temporary left, no
    traceback from its thread), the message names the right key and the newest checkpoint,
    and that checkpoint resumes."""
    from phase_runs import cli as run_cli

    args = ["sft", "configs/sft_tiny.yaml", "metrics.progress=false", "train.samples=0", "checkpoint.every=3",
            "train.steps=8", f"output_dir={tmp_path}"]
    diverged = run_cli(*args, "train.optimizer.learning_rate=1e30", "train.max_nonfinite=4")
    assert diverged.returncode == 1, diverged.stderr
    last = diverged.stderr.strip().splitlines()[-1]
    assert "Traceback" not in diverged.stderr and "train.max_nonfinite=4" in last, diverged.stderr
    assert f"The newest checkpoint, {tmp_path / 'checkpoints' / '3'}, restores (present: [3])" in last, last
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]  # no orbax temporary left
    resumed = run_cli(*args, "train.steps=4", "checkpoint.export_hf=false", "--resume")
    # it restores (the parameters of the last applied update: 1e30 times Adam's step, finite, so the
    # evaluation after it is not -- exit 1, said in one line)
    assert f"resumed from {tmp_path / 'checkpoints' / '3'} at step 3" in resumed.stdout + resumed.stderr, resumed.stderr
    assert "Traceback" not in resumed.stderr and resumed.returncode in (0, 1)


def test_a_resume_that_cannot_continue_names_what_changed_and_keeps_the_checkpoint(tmp_path, capsys):
    """A changed model shape names the config keys that changed (not "corrupt ... delete");
    a data file edited in place with the same row count is refused, not resumed silently.
    (The refusals through the CLI's entry point in this process.)"""
    from phase_runs import cli as run_cli, main_in_process

    data = tmp_path / "rows.jsonl"
    data.write_text(open("tests/data/sft.jsonl").read())
    args = ["sft", "configs/sft_tiny.yaml", "metrics.progress=false", "train.samples=0", "train.steps=4",
            "checkpoint.export_hf=false", f"data.source={data}", f"output_dir={tmp_path / 'run'}"]
    assert run_cli(*args).returncode == 0
    code, reshaped = main_in_process(capsys, *args, "model.init.hidden_size=32", "--resume")
    assert code == 2 and len(reshaped.strip().splitlines()) == 1, reshaped
    assert "differs from the one it was written with: model.init.hidden_size: 64 -> 32" in reshaped
    assert "Its files match their checksums" in reshaped and "Delete" not in reshaped
    same = run_cli(*args[:-1], "train.steps=5", args[-1], "--resume")  # the data as it was: resumes
    assert same.returncode == 0 and "resumed from" in same.stdout, same.stderr
    data.write_text(data.read_text().replace("moon", "noon"))  # the same rows, other text
    code, edited = main_in_process(capsys, *args, "train.steps=6", "--resume")
    assert code == 2 and "the data changed since the checkpoint" in edited, edited
    assert (tmp_path / "run" / "checkpoints" / "5").is_dir()
    data.write_text(data.read_text().replace("noon", "moon"))  # the data back, the checkpoint damaged:
    damaged = next(p for p in sorted((tmp_path / "run" / "checkpoints" / "5").rglob("*")) if p.is_file()
                   and p.stat().st_size > 64 and "ocdbt" in str(p))
    damaged.write_bytes(bytes([damaged.read_bytes()[0] ^ 1]) + damaged.read_bytes()[1:])
    code, corrupt = main_in_process(capsys, *args, "train.steps=7", "--resume")  # a changed key must not pass
    assert code == 2 and "is corrupt" in corrupt and "match their checksums" not in corrupt  # for the cause


def test_ctrl_c_while_a_run_starts_exits_130_without_a_traceback(tmp_path):
    """Ctrl-C as soon as the run has read its data -- while the step compiles, before the loop's
    own clean stop can take it: exit 130, one line (or the loop's stop), no traceback. (Earlier,
    inside module imports, a signal can land in a C++ extension, which no Python code catches.) The
    child takes SIGINT as a terminal would: a shell's background job, as CI runs the suite in,
    starts its children ignoring it."""
    import signal
    import subprocess
    import sys

    from phase_runs import ROOT, process_env

    # the command line's entry point, SIGINT as a terminal gives it (not through preexec_fn: no fork)
    as_from_a_terminal = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                          "sys.argv[0] = 'rlhf-jax'; runpy.run_module('rlhf_jax.cli', run_name='__main__')")
    # steps enough that a signal this process is too starved to send at once still finds the run going
    # (with the step compiled in the shared cache, the whole short run can end first)
    run = subprocess.Popen([sys.executable, "-c", as_from_a_terminal, "sft", "configs/sft_tiny.yaml",
                            "metrics.progress=false", "train.steps=100000", f"output_dir={tmp_path}"], cwd=ROOT,
                           env=process_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in run.stdout:
        seen.append(line)
        if "truncation policy" in line:  # the data read, the model built: the compile is next
            break
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=120)
    out = "".join(seen) + out
    assert run.returncode == 130 and "Traceback" not in err, err
    assert "interrupted (Ctrl-C)" in err or "stopped at step" in out, err  # the loop's own clean stop


def test_the_loop_takes_sigint_and_sigterm_but_leaves_an_ignored_signal_ignored():
    """A run started under ``nohup`` (SIGINT ignored) is not stopped by a stray SIGINT; SIGTERM,
    which a scheduler sends before it kills, still stops the loop cleanly."""
    import os
    import signal

    from rlhf_jax.phases.loop import StopRequests

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequests() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal is None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signal == "SIGTERM"
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with StopRequests() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal == "SIGINT"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back on leaving
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_final_evaluation_that_is_nan_exits_non_zero(capsys):
    assert cli._exit_code("sft", RunResult(10, None, {"loss": 0.5}, None)) == 0
    assert cli._exit_code("sft", RunResult(10, None, {"loss": math.nan, "perplexity": 3.0}, None)) == 1
    assert "the final evaluation is not finite (loss=nan)" in capsys.readouterr().err
    assert cli._exit_code("sft", RunResult(4, "SIGTERM", {}, None)) == 143


def _one_line_error(capsys, argv, message):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err


SFT_ARGS = ["configs/sft_tiny.yaml", "metrics.progress=false"]


@pytest.mark.parametrize("argv, message", [
    (["sft", "configs/nope.yaml"], "config file configs/nope.yaml does not exist"),
    (["sft", *SFT_ARGS, "data.source=./missing.jsonl"], "data file ./missing.jsonl does not exist"),
    (["sft", *SFT_ARGS, "tokenizer.name=./no_tokenizer"], "tokenizer ./no_tokenizer does not exist"),
    (["sft", *SFT_ARGS, "model.init=null", "model.path=./no_model"], "model.path=./no_model does not exist"),
    (["sft", *SFT_ARGS, "data.format=preference"], "sft trains on prompt_completion or alpaca or messages data"),
    (["sft", *SFT_ARGS, "train.optimizer.learning_rate=0"], "learning_rate=0.0 is out of range"),
    (["ppo", "configs/ppo_tiny.yaml", "reward.function=null", "reward.model=./no_rm"],
     "reward.model=./no_rm does not exist"),
    (["ppo", "configs/ppo_tiny.yaml", "critic.path=./no_critic"], "critic.path=./no_critic does not exist"),
    (["grpo", "configs/grpo_tiny.yaml", "ppo.entropy_coef=0.1"], "ppo.entropy_coef=0.1 has no effect in grpo"),
])
def test_user_errors_exit_2_with_one_line(capsys, tmp_path, argv, message):
    _one_line_error(capsys, [*argv, f"output_dir={tmp_path / 'run'}"], message)


def test_a_language_model_is_refused_in_every_scoring_role(capsys, tmp_path):
    """A checkpoint with no trained score head would score with a random one: refused by name
    as reward.model, reward.process_model and evaluate's judge.model."""
    from flax import nnx

    from rlhf_jax import models
    from rlhf_jax.data import byte_tokenizer
    from rlhf_jax.export import write_hf

    tokenizer = byte_tokenizer()
    config = models.config_from_hf({"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 16,
                                    "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "rms_norm_eps": 1e-5, "max_position_embeddings": 64})
    lm = tmp_path / "lm"
    write_hf(models.build_model(config, "lm", rngs=nnx.Rngs(0)), tokenizer, lm)
    message = f"={lm} has no trained score head"
    for argv, key in ((["ppo", "configs/ppo_tiny.yaml", "reward.function=null", f"reward.model={lm}"], "reward.model"),
                      (["ppo", "configs/ppo_tiny.yaml", f"reward.process_model={lm}"], "reward.process_model")):
        _one_line_error(capsys, [*argv, "metrics.progress=false", f"output_dir={tmp_path / key}"], key + message)


def test_bad_data_files_exit_2_with_one_line(capsys, tmp_path):
    not_gzip = tmp_path / "rows.jsonl.gz"
    not_gzip.write_text(json.dumps(ROW) + "\n")
    _one_line_error(capsys, ["sft", *SFT_ARGS, f"data.source={not_gzip}", f"output_dir={tmp_path / 'a'}"],
                    "not a valid gzip file")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(_jsonl([json.dumps(ROW).encode()] * 8 + ['{"prompt": "café", "completion": "c"}'.encode("latin-1")]))
    _one_line_error(capsys, ["sft", *SFT_ARGS, f"data.source={latin1}", f"output_dir={tmp_path / 'b'}"],
                    f"{latin1} row 9: not valid UTF-8")
    unwritable = tmp_path / "file"
    unwritable.write_text("")
    _one_line_error(capsys, ["sft", *SFT_ARGS, f"output_dir={unwritable / 'run'}"], "cannot be written")


def test_debug_shows_the_traceback_and_flags_may_precede_the_overrides():
    with pytest.raises(ConfigError):
        cli.main(["sft", "configs/nope.yaml", "--debug", "train.steps=3"])


def test_a_directory_that_is_not_a_checkpoint_exits_2_with_one_line(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["sft", *SFT_ARGS, "model.init=null", f"model.path={tmp_path / 'empty'}",
                             "tokenizer.name=builtin:bytes", f"output_dir={tmp_path / 'a'}"], "has no config.json")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "llama",\n')
    _one_line_error(capsys, ["sft", *SFT_ARGS, "model.init=null", f"model.path={tmp_path / 'bad'}",
                             "tokenizer.name=builtin:bytes", f"output_dir={tmp_path / 'b'}"], "is not valid JSON")


def test_unwritable_outputs_a_missing_extra_and_unknown_lora_targets_are_one_line(capsys, tmp_path):
    """A path that cannot be written (a file where a directory should be: root writes read-only
    directories, so the test blocks the path this way), wandb asked for but absent, and LoRA
    targets that name no layer: exit 2, one line naming the thing and the fix."""
    import importlib.util

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    _one_line_error(capsys, ["sft", *SFT_ARGS, f"output_dir={blocker / 'run'}"], f"{blocker / 'run'}")
    _one_line_error(capsys, ["sft", *SFT_ARGS, "model.lora={targets: [qproj]}", f"output_dir={tmp_path / 'l'}"],
                    "model.lora.targets: LoRA targets ['qproj'] match no linear layer; the model has: down_proj")
    if importlib.util.find_spec("wandb") is None:
        _one_line_error(capsys, ["sft", *SFT_ARGS, "metrics.wandb=true", f"output_dir={tmp_path / 'w'}"],
                        "metrics.wandb is on but wandb is not installed: pip install wandb")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "kind": "sft/train", "loss": 1.0}) + "\n")
    (run / "report").write_text("a file where the plots' folder goes")
    _one_line_error(capsys, ["report", str(run)], str(run / "report"))


@pytest.mark.parametrize("blocks, extra, names", [  # ulimit -f counts 1024-byte blocks
    (146, ["checkpoint.every=2", "train.steps=4"], "saving a checkpoint to"),  # a checkpoint's files
    (3, ["checkpoint.every=1000", "train.steps=30", "train.optimizer.warmup_steps=0"], ": File too large"),  # metrics
])
def test_a_full_disk_ends_in_one_line_without_a_hang(tmp_path, blocks, extra, names):
    """A file-size limit (``ulimit -f``) stands in for a full disk (a write past it fails, as
    ENOSPC does): the save or the metrics write that fails is one line on stderr -- no orbax
    thread tracebacks, no partial checkpoint left, and no run blocked forever on a dead
    TensorBoard writer thread. (The shell sets the limit: no fork of this multithreaded process.)"""
    import shlex
    import subprocess
    import sys

    from phase_runs import ROOT, process_env

    command = [sys.executable, "-m", "rlhf_jax.cli", "sft", "configs/sft_tiny.yaml", "metrics.progress=false",
               "train.samples=0", *extra, f"output_dir={tmp_path}"]
    run = subprocess.run(["bash", "-c", f"ulimit -f {blocks} && exec {shlex.join(command)}"], cwd=ROOT,
                         env=process_env(cache=False), capture_output=True, text=True, timeout=180)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert names in run.stderr and "Traceback" not in run.stderr
    assert not list((tmp_path / "checkpoints").glob("*orbax-checkpoint-tmp*"))


def test_the_loop_logs_the_speed_of_the_window_since_the_last_log(monkeypatch):
    """Three steps of 10, 20 and 30 tokens in 4 s, logged at the third: 15 tokens/s, 4/3 s each;
    then the window starts again."""
    import types

    from rlhf_jax.phases import loop

    clock = iter([100.0, 104.0, 104.0, 109.0, 109.0])
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    throughput = loop.Throughput("step")
    assert throughput(loop.StepInfo(10)) == {} and throughput(loop.StepInfo(20)) == {}
    assert throughput(loop.StepInfo(30, {"loss": 1.0})) == {"tokens_per_second": 15.0, "seconds_per_step": 4 / 3}
    assert throughput(loop.StepInfo(5, {})) == {"tokens_per_second": 1.0, "seconds_per_step": 5.0}

"""The online phases and the pipeline end to end through the CLI, each run in a fresh
process: exact resume mid-phase and between pipeline phases, the mesh, and bad rewards."""

import json
import shutil

import pytest

from phase_runs import ROOT, assert_bit_identical, checkpoint_arrays, cli, killed_and_resumed, main_in_process
from rlhf_jax.rl.scorer_prompts import read_prompt_format

QUIET = ["metrics.progress=false"]
SHORT = ["train.iterations=4", "checkpoint.every=100", "checkpoint.export_hf=false", *QUIET]


def _resumed_equals_straight(straight_dir, split_dir):
    """Checkpoint 4 bit for bit, and every iteration's train metrics the same numbers."""
    assert_bit_identical(checkpoint_arrays(straight_dir, 4), checkpoint_arrays(split_dir, 4))
    lines = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    train = lambda d: {r["step"]: (r["score_mean"], r.get("kl"), r.get("policy_loss"), r.get("sft_loss"))  # noqa: E731
                       for r in lines(d) if r["kind"].endswith("/train")}
    assert train(straight_dir) == train(split_dir)


@pytest.mark.slow
def test_ppo_stopped_by_itself_resumes_in_a_new_process_bit_identically(tmp_path):
    """PPO's KL-penalty form (its adaptive penalty coefficient lives in the train state too)
    stops itself at iteration 2 (``--stop-after``); a new process resumes it."""
    args = ["ppo", "configs/ppo_tiny.yaml", *SHORT, "ppo.surrogate=kl_penalty", "checkpoint.every=2"]
    straight = cli(*args, f"output_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr
    first = cli(*args, f"output_dir={tmp_path / 'split'}", "--stop-after", 2)
    assert first.returncode == 0 and "stopped at iteration 2 (stop_after)" in first.stdout, first.stderr
    second = cli(*args, f"output_dir={tmp_path / 'split'}", "--resume")
    assert second.returncode == 0 and "at step 2" in second.stdout, second.stderr
    _resumed_equals_straight(tmp_path / "straight", tmp_path / "split")


# grpo and raft sample 1 and 2 iterations behind the policy (the batches in flight drawn again)
KILLED = {"trpo": ("trpo_tiny", []), "grpo": ("grpo_tiny", ["rollout.max_policy_lag=1", "grpo.tis_cap=2.0"]),
          "raft": ("raft_tiny", ["rollout.max_policy_lag=2"])}


@pytest.mark.slow
def test_online_runs_killed_before_a_checkpoint_resume_in_a_new_process_bit_identically(tmp_path):
    """Each algorithm of :data:`KILLED` resumes what a run killed after its fourth iteration
    and before that checkpoint left: a copy of the straight run's files without checkpoint 4.
    With a policy lag the resumed run draws the batches in flight again from the parameters
    its state kept for them. One process runs the three straight, a new one resumes the three."""
    second = killed_and_resumed(tmp_path, {algorithm: [algorithm, f"configs/{config}.yaml", f"algorithm={algorithm}",
                                                       *SHORT, *extra, "checkpoint.every=2"]
                                           for algorithm, (config, extra) in KILLED.items()}, checkpoint=4)
    assert second.stdout.count("at step 2") == len(KILLED), second.stdout
    for algorithm in KILLED:
        _resumed_equals_straight(tmp_path / algorithm / "straight", tmp_path / algorithm / "split")


def reward_cli(tmp_path, function, *extra):
    return cli("ppo", "configs/ppo_tiny.yaml", f"output_dir={tmp_path}", f"reward.function={function}",
               "train.iterations=1", "checkpoint.export_hf=false", *QUIET, *extra,
               extra_env={"PYTHONPATH": str(ROOT / "tests")})


def test_a_reward_function_that_raises_names_the_sample_or_is_penalised_and_counted(tmp_path):
    failed = reward_cli(tmp_path / "a", "reward_functions:raises_on_third_sample")
    assert failed.returncode == 2
    assert "raised ValueError: cannot parse the answer for sample 2 (prompt '" in failed.stderr, failed.stderr
    assert "reward.on_error: penalty" in failed.stderr
    nan = reward_cli(tmp_path / "b", "reward_functions:nan_for_everything", "reward.on_error=penalty",
                     "reward.penalty=-2", "reward.monitor=reward_functions:nan_for_everything")
    assert nan.returncode == 0, nan.stderr
    record = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["penalised"] == 8 and record["score_mean"] == -2.0  # all 8 samples of the iteration
    # the monitor fails the same way: scored the penalty, and counted apart from the reward's
    assert record["monitor_penalised"] == 8 and record["monitor_score_mean"] == -2.0


def test_bad_online_configs_are_named(tmp_path, capsys):
    code, err = main_in_process(capsys, "ppo", "configs/grpo_tiny.yaml", f"output_dir={tmp_path}")
    assert code == 2 and "the config says 'grpo' but the command is 'ppo'" in err
    code, err = main_in_process(capsys, "grpo", "configs/grpo_tiny.yaml", f"output_dir={tmp_path}", "rollout.samples=1")
    assert code == 2 and "set rollout.samples >= 2" in err
    code, err = main_in_process(capsys, "ppo", "configs/ppo_tiny.yaml", f"output_dir={tmp_path}",
                                "reward.function=no_such_module:f")
    assert code == 2 and "cannot load reward function 'no_such_module:f'" in err
    code, err = main_in_process(capsys, "grpo", "configs/grpo_tiny.yaml", f"output_dir={tmp_path}",
                                "rollout.max_policy_lag=1")
    assert code == 2 and "set grpo.tis_cap (e.g. 2.0)" in err
    code, err = main_in_process(capsys, "trpo", "configs/trpo_tiny.yaml", f"output_dir={tmp_path}",
                                "rollout.max_policy_lag=1")
    assert code == 2 and "rollout.max_policy_lag=1 has no effect in trpo" in err
    code, err = main_in_process(capsys, "grpo", "configs/grpo_tiny.yaml", f"output_dir={tmp_path}",
                                "rollout.max_policy_lag=10", "grpo.tis_cap=2")
    assert code == 2 and "rollout.max_policy_lag=10 is not below train.iterations=10" in err
    # a prompt of up to data.max_length=32 tokens and 15 written new ones on 4-token pages: 12 pages
    code, err = main_in_process(capsys, "grpo", "configs/grpo_tiny.yaml", f"output_dir={tmp_path}",
                                "rollout.engine=continuous", "rollout.page_size=4", "rollout.cache_pages=11")
    assert code == 2 and "rollout.cache_pages=11 cannot hold the longest request" in err and "raise it to 12" in err


def test_a_policy_lag_trains_on_batches_the_policy_of_k_iterations_ago_sampled(tmp_path):
    """``rollout.max_policy_lag: 1``: iteration i trains on what the policy of iteration
    max(0, i - 1) sampled -- the trainer's log-probs equal the sampler's at iteration 0 (the
    same policy) and part from them from iteration 1 on (one update between them); the lag of
    every iteration logged. (That the batch drawn ahead is the one a resumed run draws again
    from the kept parameters: the resume test above.)"""
    run = cli("grpo", "configs/grpo_tiny.yaml", f"output_dir={tmp_path}", "train.iterations=3",
              "checkpoint.export_hf=false", "train.eval_prompts=1", "grpo.tis_cap=2.0", "rollout.max_policy_lag=1",
              *QUIET)
    assert run.returncode == 0, run.stderr
    train = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "grpo/train"]
    assert [r["policy_lag"] for r in train] == [0, 1, 1]
    assert train[0]["logprob_gap_max"] < 1e-5 < 1e-2 < min(r["logprob_gap_mean"] for r in train[1:])


@pytest.mark.slow
def test_the_built_in_pipeline_beats_sft_on_the_gold_reward_and_resumes_between_phases_exactly(tmp_path):
    straight = cli("pipeline", f"output_dir={tmp_path / 'straight'}", *QUIET, timeout=900, fast_compile=False)
    assert straight.returncode == 0, straight.stderr
    # the reward model records that it trained on the prompts' text (the byte tokenizer has no template),
    # and PPO's reward reads them so
    assert read_prompt_format(tmp_path / "straight" / "rm" / "hf") == "text"
    assert "scores the data's prompt text as written, as its training did" in straight.stdout
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    sft, ppo = summary["policies"]["sft"], summary["policies"]["ppo"]
    assert 0.15 < sft["gold_reward"] < 0.35  # demonstrations: 2 vowels of 8 letters
    assert ppo["gold_reward"] > sft["gold_reward"] + 0.2 and ppo["eos_rate"] > 0.9
    assert 0 < ppo["kl_to_sft"] < 30
    assert "ppo - sft gold reward" in straight.stdout
    report = (tmp_path / "straight" / "report.md").read_text()  # the report, its plots non-empty images
    import matplotlib.image

    plots = [tmp_path / "straight" / name for name in ("report/ppo_rewards.png", "report/rm_accuracy.png")]
    assert all(f"]({plot.parent.name}/{plot.name})" in report for plot in plots)
    for plot in plots:
        pixels = matplotlib.image.imread(plot)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0.01, plot
    assert f"| ppo | {ppo['gold_reward']:.3f} |" in report and "**sft** (gold" in report
    # the straight run's files as a run stopped after rm left them; resumed in a new process
    shutil.copytree(tmp_path / "straight", tmp_path / "split",
                    ignore=shutil.ignore_patterns("ppo", "summary.json", "report*"))
    second = cli("pipeline", f"output_dir={tmp_path / 'split'}", *QUIET, "--resume", timeout=900, fast_compile=False)
    assert second.returncode == 0, second.stderr
    assert "sft finished in an earlier run" in second.stdout and "rm finished in an earlier run" in second.stdout
    assert_bit_identical(checkpoint_arrays(tmp_path / "straight" / "ppo", 40),
                         checkpoint_arrays(tmp_path / "split" / "ppo", 40))
    assert json.loads((tmp_path / "split" / "summary.json").read_text()) == summary


def test_a_pipeline_stops_after_the_phase_it_is_told_to(tmp_path):
    run = cli("pipeline", f"output_dir={tmp_path}", *QUIET, "phases=[sft, rm]", "sft.train.steps=2",
              "sft.train.optimizer.warmup_steps=0",
              "--stop-after-phase", "sft")
    assert run.returncode == 0 and "stopped after phase sft" in run.stdout, run.stderr
    assert (tmp_path / "sft" / "phase_done.json").exists() and not (tmp_path / "rm").exists()


def test_a_monitor_is_scored_and_logged_but_not_optimised(tmp_path):
    same = reward_cli(tmp_path, "builtin:letters", "reward.monitor=builtin:letters")  # the same function twice
    assert same.returncode == 0, same.stderr
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["monitor_score_mean"] == r["score_mean"] for r in rows)  # train, eval

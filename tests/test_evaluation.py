"""``rlhf-jax evaluate`` and ``rlhf-jax report``: the statistics against scipy and by hand; a
head-to-head on tiny models (identical policies tie everywhere with zero KL -- both answer with
the same random numbers -- and swapping the two mirrors the win rate); the report's plots and
tables come from the run's own files."""

import json
import math

import numpy as np
import pytest
import scipy.stats
from flax import nnx

from rlhf_jax import models
from rlhf_jax.config import ConfigError, from_dict
from rlhf_jax.data import BUILTIN_BYTES, load_tokenizer
from rlhf_jax.evaluation import kl_estimate, matched_length_win_rate, wilson_interval, win_rate
from rlhf_jax.evaluation.compare import EvaluateConfig, run_evaluate
from rlhf_jax.evaluation.report import write_report
from rlhf_jax.export import write_hf

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py


@pytest.mark.parametrize("successes, n", [(7, 10), (0, 5), (5, 5), (31, 64)])
def test_wilson_interval_equals_scipy(successes, n):
    want = scipy.stats.binomtest(successes, n).proportion_ci(method="wilson")
    assert wilson_interval(successes, n) == pytest.approx((want.low, want.high), abs=1e-7)


def test_win_rate_counts_ties_half_and_matches_lengths():
    policy, baseline = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 2.0, 5.0, 1.0])
    result = win_rate(policy, baseline)  # wins at 0 and 3, a tie at 1: (2 + 0.5) / 4
    assert result.rate == 0.625 and result.n == 4
    assert (result.low, result.high) == pytest.approx(wilson_interval(2.5, 4))
    # within 20% of the longer: pairs 0 (10 vs 11) and 2 (10 vs 10); a win and a loss
    matched = matched_length_win_rate(policy, baseline, [10, 10, 10, 30], [11, 20, 10, 10], 0.2)
    assert (matched.rate, matched.n) == (0.5, 2)


def test_kl_estimate_sums_tokens_per_answer():
    policy = np.array([[-1.0, -2.0, 0.0], [-1.0, 0.0, 0.0]])
    baseline = np.array([[-2.0, -2.0, -5.0], [-0.5, 0.0, 0.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    mean, stderr = kl_estimate(policy, baseline, mask)  # per answer: 1 + 0 = 1 and -0.5
    assert mean == pytest.approx(0.25) and stderr == pytest.approx(np.std([1.0, -0.5], ddof=1) / math.sqrt(2))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny byte-vocabulary Llama policies (different seeds) with their tokenizer, and 12
    prompts."""
    root = tmp_path_factory.mktemp("evaluate")
    tokenizer = load_tokenizer(BUILTIN_BYTES)
    config = models.config_from_hf({"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "max_position_embeddings": 128,
                                    "rms_norm_eps": 1e-5})
    for name, seed in (("a", 0), ("b", 1)):
        write_hf(models.build_model(config, "lm", rngs=nnx.Rngs(seed)), tokenizer, root / name)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say something about {word}"}) + "\n"
                               for word in "apples rivers snow music ships maps tea clocks owls bread rain glass".split()))
    return root


def evaluate(root, policy, baseline, name, **overrides):
    config = from_dict(EvaluateConfig, {
        "output_dir": str(root / name), "policy": {"path": str(root / policy)}, "baseline": {"path": str(root / baseline)},
        "judge": {"function": "builtin:letters"}, "data": {"source": str(root / "prompts.jsonl"), "format": "prompt",
                                                           "max_length": 32},
        "prompts": 12, "batch_size": 8, "max_new_tokens": 12, "temperature": 1.0} | overrides)
    metrics = run_evaluate(config).eval
    pairs = [json.loads(line) for line in (root / name / "evaluation_samples.jsonl").read_text().splitlines()]
    return metrics, pairs


def test_identical_policies_tie_everywhere_with_zero_kl(checkpoints):
    metrics, pairs = evaluate(checkpoints, "a", "a", "same")
    assert len(pairs) == 12 and all(p["completion_policy"] == p["completion_baseline"] for p in pairs)
    assert metrics["win_rate"] == 0.5 and metrics["matched_length_win_rate_n"] == 12
    assert abs(metrics["kl"]) < 1e-5 and metrics["length_policy"] == metrics["length_baseline"]


def test_swapping_the_policies_mirrors_the_win_rate(checkpoints):
    ab, pairs = evaluate(checkpoints, "a", "b", "ab")
    ba, _ = evaluate(checkpoints, "b", "a", "ba")
    assert ab["win_rate"] + ba["win_rate"] == pytest.approx(1.0)
    assert ab["kl"] > 0.1 and ba["kl"] > 0.1  # KL of two different models, each on its own answers
    recount = win_rate([p["score_policy"] for p in pairs], [p["score_baseline"] for p in pairs])
    assert ab["win_rate"] == recount.rate and ab["win_rate_low"] == recount.low
    assert ab["length_policy"] == pytest.approx(np.mean([p["length_policy"] for p in pairs]))
    saved = json.loads((checkpoints / "ab" / "evaluation.json").read_text())["metrics"]
    assert saved["win_rate"] == ab["win_rate"]


def test_a_judge_is_required_and_shaping_is_refused(checkpoints):
    with pytest.raises(ValueError, match="judge: give judge.model"):
        evaluate(checkpoints, "a", "b", "none", judge={})
    with pytest.raises(ValueError, match="judge.whiten shapes training rewards"):
        evaluate(checkpoints, "a", "b", "whiten", judge={"function": "builtin:letters", "whiten": True})


def test_report_plots_the_curves_and_shows_before_and_after(checkpoints, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "kind": "dpo/train", "loss": 0.7 - 0.01 * s, "reward_accuracy": 0.5 + 0.02 * s}
             for s in range(1, 6)] + [{"step": 5, "kind": "dpo/eval", "loss": 0.61, "reward_accuracy": 0.625}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    evaluate(checkpoints, "a", "b", "ab_report")
    (run / "evaluation").symlink_to(checkpoints / "ab_report")
    report = write_report(run).read_text()
    assert "![dpo/train](report/dpo_train.png)" in report
    assert (run / "report" / "dpo_train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| reward_accuracy | 0.625 | 5 |" in report  # the final evaluation, from the last eval line
    first = json.loads((checkpoints / "ab_report" / "evaluation_samples.jsonl").read_text().splitlines()[0])
    assert f"**Before** (judge score {first['score_baseline']:.3f})" in report
    assert "> " + first["completion_policy"].strip().splitlines()[0] in report


def test_a_run_with_a_gold_monitor_reports_gold_and_proxy_against_the_kl(tmp_path):
    """Any online run that logged a gold reward (``reward.monitor``) beside its proxy gets the
    over-optimisation curve (Gao et al., 2022): gold rising then falling as the KL grows, the
    proxy rising throughout; the peak and the end read off the 5-iteration moving averages."""
    gold = [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.4, 0.3, 0.2, 0.1]
    lines = [{"step": s, "kind": "grpo/train", "kl": 0.5 * s, "score_mean": 0.1 * s, "monitor_score_mean": g}
             for s, g in enumerate(gold, start=1)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = write_report(tmp_path).read_text()
    # moving averages of 5: gold 0.30, 0.38, 0.42, 0.42, 0.38, 0.30 (peak at the third: KL mean of steps 3-7 = 2.5)
    assert ("The gold reward peaked at 0.420 at KL 2.5 nats (proxy 0.500) and ended at 0.300 at KL 4.0 (proxy 0.800)"
            in report), report
    assert (tmp_path / "report" / "overoptimisation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_directory_without_metrics_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="metrics.jsonl does not exist"):
        write_report(tmp_path)


def test_one_prompt_leaves_undefined_numbers_null_not_nan(checkpoints):
    metrics, _ = evaluate(checkpoints, "a", "b", "one", prompts=1)
    assert metrics["kl_stderr"] is None and "NaN" not in (checkpoints / "one" / "evaluation.json").read_text()
    with pytest.raises(ValueError, match="temperature"):
        evaluate(checkpoints, "a", "b", "cold", temperature=-1.0)


@pytest.mark.parametrize("line", ["5", '{"step": "x", "kind": "sft/train", "loss": 1.0}'])
def test_report_refuses_a_line_that_is_not_a_metrics_row(tmp_path, line):
    (tmp_path / "metrics.jsonl").write_text(line + "\n")
    with pytest.raises(ConfigError, match="line 1 is not a metrics row"):
        write_report(tmp_path)


def test_a_killed_runs_cut_last_line_is_left_out_and_a_resume_logs_no_step_twice(tmp_path):
    """kill -9 leaves rows past the last checkpoint and a half-written line: the report reads
    the rest, and the resume first removes what it will log again."""
    from rlhf_jax.evaluation.report import read_metrics
    from rlhf_jax.metrics import drop_rows_after, read_rows

    rows = [{"step": s, "kind": "sft/train", "loss": 1.0 / s} for s in (1, 2, 3, 4)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "kind": "sft/tr')
    assert read_rows(path) == (rows, True)
    assert read_metrics(path)["sft/train"]["loss"] == [(s, 1.0 / s) for s in (1, 2, 3, 4)]
    assert drop_rows_after(tmp_path, 2) == 3  # steps 3 and 4, and the cut line
    assert read_rows(path) == (rows[:2], False) and path.read_text().endswith("\n")
    assert drop_rows_after(tmp_path, 2) == 0


def test_the_judge_is_measured_against_held_out_labels_before_its_verdict_is_read(checkpoints, tmp_path):
    """The letters judge scores the share of a/e: on pairs whose chosen answer has more of them
    it agrees 12 of 12 times (Wilson [0.757, 1]: better than chance); on pairs labelled the
    other way round for half of them it agrees 6 of 12 (not shown better than chance), and the
    verdict, the JSON and the report say so."""
    from rlhf_jax.evaluation.judge_validity import NOT_SHOWN

    words = "apples rivers snow music ships maps tea clocks owls bread rain glass".split()
    aligned = [{"prompt": f"say something about {w}", "chosen": "aeae", "rejected": "hhhh"} for w in words]
    mixed = [row if i % 2 else row | {"chosen": row["rejected"], "rejected": row["chosen"]}
             for i, row in enumerate(aligned)]
    for name, rows, agreement in (("aligned", aligned, 1.0), ("mixed", mixed, 0.5)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        validation = {"data": {"source": str(path), "format": "preference", "max_length": 32}, "batch_size": 5}
        metrics, _ = evaluate(checkpoints, "a", "b", f"valid_{name}", judge_validation=validation)
        assert metrics["judge_agreement"] == agreement and metrics["judge_agreement_n"] == 12
        low, high = wilson_interval(12 * agreement, 12)
        assert (metrics["judge_agreement_low"], metrics["judge_agreement_high"]) == pytest.approx((low, high))
        assert metrics["judge_better_than_chance"] is (name == "aligned")
        saved = json.loads((checkpoints / f"valid_{name}" / "evaluation.json").read_text())["metrics"]
        assert saved["judge_better_than_chance"] is (name == "aligned")
    run = checkpoints / "valid_mixed"
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "kind": "sft/train", "loss": 1.0}) + "\n")
    (run / "evaluation").mkdir()
    for file in ("evaluation.json", "evaluation_samples.jsonl"):
        (run / "evaluation" / file).write_text((run / file).read_text())
    assert NOT_SHOWN in write_report(run).read_text()


def test_the_win_rate_among_answers_that_ended_before_the_cap():
    from rlhf_jax.evaluation.compare import summarise

    values = {"score_policy": np.array([1.0, 0.0, 2.0, 3.0]), "score_baseline": np.array([0.0, 1.0, 1.0, 5.0]),
              "length_policy": np.ones(4), "length_baseline": np.ones(4),
              "stopped_policy": np.array([1, 1, 1, 0]), "stopped_baseline": np.array([1, 0, 1, 1]),
              "logp_policy": np.zeros((4, 2)), "logp_baseline": np.zeros((4, 2)), "completion_mask": np.ones((4, 2))}
    metrics = summarise(values, 0.2)  # both stopped: pairs 0 and 2, two wins
    assert (metrics["stopped_win_rate"], metrics["stopped_win_rate_n"]) == (1.0, 2)
    assert metrics["win_rate"] == 0.5


def test_a_run_with_periodic_evaluation_evaluates_at_step_0_too(tmp_path):
    """Its own before and after: the held-out numbers at step 0 (the starting model) and on,
    each also shown on the console."""
    from phase_runs import cli

    run = cli("sft", "configs/sft_tiny.yaml", "train.steps=4", "train.eval_every=2", "train.samples=0",
              "train.optimizer.warmup_steps=0", "metrics.progress=false", "checkpoint.export_hf=false",
              f"output_dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluated = [(row["step"], row["loss"]) for row in rows if row["kind"] == "sft/eval"]
    assert [step for step, _ in evaluated] == [0, 2, 4] and evaluated[0][1] > evaluated[-1][1]
    assert "held-out at step 0: loss" in run.stdout and "held-out at step 2: loss" in run.stdout


def test_several_sampling_seeds_pool_the_answers_and_report_the_spread(checkpoints):
    from rlhf_jax import cli

    metrics, pairs = evaluate(checkpoints, "a", "b", "seeds", seeds=[0, 1])
    assert metrics["win_rate_n"] == 24 and sorted({p["seed"] for p in pairs}) == [0, 1]
    per_seed = [win_rate([p["score_policy"] for p in pairs if p["seed"] == s],
                         [p["score_baseline"] for p in pairs if p["seed"] == s]).rate for s in (0, 1)]
    assert metrics["win_rate_per_seed"] == per_seed
    assert metrics["win_rate_seed_std"] == pytest.approx(np.std(per_seed, ddof=1))
    single, _ = evaluate(checkpoints, "a", "b", "seed0")
    assert single["win_rate"] == per_seed[0] and "win_rate_per_seed" not in single  # seed 0 alone: the same draws
    args = cli.build_parser().parse_args(["evaluate", "cfg.yaml", "--seeds", "0,1,2"])
    assert args.seeds == "0,1,2"


def test_accuracy_and_its_paired_gain_by_hand():
    from rlhf_jax.evaluation.stats import accuracy_gain

    policy, baseline = np.array([1, 1, 1, 0, 1, 0.0]), np.array([0, 1, 0, 0, 0, 1.0])
    numbers = accuracy_gain(policy, baseline)
    assert numbers["accuracy_policy"] == pytest.approx(4 / 6) and numbers["accuracy_baseline"] == pytest.approx(2 / 6)
    assert (numbers["accuracy_policy_low"], numbers["accuracy_policy_high"]) == pytest.approx(wilson_interval(4, 6))
    # d = policy - baseline = 1, 0, 1, 0, 1, -1: mean 1/3, sample sd sqrt(((2/3)^2 * 3 + 2 (1/3)^2 + (4/3)^2) / 5)
    spread = 1.959964 * math.sqrt((3 * (2 / 3) ** 2 + 2 * (1 / 3) ** 2 + (4 / 3) ** 2) / 5) / math.sqrt(6)
    assert numbers["accuracy_gain"] == pytest.approx(1 / 3)
    assert (numbers["accuracy_gain_low"], numbers["accuracy_gain_high"]) == pytest.approx((1 / 3 - spread, 1 / 3 + spread))
    with pytest.raises(ValueError, match="0/1 scores"):
        accuracy_gain(np.array([0.5]), np.array([1.0]))


def test_a_checker_judge_reports_both_accuracies_and_the_gain_per_seed(checkpoints):
    metrics, pairs = evaluate(checkpoints, "a", "b", "checker", judge={"function": "reward_functions:has_vowel"},
                              seeds=[0, 1])
    policy = np.array([p["score_policy"] for p in pairs])
    baseline = np.array([p["score_baseline"] for p in pairs])
    assert set(policy) | set(baseline) <= {0.0, 1.0}
    assert metrics["accuracy_policy"] == pytest.approx(policy.mean())
    assert metrics["accuracy_gain"] == pytest.approx(policy.mean() - baseline.mean())
    seeds = np.array([p["seed"] for p in pairs])
    assert metrics["accuracy_gain_per_seed"] == pytest.approx(
        [policy[seeds == s].mean() - baseline[seeds == s].mean() for s in (0, 1)])
    assert metrics["judge_is_function"] and metrics["judge_agreement"] is None
    graded, _ = evaluate(checkpoints, "a", "b", "graded")  # vowel shares are not 0/1: no accuracy
    assert "accuracy_gain" not in graded

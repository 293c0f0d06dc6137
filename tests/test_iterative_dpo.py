"""Iterative DPO end to end through the CLI: a run stopped in the middle of its second round
and resumed in a new process ends bit for bit where the uninterrupted run does (the first
round skipped, its pairs reused); and its config mistakes are named before anything runs."""

import json
import re

import pytest

from phase_runs import assert_bit_identical, checkpoint_arrays, cli
from rlhf_jax import config
from rlhf_jax.config import ConfigError
from rlhf_jax.phases import PHASES, SFTConfig, run_phase
from rlhf_jax.phases.iterative_dpo import IterativeDPOConfig, check_config

ROUNDS = ["rounds=2", "round.train.steps=4", "round.checkpoint.every=2", "metrics.progress=false",
          "round.train.samples=0", "rollout.max_new_tokens=8"]


@pytest.mark.slow
def test_stopped_mid_round_and_resumed_in_a_new_process_is_bit_identical(tmp_path):
    sft_config = config.load(SFTConfig, "configs/sft_tiny.yaml", [f"output_dir={tmp_path / 'sft'}",
                                                                   "metrics.progress=false", "train.samples=0"])
    assert run_phase(PHASES["sft"], sft_config).stopped_by is None  # the starting policy, in this process
    args = ["iterative_dpo", "configs/iterative_dpo_tiny.yaml", f"model.path={tmp_path / 'sft' / 'hf'}", *ROUNDS]
    straight = cli(*args, f"output_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr
    # each round reports its prompt cuts, and its pairs carry the ids the policy saw and produced
    assert re.search(r"iterative dpo: round 1 prompts: .* \d+ prompts and \d+ responses truncated", straight.stdout)
    pair = json.loads((tmp_path / "straight" / "round_1" / "pairs.jsonl").read_text().splitlines()[0])
    assert pair["token_ids"]["prompt"] and pair["token_ids"]["chosen"] != pair["token_ids"]["rejected"]
    first = cli(*args, f"output_dir={tmp_path / 'split'}", "--stop-after", 6)  # round 2, step 2 of 4
    assert first.returncode == 0 and "stopped at step 2 (stop_after)" in first.stdout, first.stdout + first.stderr
    second = cli(*args, f"output_dir={tmp_path / 'split'}", "--resume")
    assert second.returncode == 0, second.stderr
    assert "round 1 finished in an earlier run" in second.stdout
    for d in ("straight", "split"):
        assert (tmp_path / d / "hf").resolve() == (tmp_path / d / "round_2" / "dpo" / "hf").resolve()
    for k in (1, 2):
        pairs = [(tmp_path / d / f"round_{k}" / "pairs.jsonl").read_text() for d in ("straight", "split")]
        assert pairs[0] == pairs[1] and pairs[0]
    assert_bit_identical(checkpoint_arrays(tmp_path / "straight" / "round_2" / "dpo", 4),
                         checkpoint_arrays(tmp_path / "split" / "round_2" / "dpo", 4))
    rounds = [[json.loads(line) for line in (tmp_path / d / "rounds.jsonl").read_text().splitlines()]
              for d in ("straight", "split")]
    assert rounds[0] == rounds[1] and [r["round"] for r in rounds[0]] == [1, 2]


@pytest.mark.parametrize("override, message", [
    ("model.path=null", "iterative DPO starts from a trained policy"),
    ("rollout.samples=1", "a pair compares two samples"),
    ("reward.whiten=true", "reward.whiten=True has no effect in iterative_dpo"),
    ("rollout.dynamic_sampling=true", "samples each round's prompts once"),
    ("rollout.environment=builtin:calculator", "single-turn completions"),
    ("round.dpo.bta=0.2", "unknown config key 'round.dpo.bta'"),
    ("round.data.format=prompt_completion", "round.data.format='prompt_completion': dpo trains on"),
])
def test_config_mistakes_are_named(override, message):
    loaded = config.load(IterativeDPOConfig, "configs/iterative_dpo_tiny.yaml", [override])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_config(loaded, check_paths=False)

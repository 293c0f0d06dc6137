"""DAPO's dynamic sampling (``rl.dynamic_sampling``): groups whose scores are all equal are
dropped and the batch refilled from further draws, rows carried whole across draws of
different widths; when the rounds run out the batch is completed with dropped groups, counted."""

import numpy as np
import pytest

from rlhf_jax.config import ConfigError
from rlhf_jax.rl.dynamic_sampling import Draw, dynamic_sample, informative_groups
from rlhf_jax.rollout import Rollout

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py

PAD = 0


def fake_draw(scores_B, prompt_width, completion_width, tag):
    """A draw of len(scores_B) rows; row i's tokens all equal tag * 100 + i (so a row can be traced)."""
    B = len(scores_B)
    token = (tag * 100 + np.arange(B))[:, None]
    completion_mask = np.ones((B, completion_width), np.int32)
    completion_mask[:, -1] = 0  # the last position is padding in every row
    rollout = Rollout(prompt_ids_BP=np.broadcast_to(token, (B, prompt_width)).astype(np.int32),
                      prompt_mask_BP=np.ones((B, prompt_width), np.int32),
                      completion_ids_BN=np.where(completion_mask, token, PAD).astype(np.int32),
                      completion_mask_BN=completion_mask,
                      logprobs_BN=-completion_mask.astype(np.float32), stopped_B=np.ones(B, bool))
    rows = [f"{tag}:{i}" for i in range(B)]
    return Draw(rollout, rows, rows, np.asarray(scores_B, np.float32), penalised=tag)


def test_informative_groups_are_those_with_unequal_scores():
    np.testing.assert_array_equal(informative_groups(np.asarray([1, 1, 0, 1, 0.5, 0.5]), 2), [False, True, False])
    with pytest.raises(ValueError, match="groups of 4"):
        informative_groups(np.zeros(6), 4)


def test_dropped_groups_are_refilled_from_the_next_draw_rows_whole():
    # round 0: groups [1, 1] (dropped), [0, 1] (kept); round 1 (wider prompts and completions):
    # [0, 0] (dropped), [1, 0] (kept) -> two informative groups, no third round
    draws = [fake_draw([1, 1, 0, 1], 2, 3, tag=1), fake_draw([0, 0, 1, 0], 4, 5, tag=2), None]
    batch, counts = dynamic_sample(lambda r: draws[r], groups=2, group_size=2, max_rounds=3, pad_token_id=PAD)
    assert counts == {"sampling_rounds": 2, "groups_dropped": 2, "uninformative_groups_kept": 0}
    assert batch.texts == ["1:2", "1:3", "2:2", "2:3"] and batch.completions == batch.texts
    np.testing.assert_array_equal(batch.scores_B, [0, 1, 1, 0])
    assert batch.penalised == 1 + 2  # both draws' penalised samples count
    r = batch.rollout
    assert r.prompt_ids_BP.shape == (4, 4) and r.completion_ids_BN.shape == (4, 5)
    # the first draw's rows: prompts left-padded by 2, completions right-padded by 2, masks 0 there
    np.testing.assert_array_equal(r.prompt_ids_BP[0], [PAD, PAD, 102, 102])
    np.testing.assert_array_equal(r.prompt_mask_BP[:, :2], [[0, 0], [0, 0], [1, 1], [1, 1]])
    np.testing.assert_array_equal(r.completion_ids_BN[1], [103, 103, PAD, PAD, PAD])
    np.testing.assert_array_equal(r.completion_mask_BN.sum(1), [2, 2, 4, 4])
    np.testing.assert_array_equal(r.logprobs_BN.sum(1), [-2, -2, -4, -4])
    np.testing.assert_array_equal(r.completion_ids_BN[3], [203] * 4 + [PAD])


def test_when_the_rounds_run_out_dropped_groups_complete_the_batch_and_are_counted():
    draws = [fake_draw([1, 1, 0, 1], 2, 3, tag=1), fake_draw([0, 0, 1, 1], 2, 3, tag=2)]
    batch, counts = dynamic_sample(lambda r: draws[r], groups=2, group_size=2, max_rounds=2, pad_token_id=PAD)
    # informative: only round 0's group 1; completed by the first dropped group (round 0's group 0)
    assert counts == {"sampling_rounds": 2, "groups_dropped": 2, "uninformative_groups_kept": 1}
    assert batch.texts == ["1:0", "1:1", "1:2", "1:3"]
    with pytest.raises(ValueError, match="max_rounds"):
        dynamic_sample(lambda r: draws[r], groups=2, group_size=2, max_rounds=0, pad_token_id=PAD)


def test_dynamic_sampling_is_refused_where_no_group_is_compared():
    from rlhf_jax import config
    from rlhf_jax.phases.online import check_config
    from rlhf_jax.phases.online_config import OnlineConfig

    base = ["data.source=tests/data/sft.jsonl", "data.format=prompt_completion", "reward.function=builtin:letters"]
    loaded = config.load(OnlineConfig, None, [*base, "algorithm=ppo", "rollout.dynamic_sampling=true"])
    with pytest.raises(ConfigError, match="dynamic sampling drops groups"):
        check_config(loaded, check_paths=False)
    loaded = config.load(OnlineConfig, None, [*base, "algorithm=grpo", "rollout.samples=4",
                                              "rollout.max_sampling_rounds=5"])
    with pytest.raises(ConfigError, match="rollout.dynamic_sampling: true"):
        check_config(loaded, check_paths=False)


def test_an_online_run_with_dynamic_sampling_and_an_environment_trains_only_informative_groups(tmp_path):
    """The glue of the online job: draws of several rounds, multi-turn episodes (the calculator;
    the untrained policy rarely calls it) and placement, through two GRPO iterations in this
    process; every group trained on has unequal scores unless the rounds ran out (counted)."""
    import json

    from rlhf_jax import config
    from rlhf_jax.phases.online import run_online
    from rlhf_jax.phases.online_config import OnlineConfig

    loaded = config.load(OnlineConfig, "configs/grpo_tiny.yaml", [
        f"output_dir={tmp_path}", "train.iterations=2", "checkpoint.export_hf=false", "metrics.progress=false",
        "rollout.dynamic_sampling=true", "rollout.max_sampling_rounds=2", "rollout.environment=builtin:calculator",
        "rollout.max_turns=2", "reward.function=builtin:letters", "rollout.prompts=8"])  # 8 test devices
    assert run_online(loaded).stopped_by is None
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "grpo/train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert 1 <= r["sampling_rounds"] <= 2 and r["turns"] >= 1 and "tool_calls" in r
        if r["uninformative_groups_kept"] == 0:
            assert r["zero_std_groups"] == 0.0
        else:
            assert r["zero_std_groups"] == r["uninformative_groups_kept"] / loaded.rollout.prompts
    assert "turns" in next(r for r in records if r["kind"] == "grpo/eval")

"""The built-in offline job: PPO must beat SFT on the gold reward with a bounded KL."""

import dataclasses
import json

from rlhf_jax import cli, demo


def test_ppo_improves_the_gold_reward_and_the_controller_holds_kl(tmp_path):
    config = dataclasses.replace(demo.DemoConfig(), ppo_iterations=40, seed=1)
    lines = []
    summary = demo.run(config, log=lines.append)
    assert summary["rm_gold_agreement"] > 0.8
    assert summary["ppo"]["gold_reward"] > summary["sft"]["gold_reward"] + 0.15
    # The adaptive controller keeps KL within a factor of ~2 of its target, not 10x beyond it.
    assert 0.5 * config.kl_target < summary["ppo"]["kl_to_sft"] < 2.0 * config.kl_target
    assert any(line.startswith("[ppo]") for line in lines)


def test_cli_demo_writes_its_summary(tmp_path):
    out = tmp_path / "summary.json"
    assert cli.main(["demo", "--summary-json", str(out), "ppo_iterations=2"]) == 0
    assert cli.main(["demo", "ppo_iteration=2"]) == 2
    summary = json.loads(out.read_text())
    assert summary["sft"]["kl_to_sft"] == 0.0

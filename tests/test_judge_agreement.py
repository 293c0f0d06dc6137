"""``rlhf-jax judge``: the agreement statistics by hand, the command judging the held-out pairs
of a file in both orders (each pair's verdicts equal the judge's own), and its one-line errors."""

import json

import numpy as np
import pytest

from rlhf_jax import cli
from rlhf_jax.config import load
from rlhf_jax.data import DataConfig, DataError
from rlhf_jax.data.dataset import read_split
from rlhf_jax.evaluation.judge_agreement import JudgeAgreementConfig, judge_agreement, run_judge_agreement
from rlhf_jax.export import write_hf
from rlhf_jax.phases.online_config import AIJudgeConfig
from test_judge import tiny_judge


def test_agreement_by_hand():
    # pair 1: chosen wins both orders; 2: a judge that always says A (0.8 / 0.8) -> p = 0.5, a tie;
    # 3: right in one order only (0.6, 0.7): p = (0.6 + 0.3) / 2 = 0.45, wrong
    forward, backward = np.asarray([0.9, 0.8, 0.6]), np.asarray([0.2, 0.8, 0.7])
    stats = judge_agreement(forward, backward)
    assert stats["agreement"] == pytest.approx(1.5 / 3) and stats["agreement_n"] == 3
    assert stats["agreement_low"] < 0.5 < stats["agreement_high"]
    # one order alone, P(chosen) = 0.9, 0.8, 0.6 | 0.8, 0.2, 0.3: right on 4 of 6
    assert stats["single_order_agreement"] == pytest.approx(4 / 6) and stats["single_order_agreement_n"] == 6
    # response A picked by 0.9, 0.8, 0.6, 0.8, 0.7 (and not 0.2): 5 of 6
    assert stats["first_position_rate"] == pytest.approx(5 / 6)
    assert stats["chosen_probability_mean"] == pytest.approx((0.85 + 0.5 + 0.45) / 3)
    with pytest.raises(ValueError, match="two \\[B\\] arrays"):
        judge_agreement(np.zeros(2), np.zeros(3))


@pytest.fixture
def judge_files(tmp_path):
    judge, model, tokenizer = tiny_judge()
    write_hf(model, tokenizer, tmp_path / "judge")
    (tmp_path / "principle.txt").write_text("Prefer more vowels.")
    rows = [{"prompt": f"{c}{d}=", "chosen": "ae" * (i % 3 + 1), "rejected": "hg" * (i % 2 + 1)}
            for i, (c, d) in enumerate(zip("abcdefgh", "hgfedcba"))]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return judge, tmp_path


def test_the_command_judges_the_held_out_pairs_in_both_orders(judge_files):
    judge, tmp_path = judge_files
    data = DataConfig(source=str(tmp_path / "pairs.jsonl"), format="preference", eval_size=3)
    config = JudgeAgreementConfig(data=data, judge=AIJudgeConfig(model=str(tmp_path / "judge"),
                                                                 principle=str(tmp_path / "principle.txt")),
                                  output=str(tmp_path / "out" / "agreement.json"))
    result = run_judge_agreement(config)
    _, held_out, _ = read_split(data)  # the pairs a reward model's run with this data section holds out
    per_pair = [json.loads(line) for line in (tmp_path / "out" / "agreement_pairs.jsonl").read_text().splitlines()]
    held_out = [pair for _, pair in held_out]
    assert [(r["prompt"], r["chosen"]) for r in per_pair] == [(p.prompt, p.chosen) for p in held_out]
    forward, backward = judge.both_orders(*zip(*[(p.prompt, p.chosen, p.rejected) for p in held_out]))
    np.testing.assert_allclose([r["forward"] for r in per_pair], forward, atol=1e-5)
    np.testing.assert_allclose([r["backward"] for r in per_pair], backward, atol=1e-5)
    written = json.loads((tmp_path / "out" / "agreement.json").read_text())
    assert written["agreement"] == result.eval["agreement"] == judge_agreement(forward, backward)["agreement"]
    assert written["eval_size"] == 3 and written["malformed_rows_skipped"] == 0


@pytest.mark.parametrize("override, message", [
    ("data.format=prompt", "data.format='prompt': the judge is checked against labelled pairs"),
    ("output=agreement.txt", "give a path ending in .json"),
    ("judge.model=nowhere", "judge.model=nowhere does not exist"),
    ("judge.model={tmp}", "has no config.json (a directory, not a checkpoint); give a checkpoint directory"),
    ("output=/proc/rlhf_jax/agreement.json", "cannot write /proc/rlhf_jax/agreement.json"),
    ("output={tmp}/pairs.jsonl/agreement.json", "cannot write"),  # a file where its directory should be
    ("data.source={tmp}/run_pairs.jsonl output={tmp}/run.json", "would overwrite data.source"),
    ("judge.principle={tmp}/empty.txt", "empty.txt is empty; write in it the principle"),
])
def test_one_line_errors(judge_files, capsys, override, message):
    _, tmp_path = judge_files
    (tmp_path / "run_pairs.jsonl").write_text((tmp_path / "pairs.jsonl").read_text())
    (tmp_path / "empty.txt").write_text(" \n")
    argv = ["judge", str(tmp_path / "config.yaml"), *override.format(tmp=tmp_path).split()]
    (tmp_path / "config.yaml").write_text(json.dumps({
        "data": {"source": str(tmp_path / "pairs.jsonl"), "format": "preference"},
        "judge": {"model": str(tmp_path / "judge"), "principle": str(tmp_path / "principle.txt")},
        "output": str(tmp_path / "agreement.json")}))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_prompt_given_as_chat_turns_is_refused(judge_files):
    _, tmp_path = judge_files
    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                                                     "chosen": "a", "rejected": "b"}) + "\n")
    config = load(JudgeAgreementConfig, None, [f"data.source={tmp_path / 'chat.jsonl'}", "data.format=preference",
                                               f"judge.model={tmp_path / 'judge'}",
                                               f"judge.principle={tmp_path / 'principle.txt'}"])
    with pytest.raises(DataError, match="1 pairs give their prompt as chat turns only"):
        run_judge_agreement(config)


def test_an_output_that_is_a_link_to_the_data_is_refused(tmp_path):
    import os

    from rlhf_jax.config import ConfigError
    from rlhf_jax.outputs import check_writable

    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "x"}\n')
    os.link(data, tmp_path / "hard.jsonl")
    (tmp_path / "soft.jsonl").symlink_to(data)
    for link in ("hard.jsonl", "soft.jsonl"):
        with pytest.raises(ConfigError, match="writing it would overwrite data.source"):
            check_writable(tmp_path / link, key="output", inputs=(("data.source", str(data)),))
    assert data.read_text() == '{"prompt": "x"}\n'
    assert check_writable(tmp_path / "new" / "pairs.jsonl", key="output") == tmp_path / "new" / "pairs.jsonl"
    assert not (tmp_path / "new" / "pairs.jsonl").exists()  # checked, not left behind

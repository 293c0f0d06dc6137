"""The built-in arithmetic task: its answer rule and exact checker by hand, and its data: the
teacher's accuracy, careless answers one digit off, and held-out prompts distinct problems."""

import collections
import json

import pytest

from rlhf_jax import tasks
from rlhf_jax.rl.rewards import load_function
from rlhf_jax.tasks.arithmetic import CARELESS_OFFSETS


@pytest.mark.parametrize("completion, answer", [("17", 17), (" 17", 17), ("17abc", 17), ("017", 17), ("1 7", 1),
                                                 ("abc", None), ("-3", None), ("", None), ("x17", None)])
def test_the_answer_is_the_leading_integer(completion, answer):
    assert tasks.extract_answer(completion) == answer


def test_the_checker_compares_the_answer_to_the_sum_exactly():
    assert tasks.exact_match("3+4=", "7") == 1.0
    assert tasks.exact_match("q: 12+9=", "21 is it") == 1.0  # the trailing a+b= is the question
    assert tasks.exact_match("12+9=", "2 1") == 0.0 and tasks.exact_match("12+9=", "") == 0.0
    assert load_function("builtin:arithmetic") is tasks.exact_match
    with pytest.raises(ValueError, match="does not end in a sum"):
        tasks.exact_match("12-9=", "3")


def test_arithmetic_data_a_careless_teacher_and_unseen_prompts(tmp_path):
    paths = tasks.write_arithmetic(tmp_path / "a", seed=3, demonstrations=4000, largest=19, teacher_accuracy=0.5)
    again = tasks.write_arithmetic(tmp_path / "b", seed=3, demonstrations=4000, largest=19, teacher_accuracy=0.5)
    read = lambda path: [json.loads(line) for line in open(path)]  # noqa: E731
    assert read(paths["sft"]) == read(again["sft"])  # the same files for the same seed
    offsets = collections.Counter()
    for row in read(paths["sft"]):
        a, b = map(int, row["prompt"].removesuffix("=").split("+"))
        assert 0 <= a <= 19 and 0 <= b <= 19
        offsets[int(row["completion"]) - (a + b)] += 1
    right = offsets.pop(0) / 4000
    assert right == pytest.approx(0.5, abs=0.03)  # 3 sigma of a binomial(4000, 0.5) share: 0.024
    assert set(offsets) == set(CARELESS_OFFSETS)  # one digit off, never below 0
    for row in read(paths["preferences"]):
        assert tasks.exact_match(row["prompt"], row["chosen"]) == 1.0
        assert tasks.exact_match(row["prompt"], row["rejected"]) == 0.0
    unpaired = read(paths["unpaired"])  # KTO's form of the pairs: a chosen answer desirable, a rejected one not
    assert len(unpaired) == len(read(paths["preferences"])) and [row["label"] for row in unpaired[:4]] == [
        True, False, True, False]
    assert all(tasks.exact_match(row["prompt"], row["completion"]) == float(row["label"]) for row in unpaired)
    prompts = [row["prompt"] for row in read(paths["prompts"])]
    assert len(prompts) == len(set(prompts)) == 200
    with pytest.raises(ValueError, match="only 400 problems"):
        tasks.write_arithmetic(tmp_path / "c", seed=0, prompts=400, largest=19)


@pytest.mark.parametrize("completion, answer", [("The answer is 18.", 18), ("7 + 11 = 18", 18), ("1,234", 1234),
                                                 ("18\n\nThis is 3 ways", 3), ("-4", -4), ("none", None), ("", None)])
def test_sums_reads_the_last_integer(completion, answer):
    assert tasks.final_answer(completion) == answer


def test_sums_checker_reads_the_question_from_any_rendering():
    chat = "<|im_start|>system\nYou are 1 of 2<|im_end|>\n<|im_start|>user\nWhat is 7 + 11? Answer with the number only."
    assert tasks.sum_exact_match(chat, "7 + 11 = 18") == 1.0
    assert tasks.sum_exact_match(chat, "18, or 19") == 0.0 and tasks.sum_exact_match(chat, "") == 0.0
    assert load_function("builtin:sums") is tasks.sum_exact_match
    with pytest.raises(ValueError, match="asks no 'What is A \\+ B\\?' question"):
        tasks.sum_exact_match("What is 7 - 11?", "-4")


def test_sums_held_out_problems_are_never_trained_on_in_either_order(tmp_path):
    from rlhf_jax.tasks.sums import HIGHEST, LOWEST

    paths = tasks.write_sums(tmp_path, seed=5, held_out=40)
    rows = {name: [json.loads(line) for line in paths[name].read_text().splitlines()] for name in paths}
    problem = lambda row: tuple(int(n) for n in row["prompt"].split("?")[0].removeprefix("What is ").split(" + "))  # noqa: E731
    train, held = {problem(r) for r in rows["prompts"]}, {problem(r) for r in rows["held_out"]}
    unordered = lambda problems: {tuple(sorted(p)) for p in problems}  # noqa: E731
    assert len(unordered(held)) == 40 and not unordered(train) & unordered(held)
    assert train | held == {(a, b) for a in range(LOWEST, HIGHEST + 1) for b in range(LOWEST, HIGHEST + 1)}
    assert all(tasks.sum_exact_match(r["prompt"], str(r["answer"])) == 1.0 for r in rows["prompts"] + rows["held_out"])
    assert [problem(r) for r in rows["sft"]] == [problem(r) for r in rows["prompts"]]
    assert all(tasks.sum_exact_match(r["prompt"], r["chosen"]) == 1.0 == 1.0 - tasks.sum_exact_match(
        r["prompt"], r["rejected"]) for r in rows["preferences"])
    assert tasks.write_sums(tmp_path / "again", seed=5, held_out=40)["held_out"].read_text() == \
        paths["held_out"].read_text()
    with pytest.raises(ValueError, match="held_out=0"):
        tasks.write_sums(tmp_path, held_out=0)


def test_the_task_command_writes_a_tasks_files(tmp_path):
    from rlhf_jax import cli

    assert cli.main(["task", "sums", str(tmp_path / "sums"), "--seed", "2"]) == 0
    assert (tmp_path / "sums" / "held_out.jsonl").read_text() == \
        tasks.write_sums(tmp_path / "direct", seed=2)["held_out"].read_text()

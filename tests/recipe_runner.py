"""Runs documented ``rlhf-jax`` commands one after another in this process, each as printed
plus the overrides that make it a smoke-size run: ``python tests/recipe_runner.py FILE``,
``FILE`` a JSON list of argument lists, in the working directory the commands expect. A
command whose smoke-size config is one already run but for its ``output_dir`` (two commands
that differ in a seed loop's directory or in a count the caps cut to the same) is said and
not repeated. Exits with the first failing command's exit code, naming it."""

import dataclasses
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from config_checks import load_and_check
from documented import config_command, config_leaves
from rlhf_jax import cli, phases
from rlhf_jax.pipeline import PipelineConfig
from rlhf_jax.phases.algorithms import ALGORITHMS

# A field of this name is capped at this value (a smaller one is kept): a few steps of a few
# short sequences, every evaluation and checkpoint still reached.
SMOKE_CAPS = {"steps": 2, "iterations": 2, "max_new_tokens": 4, "prompts": 2, "eval_prompts": 2, "eval_samples": 1,
              "eval_size": 4, "eval_batches": 1, "pairs": 4, "batch_size": 2, "warmup_steps": 1}
AS_PRINTED = ("task", "convert", "report", "plan")  # no training to shorten (plan compiles one step)


def smoke_overrides(argv: list[str]) -> list[str]:
    """The ``key=value`` overrides that cap ``argv``'s config at the smoke size; a pipeline's
    phases (sections of defaults the pipeline fills in) by their kind."""
    loaded = loaded_config(argv)
    if loaded is None:
        return []
    if isinstance(loaded, PipelineConfig):
        caps = [f"judge.{key}={SMOKE_CAPS[key]}" for key in ("prompts", "max_new_tokens")]
        for phase in loaded.phases:
            if phase in phases.PHASES:
                caps.append(f"{phase}.train.steps={SMOKE_CAPS['steps']}")
            elif phase in ALGORITHMS:
                caps += [f"{phase}.train.iterations={SMOKE_CAPS['iterations']}",
                         f"{phase}.rollout.max_new_tokens={SMOKE_CAPS['max_new_tokens']}"]
            caps.append(f"{phase}.train.optimizer.warmup_steps={SMOKE_CAPS['warmup_steps']}")
        return caps
    return [f"{key}={SMOKE_CAPS[name]}" for key, value in config_leaves(loaded)
            if (name := key.rsplit(".", 1)[-1]) in SMOKE_CAPS and type(value) is int and value > SMOKE_CAPS[name]]


def loaded_config(argv: list[str]):
    """The config ``argv`` runs with, after the checks it makes first; None for a command
    that takes none or trains nothing (``AS_PRINTED``)."""
    args, extra = cli.build_parser().parse_known_args(argv)
    if args.command in AS_PRINTED:
        return None
    command, path, overrides = config_command(args, [*getattr(args, "overrides", []), *extra])
    return load_and_check(command, path, overrides)


def main(path: str) -> int:
    ran = []  # (smoke-size config with no output_dir, its output_dir) of the runs so far
    for argv in json.loads(open(path).read()):
        smoke = smoke_overrides(argv)
        loaded = loaded_config([*argv, *smoke])
        print(f"+ rlhf-jax {shlex.join(argv)}  [smoke: {' '.join(smoke) or 'as printed'}]", flush=True)
        if loaded is not None:
            key = dataclasses.replace(loaded, output_dir="")
            earlier = next((out for config, out in ran if config == key), None)
            if earlier is not None:  # its output_dir holds the same run, for the commands after it
                Path(loaded.output_dir).parent.mkdir(parents=True, exist_ok=True)
                Path(loaded.output_dir).symlink_to(Path(earlier).resolve(), target_is_directory=True)
                print(f"  exit 0: the run of {earlier} but for its output_dir (linked there), not repeated", flush=True)
                continue
            ran.append((key, loaded.output_dir))
        start = time.perf_counter()
        if argv[0] == "plan":  # it sets the devices up before JAX starts: a fresh process
            code = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", *argv, *smoke]).returncode
        else:
            code = cli.main([*argv, *smoke])
        print(f"  exit {code} in {time.perf_counter() - start:.1f} s", flush=True)
        if code != 0:
            print(f"rlhf-jax {shlex.join(argv)} failed with exit code {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

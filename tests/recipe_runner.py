"""Runs documented ``rlhf-jax`` commands one after another in this process, each as printed
plus the overrides that make it a smoke-size run: ``python tests/recipe_runner.py FILE``,
``FILE`` a JSON list of argument lists, in the working directory the commands expect.
Exits with the first failing command's exit code, naming it."""

import json
import shlex
import subprocess
import sys
import time

from config_checks import load_and_check
from documented import config_command, config_leaves
from rlhf_jax import cli, phases
from rlhf_jax.phases.algorithms import ALGORITHMS

# A field of this name is capped at this value (a smaller one is kept): a few steps of a few
# short sequences, every evaluation and checkpoint still reached.
SMOKE_CAPS = {"steps": 2, "iterations": 2, "max_new_tokens": 4, "prompts": 2, "eval_prompts": 2, "eval_samples": 1,
              "eval_size": 4, "eval_batches": 1, "pairs": 4, "batch_size": 2, "warmup_steps": 1}
PIPELINE_ITERATIONS = 5  # the least an over-optimisation curve takes
AS_PRINTED = ("task", "convert", "report", "plan")  # no training to shorten (plan compiles one step)


def smoke_overrides(argv: list[str]) -> list[str]:
    """The ``key=value`` overrides that cap ``argv``'s config at the smoke size; a pipeline's
    phases (sections of defaults the pipeline fills in) by their kind."""
    args, extra = cli.build_parser().parse_known_args(argv)
    if args.command in AS_PRINTED:
        return []
    command, path, overrides = config_command(args, [*getattr(args, "overrides", []), *extra])
    loaded = load_and_check(command, path, overrides)
    if command == "pipeline":
        caps = [f"judge.{key}={SMOKE_CAPS[key]}" for key in ("prompts", "max_new_tokens")]
        for phase in loaded.phases:
            if phase in phases.PHASES:
                caps += [f"{phase}.train.steps={SMOKE_CAPS['steps']}",
                         f"{phase}.train.optimizer.warmup_steps={SMOKE_CAPS['warmup_steps']}"]
            elif phase in ALGORITHMS:
                caps += [f"{phase}.train.iterations={PIPELINE_ITERATIONS}",
                         f"{phase}.rollout.max_new_tokens={SMOKE_CAPS['max_new_tokens']}"]
        return caps
    return [f"{key}={SMOKE_CAPS[name]}" for key, value in config_leaves(loaded)
            if (name := key.rsplit(".", 1)[-1]) in SMOKE_CAPS and type(value) is int and value > SMOKE_CAPS[name]]


def main(path: str) -> int:
    for argv in json.loads(open(path).read()):
        smoke = smoke_overrides(argv)
        print(f"+ rlhf-jax {shlex.join(argv)}  [smoke: {' '.join(smoke) or 'as printed'}]", flush=True)
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

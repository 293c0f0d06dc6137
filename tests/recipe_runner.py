"""Runs documented ``rlhf-jax`` commands one after another in this process, each as printed
plus the overrides that make it a smoke-size run: ``python tests/recipe_runner.py FILE``,
``FILE`` a JSON list of argument lists, in the working directory the commands expect. A
command whose smoke-size config and flags are those of one already run but for its
``output_dir`` (two commands that differ in a seed loop's directory or in a count the caps cut
to the same) gets a copy of that run's directory instead of a repeat. Exits with the first failing command's exit code, naming it."""

import dataclasses
import json
import shlex
import shutil
import sys
import time

from config_checks import load_and_check
from documented import config_command, config_leaves
from rlhf_jax import cli, phases
from rlhf_jax.pipeline import PipelineConfig
from rlhf_jax.phases.algorithms import ALGORITHMS

# A field of this name is capped at this value (a smaller one is kept): a few steps of a few
# short sequences; the step-0 and final evaluations and the final checkpoint still run.
SMOKE_CAPS = {"steps": 2, "iterations": 2, "max_new_tokens": 4, "prompts": 2, "eval_prompts": 2, "eval_samples": 1,
              "eval_size": 4, "eval_batches": 1, "pairs": 4, "batch_size": 2, "warmup_steps": 1}
AS_PRINTED = ("task", "convert", "report")  # no training to shorten


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
            else:
                raise SystemExit(f"recipe_runner: no smoke caps for a pipeline's {phase} phase yet")
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
    ran = []  # (smoke-size config with no output_dir, flags, output_dir) of the runs so far
    for argv in json.loads(open(path).read()):
        print(f"+ rlhf-jax {shlex.join(argv)}", flush=True)
        smoke = smoke_overrides(argv)
        print(f"  smoke: {' '.join(smoke) or 'as printed'}", flush=True)
        loaded = loaded_config([*argv, *smoke])
        if loaded is not None and hasattr(loaded, "output_dir"):
            key = (dataclasses.replace(loaded, output_dir=""), [word for word in argv if word.startswith("--")])
            earlier = next((out for config, flags, out in ran if (config, flags) == key), None)
            if earlier is not None and earlier != loaded.output_dir:  # the same run: a copy for the commands after
                shutil.copytree(earlier, loaded.output_dir, symlinks=True)
                print(f"  exit 0: the run of {earlier} but for its output_dir (copied there), not repeated", flush=True)
                continue
            ran.append((*key, loaded.output_dir))
        start = time.perf_counter()
        code = cli.main([*argv, *smoke])
        print(f"  exit {code} in {time.perf_counter() - start:.1f} s", flush=True)
        if code != 0:
            print(f"rlhf-jax {shlex.join(argv)} failed with exit code {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

"""Every ``rlhf-jax`` command the documentation prints is one the CLI takes, as written: it
parses, its config loads with its overrides and passes the checks a run makes first, and every
file it names exists -- in the repository, the shared data or an installed package -- or is
written by a command printed before it on the same page (``runs/...``). The recipe pages'
commands run, at a smoke size, in ``tests/test_recipes_run.py``."""

import re
import shlex
from pathlib import Path

import pytest

from config_checks import CONFIG_CLASSES, load_and_check
from documented import PAGES, config_command, config_leaves, documented_commands
from rlhf_jax import cli, tasks
from rlhf_jax.config import package_path

ROOT = Path(__file__).resolve().parents[1]


FILE_LIKE = re.compile(r"\.(jsonl|json|gz|yaml|gguf|safetensors|txt)$")


def _check_command(argv: list[str], written: set[str]) -> None:
    """Parse ``argv`` as the CLI does, load and check its config, and check that every path it
    names exists or is in ``written``; then add what it writes to ``written``."""
    args, extra = cli.build_parser().parse_known_args(argv)
    overrides = [*getattr(args, "overrides", []), *extra]
    assert all("=" in override for override in overrides), overrides
    if args.command == "task":
        tasks.get(args.name)
        written.add(args.out.rstrip("/"))
        return
    if args.command == "convert":
        assert _exists(package_path(args.source, "source"), written), args.source
        written.add(args.out.rstrip("/"))
        return
    if args.command == "report":
        assert _exists(args.run_dir, written), args.run_dir
        return
    command, path, overrides = config_command(args, overrides)
    assert command in CONFIG_CLASSES, command
    assert path is None or (ROOT / path).is_file(), f"{path} does not exist"
    loaded = load_and_check(command, path and ROOT / path, overrides)
    for key, value in config_leaves(loaded):
        if isinstance(value, str) and key != "output_dir" and (value.startswith("runs/") or FILE_LIKE.search(value)):
            assert _exists(value, written), f"{key}={value}: neither in the repository nor written before"
    if args.command != "plan" and hasattr(loaded, "output_dir"):
        out = str(loaded.output_dir).rstrip("/")
        assert out not in written or getattr(args, "resume", False), (
            f"output_dir={out} is written by a command before it (a training run refuses to start there, an "
            "evaluation overwrites the other's): give it its own")
        written.add(out)


def _exists(value: str, written: set[str]) -> bool:
    if value.startswith("runs/"):
        return any(value == out or value.startswith(out + "/") for out in written)
    if value.startswith("../shared/") and not (ROOT.parent / "shared").is_dir():
        return True  # a checkout away from the shared data (the tests that read it skip): not checkable here
    return (ROOT / value).exists() or Path(value).is_absolute() and Path(value).exists()


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_documented_command_is_one_the_cli_takes(page):
    written: set[str] = set()
    for argv in documented_commands(page):
        try:
            _check_command(argv, written)
        except (Exception, SystemExit) as error:
            pytest.fail(f"{page.name}: rlhf-jax {shlex.join(argv)}: {type(error).__name__}: {error}")


def test_the_pages_print_the_recipes():
    """The extraction finds the commands it should (so the test above checks something)."""
    recipes = documented_commands(ROOT / "docs" / "recipes.md")
    assert ["task", "sums", "runs/sums_data"] in recipes
    assert ["grpo", "configs/grpo_smollm2_sums.yaml"] in recipes
    looped = documented_commands(ROOT / "docs" / "real-models.md")
    assert ["evaluate", "configs/eval_smollm2_sums.yaml", "policy.path=runs/sums_grpo_s0/hf",
            "output_dir=runs/sums_grpo_s0/evaluation"] in looped

"""Every ``rlhf-jax`` command the documentation prints is one the CLI takes, as written: it
parses, its config loads with its overrides and passes the checks a run makes first, and every
file it names exists -- in the repository, the shared data or an installed package -- or is
written by a command printed before it on the same page (``runs/...``). They are not run
here: a real-model recipe costs minutes (running each at a smoke size is not built yet)."""

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from config_checks import CONFIG_CLASSES, load_and_check
from rlhf_jax import cli, tasks
from rlhf_jax.config import package_path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXECUTABLE = ".venv/bin/rlhf-jax"


def documented_commands(page: Path) -> list[list[str]]:
    """The ``rlhf-jax`` commands of ``page``'s bash blocks, in order, as argument lists (the
    executable left out): continuation lines joined, comments dropped, ``&&`` chains split,
    a shell loop's ``$seed`` taken as 0."""
    commands, block, line_so_far = [], False, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        line_so_far += line.rstrip()
        if line_so_far.endswith("\\"):
            line_so_far = line_so_far[:-1] + " "
            continue
        words = shlex.split(line_so_far.replace("$seed", "0"), comments=True)
        line_so_far = ""
        for part in " ".join(shlex.quote(word) for word in words).split(" '&&' "):
            argv = shlex.split(part)
            if argv and argv[0] == EXECUTABLE:
                commands.append(argv[1:])
    return commands


def _strings(node, key=""):
    """(dotted key, value) for every string in a loaded config."""
    if dataclasses.is_dataclass(node):
        for field in dataclasses.fields(node):
            yield from _strings(getattr(node, field.name), f"{key}.{field.name}".lstrip("."))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _strings(value, f"{key}[{i}]")
    elif isinstance(node, str):
        yield key, node


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
    command = args.phase if args.command == "plan" else args.command
    path = args.config
    if command == "pipeline" and path is not None and "=" in path:
        path, overrides = None, [path, *overrides]
    assert command in CONFIG_CLASSES, command
    assert path is None or (ROOT / path).is_file(), f"{path} does not exist"
    loaded = load_and_check(command, path and ROOT / path, overrides)
    for key, value in _strings(loaded):
        if key != "output_dir" and (value.startswith("runs/") or FILE_LIKE.search(value)):
            assert _exists(value, written), f"{key}={value}: neither in the repository nor written before"
    if args.command != "plan" and hasattr(loaded, "output_dir"):
        written.add(str(loaded.output_dir).rstrip("/"))


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

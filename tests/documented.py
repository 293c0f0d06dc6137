"""The ``rlhf-jax`` commands the documentation prints, read from its pages' bash blocks."""

import dataclasses
import shlex
from pathlib import Path

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


def config_leaves(node, key=""):
    """(dotted key, value) for every leaf of a loaded config (list items as ``key[i]``)."""
    if dataclasses.is_dataclass(node):
        for field in dataclasses.fields(node):
            yield from config_leaves(getattr(node, field.name), f"{key}.{field.name}".lstrip("."))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from config_leaves(value, f"{key}[{i}]")
    else:
        yield key, node


def config_command(args, overrides: list[str]) -> tuple[str, str | None, list[str]]:
    """``(command, config path or None, overrides)`` of a parsed command that reads a config:
    ``plan``'s phase for ``plan``; the built-in pipeline's first override is no path."""
    command = args.phase if args.command == "plan" else args.command
    path = args.config
    if command == "pipeline" and path is not None and "=" in path:
        path, overrides = None, [path, *overrides]
    return command, path, overrides

"""The built-in tasks' data files."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """``rows`` as JSON lines at ``path`` (its directory created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def task_paths(directory: Path) -> dict[str, Path]:
    """Where a task writes its demonstrations (``sft``), preference pairs and prompts."""
    return {name: directory / f"{name}.jsonl" for name in ("sft", "preferences", "prompts")}

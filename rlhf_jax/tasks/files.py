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
    """Where a task writes its demonstrations (``sft``), preference pairs, the same pairs as
    unpaired examples (``unpaired``) and prompts."""
    return {name: directory / f"{name}.jsonl" for name in ("sft", "preferences", "unpaired", "prompts")}


def write_preferences(paths: dict[str, Path], pairs: list[dict]) -> None:
    """``pairs`` (prompt, chosen, rejected) at ``paths["preferences"]``, and at
    ``paths["unpaired"]`` as KTO's unpaired examples (format ``unpaired``): each chosen
    response desirable, each rejected one undesirable, in pair order -- the way Ethayarajh et
    al. (2024, sec. 4.1) turn preference data into KTO's."""
    write_jsonl(paths["preferences"], pairs)
    write_jsonl(paths["unpaired"], [{"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
                                    for pair in pairs for side in ("chosen", "rejected")])

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
    ``paths["unpaired"]`` as KTO's unpaired examples (format ``unpaired``; Ethayarajh et al.,
    2024, sec. 4.1): one row per pair, in pair order -- the chosen response of the even pairs
    (desirable) and the rejected one of the odd pairs (undesirable) -- so half the rows of each
    label and no row whose pair's other half could sit on the other side of a held-out split."""
    write_jsonl(paths["preferences"], pairs)
    sides = ("chosen" if i % 2 == 0 else "rejected" for i in range(len(pairs)))
    write_jsonl(paths["unpaired"], [{"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
                                    for pair, side in zip(pairs, sides)])

"""What a checkpoint declares about generation, read as the checkpoint states it, so that no
phase substitutes its own guess: the end-of-sequence ids that stop sampling (a chat model
often lists several -- its end-of-turn token and ``</s>``), and the rest of its
``generation_config.json`` for the export to carry forward.

Sources, in the order transformers' ``generate`` honours them:

- a Hugging Face directory: ``generation_config.json``'s ``eos_token_id`` (an id or a list of
  ids), else ``config.json``'s;
- a GGUF file: the metadata ``tokenizer.ggml.eos_token_id`` and, where llama.cpp's converter
  wrote them, ``tokenizer.ggml.eot_token_id`` (end of turn) and ``tokenizer.ggml.eom_token_id``
  (end of message), which llama.cpp's sampler also stops on.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_jax.models.gguf import file_index

GENERATION_CONFIG = "generation_config.json"


def _ids(value) -> tuple[int, ...]:
    """An ``eos_token_id`` field (None, an int or a list of ints) as a tuple of ids."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def declared_generation_config(path: str | Path) -> dict | None:
    """The fields of ``path``'s ``generation_config.json`` (a checkpoint directory), or None
    when it has none (or ``path`` is a GGUF file or a hub name)."""
    file = Path(path).expanduser() / GENERATION_CONFIG
    return json.loads(file.read_text()) if file.is_file() else None


def declared_eos_ids(path: str | Path | None) -> tuple[int, ...]:
    """The end-of-sequence ids checkpoint ``path`` declares (module docstring), in the order
    declared, duplicates removed; ``()`` for None, a path that is not a local checkpoint, or a
    checkpoint that declares none."""
    return tuple(dict.fromkeys(_declared(Path(path).expanduser()))) if path is not None else ()


def _declared(path: Path) -> tuple[int, ...]:
    if path.suffix.lower() == ".gguf" and path.is_file():
        return tuple(file_index(path)["stop_ids"])
    generation = declared_generation_config(path)
    if generation is not None and generation.get("eos_token_id") is not None:
        return _ids(generation["eos_token_id"])
    config = path / "config.json"
    return _ids(json.loads(config.read_text()).get("eos_token_id")) if config.is_file() else ()

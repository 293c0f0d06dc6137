"""Rows from local files (JSON, JSON Lines, Parquet; ``.gz`` too) or a ``datasets`` dataset.

A local file is read here, row by row, so a malformed line is reported by file and line. A
local directory is a dataset saved with ``datasets``' ``save_to_disk``. Anything else is
taken for a ``datasets`` name (``load_dataset(name, split=...)``): a hub dataset already in
the cache works offline (``HF_DATASETS_OFFLINE=1``)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from rlhf_jax.data.report import DataError

SUFFIXES = (".json", ".jsonl", ".parquet")


def _text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def _kind(path: Path) -> str:
    suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown data file type {suffix!r}; use one of {', '.join(SUFFIXES)} (optionally .gz)")
    return suffix


def _json_rows(path: Path) -> Iterator[tuple[int, object]]:
    """A JSON array of objects, or one JSON object per line (JSON Lines); rows count from 1
    (array index + 1, or line number)."""
    text = _text(path)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error})") from None
        yield from enumerate(rows, start=1)
        return
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {line_number}: not valid JSON ({error.msg})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    yield from enumerate(pq.read_table(path).to_pylist(), start=1)


def _saved_dataset_rows(path: Path, split: str) -> Iterator[tuple[str, object]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DataError(f"{path} is a directory but not a dataset saved with save_to_disk ({error})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{path} has splits {', '.join(dataset)}; there is no split {split!r}")
        dataset = dataset[split]
    for index, row in enumerate(dataset):
        yield f"{path}[{split}] row {index}", row


def read_rows(source: str, split: str = "train") -> Iterator[tuple[str, object]]:
    """``(where, row)`` pairs; ``where`` names the file and row (or dataset, split and index)
    for error messages."""
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _saved_dataset_rows(path, split)
        return
    if path.exists():
        reader = _parquet_rows if _kind(path) == ".parquet" else _json_rows
        for number, row in reader(path):
            yield f"{path} row {number}", row
        return
    if source.startswith((".", "/", "~")) or Path(source).suffix in (*SUFFIXES, ".gz"):
        raise DataError(f"data file {source} does not exist")
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as error:  # datasets raises many types; all mean "cannot load this name"
        raise DataError(f"cannot load dataset {source!r} (split {split!r}): {error}. Offline, only datasets "
                        "already in the Hugging Face cache load; otherwise give a local file") from None
    for index, row in enumerate(dataset):
        yield f"{source}[{split}] row {index}", row

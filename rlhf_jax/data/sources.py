"""Rows from local files (JSON, JSON Lines, Parquet; ``.gz`` too) or a ``datasets`` dataset.

A local file is read here, row by row, so a malformed line is reported by file and line. A
local directory is a dataset saved with ``datasets``' ``save_to_disk``. Anything else is
taken for a ``datasets`` name (``load_dataset(name, split=...)``): a hub dataset already in
the cache works offline (``HF_DATASETS_OFFLINE=1``)."""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from rlhf_jax.data.report import DataError

SUFFIXES = (".json", ".jsonl", ".parquet")


class UnreadableRow(NamedTuple):
    """A row the file holds but that cannot be decoded (not UTF-8, not JSON): handled like a
    malformed row -- an error naming file and row, or skipped and counted."""

    reason: str


def _bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped for ``.gz``, without a leading UTF-8 byte-order mark."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(f"{path}: not a valid gzip file ({error}); give the plain file or gzip it again") from None
    except OSError as error:
        raise DataError(f"{path} cannot be read: {error.strerror or error}") from None
    return data.removeprefix(codecs.BOM_UTF8)


def _kind(path: Path) -> str:
    suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown data file type {suffix!r}; use one of {', '.join(SUFFIXES)} (optionally .gz)")
    return suffix


def _json_rows(path: Path) -> Iterator[tuple[int, object]]:
    """A JSON array of objects, or one JSON object per line (JSON Lines); rows count from 1
    (array index + 1, or line number). In JSON Lines a line that is not UTF-8 or not JSON is
    an :class:`UnreadableRow`; a JSON array that cannot be read is an error for the file."""
    data = _bytes(path)
    if data.lstrip().startswith(b"["):
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise DataError(f"{path} line {line}: not valid UTF-8 ({error.reason} at byte {error.start}); "
                            "re-encode the file as UTF-8") from None
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error})") from None
        yield from enumerate(rows, start=1)
        return
    for line_number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield line_number, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            yield line_number, UnreadableRow(f"not valid UTF-8 ({error.reason} at byte {error.start} of the line)")
        except json.JSONDecodeError as error:
            yield line_number, UnreadableRow(f"not valid JSON ({error.msg})")


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    yield from enumerate(table.to_pylist(), start=1)


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


def _local_rows(path: Path, split: str) -> Iterator[tuple[str, object]]:
    if path.is_dir():
        yield from _saved_dataset_rows(path, split)
        return
    reader = _parquet_rows if _kind(path) == ".parquet" else _json_rows
    for number, row in reader(path):
        yield f"{path} row {number}", row


def sliced(rows: list, split: str, source: str) -> list:
    """The rows a split slice names, in ``datasets``' syntax (``train[:90%]``, ``train[90%:]``,
    ``train[100:200]``, parts joined with ``+``; percentages round to the closest row), so a
    local file divides into disjoint parts as a hub dataset does. Raises ``DataError`` for a
    malformed slice."""
    import datasets

    try:
        parts = datasets.ReadInstruction.from_spec(split).to_absolute({split.split("[")[0]: len(rows)})
    except (ValueError, AssertionError) as error:
        reason = str(error).rstrip(".")
        raise DataError(f"data.split={split!r} for {source}: {reason}. Write e.g. train[:90%] or train[100:200]") from None
    chosen = [row for part in parts for row in rows[part.from_: part.to]]
    if not chosen:
        raise DataError(f"data.split={split!r} selects none of the {len(rows)} rows of {source}")
    return chosen


def read_rows(source: str, split: str = "train") -> Iterator[tuple[str, object]]:
    """``(where, row)`` pairs; ``where`` names the file and row (or dataset, split and index)
    for error messages. A local file or saved dataset with a sliced ``split`` (``train[:90%]``)
    yields that slice of its rows (:func:`sliced`)."""
    path = Path(source).expanduser()
    if path.exists():
        name = split.split("[")[0]
        if path.is_file() and name != "train":
            raise DataError(f"data.split={split!r}: a local file has one split, train; slice it, e.g. train[:90%]")
        if name == split:
            yield from _local_rows(path, split)
        else:
            yield from sliced(list(_local_rows(path, name)), split, source)
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

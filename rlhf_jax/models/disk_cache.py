"""What is slow to read and rarely changes, kept on disk after the first read: a GGUF file's
metadata, and the config.json fields transformers knows per model type. Parsing a GGUF's
metadata is slow in Python -- ~3-5 s per parse for SmolLM2's 49k-token vocabulary, and
transformers' config and tokenizer readers each parse it again beside the one parse of our
own (``models.gguf.file_index``) -- while what a run needs from it is small: the config.json
dict, the tokenizer files, each tensor's type, shape and byte offset, and the stop ids. Those
are written once per file under :func:`cache_root` and read
back in milliseconds.

An entry is keyed by the file's resolved path, size and modification time, so a file that
changes is read afresh; entries are written to a temporary name and renamed, so concurrent
runs never see half of one. The config fields are keyed by transformers' installed version."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

VARIABLE = "RLHF_JAX_CACHE"


def cache_root() -> Path:
    """``$RLHF_JAX_CACHE``, else ``$XDG_CACHE_HOME/rlhf_jax``, else ``~/.cache/rlhf_jax``."""
    if os.environ.get(VARIABLE):
        return Path(os.environ[VARIABLE]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlhf_jax"


def entry_dir(path: Path) -> Path:
    """The cache directory of the GGUF file at ``path`` as it is now."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    return cache_root() / "gguf" / key


def package_dir(package: str) -> Path:
    """The cache directory of what was read from the installed version of ``package``."""
    return cache_root() / "packages" / f"{package}-{importlib.metadata.version(package)}"


def cached_json(path: Path | None, name: str, build: Callable[[], object], *, directory: Path | None = None) -> object:
    """The JSON value ``name`` of ``path``'s entry (or of ``directory``), built by ``build()``
    and written on a miss."""
    target = (directory or entry_dir(path)) / name
    if target.is_file():
        return json.loads(target.read_text())
    value = build()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, suffix=".tmp", delete=False) as f:
        json.dump(value, f)
    os.replace(f.name, target)
    return value


def cached_directory(path: Path, name: str, write: Callable[[Path], None]) -> Path:
    """The directory ``name`` of ``path``'s entry, filled by ``write(directory)`` on a miss."""
    target = entry_dir(path) / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, suffix=".tmp"))
    try:
        write(staging)
        os.replace(staging, target)
    except OSError:  # another run renamed its copy first: keep that one
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

"""Output files found writable before the work that fills them: a command that samples or
judges for minutes checks first that its result can be written and that writing it would not
overwrite one of its own inputs, so a mistake costs one line, not the run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rlhf_jax.config import ConfigError


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path, a symbolic or a hard link."""
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()


def check_writable(path: str | Path, *, key: str, inputs: Sequence[tuple[str, str | None]] = (),
                   hint: str = "give a path in a writable directory") -> Path:
    """``path`` (the value of config key ``key``) as a ``Path``, after checking that its
    directory can be made and the file opened for writing (a file that was not there is not
    left behind). Raises ``ConfigError`` naming ``key``, the path and ``hint`` when it cannot
    be written, or when it is one of ``inputs`` (``(config key, path)`` pairs: a data file,
    a prompt file) that writing it would overwrite."""
    out = Path(path).expanduser()
    for input_key, source in inputs:
        if source is not None and _same_file(out, Path(source).expanduser()):
            raise ConfigError(f"{key}={path}: writing it would overwrite {input_key} ({source}); give another {key}")
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a"):
            pass
    except OSError as error:
        raise ConfigError(f"{key}={path}: cannot write {out} ({error.strerror}); {hint}") from None
    if not existed:
        out.unlink()
    return out

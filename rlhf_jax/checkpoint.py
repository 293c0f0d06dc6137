"""Checkpoints with ``orbax-checkpoint``: the whole train state plus a JSON record of the
config and the data position, every N steps and at the end, the last K kept, written
asynchronously. Restoring a checkpoint that cannot be read is an error that says which one
and what to do -- never a silent fresh start.

Nothing is lost silently:

- a save that fails (disk full, permissions) is a :class:`CheckpointError` at that save,
  naming the step and the cause; orbax writes each step to a temporary directory and renames
  it when complete, so the last good checkpoint survives;
- every finished checkpoint gets a SHA-256 of each of its files in
  ``<directory>/../checkpoint_checksums/<step>.json``, verified on restore: a checkpoint
  whose bytes changed (a bit flip, a truncated copy) is refused, naming it and the earlier
  ones present. A checkpoint without a record (the process died between the write and the
  record) is restored with a warning, unverified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from rlhf_jax.memory import release_freed_memory

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written; the message names it and the way out."""


class CheckpointUnreadable(CheckpointError):
    """A checkpoint whose files passed their checksums (``verified``; False: it has no record)
    but cannot be restored onto the state asked for -- another layout, or a damage no record
    caught."""

    def __init__(self, message: str, *, verified: bool):
        super().__init__(message)
        self.verified = verified


def _digests(step_dir: Path) -> dict[str, str]:
    """``{relative path: sha256 hex}`` of every file under ``step_dir``."""
    digests = {}
    for file in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            digests[str(file.relative_to(step_dir))] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def _cause(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


class Checkpointer:
    def __init__(self, directory: str | Path, *, every: int, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.checksums = self.directory.parent / "checkpoint_checksums"
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        except OSError as error:
            raise CheckpointError(f"cannot create the checkpoint directory {self.directory} ({_cause(error)}); choose "
                                  "another output_dir") from None

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Save if ``step`` is a multiple of ``every`` (or ``force``); returns whether it saved.
        The previous save is finished and checksummed first. Raises :class:`CheckpointError`
        when the write fails."""
        if not force and step % self.every:
            return False
        self.wait()
        release_freed_memory()  # serialisation buffers land on the live state only, not on retained garbage
        try:
            return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                    meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as error:  # orbax / tensorstore / the OS raise many types for a failed write
            raise self._save_failed(step, error) from error

    def _save_failed(self, step: int | None, error: BaseException) -> CheckpointError:
        """The error of a failed save, its partial write discarded (orbax's temporary
        directories: they hold no checkpoint, only the disk space a retry needs)."""
        for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)
        good = [s for s in self.steps() if (self.checksums / f"{s}.json").exists()]
        what = f"checkpoint step {step}" if step is not None else "a checkpoint"
        return CheckpointError(f"saving {what} to {self.directory} failed ({_cause(error)}); the last good "
                               f"checkpoint is {good[-1] if good else 'none'}. Free disk space or fix the "
                               "directory's permissions, then resume with --resume")

    def _record_checksums(self) -> None:
        """Write the checksum record of every finished step without one; drop records of steps
        that are gone (``keep``). Process 0 writes (every process sees the same files)."""
        if jax.process_index() != 0:
            return
        steps = self.steps()
        self.checksums.mkdir(parents=True, exist_ok=True)
        for step in steps:
            record = self.checksums / f"{step}.json"
            if not record.exists():
                record.write_text(json.dumps(_digests(self.directory / str(step)), indent=0))
        for record in self.checksums.glob("*.json"):
            if record.stem.isdigit() and int(record.stem) not in steps:
                record.unlink()

    def verify(self, step: int) -> bool:
        """Whether ``step``'s files were checked against its checksum record (False: there is
        none, a warning). Raises :class:`CheckpointError` when a file is missing or its bytes
        differ from the record."""
        record = self.checksums / f"{step}.json"
        if not record.exists():
            log.warning("checkpoint %s has no checksum record (the run stopped before writing it); restoring it "
                        "unverified", self.directory / str(step))
            return False
        expected = json.loads(record.read_text())
        found = _digests(self.directory / str(step))
        bad = sorted(name for name, digest in expected.items() if found.get(name) != digest)
        if bad:
            others = [s for s in self.steps() if s != step]
            raise CheckpointError(
                f"the checkpoint {self.directory / str(step)} is corrupt: {len(bad)} file(s) differ from their "
                f"checksums ({bad[0]}{', ...' if len(bad) > 1 else ''}). Delete that step's directory to resume from "
                f"an earlier one (present: {others or 'none'}), or start afresh with another output_dir")
        return True

    def meta(self, step: int) -> dict | None:
        """The JSON record saved beside ``step``'s state (config, data position), read alone;
        None when it cannot be read."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception:  # an unreadable record: the state's own restore says what is wrong
            return None

    def restore(self, abstract_state, step: int | None = None) -> tuple[object, dict]:
        """``(state, meta)`` at ``step`` (default: the latest), verified against its checksums
        and restored onto the shardings of ``abstract_state`` (a pytree of
        ``jax.ShapeDtypeStruct`` or arrays)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        verified = self.verify(step)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as error:  # orbax/tensorstore raise many types for unreadable data
            others = [s for s in self.steps() if s != step]
            raise CheckpointUnreadable(
                f"the checkpoint {self.directory / str(step)} cannot be read ({_cause(error)}). It may be truncated "
                f"or corrupt, or written by another version with another state layout. Delete that step's "
                f"directory to resume from an earlier one (present: {others or 'none'}), or start afresh with "
                "another output_dir", verified=verified
            ) from error
        return restored.state, restored.meta

    def wait(self) -> None:
        """Finish the pending save and record its checksums; :class:`CheckpointError` if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # an asynchronous write's failure surfaces here
            raise self._save_failed(None, error) from error
        self._record_checksums()

    def close(self) -> None:
        self.wait()
        self.manager.close()

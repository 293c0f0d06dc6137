"""Checkpoints with ``orbax-checkpoint``: the whole train state plus a JSON record of the
config and the data position, every N steps and at the end, the last K kept, written
asynchronously. Restoring a checkpoint that cannot be read is an error that says which one
and what to do -- never a silent fresh start."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and the way out."""


class Checkpointer:
    def __init__(self, directory: str | Path, *, every: int, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Save if ``step`` is a multiple of ``every`` (or ``force``); returns whether it saved."""
        if not force and step % self.every:
            return False
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, abstract_state, step: int | None = None) -> tuple[object, dict]:
        """``(state, meta)`` at ``step`` (default: the latest), restored onto the shardings of
        ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct`` or arrays)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as error:  # orbax/tensorstore raise many types for unreadable data
            others = [s for s in self.steps() if s != step]
            raise CheckpointError(
                f"the checkpoint {self.directory / str(step)} cannot be read ({type(error).__name__}: "
                f"{str(error)[:300]}). It may be truncated or corrupt. Delete that step's directory to resume "
                f"from an earlier one (present: {others or 'none'}), or start afresh with another output_dir"
            ) from error
        return restored.state, restored.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

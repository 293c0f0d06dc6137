"""The one run loop of every offline phase and online algorithm: restore or start, step, log,
evaluate, checkpoint, stop cleanly on SIGTERM/SIGINT or ``--stop-after``, the final
evaluation, then the phase's own ending (samples, the Hugging Face export).

A phase hands it a :class:`Job` -- its step, its evaluation, its checkpoint metadata and its
ending -- and the state to start from; the loop owns the cadence (``log_every``,
``eval_every``, the checkpointer's ``every``), the metrics writer, the progress bar and the
speed it logs (:class:`Throughput`, over the :class:`StepInfo` each step returns). Resume
is exact: the state is checkpointed whole and every step's data and random draws are a pure
function of (seed, position), so a run stopped at position k and resumed in a new process
reaches the same state, bit for bit on CPU, as one that never stopped."""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from rlhf_jax.checkpoint import Checkpointer, CheckpointError, CheckpointUnreadable
from rlhf_jax.memory import release_freed_memory
from rlhf_jax.metrics import MetricsWriter, Progress, drop_rows_after
from rlhf_jax.phases.console import log
from rlhf_jax.train.guard import TrainingDiverged


@dataclasses.dataclass
class RunResult:
    """How a run ended: the positions done, what stopped it, the final held-out numbers."""

    step: int
    stopped_by: str | None  # "SIGTERM", "SIGINT", "stop_after", or None when the run finished
    eval: dict
    output_dir: Path


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a job's step hands the loop besides the state: the tokens it processed -- trained
    (offline) or generated (online) -- and its host metrics when the loop asked for them."""

    tokens: int
    values: dict | None = None  # None: not a logging step


class Throughput:
    """The loop's speed record: seconds per position and tokens per second over the positions
    since the last logged one (the first window includes the compile)."""

    def __init__(self, unit: str):
        self.unit = unit
        self._restart()

    def _restart(self) -> None:
        self.tick, self.tokens, self.positions = time.perf_counter(), 0, 0

    def __call__(self, info: StepInfo) -> dict:
        """Count ``info``; at a logging step, the window's rates (then a new window starts)."""
        self.tokens += info.tokens
        self.positions += 1
        if info.values is None:
            return {}
        elapsed = time.perf_counter() - self.tick
        rates = {"tokens_per_second": self.tokens / elapsed, f"seconds_per_{self.unit}": elapsed / self.positions}
        self._restart()
        return rates


@dataclasses.dataclass
class Job:
    """What a phase hands :func:`run_loop`.

    ``step(state, index, log) -> (state, StepInfo)``: one step (offline) or iteration (online)
    at position ``index``; its :class:`StepInfo` carries the host numbers to write when ``log``
    is true (the loop asks every ``log_every`` and at the end), to which the loop adds the
    speed (:class:`Throughput`). ``evaluate(state) -> dict``: the
    held-out numbers. ``meta(position) -> dict``: the checkpoint's metadata.
    ``trained_model(state)``: the model the run ends with (the loop then drops the state, so
    optimiser moments are freed), handed to ``finish(model)``: samples, the export.
    ``state`` is the state to start from, handed over: the loop takes it out of the job, so a
    restored checkpoint replaces it instead of living beside it."""

    name: str  # the metrics prefix and the progress bar's label: "sft", "ppo", ...
    unit: str  # "step" or "iteration"
    total: int  # positions in the whole run
    log_every: int
    eval_every: int  # 0: only the final evaluation
    progress: dict[str, str]  # the progress bar's fields: {label: key of the logged values}
    position: Callable[[Any], int]  # state -> the positions done
    step: Callable[[Any, int, bool], tuple[Any, StepInfo]] | None
    evaluate: Callable[[Any], dict] | None
    meta: Callable[[int], dict]
    trained_model: Callable[[Any], Any]
    finish: Callable[[Any], None]
    state: Any  # the fresh state (placed on the mesh)
    data: dict  # the numbers that fix the data order: a resume refuses other ones
    start_records: dict[str, dict] = dataclasses.field(default_factory=dict)  # {kind: values} at position 0


class StopRequests:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step. A signal the process
    was started ignoring (``nohup``, a shell's background job) stays ignored, as it was asked."""

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(saved) | set(current))
    out = []
    for key in keys:
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, list) and isinstance(b, tuple) and a == list(b)):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def restore_or_start(checkpointer: Checkpointer, state, *, resume: bool, config_dict: dict, data: dict):
    """The latest checkpoint's state with ``--resume`` (an error when ``data`` -- the numbers
    that fix the data order -- differs from the checkpoint's, since resuming would not be
    exact, and when the state cannot be restored onto this config's shapes: the error then
    names the config keys that changed since the checkpoint rather than blaming a checkpoint
    whose files passed their checksums); ``state`` itself when starting. Starting over existing checkpoints is refused
    (``CheckpointError``)."""
    existing = checkpointer.steps()
    if resume and existing:
        try:
            state, meta = checkpointer.restore(state)
        except CheckpointUnreadable as error:  # its files passed their checksums (or have none)
            recorded = checkpointer.meta(existing[-1])  # the record alone: is the config the cause?
            changed = [] if recorded is None else _config_differences(recorded["config"], config_dict)
            if not changed:
                raise
            intact = ("Its files match their checksums" if error.verified else
                      "It has no checksum record to vouch for its files, but the config changed")
            raise CheckpointError(
                f"the checkpoint {checkpointer.directory / str(existing[-1])} does not fit this config, which differs "
                f"from the one it was written with: {'; '.join(changed)}. {intact}: resume with the recorded "
                "config (the keys above as they were), or start the new config in another output_dir") from None
        saved = {key: meta["data"].get(key) for key in data}
        if saved != data:
            raise CheckpointError(f"the data changed since the checkpoint ({saved} then, {data} now): data.source, "
                                  "its rows or their tokenization differ, so resuming would not be exact. Restore the "
                                  "data as it was, or start afresh in another output_dir")
        for difference in _config_differences(meta["config"], config_dict):
            log(f"config differs from the checkpoint's: {difference}")
        log(f"resumed from {checkpointer.directory / str(meta['step'])} at step {meta['step']}")
    elif resume:
        log(f"--resume: no checkpoint in {checkpointer.directory}, starting at step 0")
    elif existing:
        raise CheckpointError(f"{checkpointer.directory} already holds checkpoints (steps {existing}); pass --resume "
                              "to continue that run, or choose another output_dir")
    return state


def _held_out(writer: MetricsWriter, job: Job, position: int, values: dict) -> None:
    """A periodic evaluation: written as ``<name>/eval`` and shown on the console."""
    writer.write(position, values, f"{job.name}/eval")
    log(f"held-out at {job.unit} {position}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()
                                                           if isinstance(v, int | float)))


def _last_good(checkpointer: Checkpointer) -> str:
    """Finish the save in flight (a failed one is discarded) and name the checkpoints, which
    restore: skipped updates never reach the parameters, so every checkpoint of a diverging
    run holds finite ones -- though not always good ones."""
    try:
        checkpointer.close()
    except CheckpointError:
        pass  # the write that failed left only orbax's temporary directory, which a resume ignores
    steps = checkpointer.steps()
    if not steps:
        return "No checkpoint was written before it."
    return (f"The newest checkpoint, {checkpointer.directory / str(steps[-1])}, restores (present: {steps}); the "
            "finite updates just before the streak may already have thrown the parameters far, so an earlier one, or "
            "the start, may be the one to resume from after the fix.")


def run_loop(job: Job, config, *, resume: bool, stop_after: int | None) -> RunResult:
    """Run ``job`` from its state (or from the latest checkpoint with ``resume``) to
    ``job.total`` positions, or until a stop request / ``stop_after``; ``config`` gives
    ``output_dir``, ``checkpoint`` and ``metrics``. Raises ``CheckpointError`` and what the
    job's step raises (``TrainingDiverged``)."""
    out, config_dict = Path(config.output_dir), dataclasses.asdict(config)
    checkpointer = Checkpointer(out / "checkpoints", every=config.checkpoint.every, keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    existing = checkpointer.steps()
    state, job.state = job.state, None
    state = restore_or_start(checkpointer, state, resume=resume, config_dict=config_dict, data=job.data)
    start = job.position(state)
    if resume and jax.process_index() == 0:  # no checkpoint: nothing of the stopped run's log stands
        dropped = drop_rows_after(out, start if existing else -1)
        if dropped:
            log(f"metrics: left out {dropped} rows the run that stopped logged after its last checkpoint; this run "
                "logs those steps again")
    writer = MetricsWriter(config.metrics, out, run_config=config_dict, enabled=jax.process_index() == 0)
    if start == 0:
        for kind, values in job.start_records.items():
            writer.write(0, values, kind)
        if job.eval_every:  # the periodic evaluation's curve starts where training starts: a run's own before
            _held_out(writer, job, 0, job.evaluate(state))
    progress = Progress(config.metrics.progress and jax.process_index() == 0, total=job.total, initial=start,
                        description=job.name)
    stopped_by, saved = None, start if resume and existing else None
    if stop_after is not None and stop_after <= start < job.total:  # counted from the run's start: reached already
        stopped_by = "stop_after"
    throughput = Throughput(job.unit)
    with StopRequests() as stop:
        for index in range(start, job.total if stopped_by is None else start):
            done = index + 1
            try:
                state, info = job.step(state, index, done % job.log_every == 0 or done == job.total)
            except TrainingDiverged as error:
                progress.close()
                writer.close()
                raise TrainingDiverged(f"{error} {_last_good(checkpointer)}") from None
            release_freed_memory()  # this step's freed scratch, before the next one lands on top of it
            speed = throughput(info)
            if info.values is not None:
                values = info.values | speed
                writer.write(done, values, f"{job.name}/train")
                progress.update({label: values.get(key, 0.0) for label, key in job.progress.items()})
            if job.eval_every and done % job.eval_every == 0 and done < job.total:
                _held_out(writer, job, done, job.evaluate(state))
            if checkpointer.save(done, state, job.meta(done)):
                saved = done
            if stop.signal or (stop_after is not None and stop_after <= done < job.total):
                stopped_by = stop.signal or "stop_after"
                break
    progress.close()
    position = job.position(state)
    try:  # the final evaluation first, so the final checkpoint is written without the reference in memory
        final = job.evaluate(state) if stopped_by is None else {}
        job.step = job.evaluate = None
    finally:
        if saved != position:
            checkpointer.save(position, state, job.meta(position), force=True)
        checkpointer.close()
    if stopped_by is not None:
        writer.close()
        log(f"stopped at {job.unit} {position} ({stopped_by}); checkpoint saved in {checkpointer.directory}. "
            "Resume with the same command plus --resume" + (" and without --stop-after (or a later one)"
                                                            if stopped_by == "stop_after" else ""))
        return RunResult(position, stopped_by, {}, out)
    if final:
        writer.write(position, final, f"{job.name}/eval")
        log("held-out: " + ", ".join(f"{k} {v:.4g}" for k, v in final.items()))
    model = job.trained_model(state)
    state = None  # the optimiser moments (and a critic) freed before the ending's copies
    job.finish(model)
    writer.close()
    return RunResult(position, None, final, out)

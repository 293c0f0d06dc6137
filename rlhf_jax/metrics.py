"""Metrics out: one JSON line per record, TensorBoard event files, W&B when asked for and
installed, and a console progress bar (steps, loss, tokens/s, ETA)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

from rlhf_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    jsonl: bool = True  # <output_dir>/metrics.jsonl
    tensorboard: bool = True  # <output_dir>/tensorboard/
    wandb: bool = False  # needs `pip install wandb`
    wandb_project: str = "rlhf_jax"
    progress: bool = True  # a tqdm bar on stderr


def peak_rss_gb() -> float:
    """The process's peak resident memory so far, in GiB (``getrusage``: the high-water mark the
    kernel keeps, so a phase's metrics show the most it has needed)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def peak_memory() -> dict[str, float]:
    """What a phase logs of its memory high-water marks, in GiB: ``peak_rss_gb`` (the host
    process) and, on a backend that reports it (GPU, TPU), ``peak_device_gb``, the most any
    local accelerator has held in live buffers (XLA's ``peak_bytes_in_use``; memory the
    allocator reserved but never used is not counted)."""
    import jax

    peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use") for device in jax.local_devices()]
    device_peak = {"peak_device_gb": max(peaks) / 2**30} if peaks and None not in peaks else {}
    return {"peak_rss_gb": peak_rss_gb()} | device_peak


def _plain(value):
    value = float(value) if hasattr(value, "__float__") else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


METRICS_FILE = "metrics.jsonl"


def read_rows(path: Path) -> tuple[list[dict], bool]:
    """``(rows, cut)``: the JSON objects of a ``metrics.jsonl``, and whether its last line was
    cut -- a killed run's partial write, with no newline at its end and not JSON -- which is
    left out. Raises ``ValueError`` naming the line for any other line that is not a JSON
    object with an integer ``step``."""
    text = path.read_text()
    lines = text.splitlines()
    rows, cut = [], False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if number == len(lines) and row is None and not text.endswith("\n"):
            cut = True
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step", 0), int):
            raise ValueError(f"{path} line {number} is not a metrics row (a JSON object with an integer step)")
        rows.append(row)
    return rows, cut


def drop_rows_after(output_dir: Path, step: int) -> int:
    """Before a resume at ``step``: remove the rows of ``output_dir``'s metrics file past
    ``step`` (and a cut last line) -- what the stopped run logged after its last checkpoint,
    which the resumed run logs again -- so no step appears twice. Returns how many rows went."""
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return 0
    rows, cut = read_rows(path)
    kept = [row for row in rows if row.get("step", 0) <= step]
    if len(kept) < len(rows) or cut:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        tmp.replace(path)
    return len(rows) - len(kept) + cut


class TensorBoardFile:
    """TensorBoard scalars written in the calling thread, in tensorboardX's event-file format.
    tensorboardX's ``SummaryWriter`` writes from a background thread: when a write fails (a
    full disk) that thread dies, its queue fills, and the run blocks forever on its next
    metric. Written here, a failed write is an ``OSError`` the run reports in one line."""

    def __init__(self, directory: Path):
        _import_tensorboardx_without_torch()
        from tensorboardX.event_file_writer import EventsWriter

        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.events = EventsWriter(str(directory / "events"))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))])
        self.events.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        self.events.flush()

    def close(self) -> None:
        self.events.close()


def _import_tensorboardx_without_torch() -> None:
    """Imports the tensorboardX package with ``import torch`` failing while it loads, unless
    torch is loaded already. The package's import tries torch (for ``SummaryWriter``'s torch
    tensors, which :class:`TensorBoardFile` does not use) and goes on without it: ~1.4 s of
    every run's start where torch is installed. Later imports of torch are unaffected."""
    import importlib
    import sys

    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # the import system's "not importable" marker
    try:
        importlib.import_module("tensorboardX")
    finally:
        del sys.modules["torch"]


@contextlib.contextmanager
def _naming(path: str):
    """Re-raise a write's ``OSError`` with the file it was writing (a write error names none)."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror or str(error), path) from error


class MetricsWriter:
    """``write(step, {"name": value, ...}, prefix)``; ``close()`` flushes everything."""

    def __init__(self, config: MetricsConfig, output_dir: Path, *, run_config: dict, enabled: bool = True):
        self.jsonl = self.tensorboard = self.wandb = None
        if not enabled:  # processes other than 0 in a multi-host run
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if config.jsonl:
            self.jsonl = open(output_dir / METRICS_FILE, "a", buffering=1)
        if config.tensorboard:
            self.tensorboard = TensorBoardFile(output_dir / "tensorboard")
        if config.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("metrics.wandb is on but wandb is not installed: pip install wandb, "
                                  "or set metrics.wandb=false") from None
            self.wandb = wandb.init(project=config.wandb_project, config=run_config, dir=str(output_dir))

    def write(self, step: int, values: dict, prefix: str) -> None:
        """Write one record; an ``OSError`` (a full disk) names the file that failed."""
        values = {k: _plain(v) for k, v in values.items()}
        numbers = {f"{prefix}/{k}": v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self.jsonl:
            with _naming(self.jsonl.name):
                self.jsonl.write(json.dumps({"step": step, "kind": prefix, **values}) + "\n")
        if self.tensorboard:
            with _naming(str(self.tensorboard.directory)):
                for tag, value in numbers.items():
                    self.tensorboard.add_scalar(tag, value, step)
                self.tensorboard.flush()  # on disk at once: TensorBoard follows a live run
        if self.wandb:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


class Progress:
    """A tqdm bar over the phase's steps (starting at the resumed step)."""

    def __init__(self, enabled: bool, *, total: int, initial: int, description: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True)

    def update(self, values: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

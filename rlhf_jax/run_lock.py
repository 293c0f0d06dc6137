"""One run per output directory: a second run into a directory that a live run is writing is
refused, naming the process that holds it.

The lock is ``fcntl.flock`` on ``<output_dir>/.rlhf_jax.lock`` (the file records the holder's
pid and host): the kernel releases it when the holder exits, however it exits (``kill -9``
included), so a stale lock never blocks a resume. Only process 0 of a multi-host run takes it.
Creating the directory and the lock file is also the run's first write, so an output_dir that
cannot be written is refused here, before any data is read."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from rlhf_jax.config import ConfigError

LOCK_NAME = ".rlhf_jax.lock"


class OutputDirLock:
    """Context manager holding the lock of ``output_dir`` (created when absent); raises
    :class:`ConfigError` when another live process holds it or the directory is not writable."""

    def __init__(self, output_dir: str | Path, *, enabled: bool = True):
        self.path = Path(output_dir) / LOCK_NAME
        self.enabled = enabled
        self._file = None

    def __enter__(self) -> OutputDirLock:
        if not self.enabled:
            return self
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise ConfigError(f"output_dir {self.path.parent} is a file; choose a directory")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+")  # noqa: SIM115 -- held open for the run
        except OSError as error:
            raise ConfigError(f"output_dir {self.path.parent} cannot be written ({error.strerror}); choose another "
                              "output_dir or fix its permissions") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            self._file = None
            raise ConfigError(f"output_dir {self.path.parent} is in use by a running job ({holder}); wait for it "
                              "to finish, stop it, or choose another output_dir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

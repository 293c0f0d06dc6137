"""Host memory handed back to the operating system, and a compiled program's peak.

On a CPU backend XLA's buffers live in the process heap. glibc keeps memory it has freed
for reuse instead of returning it, so after a training step (or a checkpoint's serialisation
buffers) the resident set stays up to a gigabyte above what is live, and the next large
allocation -- the next step's scratch, a checkpoint write -- lands on top of it: the peak
RSS a user sees is that of live memory plus retained garbage. ``malloc_trim(0)`` returns the
free pages of every arena (the step's own buffers are untouched), at a cost of milliseconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return the C heap's free pages to the operating system (glibc ``malloc_trim(0)``); a
    no-op where the C library lacks it. Safe while a jitted program runs: it touches only
    memory nobody holds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def program_peak_bytes(compiled) -> int:
    """The per-device peak of a compiled program (``jax.stages.Compiled``) by XLA's own
    memory analysis, bytes: arguments + outputs - the outputs aliasing donated arguments +
    temporaries + generated code. What ``rlhf-jax plan`` reports and a run logs."""
    memory = compiled.memory_analysis()
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
               + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)

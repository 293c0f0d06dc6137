"""The check a run makes before it loads any weight: its programs planned on its own devices
(:func:`rlhf_jax.plan.plan`, abstract parameters, nothing read but the checkpoint's config)
against the memory each device has, so a config that cannot fit is refused in seconds
rather than out of memory after the weights are in."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from rlhf_jax.config import ConfigError
from rlhf_jax.phases.console import log
from rlhf_jax.plan.targets import GIB, Target


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.2f} MiB"


def device_memory_bytes(mesh: Mesh, stated_gb: float | None) -> int | None:
    """Bytes per device: ``stated_gb`` when given, else the smallest ``bytes_limit`` the mesh's
    local devices report (a GPU's or TPU's allocator); None where they report none (a CPU)."""
    if stated_gb is not None:
        return int(stated_gb * 1e9)
    limits = []
    for device in mesh.devices.flat:
        if device.process_index == jax.process_index() and device.platform != "cpu":
            stats = device.memory_stats() or {}
            if stats.get("bytes_limit"):
                limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def preflight(phase_name: str, config, mesh: Mesh) -> dict | None:
    """Plan ``phase_name`` on ``config`` for ``mesh``'s devices and log the peaks; the plan, or
    None when ``mesh.preflight`` is off or the devices state no memory. Raises ``ConfigError``
    naming each program that does not fit, its largest term and the knobs that shrink it."""
    from rlhf_jax.plan import SHRINK, Measured, plan  # the plan's programs import the phases, which call this

    memory = device_memory_bytes(mesh, config.mesh.device_memory_gb) if config.mesh.preflight else None
    if memory is None:
        return None
    platform = mesh.devices.flat[0].platform
    target = Target(f"{mesh.devices.size} {platform} devices x {_size(memory)}", tuple(mesh.devices.flat),
                    memory, platform)
    result = plan(phase_name, config, target)
    peaks = ", ".join(f"{p['name']} {p['peak_bytes_per_device'] / 2**20:.2f} MiB" for p in result["programs"])
    if not result["fits"]:
        failing = [Measured.of_entry(p) for p in result["programs"] if not p["fits"]]
        reasons = "; ".join(f"{m.name} needs {_size(m.peak_bytes or 0)}, its largest term {m.largest_term()} "
                            f"(to shrink it: {SHRINK[m.largest_term()]})" for m in failing)
        raise ConfigError(f"this config does not fit {target.name}: {reasons}. `rlhf-jax plan` prints the whole "
                          "table; mesh.device_memory_gb states another memory, mesh.preflight: false skips the check")
    log(f"preflight on {target.name}: fits; peak per device: {peaks}")
    return result

"""Where a plan compiles: a Cloud TPU slice by name (libtpu's compiler, on this host, for the
slice's topology -- no TPU needed), or ``N`` fake CPU devices with a stated memory each."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

from rlhf_jax.config import ConfigError

GIB = 2**30
# Cloud TPU generations: the topology prefix libtpu names them by, TensorCores per chip (the
# number in a slice's name counts cores for v4 and v5p, chips for v5e and v6e), HBM per chip,
# and how many chips one host drives.
TPU_GENERATIONS = {
    "v4": {"topology": "v4", "cores_per_chip": 2, "hbm_bytes": 32 * GIB, "host_bounds": (2, 2, 1), "dims": 3},
    "v5p": {"topology": "v5p", "cores_per_chip": 2, "hbm_bytes": 95 * GIB, "host_bounds": (2, 2, 1), "dims": 3},
    "v5e": {"topology": "v5e", "cores_per_chip": 1, "hbm_bytes": 16 * GIB, "host_bounds": (2, 2, 1), "dims": 2},
    "v6e": {"topology": "v6e", "cores_per_chip": 1, "hbm_bytes": 32 * GIB, "host_bounds": (2, 2, 1), "dims": 2},
}
# the chip grid of each slice size (chips -> topology), as Cloud TPU lays slices out
GRIDS = {2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
         3: {1: "1x1x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8"}}


@dataclasses.dataclass(frozen=True)
class Target:
    """What a plan compiles for: ``devices`` (a TPU topology's, or fake CPU ones) with
    ``memory_bytes`` each; ``name`` says which in the report."""

    name: str
    devices: tuple
    memory_bytes: int
    platform: str  # "tpu" or "cpu"


def tpu_target(name: str) -> Target:
    """The Cloud TPU slice ``name`` (``v5p-8``, ``v5e-16``, ``v4-32``, ``v6e-8``, ...) as libtpu's
    topology on this host. Raises ``ConfigError`` for an unknown name, and when libtpu is not
    installed (``pip install -e ".[tpu]"``)."""
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if match is None:
        raise ConfigError(f"--topology {name!r} is not a Cloud TPU slice name; give one like "
                          f"{', '.join(f'{g}-8' for g in TPU_GENERATIONS)}")
    generation = TPU_GENERATIONS["v5e" if match.group(1) == "v5litepod" else match.group(1)]
    count = int(match.group(2))
    per_chip = generation["cores_per_chip"]
    chips, grids = count // per_chip, GRIDS[generation["dims"]]
    if count % per_chip or chips not in grids:
        sizes = ", ".join(f"{match.group(1)}-{c * per_chip}" for c in grids)
        raise ConfigError(f"--topology {name}: no {match.group(1)} slice of {count} "
                          f"{'cores' if per_chip > 1 else 'chips'}; sizes: {sizes}")
    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:  # the compiler a TPU topology needs
        raise ConfigError(f"--topology {name} compiles with libtpu's TPU compiler, which is not installed; "
                          'install it with pip install -e ".[tpu]" (no TPU needed), or plan for CPU devices with '
                          "--devices N --device-memory-gb G")
    grid = [int(g) for g in grids[chips].split("x")] + [1] * (3 - generation["dims"])
    bounds = tuple(min(b, g) for b, g in zip(generation["host_bounds"], grid))
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{generation['topology']}-{count}")  # quiets libtpu's probe
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    topology = topologies.get_topology_desc(platform="tpu", topology_name=f"{generation['topology']}:{grids[chips]}",
                                            chip_config_name="default", chips_per_host_bounds=bounds, num_slices=1)
    devices = tuple(topology.devices)  # a chip's cores may be devices of their own (v4): its HBM is shared out
    return Target(name, devices, generation["hbm_bytes"] * chips // len(devices), "tpu")


def cpu_target(devices: int, memory_gb: float) -> Target:
    """``devices`` CPU devices of ``memory_gb`` GB each (the process must have been started with
    that many: ``XLA_FLAGS=--xla_force_host_platform_device_count``, set by the ``plan``
    command). Raises ``ConfigError`` when it has fewer."""
    import jax

    cpus = jax.devices("cpu")
    if len(cpus) < devices:
        raise ConfigError(f"--devices {devices}: this process has {len(cpus)} CPU devices; run rlhf-jax plan in a "
                          "fresh process (it sets XLA_FLAGS before JAX starts)")
    return Target(f"{devices} CPU devices x {memory_gb:g} GB", tuple(cpus[:devices]), int(memory_gb * 1e9), "cpu")

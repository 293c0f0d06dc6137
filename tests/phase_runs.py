"""Running ``rlhf-jax`` phases in fresh processes, and reading back their checkpoints."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
QUIET = ["metrics.progress=false", "train.samples=0"]
# The fresh processes of the end-to-end tests share one persistent XLA compilation cache: a
# test's straight, stopped and resumed runs (and other tests of the same config) compile the
# same programs, and a hit loads the executable compiled before -- the same code, so the
# results are the same. Under .pytest_cache, so cold in a fresh clone (CI); bounded in size,
# which also makes jax hold a file lock around each read and write (two pytest workers).
# A CLI run of a tiny config spends most of its time compiling: its fresh process compiles
# faster without XLA's expensive optimisations (measured: resume tests ~30% faster) and with the
# CPU backend's elemental emitters instead of its MLIR fusion emitters (a tiny PPO run on five
# meshes: 29 s instead of 44 s). Not for runs that train for long (a notebook, the built-in
# pipeline) nor the pytest workers' optimisation level, whose in-process tests compute more
# than they compile (measured several times slower; conftest gives them the emitters only).
# As per-program options (``jax.jit(..., compiler_options=...)``) for in-process tests that
# compile many small programs and run each a step or two (the mesh tests: ~40% less compile
# time), and as ``XLA_FLAGS`` for a subprocess; float results may differ from XLA's default
# build in the last bits.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                        "xla_cpu_use_fusion_emitters": False}
FAST_COMPILE = " ".join(f"--{name}={str(value).lower()}" for name, value in FAST_COMPILE_OPTIONS.items())
COMPILATION_CACHE = {"JAX_COMPILATION_CACHE_DIR": str(ROOT / ".pytest_cache" / "xla"),
                     "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
                     "JAX_COMPILATION_CACHE_MAX_SIZE": str(2 << 30)}


def process_env(devices: int | None = None, *, cache: bool = True, fast_compile: bool = True,
                **extra: str) -> dict[str, str]:
    """The environment of a fresh CPU process: ``devices`` fake CPU devices (one without),
    the shared compilation cache unless ``cache`` is false, ``FAST_COMPILE`` unless
    ``fast_compile`` is false, then ``extra``."""
    dropped = {"XLA_FLAGS", *(() if cache else COMPILATION_CACHE)}
    env = {k: v for k, v in os.environ.items() if k not in dropped} | {"JAX_PLATFORMS": "cpu"}
    env |= COMPILATION_CACHE if cache else {}
    flags = [FAST_COMPILE] * fast_compile + [f"--xla_force_host_platform_device_count={devices}"] * bool(devices)
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return env | extra


def cli(*args, devices: int | None = None, timeout: int = 300, extra_env: dict | None = None,
        fast_compile: bool = True, **popen) -> subprocess.CompletedProcess:
    env = process_env(devices, fast_compile=fast_compile, **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "rlhf_jax.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


IN_TURN = ("import json, sys\nfrom rlhf_jax import cli\n"
           "sys.exit(next((code for argv in json.loads(sys.argv[1]) if (code := cli.main(argv))), 0))")


def cli_in_turn(runs: list[list], devices: int | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``rlhf-jax`` with each argument list of ``runs`` in turn, in one fresh process (one
    interpreter start and import for all), stopping at the first that fails, its exit code
    the process's."""
    import json

    return subprocess.run([sys.executable, "-c", IN_TURN, json.dumps([[*map(str, argv)] for argv in runs])], cwd=ROOT,
                          env=process_env(devices), capture_output=True, text=True, timeout=timeout)


def killed_and_resumed(out: Path, runs: dict[str, list], checkpoint: int) -> subprocess.CompletedProcess:
    """Each run of ``runs`` (name -> ``rlhf-jax`` arguments but the output directory) straight
    to ``out/NAME/straight`` in one process; a copy of each in ``out/NAME/split`` without its
    checkpoint ``checkpoint`` (a run killed after that update, before its checkpoint left);
    the copies resumed (``--resume``) in one new process, which is returned. Asserts both
    processes exit 0."""
    import shutil

    straight = cli_in_turn([[*argv, f"output_dir={out / name / 'straight'}"] for name, argv in runs.items()])
    assert straight.returncode == 0, straight.stderr[-3000:]
    for name in runs:
        shutil.copytree(out / name / "straight", out / name / "split")
        shutil.rmtree(out / name / "split" / "checkpoints" / str(checkpoint))
    resumed = cli_in_turn([[*argv, f"output_dir={out / name / 'split'}", "--resume"] for name, argv in runs.items()])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return resumed


def main_in_process(capsys, *args) -> tuple[int, str]:
    """``(exit code, stderr)`` of ``rlhf-jax *args`` run by the CLI's entry point in this
    process (its 8 test devices; no new interpreter to start): for the errors a run names
    before it trains."""
    from rlhf_jax import cli as rlhf_cli

    capsys.readouterr()
    code = rlhf_cli.main([*map(str, args)])
    return code, capsys.readouterr().err


def cli_hosts(*args, processes: int = 2, devices: int = 4, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """``rlhf-jax *args`` as a multi-host run: ``processes`` local processes joined by
    ``jax.distributed`` (a coordinator on a free local port), ``devices`` CPU devices each."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = process_env(devices, cache=False)  # measured slower with it: two hosts of one run on one cache
    runs = [subprocess.Popen([sys.executable, "-m", "rlhf_jax.cli", *map(str, args), "--coordinator",
                              f"localhost:{port}", "--num-processes", str(processes), "--process-id", str(i)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(processes)]
    results = []
    for run in runs:
        try:
            stdout, stderr = run.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in runs:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr))
    return results


def checkpoint_arrays(output_dir: Path, step: int) -> dict:
    """``{"params": ..., "opt_state": ..., ...}`` of one checkpoint as numpy leaves."""
    import jax
    import orbax.checkpoint as ocp

    path = Path(output_dir).absolute() / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever topology saved it
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                          checkpointer.metadata(path).item_metadata)
    restored = checkpointer.restore(path, target)
    def plain(x):
        return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)

    return jax.tree.map(plain, restored)


def leaves_with_paths(tree) -> list:
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)[0]


def assert_bit_identical(a, b) -> None:
    """Every leaf of two checkpoint trees has the same dtype and the same bits."""
    for (path, x), (_, y) in zip(leaves_with_paths(a), leaves_with_paths(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{path} differs"

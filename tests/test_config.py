import dataclasses
from pathlib import Path

import pytest

from rlhf_jax import config, demo, phases

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_every_shipped_config_loads():
    assert CONFIGS, "configs/ is empty"
    loaders = {"demo": demo.DemoConfig} | {name: phase.config_cls for name, phase in phases.PHASES.items()}
    for path in CONFIGS:
        kind = path.stem.split("_")[0]
        assert kind in loaders, f"{path.name}: name it <{'|'.join(loaders)}>_<what>.yaml"
        loaded = config.load(loaders[kind], path)
        assert dataclasses.is_dataclass(loaded)
        if kind != "demo":  # its data is in the repo (tests/data) or the shared test data
            source = loaded.data.source
            assert source.startswith("../shared/data/") or (path.parents[1] / source).exists(), source


def test_shipped_demo_config_is_the_built_in_default():
    assert config.load(demo.DemoConfig, Path(__file__).parent.parent / "configs" / "demo.yaml") == demo.DemoConfig()


def test_overrides_and_int_to_float():
    loaded = config.load(demo.DemoConfig, None, ["ppo_iterations=7", "kl_target=4"])
    assert loaded.ppo_iterations == 7 and loaded.kl_target == 4.0 and isinstance(loaded.kl_target, float)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ppo_iteration=3"], "unknown config key 'ppo_iteration'; valid keys are: .*ppo_iterations"),
        (["ppo_iterations=three"], "ppo_iterations: expected int, got str"),
        (["seed"], "key=value"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(demo.DemoConfig, None, overrides)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        demo.DemoConfig().seed = 3


def test_default_xla_flags_are_added_but_never_override_the_users():
    from rlhf_jax._xla_flags import add_default_xla_flags

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    add_default_xla_flags(env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --xla_gpu_enable_triton_gemm=false"
    add_default_xla_flags(env)  # idempotent
    assert env["XLA_FLAGS"].count("triton_gemm") == 1
    users = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
    add_default_xla_flags(users)
    assert users["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=true"
    empty = {}
    add_default_xla_flags(empty)
    assert empty["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=false"

import dataclasses
from pathlib import Path

import pytest

from config_checks import CONFIG_CLASSES, FILE_PREFIXES, command_of, load_and_check
from rlhf_jax import config, pipeline
from rlhf_jax.phases.online_config import OnlineConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_every_shipped_config_loads():
    assert CONFIGS, "configs/ is empty"
    for path in CONFIGS:
        command = command_of(path)
        assert command is not None, f"{path.name}: name it <{'|'.join([*CONFIG_CLASSES, *FILE_PREFIXES])}>_<what>.yaml"
        loaded = load_and_check(command, path)  # every option it sets acts (phases.audit)
        assert dataclasses.is_dataclass(loaded)
        if command != "pipeline":  # its data is in the repo (tests/data), the shared test data, or another recipe's
            source = loaded.data.source
            assert source.startswith(("../shared/data/", "runs/")) or (path.parents[1] / source).exists(), source


def test_shipped_pipeline_config_is_the_built_in_default():
    shipped = config.load(pipeline.PipelineConfig, Path(__file__).parent.parent / "configs" / "pipeline_letters.yaml")
    assert shipped == pipeline.PipelineConfig()


def test_overrides_and_int_to_float():
    loaded = config.load(OnlineConfig, None, ["data.source=p.jsonl", "data.format=prompt", "kl.beta=1",
                                              "rollout.completion_buckets=[8, 16]"])
    assert loaded.kl.beta == 1.0 and isinstance(loaded.kl.beta, float) and loaded.rollout.completion_buckets == (8, 16)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["kl.bta=3"], r"unknown config key 'kl.bta'; did you mean 'kl.beta'\? valid keys are: beta, horizon, "
                       "in_loss, kind, target"),
        (["kl.beta=three"], "kl.beta: expected float, got str"),
        (["algorithm=ddpg"], "algorithm: 'ddpg' is not one of ppo, grpo, rloo, reinforce, raft"),
        (["seed"], "key=value"),
        ([], "missing required config key 'data'"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    required = ["data.source=p.jsonl", "data.format=prompt"] if overrides else []
    with pytest.raises(config.ConfigError, match=message):
        config.load(OnlineConfig, None, required + overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["phases=[sft, ppo, rm]"], r"phases .*: give each once, in the order sft -> rm/prm -> dpo/.*/ppo/"),
        (["phases=[sft, ddpg]"], "unknown phase 'ddpg'"),
        (["stages=[sft, rm]"], "unknown config key 'stages'; it is called phases now"),
        (["ppo.train.iteration=3"], r"unknown config key 'ppo.train.iteration'; did you mean "
                                    r"'ppo.train.iterations'\? valid keys are: .*iterations"),
        (["rm.train.steps=many"], "rm.train.steps: expected int, got str"),
    ],
)
def test_bad_pipeline_config_names_the_phase_and_key(overrides, message, tmp_path):
    with pytest.raises(config.ConfigError, match=message):
        loaded = config.load(pipeline.PipelineConfig, None, [f"output_dir={tmp_path}", *overrides])
        pipeline.Pipeline(loaded).run()  # phase sections are checked, all of them, before any phase runs


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        OnlineConfig(data=None).seed = 3


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

"""rlhf-jax plan: the programs of a run compiled with abstract weights for N CPU devices (and,
where libtpu is installed, a TPU slice's topology), measured from XLA's own analysis; a
program over the device memory is refused, naming its largest term."""

import importlib.util
import json
import os

import pytest
from phase_runs import cli, main_in_process

pytestmark = pytest.mark.fast_compile  # compile-bound: tests/conftest.py


def test_plan_on_cpu_devices_reports_the_step_and_refuses_what_does_not_fit(tmp_path, capsys, monkeypatch):
    run = cli("plan", "sft", "configs/sft_tiny.yaml", "--devices", 4, "--device-memory-gb", 1, "--json",
              tmp_path / "plan.json", "mesh.fsdp=2")
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "plan.json").read_text())
    assert result["fits"] and result["devices"] == 4 and result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    (step,) = result["programs"]
    assert step["name"] == "sft step" and step["flops"] > 0 and step["collectives"]["all-reduce"] > 0
    # no remat at this size: what the program multiplies is what the model's passes need (PaLM's count
    # is within 1% of the compiled one: it charges the attention of every key)
    assert step["uncounted_loops"] == 0 and 0.99 < step["model_flops_share"] < 1.01
    assert step["peak_bytes_per_device"] == step["peak_bytes"] > step["parameter_bytes"] + step["optimizer_bytes"] > 0
    too_small = cli("plan", "sft", "configs/sft_tiny.yaml", "--devices", 4, "--device-memory-gb", 0.0001)
    assert too_small.returncode == 1, too_small.stderr
    assert "does not fit" in too_small.stdout and "the largest term is" in too_small.stdout
    code, err = main_in_process(capsys, "plan", "sft", "configs/sft_tiny.yaml")  # refused before any compile
    assert code == 2 and "give --topology NAME" in err
    # what the run would refuse, the plan refuses: a key the phase does not use (``--devices`` sets this
    # process's XLA_FLAGS for a backend not started yet: restored after the test)
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    code, err = main_in_process(capsys, "plan", "sft", "configs/sft_tiny.yaml", "--devices", 1, "--device-memory-gb", 1,
                                "mesh.sampler_rules={vocab: tensor, heads: tensor, kv: tensor, mlp: tensor}")
    assert code == 2 and "has no effect in sft" in err


def test_plan_of_an_online_iteration_builds_the_sampler_and_the_update(tmp_path):
    run = cli("plan", "grpo", "configs/grpo_tiny.yaml", "--devices", 2, "--device-memory-gb", 1, "--json",
              tmp_path / "plan.json", "mesh.fsdp=2")
    assert run.returncode == 0, run.stderr
    sampler, update = json.loads((tmp_path / "plan.json").read_text())["programs"]
    assert sampler["name"].startswith("sampler") and update["name"].startswith("update")
    # float32 weights of the policy and its reference, both split over fsdp=2: as many bytes as the policy's
    # two float32 Adam moments (and optax's step counters)
    assert 0 <= update["optimizer_bytes"] - update["parameter_bytes"] <= 16 and update["parameter_bytes"] > 0
    assert update["flops"] > sampler["flops"] > 0 and 0.99 < update["model_flops_share"] < 1.01
    # the update returns the new train state (policy weights and Adam moments) and the metrics: no copy
    # of the reference's weights nor of the donated state (nnx.jit's graph updates returned both)
    policy = update["parameter_bytes"] // 2
    assert 0 <= update["output_bytes"] - (policy + update["optimizer_bytes"]) < 4096, update
    assert sampler["uncounted_loops"] == 1 and sampler["model_flops"] is None  # the decode loop stops on its rows
    # the FSDP-split policy is gathered inside the decode loop; laid out whole for sampling
    # (mesh.sampler_rules without embed over fsdp; tensor=1: every weight whole) it is not
    assert sampler["collectives"].get("all-gather", 0) > 0
    whole = cli("plan", "grpo", "configs/grpo_tiny.yaml", "--devices", 2, "--device-memory-gb", 1, "--json",
                tmp_path / "whole.json", "mesh.fsdp=2",
                "mesh.sampler_rules={vocab: tensor, heads: tensor, kv: tensor, mlp: tensor}")
    assert whole.returncode == 0, whole.stderr
    gathered, _ = json.loads((tmp_path / "whole.json").read_text())["programs"]
    assert "all-gather" not in gathered["collectives"]  # (an all-reduce stays: whether any row still runs)
    assert gathered["parameter_bytes"] == 2 * sampler["parameter_bytes"]
    # held while sampling: the Adam moments and the reference (the policy's own weights are the sampler's
    # arguments), plus the policy's training copy when it samples from a moved one
    reference = update["parameter_bytes"] // 2
    assert 0 <= sampler["resident_bytes"] - (update["optimizer_bytes"] + reference) <= 64
    assert gathered["resident_bytes"] - sampler["resident_bytes"] == reference
    paged = cli("plan", "grpo", "configs/grpo_tiny.yaml", "--devices", 2, "--device-memory-gb", 1, "--json",
                tmp_path / "paged.json", "mesh.fsdp=2", "rollout.engine=continuous", "rollout.slots=2",
                "rollout.page_size=8")
    assert paged.returncode == 0, paged.stderr
    continuous, _ = json.loads((tmp_path / "paged.json").read_text())["programs"]
    # two slots' pages instead of every row's whole cache
    assert continuous["name"] == "sampler: continuous batching" and continuous["peak_bytes"] < sampler["peak_bytes"]


@pytest.mark.parametrize("phase, extra", [("sft", ["data.pad_multiple=128"]), ("dpo", [])])
def test_the_preflight_plans_the_peak_of_the_program_the_run_compiles(tmp_path, capsys, phase, extra):
    """Before it loads weights the run plans its step on its own devices (the preflight, at a
    stated memory: a CPU states none) and later logs XLA's analysis of the step it compiled
    (``step_program_peak_gb``). At batches of ``data.max_length`` (every batch padded to it
    here) the plan builds that very program: the same bytes. DPO's reference forward is fused
    in both."""
    import re

    from rlhf_jax import config
    from rlhf_jax.phases import PHASES, run_phase

    loaded = config.load(PHASES[phase].config_cls, f"configs/{phase}_tiny.yaml", [
        f"output_dir={tmp_path}", "metrics.progress=false", "train.samples=0", "train.steps=1",
        "train.optimizer.warmup_steps=0", "checkpoint.export_hf=false", "mesh.device_memory_gb=16", *extra])
    run_phase(PHASES[phase], loaded)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ran = next(row for row in rows if row["kind"] == f"{phase}/train")
    planned = re.search(rf"preflight on 8 cpu devices x 14.90 GiB: fits; peak per device: {phase} step "
                        r"([0-9.]+) MiB", capsys.readouterr().out)
    assert ran["step_programs"] == 1 and planned is not None
    assert float(planned.group(1)) == pytest.approx(ran["step_program_peak_gb"] * 2**10, rel=0.01)


def test_a_run_that_cannot_fit_is_refused_before_it_loads_anything(tmp_path, capsys):
    """An online run too big for the stated device memory: a ConfigError naming the program,
    its largest term and the knobs, raised before the prompts or any model are read."""
    from rlhf_jax import config
    from rlhf_jax.config import ConfigError
    from rlhf_jax.phases.online import OnlineConfig, run_online

    loaded = config.load(OnlineConfig, "configs/grpo_tiny.yaml", [f"output_dir={tmp_path}", "metrics.progress=false",
                                                                 "rollout.prompts=8", "mesh.device_memory_gb=0.0001"])
    with pytest.raises(ConfigError, match=r"this config does not fit 8 cpu devices x 0.10 MiB: .* needs .* MiB, its "
                                          r"largest term .* \(to shrink it: .*mesh.preflight: false skips the check"):
        run_online(loaded)
    assert "samples per iteration" not in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason='libtpu is not installed (pip install -e ".[tpu]")')
def test_plan_compiles_for_a_tpu_slice_and_names_a_slice_that_does_not_exist(tmp_path):
    run = cli("plan", "sft", "configs/sft_tiny.yaml", "--topology", "v5e-4", "--json", tmp_path / "plan.json")
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "plan.json").read_text())
    assert result["devices"] == 4 and result["device_memory_bytes"] == 16 * 2**30 and result["fits"]
    wrong = cli("plan", "sft", "configs/sft_tiny.yaml", "--topology", "v5e-6")
    assert wrong.returncode == 2 and "no v5e slice of 6 chips" in wrong.stderr


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason='libtpu is not installed (pip install -e ".[tpu]")')
def test_the_continuous_sampler_compiles_the_pallas_paged_attention_kernel_for_a_tpu_slice():
    """bf16 and 128-wide heads: ``auto`` takes the kernel on the TPU target and Mosaic compiles
    it, one call per layer (the sampler has no other custom kernel: its prefill keeps the cache
    path); ``auto``'s choice on each target is tested in ``tests/test_paged_attention.py``."""
    from config_checks import load_and_check
    from rlhf_jax.models.attention import compiling_for
    from rlhf_jax.models.sharding import activation_sharding
    from rlhf_jax.phases.setup import make_mesh
    from rlhf_jax.plan import measure
    from rlhf_jax.plan.programs import online_programs
    from rlhf_jax.plan.targets import tpu_target

    target = tpu_target("v5e-4")
    config = load_and_check("grpo", "configs/grpo_tiny.yaml", [
        "model.dtype=bfloat16", "model.param_dtype=bfloat16", "model.init.hidden_size=256",
        "model.init.num_attention_heads=2", "model.init.num_key_value_heads=1", "rollout.engine=continuous"])
    with activation_sharding(), compiling_for("tpu"):  # as rlhf-jax plan --topology v5e-4, the sampler alone
        sampler = next(p for p in online_programs(config, make_mesh(config.mesh, devices=target.devices))
                       if p.name.startswith("sampler"))
        measured = measure(sampler, target)
    assert measured.fits and measured.custom_kernels == config.model.init["num_hidden_layers"] == 2


def test_a_cpu_host_with_libtpu_installed_runs_on_the_cpu_without_starting_the_tpu_plugin():
    from rlhf_jax.platforms import default_platforms

    run = ["sft", "configs/sft_tiny.yaml"]
    assert default_platforms(run, {}, libtpu=True, cuda=False, tpu_chips=False) == "cpu"
    assert default_platforms(["plan", "dpo", "c.yaml", "--topology", "v5p-8"], {}, libtpu=True, cuda=False,
                             tpu_chips=False) is None  # libtpu's compiler is the point
    assert default_platforms(["plan", "dpo", "c.yaml", "--devices", "8"], {}, libtpu=True, cuda=False,
                             tpu_chips=False) == "cpu"
    for unchanged in ({"libtpu": False, "cuda": False, "tpu_chips": False}, {"libtpu": True, "cuda": False,
                      "tpu_chips": True}, {"libtpu": True, "cuda": True, "tpu_chips": False}):
        assert default_platforms(run, {}, **unchanged) is None, unchanged
    assert default_platforms(run, {"JAX_PLATFORMS": "tpu"}, libtpu=True, cuda=False, tpu_chips=False) is None

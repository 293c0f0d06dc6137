"""Phases on two hosts: two local processes joined by ``jax.distributed``, four CPU devices
each, the parameters split across the hosts; SFT, DPO and PPO train, evaluate, write samples
and export as one process with the same 8 devices does."""

import numpy as np
import pytest
from phase_runs import QUIET, checkpoint_arrays, cli, cli_hosts, leaves_with_paths

MESH = ["mesh.data=2", "mesh.fsdp=4"]


def two_hosts_and_one(tmp_path, args: list[str], step: int, atol: float) -> None:
    """Run ``args`` on two hosts and on one with the same 8 devices; the same held-out lines
    (reported by process 0 only), the same state at ``step`` within ``atol``, an export."""
    hosts = cli_hosts(*args, f"output_dir={tmp_path / 'hosts'}")
    assert all(run.returncode == 0 for run in hosts), hosts[0].stderr[-2000:] + hosts[1].stderr[-2000:]
    one = cli(*args, f"output_dir={tmp_path / 'one'}", devices=8)
    assert one.returncode == 0, one.stderr
    held_out = [line for line in hosts[0].stdout.splitlines() if "held-out" in line]
    assert held_out and held_out == [line for line in one.stdout.splitlines() if "held-out" in line]
    assert not [line for line in hosts[1].stdout.splitlines() if "held-out" in line]
    for (path, a), (_, b) in zip(leaves_with_paths(checkpoint_arrays(tmp_path / "hosts", step)),
                                 leaves_with_paths(checkpoint_arrays(tmp_path / "one", step)), strict=True):
        np.testing.assert_allclose(a, b, atol=atol, err_msg=str(path))
    assert (tmp_path / "hosts" / "hf" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("phase, extra", [("sft", []), ("dpo", ["dpo.reference_logps=precompute"])])
def test_offline_phases_on_two_hosts_train_as_on_one(tmp_path, phase, extra):
    two_hosts_and_one(tmp_path, [phase, f"configs/{phase}_tiny.yaml", "train.steps=4", *MESH, *QUIET,
                                 "train.samples=2", *extra], step=4, atol=5e-6)  # rounding of the cross-host gradient sum
    assert len((tmp_path / "hosts" / "samples.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_a_ppo_run_on_two_hosts_is_the_run_on_one(tmp_path):
    # two updates: Adam's normalisation lifts 1e-8 differences of reduction order to ~3e-6
    two_hosts_and_one(tmp_path, ["ppo", "configs/ppo_tiny.yaml", "train.iterations=2", *MESH,
                                 "metrics.progress=false"], step=2, atol=1e-5)

"""The offline phases on two hosts: two local processes joined by ``jax.distributed``, four CPU
devices each, the parameters split across the hosts (fsdp over all 8 devices), train, evaluate,
write samples and export exactly as one process with the same 8 devices does."""

import numpy as np
import pytest
from phase_runs import QUIET, checkpoint_arrays, cli, cli_hosts, leaves_with_paths

RUN = ["train.steps=4", "mesh.data=2", "mesh.fsdp=4", *QUIET, "train.samples=2"]


@pytest.mark.slow
@pytest.mark.parametrize("phase, extra", [("sft", []), ("dpo", ["dpo.reference_logps=precompute"])])
def test_two_hosts_train_as_one_host_with_the_same_devices(tmp_path, phase, extra):
    args = [phase, f"configs/{phase}_tiny.yaml", *RUN, *extra]
    hosts = cli_hosts(*args, f"output_dir={tmp_path / 'hosts'}")
    assert all(run.returncode == 0 for run in hosts), hosts[0].stderr[-2000:] + hosts[1].stderr[-2000:]
    one = cli(*args, f"output_dir={tmp_path / 'one'}", devices=8)
    assert one.returncode == 0, one.stderr
    held_out = [line for line in hosts[0].stdout.splitlines() if "held-out" in line]
    assert held_out and held_out == [line for line in one.stdout.splitlines() if "held-out" in line]
    assert not [line for line in hosts[1].stdout.splitlines() if "held-out" in line]  # process 0 reports
    for (path, a), (_, b) in zip(leaves_with_paths(checkpoint_arrays(tmp_path / "hosts", 4)),
                                 leaves_with_paths(checkpoint_arrays(tmp_path / "one", 4)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=str(path))
    assert (tmp_path / "hosts" / "hf" / "model.safetensors").exists()
    assert len((tmp_path / "hosts" / "samples.jsonl").read_text().splitlines()) == 2


def test_the_online_phases_say_they_need_one_host(tmp_path):
    hosts = cli_hosts("ppo", "configs/ppo_tiny.yaml", f"output_dir={tmp_path}", "metrics.progress=false")
    for run in hosts:
        assert run.returncode == 2 and "the online phases run in one process for now" in run.stderr, run.stderr[-2000:]

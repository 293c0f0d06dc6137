"""A phase on four hosts: four local processes joined by ``jax.distributed``, two CPU devices
each, the parameters split across the hosts. DPO trains and evaluates (process 0 alone
reporting) as one process with the same 8 devices does, and its checkpoint the four processes
wrote resumes in one process on another mesh shape. SFT, PPO and GRPO on four hosts are
``tests/test_mesh.py``'s (beside the same phases on every mesh shape)."""

import numpy as np
import pytest
from phase_runs import QUIET, checkpoint_arrays, cli, cli_hosts, leaves_with_paths

MESH = ["mesh.data=2", "mesh.fsdp=4"]
HOSTS = {"processes": 4, "devices": 2}


@pytest.mark.slow
def test_an_offline_phase_on_four_hosts_trains_as_on_one_and_resumes_in_one_process_on_another_mesh(tmp_path):
    """DPO with its reference log-probs precomputed across the hosts: two steps on four hosts,
    stopped, two more in one process on another mesh shape; the state at both checkpoints is
    that of one process on the hosts' mesh, and so are the held-out lines the hosts print
    (process 0 only)."""
    args = ["dpo", "configs/dpo_tiny.yaml", "train.steps=4", "checkpoint.every=2", "train.eval_every=2",
            "model.init.vocab_size=264", "model.init.num_hidden_layers=1", *QUIET, "train.samples=2",
            "dpo.reference_logps=precompute"]
    hosts = cli_hosts(*args, f"output_dir={tmp_path / 'run'}", *MESH, "--stop-after", 2, **HOSTS)
    assert all(run.returncode == 0 for run in hosts), "\n".join(run.stderr[-1500:] for run in hosts)
    other_mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    resumed = cli(*args, f"output_dir={tmp_path / 'run'}", *other_mesh, "--resume", devices=8)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr
    straight = cli(*args, f"output_dir={tmp_path / 'straight'}", *MESH, devices=8)
    assert straight.returncode == 0, straight.stderr
    held_out = [line for line in hosts[0].stdout.splitlines() if "held-out" in line]
    assert held_out and held_out == [line for line in straight.stdout.splitlines() if "held-out" in line][:len(held_out)]
    assert not any("held-out" in line for run in hosts[1:] for line in run.stdout.splitlines())
    for step, atol in ((2, 5e-6), (4, 1e-5)):  # rounding of the cross-host sums; then two steps on another mesh
        for (path, a), (_, b) in zip(leaves_with_paths(checkpoint_arrays(tmp_path / "run", step)),
                                     leaves_with_paths(checkpoint_arrays(tmp_path / "straight", step)), strict=True):
            np.testing.assert_allclose(a, b, atol=atol, err_msg=f"step {step} {path}")
    assert len((tmp_path / "run" / "samples.jsonl").read_text().splitlines()) == 2

"""tpu/launch.sh and slurm/submit.sh with --dry-run: the gcloud / sbatch commands a multi-host
slice or a GPU cluster run takes, printed and not run."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def dry_run(script: str, *args):
    return subprocess.run(["bash", str(ROOT / script), "--dry-run", *map(str, args)], capture_output=True, text=True)


def test_a_single_host_slice_is_created_run_on_and_deleted():
    create = dry_run("tpu/launch.sh", "create", "my-tpu", "--type", "v4-8")
    assert create.returncode == 0, create.stderr
    assert create.stdout.splitlines() == ["# v4-8: 1 host(s)", "+ gcloud compute tpus tpu-vm create my-tpu --zone "
                                          "us-central2-b --accelerator-type v4-8 --version tpu-ubuntu2204-base"]
    run = dry_run("tpu/launch.sh", "run", "my-tpu", "--command", "rlhf-jax pipeline seed=3")
    assert "--worker=all" in run.stdout and "rlhf-jax\\ pipeline\\ seed=3\\ 2" in run.stdout  # one host: no coordinator
    assert "tpu-vm delete my-tpu" in dry_run("tpu/launch.sh", "delete", "my-tpu").stdout


@pytest.mark.parametrize("accelerator, cloud_name, hosts, zone", [("v5e-16", "v5litepod-16", 4, "us-west4-a"),
                                                                  ("v4-32", "v4-32", 4, "us-central2-b"),
                                                                  ("v5p-64", "v5p-64", 8, "us-east5-a")])
def test_a_multi_host_slice_runs_one_process_per_host_joined_by_jax_distributed(accelerator, cloud_name, hosts, zone):
    create = dry_run("tpu/launch.sh", "create", "pod", "--type", accelerator, "--queued")
    assert create.returncode == 0, create.stderr
    assert create.stdout.splitlines()[0] == f"# {cloud_name}: {hosts} host(s)"
    assert f"queued-resources create pod --node-id pod --zone {zone} --accelerator-type {cloud_name}" in create.stdout
    install = dry_run("tpu/launch.sh", "install", "pod", "--type", accelerator)
    assert "--worker=all" in install.stdout and "pip\\ install\\ -e\\ \\'.\\[tpu\\]\\'" in install.stdout
    run = dry_run("tpu/launch.sh", "run", "pod", "--type", accelerator, "--command", "rlhf-jax sft configs/sft_tiny.yaml")
    assert "--worker=all" in run.stdout and "configs/sft_tiny.yaml\\ --distributed\\ 2\\>\\&1\\ \\|\\ tee\\ run.log" \
        in run.stdout
    assert "tail\\ -n\\ 50\\ rlhf_jax/run.log" in dry_run("tpu/launch.sh", "logs", "pod", "--type", accelerator).stdout
    assert "queued-resources delete pod" in dry_run("tpu/launch.sh", "delete", "pod", "--type", accelerator,
                                                     "--queued").stdout


def test_unknown_options_and_types_are_refused():
    typo = dry_run("tpu/launch.sh", "create", "my-tpu", "--typo", "x")
    assert typo.returncode == 2 and "valid: --type" in typo.stderr
    kind = dry_run("tpu/launch.sh", "create", "my-tpu", "--type", "v9-8")
    assert kind.returncode == 2 and "unknown TPU type v9-8" in kind.stderr


def test_a_slurm_job_runs_one_process_per_gpu_node():
    submit = dry_run("slurm/submit.sh", "--nodes", 2, "--gpus-per-node", 8, "--partition", "gpu", "--command",
                     "rlhf-jax dpo configs/dpo_tiny.yaml")
    assert submit.returncode == 0, submit.stderr
    lines = submit.stdout.splitlines()
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
            "#SBATCH --partition=gpu"} <= set(lines)
    assert "srun .venv/bin/rlhf-jax dpo configs/dpo_tiny.yaml --distributed" in lines
    assert lines[-1] == "+ sbatch <the script above>"
    missing = dry_run("slurm/submit.sh", "--nodes", 2)
    assert missing.returncode == 2 and "--command are required" in missing.stderr

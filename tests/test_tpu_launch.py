import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "tpu" / "launch.sh"


def dry_run(*args):
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True)


def test_dry_run_prints_each_gcloud_command_without_running_it():
    create = dry_run("create", "my-tpu", "--type", "v5litepod-8", "--zone", "us-west4-a")
    assert create.returncode == 0, create.stderr
    assert create.stdout.strip() == (
        "+ gcloud compute tpus tpu-vm create my-tpu --zone us-west4-a "
        "--accelerator-type v5litepod-8 --version tpu-ubuntu2204-base"
    )
    run = dry_run("run", "my-tpu", "--command", "rlhf-jax pipeline seed=3")
    assert "--worker=all" in run.stdout and "rlhf-jax\\ pipeline\\ seed=3" in run.stdout
    assert "tpu-vm delete my-tpu" in dry_run("delete", "my-tpu").stdout


def test_unknown_option_is_refused():
    result = dry_run("create", "my-tpu", "--typo", "x")
    assert result.returncode == 2 and "valid: --zone" in result.stderr

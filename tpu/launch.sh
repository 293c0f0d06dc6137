#!/usr/bin/env bash
# Create a TPU VM slice, install rlhf_jax on every worker, run a command on all workers,
# and tear the slice down. Every step prints its gcloud command first; --dry-run prints
# them without running anything.
#
#   tpu/launch.sh [--dry-run] create|install|run|delete NAME [options]
#     --zone ZONE            (default us-central2-b)
#     --type ACCELERATOR     (default v4-8)
#     --version RUNTIME      (default tpu-ubuntu2204-base)
#     --command "CMD"        for `run` (default: rlhf-jax pipeline)
#     --repo URL             for `install` (default: the current git remote)
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
action=${1:?usage: tpu/launch.sh [--dry-run] create|install|run|delete NAME [options]}
name=${2:?a TPU VM name is required}
shift 2
zone=us-central2-b type=v4-8 version=tpu-ubuntu2204-base command="rlhf-jax pipeline"
repo=$(git config --get remote.origin.url 2>/dev/null || echo "REPO_URL")
while [[ $# -gt 0 ]]; do
    case $1 in
        --zone) zone=$2 ;;
        --type) type=$2 ;;
        --version) version=$2 ;;
        --command) command=$2 ;;
        --repo) repo=$2 ;;
        *) echo "unknown option $1; valid: --zone --type --version --command --repo" >&2; exit 2 ;;
    esac
    shift 2
done

step() {
    printf '+'; printf ' %q' "$@"; printf '\n'
    if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

on_all_workers() {
    step gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"
}

case $action in
    create) step gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$type" --version "$version" ;;
    install) on_all_workers "git clone $repo rlhf_jax && cd rlhf_jax && python3 -m pip install -e '.[tpu]'" ;;
    run) on_all_workers "cd rlhf_jax && $command" ;;
    delete) step gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet ;;
    *) echo "unknown action $action; valid: create install run delete" >&2; exit 2 ;;
esac

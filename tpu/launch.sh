#!/usr/bin/env bash
# Create a TPU slice (a TPU VM, or a queued resource), install rlhf_jax on every worker, run
# the same command on all workers -- joined by jax.distributed (--distributed finds the
# coordinator from the TPU metadata) -- with each worker's log streamed back and kept in
# ~/rlhf_jax/run.log, and tear the slice down. Every step prints its gcloud command first;
# --dry-run prints them without running anything.
#
#   tpu/launch.sh [--dry-run] create|install|run|logs|delete NAME [options]
#     --type ACCELERATOR     v4-8 (default), v4-32, v5e-16 (= v5litepod-16), v5p-64, v6e-8, ...
#     --zone ZONE            (default: one that offers the generation)
#     --version RUNTIME      (default: the generation's TPU VM image)
#     --queued               create a queued resource (waits for capacity) instead of a TPU VM
#     --command "CMD"        for `run` (default: rlhf-jax pipeline)
#     --repo URL             for `install` (default: the current git remote)
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
action=${1:?usage: tpu/launch.sh [--dry-run] create|install|run|logs|delete NAME [options]}
name=${2:?a TPU name is required}
shift 2
zone="" type=v4-8 version="" queued=0 command="rlhf-jax pipeline"
repo=$(git config --get remote.origin.url 2>/dev/null || echo "REPO_URL")
while [[ $# -gt 0 ]]; do
    case $1 in
        --zone) zone=$2; shift ;;
        --type) type=$2; shift ;;
        --version) version=$2; shift ;;
        --command) command=$2; shift ;;
        --repo) repo=$2; shift ;;
        --queued) queued=1 ;;
        *) echo "unknown option $1; valid: --type --zone --version --queued --command --repo" >&2; exit 2 ;;
    esac
    shift
done

type=${type/v5e-/v5litepod-}  # Cloud TPU's name for v5e slices
generation=${type%-*} size=${type##*-}
case $generation in  # default zone, TPU VM image, and TensorCores per chip (the slice's number counts them)
    v4) defaults=(us-central2-b tpu-ubuntu2204-base 2) ;;
    v5litepod) defaults=(us-west4-a v2-alpha-tpuv5-lite 1) ;;
    v5p) defaults=(us-east5-a v2-alpha-tpuv5 2) ;;
    v6e) defaults=(us-east5-b v2-alpha-tpuv6e 1) ;;
    *) echo "unknown TPU type $type; valid: v4-N, v5e-N (v5litepod-N), v5p-N, v6e-N" >&2; exit 2 ;;
esac
zone=${zone:-${defaults[0]}} version=${version:-${defaults[1]}}
hosts=$(( (size / defaults[2] + 3) / 4 ))  # four chips per host
distributed=""
if [[ $hosts -gt 1 ]]; then distributed=" --distributed"; fi  # one process per host, one run

step() {
    printf '+'; printf ' %q' "$@"; printf '\n'
    if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

on_all_workers() {
    step gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"
}

case $action in
    create)
        echo "# $type: $hosts host(s)"
        if [[ $queued -eq 1 ]]; then
            step gcloud compute tpus queued-resources create "$name" --node-id "$name" --zone "$zone" \
                --accelerator-type "$type" --runtime-version "$version"
        else
            step gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$type" --version "$version"
        fi ;;
    install) on_all_workers "git clone $repo rlhf_jax && cd rlhf_jax && python3 -m venv .venv && .venv/bin/pip install -e '.[tpu]'" ;;
    run) on_all_workers "cd rlhf_jax && set -o pipefail && .venv/bin/$command$distributed 2>&1 | tee run.log" ;;
    logs) on_all_workers "tail -n 50 rlhf_jax/run.log" ;;
    delete)
        if [[ $queued -eq 1 ]]; then
            step gcloud compute tpus queued-resources delete "$name" --zone "$zone" --force --quiet
        else
            step gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet
        fi ;;
    *) echo "unknown action $action; valid: create install run logs delete" >&2; exit 2 ;;
esac

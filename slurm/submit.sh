#!/usr/bin/env bash
# Submit an rlhf_jax run to SLURM on GPU nodes: one process per node, all the node's GPUs to
# it, joined by jax.distributed (--distributed reads SLURM's environment for the coordinator,
# the process count and this process's index). Prints the batch script and the sbatch command
# first; --dry-run prints them without submitting.
#
#   slurm/submit.sh [--dry-run] --nodes N [--gpus-per-node G] [--time HH:MM:SS] [--partition P] \
#                   --command "rlhf-jax dpo configs/...yaml"
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
nodes="" gpus=8 time=04:00:00 partition="" command=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --nodes) nodes=$2 ;;
        --gpus-per-node) gpus=$2 ;;
        --time) time=$2 ;;
        --partition) partition=$2 ;;
        --command) command=$2 ;;
        *) echo "unknown option $1; valid: --nodes --gpus-per-node --time --partition --command" >&2; exit 2 ;;
    esac
    shift 2
done
if [[ -z $nodes || -z $command ]]; then echo "--nodes and --command are required" >&2; exit 2; fi

script=$(cat <<SCRIPT
#!/usr/bin/env bash
#SBATCH --job-name=rlhf_jax
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time
#SBATCH --output=rlhf_jax-%j.log${partition:+
#SBATCH --partition=$partition}
srun .venv/bin/$command --distributed
SCRIPT
)
echo "$script"
echo "+ sbatch <the script above>"
if [[ $dry_run -eq 0 ]]; then sbatch <<< "$script"; fi

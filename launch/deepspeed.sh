#!/usr/bin/env bash
# Start a job's workers with DeepSpeed's launcher: each worker steps through a DeepSpeed engine
# (the job's deepspeed section: ZeRO stage 0 or 1, bf16), K-FAC preconditioning its gradients first.
#   launch/deepspeed.sh CONFIG NPROC [HOSTFILE] [--set key=value ...]
# Several nodes: run it on each node with the HOSTFILE and NNODES, NODE_RANK, MASTER_ADDR (and
# MASTER_PORT) set; nothing is started over ssh. TORCH_EXTENSIONS_DIR defaults to .cache/torch_extensions.
set -euo pipefail
usage="usage: launch/deepspeed.sh CONFIG NPROC [HOSTFILE] [--set key=value ...]"
config=${1:?$usage}
nproc=${2:?$usage}
shift 2
hostfile=()
if [[ $# -gt 0 && $1 != --* ]]; then hostfile=(--hostfile "$1"); shift; fi
exec ngd-dist launch "$config" --launcher deepspeed --nproc "$nproc" "${hostfile[@]}" \
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" "$@"

#!/usr/bin/env bash
# Start a job's workers with torchrun on this node.
#   launch/torchrun.sh CONFIG NPROC [--set key=value ...]
# Several nodes: run on each node with NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) set.
set -euo pipefail
config=${1:?usage: launch/torchrun.sh CONFIG NPROC [--set key=value ...]}
nproc=${2:?usage: launch/torchrun.sh CONFIG NPROC [--set key=value ...]}
shift 2
exec ngd-dist launch "$config" --launcher torchrun --nproc "$nproc" \
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  --max-restarts "${MAX_RESTARTS:-0}" "$@"

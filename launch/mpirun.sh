#!/usr/bin/env bash
# Start a job's workers with Open MPI's mpirun: ranks and the rendezvous come from MPI, no
# MASTER_ADDR needed. As root (containers) --allow-run-as-root is added automatically.
#   launch/mpirun.sh CONFIG NPROC [HOSTFILE] [--set key=value ...]
set -euo pipefail
config=${1:?usage: launch/mpirun.sh CONFIG NPROC [HOSTFILE] [--set key=value ...]}
nproc=${2:?usage: launch/mpirun.sh CONFIG NPROC [HOSTFILE] [--set key=value ...]}
shift 2
hostfile=()
if [[ $# -gt 0 && $1 != --* ]]; then hostfile=(--hostfile "$1"); shift; fi
exec ngd-dist launch "$config" --launcher mpirun --nproc "$nproc" "${hostfile[@]}" "$@"

#!/usr/bin/env bash
# The GPU check: run it first thing whenever a machine with NVIDIA GPUs is at hand (<= 8 minutes).
#
#   benchmarks/gpu_check.sh [OUT]          # OUT defaults to benchmarks/results/gpu_check
#
# 1. the machine: nvidia-smi, torch's CUDA build and devices;
# 2. NCCL + bf16 autocast through the service: configs/gpu_large_batch.yaml (ResNet-18, iEF-K-FAC,
#    hybrid placement, bf16 factors on the wire) for 60 steps, one rank per GPU (torchrun);
# 3. the step-time and time-to-target benchmark (benchmarks/target_bench.py) on CUDA, one rank per
#    GPU over NCCL, phases timed with a device sync at each boundary.
# Everything lands in OUT: logs, target_bench.{json,md,png}, and summary.txt with the headline figures.
# Needs the project installed with a CUDA build of torch (see the Makefile's TORCH_SPEC).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu_check}
PY=${PY:-.venv/bin/python}
NGD=${NGD:-.venv/bin/ngd-dist}
mkdir -p "$OUT"

GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$GPUS" -lt 1 ]; then
  echo "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); install a CUDA build of torch" >&2
  exit 2
fi

{ nvidia-smi || true; "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "nccl", torch.cuda.nccl.version(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'; } \
  > "$OUT/machine.txt" 2>&1

# NCCL and bf16 through the service (60 steps; checkpoints and metrics in OUT).
service_rc=0
timeout 240 "$NGD" launch configs/gpu_large_batch.yaml --launcher torchrun --nproc "$GPUS" \
  --set train.steps=60 --set train.log_every=10 --set train.eval_every=60 \
  --set schedule.warmup_steps=10 --set checkpoint.dir="$OUT/service_run" --set checkpoint.resume=never \
  --set metrics.port=0 > "$OUT/service_nccl_bf16.log" 2>&1 || service_rc=$?

# Step time and time to target on CUDA (2 repeats to stay within the time budget).
bench_rc=0
timeout 300 "$PY" benchmarks/target_bench.py --device cuda --world "$GPUS" --repeats 2 --out "$OUT" \
  > "$OUT/target_bench.log" 2>&1 || bench_rc=$?

{
  echo "gpu_check $(date -u +%FT%TZ) on $GPUS GPU(s)"
  echo "service (nccl, bf16): exit $service_rc; last lines:"
  tail -n 3 "$OUT/service_nccl_bf16.log"
  echo "target_bench: exit $bench_rc; see target_bench.md"
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
[ "$service_rc" = 0 ] && [ "$bench_rc" = 0 ]

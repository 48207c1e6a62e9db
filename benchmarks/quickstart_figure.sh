#!/usr/bin/env bash
# The README's figure: the quickstart (2 CPU ranks, embedded digits) with iEF-K-FAC and with its base
# optimizer alone (SGD, the same learning rate), plotted by `ngd-dist report`.
# Run from the repository root: bash benchmarks/quickstart_figure.sh
set -euo pipefail
out=${OUT:-runs/figure}
rm -rf "$out"
for run in ief-kfac sgd; do
  enabled=true; [ "$run" = sgd ] && enabled=false
  .venv/bin/ngd-dist launch configs/quickstart.yaml --launcher torchrun --nproc 2 \
    --set checkpoint.dir="$out/$run" --set checkpoint.resume=never --set metrics.port=0 \
    --set train.log_every=5 --set train.eval_every=10 --set preconditioner.enabled=$enabled
done
.venv/bin/ngd-dist report "$out/ief-kfac" "$out/sgd" --out docs/figures/quickstart.png | tee docs/figures/quickstart.md

"""K-FAC under DeepSpeed's engine: step time with and without DeepSpeed's second all-reduce.

Under ``--launcher deepspeed`` the preconditioner averages the gradients (it needs the averaged
gradient for the KL clip) and hands the preconditioned update to DeepSpeed. Before, DeepSpeed
all-reduced that update again; at ZeRO stage 0 ``DeepSpeedEngine.hand_over(averaged=True)`` now
skips that reduction (``engine.no_sync()``). This measures both on the same engine, 2 gloo ranks
on this machine (one thread each): the quickstart's MLP (64-128-128-10) at ``--batch`` rows per
rank, iEF-K-FAC at 10/100, the two modes interleaved in blocks of 10 steps (order reversed every
block) so that a change of the machine's load hits both alike. Reported per mode and precision:
median and mean step ms, the hand-over's ms (the surrogate backward, with or without DeepSpeed's
all-reduce, and its optimizer step), and the values all-reduced per step by DeepSpeed.

    .venv/bin/python benchmarks/deepspeed_bench.py            # ~1 min on 2 cores
    .venv/bin/python benchmarks/deepspeed_bench.py --quick    # smoke run

Writes ``deepspeed_bench.{json,md}`` to benchmarks/results/ (``--quick``: benchmarks/out/deepspeed/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import load1, machine_info  # noqa: E402

from ngd_dist.testing.distributed import free_port, run_ranks  # noqa: E402

BLOCK = 10
MODES = ("reduced twice", "reduced once")


def _rank(rank: int, world: int, bf16: bool, steps: int, batch: int, port: int) -> dict[str, Any]:
    """Train on this rank, alternating the two hand-over modes; per-mode step and hand-over times."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    import torch.distributed as dist

    from ngd_dist import KFACConfig, KFACPreconditioner
    from ngd_dist.service.deepspeed_engine import DeepSpeedEngine
    from ngd_dist.service.jobs import load_job
    from ngd_dist.service.models import mlp

    overrides = ["deepspeed.zero_stage=0", f"batch.per_rank={batch}"]
    if bf16:
        overrides += ["precision.dtype=bfloat16", "deepspeed.bf16=true"]
    job = load_job(ROOT / "configs" / "quickstart.yaml", overrides)
    torch.manual_seed(0)
    model = mlp(64, 128, 10)
    engine = DeepSpeedEngine(job, model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    precond = KFACPreconditioner(
        engine.module, KFACConfig(output_module="5"), optimizer=engine.learning_rates
    )
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(batch, 64, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    reduced = dict.fromkeys(MODES, 0)
    plain_all_reduce = dist.all_reduce
    mode = MODES[0]

    def counting(tensor: torch.Tensor, *args: object, **kwargs: object) -> object:
        reduced[mode] += tensor.numel()
        return plain_all_reduce(tensor, *args, **kwargs)

    calls = dict.fromkeys(MODES, 0)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    hand: dict[str, list[float]] = {m: [] for m in MODES}
    for step in range(steps):
        block = step // BLOCK
        order = MODES if block % 2 == 0 else MODES[::-1]
        mode = order[(step % BLOCK) * 2 // BLOCK]
        dist.barrier()
        start = time.perf_counter()
        engine.backward(x, y, F.cross_entropy)
        assert precond.step()
        handing = time.perf_counter()
        dist.all_reduce = counting
        try:
            engine.hand_over(averaged=mode == MODES[1])
        finally:
            dist.all_reduce = plain_all_reduce
        end = time.perf_counter()
        calls[mode] += 1
        if step >= 2 * BLOCK:  # warm-up blocks (first decompositions, allocator) not counted
            times[mode].append(1e3 * (end - start))
            hand[mode].append(1e3 * (end - handing))
    return {
        m: {
            "median_ms": statistics.median(times[m]),
            "mean_ms": statistics.fmean(times[m]),
            "hand_over_ms": statistics.median(hand[m]),
            "values_reduced_per_step": reduced[m] / calls[m],
        }
        for m in MODES
    }


def main(argv: list[str] | None = None) -> int:
    """Run both precisions, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (40 steps)")
    parser.add_argument("--steps", type=int, default=None, help="steps per precision (default 220)")
    parser.add_argument("--batch", type=int, default=64, help="rows per rank and step")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    args = parser.parse_args(argv)
    steps = args.steps or (40 if args.quick else 220)
    out = args.out or (ROOT / "benchmarks" / ("out/deepspeed" if args.quick else "results"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "machine": machine_info(1),
        "load_start": load1(),
        "steps": steps,
        "batch": args.batch,
    }
    rows = []
    for bf16 in (False, True):
        ranks = run_ranks(_rank, 2, bf16, steps, args.batch, free_port(), timeout=600)
        precision = "bf16" if bf16 else "float32"
        result[precision] = ranks
        r0 = ranks[0]
        base = r0[MODES[0]]["median_ms"]
        for m in MODES:
            d = r0[m]
            rows.append(
                f"| {precision} | {m} | {d['median_ms']:.2f} | {d['mean_ms']:.2f} "
                f"| {d['median_ms'] / base:.2f} | {d['hand_over_ms']:.2f} "
                f"| {d['values_reduced_per_step']:.0f} |"
            )
    result["load_end"] = load1()
    info = result["machine"]
    table = "\n".join(
        [
            f"{info['cpu_model']}, {info['cpu_count']} cores, torch {info['torch']}, {info['date_utc']}, "
            f"commit {info['git_commit']}; load {result['load_start']:.2f} at start, "
            f"{result['load_end']:.2f} at end. "
            f"2 ranks x batch {args.batch}, ZeRO stage 0, {steps} steps per precision (first {2 * BLOCK} not "
            "counted), rank 0's times.",
            "",
            "| precision | DeepSpeed's all-reduce | median step ms | mean step ms | median x twice "
            "| hand-over ms | values all-reduced by DeepSpeed per step |",
            "|---|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(table)
    (out / "deepspeed_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "deepspeed_bench.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

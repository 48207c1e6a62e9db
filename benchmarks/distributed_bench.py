"""Data-parallel K-FAC on CPU ranks: step time by phase, bytes per step, and load balance.

Runs 1, 2 and 4 gloo ranks on this machine (ngd_dist.testing.distributed), each training a DDP-wrapped
MLP on fixed synthetic data with SGD alone and with iEF-K-FAC under round-robin / greedy
assignment and fixed (10/100) / adaptive refresh; configurations are interleaved in blocks so
drifts of the machine hit them alike. Load balance of the work plans is also computed, without
processes, for a CIFAR ResNet-18 at 4 ranks.

    python benchmarks/distributed_bench.py            # the full run (minutes)
    python benchmarks/distributed_bench.py --quick    # a smoke run

Writes benchmarks/results/distributed_bench.{json,png,md}; docs/benchmarks.md quotes the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ngd_dist import KFACConfig, KFACPreconditioner  # noqa: E402
from ngd_dist.kfac.distributed import LayerShape, make_plan  # noqa: E402
from ngd_dist.kfac.timing import PhaseClock  # noqa: E402
from ngd_dist.service.metrics import PHASES as _EXPORTED_PHASES  # noqa: E402
from ngd_dist.testing.distributed import run_ranks  # noqa: E402

# The exporter's phases, with forward and backward timed together here (the table's first column).
PHASES = ("forward_backward", *(p for p in _EXPORTED_PHASES if p not in ("forward", "backward")))

CONFIGS: dict[str, dict[str, Any] | None] = {
    "sgd": None,
    "kfac fixed rr": {"refresh": "fixed", "assignment": "round_robin"},
    "kfac fixed greedy": {"refresh": "fixed", "assignment": "greedy"},
    "kfac adaptive rr": {"refresh": "adaptive", "assignment": "round_robin"},
    "kfac adaptive greedy": {"refresh": "adaptive", "assignment": "greedy"},
}


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def _worker(rank: int, world: int, steps: int, blocks: int, per_rank: int, width: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(per_rank, 256, generator=g), torch.randint(0, 10, (per_rank,), generator=g)
    runs = {}
    for name, kfac in CONFIGS.items():
        model: nn.Module = _model(width)
        model = DistributedDataParallel(model) if world > 1 else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        clock = PhaseClock()  # the preconditioner's phases and statistics nest in the loop's, counted once
        pc = None
        if kfac is not None:
            config = KFACConfig(
                curvature="ief",
                output_module="module.4" if world > 1 else "4",
                factor_every=10,
                inverse_every=100,
                method="inverse",
                refresh_cap=400,
                **kfac,
            )
            pc = KFACPreconditioner(model, config, optimizer=opt, clock=clock)
        runs[name] = {"model": model, "opt": opt, "pc": pc, "clock": clock, "times": []}
    order = list(CONFIGS)
    for block in range(blocks):
        for name in order if block % 2 == 0 else order[::-1]:
            run = runs[name]
            model, opt, pc, clock = run["model"], run["opt"], run["pc"], run["clock"]
            for i in range(steps + (5 if block == 0 else 0)):
                start = time.perf_counter()
                with clock("forward_backward"):
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                if pc is not None:
                    pc.step()
                with clock("optimizer"):
                    opt.step()
                end = time.perf_counter()
                if block == 0 and i < 5:  # warm-up
                    clock.totals.clear()
                    if pc is not None:
                        pc.collectives.bytes.clear()
                        pc.collectives.calls.clear()
                    continue
                run["times"].append(end - start)
    out: dict[str, Any] = {}
    for name, run in runs.items():
        n = len(run["times"])
        phases = dict(run["clock"].totals)
        pc = run["pc"]
        out[name] = {
            "step_ms_mean": 1000 * statistics.mean(run["times"]),
            "step_ms_median": 1000 * statistics.median(run["times"]),
            "phase_ms": {k: 1000 * v / n for k, v in phases.items()},
            "bytes_per_step": {k: v / n for k, v in (pc.comm_bytes.items() if pc else [])},
            "load_balance": pc.plan.load_balance() if pc else None,
            "intervals": sorted(set(pc.intervals().values())) if pc else None,
            "decompositions": pc.stats.decompositions if pc else 0,
            "steps": n,
        }
    return out


def resnet_balance() -> dict[str, float]:
    from ngd_dist.service.models import resnet18

    model = resnet18(num_classes=10)
    shapes = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            a = m.in_channels * m.kernel_size[0] * m.kernel_size[1] + (m.bias is not None)
            shapes.append(LayerShape(name, a, m.out_channels))
        elif isinstance(m, nn.Linear):
            shapes.append(LayerShape(name, m.in_features + 1, m.out_features))
    out = {}
    for strategy in ("round_robin", "greedy"):
        for placement, k in (("memory", 1), ("communication", 4)):
            out[f"{strategy} {placement}"] = make_plan(shapes, 4, strategy, k).load_balance()
    biggest = max(s.cost("a") + s.cost("g") for s in shapes)
    total = sum(s.cost("a") + s.cost("g") for s in shapes)
    out["bound: largest layer / mean"] = biggest / (total / 4)
    out["bound: largest factor / mean"] = max(max(s.cost("a"), s.cost("g")) for s in shapes) / (total / 4)
    return out


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    import os

    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def write_outputs(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed_bench.json").write_text(json.dumps(results, indent=2))
    worlds = sorted(results["runs"], key=int)
    fig, axes = plt.subplots(1, len(worlds), figsize=(5 * len(worlds), 4.5), sharey=True)
    for ax, world in zip(axes if len(worlds) > 1 else [axes], worlds, strict=True):
        runs = results["runs"][world]
        names = list(runs)
        bottom = [0.0] * len(names)
        for phase in PHASES:
            values = [runs[n]["phase_ms"].get(phase, 0.0) for n in names]
            ax.bar(range(len(names)), values, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(f"{world} rank(s)")
        ax.set_ylabel("ms per step")
    axes[-1].legend(fontsize=7) if len(worlds) > 1 else axes.legend(fontsize=7)
    fig.suptitle("DDP MLP on CPU ranks: step time by phase")
    fig.tight_layout()
    fig.savefig(out / "distributed_bench.png", dpi=110)
    (out / "distributed_bench.md").write_text(table(results))


def table(results: dict[str, Any]) -> str:
    lines = [
        f"Machine: {results['machine']}, {results['date']}. Command: `{results['command']}`. "
        f"Per-rank batch {results['per_rank']}, MLP width {results['width']}, {results['steps_per_block']} "
        f"steps x {results['blocks']} interleaved blocks per configuration; K-FAC: iEF, inverse form, "
        "factor_every=10, decompositions every 100 steps (fixed) or adaptive per factor from 100 "
        "(cap 400), memory-optimal placement.",
        "",
        "| ranks | configuration | step ms (mean) | x SGD | " + " | ".join(PHASES) + " | factor bytes/step | "
        "gradient+preconditioned bytes/step | load balance |",
        "|---" * (8 + len(PHASES)) + "|",
    ]
    for world, runs in sorted(results["runs"].items(), key=lambda kv: int(kv[0])):
        sgd = runs["sgd"]["step_ms_mean"]
        for name, r in runs.items():
            b = r["bytes_per_step"]
            phases = " | ".join(f"{r['phase_ms'].get(p, 0.0):.2f}" for p in PHASES)
            lb = "" if r["load_balance"] is None else f"{r['load_balance']:.2f}"
            moved = b.get("gradients", 0) + b.get("preconditioned", 0)
            lines.append(
                f"| {world} | {name} | {r['step_ms_mean']:.1f} | {r['step_ms_mean'] / sgd:.2f} | {phases} | "
                f"{b.get('factors', 0):.0f} | {moved:.0f} | {lb} |"
            )
    lines += ["", "Targets:", ""]
    for line in results["targets"]:
        lines.append(f"- {line}")
    lines += [
        "",
        "Work-plan load balance (max rank cost / mean, cost n^3 per factor), CIFAR ResNet-18, 4 ranks:",
        "",
    ]
    lines += [f"- {k}: {v:.3f}" for k, v in results["resnet18_balance"].items()]
    return "\n".join(lines) + "\n"


def targets(results: dict[str, Any]) -> list[str]:
    out = []
    packed, unpacked = results["packed_values"], results["unpacked_values"]
    out.append(
        f"packed factor bytes / unpacked = {packed / unpacked:.3f} (target <= 0.55): "
        f"{'met' if packed / unpacked <= 0.55 else 'not met'}"
    )
    greedy = results["resnet18_balance"]["greedy communication"]
    out.append(
        f"greedy load balance, ResNet-18, 4 ranks = {greedy:.3f} (target <= 1.1): "
        f"{'met' if greedy <= 1.1 else 'not met'}"
    )
    for world, runs in sorted(results["runs"].items(), key=lambda kv: int(kv[0])):
        sgd = runs["sgd"]["step_ms_mean"]
        for name, limit in (("kfac adaptive rr", 1.05), ("kfac fixed rr", 1.10)):
            ratio = runs[name]["step_ms_mean"] / sgd
            out.append(
                f"{world} rank(s): {name} step time / SGD = {ratio:.2f} (target <= {limit}): "
                f"{'met' if ratio <= limit else 'not met'}"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few steps")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    steps, blocks, per_rank, width = (5, 2, 128, 128) if args.quick else (50, 4, 1024, 512)
    torch.set_num_threads(1)
    results: dict[str, Any] = {
        "machine": machine(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/distributed_bench.py" + (" --quick" if args.quick else ""),
        "per_rank": per_rank,
        "width": width,
        "steps_per_block": steps,
        "blocks": blocks,
        "runs": {},
    }
    for world in args.worlds:
        started = time.perf_counter()
        ranks = run_ranks(_worker, world, steps, blocks, per_rank, width, timeout=3000)
        results["runs"][str(world)] = ranks[0]
        print(f"{world} rank(s): {time.perf_counter() - started:.0f} s", flush=True)
    sides = [256 + 1, width, width + 1, width, width + 1, 10]
    results["packed_values"] = sum(n * (n + 1) // 2 for n in sides)
    results["unpacked_values"] = sum(n * n for n in sides)
    results["resnet18_balance"] = resnet_balance()
    results["targets"] = targets(results)
    write_outputs(results, args.out)
    print(table(results))


if __name__ == "__main__":
    main()

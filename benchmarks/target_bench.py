"""K-FAC at its defaults against tuned SGD and AdamW on 2 DDP ranks: step time and time to target.

The set-up: 2 CPU ranks (gloo, one thread each) train a ``DistributedDataParallel`` model on
CIFAR-shaped synthetic images (``synthetic_images``: 3x32x32, 10 classes, 25,600 of them: each
sample is seen once), batch 64 per rank, 200 steps. Two workloads: ``cnn`` =
``small_cnn(channels=3, width=32, side=32)`` and ``mlp`` = ``mlp(192, 256)`` on the images
average-pooled to 3x8x8. Every run of a workload starts from the same weights and sees the same
batches.

Methods. SGD (momentum 0.9) and AdamW (weight decay 0) each tuned over a learning-rate grid;
K-FAC = SGD with momentum 0.9 under ``KFACPreconditioner`` with ``KFACConfig`` defaults except
``curvature`` and ``output_module`` (``10/100`` = factor_every 10, inverse_every 100: the
defaults), its learning rate picked from a small grid on iEF 10/100. Variants change one thing:
``adaptive`` = refresh "adaptive"; ``eigen 0.1`` = method "eigen" at damping 0.1 (the default
form and damping before ``inverse`` at 0.03: 4 matmuls per layer and step instead of 2);
``memory`` = placement "memory" (each layer preconditioned by one rank, which broadcasts it every
step); ``before`` = the defaults before issue #11's work (no refresh warm-up, undebiased factors,
every row in the statistics, memory placement, eigen at damping 0.1).

Phases, each run in one 2-rank job whose methods are interleaved in blocks of 20 steps (the order
reversed every block), so a change of the machine's load hits every method alike:

1. tuning: every grid point once; the lowest final loss picks each method's learning rate;
2. timing: the picked methods, ``--repeats`` times (the losses are identical between repeats,
   the runs being deterministic; only the times differ).

Per method: mean and median step time and their ratio to SGD's in the same repeat; final loss (the
mean over the last 10 steps of the 2 ranks' batch losses); steps to SGD's final loss (first step
whose trailing 10-step mean is at or below it); seconds to it (the summed step times up to there)
and their ratio to the better of SGD's and AdamW's; the KL clip's binding rate; and the phase
breakdown in ms per step (forward+backward, the preconditioner's phases, the optimizer step).
Step time = zero_grad, forward, loss, backward, ``precond.step()``, ``opt.step()``, ``loss.item()``.

Usage::

    .venv/bin/python benchmarks/target_bench.py              # full run (~10 min on 2 cores)
    .venv/bin/python benchmarks/target_bench.py --quick      # smoke run (< 1 min)

Writes ``target_bench.{json,md,png}`` to benchmarks/results/ (``--quick``: benchmarks/out/target/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import load1, machine_info  # noqa: E402

from ngd_dist import KFACConfig, KFACPreconditioner  # noqa: E402
from ngd_dist.kfac.timing import PhaseClock  # noqa: E402
from ngd_dist.service.data.datasets import synthetic_images  # noqa: E402
from ngd_dist.service.models import mlp, small_cnn  # noqa: E402
from ngd_dist.testing.distributed import run_ranks  # noqa: E402

WINDOW = 10
"""Steps averaged for the final loss and the trailing mean of steps-to-target."""
PHASES = (
    "forward_backward",
    "factor_computation",
    "gradient_communication",
    "factor_communication",
    "decomposition",
    "preconditioning",
    "optimizer",
)


@dataclass(frozen=True)
class Settings:
    """What one benchmark run does."""

    steps: int = 200
    per_rank: int = 64
    world: int = 2
    block: int = 20
    repeats: int = 3
    samples: int = 25600
    """One epoch of 200 steps x 128: every batch is new, so the training loss is not a memorised one."""
    workloads: tuple[str, ...] = ("cnn", "mlp")
    sgd_lrs: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)
    adamw_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
    kfac_lrs: tuple[float, ...] = (0.05, 0.2)
    every_step: bool = False
    """Also run ``ief 1/1`` (statistics and decompositions every step: what the defaults replaced)."""
    device: str = "cpu"
    """``"cuda"``: rank r on GPU r, NCCL, phases timed with a device sync at each boundary."""


QUICK = Settings(
    steps=20, per_rank=16, block=5, repeats=1, samples=400, sgd_lrs=(0.1,), adamw_lrs=(1e-3,), kfac_lrs=(0.1,)
)

TEN_HUNDRED = {"factor_every": 10, "inverse_every": 100}
KFAC_VARIANTS: dict[str, dict[str, Any]] = {
    "ief 10/100": {"curvature": "ief", **TEN_HUNDRED},
    "ef 10/100": {"curvature": "ef", **TEN_HUNDRED},
    "mc 10/100": {"curvature": "mc", **TEN_HUNDRED},
    "ief adaptive": {"curvature": "ief", **TEN_HUNDRED, "refresh": "adaptive"},
    "ief 10/100 eigen 0.1": {"curvature": "ief", **TEN_HUNDRED, "method": "eigen", "damping": 0.1},
    "ief 10/100 memory": {"curvature": "ief", **TEN_HUNDRED, "placement": "memory"},
    "ief 10/100 before": {
        "curvature": "ief",
        **TEN_HUNDRED,
        "refresh_warmup": False,
        "factor_debias": False,
        "statistics_rows": None,
        "placement": "memory",
        "method": "eigen",
        "damping": 0.1,
    },
}


EVERY_STEP = {"ief 1/1": {"curvature": "ief", "factor_every": 1, "inverse_every": 1}}
"""With ``--every-step``: the refresh every step that the defaults' 10 / 100 is measured against."""


def method(name: str, optimizer: str, lr: float, kfac: dict[str, Any] | None = None) -> dict[str, Any]:
    """One method to run: a name, the base optimizer, its learning rate and K-FAC's settings."""
    return {"name": name, "optimizer": optimizer, "lr": lr, "kfac": kfac}


# -- one rank's work ---------------------------------------------------------------------------


def _data(workload: str, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = synthetic_images(n=samples, channels=3, size=32, seed=0)
    if workload == "mlp":
        images = F.avg_pool2d(images, 4)
    return images, labels


def _model(workload: str) -> nn.Module:
    torch.manual_seed(0)
    return small_cnn(channels=3, width=32, side=32) if workload == "cnn" else mlp(192, 256)


def _worker(rank: int, world: int, workload: str, settings: dict[str, Any], methods: list[dict]) -> dict:
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    device = torch.device(f"cuda:{rank}" if s.device == "cuda" else "cpu")
    images, labels = (t.to(device) for t in _data(workload, s.samples))
    batch = s.per_rank * world
    g = torch.Generator().manual_seed(1)
    epochs = -(-s.steps * batch // len(labels))
    order = torch.cat([torch.randperm(len(labels), generator=g) for _ in range(epochs)]).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    runs: dict[str, dict[str, Any]] = {}
    for m in methods:
        model = DistributedDataParallel(_model(workload).to(device))
        if m["optimizer"] == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=m["lr"], weight_decay=0.0)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=m["lr"], momentum=0.9)
        clock = PhaseClock(sync=sync)
        pc = None
        if m["kfac"] is not None:
            config = KFACConfig(output_module="module.5", **m["kfac"])
            pc = KFACPreconditioner(model, config, optimizer=opt, clock=clock)
        runs[m["name"]] = {
            "model": model,
            "opt": opt,
            "pc": pc,
            "clock": clock,
            "losses": [],
            "times": [],
            "bound": 0,
            "loads": [],
        }
    names = [m["name"] for m in methods]
    blocks = -(-s.steps // s.block)
    for b in range(blocks):
        for name in names if b % 2 == 0 else names[::-1]:
            run = runs[name]
            model, opt, pc, clock = run["model"], run["opt"], run["pc"], run["clock"]
            run["loads"].append(load1())
            for step in range(b * s.block, min(s.steps, (b + 1) * s.block)):
                rows = order[step * batch + rank * s.per_rank : step * batch + (rank + 1) * s.per_rank]
                x, y = images[rows], labels[rows]
                start = time.perf_counter()
                with clock("forward_backward"):
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                if pc is not None:
                    pc.step()
                with clock("optimizer"):
                    opt.step()
                value = loss.item()
                run["times"].append(time.perf_counter() - start)
                run["losses"].append(value)
                if pc is not None and pc.stats.kl_scale < 1.0:
                    run["bound"] += 1
    out = {}
    for name, run in runs.items():
        n = len(run["times"])
        pc = run["pc"]
        out[name] = {
            "losses": run["losses"],
            "times": run["times"],
            "phase_ms": {k: 1000 * v / n for k, v in run["clock"].totals.items()},
            "kl_bound": run["bound"] / n if pc is not None else None,
            "decompositions": pc.stats.decompositions if pc is not None else 0,
            "load1": statistics.mean(run["loads"]),
        }
    return out


# -- analysis ----------------------------------------------------------------------------------


def trailing(losses: Sequence[float]) -> list[float]:
    """Trailing WINDOW-step means (defined from step WINDOW on)."""
    return [statistics.fmean(losses[i - WINDOW + 1 : i + 1]) for i in range(WINDOW - 1, len(losses))]


def steps_to(losses: Sequence[float], target: float) -> int | None:
    """The first step count whose trailing mean is at or below ``target`` (None: never)."""
    for i, value in enumerate(trailing(losses)):
        if value <= target:
            return i + WINDOW
    return None


def merge_ranks(by_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Average the ranks' losses and step times; phases and counters from the ranks' mean."""
    out = {}
    for name in by_rank[0]:
        runs = [r[name] for r in by_rank]
        merged = {
            "losses": [statistics.fmean(v) for v in zip(*(r["losses"] for r in runs), strict=True)],
            "times": [statistics.fmean(v) for v in zip(*(r["times"] for r in runs), strict=True)],
            "phase_ms": {
                k: statistics.fmean(r["phase_ms"].get(k, 0.0) for r in runs) for k in runs[0]["phase_ms"]
            },
            "kl_bound": runs[0]["kl_bound"],
            "decompositions": sum(r["decompositions"] for r in runs),
            "load1": runs[0]["load1"],
        }
        merged["final"] = statistics.fmean(merged["losses"][-WINDOW:])
        out[name] = merged
    return out


def summarise(runs: dict[str, Any], target: float) -> dict[str, Any]:
    """Per-method figures of one repeat against SGD's run and the target loss."""
    sgd = runs["sgd"]
    rows = {}
    for name, r in runs.items():
        reached = steps_to(r["losses"], target)
        seconds = sum(r["times"][:reached]) if reached is not None else None
        rows[name] = {
            "final": r["final"],
            "step_ms_mean": 1000 * statistics.fmean(r["times"]),
            "step_ms_median": 1000 * statistics.median(r["times"]),
            "mean_x_sgd": statistics.fmean(r["times"]) / statistics.fmean(sgd["times"]),
            "median_x_sgd": statistics.median(r["times"]) / statistics.median(sgd["times"]),
            "steps_to_target": reached,
            "steps_x_sgd": reached / steps_to(sgd["losses"], target) if reached is not None else None,
            "seconds_to_target": seconds,
            "phase_ms": r["phase_ms"],
            "kl_bound": r["kl_bound"],
            "decompositions": r["decompositions"],
            "load1": r["load1"],
        }
    best = min(
        (rows[n]["seconds_to_target"] for n in ("sgd", "adamw") if rows[n]["seconds_to_target"] is not None),
        default=None,
    )
    for row in rows.values():
        sec = row["seconds_to_target"]
        row["seconds_x_best_first_order"] = sec / best if sec is not None and best else None
    return rows


def run_job(workload: str, settings: Settings, methods: list[dict[str, Any]]) -> dict[str, Any]:
    """One 2-rank job over ``methods``, interleaved; the ranks' results merged."""
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}
    backend = "nccl" if settings.device == "cuda" else "gloo"
    by_rank = run_ranks(_worker, settings.world, workload, args, methods, timeout=3600, backend=backend)
    return merge_ranks(by_rank)


def tune(workload: str, settings: Settings) -> dict[str, Any]:
    """Every grid point once; returns the runs' final losses and the picked learning rates."""
    grid = [method(f"sgd lr={lr}", "sgd", lr) for lr in settings.sgd_lrs]
    grid += [method(f"adamw lr={lr}", "adamw", lr) for lr in settings.adamw_lrs]
    grid += [
        method(f"ief 10/100 lr={lr}", "sgd", lr, KFAC_VARIANTS["ief 10/100"]) for lr in settings.kfac_lrs
    ]
    runs = run_job(workload, settings, grid)
    finals = {name: r["final"] for name, r in runs.items()}

    def pick(prefix: str, lrs: Sequence[float]) -> float:
        return min(lrs, key=lambda lr: finals[f"{prefix} lr={lr}"])

    return {
        "finals": finals,
        "sgd": pick("sgd", settings.sgd_lrs),
        "adamw": pick("adamw", settings.adamw_lrs),
        "kfac": pick("ief 10/100", settings.kfac_lrs),
    }


def benchmark(settings: Settings) -> dict[str, Any]:
    """Tune, then time the picked methods ``repeats`` times, per workload."""
    results: dict[str, Any] = {"settings": asdict(settings), "machine": machine_info(1), "workloads": {}}
    if settings.device == "cuda":
        results["machine"]["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    for workload in settings.workloads:
        started = time.time()
        tuned = tune(workload, settings)
        methods = [method("sgd", "sgd", tuned["sgd"]), method("adamw", "adamw", tuned["adamw"])]
        variants = {**KFAC_VARIANTS, **(EVERY_STEP if settings.every_step else {})}
        methods += [method(name, "sgd", tuned["kfac"], kfac) for name, kfac in variants.items()]
        repeats = []
        for _ in range(settings.repeats):
            runs = run_job(workload, settings, methods)
            target = runs["sgd"]["final"]
            repeats.append({"target": target, "rows": summarise(runs, target), "runs": runs})
        results["workloads"][workload] = {
            "tuning": tuned,
            "repeats": [{"target": r["target"], "rows": r["rows"]} for r in repeats],
            "curves": {
                name: {"losses": r["losses"], "times": r["times"]} for name, r in repeats[-1]["runs"].items()
            },
            "seconds": time.time() - started,
        }
        print(f"{workload}: done in {time.time() - started:.0f} s", flush=True)
    results["machine"]["load1_at_end"] = load1()
    return results


# -- outputs -----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if len(values) == len(rows) and values else None


def markdown(results: dict[str, Any]) -> str:
    """The tables of docs/benchmarks.md, from a results dict."""
    s, m = results["settings"], results["machine"]
    lines = [
        "# K-FAC defaults against tuned SGD and AdamW on 2 DDP ranks (`benchmarks/target_bench.py`)",
        "",
        f"{m['cpu_model']}, {m['cpu_count']} cores, torch {m['torch']} (1 thread per rank), "
        f"device {s['device']}{' (' + m['gpu'] + ')' if m.get('gpu') else ''}, "
        f"{m['date_utc']}, commit {m['git_commit']}{' (+ local changes)' if m['ngd_dist_modified'] else ''}; "
        f"load average {m['load1_at_start']:.2f} at start, {m['load1_at_end']:.2f} at end. "
        f"{s['world']} ranks x batch {s['per_rank']}, {s['steps']} steps, {s['repeats']} repeat(s) of "
        f"the timed phase; ratios are the median over repeats of each repeat's ratio.",
    ]
    for workload, w in results["workloads"].items():
        t = w["tuning"]
        lines += [
            "",
            f"## {workload}",
            "",
            f"Picked learning rates: SGD {t['sgd']}, AdamW {t['adamw']}, K-FAC {t['kfac']}. "
            f"Target (SGD's final loss): {statistics.median(r['target'] for r in w['repeats']):.4f}.",
            "",
            "| method | final loss | steps to target | × SGD steps | mean step ms | mean × SGD "
            "| median × SGD | s to target | × best of SGD/AdamW | KL clip bound | decompositions | load |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        names = list(w["repeats"][0]["rows"])
        for name in names:
            rows = [r["rows"][name] for r in w["repeats"]]
            first = rows[0]
            bound = first["kl_bound"]
            lines.append(
                f"| {name} | {first['final']:.4f} | {_fmt(first['steps_to_target'], 'd')} | "
                f"{_fmt(first['steps_x_sgd'])} | {_fmt(_median(rows, 'step_ms_mean'), '.1f')} | "
                f"{_fmt(_median(rows, 'mean_x_sgd'))} | {_fmt(_median(rows, 'median_x_sgd'))} | "
                f"{_fmt(_median(rows, 'seconds_to_target'))} | "
                f"{_fmt(_median(rows, 'seconds_x_best_first_order'))} | "
                f"{'–' if bound is None else f'{100 * bound:.0f}%'} | {first['decompositions']} | "
                f"{statistics.fmean(r['load1'] for r in rows):.2f} |"
            )
        lines += [
            "",
            "ms per step by phase (median over repeats):",
            "",
            "| method | " + " | ".join(PHASES) + " | step |",
            "|---|" + "---:|" * (len(PHASES) + 1),
        ]
        for name in names:
            rows = [r["rows"][name] for r in w["repeats"]]
            cells = [statistics.median(r["phase_ms"].get(p, 0.0) for r in rows) for p in PHASES]
            lines.append(
                f"| {name} | "
                + " | ".join(f"{c:.2f}" for c in cells)
                + f" | {_median(rows, 'step_ms_mean'):.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Trailing-mean loss against steps and against seconds, one row per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results["workloads"])
    fig, axes = plt.subplots(len(workloads), 2, figsize=(12, 4.2 * len(workloads)), squeeze=False)
    for row, workload in zip(axes, workloads, strict=True):
        w = results["workloads"][workload]
        for name, curve in w["curves"].items():
            smooth = trailing(curve["losses"])
            steps = range(WINDOW, WINDOW + len(smooth))
            seconds = [sum(curve["times"][:i]) for i in steps]
            row[0].plot(steps, smooth, label=name)
            row[1].plot(seconds, smooth, label=name)
        target = statistics.median(r["target"] for r in w["repeats"])
        for ax, xlabel in zip(row, ("step", "seconds (summed step times)"), strict=True):
            ax.axhline(target, color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"training loss ({WINDOW}-step mean)")
            ax.set_title(workload)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write its JSON, table and plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, one point per grid")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--workloads", nargs="+", choices=("cnn", "mlp"), default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one rank per GPU, NCCL"
    )
    parser.add_argument("--world", type=int, default=None, help="ranks (default 2)")
    parser.add_argument("--every-step", action="store_true", help="also run iEF refreshed every step")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.workloads:
        settings = replace(settings, workloads=tuple(args.workloads))
    if args.repeats:
        settings = replace(settings, repeats=args.repeats)
    if args.world:
        settings = replace(settings, world=args.world)
    settings = replace(settings, device=args.device, every_step=args.every_step)
    out = args.out or (ROOT / "benchmarks" / ("out/target" if args.quick else "results"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    results = benchmark(settings)
    results["command"] = " ".join(["python", "benchmarks/target_bench.py", *(argv or sys.argv[1:])])
    (out / "target_bench.json").write_text(json.dumps(results, indent=1))
    (out / "target_bench.md").write_text(markdown(results))
    plot(results, out / "target_bench.png")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Quality-indicator benchmark: what ``metrics.quality_every`` costs, and γ of SGD / EF / iEF directions.

Part 1, cost. The training worker's own code path (:class:`ngd_dist.service.trainer.Worker`, built
in-process from the job files) trains the quickstart MLP, a small CNN and the small GPT of
``configs/gpt_lm.yaml`` with ``metrics.quality_every=1`` and ``metrics.quality_probe=32``.
Blocks of steps without the probe and with it (parameter snapshot before the step, γ of the applied
update after it) alternate in ABBA order in one process; reported: mean step ms in each mode, the
probe's own ms, and the ratio.

Part 2, γ of different update directions. One training trajectory (the quickstart's iEF-K-FAC:
SGD lr 0.1, damping 1e-3, factors every step, decompositions every 5, KL clip 1e-3) on the
embedded digits; at every step, at the same parameters and from the same batch, the directions of
plain SGD (the gradient), EF-K-FAC, MC-K-FAC and iEF-K-FAC (each preconditioner fed the same
batches along that trajectory, KL clip off: it only rescales) are scored by γ on the training batch,
on a fixed 32-sample probe and on the whole data set (1,797 samples). Lower is better.

Usage::

    .venv/bin/python benchmarks/quality_bench.py            # writes benchmarks/results/quality.{json,md}
    .venv/bin/python benchmarks/quality_bench.py --quick    # smoke run, benchmarks/out/quality/
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ngd_dist import KFACConfig, KFACPreconditioner  # noqa: E402
from ngd_dist.kfac.quality import QualityProbe, quality_indicator  # noqa: E402
from ngd_dist.service.data import load_digits  # noqa: E402
from ngd_dist.service.environment import Environment  # noqa: E402
from ngd_dist.service.jobs import load_job  # noqa: E402
from ngd_dist.service.models import mlp, small_cnn  # noqa: E402
from ngd_dist.service.trainer import Worker  # noqa: E402

COST_MODELS: dict[str, tuple[str, list[str]]] = {
    "mlp (quickstart)": ("quickstart.yaml", []),
    "small_cnn": (
        "quickstart.yaml",
        ["model.name=small_cnn", "model.args={channels: 1, classes: 10, side: 8}"],
    ),
    "gpt (gpt_lm.yaml)": ("gpt_lm.yaml", ["schedule.warmup_steps=0"]),
    "gpt, probe 4 sequences": ("gpt_lm.yaml", ["schedule.warmup_steps=0", "metrics.quality_probe=4"]),
}
"""Model label -> (job file, overrides). Probe 32 unless the overrides say otherwise."""
DIRECTIONS = ("sgd", "ef", "mc", "ief")


def machine() -> dict[str, Any]:
    """CPU model, cores, torch and Python versions, commit, time."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "commit": commit,
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def cpu_pressure() -> float | None:
    """Linux CPU pressure (PSI ``some avg60``, %): how much other load competed for the cores."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(item.split("=") for item in first.split()[1:])
    return float(fields["avg60"])


# -- part 1: cost ----------------------------------------------------------------------------------


def cost(
    name: str, config: str, overrides: list[str], rounds: int, block: int, warmup: int
) -> dict[str, Any]:
    """Mean step time without and with the probe (ABBA blocks), through the worker's own code."""
    with tempfile.TemporaryDirectory() as tmp:
        job = load_job(
            ROOT / "configs" / config,
            [
                *[o for o in overrides if not o.startswith("metrics.")],
                "train.steps=1000000",
                "metrics.quality_every=1",
                "metrics.quality_probe=32",
                *[o for o in overrides if o.startswith("metrics.")],
                "metrics.port=1",  # nonzero: the worker builds its probe; no server is started here
                f"checkpoint.dir={tmp}",
                "checkpoint.every=0",
                "checkpoint.resume=never",
            ],
        )
        torch.manual_seed(job.seed)
        worker = Worker(job, Environment(0, 1, 0, torch.device("cpu"), "single"))
    probe = worker.parts.quality
    assert probe is not None
    batches = worker.parts.loader.forever()
    times: dict[str, list[float]] = {"off": [], "on": []}
    probe_ms: list[float] = []
    gammas: list[float] = []

    def step(with_probe: bool) -> float:
        x, y = next(batches)
        start = time.perf_counter()
        before = probe.snapshot() if with_probe else None
        copied = time.perf_counter()
        worker.train_step(x, y)
        if before is not None:
            mid = time.perf_counter()
            gammas.append(probe.measure(before).gamma)
            probe_ms.append(1e3 * (time.perf_counter() - mid + copied - start))
        return 1e3 * (time.perf_counter() - start)

    for i in range(warmup):
        step(i % 2 == 1)
    probe_ms.clear()
    order = ["off", "on"]
    for r in range(rounds):
        for mode in order if r % 2 == 0 else order[::-1]:
            times[mode].extend(step(mode == "on") for _ in range(block))
    off, on = statistics.mean(times["off"]), statistics.mean(times["on"])
    params = sum(p.numel() for p in worker.parts.base_model.parameters())
    return {
        "model": name,
        "config": config,
        "overrides": overrides,
        "parameters": params,
        "batch": int(job.batch.per_rank),
        "rows_per_probe": int(probe.targets.numel()),
        "probe": len(probe.inputs),
        "method": probe.method,
        "steps_per_mode": len(times["off"]),
        "step_ms_off": off,
        "step_ms_on": on,
        "median_ms_off": statistics.median(times["off"]),
        "median_ms_on": statistics.median(times["on"]),
        "probe_ms": statistics.mean(probe_ms),
        "probe_ms_note": "snapshot before the step + gamma after it (QualityProbe.snapshot + measure)",
        "ratio": on / off,
        "last_gamma": gammas[-1],
    }


# -- part 2: gamma of directions -------------------------------------------------------------------


def directions(model_name: str, steps: int, seed: int) -> dict[str, Any]:
    """γ of SGD / EF / MC / iEF-K-FAC directions at the same parameters along one iEF-K-FAC trajectory."""
    x_all, y_all = load_digits()
    torch.manual_seed(seed)
    base: nn.Module = mlp(64, 128, 10) if model_name == "mlp" else small_cnn(channels=1, side=8)
    head = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)][-1]
    # method eigen: the form docs/benchmarks.md quotes (the library default became inverse)
    settings = {
        "damping": 1e-3, "factor_every": 1, "inverse_every": 5, "output_module": head, "method": "eigen"
    }
    driver = base
    opt = torch.optim.SGD(driver.parameters(), lr=0.1)
    driver_pc = KFACPreconditioner(
        driver, KFACConfig(curvature="ief", kl_clip=1e-3, **settings), optimizer=opt
    )
    shadows = {c: copy.deepcopy(base) for c in ("ef", "mc", "ief")}
    shadow_pc = {
        c: KFACPreconditioner(m, KFACConfig(curvature=c, kl_clip=None, **settings))
        for c, m in shadows.items()
    }
    probe = QualityProbe.draw(driver, x_all, y_all, size=32, seed=seed + 1, loss="classification")
    generator = torch.Generator().manual_seed(seed + 2)
    rows: list[dict[str, Any]] = []
    for step in range(steps):
        idx = torch.randperm(len(x_all), generator=generator)[:256]
        x, y = x_all[idx], y_all[idx]
        dirs: dict[str, dict[str, torch.Tensor]] = {}
        for c, m in shadows.items():
            m.load_state_dict(driver.state_dict())
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            if c == "ef":
                dirs["sgd"] = {
                    n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None
                }
            shadow_pc[c].step()
            dirs[c] = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
        row: dict[str, Any] = {"step": step}
        for where, (px, py) in {
            "batch": (x, y),
            "probe": (probe.inputs, probe.targets),
            "all": (x_all, y_all),
        }.items():
            for d in DIRECTIONS:
                row[f"{where}/{d}"] = quality_indicator(driver, px, py, dirs[d]).gamma
        rows.append(row)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(driver(x), y)
        loss.backward()
        driver_pc.step()
        opt.step()
        row["loss"] = float(loss.detach())
    summary: dict[str, Any] = {}
    for where in ("batch", "probe", "all"):
        for d in DIRECTIONS:
            values = [r[f"{where}/{d}"] for r in rows]
            late = values[len(values) // 2 :]
            summary[f"{where}/{d}"] = {
                "median": statistics.median(values),
                "median_late": statistics.median(late),
            }
        ief, ef = [r[f"{where}/ief"] for r in rows], [r[f"{where}/ef"] for r in rows]
        summary[f"{where}/ief<ef"] = sum(a < b for a, b in zip(ief, ef, strict=True)) / len(rows)
    return {
        "model": model_name,
        "steps": steps,
        "settings": {**settings, "lr": 0.1},
        "rows": rows,
        "summary": summary,
    }


# -- output ----------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    """The tables of ``result`` as Markdown."""
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} thread), "
        f"Python {m['python']}, commit {m['commit']}, {m['utc']} UTC. CPU pressure (PSI some avg60) "
        f"{result['cpu_pressure_before']}% before, {result['cpu_pressure_after_cost']}% after the timings.",
        "",
        "| model | parameters | batch | probe | J·d by | step ms (off) | step ms (on) | probe ms "
        "| on / off |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["cost"]:
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {r['batch']} | {r['probe']} | {r['method']} | "
            f"{r['step_ms_off']:.2f} | {r['step_ms_on']:.2f} | {r['probe_ms']:.2f} | {r['ratio']:.2f} |"
        )
    lines += [
        "",
        "γ (median over steps; in brackets: median over the second half) at the same parameters along one "
        "iEF-K-FAC trajectory; lower is better. `iEF<EF`: share of steps where iEF-K-FAC's γ is below "
        "EF-K-FAC's.",
        "",
        "| model | scored on | SGD | EF-K-FAC | MC-K-FAC | iEF-K-FAC | iEF<EF |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in result["directions"]:
        s = d["summary"]
        for where, label in (
            ("batch", "training batch (256)"),
            ("probe", "probe (32)"),
            ("all", "all 1,797"),
        ):
            cells = " | ".join(
                f"{s[f'{where}/{k}']['median']:.3g} ({s[f'{where}/{k}']['median_late']:.3g})"
                for k in DIRECTIONS
            )
            lines.append(
                f"| {d['model']} ({d['steps']} steps) | {label} | {cells} | {s[f'{where}/ief<ef']:.0%} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run both parts; write JSON and Markdown."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run (a few steps)")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or (ROOT / "benchmarks" / ("out/quality" if args.quick else "results"))
    out.mkdir(parents=True, exist_ok=True)
    rounds, block, warmup, steps = (2, 3, 2, 4) if args.quick else (6, 25, 10, 60)
    result: dict[str, Any] = {"machine": machine(), "command": " ".join(["python", *sys.argv])}
    result["cpu_pressure_before"] = cpu_pressure()
    result["cost"] = []
    for name, (config, overrides) in COST_MODELS.items():
        r = cost(name, config, overrides, rounds, block, warmup)
        print(
            f"{name}: step ms off {r['step_ms_off']:.2f}, on {r['step_ms_on']:.2f}, probe {r['probe_ms']:.2f}"
        )
        result["cost"].append(r)
    result["cpu_pressure_after_cost"] = cpu_pressure()
    result["directions"] = [directions(m, steps, args.seed) for m in ("mlp", "cnn")]
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "quality.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

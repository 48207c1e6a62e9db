"""Damping conventions at "the user's numbers": which one learns without tuning, across batch sizes.

The set-up of the issue "An optimizer that wins without tuning": a CIFAR-shaped CNN
(``small_cnn(channels=3, width=32, side=32)`` from :mod:`ngd_dist.service.models`) on synthetic
class-structured images 3x32x32, 10 classes (``synthetic_images``), SGD with momentum 0.9 under
:class:`ngd_dist.KFACPreconditioner` at the numbers users bring from other K-FAC libraries:
``lr=0.05``, ``kl_clip=1e-3``, ``factor_decay=0.95``, ``factor_every=10``, ``inverse_every=100``.
Every run starts from the same weights and sees the same batches (per batch size).

Runs, in this order (each phase interleaves the conventions it compares, so a change of machine
load hits both alike; the 1-minute load average is recorded beside every run):

1. SGD alone (momentum 0.9, same lr) at each batch size: the reference, and the target loss;
2. iEF-K-FAC, absolute damping {0.003, 0.03, 0.1, 0.3, 1, 3} against relative damping {1e-3,
   1e-2, 1e-1, 1, 10, 100}, alternating, at each batch size (32 and 128). The issue asked for the
   first four of each; the last two were added because at this model's start the mean eigenvalue
   of a layer's G (x) A is 0.002 to 0.015, so relative 1 is absolute 0.003 to 0.015 and the first
   four relative values all damp less than absolute 0.003;
3. EF-K-FAC at the best two dampings of each convention (by the iEF final loss, per batch size);
4. iEF-K-FAC with kl_clip 1e-2 and None at the best damping of each convention (per batch size);
5. the old and the new default damping (absolute 1e-3 and 0.1), EF and iEF, at each batch size.

One process stands for the issue's 2 ranks: K-FAC's factors and the averaged gradient of 2 ranks x
batch B/2 equal those of one process at batch B (ngd_dist averages factors over ranks), so the
maths is the same; one process saves the 2 shared cores.

Metrics: the final training loss (mean of the last 10 steps' batch losses), the steps to reach SGD's
final loss at the same batch size (first step whose trailing 10-step mean is at or below it; "-"
when never), and the fraction of K-FAC steps on which the KL clip bound (``stats.kl_scale < 1``).

Usage::

    .venv/bin/python benchmarks/damping_bench.py                 # full run -> benchmarks/results/
    .venv/bin/python benchmarks/damping_bench.py --quick         # smoke run -> benchmarks/out/damping/
    .venv/bin/python benchmarks/damping_bench.py --reuse benchmarks/results/damping_bench.json

Runs are deterministic (same weights, same batches, one thread), so ``--reuse FILE`` takes every
run already in an earlier JSON with the same settings instead of training it again.

Writes ``damping_bench.json`` (settings, machine, every run with its loss curve), ``damping_bench.md``
(the tables) and ``damping_bench.png`` (final loss against damping) into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ngd_dist import KFACConfig, KFACPreconditioner
from ngd_dist.kfac.config import Curvature, DampingScale
from ngd_dist.service.data.datasets import synthetic_images
from ngd_dist.service.models import small_cnn

ROOT = Path(__file__).resolve().parent.parent
DIVERGED_LOSS = 1e3
"""A batch loss above this (or non-finite) ends a run as diverged."""
WINDOW = 10
"""Steps averaged for the final loss and for the steps-to-target."""


@dataclass(frozen=True)
class Settings:
    """What one benchmark run does."""

    steps: int = 200
    batch_sizes: tuple[int, ...] = (32, 128)
    samples: int = 10000
    lr: float = 0.05
    momentum: float = 0.9
    kl_clip: float | None = 1e-3
    factor_decay: float = 0.95
    factor_every: int = 10
    inverse_every: int = 100
    absolute: tuple[float, ...] = (0.003, 0.03, 0.1, 0.3, 1.0, 3.0)
    relative: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    kl_clips: tuple[float | None, ...] = (1e-2, None)
    ef_best: int = 2
    defaults: tuple[float, ...] = (1e-3, 0.1)
    """Absolute dampings compared in phase 5: KFACConfig's old default and its new one."""
    width: int = 32
    seed: int = 0


QUICK = Settings(
    steps=20,
    batch_sizes=(16,),
    samples=512,
    absolute=(0.03,),
    relative=(1e-2,),
    ef_best=1,
    factor_every=5,
    inverse_every=10,
    defaults=(0.1,),
)


@dataclass
class Run:
    """One training run and what was measured."""

    method: str  # "sgd", "kfac-ief", "kfac-ef"
    batch: int
    scale: str | None = None  # "absolute" / "relative"
    damping: float | None = None
    kl_clip: float | None = None
    phase: str = ""
    losses: list[float] = field(default_factory=list)
    kl_scales: list[float] = field(default_factory=list)
    diverged: bool = False
    seconds: float = 0.0
    load_before: float = 0.0
    load_after: float = 0.0
    final: float = math.inf
    steps_to_sgd: int | None = None
    reused: bool = False
    """Taken from an earlier JSON (``--reuse``) instead of trained again."""

    @property
    def label(self) -> str:
        """``kfac-ief relative 0.01 kl_clip=0.001``."""
        if self.method == "sgd":
            return "sgd"
        return f"{self.method} {self.scale} {self.damping:g} kl_clip={self.kl_clip}"

    @property
    def clip_bound(self) -> float | None:
        """Fraction of K-FAC steps with kl_scale < 1 (None without the clip)."""
        if self.method == "sgd" or self.kl_clip is None or not self.kl_scales:
            return None
        return sum(s < 1.0 for s in self.kl_scales) / len(self.kl_scales)


def load1() -> float:
    """The 1-minute load average (what ``uptime`` prints first)."""
    return os.getloadavg()[0]


def train(run: Run, settings: Settings, images: Tensor, labels: Tensor, order: Tensor) -> Run:
    """Train from the seeded initial weights on the batches ``order`` (steps x batch) holds."""
    torch.manual_seed(settings.seed)
    model = small_cnn(channels=3, classes=10, width=settings.width, side=32)
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    precond = None
    if run.method != "sgd":
        assert run.damping is not None
        config = KFACConfig(
            curvature=Curvature.parse("curvature", run.method.removeprefix("kfac-")),
            damping=run.damping,
            damping_scale=DampingScale.parse("damping_scale", run.scale),
            kl_clip=run.kl_clip,
            factor_decay=settings.factor_decay,
            factor_every=settings.factor_every,
            inverse_every=settings.inverse_every,
            output_module="5",
            method="eigen",  # the form docs/curvature.md quotes (the library default became inverse)
        )
        precond = KFACPreconditioner(model, config, optimizer=opt)
    run.load_before = load1()
    start = time.perf_counter()
    for step in range(settings.steps):
        batch = order[step]
        opt.zero_grad()
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        loss.backward()
        value = loss.item()
        run.losses.append(value)
        if not math.isfinite(value) or value > DIVERGED_LOSS:
            run.diverged = True
            break
        if precond is not None:
            precond.step()
            run.kl_scales.append(precond.stats.kl_scale)
        opt.step()
    run.seconds = time.perf_counter() - start
    run.load_after = load1()
    run.final = math.inf if run.diverged else sum(run.losses[-WINDOW:]) / WINDOW
    return run


def steps_to(losses: list[float], target: float) -> int | None:
    """First step (1-based) whose trailing WINDOW-step mean loss is <= target."""
    for t in range(WINDOW, len(losses) + 1):
        if sum(losses[t - WINDOW : t]) / WINDOW <= target:
            return t
    return None


def interleave(a: Sequence[Any], b: Sequence[Any]) -> list[Any]:
    """a0, b0, a1, b1, ... (the rest of the longer one at the end)."""
    out: list[Any] = []
    for i in range(max(len(a), len(b))):
        out += [x[i] for x in (a, b) if i < len(x)]
    return out


def run_key(run: Run) -> tuple[Any, ...]:
    """What identifies a run's result (with the settings)."""
    return (run.method, run.batch, run.scale, run.damping, run.kl_clip)


def benchmark(
    settings: Settings, log: Any = print, reuse: dict[tuple[Any, ...], dict[str, Any]] | None = None
) -> list[Run]:
    """All phases; returns every run. ``reuse``: earlier results by :func:`run_key`."""
    torch.manual_seed(settings.seed)
    images, labels = synthetic_images(n=settings.samples, channels=3, size=32, classes=10, seed=settings.seed)
    orders = {}
    for b in settings.batch_sizes:
        gen = torch.Generator().manual_seed(settings.seed + b)
        orders[b] = torch.randint(settings.samples, (settings.steps, b), generator=gen)
    runs: list[Run] = []

    def go(run: Run) -> Run:
        done = [r for r in runs if run_key(r) == run_key(run)]
        if done:  # asked for twice (a default that is also in the grid): measured once
            return done[0]
        cached = (reuse or {}).get(run_key(run))
        if cached is not None:
            for name in ("losses", "kl_scales", "diverged", "seconds", "load_before", "load_after", "final"):
                setattr(run, name, cached[name])
            run.reused = True
        else:
            train(run, settings, images, labels, orders[run.batch])
        sgd = [r for r in runs if r.method == "sgd" and r.batch == run.batch]
        if sgd and not run.diverged:
            run.steps_to_sgd = steps_to(run.losses, sgd[0].final)
        runs.append(run)
        clip = f" clip bound {run.clip_bound:.0%}" if run.clip_bound is not None else ""
        log(
            f"[{run.phase}{' reused' if run.reused else ''}] B={run.batch:<4} {run.label:<44} "
            f"final {run.final:.4f} to-sgd {run.steps_to_sgd}{clip}  {run.seconds:.1f}s  "
            f"load {run.load_before:.2f}->{run.load_after:.2f}",
        )
        return run

    for b in settings.batch_sizes:  # 1. reference
        go(Run("sgd", b, phase="sgd"))
    for b in settings.batch_sizes:  # 2. iEF damping grid, conventions alternating
        abs_runs = [Run("kfac-ief", b, "absolute", d, settings.kl_clip, "grid") for d in settings.absolute]
        rel_runs = [Run("kfac-ief", b, "relative", d, settings.kl_clip, "grid") for d in settings.relative]
        for run in interleave(abs_runs, rel_runs):
            go(run)

    def best(b: int, scale: str, n: int) -> list[float]:
        grid = [r for r in runs if r.phase == "grid" and r.batch == b and r.scale == scale]
        return [r.damping for r in sorted(grid, key=lambda r: r.final)[:n] if r.damping is not None]

    for b in settings.batch_sizes:  # 3. EF at the best two of each convention
        ef = [
            [Run("kfac-ef", b, scale, d, settings.kl_clip, "ef") for d in best(b, scale, settings.ef_best)]
            for scale in ("absolute", "relative")
        ]
        for run in interleave(*ef):
            go(run)
    for b in settings.batch_sizes:  # 4. the KL clip at the best damping of each convention
        for clip in settings.kl_clips:
            for scale in ("absolute", "relative"):
                go(Run("kfac-ief", b, scale, best(b, scale, 1)[0], clip, "kl_clip"))
    for b in settings.batch_sizes:  # 5. old and new default damping
        for d in settings.defaults:
            for method in ("kfac-ief", "kfac-ef"):
                go(Run(method, b, "absolute", d, settings.kl_clip, "defaults"))
    return runs


# -- report --------------------------------------------------------------------------------------


def fmt(x: float | None, spec: str = ".3f") -> str:
    """A number, or "-" for None, "diverged" for inf."""
    if x is None:
        return "-"
    return "diverged" if math.isinf(x) else format(x, spec)


def markdown(runs: list[Run], settings: Settings, machine: dict[str, Any]) -> str:
    """The tables of the report."""
    out = [
        "# Damping conventions at the user's numbers (`benchmarks/damping_bench.py`)",
        "",
        f"small_cnn(3, width={settings.width}, side=32), {machine['parameters']:,} parameters; "
        f"synthetic_images n={settings.samples}; {settings.steps} steps; SGD lr {settings.lr}, momentum "
        f"{settings.momentum}; K-FAC factor_decay {settings.factor_decay}, factor_every "
        f"{settings.factor_every}, inverse_every {settings.inverse_every}, kl_clip {settings.kl_clip} "
        f"unless stated. Final loss = mean of the last {WINDOW} batch losses; steps to SGD = first step "
        f"whose trailing {WINDOW}-step mean reaches SGD's final loss at that batch size; clip bound = "
        "fraction of K-FAC steps with kl_scale < 1. Machine: "
        f"{machine['machine']}, torch {machine['torch']}, {machine['threads']} thread(s).",
        "",
    ]
    bs = settings.batch_sizes
    sgd = {b: next(r for r in runs if r.method == "sgd" and r.batch == b) for b in bs}
    out += [
        "## SGD reference",
        "",
        "| batch | final loss | load (1 min) | seconds |",
        "|---:|---:|---:|---:|",
    ]
    out += [f"| {b} | {fmt(sgd[b].final)} | {sgd[b].load_before:.2f} | {sgd[b].seconds:.0f} |" for b in bs]

    def table(title: str, rows: list[Run]) -> None:
        nonlocal out
        out += [
            "",
            f"## {title}",
            "",
            "| curvature | convention | damping | kl_clip | batch | final loss | steps to SGD | clip bound "
            "| load | s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            out.append(
                f"| {r.method.removeprefix('kfac-')} | {r.scale} | {r.damping:g} | {r.kl_clip} | {r.batch} | "
                f"{fmt(r.final)} | {fmt(r.steps_to_sgd, 'd')} | {fmt(r.clip_bound, '.0%')} | "
                f"{r.load_before:.2f} | {r.seconds:.0f} |"
            )

    key = lambda r: (r.scale or "", r.damping or 0.0, r.batch)  # noqa: E731
    table("iEF: damping grid", sorted([r for r in runs if r.phase == "grid"], key=key))
    table(
        "EF at the best two dampings of each convention",
        sorted([r for r in runs if r.phase == "ef"], key=key),
    )
    grid_best = [
        min((r for r in runs if r.phase == "grid" and r.batch == b and r.scale == s), key=lambda r: r.final)
        for b in bs
        for s in ("absolute", "relative")
    ]
    table(
        "KL clip at the best damping (iEF)",
        sorted(
            grid_best + [r for r in runs if r.phase == "kl_clip"],
            key=lambda r: (r.batch, r.scale or "", str(r.kl_clip)),
        ),
    )
    defaults = [
        r
        for r in runs
        if r.method != "sgd"
        and r.scale == "absolute"
        and r.kl_clip == settings.kl_clip
        and r.damping in settings.defaults
    ]
    table(
        "Old (1e-3) and new (0.1) default damping, absolute",
        sorted(defaults, key=lambda r: (r.batch, r.damping or 0.0, r.method)),
    )
    return "\n".join(out) + "\n"


def plot(runs: list[Run], settings: Settings, path: Path) -> None:
    """Final loss against damping, one panel per batch size, both conventions (two x axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = settings.batch_sizes
    fig, axes = plt.subplots(1, len(bs), figsize=(5.5 * len(bs), 4), squeeze=False)
    for ax, b in zip(axes[0], bs, strict=True):
        sgd = next(r for r in runs if r.method == "sgd" and r.batch == b)
        for method, style in (("kfac-ief", "-o"), ("kfac-ef", "--s")):
            for scale, color, grid in (
                ("absolute", "C0", settings.absolute),
                ("relative", "C1", settings.relative),
            ):
                pts = sorted(
                    (grid.index(r.damping), min(r.final, 3.0))
                    for r in runs
                    if r.method == method
                    and r.batch == b
                    and r.scale == scale
                    and r.kl_clip == settings.kl_clip
                    and r.damping in grid
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        style,
                        color=color,
                        label=f"{method.removeprefix('kfac-')} {scale}",
                    )
        ax.axhline(sgd.final, color="k", lw=0.8, ls=":", label="SGD")
        ax.set_xticks(range(len(settings.absolute)))
        ax.set_xticklabels(
            [f"abs {a:g}\nrel {r:g}" for a, r in zip(settings.absolute, settings.relative, strict=True)]
        )
        ax.set_ylabel(f"final loss (mean of last {WINDOW})")
        ax.set_title(f"batch {b}, kl_clip {settings.kl_clip}, lr {settings.lr}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 minute)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks/results)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 200)")
    parser.add_argument(
        "--reuse", type=Path, default=None, help="an earlier damping_bench.json whose runs to reuse"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run, then write the JSON, the tables and the figure."""
    args = parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.steps is not None:
        settings = Settings(**{**asdict(settings), "steps": args.steps})
    out = args.out or (ROOT / "benchmarks" / ("out/damping" if args.quick else "results"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    model = small_cnn(channels=3, classes=10, width=settings.width, side=32)
    machine = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": args.threads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_at_start": os.getloadavg(),
    }
    print(f"{machine}", flush=True)
    start = time.perf_counter()
    reuse = None
    if args.reuse is not None:
        earlier = json.loads(args.reuse.read_text())
        same = {k: v for k, v in json.loads(json.dumps(asdict(settings))).items() if k != "defaults"}
        if {k: v for k, v in earlier["settings"].items() if k != "defaults"} != same:
            raise SystemExit(f"--reuse {args.reuse}: its settings differ from this run's")
        reuse = {
            (r["method"], r["batch"], r["scale"], r["damping"], r["kl_clip"]): r for r in earlier["runs"]
        }
    runs = benchmark(settings, log=lambda s: print(s, flush=True), reuse=reuse)
    machine["wall_s"] = round(time.perf_counter() - start, 1)
    machine["load_at_end"] = os.getloadavg()
    (out / "damping_bench.json").write_text(
        json.dumps(
            {
                "settings": asdict(settings),
                "machine": machine,
                "runs": [asdict(r) | {"label": r.label, "clip_bound": r.clip_bound} for r in runs],
            },
            indent=1,
        )
    )
    (out / "damping_bench.md").write_text(markdown(runs, settings, machine))
    plot(runs, settings, out / "damping_bench.png")
    print(f"wrote {out}/damping_bench.{{json,md,png}} in {machine['wall_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One-change sweep of K-FAC's settings: does any single knob cut iEF-K-FAC's steps to SGD's loss?

The set-up of ``benchmarks/target_bench.py`` (its ``cnn`` workload) in one process:
``small_cnn(channels=3, width=32, side=32)`` on ``synthetic_images`` (3x32x32, 10 classes, 25,600
samples, each seen once), batch 128 per step (target_bench's 2 ranks x 64 in one process: the same
batches, the same averaged gradient; ngd_dist averages K-FAC's factors over ranks, so the factors
match too, except that ``statistics_rows`` subsamples 4096 rows of the whole batch here instead of
4096 per rank), 200 steps, one thread, no ``torch.distributed``. Every run of a seed starts from
the same weights and sees the same batches (built once and reused).

Runs, one at a time:

1. SGD (momentum 0.9, lr 0.02: target_bench's tuned value): its final loss is the target; AdamW
   (lr 1e-3, weight decay 0) for reference;
2. the baseline: iEF-K-FAC at ``KFACConfig`` defaults under SGD, lr 0.05, momentum 0.9;
3. one-change variants of the baseline (``VARIANTS``: each changes one setting);
4. the baseline and the 3 variants with the fewest steps to target (ties: lower final loss) again
   with 2 more seeds (another weight init and batch order; SGD re-run per seed for its target).

Metrics per run: final loss (mean of the last 10 batch losses), steps to target (first step whose
trailing 10-step mean is at or below SGD's final loss of the same seed; "–" when never), its ratio
to SGD's own steps to that loss, the trailing 10-step mean at steps 25 / 50 / 100, mean step time
and wall seconds (information only: the machine is shared, the 1-minute load average is recorded
at the start and end of every run), and for K-FAC the fraction of steps on which the KL clip bound
(``precond.stats.kl_scale < 1``) and the number of decompositions.

``--batch-sweep`` (``BatchSweep``) asks instead whether the best absolute damping falls as the batch
grows (K-FAC's factors are per-sample means, so their noise falls like 1/sqrt(batch)). At batch 32,
128 and 512, seeds 0 and 1, 200 steps, on ``synthetic_images`` with steps x batch samples at each
batch size (every sample seen once, no reuse; the data of a batch size is generated once and each
seed cuts it into its own batch order): SGD (lr 0.02, momentum 0.9; its final loss is the target),
then iEF-K-FAC under SGD (lr 0.05, momentum 0.9) with ``method="inverse"`` at damping 0.01, 0.03,
0.1 and 0.3, and ``method="eigen"`` at damping 0.1 (``KFACConfig``'s defaults). The same metrics
per run; tables per batch size of steps to target, × SGD and final loss per seed and their means,
and the best ``inverse`` damping per batch size by mean × SGD and by mean final loss. If a run at
the largest batch size takes over ``BatchSweep.slow_s`` (90 s) at the first seed, the other seeds
are dropped at that batch size only (the tables say so).

Usage::

    .venv/bin/python benchmarks/knob_sweep.py                         # full sweep (~15 min on 2 cores)
    .venv/bin/python benchmarks/knob_sweep.py --quick                 # smoke run: 20 steps, 3 variants
    .venv/bin/python benchmarks/knob_sweep.py --batch-sweep           # damping x batch (~25 min)
    .venv/bin/python benchmarks/knob_sweep.py --batch-sweep --quick   # its smoke run: 20 steps
    .venv/bin/python benchmarks/knob_sweep.py --variants "statistics_rows 4096"   # some variants only

Writes ``knob_sweep.{json,md}`` (``--batch-sweep``: ``damping_batch.{json,md}``; ``--variants``:
``knob_sweep_variants.{json,md}``, all of them re-run at the repeat seeds) to
benchmarks/results/ (``--quick``: benchmarks/out/knob_sweep/; ``--out``: that folder).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import load1, machine_info  # noqa: E402
from target_bench import WINDOW, steps_to  # noqa: E402

from ngd_dist import KFACConfig, KFACPreconditioner  # noqa: E402
from ngd_dist.service.data.datasets import synthetic_images  # noqa: E402
from ngd_dist.service.models import small_cnn  # noqa: E402

CHECKPOINTS = (25, 50, 100)
"""Steps at which the trailing WINDOW-step mean loss is reported."""
OUTPUT_MODULE = "5"
"""The logits' module in ``small_cnn`` (an ``nn.Sequential``): its Linear head."""


@dataclass(frozen=True)
class Settings:
    """What one sweep does."""

    steps: int = 200
    batch: int = 128
    samples: int = 25600
    """steps x batch: every batch is new, so the training loss is not a memorised one."""
    sgd_lr: float = 0.02
    adamw_lr: float = 1e-3
    kfac_lr: float = 0.05
    momentum: float = 0.9
    seed: int = 0
    """The main sweep's seed (weights: ``torch.manual_seed(seed)``; batch order: generator seed + 1)."""
    repeat_seeds: tuple[int, ...] = (1, 2)
    top: int = 3
    """Variants (besides the baseline) re-run with ``repeat_seeds``."""
    variants: tuple[str, ...] | None = None
    """Names from VARIANTS to run (None: all)."""


QUICK = Settings(
    steps=20,
    samples=20 * 128,
    repeat_seeds=(1,),
    top=1,
    variants=("damping 0.3", "inverse, damping 0.1", "damping 0.3→0.03 (geometric)"),
)


class GeometricDamping:
    """A damping schedule: ``start`` at step 0 to ``end`` at step ``steps - 1``, geometrically."""

    def __init__(self, start: float, end: float, steps: int) -> None:
        self.start, self.end, self.steps = start, end, steps

    def __call__(self, step: int) -> float:
        t = min(1.0, step / max(1, self.steps - 1))
        return self.start * (self.end / self.start) ** t

    def __repr__(self) -> str:
        return f"GeometricDamping({self.start}, {self.end}, steps={self.steps})"


@dataclass
class Variant:
    """One K-FAC run: its changes to ``KFACConfig`` defaults and the optimizer's momentum."""

    name: str
    kfac: dict[str, Any] = field(default_factory=dict)
    momentum: float | None = None
    """None: ``Settings.momentum``."""
    extra: bool = False
    """Added beyond the brief's list (a knob judged principled)."""


def variants(steps: int) -> list[Variant]:
    """The baseline and its one-change variants (a damping schedule spans ``steps``)."""
    return [
        Variant("baseline"),
        Variant("damping 0.03", {"damping": 0.03}),
        Variant("damping 0.3", {"damping": 0.3}),
        Variant("inverse, damping 0.1", {"method": "inverse"}),
        Variant("inverse, damping 0.03", {"method": "inverse", "damping": 0.03}),
        Variant("inverse, damping 0.3", {"method": "inverse", "damping": 0.3}),
        Variant("factor_decay 0.9", {"factor_decay": 0.9}),
        Variant("factor_decay 0.8", {"factor_decay": 0.8}),
        Variant("kl_clip 3e-4", {"kl_clip": 3e-4}),
        Variant("kl_clip 3e-3", {"kl_clip": 3e-3}),
        Variant("relative damping 10", {"damping_scale": "relative", "damping": 10.0}),
        Variant("momentum 0.8", momentum=0.8),
        Variant("momentum 0.95", momentum=0.95),
        Variant("statistics_rows None", {"statistics_rows": None}),
        Variant("factor_every 5, inverse_every 50", {"factor_every": 5, "inverse_every": 50}),
        Variant("damping 0.3→0.03 (geometric)", {"damping": GeometricDamping(0.3, 0.03, steps)}, extra=True),
        Variant("inverse_every 20", {"inverse_every": 20}, extra=True),
        Variant("kl_clip 1e-2", {"kl_clip": 1e-2}, extra=True),
        Variant("damping 0.01", {"damping": 0.01}, extra=True),
        Variant("statistics_rows 2048", {"statistics_rows": 2048}, extra=True),
        Variant("statistics_rows 4096", {"statistics_rows": 4096}, extra=True),
        Variant("adaptive refresh", {"refresh": "adaptive"}, extra=True),
        Variant("adaptive, refresh_low 0.1", {"refresh": "adaptive", "refresh_low": 0.1}, extra=True),
        Variant(
            "adaptive, refresh_low 0.1, refresh_high 0.5",
            {"refresh": "adaptive", "refresh_low": 0.1, "refresh_high": 0.5},
            extra=True,
        ),
        Variant(
            "adaptive, refresh_low 0.2, refresh_high 0.5",
            {"refresh": "adaptive", "refresh_low": 0.2, "refresh_high": 0.5},
            extra=True,
        ),
    ]


# -- data and training ---------------------------------------------------------------------------


def make_batches(
    images: Tensor, labels: Tensor, settings: Settings, seed: int
) -> list[tuple[Tensor, Tensor]]:
    """The ``steps`` batches of one seed: a permutation of the samples, cut into ``batch``-sized views."""
    gen = torch.Generator().manual_seed(seed + 1)
    epochs = -(-settings.steps * settings.batch // len(labels))
    order = torch.cat([torch.randperm(len(labels), generator=gen) for _ in range(epochs)])
    order = order[: settings.steps * settings.batch]
    x, y = images[order], labels[order]
    return [
        (x[s * settings.batch : (s + 1) * settings.batch], y[s * settings.batch : (s + 1) * settings.batch])
        for s in range(settings.steps)
    ]


def train(
    batches: Sequence[tuple[Tensor, Tensor]],
    seed: int,
    optimizer: str,
    lr: float,
    momentum: float = 0.9,
    kfac: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``small_cnn`` from the seed's initial weights over ``batches``; losses, times and counters.

    ``optimizer``: ``"sgd"`` (with ``momentum``) or ``"adamw"``; ``kfac``: KFACConfig changes (None:
    no preconditioner), under SGD.
    """
    torch.manual_seed(seed)
    model = small_cnn(channels=3, width=32, side=32)
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    precond = None
    if kfac is not None:
        config = KFACConfig(output_module=OUTPUT_MODULE, seed=seed, **kfac)
        precond = KFACPreconditioner(model, config, optimizer=opt)
    losses: list[float] = []
    times: list[float] = []
    bound = 0
    load_start = load1()
    started = time.perf_counter()
    for x, y in batches:
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if precond is not None:
            precond.step()
        opt.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        if precond is not None and precond.stats.kl_scale < 1.0:
            bound += 1
    return {
        "losses": losses,
        "step_ms": 1000 * statistics.fmean(times),
        "wall_s": time.perf_counter() - started,
        "load1_start": load_start,
        "load1_end": load1(),
        "kl_bound": bound / len(batches) if precond is not None else None,
        "decompositions": precond.stats.decompositions if precond is not None else None,
    }


# -- analysis ----------------------------------------------------------------------------------


def final(losses: Sequence[float]) -> float:
    """The mean of the last WINDOW losses."""
    return statistics.fmean(losses[-WINDOW:])


def summarise(run: dict[str, Any], target: float, sgd_steps: int | None) -> dict[str, Any]:
    """A run's figures against the target loss and SGD's steps to it."""
    losses = run["losses"]
    reached = steps_to(losses, target)
    return {
        "final": final(losses),
        "steps_to_target": reached,
        "steps_x_sgd": reached / sgd_steps if reached is not None and sgd_steps else None,
        "loss_at": {
            str(k): statistics.fmean(losses[k - WINDOW : k]) for k in CHECKPOINTS if k <= len(losses)
        },
        **{k: v for k, v in run.items() if k != "losses"},
    }


def rank_key(row: dict[str, Any]) -> tuple[float, float]:
    """Sort key: fewest steps to target (never: last), then the lower final loss."""
    steps = row["steps_to_target"]
    return (float("inf") if steps is None else steps, row["final"])


def describe(v: Variant, settings: Settings) -> dict[str, Any]:
    """A variant's changes, JSON-ready."""
    changes = {k: (repr(x) if callable(x) else x) for k, x in v.kfac.items()}
    if v.momentum is not None:
        changes["momentum"] = v.momentum
    return {"changes": changes, "momentum": v.momentum or settings.momentum, "extra": v.extra}


# -- the sweep ---------------------------------------------------------------------------------


def _log(name: str, row: dict[str, Any]) -> None:
    print(
        f"  {name:34s} final {row['final']:.4f}  steps {row['steps_to_target']}  "
        f"{row['step_ms']:.0f} ms/step  load {row['load1_start']:.2f}->{row['load1_end']:.2f}",
        flush=True,
    )


def sweep(settings: Settings) -> dict[str, Any]:
    """Reference runs, the baseline and its variants at ``seed``, then the best again at repeat seeds."""
    torch.set_num_threads(1)
    results: dict[str, Any] = {"settings": asdict(settings), "machine": machine_info(1)}
    started = time.time()
    images, labels = synthetic_images(n=settings.samples, channels=3, size=32, classes=10, seed=0)
    chosen = [
        v
        for v in variants(settings.steps)
        if v.name == "baseline" or settings.variants is None or v.name in settings.variants
    ]

    def run_seed(seed: int, names: Sequence[str]) -> dict[str, Any]:
        batches = make_batches(images, labels, settings, seed)
        sgd = train(batches, seed, "sgd", settings.sgd_lr, settings.momentum)
        target = final(sgd["losses"])
        sgd_steps = steps_to(sgd["losses"], target)
        rows = {"sgd": summarise(sgd, target, sgd_steps)}
        _log(f"sgd (seed {seed})", rows["sgd"])
        if seed == settings.seed:
            rows["adamw"] = summarise(train(batches, seed, "adamw", settings.adamw_lr), target, sgd_steps)
            _log("adamw", rows["adamw"])
        curves = {"sgd": sgd["losses"]}
        for v in chosen:
            if v.name not in names:
                continue
            run = train(batches, seed, "sgd", settings.kfac_lr, v.momentum or settings.momentum, v.kfac)
            curves[v.name] = run["losses"]
            rows[v.name] = {**summarise(run, target, sgd_steps), **describe(v, settings)}
            _log(v.name, rows[v.name])
        return {"target": target, "sgd_steps": sgd_steps, "rows": rows, "curves": curves}

    print(f"seed {settings.seed}: {len(chosen)} K-FAC runs", flush=True)
    main_runs = run_seed(settings.seed, [v.name for v in chosen])
    kfac_rows = {n: r for n, r in main_runs["rows"].items() if n not in ("sgd", "adamw")}
    best = [n for n in sorted(kfac_rows, key=lambda n: rank_key(kfac_rows[n])) if n != "baseline"]
    repeated = ["baseline", *best[: settings.top]]
    seeds: dict[str, Any] = {}
    for seed in settings.repeat_seeds:
        print(f"seed {seed}: {', '.join(repeated)}", flush=True)
        run = run_seed(seed, repeated)
        seeds[str(seed)] = {k: v for k, v in run.items() if k != "curves"}
    results["main"] = main_runs
    results["repeats"] = {"names": repeated, "seeds": seeds}
    results["repeats"]["summary"] = repeat_summary(results, repeated)
    results["machine"]["load1_at_end"] = load1()
    results["seconds"] = time.time() - started
    return results


def repeat_summary(results: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Per repeated run: steps to target and its ratio to SGD's at every seed, with mean / min / max."""
    seed_runs = {str(results["settings"]["seed"]): results["main"], **results["repeats"]["seeds"]}
    out: dict[str, Any] = {}
    for name in ["sgd", *names]:
        per_seed = {s: r["rows"][name] for s, r in seed_runs.items()}
        steps = [r["steps_to_target"] for r in per_seed.values()]
        ratios = [r["steps_x_sgd"] for r in per_seed.values()]
        finals = [r["final"] for r in per_seed.values()]
        reached = [s for s in steps if s is not None]
        out[name] = {
            "steps": steps,
            "ratios": ratios,
            "finals": finals,
            "never": len(steps) - len(reached),
            "steps_mean": statistics.fmean(reached) if reached else None,
            "steps_min": min(reached) if reached else None,
            "steps_max": max(reached) if reached else None,
            "ratio_mean": statistics.fmean(r for r in ratios if r is not None) if reached else None,
            "ratio_min": min((r for r in ratios if r is not None), default=None),
            "ratio_max": max((r for r in ratios if r is not None), default=None),
            "final_mean": statistics.fmean(finals),
        }
    return out


# -- outputs -----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def machine_line(results: dict[str, Any]) -> str:
    """The results' machine, load, duration and command, as one line of markdown."""
    m = results["machine"]
    changed = "" if not m["ngd_dist_modified"] else " (+ local changes)"
    return (
        f"{m['cpu_model']}, {m['cpu_count']} cores, torch {m['torch']} (1 thread), {m['date_utc']}, "
        f"commit {m['git_commit']}{changed}; load average {m['load1_at_start']:.2f} at start, "
        f"{m['load1_at_end']:.2f} at end; {results['seconds'] / 60:.1f} min. "
        f"Command: `{results['command']}`."
    )


def markdown(results: dict[str, Any]) -> str:
    """The sweep's table (sorted by steps to target) and the seed-repeat summary."""
    s, main = results["settings"], results["main"]
    lines = [
        "# One-change K-FAC sweep (`benchmarks/knob_sweep.py`)",
        "",
        machine_line(results),
        "",
        f"`small_cnn(3, width=32, side=32)`, one process, batch {s['batch']}, {s['steps']} steps, seed "
        f"{s['seed']}. SGD lr {s['sgd_lr']} momentum {s['momentum']}; K-FAC = iEF, SGD lr {s['kfac_lr']} "
        f"momentum {s['momentum']}, `KFACConfig` defaults but the one change named. Target (SGD's final "
        f"loss): {main['target']:.4f}, which SGD reaches at step {main['sgd_steps']}. Loss at step k = "
        f"mean of steps k-9..k. ms/step and wall time are for information only (shared machine).",
        "",
        "| run | final loss | steps to target | × SGD steps | loss@25 | loss@50 | loss@100 "
        "| ms/step | wall s | KL clip bound | decompositions | load start→end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = main["rows"]
    for name in sorted(rows, key=lambda n: rank_key(rows[n])):
        r = rows[name]
        at = r["loss_at"]
        label = f"{name} *" if r.get("extra") else name
        label = f"**{label}**" if name == "baseline" else label
        bound = r["kl_bound"]
        lines.append(
            f"| {label} | {r['final']:.4f} | {_fmt(r['steps_to_target'], 'd')} | {_fmt(r['steps_x_sgd'])} | "
            + " | ".join(_fmt(at.get(str(k)), ".3f") for k in CHECKPOINTS)
            + f" | {r['step_ms']:.0f} | {r['wall_s']:.1f} | "
            f"{'–' if bound is None else f'{100 * bound:.0f}%'} | {_fmt(r['decompositions'], 'd')} | "
            f"{r['load1_start']:.2f}→{r['load1_end']:.2f} |"
        )
    seeds = [str(s["seed"]), *(str(x) for x in s["repeat_seeds"])]
    summary = results["repeats"]["summary"]
    lines += [
        "",
        "\\* added beyond the brief's list.",
        "",
        f"## Seed repeats (seeds {', '.join(seeds)}: weight init and batch order; target = that seed's "
        "SGD final loss)",
        "",
        "| run | steps to target per seed | mean | min | max | × SGD per seed | × SGD mean "
        "| final loss per seed | final mean |",
        "|---|---|---:|---:|---:|---|---:|---|---:|",
    ]
    for name, r in summary.items():
        never = f" ({r['never']} never)" if r["never"] else ""
        lines.append(
            f"| {name} | {' / '.join(_fmt(x, 'd') for x in r['steps'])}{never} "
            f"| {_fmt(r['steps_mean'], '.1f')} | {_fmt(r['steps_min'], 'd')} | {_fmt(r['steps_max'], 'd')} | "
            f"{' / '.join(_fmt(x) for x in r['ratios'])} | {_fmt(r['ratio_mean'])} | "
            f"{' / '.join(f'{x:.4f}' for x in r['finals'])} | {r['final_mean']:.4f} |"
        )
    return "\n".join(lines) + "\n"


# -- damping across batch sizes (--batch-sweep) ------------------------------------------------


@dataclass(frozen=True)
class BatchSweep:
    """What ``--batch-sweep`` does.

    At each batch size and seed: SGD, ``method="inverse"`` at each damping, and ``"eigen"`` at
    ``eigen_damping`` (``KFACConfig``'s defaults).
    """

    steps: int = 200
    batches: tuple[int, ...] = (32, 128, 512)
    seeds: tuple[int, ...] = (0, 1)
    dampings: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    """Absolute dampings of the ``method="inverse"`` runs."""
    eigen_damping: float = 0.1
    """The damping of the ``method="eigen"`` run (``KFACConfig``'s defaults)."""
    sgd_lr: float = 0.02
    kfac_lr: float = 0.05
    momentum: float = 0.9
    slow_s: float = 90.0
    """If a run at the largest batch size takes longer than this (wall seconds) at the first seed,
    the other seeds are dropped at that batch size (to keep the sweep's wall time in bounds)."""


QUICK_BATCH_SWEEP = BatchSweep(steps=20, slow_s=1.0)
"""A smoke run: 20 steps, and a 1 s threshold so that the seed-dropping path is exercised."""


def batch_runs(bs: BatchSweep) -> list[tuple[str, dict[str, Any]]]:
    """The K-FAC runs of every batch size and seed: (name, ``KFACConfig`` changes)."""
    runs = [(f"inverse, damping {d:g}", {"method": "inverse", "damping": d}) for d in bs.dampings]
    runs.append((f"eigen, damping {bs.eigen_damping:g}", {"method": "eigen", "damping": bs.eigen_damping}))
    return runs


def batch_sweep(bs: BatchSweep) -> dict[str, Any]:
    """Every batch size: per seed, SGD (its final loss is the target), then the K-FAC runs.

    The data of a batch size: ``synthetic_images`` with ``steps x batch`` samples (as in the main
    sweep: every batch is new, no sample is seen twice), generated once and cut into each seed's
    batch order by :func:`make_batches`.
    """
    torch.set_num_threads(1)
    results: dict[str, Any] = {"settings": asdict(bs), "machine": machine_info(1), "batches": {}}
    started = time.time()
    runs = batch_runs(bs)
    names = [name for name, _ in runs]
    for batch in bs.batches:
        settings = Settings(
            steps=bs.steps,
            batch=batch,
            samples=bs.steps * batch,
            sgd_lr=bs.sgd_lr,
            kfac_lr=bs.kfac_lr,
            momentum=bs.momentum,
        )
        images, labels = synthetic_images(n=settings.samples, channels=3, size=32, classes=10, seed=0)
        per_seed: dict[str, Any] = {}
        dropped: list[int] = []
        slowest = 0.0
        for seed in bs.seeds:
            if per_seed and batch == max(bs.batches) and slowest > bs.slow_s:
                print(f"batch {batch}: seed {seed} dropped (a run took {slowest:.0f} s)", flush=True)
                dropped.append(seed)
                continue
            print(f"batch {batch}, seed {seed}:", flush=True)
            batches = make_batches(images, labels, settings, seed)
            sgd = train(batches, seed, "sgd", bs.sgd_lr, bs.momentum)
            target = final(sgd["losses"])
            sgd_steps = steps_to(sgd["losses"], target)
            rows = {"sgd": {**summarise(sgd, target, sgd_steps), "losses": sgd["losses"]}}
            _log("sgd", rows["sgd"])
            for name, kfac in runs:
                run = train(batches, seed, "sgd", bs.kfac_lr, bs.momentum, kfac)
                rows[name] = {**summarise(run, target, sgd_steps), "kfac": kfac, "losses": run["losses"]}
                _log(name, rows[name])
            slowest = max(r["wall_s"] for r in rows.values())
            per_seed[str(seed)] = {"target": target, "sgd_steps": sgd_steps, "rows": rows}
            del batches
        results["batches"][str(batch)] = {
            "samples": settings.samples,
            "seeds": per_seed,
            "dropped_seeds": dropped,
            "summary": batch_summary(per_seed, ["sgd", *names]),
        }
        del images, labels
    results["best"] = best_dampings(results, names)
    results["machine"]["load1_at_end"] = load1()
    results["seconds"] = time.time() - started
    return results


def batch_summary(per_seed: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Per run: its per-seed figures and their means (a ratio's mean is over the seeds that reached it)."""
    out: dict[str, Any] = {}
    for name in names:
        rows = [r["rows"][name] for r in per_seed.values()]
        steps = [r["steps_to_target"] for r in rows]
        ratios = [r["steps_x_sgd"] for r in rows]
        reached = [x for x in ratios if x is not None]
        bound = [r["kl_bound"] for r in rows if r["kl_bound"] is not None]
        out[name] = {
            "seeds": list(per_seed),
            "steps": steps,
            "ratios": ratios,
            "finals": [r["final"] for r in rows],
            "never": sum(s is None for s in steps),
            "ratio_mean": statistics.fmean(reached) if reached else None,
            "final_mean": statistics.fmean(r["final"] for r in rows),
            "loss_at_mean": {
                str(k): statistics.fmean(r["loss_at"][str(k)] for r in rows)
                for k in CHECKPOINTS
                if str(k) in rows[0]["loss_at"]
            },
            "step_ms_mean": statistics.fmean(r["step_ms"] for r in rows),
            "kl_bound_mean": statistics.fmean(bound) if bound else None,
        }
    return out


def _ratio_key(row: dict[str, Any]) -> tuple[int, float, float]:
    """Sort key: runs that reached the target at every seed first, then mean ratio, then final loss."""
    ratio = row["ratio_mean"]
    return (row["never"], float("inf") if ratio is None else ratio, row["final_mean"])


def best_dampings(results: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Per batch size: the ``inverse`` run with the lowest mean ratio, the one with the lowest mean loss.

    Also the best K-FAC run of all (``eigen`` included) by each.
    """
    dampings = dict(zip(names, [*results["settings"]["dampings"], None], strict=True))
    out: dict[str, Any] = {}
    for batch, b in results["batches"].items():
        summary = b["summary"]
        inverse = [n for n in names if n.startswith("inverse")]
        by_ratio = min(inverse, key=lambda n: _ratio_key(summary[n]))
        by_final = min(inverse, key=lambda n: summary[n]["final_mean"])
        out[batch] = {
            "by_ratio": {"run": by_ratio, "damping": dampings[by_ratio], **summary[by_ratio]},
            "by_final": {"run": by_final, "damping": dampings[by_final], **summary[by_final]},
            "best_kfac_by_ratio": min(names, key=lambda n: _ratio_key(summary[n])),
            "best_kfac_by_final": min(names, key=lambda n: summary[n]["final_mean"]),
        }
    return out


def batch_markdown(results: dict[str, Any]) -> str:
    """One table per batch size, a damping x batch grid of means, and the best damping by batch."""
    s = results["settings"]
    runs = [n for n in next(iter(results["batches"].values()))["summary"] if n != "sgd"]
    lines = [
        "# K-FAC damping across batch sizes (`benchmarks/knob_sweep.py --batch-sweep`)",
        "",
        machine_line(results),
        "",
        f"`small_cnn(3, width=32, side=32)`, one process, {s['steps']} steps at each batch size, on "
        f"`synthetic_images` with steps x batch samples (each seen once, no reuse). Seeds "
        f"{', '.join(map(str, s['seeds']))} (weight init and batch order). SGD lr {s['sgd_lr']} momentum "
        f"{s['momentum']}; K-FAC = iEF under SGD lr {s['kfac_lr']} momentum {s['momentum']}, `KFACConfig` "
        "defaults but `method` and (absolute) `damping`. Target = that seed's SGD final loss (mean of "
        "the last 10 step losses); steps to target = first step whose trailing 10-step mean is at or "
        "below it; × SGD = that over SGD's own steps to it. Mean × SGD is over the seeds that reached "
        'the target ("never" counted apart). ms/step is for information only (shared machine).',
    ]
    for batch, b in results["batches"].items():
        summary = b["summary"]
        seeds = summary["sgd"]["seeds"]
        targets = ", ".join(
            f"seed {k}: {v['target']:.4f} at SGD step {_fmt(v['sgd_steps'], 'd')}"
            for k, v in b["seeds"].items()
        )
        lines += ["", f"## Batch {batch} ({b['samples']:,} samples)", "", f"Targets: {targets}."]
        if b["dropped_seeds"]:
            lines += [
                "",
                f"Seed(s) {', '.join(map(str, b['dropped_seeds']))} dropped at this batch size: a run "
                f"at seed {seeds[0]} took over {s['slow_s']:.0f} s, so the means here are of seed "
                f"{', '.join(seeds)} only.",
            ]
        lines += [
            "",
            f"| run | steps to target (seed {' / '.join(seeds)}) | × SGD per seed | × SGD mean "
            "| final loss per seed | final mean | loss@50 mean | loss@100 mean | ms/step | KL clip bound |",
            "|---|---|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for name in ["sgd", *runs]:
            r = summary[name]
            never = f" ({r['never']} never)" if r["never"] else ""
            bound = r["kl_bound_mean"]
            at = r["loss_at_mean"]
            lines.append(
                f"| {name} | {' / '.join(_fmt(x, 'd') for x in r['steps'])}{never} | "
                f"{' / '.join(_fmt(x) for x in r['ratios'])} | {_fmt(r['ratio_mean'])} | "
                f"{' / '.join(f'{x:.4f}' for x in r['finals'])} | {r['final_mean']:.4f} | "
                f"{_fmt(at.get('50'), '.3f')} | {_fmt(at.get('100'), '.3f')} | {r['step_ms_mean']:.0f} | "
                f"{'–' if bound is None else f'{100 * bound:.0f}%'} |"
            )
    batches = list(results["batches"])
    lines += [
        "",
        "## Mean × SGD steps / mean final loss, by run and batch size",
        "",
        "| run | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    for name in runs:
        cells = []
        for b in batches:
            r = results["batches"][b]["summary"][name]
            never = f" ({r['never']} never)" if r["never"] else ""
            cells.append(f"{_fmt(r['ratio_mean'])}{never} / {r['final_mean']:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    eigen = runs[-1]
    lines += [
        "",
        "## Best damping by batch (inverse)",
        "",
        "| batch | seeds | best by mean × SGD | its × SGD / final | best by mean final loss "
        f"| its × SGD / final | {eigen}: × SGD / final |",
        "|---:|---|---:|---|---:|---|---|",
    ]
    for b in batches:
        best = results["best"][b]
        e = results["batches"][b]["summary"][eigen]
        r, f = best["by_ratio"], best["by_final"]
        lines.append(
            f"| {b} | {', '.join(r['seeds'])} | {r['damping']:g} | {_fmt(r['ratio_mean'])} / "
            f"{r['final_mean']:.4f} | {f['damping']:g} | {_fmt(f['ratio_mean'])} / {f['final_mean']:.4f} | "
            f"{_fmt(e['ratio_mean'])} / {e['final_mean']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep and write its JSON and table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 steps, 3 variants")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument(
        "--batch-sweep", action="store_true", help="damping x batch size sweep (damping_batch.{json,md})"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="NAME",
        help="run only these variants (names as in the table; the baseline always runs); "
        "results go to knob_sweep_variants.{json,md} unless --quick",
    )
    args = parser.parse_args(argv)
    command = shlex.join([".venv/bin/python", "benchmarks/knob_sweep.py", *(argv or sys.argv[1:])])
    known = {v.name for v in variants(Settings().steps)}
    unknown = sorted(set(args.variants or ()) - known)
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected names among {sorted(known)}")
    if args.batch_sweep:
        out = args.out or (ROOT / "benchmarks" / ("out/knob_sweep" if args.quick else "results"))
        out.mkdir(parents=True, exist_ok=True)
        results = batch_sweep(QUICK_BATCH_SWEEP if args.quick else BatchSweep())
        results["command"] = command
        (out / "damping_batch.json").write_text(json.dumps(results, indent=1))
        (out / "damping_batch.md").write_text(batch_markdown(results))
        print(batch_markdown(results))
        return 0
    settings = QUICK if args.quick else Settings()
    if args.variants:
        settings = replace(settings, variants=tuple(args.variants), top=len(args.variants))
    out = args.out or (ROOT / "benchmarks" / ("out/knob_sweep" if args.quick else "results"))
    out.mkdir(parents=True, exist_ok=True)
    results = sweep(settings)
    results["command"] = command
    stem = "knob_sweep_variants" if args.variants and not args.quick else "knob_sweep"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

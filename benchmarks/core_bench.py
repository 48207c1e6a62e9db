"""Core benchmark: K-FAC (EF / sampled-Fisher / iEF curvature) against tuned SGD and AdamW.

Trains ``mlp`` and ``small_cnn`` from :mod:`ngd_dist.service.models` on the embedded digits data and
on a synthetic class-structured data set, at batch 1024, with the same seeds for every optimiser
(same initial weights, same sequence of batches). Methods:

- ``sgd``: SGD with momentum 0.9; learning rate tuned on a grid;
- ``adamw``: AdamW (weight decay 0, so that it is judged on the training loss only); lr tuned;
- ``kfac-ef`` / ``kfac-mc`` / ``kfac-ief``: :class:`ngd_dist.KFACPreconditioner` with SGD underneath,
  ``factor_every=10``, ``inverse_every=100``, ``kl_clip=1e-3``; (lr, damping, momentum) tuned.

Every configuration is picked by its final full-training-set loss. The picked ones are run again
with the full training loss evaluated every few steps; from these curves come the steps (and
training seconds) to reach the target loss, which is the final training loss of tuned SGD. Step
times are measured with ``time.perf_counter`` around the whole step (forward, backward,
preconditioner, optimiser); a separate phase alternates blocks of SGD and iEF-K-FAC steps
(ABBA order) in the same process to compare their mean step times.

Usage::

    .venv/bin/python benchmarks/core_bench.py                  # full run, writes benchmarks/results/
    .venv/bin/python benchmarks/core_bench.py --quick          # smoke run (< 1 min), benchmarks/out/quick/

Writes ``core_bench.json`` (settings, machine, every grid run, curves of the picked runs, summary),
``core_bench.png`` (loss vs steps and vs seconds) and ``core_bench.md`` (the tables) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import machine
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngd_dist import KFACConfig, KFACPreconditioner
from ngd_dist.service.data import load_digits
from ngd_dist.service.models import mlp, small_cnn

ROOT = Path(__file__).resolve().parent.parent
CURVATURES = ("ef", "mc", "ief")
METHODS = ("sgd", "adamw", *(f"kfac-{c}" for c in CURVATURES))
DIVERGED_LOSS = 1e3
"""A batch loss above this (or non-finite) ends a run as diverged."""


# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything that defines a benchmark run (stored in the JSON)."""

    steps: dict[str, int]
    """Step budget per data set."""
    batch_size: int = 1024
    seed: int = 0
    threads: int = 1
    synthetic_samples: int = 20_000
    eval_every: int = 5
    """Full-training-set loss every this many steps in the runs of the picked configurations."""
    tune_eval_every: int = 50
    """... and in the tuning runs (the final loss is always evaluated)."""
    warmup: int = 10
    """Steps left out of mean step times."""
    sgd_momentum: float = 0.9
    sgd_lrs: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.8)
    adamw_lrs: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)
    kfac_lrs: tuple[float, ...] = (0.1, 1.0)
    kfac_dampings: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    kfac_momenta: tuple[float, ...] = (0.0, 0.9)
    factor_every: int = 10
    inverse_every: int = 100
    kl_clip: float = 1e-3
    variants: tuple[tuple[str, int | None, float | None], ...] = (
        ("inverse_every=10", 10, None),
        ("kl_clip=1e-2", None, 1e-2),
    )
    """Sensitivity variants of the picked iEF-K-FAC configuration (not tuned, not used for the
    targets): name, inverse_every override, kl_clip override."""
    timing_rounds: int = 4
    """Blocks of ``inverse_every`` steps per method in the interleaved timing phase (ABBA order)."""
    steps_target_ratio: float = 0.5
    """Issue target: iEF-K-FAC steps to target <= this times SGD's."""
    time_target_ratio: float = 1.15
    """Issue target: iEF-K-FAC mean step time <= this times SGD's."""


def full_settings(threads: int, seed: int) -> Settings:
    """The settings of the committed results."""
    return Settings(steps={"digits": 150, "synthetic": 200}, threads=threads, seed=seed)


def quick_settings(threads: int, seed: int) -> Settings:
    """A smoke run exercising every code path in well under a minute."""
    return Settings(
        steps={"digits": 20, "synthetic": 20},
        threads=threads,
        seed=seed,
        synthetic_samples=2_000,
        tune_eval_every=10,
        sgd_lrs=(0.1, 0.4),
        adamw_lrs=(0.01,),
        kfac_lrs=(0.3,),
        kfac_dampings=(1e-2,),
        kfac_momenta=(0.9,),
        timing_rounds=2,
    )


# -- data and models -----------------------------------------------------------------------------


def make_synthetic(
    samples: int,
    *,
    seed: int,
    classes: int = 10,
    side: int = 8,
    noise: float = 1.0,
    nuisance: float = 2.0,
    nuisance_rank: int = 4,
    label_noise: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Class-structured ``(samples, 1, side, side)`` images and int64 labels, fixed by ``seed``.

    Class ``c`` is a Gaussian cluster around a prototype image with pixels uniform in [0, 1]:
    ``x = prototype[c] + noise * eps + nuisance * B z`` with isotropic ``eps``, and ``B`` a random
    orthonormal ``(side^2, nuisance_rank)`` basis of directions shared by all classes (large
    variance that carries no label information). Then a ``label_noise`` fraction of labels is
    replaced by uniformly drawn ones. The clusters overlap, so the loss cannot reach 0 without
    memorising.
    """
    g = torch.Generator().manual_seed(seed)
    d = side * side
    prototypes = torch.rand(classes, d, generator=g)
    basis = torch.linalg.qr(torch.randn(d, nuisance_rank, generator=g))[0]
    labels = torch.randint(classes, (samples,), generator=g)
    x = prototypes[labels] + noise * torch.randn(samples, d, generator=g)
    x = x + nuisance * torch.randn(samples, nuisance_rank, generator=g) @ basis.T
    flip = torch.rand(samples, generator=g) < label_noise
    labels = torch.where(flip, torch.randint(classes, (samples,), generator=g), labels)
    return x.reshape(samples, 1, side, side), labels


def load_dataset(name: str, settings: Settings) -> tuple[Tensor, Tensor]:
    """``"digits"`` (embedded, 1,797 images) or ``"synthetic"`` (see :func:`make_synthetic`)."""
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return make_synthetic(settings.synthetic_samples, seed=settings.seed + 2)
    raise ValueError(f"unknown data set {name!r}")


def build_model(name: str) -> nn.Module:
    """``"mlp"`` (64-128-128-10) or ``"cnn"`` (two 3x3 convolutions and a linear head)."""
    if name == "mlp":
        return mlp(in_features=64, hidden=128, depth=2)
    if name == "cnn":
        return small_cnn(channels=1, side=8)
    raise ValueError(f"unknown model {name!r}")


@dataclass
class Case:
    """One data set x model: the data and the batch indices every method sees, in order."""

    dataset: str
    model: str
    x: Tensor
    y: Tensor
    batches: Tensor
    """``(steps, batch_size)`` indices into ``x``."""

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.model}"

    @property
    def steps(self) -> int:
        return self.batches.shape[0]


def batch_indices(samples: int, steps: int, batch_size: int, seed: int) -> Tensor:
    """Per step, ``batch_size`` distinct indices (a fresh random subset each step)."""
    g = torch.Generator().manual_seed(seed)
    size = min(batch_size, samples)
    return torch.stack([torch.randperm(samples, generator=g)[:size] for _ in range(steps)])


# -- one training run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A method and its hyper-parameters."""

    method: str
    lr: float
    momentum: float = 0.0
    damping: float | None = None
    inverse_every: int | None = None
    """K-FAC only: overrides ``Settings.inverse_every`` (sensitivity variants)."""
    kl_clip: float | None = None
    """K-FAC only: overrides ``Settings.kl_clip`` (sensitivity variants)."""

    def label(self) -> str:
        parts = [f"lr={self.lr:g}"]
        if self.method != "adamw":
            parts.append(f"momentum={self.momentum:g}")
        if self.damping is not None:
            parts.append(f"damping={self.damping:g}")
        if self.inverse_every is not None:
            parts.append(f"inverse_every={self.inverse_every}")
        if self.kl_clip is not None:
            parts.append(f"kl_clip={self.kl_clip:g}")
        return ", ".join(parts)


@dataclass
class RunResult:
    """What one run recorded. Losses are ``inf`` from the step a run diverged at."""

    spec: Spec
    batch_loss: list[float] = field(default_factory=list)
    """Training loss on each step's batch (before that step's update)."""
    step_seconds: list[float] = field(default_factory=list)
    """Wall time of each whole step (forward, backward, preconditioner, optimiser)."""
    eval_steps: list[int] = field(default_factory=list)
    """Number of updates done when the full training loss was evaluated."""
    eval_loss: list[float] = field(default_factory=list)
    """Loss over the full training set at ``eval_steps``."""
    diverged_at: int | None = None
    kfac: dict[str, Any] | None = None
    """Preconditioner counters, the fraction of steps the KL clip bound, seconds per phase."""

    @property
    def final_loss(self) -> float:
        return self.eval_loss[-1] if self.eval_loss else math.inf

    def mean_step_seconds(self, warmup: int) -> float:
        """Mean step time after the first ``warmup`` steps (all steps if the run was shorter)."""
        times = self.step_seconds[warmup:] or self.step_seconds
        return sum(times) / len(times) if times else math.nan

    def seconds_at(self, step: int) -> float:
        """Training seconds (evaluations excluded) spent in the first ``step`` steps."""
        return sum(self.step_seconds[:step])


def make_optimizer(model: nn.Module, spec: Spec, settings: Settings) -> tuple[Any, KFACPreconditioner | None]:
    """The optimiser of ``spec`` and, for a K-FAC method, its preconditioner."""
    if spec.method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0), None
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)
    if not spec.method.startswith("kfac-"):
        return opt, None
    config = KFACConfig(
        curvature=spec.method.removeprefix("kfac-"),  # type: ignore[arg-type]
        damping=spec.damping if spec.damping is not None else 1e-3,
        factor_every=settings.factor_every,
        inverse_every=spec.inverse_every or settings.inverse_every,
        kl_clip=spec.kl_clip or settings.kl_clip,
        output_module="5",
        seed=settings.seed,
        method="eigen",  # the form docs/benchmarks.md quotes (the library default became inverse)
    )
    return opt, KFACPreconditioner(model, config, optimizer=opt)


@torch.no_grad()
def full_loss(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 8192) -> float:
    """Mean cross-entropy over the whole training set."""
    total = 0.0
    for start in range(0, len(y), chunk):
        logits = model(x[start : start + chunk])
        total += float(F.cross_entropy(logits, y[start : start + chunk], reduction="sum"))
    return total / len(y)


def fresh_model(case: Case, settings: Settings) -> nn.Module:
    """The case's model with the benchmark's initial weights (identical for every method)."""
    torch.manual_seed(settings.seed)
    return build_model(case.model)


def train(case: Case, spec: Spec, settings: Settings, eval_every: int) -> RunResult:
    """Train from the shared initial weights over the case's batches; stop early on divergence."""
    model = fresh_model(case, settings)
    opt, precond = make_optimizer(model, spec, settings)
    result = RunResult(spec)
    clipped = 0

    def evaluate(step: int) -> None:
        result.eval_steps.append(step)
        loss = full_loss(model, case.x, case.y)
        result.eval_loss.append(loss if math.isfinite(loss) else math.inf)

    evaluate(0)
    for step in range(case.steps):
        idx = case.batches[step]
        x, y = case.x[idx], case.y[idx]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if precond is not None:
            precond.step()
        opt.step()
        value = loss.item()
        result.step_seconds.append(time.perf_counter() - start)
        result.batch_loss.append(value)
        if precond is not None:
            clipped += precond.stats.kl_scale < 1.0
        if not math.isfinite(value) or value > DIVERGED_LOSS:
            result.diverged_at = step
            result.eval_steps.append(step + 1)
            result.eval_loss.append(math.inf)
            break
        if (step + 1) % eval_every == 0 or step + 1 == case.steps:
            evaluate(step + 1)
    if precond is not None:
        stats = asdict(precond.stats)
        result.kfac = {
            "kl_clip_bound_fraction": clipped / max(len(result.step_seconds), 1),
            "stats": stats,
            "phase_seconds": dict(getattr(precond, "timings", {})),
        }
        precond.remove()
    return result


# -- tuning, targets, timing ---------------------------------------------------------------------


def grid(method: str, settings: Settings) -> list[Spec]:
    """The hyper-parameter grid of ``method``."""
    if method == "sgd":
        return [Spec("sgd", lr, settings.sgd_momentum) for lr in settings.sgd_lrs]
    if method == "adamw":
        return [Spec("adamw", lr) for lr in settings.adamw_lrs]
    return [
        Spec(method, lr, momentum, damping)
        for momentum in settings.kfac_momenta
        for damping in settings.kfac_dampings
        for lr in settings.kfac_lrs
    ]


def pick(runs: Sequence[RunResult]) -> RunResult:
    """The run with the lowest final full training loss (the first one on ties)."""
    return min(runs, key=lambda r: r.final_loss)


def steps_to_target(run: RunResult, target: float) -> int | None:
    """Updates done at the first evaluation with full training loss <= ``target`` (None: never)."""
    for step, loss in zip(run.eval_steps, run.eval_loss, strict=True):
        if loss <= target:
            return step
    return None


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class _Stepper:
    """A model and optimiser that can be stepped block by block, timing each step."""

    def __init__(self, case: Case, spec: Spec, settings: Settings) -> None:
        self.case = case
        self.model = fresh_model(case, settings)
        self.opt, self.precond = make_optimizer(self.model, spec, settings)
        self.step = 0

    def run(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            idx = self.case.batches[self.step % self.case.steps]
            x, y = self.case.x[idx], self.case.y[idx]
            start = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            if self.precond is not None:
                self.precond.step()
            self.opt.step()
            loss.item()
            times.append(time.perf_counter() - start)
            self.step += 1
        return times


def time_interleaved(case: Case, specs: dict[str, Spec], settings: Settings) -> dict[str, dict[str, Any]]:
    """Step times of ``specs`` (one named ``"sgd"``) in alternating blocks, in one process.

    After ``warmup`` steps of each, every round runs one block of ``inverse_every`` steps of each
    method, in the given order on even rounds and reversed on odd ones (ABBA), so that slow spells
    of a shared machine hit all methods alike; each K-FAC block holds the same number of factor and
    inverse steps. Returns, per name: mean step ms, the ratio of means to SGD's, the per-round
    ratios of block means to SGD's and their median, and (K-FAC) ms per step in each phase.
    """
    steppers = {name: _Stepper(case, spec, settings) for name, spec in specs.items()}
    for stepper in steppers.values():
        stepper.run(settings.warmup)
        if stepper.precond is not None and hasattr(stepper.precond, "timings"):
            stepper.precond.timings.clear()
    block = settings.inverse_every
    seconds: dict[str, list[float]] = {name: [] for name in specs}
    block_means: dict[str, list[float]] = {name: [] for name in specs}
    order = list(specs)
    for r in range(settings.timing_rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            times = steppers[name].run(block)
            seconds[name] += times
            block_means[name].append(sum(times) / len(times))
    sgd_mean = sum(seconds["sgd"]) / len(seconds["sgd"])
    out: dict[str, dict[str, Any]] = {}
    for name, stepper in steppers.items():
        mean = sum(seconds[name]) / len(seconds[name])
        ratios = [m / s for m, s in zip(block_means[name], block_means["sgd"], strict=True)]
        phases = dict(getattr(stepper.precond, "timings", {})) if stepper.precond is not None else {}
        out[name] = {
            "spec": asdict(specs[name]),
            "steps": len(seconds[name]),
            "mean_ms": mean * 1e3,
            "median_ms": _median(seconds[name]) * 1e3,
            "ratio": mean / sgd_mean,
            "block_ratios": ratios,
            "median_block_ratio": _median(ratios),
            "phase_ms_per_step": {k: v * 1e3 / len(seconds[name]) for k, v in phases.items()},
        }
    return out


# -- machine, json, plot, markdown ---------------------------------------------------------------


def machine_info(settings: Settings) -> dict[str, Any]:
    """CPU model, cores, versions, date and the git commit the library was at (benchmarks/machine.py)."""
    return machine.machine_info(settings.threads)


def cpu_pressure() -> float | None:
    """Linux PSI: % of the last 60 s in which some runnable task waited for a CPU (None if unknown).

    Well above 0 means other load shared the machine, which inflates and blurs step times.
    """
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(dict(kv.split("=") for kv in line.split()[1:])["avg60"])
    except (OSError, ValueError, KeyError, IndexError):
        return None


def _clean(value: Any, digits: int = 6) -> Any:
    """JSON-safe copy: non-finite floats become None, floats keep ``digits`` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, digits) for v in value]
    return value


def run_summary(run: RunResult, warmup: int, *, brief: bool = False) -> dict[str, Any]:
    """A run without its per-step curves; ``brief`` (grid runs) keeps 4 digits and no counters."""
    summary = {
        **asdict(run.spec),
        "final_loss": run.final_loss,
        "diverged_at": run.diverged_at,
        "eval_steps": run.eval_steps,
        "eval_loss": run.eval_loss,
        "mean_step_ms": run.mean_step_seconds(warmup) * 1e3,
        "kfac": run.kfac,
    }
    if brief:
        bound = None if run.kfac is None else run.kfac["kl_clip_bound_fraction"]
        summary = _clean({**summary, "kfac": None, "kl_clip_bound_fraction": bound}, 4)
    return summary


def run_curves(run: RunResult, warmup: int) -> dict[str, Any]:
    """A picked run with all it recorded."""
    cumulative, total = [], 0.0
    for t in run.step_seconds:
        total += t
        cumulative.append(total)
    return {
        **run_summary(run, warmup),
        "batch_loss": [_clean(v, 4) for v in run.batch_loss],
        "step_ms": [_clean(t * 1e3, 4) for t in run.step_seconds],
        "eval_seconds": [run.seconds_at(s) for s in run.eval_steps],
    }


COLORS = {"sgd": "tab:blue", "adamw": "tab:orange", "kfac-ef": "tab:green", "kfac-mc": "tab:purple"}
COLORS["kfac-ief"] = "tab:red"


def plot(cases: list[dict[str, Any]], path: Path, inverse_every: int) -> None:
    """Full training loss vs steps and vs training seconds, one row per data set x model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(cases), 2, figsize=(11, 3.1 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases, strict=True):
        runs = {**case["picked"], **case["variants"]}
        for i, (method, run) in enumerate(runs.items()):
            series = zip(run["eval_steps"], run["eval_seconds"], run["eval_loss"], strict=True)
            pts = [p for p in series if p[2] is not None and math.isfinite(p[2])]
            variant = method not in case["picked"]
            style = {
                "color": COLORS.get(method, "gray" if i % 2 else "black"),
                "lw": 1.0 if variant else 1.4,
                "ls": ":" if variant else "-",
            }
            label = f"{method} ({_spec(run).label()})"
            row[0].plot([p[0] for p in pts], [p[2] for p in pts], label=label, **style)
            row[1].plot([p[1] for p in pts], [p[2] for p in pts], **style)
        steps = max(case["picked"]["sgd"]["eval_steps"])
        for k in range(inverse_every, steps + 1, inverse_every):
            row[0].axvline(k, color="gray", lw=0.6, alpha=0.5)
        for ax, xlabel in zip(row, ("step", "training seconds (evaluation excluded)"), strict=True):
            ax.axhline(case["target_loss"], color="gray", ls="--", lw=0.8)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("full training loss")
            ax.set_title(case["case"], fontsize=10)
            ax.grid(alpha=0.3, which="both", lw=0.4)
        row[0].legend(fontsize=6)
    fig.suptitle(
        "dashed: target = final training loss of tuned SGD; vertical lines: K-FAC decompositions "
        f"(every {inverse_every} steps, and at step 0)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    try:  # a 256-colour palette makes the PNG several times smaller
        from PIL import Image

        with Image.open(path) as image:
            small = image.convert("RGB").quantize(colors=256)
        small.save(path, optimize=True)
    except ImportError:
        pass


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def _spec(run: dict[str, Any]) -> Spec:
    return Spec(**{k: run[k] for k in Spec.__dataclass_fields__})


def markdown(report: dict[str, Any]) -> str:
    """The tables of ``report`` (the JSON content before cleaning) as markdown."""
    m, s = report["machine"], report["settings"]
    modified = " (with uncommitted changes)" if m["ngd_dist_modified"] else ""
    lines = [
        f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, torch {m['torch']} "
        f"(`torch.set_num_threads({m['torch_threads']})`), Python {m['python']}, {m['date_utc']}, "
        f"ngd_dist at commit {m['git_commit']}{modified}.",
        "",
        f"Command: `{report['command']}` ({report['total_seconds'] / 60:.1f} min)."
        + (f" Note: {m['note']}." if m.get("note") else ""),
        "",
        f"Batch {s['batch_size']}, seed {s['seed']}; budgets {s['steps']} steps; K-FAC factor_every="
        f"{s['factor_every']}, inverse_every={s['inverse_every']}, kl_clip={s['kl_clip']}. Target loss: "
        "the final full-training-set loss of tuned SGD; steps to target read off evaluations every "
        f"{s['eval_every']} steps. Variants are the picked iEF configuration with one setting changed "
        "(not tuned, not used for the targets).",
        "",
        "| data / model | method | hyper-parameters | final loss | steps to target | × SGD steps | "
        "s to target | step ms (mean) | KL clip bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        for method, run in {**case["picked"], **case["variants"]}.items():
            steps = case["steps_to_target"][method]
            kfac = run["kfac"]
            bound = "" if kfac is None else f"{kfac['kl_clip_bound_fraction']:.0%} of steps"
            lines.append(
                f"| {case['case']} | {method} | {_spec(run).label()} | {_fmt(run['final_loss'], '.4g')} | "
                f"{'not reached' if steps is None else steps} | {_fmt(case['steps_ratio'][method], '.2f')} | "
                f"{_fmt(case['seconds_to_target'][method], '.2f')} | {_fmt(run['mean_step_ms'], '.2f')} | "
                f"{bound} |"
            )
    timed = list(report["cases"][0]["timing"]) if report["cases"] else []
    lines += [
        "",
        f"Issue targets: iEF-K-FAC steps to target ≤ {s['steps_target_ratio']}× SGD's; iEF-K-FAC mean step "
        f"time ≤ {s['time_target_ratio']}× SGD's. Step times from the interleaved phase: "
        f"{s['timing_rounds']} blocks of {s['inverse_every']} steps per method, order "
        f"{', '.join(timed)} then reversed, after {s['warmup']} warm-up steps each. CPU pressure: Linux "
        "PSI `some avg60` at the start and end of the case (how much other load shared the CPUs).",
        "",
        "| data / model | target loss | iEF steps / SGD steps | met | SGD step ms | iEF step ms | "
        "time ratio (means) | median block ratio | met | "
        + " | ".join(f"{n.removeprefix('kfac-ief ')} time ratio" for n in timed[2:])
        + " | CPU pressure % |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(timed[2:]) + "---|",
    ]
    for case in report["cases"]:
        t = case["timing"]
        ief = t["kfac-ief"]
        steps_met = "yes" if case["steps_target_met"] else "no"
        time_met = "yes" if case["time_target_met"] else "no"
        extra = "".join(f" {t[n]['ratio']:.2f} |" for n in timed[2:])
        psi = case.get("cpu_pressure_avg60", {})
        extra += f" {_fmt(psi.get('start'), '.0f')} → {_fmt(psi.get('end'), '.0f')} |"
        lines.append(
            f"| {case['case']} | {_fmt(case['target_loss'], '.4g')} | "
            f"{_fmt(case['steps_ratio']['kfac-ief'], '.2f')} | {steps_met} | {t['sgd']['mean_ms']:.2f} | "
            f"{ief['mean_ms']:.2f} | {ief['ratio']:.2f} | {ief['median_block_ratio']:.2f} | {time_met} |"
            + extra
        )
    phases = ["factor_computation", "factor_communication", "decomposition", "preconditioning"]
    lines += [
        "",
        "Where iEF-K-FAC's extra time goes (interleaved phase, ms per step averaged over all steps; "
        "`factor_computation` is the statistics hooks, inside forward/backward):",
        "",
        "| data / model | SGD step | iEF step | " + " | ".join(phases) + " |",
        "|---|---|---|" + "---|" * len(phases),
    ]
    for case in report["cases"]:
        t = case["timing"]
        ms = t["kfac-ief"]["phase_ms_per_step"]
        row = " | ".join(f"{ms.get(p, math.nan):.2f}" for p in phases)
        lines.append(
            f"| {case['case']} | {t['sgd']['mean_ms']:.2f} | {t['kfac-ief']['mean_ms']:.2f} | {row} |"
        )
    lines += ["", "Tuning grids (final full training loss per configuration; * = picked, – = diverged):", ""]
    names = [c["case"] for c in report["cases"]]
    lines += ["| method | hyper-parameters | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for method in METHODS:
        for i, spec in enumerate(grid(method, report["settings_obj"])):
            cells = []
            for case in report["cases"]:
                run = case["grid"][method][i]
                star = "*" if case["picked_index"][method] == i else ""
                cells.append(_fmt(run["final_loss"], ".3g") + star)
            lines.append(f"| {method} | {spec.label()} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------


def bench_case(case: Case, settings: Settings, log: Any) -> dict[str, Any]:
    """Tune every method on ``case``, rerun the picked configurations with dense evaluation, time."""
    grids: dict[str, list[RunResult]] = {}
    picked_index: dict[str, int] = {}
    picked: dict[str, RunResult] = {}
    for method in METHODS:
        runs = []
        for spec in grid(method, settings):
            run = train(case, spec, settings, settings.tune_eval_every)
            runs.append(run)
            diverged = "" if run.diverged_at is None else f"  (diverged at step {run.diverged_at})"
            log(f"  {case.name:18s} {method:9s} {spec.label():40s} final {run.final_loss:.4g}{diverged}")
        grids[method] = runs
        best = pick(runs)
        picked_index[method] = runs.index(best)
        rerun = train(case, best.spec, settings, settings.eval_every)
        if rerun.final_loss != best.final_loss:
            log(f"  note: rerun of {method} gave {rerun.final_loss!r} vs {best.final_loss!r} in tuning")
        picked[method] = rerun
    target = picked["sgd"].final_loss
    ief = picked["kfac-ief"].spec
    variants = {
        f"kfac-ief {name}": train(
            case, replace(ief, inverse_every=inv, kl_clip=clip), settings, settings.eval_every
        )
        for name, inv, clip in settings.variants
    }
    curves = {**picked, **variants}
    steps = {m: steps_to_target(r, target) for m, r in curves.items()}
    sgd_steps = steps["sgd"]
    ratios = {m: (s / sgd_steps if s is not None and sgd_steps else None) for m, s in steps.items()}
    seconds = {m: (curves[m].seconds_at(s) if s is not None else None) for m, s in steps.items()}
    timed = {"sgd": picked["sgd"].spec, "kfac-ief": ief}
    timed.update(
        {f"kfac-ief {n}": replace(ief, inverse_every=i) for n, i, c in settings.variants if i and not c}
    )
    timing = time_interleaved(case, timed, settings)
    log(
        f"  {case.name}: target {target:.4g}, steps {steps}; step time / SGD's: "
        + ", ".join(
            f"{n} {t['ratio']:.3f} (median block {t['median_block_ratio']:.3f})" for n, t in timing.items()
        )
    )
    ief_ratio = ratios["kfac-ief"]
    return {
        "case": case.name,
        "samples": len(case.y),
        "target_loss": target,
        "target_definition": "final full-training-set loss of tuned SGD at the end of its budget",
        "grid": {m: [run_summary(r, settings.warmup, brief=True) for r in runs] for m, runs in grids.items()},
        "picked_index": picked_index,
        "picked_at_grid_edge": {
            m: len(grids[m]) > 1 and picked_index[m] in (0, len(grids[m]) - 1) for m in ("sgd", "adamw")
        },
        "picked": {m: run_curves(r, settings.warmup) for m, r in picked.items()},
        "variants": {m: run_curves(r, settings.warmup) for m, r in variants.items()},
        "steps_to_target": steps,
        "steps_ratio": ratios,
        "seconds_to_target": seconds,
        "steps_target_met": ief_ratio is not None and ief_ratio <= settings.steps_target_ratio,
        "timing": timing,
        "time_target_met": timing["kfac-ief"]["ratio"] <= settings.time_target_ratio,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 minute)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks/results)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write JSON, PNG and markdown into ``--out``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = (quick_settings if args.quick else full_settings)(args.threads, args.seed)
    out: Path = args.out or ROOT / "benchmarks" / ("out/quick" if args.quick else "results")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = machine_info(settings)  # before the runs: the commit of the code actually imported

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    cases = []
    for dataset in ("digits", "synthetic"):
        x, y = load_dataset(dataset, settings)
        batches = batch_indices(len(y), settings.steps[dataset], settings.batch_size, settings.seed + 1)
        for model in ("mlp", "cnn"):
            case = Case(dataset, model, x, y, batches)
            log(f"{case.name}: {len(y)} samples, {case.steps} steps")
            pressure_before = cpu_pressure()
            cases.append(bench_case(case, settings, log))
            cases[-1]["cpu_pressure_avg60"] = {"start": pressure_before, "end": cpu_pressure()}
    command = "python benchmarks/core_bench.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    report: dict[str, Any] = {
        "benchmark": "core_bench",
        "command": command,
        "machine": machine,
        "settings": asdict(settings),
        "cases": cases,
        "total_seconds": time.perf_counter() - started,
    }
    end = machine_info(settings)
    if (end["git_commit"], end["ngd_dist_modified"]) != (machine["git_commit"], machine["ngd_dist_modified"]):
        machine["note"] = (
            f"the checkout changed during the run (now {end['git_commit']}); modules were imported at start"
        )
    table = markdown({**report, "settings_obj": settings})
    (out / "core_bench.md").write_text(table)
    (out / "core_bench.json").write_text(json.dumps(_clean(report), separators=(",", ":")) + "\n")
    plot(cases, out / "core_bench.png", settings.inverse_every)
    print(table)
    log(f"wrote {out / 'core_bench.json'}, core_bench.png, core_bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

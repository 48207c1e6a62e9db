"""Comparing runs: ``ngd-dist report RUN_DIR [RUN_DIR ...] [--out report.png]``.

A run directory (a job's ``checkpoint.dir``) holds ``metrics.jsonl``, written by rank 0 of the
trainer: one JSON object per line, for a logged step ``step`` (int), ``samples`` (int), ``wall_s``
(seconds since the run started), ``loss``, ``lr``, ``damping``, ``kl_scale``, ``gamma`` (floats or
null) and ``phases`` (seconds by phase name); an evaluation adds ``eval_loss`` and
``eval_accuracy`` or ``eval_perplexity``, on a step's line or on a line of its own with ``"event":
"eval"``.

:func:`read_run` reads one run: a last line cut short (the run was killed while writing it) is
skipped; a missing, empty or malformed file is a :class:`RunsError` naming the file (and the line),
one line, exit 2. :func:`markdown_table` summarises runs (steps, final loss, best evaluation, wall
time); :func:`plot_runs` draws loss against step and against wall time, and the evaluation metric
against step when there is one, one line per run labelled by its directory name, into a PNG. It
needs matplotlib (the ``bench`` extra, also named ``plot``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from ngd_dist.service.records import METRICS_FILE

EVAL_METRICS = {"eval_accuracy": max, "eval_perplexity": min, "eval_loss": min}
"""The evaluation metrics, in the order a report prefers them, and which way is best."""


class RunsError(ValueError):
    """A run that cannot be read or a report that cannot be written (one line, naming the file)."""


def _number(value: Any) -> TypeGuard[int | float]:
    """A JSON number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Run:
    """One run's records, as read from its ``metrics.jsonl``."""

    name: str
    """The label of the run: its directory's name (its path when two runs share a name)."""
    path: Path
    """The ``metrics.jsonl`` read."""
    steps: list[dict[str, Any]]
    """The training records (the lines with a ``loss``, in file order)."""
    evals: list[dict[str, Any]]
    """The records with an evaluation metric (step lines or ``"event": "eval"`` lines)."""
    truncated: bool
    """Whether the last line was cut short and skipped."""

    @property
    def last_step(self) -> int | None:
        """The highest step recorded."""
        steps = [r["step"] for r in [*self.steps, *self.evals]]
        return max(steps) if steps else None

    @property
    def final_loss(self) -> float | None:
        """The loss of the last training record that has a finite one."""
        for record in reversed(self.steps):
            loss = record.get("loss")
            if _number(loss) and math.isfinite(loss):
                return float(loss)
        return None

    @property
    def wall_s(self) -> float | None:
        """The longest ``wall_s`` recorded: the run's training time."""
        walls = [r["wall_s"] for r in [*self.steps, *self.evals] if _number(r.get("wall_s"))]
        return float(max(walls)) if walls else None

    def metric(self) -> str | None:
        """The evaluation metric this run records, by :data:`EVAL_METRICS`' preference."""
        return next((m for m in EVAL_METRICS if any(_number(r.get(m)) for r in self.evals)), None)

    def best_eval(self, metric: str | None = None) -> tuple[str, float, int] | None:
        """``(metric, best value, its step)``: ``metric`` (default :meth:`metric`) at its best."""
        metric = metric or self.metric()
        if metric is None:
            return None
        points = [(float(r[metric]), int(r["step"])) for r in self.evals if _number(r.get(metric))]
        points = [p for p in points if math.isfinite(p[0])]
        if not points:
            return None
        value, step = EVAL_METRICS[metric](points, key=lambda p: p[0])
        return metric, value, step


def _parse(path: Path, text: str) -> tuple[list[dict[str, Any]], bool]:
    """The records of a metrics file, and whether its cut-short last line was skipped."""
    lines = text.split("\n")
    complete = text.endswith("\n")
    records: list[dict[str, Any]] = []
    truncated = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not complete:
                truncated = True  # a write cut short by a crash or a kill
                continue
            problem = f"line {number} is not JSON ({exc.msg}); expected one object per line"
            raise RunsError(f"{path}: {problem}") from None
        if not isinstance(record, dict):
            raise RunsError(f"{path}: line {number} is a {type(record).__name__}; expected a JSON object")
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise RunsError(f"{path}: line {number}: step: got {step!r}; expected an integer >= 0")
        for key in ("loss", "wall_s", *EVAL_METRICS):
            if record.get(key) is not None and not _number(record[key]):
                problem = f"{key}: got {record[key]!r}; expected a number or null"
                raise RunsError(f"{path}: line {number}: {problem}")
        records.append(record)
    return records, truncated


def read_run(directory: str | os.PathLike[str], name: str | None = None) -> Run:
    """The run in ``directory`` (its ``metrics.jsonl``); RunsError when it is missing, empty or malformed."""
    folder = Path(directory)
    path = folder / METRICS_FILE if folder.is_dir() else folder
    if not folder.exists():
        raise RunsError(f"{folder}: no such run directory")
    if not path.is_file():
        raise RunsError(
            f"{folder}: holds no {METRICS_FILE} (the trainer writes it into checkpoint.dir as the run goes)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunsError(f"{path}: cannot be read: {exc}") from None
    records, truncated = _parse(path, text)
    if not records:
        raise RunsError(f"{path}: is empty: no step was logged yet")
    steps = [r for r in records if r.get("event") != "eval" and "loss" in r]
    evals = [r for r in records if any(_number(r.get(m)) for m in EVAL_METRICS)]
    label = name or (folder.name if folder.is_dir() else folder.parent.name) or str(folder)
    return Run(name=label, path=path, steps=steps, evals=evals, truncated=truncated)


def read_runs(directories: Sequence[str | os.PathLike[str]]) -> list[Run]:
    """Each directory's run, labelled by its name (by the path as given when two names are alike)."""
    paths = [Path(d) for d in directories]
    names = [p.parent.name if p.is_file() else p.name for p in paths]
    return [read_run(p, n if names.count(n) == 1 else str(p)) for p, n in zip(paths, names, strict=True)]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {rest:02d}s"


def markdown_table(runs: Sequence[Run]) -> str:
    """A markdown table: run, steps, final loss, best evaluation (metric, value, step), wall time."""
    rows = ["| run | steps | final loss | best eval | wall time |", "|---|---:|---:|---|---:|"]
    for run in runs:
        best = run.best_eval()
        shown = f"{best[0]} {best[1]:.4g} (step {best[2]})" if best is not None else "-"
        loss = f"{run.final_loss:.4f}" if run.final_loss is not None else "-"
        label = run.name.replace("|", "\\|")
        rows.append(f"| {label} | {run.last_step} | {loss} | {shown} | {_duration(run.wall_s)} |")
    return "\n".join(rows)


def _loss(record: dict[str, Any]) -> float:
    loss = record.get("loss")
    return float(loss) if _number(loss) else math.nan  # a non-finite loss is written as null: a gap


def plot_runs(runs: Sequence[Run], out: str | os.PathLike[str]) -> Path:
    """Plot ``runs`` into the PNG ``out``: loss vs step, loss vs wall time, and the evaluation
    metric vs step when any run has one. RunsError when matplotlib is missing or ``out`` cannot be
    written.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RunsError(
            "--out: plotting needs matplotlib, the 'bench' extra: pip install 'ngd_dist[bench]'"
        ) from None
    target = Path(out)
    if not target.parent.is_dir():
        raise RunsError(f"--out: the directory {str(target.parent)!r} of {str(target)!r} does not exist")
    metric = next((m for m in EVAL_METRICS if any(r.metric() == m for r in runs)), None)
    panels = 3 if metric is not None else 2
    figure = Figure(figsize=(5 * panels, 4), dpi=100, layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    for run in runs:
        steps = [r["step"] for r in run.steps]
        losses = [_loss(r) for r in run.steps]
        axes[0].plot(steps, losses, label=run.name)
        walls = [(r["wall_s"], _loss(r)) for r in run.steps if _number(r.get("wall_s"))]
        axes[1].plot([w for w, _ in walls], [v for _, v in walls], label=run.name)
        if metric is not None:
            points = [(r["step"], float(r[metric])) for r in run.evals if _number(r.get(metric))]
            axes[2].plot([s for s, _ in points], [v for _, v in points], marker="o", label=run.name)
    finite = [v for run in runs for v in map(_loss, run.steps) if math.isfinite(v)]
    for ax, xlabel in zip(axes[:2], ("step", "wall time (s)"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss")
        if finite and min(finite) > 0 and max(finite) > 10 * min(finite):  # spans a decade: log scale
            ax.set_yscale("log")
    axes[0].set_title("loss vs step")
    axes[1].set_title("loss vs wall time")
    if metric is not None:
        axes[2].set_xlabel("step")
        axes[2].set_ylabel(metric.replace("_", " "))
        axes[2].set_title(f"{metric.replace('_', ' ')} vs step")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    try:
        figure.savefig(target, format="png")
    except OSError as exc:
        raise RunsError(f"--out: cannot write {str(target)!r}: {exc.strerror or exc}") from None
    return target

"""The run record: what a run leaves on disk beside its checkpoints, for plots and comparisons.

Rank 0 writes, into the run directory (``checkpoint.dir``):

- ``job.yaml``: the resolved job (every key, defaults included), rewritten at each start;
- ``metrics.jsonl``: one JSON object per logged step, flushed as it is written: ``step``,
  ``samples`` (seen by all ranks since step 0), ``wall_s`` (seconds of training, continued across
  resumes), ``loss`` (mean over the ranks), ``lr``, ``damping`` and ``kl_scale`` (null without the
  preconditioner), ``gamma`` (the last γ measured, or null), ``phases`` (seconds per phase, summed
  since the process started); and one per evaluation with ``"event": "eval"``, ``step``,
  ``wall_s`` and ``eval_loss`` with ``eval_accuracy`` or ``eval_perplexity``.

On resume the records after the resumed step are dropped (that part of the run is done again); a
run that starts afresh starts a new file. ``ngd-dist report RUN_DIR ...`` plots them. With
``metrics.tensorboard: true`` every record is also written as TensorBoard scalars into event files
in the same directory (:mod:`ngd_dist.service.tensorboard_events`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from ngd_dist.service.tensorboard_events import EventFiles

METRICS_FILE = "metrics.jsonl"
JOB_FILE = "job.yaml"


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, skipping a last line cut short by a crash."""
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


class RunRecord:
    """Rank 0's writer of ``job.yaml`` and ``metrics.jsonl``, and of TensorBoard event files when
    asked (does nothing elsewhere, or without a directory).
    """

    def __init__(
        self, directory: str | os.PathLike[str] | None, *, enabled: bool, tensorboard: bool = False
    ) -> None:
        """Write into ``directory`` when ``enabled`` (rank 0) and a directory is set; TensorBoard
        event files too with ``tensorboard``.
        """
        self.directory = Path(directory) if directory is not None and enabled else None
        self.tensorboard = tensorboard
        self._file: TextIO | None = None
        self._events: EventFiles | None = None
        self.wall_offset = 0.0
        """Training seconds of the records kept from before a resume."""

    @property
    def active(self) -> bool:
        """Whether this rank writes records."""
        return self.directory is not None

    def start(self, job_yaml: str, resumed_step: int | None) -> None:
        """Write the job; keep the records up to ``resumed_step`` (none when starting afresh)."""
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / JOB_FILE).write_text(job_yaml)
        path = self.directory / METRICS_FILE
        kept = []
        if resumed_step is not None and path.exists():
            records = read_records(path)
            kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= resumed_step]
        walls = [r["wall_s"] for r in kept if isinstance(r.get("wall_s"), (int, float))]
        self.wall_offset = float(max(walls)) if walls else 0.0
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
        self._file = path.open("a")
        if self.tensorboard:
            from ngd_dist.service.tensorboard_events import EventFiles

            self._events = EventFiles(self.directory, resumed_step)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it."""
        if self._file is None:
            return
        self._file.write(json.dumps(_plain(record)) + "\n")
        self._file.flush()
        if self._events is not None:
            self._events.write(record)

    def close(self) -> None:
        """Close the files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._events is not None:
            self._events.close()
            self._events = None

"""TensorBoard event files of a run (``metrics.tensorboard: true``), written beside ``metrics.jsonl``.

:class:`EventFiles` turns each run record (:mod:`ngd_dist.service.records`) into scalars, with the
record's step as TensorBoard's step, through ``torch.utils.tensorboard`` (the ``tensorboard``
extra). The event files go into the run directory itself, so ``tensorboard --logdir runs/`` shows
each run directory under it as one run.

Scalars of a logged step: ``train/loss`` (mean over the ranks), ``train/lr``, ``train/samples``
(samples seen by all ranks since step 0), ``preconditioner/damping``, ``preconditioner/kl_scale``,
``preconditioner/gamma`` (those three when known), and ``phase_seconds/<phase>``: seconds per step
spent in each phase (forward, backward, decomposition, ...) since the previous logged step. Of an
evaluation: ``eval/loss`` and ``eval/accuracy`` or ``eval/perplexity``.

A resumed run marks the steps after its checkpoint as replaced (TensorBoard's ``purge_step``:
readers drop the earlier events from that step on), so each step shows once; a run started afresh
does the same from step 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

EXTRA = "metrics.tensorboard: true needs the 'tensorboard' extra: pip install 'ngd_dist[tensorboard]'"

_STEP_SCALARS = (
    ("loss", "train/loss"),
    ("lr", "train/lr"),
    ("samples", "train/samples"),
    ("damping", "preconditioner/damping"),
    ("kl_scale", "preconditioner/kl_scale"),
    ("gamma", "preconditioner/gamma"),
)
_EVAL_PREFIX = "eval_"


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class EventFiles:
    """TensorBoard event files in ``directory``, for a run that starts at ``resumed_step`` (None:
    afresh). Raises ``ValueError`` (the one line naming the extra) when ``tensorboard`` is missing.
    """

    def __init__(self, directory: Path, resumed_step: int | None) -> None:
        """Open a new event file; the events of earlier runs from the first new step on are replaced."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError(EXTRA) from None
        start = resumed_step if resumed_step is not None else 0
        purge = start + 1 if resumed_step is not None else 0
        self._writer = SummaryWriter(log_dir=str(directory), purge_step=purge)
        self._last_step = start
        self._last_phases: dict[str, float] = {}
        """Phase totals (seconds since this process started) at the last record."""

    def write(self, record: Mapping[str, Any]) -> None:
        """Add the scalars of one run record and flush them to disk."""
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            return
        if record.get("event") == "eval":
            for key, value in record.items():
                number = _number(value)
                if key.startswith(_EVAL_PREFIX) and number is not None:
                    self._writer.add_scalar(f"eval/{key[len(_EVAL_PREFIX):]}", number, step)
        elif "event" not in record:
            for key, tag in _STEP_SCALARS:
                number = _number(record.get(key))
                if number is not None:
                    self._writer.add_scalar(tag, number, step)
            self._phases(record.get("phases"), step)
        self._writer.flush()

    def _phases(self, totals: object, step: int) -> None:
        if not isinstance(totals, Mapping) or step <= self._last_step:
            return
        steps = step - self._last_step
        for phase, total in totals.items():
            seconds = _number(total)
            if isinstance(phase, str) and seconds is not None:
                spent = seconds - self._last_phases.get(phase, 0.0)
                self._writer.add_scalar(f"phase_seconds/{phase}", spent / steps, step)
                self._last_phases[phase] = seconds
        self._last_step = step

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()

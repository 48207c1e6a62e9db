"""Wall time per phase within one training step: what ``ngd_phase_seconds`` observes.

The worker wraps the parts of a step it runs itself (forward, backward, optimizer, DeepSpeed's
hand-over) in :class:`PhaseClock`; the preconditioner keeps its own ``timings`` for its phases.
Times are host wall times: on a GPU they include only what the host waited for (no device sync
is added, so measuring does not slow the step).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseClock:
    """Seconds spent per phase name since the last :meth:`take`."""

    def __init__(self) -> None:
        self._seconds: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Add the wall time of the ``with`` body to ``phase``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[phase] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """The seconds per phase gathered so far, and start again from zero."""
        out = dict(self._seconds)
        self._seconds.clear()
        return out

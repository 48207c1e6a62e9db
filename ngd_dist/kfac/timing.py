"""Wall time per phase of a training step: the one clock behind ``precond.timings`` and ``ngd_phase_seconds``.

A caller times the parts of a step it runs itself (forward, backward, optimizer) with a
:class:`PhaseClock` and hands the same clock to the preconditioner, which times its own phases and
the factor statistics its hooks compute during the caller's forward and backward passes. Phases
nest, and each second is counted once, in the innermost phase open at the time: statistics computed
inside ``forward`` count as ``factor_computation``, not also as ``forward``.

Times are host wall times. On a GPU, by default, they include only what the host waited for (no
device sync is added, so measuring does not slow the step, but work the device runs asynchronously
lands in whichever later phase waits for it); with ``sync=torch.cuda.synchronize`` each phase
boundary waits for the device first, so every phase is charged with the device work it queued.
Open phases form one stack, whatever the thread: a backward hook that autograd runs in its own
device thread while the caller waits in ``backward()`` nests inside the caller's phase, as it
should. Timing phases from two threads at once is not supported.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class _Open:
    """A phase being timed: when it started, and the seconds spent so far in phases nested in it."""

    phase: str
    start: float
    nested: float = 0.0


class PhaseClock:
    """Exclusive seconds per phase name: in total, and since the last :meth:`take`."""

    def __init__(
        self, now: Callable[[], float] = time.perf_counter, sync: Callable[[], None] | None = None
    ) -> None:
        """``now``: the time source, in seconds (a fake one in tests); ``sync``: called at every phase
        boundary before the time is read (``torch.cuda.synchronize`` for device-accurate phases).
        """
        self._now = now
        self.sync = sync
        """Called at every phase boundary before the time is read, or None."""
        self.totals: defaultdict[str, float] = defaultdict(float)
        """Seconds per phase since the clock was made (clear it at will: :meth:`take` is unaffected)."""
        self._since_take: dict[str, float] = {}
        self._open: list[_Open] = []

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Add the wall time of the ``with`` body, less that of the phases nested in it, to ``phase``."""
        if self.sync is not None:
            self.sync()
        opened = _Open(phase, self._now())
        self._open.append(opened)
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            elapsed = self._now() - opened.start
            self._open.pop()
            own = elapsed - opened.nested
            self.totals[phase] += own
            self._since_take[phase] = self._since_take.get(phase, 0.0) + own
            if self._open:
                self._open[-1].nested += elapsed

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last call, and start again from zero.

        Every phase this clock has timed is in it (0.0 for one not entered since the last call), so
        a step that skips a phase reports it as taking no time. Phases still open count when they end.
        """
        taken = self._since_take
        self._since_take = dict.fromkeys(taken, 0.0)
        return taken

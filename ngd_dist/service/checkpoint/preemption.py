"""Preemption signals for the training loop.

SIGTERM / SIGINT (a scheduler, ``docker stop``, Ctrl-C) become a flag that the loop polls once per
step, so every rank saves at the same step and exits cleanly.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class PreemptionHandler:
    """Context manager turning SIGTERM / SIGINT into a flag that the training loop polls.

    Inside the ``with`` block the first such signal sets :attr:`requested` and records
    :attr:`signal_name` (e.g. ``"SIGTERM"``); the loop should then save a checkpoint and exit
    cleanly. A second signal while a request is pending is handed to the handler that was installed
    before (so a second Ctrl-C raises KeyboardInterrupt, a second SIGTERM terminates by default),
    unless it comes within ``repeat_window`` seconds of the first: Slurm, systemd and ``kill`` of a
    process group signal every process at once, and the launcher then passes the same signal on
    to its workers again; that copy is the same request, not an order to stop at once.
    The previous handlers are restored on exit. Must be entered from the main thread.

    Example::

        with PreemptionHandler() as preempt:
            for step in range(start, total):
                train_step()
                if (step + 1) % every == 0 or preempt.requested:
                    store.save(step + 1, state())
                if preempt.requested:
                    break
    """

    def __init__(
        self,
        signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
        *,
        repeat_window: float = 2.0,
    ) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.repeat_window = repeat_window
        self.requested = False
        self.signal_name: str | None = None
        self._since = 0.0
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> PreemptionHandler:
        self.requested = False
        self.signal_name = None
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError as exc:  # not the main thread
            self._restore()
            raise RuntimeError(f"PreemptionHandler: cannot install signal handlers: {exc}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        while self._previous:
            sig, previous = self._previous.popitem()
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and time.monotonic() - self._since < self.repeat_window:
            log.info("preemption: %s again within %.0f s: the same request", name, self.repeat_window)
            return
        if self.requested:
            log.warning("preemption: second %s while a checkpoint is pending; passing it on", name)
            self._restore()
            signal.raise_signal(signum)
            return
        self.requested = True
        self.signal_name = name
        self._since = time.monotonic()
        log.warning("preemption: %s received; the worker will checkpoint and stop", name)

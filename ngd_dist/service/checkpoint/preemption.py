"""Preemption signals for the training loop.

SIGTERM / SIGINT (a scheduler, ``docker stop``, Ctrl-C) become a flag that the loop polls once per
step, so every rank saves at the same step and exits cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from types import FrameType
from typing import Any

from ngd_dist.service.exit_codes import ExitCode

log = logging.getLogger(__name__)


class PreemptionHandler:
    """Context manager turning SIGTERM / SIGINT into a flag that the training loop polls.

    Inside the ``with`` block the first such signal sets :attr:`requested` and records
    :attr:`signal_name` (e.g. ``"SIGTERM"``); the loop should then save a checkpoint and exit
    cleanly. Repeats are the same request, with one exception: a signal in ``escalating`` (by
    default SIGINT: a second Ctrl-C) that comes more than ``repeat_window`` seconds after the first
    signal is handed to the handler installed before (KeyboardInterrupt), to stop at once.

    A repeated SIGTERM never stops the worker early: Slurm, systemd and ``kill`` of a process group
    signal every process, the launcher passes the same signal on again, and a worker blocked in a
    collective (another rank saving its checkpoint) runs the Python handler for a copy delivered
    at once only seconds later, so a time window cannot tell those copies from a new order. Every
    scheduler follows its SIGTERM with SIGKILL after a grace period; that is the way to stop at once.
    SIGINT keeps its window, and with it the same blind spot where a worker gets one Ctrl-C twice:
    DeepSpeed's workers share their launcher's process group, which ``ngd-dist launch`` signals, and
    DeepSpeed passes the signal on as well, so there a late-run copy would read as a second Ctrl-C.
    :func:`worker_preemption` therefore lets no repeat stop a DeepSpeed worker at once.

    The handler itself only sets flags (I/O in a signal handler can re-enter a half-written stream);
    what it saw is logged the next time the loop reads :attr:`requested`. The previous handlers are
    restored on exit. Must be entered from the main thread.

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
        escalating: Iterable[signal.Signals] = (signal.SIGINT,),
        setup_grace_s: float | None = None,
    ) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.repeat_window = repeat_window
        self.escalating = frozenset(signal.Signals(s) for s in escalating)
        self.setup_grace_s = setup_grace_s
        """Entered before the set-up: a request that comes before :meth:`loop_started` ends the process
        (exit 75, no checkpoint) unless the loop starts within this many seconds of the handler
        running, so a launcher's SIGTERM to the survivors of a failed rank still ends a set-up that
        keeps going (a slow download, a retry loop). A set-up blocked inside one C call runs the
        handler only when that call returns."""
        self._in_loop = False
        self._deadline: threading.Timer | None = None
        self._requested = False
        self.signal_name: str | None = None
        self._since = 0.0
        self._seen: list[tuple[str, bool]] = []  # (signal name, first of the request), not yet logged
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a preemption signal has come; logs what the handler recorded since the last read."""
        self._flush()
        return self._requested

    def loop_started(self) -> None:
        """The training loop polls :attr:`requested` from now on: no set-up deadline any more."""
        self._in_loop = True

    def _setup_expired(self) -> None:
        if self._in_loop:
            return
        message = (
            f"preemption: {self.signal_name} during the set-up, which did not reach the training loop "
            f"within {self.setup_grace_s:g} s; stopping without a checkpoint\n"
        )
        os.write(2, message.encode())
        os._exit(int(ExitCode.PREEMPTED))

    def __enter__(self) -> PreemptionHandler:
        self._requested = False
        self.signal_name = None
        self._seen.clear()
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError as exc:  # not the main thread
            self._restore()
            raise RuntimeError(f"PreemptionHandler: cannot install signal handlers: {exc}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
        self._flush()
        if self._deadline is not None:  # left before the loop (an error in the set-up): its exit stands
            self._deadline.cancel()
            self._deadline = None

    def _restore(self) -> None:
        while self._previous:
            sig, previous = self._previous.popitem()
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    def _flush(self) -> None:
        while self._seen:
            name, first = self._seen.pop(0)
            if first:
                log.warning("preemption: %s received; the worker will checkpoint and stop", name)
            else:
                log.info("preemption: %s again: the same request", name)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if not self._requested:
            self._requested = True
            self.signal_name = sig.name
            self._since = time.monotonic()
            self._seen.append((sig.name, True))
            if self.setup_grace_s is not None and not self._in_loop:
                self._deadline = threading.Timer(self.setup_grace_s, self._setup_expired)
                self._deadline.daemon = True
                self._deadline.start()
            return
        if sig in self.escalating and time.monotonic() - self._since >= self.repeat_window:
            # Written straight to the file descriptor: the logging stream may be mid-write.
            os.write(2, f"preemption: second {sig.name}; stopping at once without a checkpoint\n".encode())
            self._restore()
            signal.raise_signal(signum)
            return
        self._seen.append((sig.name, False))


SETUP_GRACE_S = 10.0
"""How long a worker signalled during its set-up may take to reach the training loop (and checkpoint
at its first step) before it exits 75 without a checkpoint."""


def worker_preemption(*, signals_arrive_twice: bool, setup_grace_s: float | None = None) -> PreemptionHandler:
    """The handler a training worker polls: a second Ctrl-C stops it at once, except where each
    signal reaches it twice (``signals_arrive_twice``: under DeepSpeed's launcher), where every
    repeat is the same request and only SIGKILL stops it before its checkpoint.
    """
    return PreemptionHandler(
        escalating=() if signals_arrive_twice else (signal.SIGINT,), setup_grace_s=setup_grace_s
    )

"""What a worker shows while it trains: rank 0's progress (a bar on a terminal, plain periodic lines
otherwise) and rank-prefixed log lines that never break the bar.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("ngd_dist.service.trainer")

class Progress:
    """Rank 0's progress: a tqdm bar when stderr is a terminal; otherwise (CI, ``docker logs``, a
    file) one plain log line per logged step, with no carriage-return redraws. Nothing elsewhere.
    """

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        """A bar (or log lines) from step ``initial`` to ``total``; nothing unless ``enabled``."""
        self.bar: Any = None
        self.total = total
        self.lines = enabled and not sys.stderr.isatty()
        if enabled and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True)

    def update_to(self, step: int, *, loss: float, rate: float, gamma: float | None = None) -> None:
        """Show progress up to ``step`` with the latest loss, samples per second and γ."""
        extra = {"gamma": f"{gamma:.3g}"} if gamma is not None else {}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{rate:.0f}", **extra)
        elif self.lines:
            shown = "".join(f" {k}={v}" for k, v in extra.items())
            log.info("step %d/%d loss=%.4f samples_per_s=%.0f%s", step, self.total, loss, rate, shown)

    def close(self) -> None:
        """Close the bar (the last line stays on the terminal)."""
        if self.bar is not None:
            self.bar.close()


class BarSafeHandler(logging.StreamHandler):
    """Writes each log line through ``tqdm.write`` while a progress bar is open, so the line starts
    on a line of its own and the bar is redrawn below it (plain stderr otherwise).
    """

    def emit(self, record: logging.LogRecord) -> None:
        """Write one record to the current ``sys.stderr`` (not the one of when logging was set up,
        which may have been replaced and closed since: a test's capture, a redirected stream).
        """
        self.stream = sys.stderr
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            super().emit(record)
            return
        if not getattr(tqdm, "_instances", None):
            super().emit(record)
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def configure_logging(rank: int) -> None:
    """Rank-prefixed log lines on stderr (rank 0 logs INFO, the others WARNING and above), each on a
    line of its own even while rank 0's progress bar is drawn.
    """
    handler = BarSafeHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
    root = logging.getLogger("ngd_dist")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False

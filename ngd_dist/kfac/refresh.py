"""When a factor's decomposition is stale enough to recompute: fixed and adaptive schedules.

Statistics are gathered and folded every ``factor_every`` steps in both schedules. The fixed
schedule decomposes every factor every ``inverse_every`` steps (and, with warm-up, at
``factor_every x 1, 2, 4, ...`` before it). The adaptive one (SP-NGD inspired) gives each factor its
own decomposition interval, starting at ``factor_every`` with warm-up (``inverse_every`` without,
see ``KFACConfig.refresh_warmup``): when a factor is due, its owner measures how far the running
factor has moved since the decomposition in use was computed, ``r = ||X_now - X_then||_F /
||X_then||_F``. Below ``low`` the decomposition was still good and the interval doubles (up to
``cap``); above ``high`` it had gone stale and the interval halves (down to ``floor``); in between
it stays. The policy is deterministic: fed the same
changes, every rank makes the same decisions.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor


def relative_change(new: Tensor, old: Tensor) -> float:
    """``||new - old||_F / ||old||_F`` (infinite when ``old`` is zero and ``new`` is not)."""
    denom = float(torch.linalg.vector_norm(old.double()))
    diff = float(torch.linalg.vector_norm((new - old).double()))
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / denom


@dataclass
class AdaptiveInterval:
    """Per-key refresh intervals that lengthen while statistics are stable and shorten on change."""

    initial: int = 1
    cap: int = 64
    low: float = 0.05
    high: float = 0.2
    floor: int = 1
    intervals: dict[Hashable, int] = field(default_factory=dict)
    last: dict[Hashable, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check the thresholds and bounds."""
        for name in ("initial", "cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AdaptiveInterval.{name}: got {value!r}; expected an integer >= 1")
        if (
            isinstance(self.floor, bool)
            or not isinstance(self.floor, int)
            or not 1 <= self.floor <= self.initial
        ):
            raise ValueError(
                f"AdaptiveInterval.floor: got {self.floor!r}; expected an integer in [1, initial]"
            )
        if self.initial > self.cap:
            raise ValueError(f"AdaptiveInterval.initial: got {self.initial}; expected <= cap={self.cap}")
        if not (0 <= self.low < self.high):
            raise ValueError(
                f"AdaptiveInterval.low/high: got {self.low!r}/{self.high!r}; expected 0 <= low < high"
            )

    def interval(self, key: Hashable) -> int:
        """The current interval of ``key``."""
        return self.intervals.get(key, self.initial)

    def due(self, key: Hashable, step: int) -> bool:
        """Whether ``key`` should be refreshed at ``step`` (always, if it never was)."""
        last = self.last.get(key)
        return last is None or step - last >= self.interval(key)

    def observe(self, key: Hashable, step: int, change: float) -> int:
        """Record a refresh of ``key`` at ``step`` with relative change ``change``.

        Returns the new interval.
        """
        current = self.interval(key)
        if change < self.low:
            current = min(self.cap, 2 * current)
        elif change > self.high:
            current = max(self.floor, current // 2)
        self.intervals[key] = current
        self.last[key] = step
        return current


class FixedSchedule:
    """Every factor folded every ``factor_every`` steps and decomposed every ``inverse_every``.

    ``warmup``: also decompose at steps ``factor_every * 2^k`` before the first ``inverse_every``
    (10, 20, 40, 80 for 10 / 100): the factors change fastest early, when a decomposition from the
    first batch would otherwise be used for ``inverse_every`` steps.
    """

    def __init__(self, factor_every: int, inverse_every: int, warmup: bool = False) -> None:
        """Use the two fixed periods."""
        self.factor_every, self.inverse_every, self.warmup = factor_every, inverse_every, warmup

    def fold_due(self, key: Hashable, step: int) -> bool:
        """Whether ``key``'s statistics are captured and folded at ``step``."""
        return step % self.factor_every == 0

    def decompose_due(self, key: Hashable, step: int) -> bool:
        """Whether ``key`` is decomposed at ``step``."""
        if step % self.inverse_every == 0:
            return True
        if not self.warmup or step > self.inverse_every or step % self.factor_every:
            return False
        folds = step // self.factor_every
        return folds & (folds - 1) == 0

    def observe(self, key: Hashable, step: int, change: float) -> None:
        """Fixed periods ignore how much factors change."""

    def interval(self, key: Hashable) -> int:
        """The refresh interval of ``key``: the decomposition period."""
        return self.inverse_every


class AdaptiveSchedule:
    """Statistics every ``factor_every`` steps; each factor decomposed at its own adaptive interval."""

    def __init__(self, factor_every: int, policy: AdaptiveInterval) -> None:
        """Fold every ``factor_every`` steps; decompose as ``policy`` says."""
        self.factor_every, self.policy = factor_every, policy

    def fold_due(self, key: Hashable, step: int) -> bool:
        """Whether ``key``'s statistics are captured and folded at ``step``."""
        return step % self.factor_every == 0

    def decompose_due(self, key: Hashable, step: int) -> bool:
        """Whether ``key``'s decomposition is due at ``step``."""
        return self.policy.due(key, step)

    def observe(self, key: Hashable, step: int, change: float) -> None:
        """Adapt ``key``'s interval to how far it moved since its last decomposition."""
        self.policy.observe(key, step, change)

    def interval(self, key: Hashable) -> int:
        """The current decomposition interval of ``key``."""
        return self.policy.interval(key)


Schedule = FixedSchedule | AdaptiveSchedule

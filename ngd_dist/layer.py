"""Per-layer state: statistics being gathered this step, running factors, and the decomposition."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ngd_dist.curvature.modules import ModuleMath
from ngd_dist.linalg import Decomposition, decompose


@dataclass
class Pending:
    """One factor's statistics summed over this step's micro-batches (float32), and their count."""

    total: Tensor | None = None
    count: int = 0

    def add(self, value: Tensor, count: int) -> None:
        """Add one micro-batch's sum of outer products over ``count`` rows or samples."""
        self.total = value if self.total is None else self.total + value
        self.count += count

    def mean(self) -> Tensor | None:
        """The average, or None when nothing was gathered."""
        if self.total is None or self.count == 0:
            return None
        return self.total / self.count

    def clear(self) -> None:
        """Forget this step's statistics."""
        self.total, self.count = None, 0


@dataclass
class KFACLayer:
    """One registered module: its maths helper, factors A and G, and their decomposition."""

    name: str
    module: nn.Module
    math: ModuleMath
    a: Tensor | None = None
    """Running A (a vector when ``math.diagonal_a``)."""
    g: Tensor | None = None
    """Running G."""
    pending_a: Pending = field(default_factory=Pending)
    pending_g: Pending = field(default_factory=Pending)
    decomposition: Decomposition | None = None
    decomposed_from: tuple[Tensor, Tensor] | None = None
    """The factors the current decomposition was computed from (kept for exact checkpoints)."""
    decomposed_damping: float = 0.0

    @property
    def a_dim(self) -> int:
        """Side of A."""
        return self.math.a_dim(self.module)

    @property
    def g_dim(self) -> int:
        """Side of G."""
        return self.math.g_dim(self.module)

    def fold(self, name: str, new: Tensor, decay: float) -> None:
        """Fold a step's factor into the running average (out of place, see ``decomposed_from``)."""
        old = getattr(self, name)
        setattr(self, name, new.clone() if old is None else old * decay + new * (1.0 - decay))

    def refresh(self, method: str, damping: float, dtype: torch.dtype) -> tuple[bool, bool]:
        """Recompute the decomposition from the running factors.

        Returns (succeeded, retried in float64). On failure the previous decomposition stays.
        """
        if self.a is None or self.g is None:
            return True, False
        result, retried = decompose(self.a, self.g, method, damping, dtype)
        if result is None:
            return False, retried
        self.decomposition = result
        self.decomposed_from = (self.a, self.g)
        self.decomposed_damping = damping
        return True, retried

    def state_dict(self) -> dict[str, Tensor | float]:
        """Running factors, plus the ones the decomposition came from when they differ."""
        state: dict[str, Tensor | float] = {}
        if self.a is not None and self.g is not None:
            state["a"], state["g"] = self.a, self.g
        if self.decomposed_from is not None:
            da, dg = self.decomposed_from
            if da is not self.a or dg is not self.g:
                state["decomposed_a"], state["decomposed_g"] = da, dg
            state["decomposed_damping"] = self.decomposed_damping
        return state

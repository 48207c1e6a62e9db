"""Per-layer state: statistics being gathered this step, running factors, decompositions.

A layer has two factors, A and G. Every rank gathers both factors' statistics on its own batch;
only a factor's owner keeps the running average and computes its decomposition; the ranks that
precondition the layer hold both decompositions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ngd_dist.kfac.curvature.modules import ModuleMath
from ngd_dist.kfac.linalg import Decomposition

FACTORS: tuple[str, str] = ("a", "g")
"""The two Kronecker factors of every layer: inputs (``a``) and output gradients (``g``)."""


@dataclass
class Pending:
    """One factor's statistics summed over this step's micro-batches, and their count."""

    total: Tensor | None = None
    count: int = 0

    def add(self, value: Tensor, count: int) -> None:
        """Add one micro-batch's sum of outer products over ``count`` rows or samples."""
        self.total = value if self.total is None else self.total + value
        self.count += count

    def clear(self) -> None:
        """Forget this step's statistics."""
        self.total, self.count = None, 0


@dataclass
class Factor:
    """One Kronecker factor of one layer."""

    pending: Pending = field(default_factory=Pending)
    running: Tensor | None = None
    """The running average (on the owner only; a vector for a diagonal A)."""
    trace: float | None = None
    """Trace of the running average, known on every rank (for the pi-split of the inverse form)."""
    decomposition: Decomposition | None = None
    decomposed_from: Tensor | None = None
    """The running average the owner's decomposition was computed from (for exact checkpoints)."""
    decomposed_shift: float = 0.0
    """The damping shift of an inverse-form decomposition."""

    folds: int = 0
    """How many steps' statistics the running average holds (for the debiased average)."""

    def next_decay(self, decay: float, debias: bool) -> float:
        """Count one more fold and return the weight the running average keeps in it.

        ``debias``: the weight that makes the running average ``sum_k d^(t-k) X_k / sum_k d^(t-k)``
        over the ``t`` folds so far (0 at the first fold, then rising to ``decay``), as Adam's
        bias-corrected moments; otherwise ``decay`` (the first fold is still taken whole).
        """
        self.folds += 1
        if not debias:
            return decay
        t = self.folds
        return decay * (1.0 - decay ** (t - 1)) / (1.0 - decay**t) if decay > 0 else 0.0

    def fold(self, new: Tensor, decay: float) -> None:
        """Fold a step's average into the running one (out of place: see ``decomposed_from``)."""
        if self.running is None or decay == 0.0:
            self.running = new.clone()
        else:
            self.running = self.running * decay + new * (1.0 - decay)

    def fold_trace(self, new: float, decay: float) -> None:
        """Fold a step's trace the same way, so every rank tracks the owner's running trace."""
        self.trace = new if self.trace is None or decay == 0.0 else self.trace * decay + new * (1.0 - decay)


@dataclass
class KFACLayer:
    """One registered module: its maths helper, its two factors and which of them are diagonal."""

    name: str
    module: nn.Module
    math: ModuleMath
    kind: str = ""
    """The layer type's name (``"Linear"``, ``"Conv1D"``, ``"LayerNorm"`` ...)."""
    diagonal_a: bool = False
    """A is kept as its diagonal (a vector): always for embeddings and element-wise layers, and
    when its side is above ``KFACConfig.max_factor_dim``."""
    diagonal_g: bool = False
    """G is kept as its diagonal (element-wise layers, or a side above ``max_factor_dim``)."""
    tied: tuple[str, ...] = ()
    """Other modules that use this layer's weight (preconditioned here once, see select.py)."""
    factors: dict[str, Factor] = field(default_factory=lambda: {"a": Factor(), "g": Factor()})

    def diagonal(self, factor: str) -> bool:
        """Whether ``factor`` ("a" or "g") is kept as a vector."""
        return self.diagonal_a if factor == "a" else self.diagonal_g

    @property
    def a_dim(self) -> int:
        """Side of A."""
        return self.math.a_dim(self.module)

    @property
    def g_dim(self) -> int:
        """Side of G."""
        return self.math.g_dim(self.module)

    def shape(self, factor: str) -> tuple[int, ...]:
        """Shape of a factor's running average."""
        side = self.a_dim if factor == "a" else self.g_dim
        return (side,) if self.diagonal(factor) else (side, side)

    @property
    def pending_a(self) -> Pending:
        """A's statistics of this step."""
        return self.factors["a"].pending

    @property
    def pending_g(self) -> Pending:
        """G's statistics of this step."""
        return self.factors["g"].pending

    @property
    def a(self) -> Tensor | None:
        """Running A (on its owner)."""
        return self.factors["a"].running

    @property
    def g(self) -> Tensor | None:
        """Running G (on its owner)."""
        return self.factors["g"].running

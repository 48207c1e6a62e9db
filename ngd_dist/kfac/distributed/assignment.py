"""Which rank decomposes which factor, and which ranks precondition which layer.

Pure functions of the layer list and the world size: every rank computes the same plan without
talking to the others, and the plans are unit-tested without processes.

Ranks form a grid of ``k`` rows by ``W / k`` columns, ``k`` the number of *gradient workers* per
layer (KAISA's grad-worker fraction times W): rank ``r`` sits in column ``r mod (W/k)`` and row
``r div (W/k)``. Each layer is placed in a column; the ``k`` ranks of that column each hold the
layer's decompositions and compute its preconditioned gradient, then send it along their row to
the ranks of the other columns. ``k = W`` (one column) is communication-optimal: decompositions go
to every rank and no gradient travels. ``k = 1`` (W columns) is memory-optimal: one rank holds a
layer's decompositions and broadcasts its preconditioned gradient.

A *work item* is one factor of one layer, ``(layer name, "a" | "g")``, owned (decomposed) by one
rank of its layer's column. Its cost is that of decomposing it: ``n^3`` for an ``n x n`` factor,
``n`` for a diagonal one.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from ngd_dist.kfac.layer import FACTORS

STRATEGIES: tuple[str, ...] = ("round_robin", "greedy")


@dataclass(frozen=True)
class LayerShape:
    """What the planner needs to know about a layer: its factor sides."""

    name: str
    a_dim: int
    g_dim: int
    diagonal_a: bool = False
    diagonal_g: bool = False

    def cost(self, factor: str) -> float:
        """Decomposition cost of one factor: ``n^3``, or ``n`` for a diagonal one."""
        n, diagonal = (self.a_dim, self.diagonal_a) if factor == "a" else (self.g_dim, self.diagonal_g)
        return float(n) if diagonal else float(n) ** 3


@dataclass(frozen=True)
class WorkPlan:
    """Owners of every factor's decomposition and the column of every layer."""

    world_size: int
    grad_workers: int
    factor_owner: dict[tuple[str, str], int]
    layer_column: dict[str, int]
    costs: dict[tuple[str, str], float]

    @property
    def columns(self) -> int:
        """Number of columns, ``W / k``."""
        return self.world_size // self.grad_workers

    def owner(self, layer: str, factor: str) -> int:
        """The rank that decomposes ``factor`` ("a" or "g") of ``layer``."""
        return self.factor_owner[(layer, factor)]

    def column_ranks(self, column: int) -> list[int]:
        """The gradient workers of the layers in ``column``."""
        return [column + j * self.columns for j in range(self.grad_workers)]

    def row_ranks(self, row: int) -> list[int]:
        """The ranks of ``row``, one per column, in column order."""
        return [row * self.columns + c for c in range(self.columns)]

    def column_of(self, rank: int) -> int:
        """Column of ``rank``."""
        return rank % self.columns

    def grad_workers_of(self, layer: str) -> list[int]:
        """The ranks that compute ``layer``'s preconditioned gradient."""
        return self.column_ranks(self.layer_column[layer])

    def rank_costs(self) -> list[float]:
        """Total decomposition cost assigned to each rank."""
        totals = [0.0] * self.world_size
        for item, rank in self.factor_owner.items():
            totals[rank] += self.costs[item]
        return totals

    def load_balance(self) -> float:
        """Max rank cost over mean rank cost (1.0 is perfect)."""
        totals = self.rank_costs()
        mean = sum(totals) / len(totals)
        return max(totals) / mean if mean > 0 else 1.0


def _deal(costs: Sequence[float], bins: int, strategy: str) -> list[int]:
    """Bin of each item: in turn (round robin), or longest-processing-time first.

    Greedy takes items by cost, largest first (ties in order), each to the least-loaded bin (ties
    to the lowest bin).
    """
    if strategy == "round_robin":
        return [i % bins for i in range(len(costs))]
    heap = [(0.0, b) for b in range(bins)]
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, b = heapq.heappop(heap)
        out[i] = b
        heapq.heappush(heap, (load + costs[i], b))
    return out


def make_plan(
    layers: Sequence[LayerShape], world_size: int, strategy: str = "round_robin", grad_workers: int = 1
) -> WorkPlan:
    """Place layers in columns, then deal each column's factors over its ranks, by ``strategy``.

    Round robin: layer ``i`` goes to column ``i mod (W/k)``, and a column's factors, in
    registration order (A0, G0, A1, G1, ...), to its ranks in turn. Greedy: the same, each step
    longest-processing-time first by cost (a layer costs the sum of its two factors).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: got {world_size!r}; expected an integer >= 1")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: got {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if not (1 <= grad_workers <= world_size) or world_size % grad_workers:
        raise ValueError(f"grad_workers: got {grad_workers!r}; expected a divisor of world_size={world_size}")
    columns = world_size // grad_workers
    costs = {(layer.name, f): layer.cost(f) for layer in layers for f in FACTORS}
    placed = _deal([costs[(la.name, "a")] + costs[(la.name, "g")] for la in layers], columns, strategy)
    layer_column = {layer.name: c for layer, c in zip(layers, placed, strict=True)}
    owner: dict[tuple[str, str], int] = {}
    for column in range(columns):
        items = [(la.name, f) for la in layers if layer_column[la.name] == column for f in FACTORS]
        ranks = [column + j * columns for j in range(grad_workers)]
        for item, b in zip(items, _deal([costs[i] for i in items], grad_workers, strategy), strict=True):
            owner[item] = ranks[b]
    return WorkPlan(world_size, grad_workers, owner, layer_column, costs)


def grad_workers_for(placement: str, world_size: int, fraction: float) -> int:
    """Gradient workers per layer: W for "communication", 1 for "memory".

    For "hybrid", the largest divisor of W not above ``max(1, fraction * W)``.
    """
    if placement == "communication":
        return world_size
    if placement == "memory":
        return 1
    target = max(1.0, fraction * world_size)
    return max(d for d in range(1, world_size + 1) if world_size % d == 0 and d <= target + 1e-9)

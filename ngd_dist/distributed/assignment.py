"""Which rank decomposes which factor, and which rank preconditions which layer.

Pure functions of the layer list and the world size, so every rank computes the same plan without
talking to the others, and the plans can be unit-tested without processes.

A *work item* is one Kronecker factor of one layer, ``(layer name, "a" | "g")``. Its cost is the
work of decomposing it: ``n^3`` for an ``n x n`` factor, ``n`` for a diagonal one.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

FACTORS: tuple[str, str] = ("a", "g")


@dataclass(frozen=True)
class LayerShape:
    """What the planner needs to know about a layer: its factor sides."""

    name: str
    a_dim: int
    g_dim: int
    diagonal_a: bool = False

    def cost(self, factor: str) -> float:
        """Decomposition cost of one factor: ``n^3``, or ``n`` for a diagonal A."""
        if factor == "a":
            return float(self.a_dim) if self.diagonal_a else float(self.a_dim) ** 3
        return float(self.g_dim) ** 3


@dataclass(frozen=True)
class WorkPlan:
    """The owner of every factor's decomposition, and the rank that preconditions each layer."""

    world_size: int
    factor_owner: dict[tuple[str, str], int]
    layer_owner: dict[str, int]
    costs: dict[tuple[str, str], float]

    def owner(self, layer: str, factor: str) -> int:
        """The rank that decomposes ``factor`` ("a" or "g") of ``layer``."""
        return self.factor_owner[(layer, factor)]

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


def _check(world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: got {world_size!r}; expected an integer >= 1")


def _items(layers: Sequence[LayerShape]) -> list[tuple[tuple[str, str], float]]:
    return [((layer.name, f), layer.cost(f)) for layer in layers for f in FACTORS]


def round_robin(layers: Sequence[LayerShape], world_size: int) -> WorkPlan:
    """Deal the factors out in registration order: A0, G0, A1, G1, ... to ranks 0, 1, 2, ...

    Layer ``i`` is preconditioned by rank ``i mod world_size``.
    """
    _check(world_size)
    items = _items(layers)
    return WorkPlan(
        world_size=world_size,
        factor_owner={item: i % world_size for i, (item, _) in enumerate(items)},
        layer_owner={layer.name: i % world_size for i, layer in enumerate(layers)},
        costs=dict(items),
    )


def greedy(layers: Sequence[LayerShape], world_size: int) -> WorkPlan:
    """Assign longest-processing-time first.

    Factors sorted by cost (largest first, ties in registration order) each go to the
    least-loaded rank (ties to the lowest rank).

    Each layer is preconditioned by the owner of its larger factor (its G on ties), so the
    preconditioning work follows the decomposition work.
    """
    _check(world_size)
    items = _items(layers)
    order = sorted(range(len(items)), key=lambda i: (-items[i][1], i))
    heap = [(0.0, rank) for rank in range(world_size)]
    owner: dict[tuple[str, str], int] = {}
    for i in order:
        load, rank = heapq.heappop(heap)
        item, cost = items[i]
        owner[item] = rank
        heapq.heappush(heap, (load + cost, rank))
    costs = dict(items)
    layer_owner = {
        layer.name: owner[(layer.name, "a")]
        if costs[(layer.name, "a")] > costs[(layer.name, "g")]
        else owner[(layer.name, "g")]
        for layer in layers
    }
    return WorkPlan(world_size=world_size, factor_owner=owner, layer_owner=layer_owner, costs=costs)


PLANNERS = {"round_robin": round_robin, "greedy": greedy}

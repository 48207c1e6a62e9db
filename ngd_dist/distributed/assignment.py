"""Which rank decomposes which layer's factors: pure functions, testable without processes."""

from __future__ import annotations


def round_robin(layers: list[str], world_size: int) -> dict[str, int]:
    """Assign layer ``i`` (in registration order) to rank ``i mod world_size``."""
    if world_size < 1:
        raise ValueError(f"world_size: got {world_size}; expected an integer >= 1")
    return {name: i % world_size for i, name in enumerate(layers)}

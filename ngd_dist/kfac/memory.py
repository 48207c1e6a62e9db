"""What a preconditioner's factors cost in memory on one rank, and what the device has free.

A rank holds the running average of each factor it owns (``n^2`` values, or ``n`` for a diagonal
factor, in the accumulation dtype) and the decompositions of every layer it preconditions (eigen:
``n^2 + n`` values, inverse: ``n^2``, in ``inverse_dtype``). The preconditioner refuses to start when
this is more than the device has free, rather than failing later inside an allocation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ngd_dist.kfac.distributed.assignment import WorkPlan
from ngd_dist.kfac.layer import FACTORS, KFACLayer


@dataclass(frozen=True)
class FactorMemory:
    """Bytes of running factors and of decompositions one rank holds."""

    factors: int
    decompositions: int

    @property
    def total(self) -> int:
        """Both together."""
        return self.factors + self.decompositions


def factor_memory(
    layers: Sequence[KFACLayer],
    plan: WorkPlan,
    rank: int,
    *,
    factor_dtype: torch.dtype,
    inverse_dtype: torch.dtype,
    eigen: bool,
) -> FactorMemory:
    """What ``rank`` holds under ``plan`` (see the module docstring)."""
    acc = 8 if factor_dtype == torch.float64 else 4
    inv = torch.empty((), dtype=inverse_dtype).element_size()
    column = plan.column_of(rank)
    factors = decompositions = 0
    for layer in layers:
        for f in FACTORS:
            side = layer.a_dim if f == "a" else layer.g_dim
            square = side if layer.diagonal(f) else side * side
            if plan.owner(layer.name, f) == rank:
                factors += square * acc
            if plan.layer_column[layer.name] == column:
                decompositions += (square + (side if eigen and not layer.diagonal(f) else 0)) * inv
    return FactorMemory(factors, decompositions)


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: CUDA's free memory, or the host's MemAvailable; None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def gib(n: int) -> str:
    """``n`` bytes in readable units."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"

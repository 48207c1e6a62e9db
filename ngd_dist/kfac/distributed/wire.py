"""How a factor's decomposition travels: its slots in a broadcast buffer, and back.

An eigen decomposition sends its eigenvalues and (unless the factor is diagonal) eigenvectors; an
inverse sends the damped inverse (packed as a triangle, or a vector for a diagonal factor). Each
carries an "ok" flag: a receiver keeps its previous decomposition when the owner has none.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor

from ngd_dist.kfac.distributed.buckets import Slot
from ngd_dist.kfac.linalg import Decomposition, Eigen, Inverse


def decomposition_slots(key: Hashable, shape: tuple[int, ...], method: str) -> list[Slot]:
    """The slots of one factor's decomposition (``shape`` is the factor's)."""
    n, diagonal = shape[0], len(shape) == 1
    if method == "eigen":
        slots = [Slot((key, "v"), (n,))] + ([] if diagonal else [Slot((key, "q"), (n, n))])
    else:
        slots = [Slot((key, "inv"), (n,) if diagonal else (n, n), symmetric=not diagonal)]
    return [*slots, Slot((key, "ok"), (1,))]


def decomposition_tensors(key: Hashable, d: Decomposition | None) -> dict[Hashable, Tensor]:
    """What the owner puts in the slots (nothing, i.e. ok = 0, when it has no decomposition)."""
    if d is None:
        return {}
    out: dict[Hashable, Tensor] = {(key, "ok"): torch.ones(1)}
    if isinstance(d, Eigen):
        out[(key, "v")] = d.v
        if d.q is not None:
            out[(key, "q")] = d.q
    else:
        out[(key, "inv")] = d.inv
    return out


def received_decomposition(
    key: Hashable, received: dict[Hashable, Tensor], method: str
) -> Decomposition | None:
    """The decomposition a receiver unpacked, or None when the owner had none."""
    if float(received[(key, "ok")]) != 1.0:
        return None
    if method == "eigen":
        return Eigen(received.get((key, "q")), received[(key, "v")])
    return Inverse(received[(key, "inv")])

"""A fast check that tensors hold no NaN or inf, for the checks made on every step.

``torch.isfinite(t).all()`` writes a boolean per element and is slow on CPU. A tensor's minimum and
maximum (``torch.aminmax``, one pass, nothing written per element) tell the same exactly: a NaN
anywhere makes both NaN, an infinity is the maximum or the minimum, and nothing is accumulated, so
nothing can overflow whatever the dtype. Unlike a sum in float64 (the former check), it makes no
widened copy of a large tensor, which on CPU made that sum several times slower.
:func:`all_finite`, which reads the answer on the host anyway, first tries a plain float32 sum of
float32 tensors (cheaper still) and falls back to the extremes only when that sum is not finite.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def finite_flag(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor on the tensors' device (no host sync): True when every value is finite.

    Floating tensors by their minimum and maximum (exact for every floating dtype, see the module's
    docstring), complex ones by ``torch.isfinite``; integer and empty tensors are always finite.
    True for an empty sequence.
    """
    extremes: list[Tensor] = []
    exact: list[Tensor] = []
    for t in tensors:
        if t.is_complex():
            exact.append(torch.isfinite(t).all())
        elif t.is_floating_point() and t.numel():
            extremes.extend(v.double() for v in torch.aminmax(t))  # float64 holds every value exactly
    if extremes:
        exact.append(torch.isfinite(torch.stack(extremes)).all())
    if not exact:
        device = tensors[0].device if tensors else None
        return torch.ones((), dtype=torch.bool, device=device)
    return exact[0] if len(exact) == 1 else torch.stack(exact).all()


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite, read on the host (one sync when they are).

    When all are float32: first their float32 sums (no copy; finite sums prove the values finite).
    Only when one is not, which a large enough finite tensor can cause by overflowing, or for other
    dtypes, does :func:`finite_flag` decide, exactly.
    """
    if tensors and all(t.dtype == torch.float32 for t in tensors):
        sums = [t.sum() for t in tensors]
        if bool(torch.isfinite(sums[0] if len(sums) == 1 else torch.stack(sums).sum())):
            return True
    return bool(finite_flag(tensors))

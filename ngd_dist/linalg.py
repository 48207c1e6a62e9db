"""Decompositions of Kronecker factors and their application to a gradient matrix.

Two forms, chosen by ``KFACConfig.method``:

- :class:`EigenForm` stores ``A = Q_A diag(v_A) Q_A^T`` and ``G = Q_G diag(v_G) Q_G^T`` and applies
  ``(G (x) A + lambda I)^-1`` exactly in that eigenbasis:
  ``P = Q_G [ (Q_G^T M Q_A) / (v_G v_A^T + lambda) ] Q_A^T``. Damping is applied at every step, so a
  damping schedule takes effect without a new decomposition.
- :class:`InverseForm` stores ``(A + pi sqrt(lambda) I)^-1`` and ``(G + sqrt(lambda)/pi I)^-1`` with
  ``pi = sqrt((tr A / dim A) / (tr G / dim G))`` (Martens & Grosse's pi-split) and applies
  ``P = G_inv M A_inv``; damping is fixed at decomposition time.

A diagonal A (embeddings) is a vector throughout. Decompositions run in ``dtype`` (float32 by
default) and are retried in float64 when they raise or give non-finite values; :func:`decompose`
reports whether it retried and returns None when float64 failed too, so the caller can keep the last
good decomposition and count the failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class EigenForm:
    """Eigenbases and eigenvalues of A and G (``q_a`` is None for a diagonal A)."""

    q_a: Tensor | None
    v_a: Tensor
    q_g: Tensor
    v_g: Tensor

    def apply(self, m: Tensor, damping: float) -> Tensor:
        """``(G (x) A + damping I)^-1`` applied to the ``(g_dim, a_dim)`` gradient matrix ``m``."""
        x = m.to(self.q_g.dtype)
        x = self.q_g.t() @ x
        if self.q_a is not None:
            x = x @ self.q_a
        x = x / (torch.outer(self.v_g, self.v_a) + damping)
        x = self.q_g @ x
        if self.q_a is not None:
            x = x @ self.q_a.t()
        return x.to(m.dtype)


@dataclass
class InverseForm:
    """Damped inverses of A (a vector when A is diagonal) and G."""

    a_inv: Tensor
    g_inv: Tensor

    def apply(self, m: Tensor, damping: float) -> Tensor:
        """``G_inv m A_inv``; ``damping`` was fixed when the inverses were taken."""
        x = self.g_inv @ m.to(self.g_inv.dtype)
        x = x * self.a_inv if self.a_inv.dim() == 1 else x @ self.a_inv
        return x.to(m.dtype)


Decomposition = EigenForm | InverseForm


def pi_split(a: Tensor, g: Tensor) -> float:
    """``pi = sqrt((tr A / dim A) / (tr G / dim G))``; 1 when either trace is not positive."""
    mean_a = float(a.sum() if a.dim() == 1 else a.diagonal().sum()) / a.shape[0]
    mean_g = float(g.diagonal().sum()) / g.shape[0]
    if not (mean_a > 0 and mean_g > 0 and math.isfinite(mean_a) and math.isfinite(mean_g)):
        return 1.0
    return math.sqrt(mean_a / mean_g)


def _eigen(a: Tensor, g: Tensor, dtype: torch.dtype) -> EigenForm:
    if a.dim() == 1:
        q_a, v_a = None, a.to(dtype)
    else:
        v_a, q_a = torch.linalg.eigh(a.to(dtype))
    v_g, q_g = torch.linalg.eigh(g.to(dtype))
    # Factors are PSD; round-off can leave tiny negative eigenvalues, which damping must not meet.
    return EigenForm(q_a, v_a.clamp_min(0.0), q_g, v_g.clamp_min(0.0))


def _spd_inverse(x: Tensor, shift: float) -> Tensor:
    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    chol = torch.linalg.cholesky(x + shift * eye)
    return torch.cholesky_inverse(chol)


def _inverse(a: Tensor, g: Tensor, damping: float, dtype: torch.dtype) -> InverseForm:
    pi = pi_split(a, g)
    root = math.sqrt(damping)
    a = a.to(dtype)
    a_inv = 1.0 / (a + pi * root) if a.dim() == 1 else _spd_inverse(a, pi * root)
    return InverseForm(a_inv, _spd_inverse(g.to(dtype), root / pi))


def _finite(d: Decomposition) -> bool:
    if isinstance(d, EigenForm):
        tensors = [t for t in (d.q_a, d.v_a, d.q_g, d.v_g) if t is not None]
    else:
        tensors = [d.a_inv, d.g_inv]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def decompose(
    a: Tensor, g: Tensor, method: str, damping: float, dtype: torch.dtype
) -> tuple[Decomposition | None, bool]:
    """Decompose one layer's factors; returns (result or None if it failed, whether float64 retried).

    ``damping`` is only used by the inverse form. A failure in ``dtype`` is retried once in float64
    (and the result kept in float64).
    """
    dtypes = [dtype] if dtype == torch.float64 else [dtype, torch.float64]
    for attempt, dt in enumerate(dtypes):
        try:
            result = _eigen(a, g, dt) if method == "eigen" else _inverse(a, g, damping, dt)
        except (RuntimeError, torch.linalg.LinAlgError):
            continue
        if _finite(result):
            return result, attempt > 0
    return None, len(dtypes) > 1


def pack_upper(x: Tensor) -> Tensor:
    """The upper triangle of a symmetric matrix, row by row: ``n(n+1)/2`` values."""
    n = x.shape[0]
    rows, cols = torch.triu_indices(n, n, device=x.device)
    return x[rows, cols]


def unpack_upper(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_upper`: the full symmetric ``n x n`` matrix."""
    if packed.numel() != n * (n + 1) // 2:
        raise ValueError(f"packed triangle has {packed.numel()} values; n={n} needs {n * (n + 1) // 2}")
    rows, cols = torch.triu_indices(n, n, device=packed.device)
    out = packed.new_zeros(n, n)
    out[rows, cols] = packed
    out[cols, rows] = packed
    return out

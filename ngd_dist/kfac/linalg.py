"""Decompositions of single Kronecker factors, and their application to a gradient matrix.

Each factor is decomposed on its own, so the two factors of a layer may be decomposed on different
ranks. Two forms, chosen by ``KFACConfig.method``:

- ``"eigen"``: :class:`Eigen` holds ``X = Q diag(v) Q^T`` (``Q`` is None for a diagonal factor,
  which either of A and G may be).
  With both factors in this form, :func:`precondition` applies ``(G (x) A + lambda I)^-1`` exactly:
  ``P = Q_G [ (Q_G^T M Q_A) / (v_G v_A^T + lambda) ] Q_A^T``. Damping is applied at every step, so a
  damping schedule acts between decompositions.
- ``"inverse"``: :class:`Inverse` holds ``(X + shift I)^-1``, with Martens & Grosse's pi-split
  shifts ``pi sqrt(lambda)`` for A and ``sqrt(lambda) / pi`` for G,
  ``pi = sqrt((tr A / dim A) / (tr G / dim G))``; ``P = G_inv M A_inv``, damping fixed at
  decomposition time.

Decompositions run in ``dtype`` (float32 by default) and are retried in float64 when they raise or
give non-finite values; :func:`decompose` says whether it retried, and returns None when float64
failed too (or its result does not fit in ``dtype``), so the caller can keep the last good
decomposition and count the failure. A caller that gives up after too many failures in a row raises
:class:`DecompositionError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ngd_dist.kfac.finite import all_finite


@dataclass
class Eigen:
    """Eigenvectors (None for a diagonal factor) and eigenvalues of one factor."""

    q: Tensor | None
    v: Tensor

    def tensors(self) -> list[Tensor]:
        """The tensors it is made of."""
        return [self.v] if self.q is None else [self.q, self.v]


@dataclass
class Inverse:
    """The damped inverse of one factor (a vector for a diagonal factor)."""

    inv: Tensor

    def tensors(self) -> list[Tensor]:
        """The tensors it is made of."""
        return [self.inv]


Decomposition = Eigen | Inverse


class DecompositionError(RuntimeError):
    """A factor failed to decompose too many times in a row: the preconditioner cannot go on.

    ``str()`` is one line naming the layer, the factor and the remedies as ``KFACConfig`` fields;
    :meth:`message` names them under another prefix (a job's ``preconditioner`` section, say).
    """

    def __init__(
        self,
        layer: str,
        factor: str,
        failures: int,
        *,
        limit: int,
        damping: float,
        inverse_dtype: torch.dtype,
    ) -> None:
        """``failures`` (>= ``limit``) consecutive failures of ``factor`` ("a" or "g") of ``layer``,
        under this damping and dtype.
        """
        self.layer, self.factor, self.failures, self.limit = layer, factor, failures, limit
        self.damping, self.inverse_dtype = damping, inverse_dtype
        super().__init__(self.message("KFACConfig"))

    def message(self, config: str) -> str:
        """The one-line explanation, naming the remedies as fields of ``config`` (``config.damping``)."""
        wide = self.inverse_dtype == torch.float64
        remedy = f"raise {config}.damping (now {self.damping:g})" + (
            ", or check the inputs for values too large to square in float64"
            if wide
            else f" or set {config}.inverse_dtype=float64"
        )
        dtype = "float64" if wide else f"{str(self.inverse_dtype).removeprefix('torch.')} and float64"
        return (
            f"K-FAC: factor {self.factor.upper()} of layer {self.layer!r} failed to decompose "
            f"{self.failures} times in a row in {dtype} ({config}.max_failed_decompositions={self.limit}): "
            f"it is too ill-conditioned or too large; {remedy}"
        )


def pi_split(trace_a: float, dim_a: int, trace_g: float, dim_g: int) -> float:
    """``pi = sqrt((tr A / dim A) / (tr G / dim G))``; 1 when either mean is not positive."""
    mean_a, mean_g = trace_a / dim_a, trace_g / dim_g
    if not (mean_a > 0 and mean_g > 0 and math.isfinite(mean_a) and math.isfinite(mean_g)):
        return 1.0
    return math.sqrt(mean_a / mean_g)


def inverse_shifts(
    trace_a: float, dim_a: int, trace_g: float, dim_g: int, damping: float
) -> tuple[float, float]:
    """The pi-split shifts ``(pi sqrt(lambda), sqrt(lambda) / pi)`` added to A and G."""
    pi = pi_split(trace_a, dim_a, trace_g, dim_g)
    root = math.sqrt(damping)
    return pi * root, root / pi


def _eigen(x: Tensor, dtype: torch.dtype) -> Eigen:
    if x.dim() == 1:
        return Eigen(None, x.to(dtype).clamp_min(0.0))
    v, q = torch.linalg.eigh(x.to(dtype))
    # Factors are PSD; round-off can leave tiny negative eigenvalues, which damping must not meet.
    return Eigen(q, v.clamp_min(0.0))


def _inverse(x: Tensor, shift: float, dtype: torch.dtype) -> Inverse:
    x = x.to(dtype)
    if x.dim() == 1:
        return Inverse(1.0 / (x + shift))
    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    return Inverse(torch.cholesky_inverse(torch.linalg.cholesky(x + shift * eye)))


def _cast(d: Decomposition, dtype: torch.dtype) -> Decomposition:
    """``d`` in ``dtype`` and contiguous: laid out as the copies other ranks unpack from a broadcast
    (eigh and cholesky_inverse return column-major matrices), so that every rank's matmuls take
    the same path and give the same bits.
    """
    if isinstance(d, Inverse):
        return Inverse(d.inv.to(dtype).contiguous())
    return Eigen(None if d.q is None else d.q.to(dtype).contiguous(), d.v.to(dtype).contiguous())


def decompose(x: Tensor, method: str, shift: float, dtype: torch.dtype) -> tuple[Decomposition | None, bool]:
    """Decompose one factor; returns (result or None if it failed, whether float64 was retried).

    ``shift`` is only used by the inverse form. A failure in ``dtype`` is retried once in float64,
    and the float64 result is cast back to ``dtype``; a result that is not finite in ``dtype``
    (float64 eigenvalues beyond float32's range, say) is a failure.
    """
    dtypes = [dtype] if dtype == torch.float64 else [dtype, torch.float64]
    for attempt, dt in enumerate(dtypes):
        try:
            result = _eigen(x, dt) if method == "eigen" else _inverse(x, shift, dt)
        except (RuntimeError, torch.linalg.LinAlgError):
            continue
        result = _cast(result, dtype)
        if all_finite(result.tensors()):
            return result, attempt > 0
    return None, len(dtypes) > 1


def damped_reciprocal(a: Eigen, g: Eigen, damping: float) -> Tensor:
    """``1 / (v_G v_A^T + damping)``: what the eigen form multiplies by in the eigenbasis. It only
    changes with the decompositions and the damping, so callers may keep it between steps.
    """
    return 1.0 / (torch.outer(g.v, a.v) + damping)


def precondition(
    a: Decomposition, g: Decomposition, m: Tensor, damping: float, *, reciprocal: Tensor | None = None
) -> Tensor:
    """Apply the preconditioner of one layer to its ``(g_dim, a_dim)`` gradient matrix ``m``.

    ``reciprocal``: :func:`damped_reciprocal` of these decompositions and this damping, if the
    caller kept it (eigen form only).
    """
    return precondition_blocks(a, g, [m], damping, reciprocal=reciprocal)[0]


def _spans(blocks: Sequence[Tensor]) -> list[slice]:
    """The columns of ``[B_1 | B_2 | ...]`` each block stands for."""
    spans, start = [], 0
    for b in blocks:
        spans.append(slice(start, start + b.shape[1]))
        start += b.shape[1]
    return spans


def _as_dtype(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in ``like``'s dtype, converted only when it differs (a same-dtype ``.to`` still costs a call)."""
    return t if t.dtype == like.dtype else t.to(like.dtype)


def _as_dtypes_of(out: list[Tensor], blocks: Sequence[Tensor]) -> list[Tensor]:
    """Each of ``out`` in the dtype of its block."""
    return [_as_dtype(o, b) for o, b in zip(out, blocks, strict=True)]


def _times_rows(blocks: Sequence[Tensor], x: Tensor) -> Tensor:
    """``[B_1 | B_2 | ...] @ x`` as ``sum_k B_k @ x[rows of block k]``: nothing is concatenated."""
    out: Tensor | None = None
    for b, span in zip(blocks, _spans(blocks), strict=True):
        b = _as_dtype(b, x)
        out = b @ x[span] if out is None else out.addmm_(b, x[span])
    assert out is not None
    return out


def precondition_blocks(
    a: Decomposition,
    g: Decomposition,
    blocks: Sequence[Tensor],
    damping: float,
    *,
    reciprocal: Tensor | None = None,
) -> list[Tensor]:
    """:func:`precondition` of the matrix ``[B_1 | B_2 | ...]`` given as its column blocks (a weight
    and its bias column, say), returned as blocks of the same shapes (views of one result).

    The first product with A's side is summed block by block (``sum_k B_k X[rows of k]``) and the
    result split back by column, so the matrix is never concatenated; a diagonal A treats each block
    on its own.
    """
    spans = _spans(blocks)
    if isinstance(a, Eigen) and isinstance(g, Eigen):
        r = reciprocal if reciprocal is not None else damped_reciprocal(a, g, damping)
        gq = g.q
        if a.q is None:  # diagonal A: its eigenbasis is the identity, every column on its own
            out = []
            for b, span in zip(blocks, spans, strict=True):
                x = _as_dtype(b, g.v)
                x = (x if gq is None else gq.t() @ x) * r[:, span]
                out.append(x if gq is None else gq @ x)
        else:
            x = _times_rows(blocks, a.q)
            x = (x if gq is None else gq.t() @ x).mul_(r)  # a product: a fresh tensor
            x = (x if gq is None else gq @ x) @ a.q.t()
            out = [x[:, span] for span in spans]
        return _as_dtypes_of(out, blocks)
    if isinstance(a, Inverse) and isinstance(g, Inverse):
        g_inv = g.inv

        def g_side(x: Tensor) -> Tensor:
            return g_inv.unsqueeze(1) * x if g_inv.dim() == 1 else g_inv @ x

        if a.inv.dim() == 1:
            out = [g_side(_as_dtype(b, g_inv) * a.inv[span]) for b, span in zip(blocks, spans, strict=True)]
        else:
            x = g_side(_times_rows(blocks, a.inv))
            out = [x[:, span] for span in spans]
        return _as_dtypes_of(out, blocks)
    raise TypeError("both factors of a layer must be decomposed with the same method")

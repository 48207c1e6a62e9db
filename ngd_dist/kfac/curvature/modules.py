"""The maths of each supported module type: its A and G statistics and its gradient as a matrix.

A layer computes ``y = W a`` per *row*. What a row is depends on the module:

- ``nn.Linear`` on input ``(*lead, d_in)``: every leading index is a sample (a (B, T, d) input is
  B*T samples); ``a`` gets a trailing 1 when the layer has a bias.
- ``nn.Conv2d``: a row is one (sample, output position) pair and ``a`` is the unfolded input patch.
  A is the mean over all rows; G *sums* over positions and averages over samples, so that A (x) G
  approximates the per-sample Fisher (the KFC convention of Grosse & Martens, 2016).
- ``nn.Embedding``: ``a`` is the one-hot token, so A is diagonal (token frequencies) and is kept
  as a vector; the weight is (num_embeddings, dim), so its gradient matrix is transposed to the
  (out, in) orientation the rest of the code uses.

Each helper is stateless; per-layer state lives in :mod:`ngd_dist.kfac.layer`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ModuleMath(ABC):
    """Statistics and gradient layout of one module type."""

    diagonal_a: bool = False
    """Whether A is diagonal (stored as a vector)."""

    @abstractmethod
    def a_dim(self, module: nn.Module) -> int:
        """Side of the A factor."""

    @abstractmethod
    def g_dim(self, module: nn.Module) -> int:
        """Side of the G factor."""

    @abstractmethod
    def a_statistic(self, module: nn.Module, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
        """Sum over rows of ``a a^T`` (or of ``a`` for a diagonal A), and the row count."""

    @abstractmethod
    def g_rows(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        """Output gradients laid out as ``(batch, *rest, d_out)`` (rest may be empty)."""

    @abstractmethod
    def samples(self, g_rows: Tensor) -> int:
        """How many samples the G sum of ``g_rows`` is averaged over."""

    @abstractmethod
    def params(self, module: nn.Module) -> list[Tensor]:
        """The parameters this helper preconditions (weight, then bias if any)."""

    @abstractmethod
    def grad_matrix(self, module: nn.Module) -> Tensor | None:
        """The gradient as a ``(g_dim, a_dim)`` matrix, or None when there is no gradient."""

    @abstractmethod
    def set_grad(self, module: nn.Module, matrix: Tensor) -> None:
        """Write a ``(g_dim, a_dim)`` matrix back into the parameters' ``.grad``."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in float32, or float64 when computed in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bias_column(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def gram(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``rows^T rows`` computed in ``dtype`` and returned in the accumulation dtype.

    In float16 the rows are scaled by ``1/sqrt(n)`` before the product and the mean scaled back
    after it in float32, so a sum over many rows cannot overflow float16's range.
    """
    acc = accumulation_dtype(dtype)
    if dtype != torch.float16:
        x = rows.to(dtype)
        return (x.t() @ x).to(acc)
    n = max(rows.shape[0], 1)
    x = (rows.float() / math.sqrt(n)).to(dtype)
    return (x.t() @ x).to(acc) * n


def g_statistic(g_rows: Tensor, weights: Tensor | None, scale: float, dtype: torch.dtype) -> Tensor:
    """Sum over rows of ``w_r (c g_r)(c g_r)^T``, in the accumulation dtype.

    ``weights`` has the shape of a prefix of ``g_rows``' leading dims (one weight per sample, or per
    token) and is broadcast over the rest; ``scale`` c turns the captured gradients into per-sample
    units (see :class:`ngd_dist.KFACConfig.loss_reduction`). Rows are scaled by ``c sqrt(w_r)`` in
    float32 (or wider) before the product, so large iEF weights meet only small gradients.
    """
    d = g_rows.shape[-1]
    flat = g_rows.reshape(-1, d).to(accumulation_dtype(dtype)) * scale
    if weights is not None:
        lead = g_rows.shape[:-1]
        if tuple(lead[: weights.dim()]) != tuple(weights.shape):
            raise ValueError(
                f"iEF weights of shape {tuple(weights.shape)} (the marked logits' leading dims) do not "
                f"match a layer whose output rows have shape {tuple(lead)}: mark the logits of this "
                "model's loss, whose leading dims must prefix every registered layer's"
            )
        w = weights.reshape(*weights.shape, *([1] * (len(lead) - weights.dim()))).expand(lead)
        flat = flat * w.reshape(-1, 1).to(flat.dtype).sqrt()
    return gram(flat, dtype)


class _WeightBiasMath(ModuleMath):
    """Layout shared by Linear and Conv2d: ``[weight.view(out, -1) | bias]``."""

    def params(self, module: nn.Module) -> list[Tensor]:
        """Weight and bias."""
        weight, bias = module.weight, module.bias
        assert isinstance(weight, Tensor)
        return [weight] + ([bias] if isinstance(bias, Tensor) else [])

    def grad_matrix(self, module: nn.Module) -> Tensor | None:
        """``[dW.view(out, -1) | db]``."""
        weight, *bias = self.params(module)
        if weight.grad is None:
            return None
        m = weight.grad.reshape(weight.shape[0], -1)
        if bias:
            bias_grad = bias[0].grad if bias[0].grad is not None else torch.zeros_like(bias[0])
            m = torch.cat([m, bias_grad.unsqueeze(1)], dim=1)
        return m

    def set_grad(self, module: nn.Module, matrix: Tensor) -> None:
        """Reshape back to the weight's shape and split off the bias."""
        weight, *bias = self.params(module)
        n = weight[0].numel()
        _write(weight, matrix[:, :n].reshape(weight.shape))
        if bias:
            _write(bias[0], matrix[:, -1])


class LinearMath(_WeightBiasMath):
    """``nn.Linear``: rows are all leading indices of the input."""

    def a_dim(self, module: nn.Module) -> int:
        """Input features, plus one for the bias."""
        assert isinstance(module, nn.Linear)
        return module.in_features + (module.bias is not None)

    def g_dim(self, module: nn.Module) -> int:
        """Output features."""
        assert isinstance(module, nn.Linear)
        return module.out_features

    def a_statistic(self, module: nn.Module, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
        """Sum of ``a a^T`` over all rows."""
        a = x.reshape(-1, x.shape[-1])
        if module.bias is not None:
            a = _bias_column(a)
        return gram(a, dtype), a.shape[0]

    def g_rows(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        """The output gradient as it is: ``(*lead, d_out)``."""
        return grad_output

    def samples(self, g_rows: Tensor) -> int:
        """Every leading index is a sample."""
        return math.prod(g_rows.shape[:-1])


class Conv2dMath(_WeightBiasMath):
    """``nn.Conv2d`` with ``groups == 1``: rows are (sample, output position) pairs."""

    def a_dim(self, module: nn.Module) -> int:
        """Patch size ``C_in * kh * kw``, plus one for the bias."""
        assert isinstance(module, nn.Conv2d)
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw + (module.bias is not None)

    def g_dim(self, module: nn.Module) -> int:
        """Output channels."""
        assert isinstance(module, nn.Conv2d)
        return module.out_channels

    def patches(self, module: nn.Conv2d, x: Tensor) -> Tensor:
        """Unfolded input patches, ``(B, positions, C_in * kh * kw)``."""
        padding = module.padding
        if isinstance(padding, str):  # "same" / "valid": pad explicitly, possibly asymmetrically
            x = F.pad(x, module._reversed_padding_repeated_twice)
            padding = (0, 0)
        cols = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
        )
        return cols.transpose(1, 2)

    def a_statistic(self, module: nn.Module, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
        """Sum of ``a a^T`` over every patch of every sample."""
        assert isinstance(module, nn.Conv2d)
        if x.dim() == 3:  # unbatched input
            x = x.unsqueeze(0)
        a = self.patches(module, x.to(dtype)).reshape(-1, self.a_dim(module) - (module.bias is not None))
        if module.bias is not None:
            a = _bias_column(a)
        return gram(a, dtype), a.shape[0]

    def g_rows(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        """``(B, C, H, W)`` to ``(B, H, W, C)``."""
        if grad_output.dim() == 3:
            grad_output = grad_output.unsqueeze(0)
        return grad_output.permute(0, 2, 3, 1)

    def samples(self, g_rows: Tensor) -> int:
        """G sums over positions and averages over the batch."""
        return g_rows.shape[0]


class EmbeddingMath(ModuleMath):
    """``nn.Embedding`` (dense gradients): A is the diagonal of token frequencies."""

    diagonal_a = True

    def a_dim(self, module: nn.Module) -> int:
        """Vocabulary size."""
        assert isinstance(module, nn.Embedding)
        return module.num_embeddings

    def g_dim(self, module: nn.Module) -> int:
        """Embedding dimension."""
        assert isinstance(module, nn.Embedding)
        return module.embedding_dim

    def a_statistic(self, module: nn.Module, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
        """Token counts (the diagonal of the sum of one-hot outer products)."""
        assert isinstance(module, nn.Embedding)
        counts = torch.bincount(x.reshape(-1), minlength=module.num_embeddings)
        return counts.to(accumulation_dtype(dtype)), x.numel()

    def g_rows(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        """The output gradient as it is: ``(*lead, dim)``."""
        return grad_output

    def samples(self, g_rows: Tensor) -> int:
        """Every token is a sample."""
        return math.prod(g_rows.shape[:-1])

    def params(self, module: nn.Module) -> list[Tensor]:
        """The embedding table."""
        assert isinstance(module, nn.Embedding)
        return [module.weight]

    def grad_matrix(self, module: nn.Module) -> Tensor | None:
        """The table's gradient transposed to ``(dim, num_embeddings)``."""
        assert isinstance(module, nn.Embedding)
        grad = module.weight.grad
        return None if grad is None else grad.t()

    def set_grad(self, module: nn.Module, matrix: Tensor) -> None:
        """Transpose back to the table's layout."""
        assert isinstance(module, nn.Embedding)
        _write(module.weight, matrix.t())


def _write(param: Tensor, value: Tensor) -> None:
    if param.grad is None:
        param.grad = value.to(param.dtype).contiguous().clone()
    else:
        param.grad.copy_(value)


MATHS: dict[str, ModuleMath] = {
    "Linear": LinearMath(),
    "Conv2d": Conv2dMath(),
    "Embedding": EmbeddingMath(),
}


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module of a supported type still cannot be preconditioned, or None if it can."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1 is Kronecker-factored)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros')"
    if isinstance(module, nn.Embedding) and module.sparse:
        return "sparse=True (sparse gradients are not preconditioned)"
    if not MATHS[type_name(module)].params(module)[0].requires_grad:
        return "the weight is frozen (requires_grad=False)"
    return None


def type_name(module: nn.Module) -> str:
    """The supported base type a module is an instance of (subclasses count), or ''."""
    for name, cls in (("Linear", nn.Linear), ("Conv2d", nn.Conv2d), ("Embedding", nn.Embedding)):
        if isinstance(module, cls):
            return name
    return ""

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
    """Statistics and gradient layout of one module type: the interface a new layer type implements.

    A Kronecker-factored layer computes ``y = W a`` per *row* (a sample, or a sample's token or
    position); its gradient is handled as one ``(g_dim, a_dim)`` matrix. To precondition a module
    type of your own, subclass this (or :class:`LinearMath`) and register it with
    :func:`ngd_dist.kfac.register_layer_type`.
    """

    diagonal_a: bool = False
    """Whether A is always diagonal (stored as a vector), as for an embedding."""

    elementwise: bool = False
    """Whether the layer has an element-wise (diagonal) curvature instead of two Kronecker factors
    (normalisation layers: see :class:`ngd_dist.kfac.curvature.norms.ElementwiseMath`)."""

    @abstractmethod
    def a_dim(self, module: nn.Module) -> int:
        """Side of the A factor."""

    @abstractmethod
    def g_dim(self, module: nn.Module) -> int:
        """Side of the G factor."""

    @abstractmethod
    def a_statistic(
        self, module: nn.Module, x: Tensor, dtype: torch.dtype, *, diagonal: bool = False
    ) -> tuple[Tensor, int]:
        """Sum over rows of ``a a^T`` (or of ``a * a``, a vector, when ``diagonal``), and the row count."""

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

    def unsupported(self, module: nn.Module) -> str | None:
        """Why this module cannot be preconditioned after all (an unsupported option), or None."""
        return None


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


def square_sum(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """The diagonal of ``rows^T rows`` (column sums of squares), in the accumulation dtype."""
    return rows.to(accumulation_dtype(dtype)).square().sum(dim=0)


def second_moment(rows: Tensor, dtype: torch.dtype, diagonal: bool) -> Tensor:
    """``rows^T rows``, or only its diagonal."""
    return square_sum(rows, dtype) if diagonal else gram(rows, dtype)


def weighted_rows(rows: Tensor, weights: Tensor | None, scale: float, dtype: torch.dtype) -> Tensor:
    """``rows`` flattened to ``(-1, d)`` and scaled by ``c sqrt(w_r)``, in the accumulation dtype.

    ``weights`` has the shape of a prefix of ``rows``' leading dims (one weight per sample, or per
    token) and is broadcast over the rest.
    """
    d = rows.shape[-1]
    flat = rows.reshape(-1, d).to(accumulation_dtype(dtype)) * scale
    if weights is None:
        return flat
    lead = rows.shape[:-1]
    if tuple(lead[: weights.dim()]) != tuple(weights.shape):
        raise ValueError(
            f"per-row weights of shape {tuple(weights.shape)} (the marked logits' leading dims) do not "
            f"match a layer whose output rows have shape {tuple(lead)}: mark the logits of this "
            "model's loss, whose leading dims must prefix every registered layer's"
        )
    w = weights.reshape(*weights.shape, *([1] * (len(lead) - weights.dim()))).expand(lead)
    return flat * w.reshape(-1, 1).to(flat.dtype).sqrt()


def weighted_count(samples: int, weights: Tensor | None, kept: int) -> int:
    """How many of ``samples`` a step's weights keep: rows of weight 0 (ignored tokens) do not count.

    ``weights`` is one value per row of a prefix of the rows' leading dims, ``kept`` of them
    positive (known to the caller: counting here would sync the host once per layer); ``samples`` is
    a multiple of its size (each weight row stands for the same number of samples).
    """
    if weights is None or weights.numel() == 0 or samples % weights.numel():
        return samples
    return samples // weights.numel() * kept


class _WeightBiasMath(ModuleMath):
    """Layout shared by Linear and Conv2d: ``[weight.view(out, -1) | bias]``; A from input rows."""

    @abstractmethod
    def a_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        """The input as ``(rows, a_dim)`` rows ``a`` (with the bias column when there is a bias)."""

    def a_statistic(
        self, module: nn.Module, x: Tensor, dtype: torch.dtype, *, diagonal: bool = False
    ) -> tuple[Tensor, int]:
        """Sum of ``a a^T`` (or of ``a * a``) over all rows."""
        a = self.a_rows(module, x)
        return second_moment(a, dtype, diagonal), a.shape[0]

    def params(self, module: nn.Module) -> list[Tensor]:
        """Weight and bias."""
        weight, bias = module.weight, module.bias
        assert isinstance(weight, Tensor)
        return [weight] + ([bias] if isinstance(bias, Tensor) else [])

    def weight_matrix(self, grad: Tensor) -> Tensor:
        """A weight-shaped tensor as its ``(out, in)`` matrix."""
        return grad.reshape(grad.shape[0], -1)

    def weight_shaped(self, matrix: Tensor, weight: Tensor) -> Tensor:
        """An ``(out, in)`` matrix back in the weight's layout."""
        return matrix.reshape(weight.shape)

    def grad_matrix(self, module: nn.Module) -> Tensor | None:
        """``[dW as (out, in) | db]``."""
        weight, *bias = self.params(module)
        if weight.grad is None:
            return None
        m = self.weight_matrix(weight.grad)
        if bias:
            bias_grad = bias[0].grad if bias[0].grad is not None else torch.zeros_like(bias[0])
            m = torch.cat([m, bias_grad.unsqueeze(1)], dim=1)
        return m

    def set_grad(self, module: nn.Module, matrix: Tensor) -> None:
        """Back to the weight's layout; the last column to the bias."""
        weight, *bias = self.params(module)
        n = matrix.shape[1] - len(bias)
        _write(weight, self.weight_shaped(matrix[:, :n], weight))
        if bias:
            _write(bias[0], matrix[:, -1])


class LinearMath(_WeightBiasMath):
    """``nn.Linear``, or any module with an ``(out, in)`` ``weight`` and an optional ``bias`` that
    computes ``x W^T + b`` on its first argument: rows are all leading indices of the input.
    """

    def a_dim(self, module: nn.Module) -> int:
        """Input features (columns of the ``(out, in)`` weight), plus one for the bias."""
        return int(self.params(module)[0].shape[1]) + (getattr(module, "bias", None) is not None)

    def g_dim(self, module: nn.Module) -> int:
        """Output features (rows of the weight)."""
        return int(self.params(module)[0].shape[0])

    def a_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        """Every leading index of the input is a row; a 1 appended for the bias."""
        a = x.reshape(-1, x.shape[-1])
        return _bias_column(a) if getattr(module, "bias", None) is not None else a

    def g_rows(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        """The output gradient as it is: ``(*lead, d_out)``."""
        return grad_output

    def samples(self, g_rows: Tensor) -> int:
        """Every leading index is a sample."""
        return math.prod(g_rows.shape[:-1])


class TransposedLinearMath(LinearMath):
    """A linear map whose weight is stored ``(in, out)``: ``y = x W + b`` (Hugging Face's ``Conv1D``).

    Matched by class name, so the library never imports ``transformers``: any module whose class
    (or a base class) is named ``Conv1D`` and has a 2-D ``weight`` and a ``bias``.
    """

    def a_dim(self, module: nn.Module) -> int:
        """Input features (rows of the stored weight), plus one for the bias."""
        return int(self.params(module)[0].shape[0]) + (module.bias is not None)

    def g_dim(self, module: nn.Module) -> int:
        """Output features (columns of the stored weight)."""
        return int(self.params(module)[0].shape[1])

    def weight_matrix(self, grad: Tensor) -> Tensor:
        """``(in, out)`` to ``(out, in)``."""
        return grad.t()

    def weight_shaped(self, matrix: Tensor, weight: Tensor) -> Tensor:
        """``(out, in)`` back to ``(in, out)``."""
        return matrix.t()


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

    def a_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        """Every patch of every sample is a row; a 1 appended for the bias."""
        assert isinstance(module, nn.Conv2d)
        if x.dim() == 3:  # unbatched input
            x = x.unsqueeze(0)
        a = self.patches(module, x).reshape(-1, self.a_dim(module) - (module.bias is not None))
        return _bias_column(a) if module.bias is not None else a

    def a_statistic(
        self, module: nn.Module, x: Tensor, dtype: torch.dtype, *, diagonal: bool = False
    ) -> tuple[Tensor, int]:
        """Sum of ``a a^T`` (or ``a * a``) over every patch of every sample, unfolded in ``dtype``."""
        a = self.a_rows(module, x.to(dtype))
        return second_moment(a, dtype, diagonal), a.shape[0]

    def g_rows(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        """``(B, C, H, W)`` to ``(B, H, W, C)``."""
        if grad_output.dim() == 3:
            grad_output = grad_output.unsqueeze(0)
        return grad_output.permute(0, 2, 3, 1)

    def samples(self, g_rows: Tensor) -> int:
        """G sums over positions and averages over the batch."""
        return g_rows.shape[0]

    def unsupported(self, module: nn.Module) -> str | None:
        """Grouped convolutions and non-zero padding modes are not Kronecker-factored here."""
        assert isinstance(module, nn.Conv2d)
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1 is Kronecker-factored)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros')"
        return None


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

    def a_statistic(
        self, module: nn.Module, x: Tensor, dtype: torch.dtype, *, diagonal: bool = False
    ) -> tuple[Tensor, int]:
        """Token counts (the diagonal of the sum of one-hot outer products; A is always diagonal)."""
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

    def unsupported(self, module: nn.Module) -> str | None:
        """Sparse gradients are not preconditioned."""
        assert isinstance(module, nn.Embedding)
        return "sparse=True (sparse gradients are not preconditioned)" if module.sparse else None


def _write(param: Tensor, value: Tensor) -> None:
    """Set ``param.grad`` to ``value`` (a fresh tensor when there is none)."""
    if param.grad is None:
        param.grad = value.to(param.dtype).contiguous().clone()
    else:
        param.grad.copy_(value)

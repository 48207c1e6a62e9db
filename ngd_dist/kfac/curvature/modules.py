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

A bias is the weight of a constant input 1, so ``a`` has a trailing 1 and the gradient matrix a
trailing column ``db``. Neither is ever materialised: A's last row and column are the sums of the
rows and their count, and the gradient is handled as the blocks ``[dW, db]`` (:meth:`ModuleMath.grad_blocks`).

A :class:`RowSample` limits the rows a sum over rows uses (``KFACConfig.statistics_rows``): a
uniform draw without replacement, the sum scaled by ``rows / drawn`` so that it stays unbiased.

Each helper is stateless; per-layer state lives in :mod:`ngd_dist.kfac.layer`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import partial

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

    def sampled_a_statistic(
        self, module: nn.Module, x: Tensor, dtype: torch.dtype, sample: RowSample, *, diagonal: bool = False
    ) -> tuple[Tensor, int]:
        """:meth:`a_statistic` estimated from the rows ``sample`` draws (the count is still that of
        every row), for ``KFACConfig.statistics_rows``. By default every row is used: a type whose
        rows can be drawn overrides it.
        """
        return self.a_statistic(module, x, dtype, diagonal=diagonal)

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

    def grad_blocks(self, module: nn.Module) -> list[Tensor] | None:
        """The gradient matrix as column blocks (their concatenation is :meth:`grad_matrix`), or None.

        What the preconditioner reads every step: a type whose matrix is made of several parameters
        returns views of their ``.grad`` here, so that nothing is copied. By default one block.
        """
        matrix = self.grad_matrix(module)
        return None if matrix is None else [matrix]

    def set_grad_blocks(self, module: nn.Module, blocks: list[Tensor], scale: float = 1.0) -> None:
        """Write blocks shaped as :meth:`grad_blocks`' times ``scale`` into the parameters' ``.grad``."""
        matrix = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        self.set_grad(module, matrix * scale if scale != 1.0 else matrix)

    def unsupported(self, module: nn.Module) -> str | None:
        """Why this module cannot be preconditioned after all (an unsupported option), or None."""
        return None


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in float32, or float64 when computed in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class RowSample:
    """Use at most ``limit`` of the rows of a sum over rows, drawn uniformly without replacement.

    The sum over the drawn rows times ``rows / limit`` is an unbiased estimate of the sum over all
    rows. ``generator`` (a CPU one) makes the draw reproducible.
    """

    limit: int
    generator: torch.Generator

    def draw(self, rows: int, device: torch.device) -> Tensor | None:
        """Indices of the rows to use among ``rows``, on ``device``; None when all are used."""
        if rows <= self.limit:
            return None
        return torch.randperm(rows, generator=self.generator)[: self.limit].to(device)


def column_gram(cols: Tensor, dtype: torch.dtype) -> Tensor:
    """``cols cols^T`` (the sum of ``a a^T`` over the columns ``a``), computed in ``dtype`` and
    returned in the accumulation dtype.

    In float16 the columns are scaled by ``1/sqrt(n)`` before the product and the mean scaled back
    after it in float32, so a sum over many columns cannot overflow float16's range.
    """
    acc = accumulation_dtype(dtype)
    if dtype != torch.float16:
        x = cols.to(dtype)
        return (x @ x.t()).to(acc)
    n = max(cols.shape[1], 1)
    x = (cols.float() / math.sqrt(n)).to(dtype)
    return (x @ x.t()).to(acc) * n


def gram(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``rows^T rows`` computed in ``dtype`` and returned in the accumulation dtype (:func:`column_gram`)."""
    return column_gram(rows.t(), dtype)


def square_sum(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """The diagonal of ``rows^T rows`` (column sums of squares), in the accumulation dtype."""
    return rows.to(accumulation_dtype(dtype)).square().sum(dim=0)


def second_moment(rows: Tensor, dtype: torch.dtype, diagonal: bool) -> Tensor:
    """``rows^T rows``, or only its diagonal."""
    return square_sum(rows, dtype) if diagonal else gram(rows, dtype)


def with_bias(moment: Tensor, sums: Tensor | None, count: int) -> Tensor:
    """The second moment of the rows ``[a, 1]`` from that of the rows ``a``: the bias entry's row and
    column are ``sums`` (the sum of the rows), its corner ``count``. ``moment`` may be a diagonal
    (a vector; ``sums`` is then not needed).
    """
    d = moment.shape[0]
    if moment.dim() == 1:
        out = moment.new_empty(d + 1)
        out[:d] = moment
        out[d] = count
        return out
    assert sums is not None
    out = moment.new_empty(d + 1, d + 1)
    out[:d, :d] = moment
    out[:d, d] = sums
    out[d, :d] = sums
    out[d, d] = count
    return out


def weighted_rows(
    rows: Tensor, weights: Tensor | None, scale: float, dtype: torch.dtype, sample: RowSample | None = None
) -> Tensor:
    """``rows`` flattened to ``(-1, d)`` and scaled by ``c sqrt(w_r)``, in the accumulation dtype.

    ``weights`` has the shape of a prefix of ``rows``' leading dims (one weight per sample, or per
    token) and is broadcast over the rest. ``sample``: only the rows it draws, scaled by a further
    ``sqrt(rows / drawn)``, so that their second moment estimates that of every row without bias.
    """
    d = rows.shape[-1]
    lead = rows.shape[:-1]
    if weights is not None and tuple(lead[: weights.dim()]) != tuple(weights.shape):
        raise ValueError(
            f"per-row weights of shape {tuple(weights.shape)} (the marked logits' leading dims) do not "
            f"match a layer whose output rows have shape {tuple(lead)}: mark the logits of this "
            "model's loss, whose leading dims must prefix every registered layer's"
        )
    total = math.prod(lead)
    keep = sample.draw(total, rows.device) if sample is not None else None
    acc = accumulation_dtype(dtype)
    if keep is not None:  # the drawn rows, each with its own weight
        index = torch.unravel_index(keep, lead)
        rows = rows[index]
        weights = None if weights is None else weights[index[: weights.dim()]]
        scale *= math.sqrt(total / keep.numel())
    # One pass: read the rows in their own layout (a conv's (B, H, W, C) view, say), write them
    # contiguous and scaled in the accumulation dtype.
    factor = torch.full([1] * rows.dim(), scale, dtype=acc, device=rows.device)
    if weights is not None:
        w = weights.to(acc).sqrt()
        factor = factor * w.reshape(*w.shape, *([1] * (rows.dim() - w.dim())))
    out = torch.empty(rows.shape, dtype=acc, device=rows.device)
    torch.mul(rows.detach(), factor, out=out)
    return out.view(-1, d)


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
    def a_columns(
        self, module: nn.Module, x: Tensor, dtype: torch.dtype, sample: RowSample | None = None
    ) -> tuple[Tensor, int, Tensor | None]:
        """The input's rows ``a`` (without the bias entry) as the columns of a ``(d_in, n)`` matrix --
        every row, or those ``sample`` draws -- how many rows the input has, and None, or the order
        ``o`` of the columns' entries when it is not the weight's (entry ``t`` is row ``o[t]``). The
        columns may be built in ``dtype``, the dtype of the statistic.
        """

    def a_statistic(
        self, module: nn.Module, x: Tensor, dtype: torch.dtype, *, diagonal: bool = False
    ) -> tuple[Tensor, int]:
        """Sum of ``a a^T`` (or of ``a * a``) over all rows; with a bias, its row and column are the
        sums of the rows and its corner their count (no column of ones is built).
        """
        return self._a_moment(module, x, dtype, None, diagonal)

    def sampled_a_statistic(
        self, module: nn.Module, x: Tensor, dtype: torch.dtype, sample: RowSample, *, diagonal: bool = False
    ) -> tuple[Tensor, int]:
        """The unbiased estimate of :meth:`a_statistic` from the rows ``sample`` draws."""
        return self._a_moment(module, x, dtype, sample, diagonal)

    def _a_moment(
        self, module: nn.Module, x: Tensor, dtype: torch.dtype, sample: RowSample | None, diagonal: bool
    ) -> tuple[Tensor, int]:
        cols, rows, order = self.a_columns(module, x, dtype, sample)
        drawn = cols.shape[1]
        if diagonal:
            moment = cols.to(accumulation_dtype(dtype)).square().sum(dim=1)
        else:
            moment = column_gram(cols, dtype)
        bias = getattr(module, "bias", None) is not None
        sums = cols.sum(dim=1, dtype=moment.dtype) if bias and not diagonal else None
        if order is not None:
            moment = moment[order] if diagonal else moment[order][:, order]
            sums = None if sums is None else sums[order]
        if bias:
            moment = with_bias(moment, sums, drawn)
        if drawn != rows:
            moment = moment * (rows / max(drawn, 1))
        return moment, rows

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

    def grad_blocks(self, module: nn.Module) -> list[Tensor] | None:
        """``[dW as (out, in), db as (out, 1)]``, views of the gradients (zeros for a bias without one)."""
        weight, *bias = self.params(module)
        if weight.grad is None:
            return None
        blocks = [self.weight_matrix(weight.grad)]
        if bias:
            grad = bias[0].grad if bias[0].grad is not None else torch.zeros_like(bias[0])
            blocks.append(grad.unsqueeze(1))
        return blocks

    def set_grad_blocks(self, module: nn.Module, blocks: list[Tensor], scale: float = 1.0) -> None:
        """``scale`` times the weight block to the weight's ``.grad``, times the bias block to the bias'."""
        weight, *bias = self.params(module)
        _write(weight, self.weight_shaped(blocks[0], weight), scale)
        if bias:
            _write(bias[0], blocks[1][:, 0], scale)

    def grad_matrix(self, module: nn.Module) -> Tensor | None:
        """``[dW as (out, in) | db]``."""
        blocks = self.grad_blocks(module)
        if blocks is None:
            return None
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)

    def set_grad(self, module: nn.Module, matrix: Tensor) -> None:
        """Back to the weight's layout; the last column to the bias."""
        n = matrix.shape[1] - (len(self.params(module)) - 1)
        self.set_grad_blocks(module, [matrix[:, :n], matrix[:, n:]] if n < matrix.shape[1] else [matrix])


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

    def a_columns(
        self, module: nn.Module, x: Tensor, dtype: torch.dtype, sample: RowSample | None = None
    ) -> tuple[Tensor, int, Tensor | None]:
        """Every leading index of the input is a row: the ``(rows, d_in)`` input transposed (a view
        when the input is contiguous), or the drawn rows of it.
        """
        rows = x.reshape(-1, x.shape[-1])
        keep = sample.draw(rows.shape[0], x.device) if sample is not None else None
        return (rows if keep is None else rows.index_select(0, keep)).t(), rows.shape[0], None

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


def _conv_patches(
    x: Tensor,
    keep: Tensor,
    out_size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    pads: tuple[int, ...],
) -> tuple[Tensor, Tensor]:
    """The patches of the output positions ``keep`` (indices into ``B x H_out x W_out``) of a
    convolution over ``x`` ``(B, C, H, W)``, as rows ``(len(keep), kh * kw * C)`` and the order of
    their entries in the weight's ``(C, kh, kw)`` order (entry ``t`` is the weight's ``order[t]``).

    Read from a channels-last view of ``x`` (a copy unless ``x`` is channels-last already), whole
    channel vectors at a time, without padding it: the window entries that fall in the zero padding
    (``pads`` as ``F.pad`` takes them: left, right, top, bottom) are masked to zero.
    """
    (ho, wo), (kh, kw), (sh, sw), (dh, dw) = out_size, kernel, stride, dilation
    batch, channels, height, width = x.shape
    arange = partial(torch.arange, device=x.device)
    sample_index, position = keep // (ho * wo), keep % (ho * wo)
    ys = (position // wo * sh - pads[2])[:, None] + arange(kh) * dh  # (drawn, kh) input rows
    xs = (position % wo * sw - pads[0])[:, None] + arange(kw) * dw  # (drawn, kw) input columns
    pixel = (sample_index[:, None, None] * height + ys.clamp(0, height - 1)[:, :, None]) * width + xs.clamp(
        0, width - 1
    )[:, None, :]  # (drawn, kh, kw)
    pixels = x.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
    picked = pixels.index_select(0, pixel.reshape(-1)).view(len(keep), kh, kw, channels)
    if any(pads):
        inside = ((ys >= 0) & (ys < height))[:, :, None] & ((xs >= 0) & (xs < width))[:, None, :]
        picked = picked * inside[..., None]
    order = arange(channels * kh * kw).view(kh, kw, channels).permute(2, 0, 1).reshape(-1)
    return picked.view(len(keep), -1), order


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

    def a_columns(
        self, module: nn.Module, x: Tensor, dtype: torch.dtype, sample: RowSample | None = None
    ) -> tuple[Tensor, int, Tensor | None]:
        """Every patch of every sample is a row: the patches as columns, built in ``dtype``.

        All of them: ``(C_in * kh * kw, B * positions)``, in the weight's ``(C_in, kh, kw)`` order,
        from one strided copy of the padded input (no ``F.unfold``, no transposed copy). Drawn ones:
        gathered as rows ``(drawn, kh * kw * C_in)`` from a channels-last view of the unpadded input
        (:func:`_conv_patches`: padding entries masked to zero) and returned transposed, with the
        order of their ``(kh, kw, C_in)`` entries.
        """
        assert isinstance(module, nn.Conv2d)
        x = x.to(dtype)
        if x.dim() == 3:  # unbatched input
            x = x.unsqueeze(0)
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        pads = conv_pads(module)
        batch, channels, height, width = x.shape
        hp, wp = height + pads[2] + pads[3], width + pads[0] + pads[1]
        ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
        rows, side = batch * ho * wo, channels * kh * kw
        keep = sample.draw(rows, x.device) if sample is not None else None
        if keep is None:
            padded = F.pad(x, tuple(pads)) if any(pads) else x
            spans = dh * (kh - 1) + 1, dw * (kw - 1) + 1
            windows = padded.unfold(2, spans[0], sh).unfold(3, spans[1], sw)[..., ::dh, ::dw]
            # (B, C, Ho, Wo, kh, kw) -> (C, kh, kw, B, Ho, Wo): the one copy
            return windows.permute(1, 4, 5, 0, 2, 3).reshape(side, rows), rows, None
        picked, order = _conv_patches(x, keep, (ho, wo), (kh, kw), (sh, sw), (dh, dw), pads)
        return picked.t(), rows, order

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


def conv_pads(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """The zero padding ``module`` adds to its input, as ``F.pad`` takes it: (left, right, top, bottom).

    ``padding="same"`` pads ``dilation x (kernel - 1)`` in all along a side, the extra one (when it
    is odd) on the right or bottom, as ``nn.Conv2d`` does; ``"valid"`` pads nothing.
    """
    if module.padding == "valid":
        return (0, 0, 0, 0)
    if module.padding == "same":
        sides = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size), strict=True):
            total = d * (k - 1)
            sides += [total // 2, total - total // 2]
        return (sides[0], sides[1], sides[2], sides[3])
    padding = module.padding
    assert not isinstance(padding, str), padding
    ph, pw = padding
    return (pw, pw, ph, ph)


def _write(param: Tensor, value: Tensor, scale: float = 1.0) -> None:
    """Set ``param.grad`` to ``scale * value`` (a fresh tensor when there is none)."""
    if param.grad is None:
        param.grad = (value * scale if scale != 1.0 else value).to(param.dtype).contiguous().clone()
    elif scale == 1.0:
        param.grad.copy_(value)
    else:
        torch.mul(value, scale, out=param.grad)

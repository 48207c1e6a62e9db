"""Normalisation layers: an element-wise (diagonal) curvature for their scale and shift.

A normalisation layer computes ``y = gamma * x_hat + beta`` with ``x_hat`` the normalised input, so
the gradient of one row (a sample, or a token for LayerNorm / RMSNorm) is ``g * x_hat`` for the scale
and ``g`` for the shift, summed over the dims the scale is shared by (the positions, for BatchNorm
and GroupNorm). Its curvature is the diagonal ``E_n[u_n * u_n]`` of those per-row gradients under
the chosen curvature (EF, sampled Fisher or iEF weighting), as kfac-jax's scale-and-shift blocks
do. In the preconditioner's terms such a layer has a diagonal A of side ``P`` (its parameter count)
and a 1 x 1 G equal to 1, so the eigen form applies ``u / (diag + lambda)`` exactly.

``x_hat`` is recomputed from the input in the forward hook (with the layer's own eps; BatchNorm with
the batch's statistics, as in training) on the steps that gather statistics, and kept until the
backward pass has passed the layer.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngd_dist.kfac.curvature.modules import ModuleMath, _write


class ElementwiseMath(ModuleMath):
    """A layer ``y = weight * x_hat (+ bias)`` whose curvature is the diagonal of its per-row gradients."""

    diagonal_a = True
    elementwise = True

    def a_dim(self, module: nn.Module) -> int:
        """The number of parameters: the scale's, plus the shift's."""
        return sum(p.numel() for p in self.params(module))

    def g_dim(self, module: nn.Module) -> int:
        """1: G is the constant 1 x 1 factor."""
        return 1

    @abstractmethod
    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        """The input normalised as the layer does it, before scale and shift (``x_hat``)."""

    @abstractmethod
    def sample_grads(self, module: nn.Module, x_hat: Tensor, grad_output: Tensor) -> Tensor:
        """Per-row gradients of ``[weight | bias]`` flattened: ``(*lead, P)``."""

    def a_statistic(
        self, module: nn.Module, x: Tensor, dtype: torch.dtype, *, diagonal: bool = False
    ) -> tuple[Tensor, int]:
        """Not used: the statistic needs the backward pass (see :meth:`sample_grads`)."""
        raise TypeError(f"{type(self).__name__}: element-wise layers gather their statistics in backward")

    def g_rows(self, module: nn.Module, grad_output: Tensor) -> Tensor:
        """Not used: see :meth:`sample_grads`."""
        raise TypeError(f"{type(self).__name__}: element-wise layers gather their statistics in backward")

    def samples(self, g_rows: Tensor) -> int:
        """Every leading index of the per-row gradients is a sample."""
        return math.prod(g_rows.shape[:-1])

    def params(self, module: nn.Module) -> list[Tensor]:
        """The scale, then the shift when there is one."""
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        return [p for p in (weight, bias) if isinstance(p, Tensor)]

    def grad_matrix(self, module: nn.Module) -> Tensor | None:
        """``[d weight | d bias]`` flattened into one ``(1, P)`` row."""
        params = self.params(module)
        if params[0].grad is None:
            return None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        return torch.cat([g.reshape(-1) for g in grads]).unsqueeze(0)

    def set_grad(self, module: nn.Module, matrix: Tensor) -> None:
        """Split the ``(1, P)`` row back into the scale's and the shift's gradients."""
        offset = 0
        for p in self.params(module):
            _write(p, matrix[0, offset : offset + p.numel()].reshape(p.shape))
            offset += p.numel()

    def unsupported(self, module: nn.Module) -> str | None:
        """A layer without a scale has nothing to precondition."""
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            return "no learnable scale (elementwise_affine=False / affine=False)"
        return None


class _LastDimsMath(ElementwiseMath):
    """Scale and shift over the last ``len(normalized_shape)`` dims; every leading index is a row."""

    def sample_grads(self, module: nn.Module, x_hat: Tensor, grad_output: Tensor) -> Tensor:
        """``[g * x_hat | g]`` per leading index."""
        k = self.params(module)[0].dim()
        lead = grad_output.shape[: grad_output.dim() - k]
        parts = [(grad_output * x_hat).reshape(*lead, -1)]
        if len(self.params(module)) > 1:
            parts.append(grad_output.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)


class LayerNormMath(_LastDimsMath):
    """``nn.LayerNorm``: rows are all leading indices (each token of a sequence is a row)."""

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        """``(x - mean) / sqrt(var + eps)`` over the normalised dims."""
        assert isinstance(module, nn.LayerNorm)
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


class RMSNormMath(_LastDimsMath):
    """``nn.RMSNorm`` and RMSNorm-style modules (a class named ``*RMSNorm`` with a ``weight`` over the
    last dim and ``eps`` or ``variance_epsilon``): ``x_hat = x / sqrt(mean(x^2) + eps)``.

    A module that scales by ``1 + weight`` has the same gradient with respect to ``weight``.
    """

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        """``x / sqrt(mean(x^2) + eps)`` over the scale's dims, in float32 or wider."""
        k = self.params(module)[0].dim()
        eps = getattr(module, "eps", None)
        if eps is None:
            eps = getattr(module, "variance_epsilon", None)
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        if eps is None:
            eps = torch.finfo(wide.dtype).eps
        dims = tuple(range(wide.dim() - k, wide.dim()))
        return wide * torch.rsqrt(wide.square().mean(dim=dims, keepdim=True) + float(eps))


class _ChannelMath(ElementwiseMath):
    """Scale and shift per channel (dim 1), shared over positions: rows are samples."""

    def sample_grads(self, module: nn.Module, x_hat: Tensor, grad_output: Tensor) -> Tensor:
        """``[sum_pos g * x_hat | sum_pos g]`` per sample."""
        if grad_output.dim() == 1:  # an unbatched (C,) input
            grad_output, x_hat = grad_output.unsqueeze(0), x_hat.unsqueeze(0)
        positions = tuple(range(2, grad_output.dim()))
        parts = [(grad_output * x_hat).sum(dim=positions) if positions else grad_output * x_hat]
        if len(self.params(module)) > 1:
            parts.append(grad_output.sum(dim=positions) if positions else grad_output)
        return torch.cat(parts, dim=-1)


class BatchNormMath(_ChannelMath):
    """``nn.BatchNorm1d/2d/3d`` in training mode: ``x_hat`` from the batch's statistics."""

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        """``(x - batch mean) / sqrt(batch var + eps)`` per channel (biased variance, as in training)."""
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        return F.batch_norm(x, None, None, training=True, momentum=0.0, eps=module.eps)


class GroupNormMath(_ChannelMath):
    """``nn.GroupNorm``: ``x_hat`` from each sample's group statistics."""

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        """``(x - group mean) / sqrt(group var + eps)`` per sample and group."""
        assert isinstance(module, nn.GroupNorm)
        return F.group_norm(x, module.num_groups, None, None, module.eps)

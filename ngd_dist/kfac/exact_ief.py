"""Exact improved-empirical-Fisher updates for small parameter sets (Wu et al. 2024, Eq. 8).

For a batch of N samples with per-sample losses l_n, per-sample gradients J (N x P) and
s_n = ||dl_n/dz_n||^2 (z_n the sample's logits), the iEF update direction is

    delta = J^T (J J^T + lambda I)^-1 s,

solved in float64 through the N x N Gram matrix, so it costs O(N^2 P + N^3) and suits heads,
adapters and prompt parameters (N << P). Note that with lambda > 0 this is *not*
(F_iEF + lambda I)^-1 grad L, which equals J^T (J J^T + lambda diag(s))^-1 s; the two agree as
lambda -> 0 (:func:`damped_ief_direction` gives the latter).

The loss must be separable over samples (no BatchNorm in training mode, no in-batch negatives),
since per-sample gradients are taken with ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]
"""Per-sample losses from (logits, targets), shape (N,)."""


def _per_sample_ce(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


def exact_ief_direction(jacobian: Tensor, s: Tensor, damping: float) -> Tensor:
    """Eq. 8 of the iEF paper: ``J^T (J J^T + damping I)^-1 s`` (float64 solve), shape (P,)."""
    j = jacobian.double()
    gram = j @ j.t() + damping * torch.eye(j.shape[0], dtype=j.dtype, device=j.device)
    return (j.t() @ torch.linalg.solve(gram, s.double())).to(jacobian.dtype)


def damped_ief_direction(jacobian: Tensor, s: Tensor, damping: float) -> Tensor:
    """``(J^T diag(s)^-1 J + damping I)^-1 J^T 1`` via Woodbury: ``J^T (J J^T + damping diag(s))^-1 s``."""
    j = jacobian.double()
    gram = j @ j.t() + damping * torch.diag(s.double())
    return (j.t() @ torch.linalg.solve(gram, s.double())).to(jacobian.dtype)


def per_sample_gradients(
    model: nn.Module,
    names: list[str],
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn = _per_sample_ce,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample gradients J, squared logit-gradient norms s, and per-sample losses.

    J is (N x P), the named parameters' gradients flattened in ``names`` order; s and the losses
    are (N,).
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    chosen = {n: params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in params.items() if n not in chosen}

    def sample_loss(theta: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**frozen, **buffers, **theta}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0)).sum()

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(chosen, inputs, targets)
    jacobian = torch.cat([grads[n].reshape(inputs.shape[0], -1) for n in names], dim=1)
    logits = functional_call(model, {**frozen, **buffers, **chosen}, (inputs,)).detach()
    logits.requires_grad_(True)
    losses = loss_fn(logits, targets)
    (logit_grads,) = torch.autograd.grad(losses.sum(), logits)
    s = logit_grads.reshape(inputs.shape[0], -1).square().sum(dim=1)
    return jacobian, s, losses.detach()


class ExactIEF:
    """An optimizer mode for small parameter sets: writes the exact iEF direction into ``.grad``.

    Use with plain SGD (no momentum, no weight decay, as in the paper's Alg. 1)::

        ief = ExactIEF(model, ["head.weight", "head.bias"], damping=1e-7)
        opt = torch.optim.SGD(ief.parameters(), lr=...)
        loss = ief.compute(x, y); opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str] | None = None,
        *,
        damping: float = 1e-7,
        loss_fn: LossFn = _per_sample_ce,
    ) -> None:
        """Choose the parameters (by name; default all trainable ones) and the damping."""
        params = dict(model.named_parameters())
        self.names = list(names) if names is not None else [n for n, p in params.items() if p.requires_grad]
        unknown = [n for n in self.names if n not in params]
        if unknown:
            raise ValueError(f"ExactIEF.names: {unknown} are not parameters of the model")
        if not (damping >= 0):
            raise ValueError(f"ExactIEF.damping: got {damping!r}; expected a number >= 0")
        self.model, self.damping, self.loss_fn = model, damping, loss_fn

    def parameters(self) -> list[nn.Parameter]:
        """The parameters whose ``.grad`` :meth:`compute` writes."""
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.names]

    def compute(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Set each chosen parameter's ``.grad`` to its slice of the iEF direction.

        Returns the mean loss of the batch.
        """
        jacobian, s, losses = per_sample_gradients(self.model, self.names, inputs, targets, self.loss_fn)
        direction = exact_ief_direction(jacobian, s, self.damping)
        offset = 0
        for p in self.parameters():
            n = p.numel()
            p.grad = direction[offset : offset + n].reshape(p.shape).to(p.dtype).clone()
            offset += n
        return losses.mean()

"""Optimizers of the training service (SGD, AdamW, the large-batch LARS and LAMB) and the learning
rate a job's schedule gives at each step (:func:`lr_at`).

LARS (You et al., 2017) scales each weight matrix's step by ``trust * ||w|| / (||g|| + wd ||w||)``
before momentum; LAMB (You et al., 2019) scales each AdamW update by ``||w|| / ||update||``. Both
apply the layer-wise ratio to parameters with more than one dimension and leave biases and
normalisation parameters with the plain step, as is usual. With the K-FAC preconditioner on, they
act on the preconditioned gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import Tensor, nn


def _trust(w_norm: Tensor, u_norm: Tensor) -> Tensor:
    return torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        """Standard LARS hyper-parameters; ``trust_coefficient`` is eta in the paper."""
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One LARS step."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.dim() > 1:
                    w_norm, g_norm = p.norm(), g.norm()
                    wd = group["weight_decay"]
                    ratio = group["trust_coefficient"] * _trust(w_norm, g_norm + wd * w_norm)
                    g = (g + wd * p) * ratio
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


class LAMB(torch.optim.Optimizer):
    """AdamW moments with a layer-wise trust ratio ``||w|| / ||update||``."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        """Standard LAMB hyper-parameters."""
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One LAMB step."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"]) + group["weight_decay"] * p
                if p.dim() > 1:
                    update = update * _trust(p.norm(), update.norm())
                p.add_(update, alpha=-group["lr"])
        return loss


def build_optimizer(spec: Any, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer a job's ``optimizer`` section names, over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.name == "adamw":
        return torch.optim.AdamW(
            params, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, weight_decay=spec.weight_decay
        )
    if spec.name == "lars":
        return LARS(
            params,
            lr=spec.lr,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
            trust_coefficient=spec.trust_coefficient,
        )
    if spec.name == "lamb":
        return LAMB(params, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, weight_decay=spec.weight_decay)
    raise ValueError(f"optimizer.name: got {spec.name!r}; expected one of sgd, adamw, lars, lamb")


class LRSchedule(Protocol):
    """What :func:`lr_at` reads of a learning-rate schedule (a job's ``schedule`` section)."""

    @property
    def name(self) -> str: ...

    @property
    def warmup_steps(self) -> int: ...

    @property
    def min_lr(self) -> float: ...

    @property
    def decay_steps(self) -> int | None: ...

    @property
    def gamma(self) -> float: ...


def lr_at(schedule: LRSchedule, step: int, *, base_lr: float, total_steps: int) -> float:
    """Learning rate of the 0-based optimizer ``step`` of a ``total_steps`` run peaking at ``base_lr``.

    A linear warm-up from ``base_lr / warmup_steps`` to ``base_lr``, then ``"constant"``;
    ``"cosine"`` or ``"linear"`` decay to ``min_lr`` at ``total_steps``; or ``"step"``: times
    ``gamma`` every ``decay_steps``, floored at ``min_lr``.
    """
    if step < schedule.warmup_steps:
        return base_lr * (step + 1) / schedule.warmup_steps
    after = step - schedule.warmup_steps
    if schedule.name == "constant":
        return base_lr
    if schedule.name == "step":
        if schedule.decay_steps is None:
            raise ValueError(
                "schedule.decay_steps: got None; expected an integer >= 1 (the step schedule needs it)"
            )
        return max(schedule.min_lr, base_lr * schedule.gamma ** (after // schedule.decay_steps))
    span = max(1, total_steps - schedule.warmup_steps)
    t = min(1.0, after / span)
    if schedule.name == "cosine":
        return schedule.min_lr + (base_lr - schedule.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule.name == "linear":
        return base_lr + (schedule.min_lr - base_lr) * t
    raise ValueError(f"schedule.name: got {schedule.name!r}; expected one of constant, cosine, linear, step")

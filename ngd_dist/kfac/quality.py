"""The update-quality indicator γ of the iEF paper (Wu et al. 2024, Eq. 15), on a probe batch.

For an update direction ``d`` (a vector in parameter space), the loss ``L`` of a probe batch and
its Gauss-Newton matrix ``F`` at the same parameters,

    γ(d) = (dᵀ F d)^½ / |dᵀ ∇L|.

Lower is better. Under the quadratic model ``L(θ + αd) ≈ L + α dᵀ∇L + ½ α² dᵀFd`` the best
reduction along ``d`` (at ``α* = -dᵀ∇L / dᵀFd``) is ``(dᵀ∇L)² / (2 dᵀFd) = 1 / (2γ²)``, and by
Cauchy-Schwarz in the ``F`` inner product ``γ(d) >= (∇Lᵀ F⁺ ∇L)^-½``, with equality exactly for
the natural-gradient direction ``d ∝ F⁺∇L``. γ is invariant to the scale of ``d``
(``γ(αd) = γ(d)`` for every ``α != 0``), so the learning rate, the KL clip and the sign of the
update do not enter it: it measures the direction only.

Conventions (:func:`quality_indicator`):

- **Mean reduction, as in training.** ``L = (1/N) Σ_n l_n`` over the ``N`` loss rows (samples for
  classification, tokens for a language model) and ``F = (1/N) Σ_n J_nᵀ H_n J_n`` with ``J_n`` the
  Jacobian of row ``n``'s logits with respect to the parameters and ``H_n = ∇²_z l_n``:
  ``diag(p_n) - p_n p_nᵀ`` for softmax cross-entropy (where the Gauss-Newton matrix *is* the Fisher)
  and ``I`` for the squared error ``l_n = ½‖z_n - y_n‖²``. ``F`` is the Gauss-Newton matrix of the
  very loss whose gradient is ``∇L``, so γ is well defined. The paper sums over samples instead;
  its value is ``γ_sum = γ_mean / √N``, and γ_mean does not shrink with the probe size.
- **No backward pass.** One Jacobian-vector product gives the logits ``z`` and ``u_n = J_n d``;
  then ``dᵀFd = (1/N) Σ_n u_nᵀ H_n u_n`` and, by the chain rule, ``dᵀ∇L = Σ_n (∇_{z_n} L)ᵀ u_n``.
  The product is forward-mode (``torch.func.jvp``, about 2-3 forward passes) or, where an operator
  has no forward derivative, the double-backward trick (``u = ∂/∂w [(Jᵀw)ᵀ d]``). Attention runs on
  the math backend of ``scaled_dot_product_attention``, which has both derivatives.
- **Nothing in training changes.** The model is evaluated through
  ``torch.func.functional_call`` at the given parameter values with copies of its buffers, in
  inference mode (dropout off, BatchNorm on its running statistics: the global RNG is not drawn
  from, running statistics are not updated, and K-FAC's capture hooks, which only record modules in
  training mode, stay idle); each module's ``training`` flag is restored afterwards; ``.grad`` is
  never written.

:class:`QualityProbe` is what the training worker uses: a fixed probe batch drawn once, a snapshot
of the parameters before a step, and γ of the update the step applied (``θ_after - θ_before``:
base optimizer, momentum, learning rate, weight decay, KL clip and preconditioner together),
evaluated at ``θ_before``, where that update was chosen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ngd_dist.kfac.capture import statistics_paused
from ngd_dist.kfac.outputs import IGNORE_INDEX, logits_of

LossKind = Literal["classification", "language_model", "mse"]
"""``classification``: logits ``(N, C)`` against int64 labels ``(N,)``; ``language_model``: logits
``(B, T, V)`` against next-token ids ``(B, T)`` (every token a loss row; targets equal to
``ignore_index`` are left out, as ``F.cross_entropy`` does); ``mse``: outputs ``(N, ...)`` against
targets of the same shape, ``l_n = ½‖z_n - y_n‖²``."""

LOSS_KINDS: tuple[LossKind, ...] = ("classification", "language_model", "mse")

Method = Literal["auto", "jvp", "double_backward"]
METHODS: tuple[Method, ...] = ("auto", "jvp", "double_backward")

Direction = Mapping[str, Tensor] | Sequence[Tensor]
"""Parameter name -> tensor (missing names move by zero), or one tensor per entry of
``model.named_parameters()``, in that order."""


@dataclass(frozen=True)
class Quality:
    """γ and what it is made of (mean-reduction convention, see the module docstring)."""

    gamma: float
    """``(dᵀFd)^½ / |dᵀ∇L|``; inf when ``dᵀ∇L = 0 < dᵀFd``, nan when both are 0."""
    curvature: float
    """``dᵀFd`` (>= 0)."""
    slope: float
    """``dᵀ∇L``: negative for a direction that lowers the probe loss to first order."""
    loss: float
    """The probe loss ``L`` at the evaluated parameters."""
    rows: int
    """``N``: loss rows of the probe (samples, or tokens for a language model)."""


def quality_indicator(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    direction: Direction,
    *,
    loss: LossKind = "classification",
    params: Mapping[str, Tensor] | None = None,
    method: Method = "auto",
) -> Quality:
    """γ(d) of the iEF paper's Eq. 15 for ``model`` on the probe batch ``(inputs, targets)``.

    Args:
        model: the network; ``model(inputs)`` returns the logits (or outputs for ``mse``), or an
            output holding them (``.logits`` of a transformers ModelOutput, or a tuple's first).
        inputs: the probe inputs.
        targets: the probe targets (see :data:`LossKind`).
        direction: the update direction ``d`` (see :data:`Direction`); parameters it leaves out
            are held fixed.
        loss: which loss ``L`` and Gauss-Newton matrix ``F`` (see :data:`LossKind`).
        params: parameter values at which to evaluate, by name (default: the model's current ones;
            names left out take the current value).
        method: ``"jvp"`` (forward mode), ``"double_backward"``, or ``"auto"``: forward mode, and
            double backward if an operator lacks a forward derivative.

    Returns:
        A :class:`Quality`. Nothing of the model changes (parameters, buffers, ``.grad``, modes).

    Raises:
        ValueError: an unknown ``loss`` or ``method``, a direction whose names or shapes do not
            match the parameters, or targets that do not fit the logits.
    """
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss: got {loss!r}; expected one of {LOSS_KINDS}")
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}; expected one of {METHODS}")
    named = dict(model.named_parameters())
    tangents = _named_direction(direction, named)
    given = params or {}
    values = {n: _widened(given.get(n, p).detach()) for n, p in named.items()}
    primals = {n: values[n] for n in tangents}
    fixed: dict[str, Tensor] = {n: v for n, v in values.items() if n not in tangents}
    fixed.update((n, _widened(b.detach()).clone()) for n, b in model.named_buffers())
    tangents = {n: t.detach().to(primals[n].device, primals[n].dtype) for n, t in tangents.items()}
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH), statistics_paused():
            logits, u = _logits_and_jvp(model, inputs, fixed, primals, tangents, method)
    finally:
        for module, mode in modes:
            module.training = mode
    return _indicator(logits, u, targets, loss)


def _widened(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 when it is a 16-bit float (bf16 weights under DeepSpeed), else as is.

    The probe runs in at least float32 whatever the training precision, so γ measures the update,
    not the rounding of a 16-bit forward pass.
    """
    if tensor.is_floating_point() and tensor.element_size() < 4:
        return tensor.float()
    return tensor


def _named_direction(direction: Direction, named: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The direction as parameter name -> tensor, checked against the parameters."""
    if isinstance(direction, Mapping):
        unknown = [n for n in direction if n not in named]
        if unknown:
            raise ValueError(f"direction: {unknown[:5]} are not parameters of the model")
        pairs = [(n, direction[n]) for n in named if n in direction]
    else:
        tensors = list(direction)
        if len(tensors) != len(named):
            raise ValueError(
                f"direction: got {len(tensors)} tensors; expected one per parameter ({len(named)}), "
                "in model.named_parameters() order"
            )
        pairs = list(zip(named, tensors, strict=True))
    for name, tensor in pairs:
        if tuple(tensor.shape) != tuple(named[name].shape):
            raise ValueError(
                f"direction[{name!r}]: shape {tuple(tensor.shape)} does not match the parameter's "
                f"{tuple(named[name].shape)}"
            )
    return dict(pairs)


def _logits_and_jvp(
    model: nn.Module,
    inputs: Tensor,
    fixed: dict[str, Tensor],
    primals: dict[str, Tensor],
    tangents: dict[str, Tensor],
    method: Method,
) -> tuple[Tensor, Tensor]:
    """The logits ``z`` and ``J d`` (same shape), by forward mode or double backward."""

    def forward(theta: dict[str, Tensor]) -> Tensor:
        out = functional_call(model, {**fixed, **theta}, (inputs,))
        logits = logits_of(out)
        if logits is None:
            raise TypeError(
                f"quality_indicator: the model returned a {type(out).__name__}; expected logits: a "
                "tensor, an output with .logits, or a tuple whose first element they are"
            )
        return logits

    if not primals:
        with torch.no_grad():
            logits = forward({})
        return logits, torch.zeros_like(logits)
    if method in ("auto", "jvp"):
        try:
            with torch.no_grad():
                result = jvp(forward, (primals,), (tangents,))
            return result[0], result[1]
        except (NotImplementedError, RuntimeError):
            if method == "jvp":
                raise
    with torch.enable_grad():
        theta = {n: v.detach().requires_grad_(True) for n, v in primals.items()}
        logits = forward(theta)
        w = torch.zeros_like(logits, requires_grad=True)
        grads = torch.autograd.grad(
            logits, list(theta.values()), grad_outputs=w, create_graph=True, allow_unused=True
        )
        pairs = zip(grads, theta, strict=True)
        used = [(g, tangents[n]) for g, n in pairs if g is not None and g.requires_grad]
        if not used:
            return logits.detach(), torch.zeros_like(logits.detach())
        (u,) = torch.autograd.grad(
            [g for g, _ in used], w, grad_outputs=[t for _, t in used], allow_unused=True
        )
    return logits.detach(), (u if u is not None else torch.zeros_like(w)).detach()


def _indicator(logits: Tensor, u: Tensor, targets: Tensor, loss: LossKind) -> Quality:
    """γ from the logits, ``J d`` and the targets, in float64."""
    z, jd = logits.detach().double(), u.detach().double()
    if loss == "mse":
        rows = z.shape[0] if z.dim() else 1
        if tuple(targets.shape) != tuple(z.shape):
            raise ValueError(f"targets: shape {tuple(targets.shape)}; expected the outputs' {tuple(z.shape)}")
        r = (z - targets.double()).reshape(rows, -1)
        jd = jd.reshape(rows, -1)
        value = 0.5 * r.square().sum() / rows
        slope = (r * jd).sum() / rows
        curvature = jd.square().sum() / rows
    else:
        classes = z.shape[-1]
        z, jd, t = z.reshape(-1, classes), jd.reshape(-1, classes), targets.reshape(-1)
        if t.numel() != z.shape[0]:
            raise ValueError(
                f"targets: {t.numel()} values for {z.shape[0]} rows of logits (shape {tuple(logits.shape)})"
            )
        keep = t != IGNORE_INDEX
        z, jd, t = z[keep], jd[keep], t[keep].long()
        rows = int(t.numel())
        if rows == 0:
            return Quality(gamma=math.nan, curvature=0.0, slope=0.0, loss=math.nan, rows=0)
        log_p = F.log_softmax(z, dim=-1)
        p = log_p.exp()
        mean_u = (p * jd).sum(dim=-1)
        picked = jd.gather(1, t[:, None]).squeeze(1)
        value = -log_p.gather(1, t[:, None]).sum() / rows
        slope = (mean_u - picked).sum() / rows  # Σ_n (p_n - e_{y_n})ᵀ u_n / N
        curvature = (p * (jd - mean_u[:, None]).square()).sum() / rows  # uᵀ(diag p - p pᵀ)u / N
    c, s = float(curvature), float(slope)
    gamma = math.sqrt(max(c, 0.0)) / abs(s) if s != 0.0 else math.inf if c > 0 else math.nan
    return Quality(gamma=gamma, curvature=c, slope=s, loss=float(value), rows=rows)


class QualityProbe:
    """A fixed probe batch, and γ of the update one training step applies.

    Usage around a step::

        before = probe.snapshot()
        ...                                  # forward, backward, precondition, optimizer step
        quality = probe.measure(before)      # γ of θ_after - θ_before, at θ_before
    """

    def __init__(self, model: nn.Module, inputs: Tensor, targets: Tensor, *, loss: LossKind) -> None:
        """Probe ``model`` on ``(inputs, targets)`` with the ``loss`` of the training job."""
        if loss not in LOSS_KINDS:
            raise ValueError(f"loss: got {loss!r}; expected one of {LOSS_KINDS}")
        self.model, self.inputs, self.targets, self.loss = model, inputs, targets, loss
        self.method: Method = "auto"
        """How ``J d`` is computed; ``"auto"`` becomes ``"jvp"`` or ``"double_backward"`` at the first
        :meth:`measure`, whichever the model supports."""

    @classmethod
    def draw(
        cls,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        *,
        size: int,
        seed: int,
        loss: LossKind,
        device: torch.device | str | None = None,
    ) -> QualityProbe:
        """A probe of ``min(size, len(inputs))`` rows drawn without replacement.

        The rows come from a private generator seeded by ``seed``; the global RNG is not touched.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size: got {size!r}; expected an integer >= 1")
        generator = torch.Generator().manual_seed(seed % 2**63)
        rows = torch.randperm(len(inputs), generator=generator)[: min(size, len(inputs))]
        x, y = inputs[rows], targets[rows]
        if device is not None:
            x, y = x.to(device), y.to(device)
        return cls(model, x, y, loss=loss)

    def snapshot(self) -> dict[str, Tensor]:
        """A copy of the current parameters, by name."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def measure(self, before: Mapping[str, Tensor]) -> Quality:
        """γ of the step since ``before`` (``θ_now - θ_before``), evaluated at ``θ_before``."""
        named = dict(self.model.named_parameters())
        direction = {n: _widened(named[n].detach()) - _widened(before[n]) for n in before}
        if self.method == "auto":  # find out once which method the model supports
            try:
                result = self._indicator(direction, before, "jvp")
                self.method = "jvp"
                return result
            except (NotImplementedError, RuntimeError):
                self.method = "double_backward"
        return self._indicator(direction, before, self.method)

    def _indicator(self, direction: dict[str, Tensor], at: Mapping[str, Tensor], method: Method) -> Quality:
        return quality_indicator(
            self.model, self.inputs, self.targets, direction, loss=self.loss, params=at, method=method
        )

"""Hooks that gather A and G statistics on the steps that refresh the factors.

A forward hook on each registered module adds the step's A statistic at once (the input is not
kept). What happens to the output depends on the curvature:

- ``ef``: a tensor hook on the output adds ``g g^T`` from the real backward pass;
- ``ief``: the same, with each row weighted by ``1 / max(s_n, floor)``, where ``s_n`` is the squared
  norm of sample n's logit gradient, taken by a hook on the marked logits;
- ``mc``: the outputs are remembered, and marking the logits runs one extra ``autograd.grad`` of
  the loss under labels sampled from ``softmax(logits)`` with respect to those outputs, which gives
  G without touching any parameter's ``.grad``.

Everything a forward pass registers belongs to a :class:`_Pass` that ends when its logits are
marked, so gradient accumulation (several forward/backward pairs per step) pairs each layer output
with the right logits. Hooks run with autocast off and accumulate in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ngd_dist.kfac.config import KFACConfig
from ngd_dist.kfac.curvature.modules import g_statistic
from ngd_dist.kfac.layer import KFACLayer
from ngd_dist.kfac.timing import PhaseClock


@dataclass
class _Pass:
    """The layer outputs of one forward pass, up to and including its marked logits."""

    marked: bool = False
    loss_rows: int = 0
    weights: Tensor | None = None
    outputs: list[tuple[KFACLayer, Tensor]] = field(default_factory=list)
    deferred: list[tuple[KFACLayer, Tensor]] = field(default_factory=list)


class StatisticsCapture:
    """Installs the hooks and routes what they see into each layer's pending statistics."""

    def __init__(
        self,
        layers: list[KFACLayer],
        config: KFACConfig,
        grad_scaler: torch.amp.GradScaler | None,
        *,
        clock: PhaseClock,
    ) -> None:
        """Prepare capture for ``layers``; nothing is hooked until :meth:`install`.

        The hooks time the statistics they compute as ``factor_computation`` on ``clock``.
        """
        self.layers = layers
        self.config = config
        self.grad_scaler = grad_scaler
        self.capturing: set[str] = set()
        """Names of the layers whose statistics this step gathers (set by the preconditioner)."""
        self.missing_mark = False
        """An iEF backward reached a layer whose forward pass never marked its logits."""
        self.generator: torch.Generator | None = None
        self._pass: _Pass | None = None
        self._scale: float | None = None
        self._handles: list[RemovableHandle] = []
        self.clock = clock

    def install(self, model: nn.Module) -> None:
        """Hook every registered module, then the output module named in the config (if any)."""
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(partial(self._on_forward, layer)))
        if self.config.output_module is not None:
            modules = dict(model.named_modules())
            if self.config.output_module not in modules:
                names = ", ".join(n for n in list(modules)[1:8])
                raise ValueError(
                    f"KFACConfig.output_module: got {self.config.output_module!r}; expected the "
                    f"name of a module of the model (e.g. {names})"
                )
            head = modules[self.config.output_module]
            self._handles.append(head.register_forward_hook(self._on_head_forward))

    def remove(self) -> None:
        """Remove all hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Start a new step: forget passes, flags and the cached loss scale."""
        self._pass = None
        self._scale = None
        self.missing_mark = False

    @property
    def active(self) -> bool:
        """Whether any layer gathers statistics this step."""
        return bool(self.capturing)

    def unmarked(self) -> bool:
        """Whether this step saw a forward pass whose logits were never marked."""
        pending = self._pass is not None and not self._pass.marked and bool(self._pass.outputs)
        return self.missing_mark or pending

    # -- forward -------------------------------------------------------------------------------

    def _capturing(self, layer: KFACLayer | None = None) -> bool:
        if layer is None:
            return bool(self.capturing) and torch.is_grad_enabled()
        return layer.name in self.capturing and torch.is_grad_enabled() and layer.module.training

    def _current_pass(self) -> _Pass:
        if self._pass is None or self._pass.marked:
            self._pass = _Pass()
        return self._pass

    def _on_forward(self, layer: KFACLayer, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not self._capturing(layer):
            return
        x = args[0].detach()
        with self.clock("factor_computation"):
            with torch.autocast(x.device.type, enabled=False):
                total, rows = layer.math.a_statistic(module, x, self.config.factor_dtype)
            layer.pending_a.add(total, rows)
        if not output.requires_grad:
            return
        current = self._current_pass()
        if self.config.curvature.samples_labels:
            current.outputs.append((layer, output))
        else:
            output.register_hook(partial(self._on_output_grad, layer, current))

    def _on_head_forward(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if module.training:
            self.mark_output(output)

    def mark_output(self, logits: Tensor) -> None:
        """Declare ``logits`` (shape ``(*lead, classes)``) the model output of this forward pass."""
        if not self._capturing() or not logits.requires_grad:
            return
        current = self._current_pass()
        current.marked = True
        current.loss_rows = logits.numel() // max(logits.shape[-1], 1)
        if self.config.curvature.samples_labels:
            self._sampled_fisher(current, logits)
        elif self.config.curvature.weights_samples:
            logits.register_hook(partial(self._on_logit_grad, current))

    # -- backward ------------------------------------------------------------------------------

    def _loss_scale(self) -> float:
        if self._scale is None:
            scaler = self.grad_scaler
            self._scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        return self._scale

    def _per_sample(self, rows: int) -> float:
        """Factor that turns captured gradients into gradients of one sample's loss."""
        rows = rows if self.config.loss_reduction == "mean" else 1
        return rows / self._loss_scale()

    def _add_g(self, layer: KFACLayer, g_rows: Tensor, weights: Tensor | None, scale: float) -> None:
        with self.clock("factor_computation"):
            with torch.autocast(g_rows.device.type, enabled=False):
                total = g_statistic(g_rows, weights, scale, self.config.factor_dtype)
            layer.pending_g.add(total, layer.math.samples(g_rows))

    def _on_output_grad(self, layer: KFACLayer, current: _Pass, grad: Tensor) -> None:
        g_rows = layer.math.g_rows(layer.module, grad.detach())
        if self.config.curvature.weights_samples:
            if not current.marked:
                self.missing_mark = True
                return
            if current.weights is None:  # this output is the logits tensor itself: wait for its hook
                current.deferred.append((layer, g_rows))
                return
        rows = current.loss_rows if current.marked else layer.math.samples(g_rows)
        self._add_g(layer, g_rows, current.weights, self._per_sample(rows))

    def _on_logit_grad(self, current: _Pass, grad: Tensor) -> None:
        scale = self._per_sample(current.loss_rows)
        s = (grad.detach().float() * scale).square().sum(dim=-1)
        current.weights = 1.0 / s.clamp_min(self.config.ief_floor)
        for layer, g_rows in current.deferred:
            self._add_g(layer, g_rows, current.weights, scale)
        current.deferred.clear()

    def _sampled_fisher(self, current: _Pass, logits: Tensor) -> None:
        outputs, current.outputs = current.outputs, []
        if not outputs:
            return
        classes = logits.shape[-1]
        flat = logits.reshape(-1, classes).float()
        if self.generator is None or self.generator.device != logits.device:
            self.generator = torch.Generator(logits.device)
            self.generator.manual_seed(self.config.seed)
        with torch.no_grad():
            probs = torch.softmax(flat.detach(), dim=-1)
            labels = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        loss = F.cross_entropy(flat, labels, reduction="sum")
        grads = torch.autograd.grad(loss, [out for _, out in outputs], retain_graph=True, allow_unused=True)
        for (layer, _), grad in zip(outputs, grads, strict=True):
            if grad is not None:
                self._add_g(layer, layer.math.g_rows(layer.module, grad), None, 1.0)

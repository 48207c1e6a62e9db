"""Hooks that gather A and G statistics on the steps that refresh the factors.

A forward hook on each registered module adds the step's A statistic at once (the input is not
kept; an element-wise layer keeps its normalised input until its backward instead). What happens
to the output depends on the curvature:

- ``ef``: a tensor hook on the output adds ``g g^T`` from the real backward pass;
- ``ief``: the same, with each row weighted by ``1 / max(s_n, floor)``, where ``s_n`` is the squared
  norm of sample n's logit gradient, taken by a hook on the marked logits;
- ``mc``: the outputs are remembered, and marking the logits runs one extra ``autograd.grad`` of
  the loss under labels sampled from ``softmax(logits)`` with respect to those outputs, which gives
  G without touching any parameter's ``.grad``.

**Ignored rows.** Rows of the marked logits that the loss ignores (tokens labelled with the loss's
``ignore_index``, padding) add nothing to G, to the iEF weights or to the row counts. They are the
rows of ``mark_output(logits, mask=...)`` (or ``mask_rows(mask)`` after an automatic mark) where
``mask`` is False, or, without a mask, the rows whose logit gradient is exactly zero (what
``ignore_index`` gives; ``ef`` and ``ief`` only, and unless ``KFACConfig.infer_ignored_rows`` is
off: a real sample fitted so well that its gradient underflows to zero is then left out too, which
it nearly is anyway). With ``mc`` only an explicit mask leaves rows out. The A statistics, gathered
in the forward pass, include every row.

**Inputs that broadcast over the batch.** A layer whose output has a leading dim of 1 while the
model was called on a batch of N (the leading dim of its first tensor argument, positional or
keyword) -- GPT-2's position embedding called on ``position_ids`` of shape (1, T), say -- has its
output expanded to N on the steps that gather statistics, so that its G rows are per sample, as
they would be with (N, T) inputs. The model computes the same thing either way.

Everything a forward pass registers belongs to a :class:`_Pass` that ends when its logits are
marked, so gradient accumulation (several forward/backward pairs per step) pairs each layer output
with the right logits. Hooks run with autocast off and accumulate in float32.

**Row subsampling.** With ``KFACConfig.statistics_rows`` each A and G statistic of a pass uses at
most that many of its rows (:class:`~ngd_dist.kfac.curvature.modules.RowSample`), drawn with a
generator seeded by the config's seed, the step, the layer, the factor and the pass, so a run draws
the same rows when repeated or resumed from a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ngd_dist.kfac.config import KFACConfig
from ngd_dist.kfac.curvature.modules import RowSample, second_moment, weighted_count, weighted_rows
from ngd_dist.kfac.curvature.norms import ElementwiseMath
from ngd_dist.kfac.layer import KFACLayer
from ngd_dist.kfac.timing import PhaseClock


@dataclass
class _Pass:
    """The layer outputs of one forward pass, up to and including its marked logits."""

    marked: bool = False
    resolved: bool = False
    """The logits' gradient has been seen: the weights and the row count are known."""
    loss_rows: int = 0
    lead: tuple[int, ...] = ()
    mask: Tensor | None = None
    weights: Tensor | None = None
    outputs: list[tuple[KFACLayer, Tensor, Tensor | None]] = field(default_factory=list)
    deferred: list[tuple[KFACLayer, Tensor, Tensor | None]] = field(default_factory=list)


_PAUSED = threading.local()


@contextlib.contextmanager
def statistics_paused() -> Iterator[None]:
    """Within it, no preconditioner gathers statistics from forward or backward passes (of this
    thread): for measurement passes on the training model -- per-sample gradients, the quality
    probe -- that must not count as training batches. Passes under ``torch.func`` transforms
    (``vmap``, ``grad``, ``jvp``) are never gathered either.
    """
    before = getattr(_PAUSED, "on", False)
    _PAUSED.on = True
    try:
        yield
    finally:
        _PAUSED.on = before


def _transformed(x: Tensor) -> bool:
    """Whether ``x`` is a ``torch.func`` wrapper (inside vmap / grad / jvp)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


def _leading_dim(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The leading dim of the first tensor among a call's arguments (inside a dict argument too)."""
    values: list[Any] = [*args, *kwargs.values()]
    for value in values:
        if isinstance(value, Mapping):
            values.extend(value.values())
            continue
        if isinstance(value, Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None


class StatisticsCapture:
    """Installs the hooks and routes what they see into each layer's pending statistics."""

    def __init__(
        self,
        layers: list[KFACLayer],
        config: KFACConfig,
        grad_scaler: torch.amp.GradScaler | None,
        *,
        clock: PhaseClock,
        step: Callable[[], int] = lambda: 0,
    ) -> None:
        """Prepare capture for ``layers``; nothing is hooked until :meth:`install`.

        The hooks time the statistics they compute as ``factor_computation`` on ``clock``; ``step``
        says which step is being gathered (it seeds the rows drawn under ``statistics_rows``).
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
        self._batch: int | None = None
        self._handles: list[RemovableHandle] = []
        self.clock = clock
        self._step = step
        self._draws: Counter[tuple[str, str]] = Counter()

    def install(self, model: nn.Module) -> None:
        """Hook the model, every registered module, then the output module named in the config."""
        self._handles.append(model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
        for layer in self.layers:
            hook = partial(self._on_forward, layer)
            self._handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
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
        self._draws.clear()

    @property
    def active(self) -> bool:
        """Whether any layer gathers statistics this step."""
        return bool(self.capturing)

    def unmarked(self) -> bool:
        """Whether this step saw a forward pass whose logits were never marked."""
        pending = self._pass is not None and not self._pass.marked and bool(self._pass.outputs)
        return self.missing_mark or pending

    def _row_sample(self, layer: KFACLayer, factor: str) -> RowSample | None:
        """The rows this pass's ``factor`` statistic of ``layer`` may use (None: all of them)."""
        limit = self.config.statistics_rows
        if limit is None:
            return None
        key = (layer.name, factor)
        draw = self._draws[key]
        self._draws[key] += 1
        name = f"{self.config.seed}/{self._step()}/{layer.name}/{factor}/{draw}".encode()
        seed = int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little") >> 1
        return RowSample(limit, torch.Generator().manual_seed(seed))

    # -- forward -------------------------------------------------------------------------------

    def _capturing(self, layer: KFACLayer | None = None) -> bool:
        if getattr(_PAUSED, "on", False):
            return False
        if layer is None:
            return bool(self.capturing) and torch.is_grad_enabled()
        return layer.name in self.capturing and torch.is_grad_enabled() and layer.module.training

    def _current_pass(self) -> _Pass:
        if self._pass is None or self._pass.marked:
            self._pass = _Pass()
        return self._pass

    def _on_model_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._batch = _leading_dim(args, kwargs)

    def _on_forward(
        self, layer: KFACLayer, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Tensor | None:
        if not self._capturing(layer) or not isinstance(output, Tensor):
            return None
        inputs = [v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)]
        if not inputs:
            return None
        if _transformed(inputs[0]) or _transformed(output):
            return None
        x = inputs[0].detach()
        expanded = None
        batch = self._batch
        if batch is not None and batch > 1 and output.dim() >= 2 and output.shape[0] == 1:
            output = expanded = output.expand(batch, *output.shape[1:])
        context = None
        with self.clock("factor_computation"), torch.autocast(x.device.type, enabled=False):
            if isinstance(layer.math, ElementwiseMath):
                context = layer.math.normalized(module, x.float() if x.dtype in _HALF else x)
            else:
                dtype = self.config.factor_dtype
                sample = self._row_sample(layer, "a")
                if sample is None:
                    total, rows = layer.math.a_statistic(module, x, dtype, diagonal=layer.diagonal_a)
                else:
                    total, rows = layer.math.sampled_a_statistic(
                        module, x, dtype, sample, diagonal=layer.diagonal_a
                    )
                layer.pending_a.add(total, rows)
        if not output.requires_grad:
            return expanded
        current = self._current_pass()
        if self.config.curvature.samples_labels:
            current.outputs.append((layer, output, context))
        else:
            output.register_hook(partial(self._on_output_grad, layer, current, context))
        return expanded

    def _on_head_forward(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if module.training:
            self.mark_output(output)

    def mask_rows(self, mask: Tensor) -> None:
        """Set the rows the loss counts for the logits marked last (see :meth:`mark_output`)."""
        current = self._pass
        if current is None or not current.marked or not self._capturing():
            return
        current.mask = self._checked_mask(mask, current.lead)

    def _checked_mask(self, mask: Tensor, lead: tuple[int, ...]) -> Tensor:
        if tuple(mask.shape) != lead:
            raise ValueError(
                f"mark_output: mask of shape {tuple(mask.shape)}; expected the logits' leading dims "
                f"{lead} (one flag per row of logits)"
            )
        return mask.detach().to(dtype=torch.bool)

    def mark_output(self, logits: Tensor, mask: Tensor | None = None) -> None:
        """Declare ``logits`` (shape ``(*lead, classes)``) the model output of this forward pass.

        ``mask`` (shape ``lead``, bool): the rows the loss counts; rows where it is False add
        nothing to the statistics. Without it, rows whose logit gradient is exactly zero are the
        ignored ones (for ``ef`` and ``ief``; ``mc`` then samples every row).
        """
        if not self._capturing() or not logits.requires_grad or _transformed(logits):
            return
        lead = tuple(logits.shape[:-1])
        checked = None if mask is None else self._checked_mask(mask, lead).to(logits.device)
        current = self._current_pass()
        current.marked = True
        current.lead = lead
        current.loss_rows = logits.numel() // max(logits.shape[-1], 1)
        current.mask = checked
        if self.config.curvature.samples_labels:
            self._sampled_fisher(current, logits)
        else:
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

    def _add(
        self,
        layer: KFACLayer,
        grad: Tensor,
        context: Tensor | None,
        weights: Tensor | None,
        scale: float | None,
        kept: int = 0,
    ) -> None:
        """Add one pass's G statistics of ``layer`` (A and G of an element-wise layer).

        ``scale`` turns the captured gradients into per-sample ones; None: from the layer's own
        sample count (an unmarked ``ef`` pass). ``kept``: how many of ``weights`` are positive.
        """
        dtype = self.config.factor_dtype
        with self.clock("factor_computation"), torch.autocast(grad.device.type, enabled=False):
            if isinstance(layer.math, ElementwiseMath):
                assert context is not None
                rows = layer.math.sample_grads(layer.module, context, grad.to(context.dtype))
            else:
                rows = layer.math.g_rows(layer.module, grad)
            samples = layer.math.samples(rows)
            c = self._per_sample(samples) if scale is None else scale
            count = weighted_count(samples, weights, kept)
            diagonal = layer.math.elementwise or layer.diagonal_g
            sample = None if layer.math.elementwise else self._row_sample(layer, "g")
            total = second_moment(weighted_rows(rows, weights, c, dtype, sample), dtype, diagonal)
            if layer.math.elementwise:
                layer.pending_a.add(total, count)
                layer.pending_g.add(total.new_full((1,), float(count)), count)
            else:
                layer.pending_g.add(total, count)

    def _on_output_grad(self, layer: KFACLayer, current: _Pass, context: Tensor | None, grad: Tensor) -> None:
        grad = grad.detach()
        if current.marked and not current.resolved:  # this output is the logits tensor itself
            current.deferred.append((layer, grad, context))
            return
        if self.config.curvature.weights_samples and not current.marked:
            self.missing_mark = True
            return
        scale = self._per_sample(current.loss_rows) if current.marked else None
        self._add(layer, grad, context, current.weights, scale, current.loss_rows)

    def _on_logit_grad(self, current: _Pass, grad: Tensor) -> None:
        g = grad.detach().float()
        valid = current.mask
        if valid is None and self.config.infer_ignored_rows:
            valid = (g != 0).any(dim=-1)
        if valid is not None:
            current.loss_rows = int(valid.sum())
        scale = self._per_sample(current.loss_rows)
        if self.config.curvature.weights_samples:
            s = (g * scale).square().sum(dim=-1)
            current.weights = 1.0 / s.clamp_min(self.config.ief_floor)
            if valid is not None:
                current.weights = torch.where(valid, current.weights, 0.0)
        elif valid is not None and current.loss_rows != valid.numel():
            current.weights = valid.to(g.dtype)
        current.resolved = True
        for layer, deferred, context in current.deferred:
            self._add(layer, deferred, context, current.weights, scale, current.loss_rows)
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
        weights, kept = None, 0
        if current.mask is not None:
            keep = current.mask.reshape(-1)
            flat, labels = flat[keep], labels[keep]
            weights, kept = current.mask.to(flat.dtype), int(keep.sum())
        loss = F.cross_entropy(flat, labels, reduction="sum")
        tensors = [out for _, out, _ in outputs]
        grads = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
        for (layer, _, context), grad in zip(outputs, grads, strict=True):
            if grad is not None:
                self._add(layer, grad, context, weights, 1.0, kept)


_HALF = (torch.float16, torch.bfloat16)

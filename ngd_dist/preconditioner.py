"""The K-FAC preconditioner: orchestration of one optimisation step.

Usage (any ``torch.optim`` optimizer follows the preconditioned gradients)::

    precond = KFACPreconditioner(model, KFACConfig(curvature="ief"), optimizer=opt)
    for x, y in loader:
        opt.zero_grad()
        logits = model(x)
        precond.mark_output(logits)        # or KFACConfig(output_module="head")
        loss_fn(logits, y).backward()
        precond.step()                     # .grad of registered layers <- preconditioned
        opt.step()

Per step: fold the statistics captured this step into the running factors (on factor steps),
refresh the decompositions this rank owns (on inverse steps), precondition every registered
layer's gradient, scale all of them by the KL-clip factor, and write them back into ``.grad``.
With a ``torch.amp.GradScaler``, call ``scaler.unscale_(opt)`` before :meth:`step`; a step whose
gradients overflowed (the scaler will skip it) folds nothing into the factors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ngd_dist.config import KFACConfig
from ngd_dist.curvature.capture import StatisticsCapture
from ngd_dist.distributed import Communicator, LayerShape, LocalCommunicator, round_robin
from ngd_dist.layer import KFACLayer
from ngd_dist.linalg import decompose
from ngd_dist.registry import register_layers

STATE_VERSION = 1


@dataclass
class KFACStats:
    """Counters and last values of the preconditioner (what the metrics exporter reports)."""

    steps: int = 0
    """Calls to :meth:`KFACPreconditioner.step`."""
    factor_refreshes: int = 0
    """Steps whose statistics were folded into the running factors."""
    decompositions: int = 0
    """Per-layer decompositions computed on this rank."""
    decomposition_retries: int = 0
    """Decompositions that failed in the configured dtype and were retried in float64."""
    decomposition_failures: int = 0
    """Decompositions that failed in float64 too (the previous one was kept)."""
    nonfinite_rejected: int = 0
    """Factor statistics rejected because they held NaN or inf."""
    skipped_steps: int = 0
    """Steps the GradScaler skipped (overflowed gradients): nothing was folded."""
    kl_scale: float = 1.0
    """The KL-clip scale applied at the last step (1 when it did not bind)."""
    damping: float = 0.0
    """Damping used at the last step."""


class KFACPreconditioner:
    """K-FAC natural gradients for a model's Linear / Conv2d / Embedding layers.

    Replaces their gradients by preconditioned ones under the EF, sampled-Fisher or iEF curvature
    (see :class:`KFACConfig`).
    """

    def __init__(
        self,
        model: nn.Module,
        config: KFACConfig | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        communicator: Communicator | None = None,
    ) -> None:
        """Register the model's supported layers and hook them.

        ``optimizer`` is read for each parameter's learning rate (needed by ``kl_clip``);
        ``grad_scaler`` is the ``torch.amp.GradScaler`` of mixed-precision training, if any.
        """
        self.config = config if config is not None else KFACConfig()
        if self.config.kl_clip is not None and optimizer is None:
            raise ValueError(
                "KFACConfig.kl_clip: got "
                f"{self.config.kl_clip!r} but no optimizer was given; pass optimizer=... so the "
                "learning rate can be read, or set kl_clip=None"
            )
        self.model = model
        self.optimizer = optimizer
        self.grad_scaler = grad_scaler
        self.comm: Communicator = communicator if communicator is not None else LocalCommunicator()
        self.layers, self.skipped = register_layers(model, self.config)
        if not self.layers:
            raise ValueError(
                "KFACConfig.layer_types/include/skip: no module of the model can be preconditioned "
                f"(left out: {self.skipped or 'no Linear, Conv2d or Embedding modules'})"
            )
        shapes = [LayerShape(la.name, la.a_dim, la.g_dim, la.math.diagonal_a) for la in self.layers]
        self.plan = round_robin(shapes, self.comm.world_size)
        self.stats = KFACStats()
        self.capture = StatisticsCapture(self.layers, self.config, grad_scaler)
        self.capture.install(model)
        self.capture.active = True

    # -- public --------------------------------------------------------------------------------

    def mark_output(self, logits: Tensor) -> None:
        """Declare the model's output logits of the forward pass just run (needed by "mc"/"ief").

        Call it after the forward pass and before ``backward``, once per micro-batch; it does
        nothing on steps that do not refresh the factors. ``KFACConfig.output_module`` does the
        same automatically for a named head module.
        """
        self.capture.mark_output(logits)

    @property
    def factor_step(self) -> bool:
        """Whether the current step captures statistics."""
        return self.stats.steps % self.config.factor_every == 0

    def step(self) -> None:
        """Refresh what is due; replace each registered layer's ``.grad`` by its natural gradient."""
        step = self.stats.steps
        if self.factor_step:
            self._check_marked()
            if self._scaler_will_skip():
                self.stats.skipped_steps += 1
                for layer in self.layers:
                    layer.pending_a.clear()
                    layer.pending_g.clear()
            else:
                self._fold()
        if step % self.config.inverse_every == 0:
            self._refresh(self.config.damping_at(step))
        self._precondition(self.config.damping_at(step))
        self.stats.steps += 1
        self.capture.reset()
        self.capture.active = self.factor_step

    def remove(self) -> None:
        """Remove the hooks; the model is left as it was."""
        self.capture.remove()

    def state_dict(self) -> dict[str, Any]:
        """Factors and counters (decompositions are recomputed by :meth:`load_state_dict`)."""
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "stats": asdict(self.stats),
            "layers": {layer.name: layer.state_dict() for layer in self.layers},
        }
        if self.capture.generator is not None:
            state["mc_generator"] = self.capture.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore factors and counters from :meth:`state_dict`, and recompute decompositions.

        Raises ValueError naming the layer and entry when the state does not fit this model.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"KFAC state: version {state.get('version') if isinstance(state, dict) else state!r}"
                f"; expected a dict from KFACPreconditioner.state_dict() with version {STATE_VERSION}"
            )
        saved = state.get("layers", {})
        names = {layer.name for layer in self.layers}
        if set(saved) != names:
            raise ValueError(
                f"KFAC state: layers {sorted(set(saved) ^ names)} are in only one of the "
                "checkpoint and the model; expected the same registered layers"
            )
        for layer in self.layers:
            self._load_layer(layer, saved[layer.name])
        self.stats = KFACStats(**state["stats"])
        if "mc_generator" in state:
            device = next(iter(self.model.parameters())).device
            self.capture.generator = torch.Generator(device)
            self.capture.generator.set_state(state["mc_generator"])
        self.capture.reset()
        self.capture.active = self.factor_step

    # -- one step ------------------------------------------------------------------------------

    def _check_marked(self) -> None:
        if self.config.curvature in ("ief", "mc") and self.capture.unmarked():
            raise RuntimeError(
                f"curvature={self.config.curvature!r} needs the model's logits: call "
                "precond.mark_output(logits) after each forward pass (before backward), or set "
                "KFACConfig(output_module=<name of the head module>)"
            )

    def _scaler_will_skip(self) -> bool:
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return False
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return False
        return not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _fold(self) -> None:
        """Average this step's statistics and fold the finite ones into the running factors."""
        fresh: list[tuple[KFACLayer, str, Tensor]] = []
        for layer in self.layers:
            a, g = layer.pending_a.mean(), layer.pending_g.mean()
            layer.pending_a.clear()
            layer.pending_g.clear()
            if a is not None and g is not None:
                fresh += [(layer, "a", a), (layer, "g", g)]
        if not fresh:
            return
        finite = torch.stack([torch.isfinite(t).all() for _, _, t in fresh]).tolist()
        for (layer, name, tensor), ok in zip(fresh, finite, strict=True):
            if ok:
                layer.fold(name, tensor, self.config.factor_decay)
            else:
                self.stats.nonfinite_rejected += 1
        self.stats.factor_refreshes += 1

    def _refresh(self, damping: float) -> None:
        """Recompute the decompositions this rank owns."""
        for layer in self.layers:
            if self.plan.layer_owner[layer.name] != self.comm.rank or layer.a is None:
                continue
            ok, retried = layer.refresh(self.config.method, damping, self.config.inverse_dtype)  # type: ignore[arg-type]
            self.stats.decompositions += 1
            self.stats.decomposition_retries += int(retried)
            self.stats.decomposition_failures += int(not ok)

    def _learning_rates(self) -> dict[int, float]:
        if self.optimizer is None:
            return {}
        return {id(p): float(group["lr"]) for group in self.optimizer.param_groups for p in group["params"]}

    def _precondition(self, damping: float) -> None:
        self.stats.damping = damping
        updates: list[tuple[KFACLayer, Tensor, Tensor]] = []
        for layer in self.layers:
            if layer.decomposition is None:
                continue
            grad = layer.math.grad_matrix(layer.module)
            if grad is None:
                continue
            updates.append((layer, grad, layer.decomposition.apply(grad, damping)))
        if not updates:
            return
        scale = 1.0
        if self.config.kl_clip is not None:
            lrs = self._learning_rates()
            terms = []
            for layer, grad, precond in updates:
                lr = lrs.get(id(layer.math.params(layer.module)[0]), 0.0)
                terms.append((precond * grad).sum().float() * lr**2)
            vg = float(torch.stack(terms).sum())
            if vg > 0 and math.isfinite(vg):
                scale = min(1.0, math.sqrt(self.config.kl_clip / vg))
        self.stats.kl_scale = scale
        for layer, _, precond in updates:
            layer.math.set_grad(layer.module, precond * scale if scale != 1.0 else precond)

    def _load_layer(self, layer: KFACLayer, saved: dict[str, Any]) -> None:
        shapes = {
            "a": (layer.a_dim,) if layer.math.diagonal_a else (layer.a_dim, layer.a_dim),
            "g": (layer.g_dim, layer.g_dim),
        }
        for key, value in saved.items():
            if key == "decomposed_damping":
                continue
            want = shapes[key.removeprefix("decomposed_")]
            if not isinstance(value, Tensor) or tuple(value.shape) != want:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"KFAC state: layers.{layer.name}.{key} has shape {got}; expected {want}")
        device = layer.math.params(layer.module)[0].device
        layer.a = saved["a"].to(device) if "a" in saved else None
        layer.g = saved["g"].to(device) if "g" in saved else None
        layer.decomposition, layer.decomposed_from = None, None
        if "decomposed_damping" not in saved:
            return
        a = saved["decomposed_a"].to(device) if "decomposed_a" in saved else layer.a
        g = saved["decomposed_g"].to(device) if "decomposed_g" in saved else layer.g
        assert a is not None and g is not None
        damping = float(saved["decomposed_damping"])
        result, _ = decompose(a, g, self.config.method, damping, self.config.inverse_dtype)  # type: ignore[arg-type]
        layer.decomposition, layer.decomposed_from = result, (a, g)
        layer.decomposed_damping = damping
